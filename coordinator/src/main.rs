//! The `coordinator` binary: parses the command line and runs it.

use std::process::ExitCode;

use clap::Parser;
use fleet_coordinator::cli::{Cli, run};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
