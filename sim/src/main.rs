//! `fleet-sim`: runs a simulated federated task and writes its round log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use fleet_aggregation::codec::{Codec, ValueCodec};
use fleet_aggregation::compute;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{Rule, StrategyConfig};
use fleet_models::data::embedded;
use fleet_models::data::fashion::{self, Split};
use fleet_models::data::partition::Scheme;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_sim::plot::{Series, line_chart};
use fleet_sim::rounds::{RoundLog, Task, run};
use indicatif::{ProgressBar, ProgressStyle};

/// Simulate a federated learning task on one machine.
///
/// With no arguments: 100 clients holding a Dirichlet(0.5) label split of the
/// embedded Fashion-MNIST subset, 10 per round, 2NN, 5 local epochs, FedAvg,
/// 100 rounds.
#[derive(Debug, Parser)]
#[command(name = "fleet-sim", version, about, long_about = None)]
struct Args {
    /// Data set: the embedded subset (no setup) or the full Fashion-MNIST (apt-get install dataset-fashion-mnist).
    #[arg(long, value_enum, default_value_t = Data::Embedded)]
    data: Data,
    /// Model.
    #[arg(long, value_enum, default_value_t = Model::TwoNn)]
    model: Model,
    /// Clients in the population.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Clients per round.
    #[arg(long, default_value_t = 10)]
    per_round: usize,
    /// Rounds.
    #[arg(long, default_value_t = 100)]
    rounds: usize,
    /// Label split: `iid`, `dirichlet:<alpha>` or `shards:<per-client>`.
    #[arg(long, default_value = "dirichlet:0.5", value_parser = parse_scheme)]
    partition: Scheme,
    /// Local epochs.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// FedProx μ (0: off).
    #[arg(long, default_value_t = 0.0)]
    prox_mu: f64,
    /// Aggregation strategy.
    #[arg(long, value_enum, default_value_t = Strategy::Fedavg)]
    strategy: Strategy,
    /// Server learning rate (FedAvg uses 1).
    #[arg(long)]
    server_lr: Option<f32>,
    /// Update codec on the wire.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    codec: Wire,
    /// Differential privacy: noise multiplier z (enables DP-FedAvg).
    #[arg(long)]
    dp_noise: Option<f64>,
    /// Differential privacy: clipping norm.
    #[arg(long, default_value_t = 1.0)]
    dp_clip: f64,
    /// Differential privacy: δ for the accountant.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Differential privacy: ε budget; the run stops before exceeding it.
    #[arg(long)]
    dp_budget: Option<f64>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for rounds.csv, rounds.json and the plots (accuracy.svg, epsilon.svg).
    #[arg(long, default_value = "runs/latest")]
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Data {
    Embedded,
    FashionMnist,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Model {
    Logreg,
    #[value(name = "2nn")]
    TwoNn,
    Cnn,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Strategy {
    Fedavg,
    Fedavgm,
    Fedadam,
    Fedyogi,
    Fedadagrad,
    Median,
    TrimmedMean,
    Krum,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Wire {
    F32,
    F16,
    Int8,
    Topk,
}

fn parse_scheme(s: &str) -> Result<Scheme, String> {
    let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
    match kind {
        "iid" => Ok(Scheme::Iid),
        "dirichlet" => arg
            .parse()
            .map(|alpha| Scheme::Dirichlet { alpha })
            .map_err(|_| {
                format!("dirichlet needs a concentration, e.g. dirichlet:0.5 (got {s:?})")
            }),
        "shards" => arg
            .parse()
            .map(|shards_per_client| Scheme::Shards { shards_per_client })
            .map_err(|_| format!("shards needs a count per client, e.g. shards:2 (got {s:?})")),
        _ => Err(format!(
            "unknown partition {s:?}; expected iid, dirichlet:<alpha> or shards:<n>"
        )),
    }
}

fn strategy(args: &Args) -> StrategyConfig {
    let lr = args.server_lr;
    match args.strategy {
        Strategy::Fedavg => StrategyConfig::fedavg(),
        Strategy::Fedavgm => StrategyConfig::fedavgm(lr.unwrap_or(1.0), 0.9),
        Strategy::Fedadam => StrategyConfig::fedadam(lr.unwrap_or(0.01), 1e-3),
        Strategy::Fedyogi => StrategyConfig::fedyogi(lr.unwrap_or(0.01), 1e-3),
        Strategy::Fedadagrad => StrategyConfig::fedadagrad(lr.unwrap_or(0.01), 1e-3),
        Strategy::Median => StrategyConfig::fedavg().with_rule(Rule::Median),
        Strategy::TrimmedMean => {
            StrategyConfig::fedavg().with_rule(Rule::TrimmedMean { beta: 0.1 })
        }
        Strategy::Krum => StrategyConfig::fedavg().with_rule(Rule::MultiKrum {
            f: args.per_round.saturating_sub(3) / 2,
            m: args.per_round / 2,
        }),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match simulate(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn simulate(args: &Args) -> Result<(), String> {
    let (train, test) = match args.data {
        Data::Embedded => (
            embedded::load(Split::Train).map_err(|e| e.to_string())?,
            embedded::load(Split::Test).map_err(|e| e.to_string())?,
        ),
        Data::FashionMnist => {
            let dir = fashion::default_dir();
            (
                fashion::load(&dir, Split::Train).map_err(|e| e.to_string())?,
                fashion::load(&dir, Split::Test).map_err(|e| e.to_string())?,
            )
        }
    };
    let spec = match args.model {
        Model::Logreg => ModelSpec::fashion_logreg(),
        Model::TwoNn => ModelSpec::fashion_2nn(),
        Model::Cnn => ModelSpec::fashion_cnn(),
    };
    let task = Task {
        spec,
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch,
            learning_rate: args.lr,
            prox_mu: args.prox_mu,
            ..TrainConfig::default()
        },
        strategy: strategy(args),
        codec: match args.codec {
            Wire::F32 => Codec::F32,
            Wire::F16 => Codec::F16,
            Wire::Int8 => Codec::INT8,
            Wire::Topk => Codec::TopK {
                fraction: 0.1,
                values: ValueCodec::F16,
            },
        },
        dp: args.dp_noise.map(|z| {
            (
                DpConfig {
                    clip_norm: args.dp_clip,
                    noise_multiplier: z,
                    placement: NoisePlacement::Client,
                    expected_cohort: args.per_round,
                },
                args.dp_delta,
                args.dp_budget,
            )
        }),
        rounds: args.rounds,
        clients: args.clients,
        per_round: args.per_round,
        scheme: args.partition,
        seed: args.seed,
    };
    let (compute, chosen) = compute::select();
    eprintln!(
        "{} clients, {} per round, {} rounds, {} on {} training examples; {chosen}",
        task.clients,
        task.per_round,
        task.rounds,
        task.spec.name(),
        train.len()
    );
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {e}", args.out.display()))?;
    let bar = ProgressBar::new(task.rounds as u64).with_style(
        ProgressStyle::with_template("round {pos}/{len} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("valid template"),
    );
    let (_, logs) = run(&task, &train, &test, compute.as_ref(), |log: &RoundLog| {
        bar.set_message(format!(
            "acc {:.2}% loss {:.3}{}",
            100.0 * log.accuracy,
            log.loss,
            log.epsilon
                .map(|e| format!(" ε {e:.3}"))
                .unwrap_or_default()
        ));
        bar.inc(1);
    })?;
    bar.finish();
    let mut csv = String::from(
        "round,accuracy,loss,train_loss,participants,bytes_up,bytes_down,epsilon,seconds\n",
    );
    for l in &logs {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.4}\n",
            l.round,
            l.accuracy,
            l.loss,
            l.train_loss,
            l.participants,
            l.bytes_up,
            l.bytes_down,
            l.epsilon.map(|e| e.to_string()).unwrap_or_default(),
            l.seconds
        ));
    }
    let write = |name: &str, text: &str| {
        std::fs::write(args.out.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))
    };
    write("rounds.csv", &csv)?;
    write(
        "rounds.json",
        &serde_json::to_string_pretty(&logs).expect("plain data"),
    )?;
    let series = |name, f: &dyn Fn(&RoundLog) -> f64| Series {
        name,
        points: logs.iter().map(|l| (l.round as f64, f(l))).collect(),
    };
    write(
        "accuracy.svg",
        &line_chart(
            "Global model on the test set",
            "round",
            "accuracy / loss",
            &[
                series("test accuracy", &|l| f64::from(l.accuracy)),
                series("test loss", &|l| f64::from(l.loss)),
            ],
        ),
    )?;
    if logs.iter().any(|l| l.epsilon.is_some()) {
        let eps = series("ε spent", &|l| l.epsilon.unwrap_or(f64::NAN));
        write(
            "epsilon.svg",
            &line_chart("Privacy spent", "round", "ε", &[eps]),
        )?;
    }
    let last = logs.last().expect("at least one round");
    println!(
        "final test accuracy {:.2}% after {} rounds; log and plots in {}",
        100.0 * last.accuracy,
        last.round,
        args.out.display()
    );
    Ok(())
}
