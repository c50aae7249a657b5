//! The `sheepdog` binary: parse the command line, dispatch to a command. Each command owns its
//! arguments, its output and its exit code (`src/commands/`).

use std::process::ExitCode;

/// glibc's malloc took a quarter of the process's CPU under load (many threads, many small
/// allocations for JSON and SQL rows); mimalloc is made for that.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use sheepdog::commands::{self, Command};

#[derive(Parser)]
#[command(
    name = "sheepdog",
    version,
    about = "Queue-driven worker for batch LLM chat-completion jobs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[tokio::main]
async fn main() -> ExitCode {
    sheepdog::install_crypto_provider();
    let cli = Cli::parse();
    commands::init_logging(&cli.command);
    match commands::run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
