//! The spread of one round's outcome over local batch orders.
//!
//! Replays round 1 of a fleet-sim run directory (the round that starts
//! from the fleet's initial model): the devices `rounds.json` lists for
//! that round train from the initial model with `--reps` different batch-order seeds,
//! their models are averaged by example count (FedAvg), and the test
//! accuracy of each average is printed with the mean and standard
//! deviation. `bench/round_spread.py` does the same in PyTorch from the same
//! run directory, so the two trainers' distributions can be compared
//! without the spread of partitions, initial models and sampled devices.
//!
//! ```sh
//! fleet-sim --fleet sim/fleets/flower-compare.toml --set seed=1 --export-task --out runs/r1
//! cargo run --release -p fleet-sim --example round_spread -- --run runs/r1 --reps 12
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use fleet_models::{Backend, TrainConfig, evaluate, train_local};
use fleet_sim::data::DeviceData;
use fleet_sim::fleet::Fleet;

/// Round-1 test accuracy of a run's first cohort over several batch orders.
#[derive(Debug, Parser)]
struct Args {
    /// A fleet-sim run directory (fleet.toml, rounds.json).
    #[arg(long)]
    run: PathBuf,
    /// Batch orders to try.
    #[arg(long, default_value_t = 12)]
    reps: u64,
}

fn main() -> ExitCode {
    match spread(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn spread(args: &Args) -> Result<(), String> {
    let read = |name: &str| {
        let path = args.run.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let fleet = Fleet::from_toml(&read("fleet.toml")?).map_err(|e| e.to_string())?;
    let rounds: serde_json::Value =
        serde_json::from_str(&read("rounds.json")?).map_err(|e| format!("rounds.json: {e}"))?;
    let cohort: Vec<usize> = serde_json::from_value(rounds[0]["devices"].clone())
        .map_err(|e| format!("rounds.json: round 1 lists no devices ({e})"))?;
    if args.reps < 2 {
        return Err("--reps must be at least 2".into());
    }
    let (data, test) = fleet_sim::data::load(&fleet)?;
    let DeviceData::Partitioned { train, devices } = &data else {
        return Err("only labelled data sets are partitioned into devices".into());
    };
    let spec = fleet.model_spec();
    let initial = fleet_sim::driver::initial_global(&fleet);
    let mut accuracies = Vec::new();
    for rep in 0..args.reps {
        let mut sum = vec![0f64; initial.len()];
        let mut examples = 0usize;
        for &device in &cohort {
            let d = train.subset(&devices[device]).map_err(|e| e.to_string())?;
            let cfg = TrainConfig {
                seed: rep * 1000 + device as u64,
                ..fleet.train_config()
            };
            let out = train_local(&spec, &initial, d, &cfg, Backend::DEFAULT)
                .map_err(|e| e.to_string())?;
            for (s, p) in sum.iter_mut().zip(&out.params) {
                *s += f64::from(*p) * out.examples as f64;
            }
            examples += out.examples;
        }
        let global: Vec<f32> = sum.iter().map(|s| (s / examples as f64) as f32).collect();
        let e =
            evaluate(&spec, &global, test.view(), Backend::DEFAULT).map_err(|e| e.to_string())?;
        accuracies.push(100.0 * f64::from(e.accuracy));
    }
    let n = accuracies.len() as f64;
    let mean = accuracies.iter().sum::<f64>() / n;
    let sd = (accuracies.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let each: Vec<String> = accuracies.iter().map(|a| format!("{a:.1}")).collect();
    println!(
        "fleet-models, seed {}, round 1, {} batch orders: mean {mean:.2}% sd {sd:.2} ({})",
        fleet.seed,
        args.reps,
        each.join(" ")
    );
    Ok(())
}
