//! The `igpt` command line: a thin layer over the library.

mod cli;

fn main() {
    if let Err(e) = cli::main() {
        let rank = igpt::parallel::launched_rank()
            .map(|r| format!("rank {r}: "))
            .unwrap_or_default();
        eprintln!("{rank}error: {e:#}");
        if let Some(hint) = cli::flag_hint(&e) {
            eprintln!("hint: {hint}");
        }
        // Under MPI, the other processes would wait for this one forever: end them all.
        igpt::parallel::abort(1);
        std::process::exit(1);
    }
    igpt::parallel::finish();
}
