//! Plots test-accuracy curves of several runs on one SVG chart.
//!
//! Each curve is `NAME=FILE`, where FILE is a CSV whose header names a
//! `round` and an `accuracy` column (a fleet-sim `rounds.csv`, or any other
//! run converted to that form). Accuracy is plotted in percent.
//!
//! ```sh
//! cargo run --release -p fleet-sim --example accuracy_plot -- --out curves.svg \
//!     fleet-sim=runs/flower/fleet-sim/rounds.csv flower=runs/flower/flower.csv
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fleet_sim::report::{Series, line_chart};

/// Plot accuracy curves from CSV files on one chart.
#[derive(Debug, Parser)]
struct Args {
    /// Output SVG file.
    #[arg(long)]
    out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "Test accuracy per round")]
    title: String,
    /// Curves as NAME=FILE.
    #[arg(required = true)]
    curves: Vec<String>,
}

fn read_curve(spec: &str) -> Result<Series, String> {
    let (name, path) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?}: expected NAME=FILE"))?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{path}: empty file"))?
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| format!("{path}: no {name:?} column in the header {header:?}"))
    };
    let (r, a) = (col("round")?, col("accuracy")?);
    let mut points = Vec::new();
    for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let cells: Vec<&str> = line.split(',').collect();
        let num = |c: usize| -> Result<f64, String> {
            cells
                .get(c)
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("{path}: line {}: not a number in column {c}", i + 2))
        };
        points.push((num(r)?, 100.0 * num(a)?));
    }
    Ok(Series {
        name: name.to_string(),
        points,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> Result<(), String> {
        let series = args
            .curves
            .iter()
            .map(|c| read_curve(c))
            .collect::<Result<Vec<_>, _>>()?;
        let svg = line_chart(&args.title, "round", "test accuracy (%)", &series, false)?;
        std::fs::write(&args.out, svg)
            .map_err(|e| format!("cannot write {}: {e}", args.out.display()))
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
