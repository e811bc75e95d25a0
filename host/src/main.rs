//! The `plugboard` binary; everything lives in the library.

fn main() {
    if let Err(e) = plugboard::cli::main() {
        eprintln!("plugboard: error: {e:#}");
        std::process::exit(1);
    }
}
