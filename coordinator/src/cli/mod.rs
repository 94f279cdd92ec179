//! The `coordinator` command line: argument definitions and the commands
//! that run without a server.

pub mod privacy;

use clap::{Parser, Subcommand};

/// Coordinator and admin tool of the fleet learning runtime.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Plan differential privacy: ε for a noise multiplier, or the noise for an ε.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
}

/// Runs a parsed command line; the error's text is printed by `main`.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Privacy(cmd) => privacy::run(cmd),
    }
}
