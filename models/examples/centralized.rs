//! Centralised sanity check on the real Fashion-MNIST: trains the 2NN for
//! one epoch and the CNN for two, evaluating on the 10,000 test images after
//! every epoch. `--embedded` uses the embedded subset instead.
//!
//! ```sh
//! cargo run --release -p fleet-models --example centralized [-- --embedded --models 2nn,cnn --lr 0.05 --momentum 0 --batch 32]
//! ```

use std::time::Instant;

use fleet_models::data::embedded;
use fleet_models::data::fashion::{self, Split};
use fleet_models::{Backend, ModelSpec, TrainConfig, evaluate, train_local};
use indicatif::{ProgressBar, ProgressStyle};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let models = args
        .iter()
        .position(|a| a == "--models")
        .and_then(|i| args.get(i + 1))
        .map_or("2nn,cnn".to_string(), Clone::clone);
    let num = |name: &str, default: f64| -> Result<f64, String> {
        match args
            .iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
        {
            Some(v) => v
                .parse()
                .map_err(|_| format!("{name} takes a number, got {v}")),
            None => Ok(default),
        }
    };
    let (lr, momentum, batch) = (
        num("--lr", 0.05)?,
        num("--momentum", 0.0)?,
        num("--batch", 32.0)? as usize,
    );
    let (train, test) = if args.iter().any(|a| a == "--embedded") {
        (embedded::load(Split::Train)?, embedded::load(Split::Test)?)
    } else {
        let dir = fashion::default_dir();
        (
            fashion::load(&dir, Split::Train)?,
            fashion::load(&dir, Split::Test)?,
        )
    };
    println!("{} training and {} test examples", train.len(), test.len());
    let backend = Backend::from_env();
    println!(
        "backend {backend}, {} rayon threads",
        rayon::current_num_threads()
    );
    println!(
        "| model | epoch | batch | lr | momentum | train loss | test loss | test accuracy | seconds |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for name in models.split(',') {
        let (spec, epochs) = match name {
            "2nn" => (ModelSpec::fashion_2nn(), 1),
            "cnn" => (ModelSpec::fashion_cnn(), 2),
            "logreg" => (ModelSpec::fashion_logreg(), 1),
            other => {
                return Err(format!("unknown model {other}; expected 2nn, cnn or logreg").into());
            }
        };
        let mut params = spec.init_params(1);
        let bar = ProgressBar::new(epochs as u64).with_style(ProgressStyle::with_template(
            "{msg} epoch {pos}/{len} [{elapsed_precise}] {wide_bar}",
        )?);
        bar.set_message(spec.name());
        for epoch in 1..=epochs {
            let cfg = TrainConfig {
                epochs: 1,
                batch_size: batch,
                learning_rate: lr,
                momentum,
                seed: epoch as u64,
                ..TrainConfig::default()
            };
            let t = Instant::now();
            let out = train_local(&spec, &params, train.view(), &cfg, backend)?;
            let secs = t.elapsed().as_secs_f64();
            params = out.params;
            let eval = evaluate(&spec, &params, test.view(), backend)?;
            bar.inc(1);
            bar.suspend(|| {
                println!(
                    "| {} | {epoch} | {} | {} | {} | {:.4} | {:.4} | {:.2}% | {secs:.1} |",
                    spec.name(),
                    cfg.batch_size,
                    cfg.learning_rate,
                    cfg.momentum,
                    out.mean_loss,
                    eval.loss,
                    100.0 * eval.accuracy
                )
            });
        }
        bar.finish_and_clear();
    }
    Ok(())
}
