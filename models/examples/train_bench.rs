//! Local-training throughput: examples per second of one SGD step (forward,
//! backward, update) on one thread, for the 2NN and the CNN at batch 32 and
//! 64, on each compiled-in burn backend, fed the first examples of the real
//! Fashion-MNIST training set in file order (the same batches as
//! `bench/torch_train.py`).
//!
//! ```sh
//! cargo run --release -p fleet-models --example train_bench -- [--torch bench/torch.json] [--steps N]
//! ```
//!
//! With `--torch`, the PyTorch figures of the same run of
//! `bench/torch_train.py --json` are printed in the same table.

use std::time::Instant;

use fleet_models::data::fashion::{self, Split};
use fleet_models::{Backend, ModelSpec, TrainConfig, train_local};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let steps_override: Option<usize> = arg(&args, "--steps").map(|s| s.parse()).transpose()?;
    let torch: Vec<serde_json::Value> = match arg(&args, "--torch") {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)?,
        None => Vec::new(),
    };
    let train = fashion::load(&fashion::default_dir(), Split::Train)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    println!(
        "| model | batch | framework | steps | examples/s | step (ms; burn: mean, pytorch: median) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        for batch in [32usize, 64] {
            let steps = steps_override.unwrap_or(if spec.name() == "cnn" { 40 } else { 300 });
            for &backend in Backend::ALL {
                let params = spec.init_params(0);
                let cfg = TrainConfig {
                    epochs: 1,
                    batch_size: batch,
                    ..TrainConfig::default()
                };
                let secs = pool.install(|| -> Result<f64, fleet_models::Error> {
                    // A short warm-up call, then one timed call of `steps` steps: a whole
                    // local-training run, set-up and parameter conversion included.
                    let warm: Vec<usize> = (0..3 * batch).collect();
                    train_local(&spec, &params, train.subset(&warm)?, &cfg, backend)?;
                    let idx: Vec<usize> = (0..steps * batch).collect();
                    let t = Instant::now();
                    let out = train_local(&spec, &params, train.subset(&idx)?, &cfg, backend)?;
                    assert_eq!(out.steps, steps);
                    Ok(t.elapsed().as_secs_f64())
                })?;
                println!(
                    "| {} | {batch} | burn {backend} | {steps} | {:.0} | {:.2} |",
                    spec.name(),
                    (steps * batch) as f64 / secs,
                    1e3 * secs / steps as f64
                );
            }
            for t in torch
                .iter()
                .filter(|t| t["model"] == spec.name() && t["batch"] == batch)
            {
                println!(
                    "| {} | {batch} | pytorch {} | {} | {:.0} | {:.2} |",
                    spec.name(),
                    t["version"].as_str().unwrap_or("?"),
                    t["steps"],
                    t["examples_per_sec"].as_f64().unwrap_or(f64::NAN),
                    t["median_step_ms"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    Ok(())
}
