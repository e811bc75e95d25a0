//! The `plugboard` command line, built inside the test package so that the
//! integration tests can start it as a child process. Same code as the
//! shipped binary: it only calls `plugboard::cli::main`.

fn main() {
    if let Err(e) = plugboard::cli::main() {
        eprintln!("plugboard: error: {e:#}");
        std::process::exit(1);
    }
}
