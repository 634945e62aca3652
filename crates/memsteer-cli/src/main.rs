//! The `memsteer` command.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = memsteer_cli::Cli::parse();
    match memsteer_cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
