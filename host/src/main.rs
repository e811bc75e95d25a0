//! The `plugboard` binary; everything lives in the library.

fn main() {
    if let Err(e) = plugboard::cli::main() {
        // One line, whatever the error quotes.
        eprintln!(
            "plugboard: error: {}",
            plugboard::cli::escape_controls(&format!("{e:#}"))
        );
        std::process::exit(1);
    }
}
