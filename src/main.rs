//! The `igpt` command line: a thin layer over the library.

mod cli;

fn main() {
    if let Err(e) = cli::main() {
        eprintln!("error: {e:#}");
        if let Some(hint) = cli::flag_hint(&e) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}
