//! The `driftless` binary: parses the command line and hands off to the library crates.
//! It holds no logic of its own.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version" | "version") => {
            println!("driftless {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("--help" | "-h" | "help") | None => {
            println!(
                "driftless {}: keeps the same tables in several data stores in agreement.\n\n\
                 usage: driftless --version\n\n\
                 This build contains the merge core only; the node, store adapters and their\n\
                 commands are not built yet (see ARCHITECTURE.md).",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("driftless: unknown command {other:?}; try `driftless --help`");
            ExitCode::from(2)
        }
    }
}
