//! Synchronous federated rounds over an in-memory population.
//!
//! One round: pick `per_round` distinct clients uniformly at random (seeded);
//! each trains from the current global model on its own partition; its delta
//! is clipped and noised when differential privacy is on, encoded and
//! decoded with the task's codec, and added to the round's aggregator; the
//! server optimiser applies the aggregate; the global model is evaluated on
//! the test set. Everything except the privacy noise (which must come from a
//! secure source) is deterministic in the seed.

use std::time::Instant;

use fleet_aggregation::codec::{Codec, decode};
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_aggregation::privacy::{
    DpConfig, NoisePlacement, finish_private_sum, privatize_client_update,
};
use fleet_aggregation::{Admission, Compute, StrategyConfig, Update};
use fleet_models::data::partition::{Partition, Scheme, partition};
use fleet_models::{Backend, Dataset, Evaluation, ModelSpec, TrainConfig, evaluate, train_local};
use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

/// What a client sends back: the encoded update, its example count and its mean training loss.
struct Report {
    bytes: Vec<u8>,
    examples: usize,
    loss: f32,
}

/// A simulated federated task.
#[derive(Debug, Clone)]
pub struct Task {
    /// The model.
    pub spec: ModelSpec,
    /// Local training of each client.
    pub train: TrainConfig,
    /// Aggregation strategy.
    pub strategy: StrategyConfig,
    /// Wire codec of updates.
    pub codec: Codec,
    /// Differential privacy, if any, with the accountant's δ and the ε budget
    /// (the run stops before a round that would exceed it).
    pub dp: Option<(DpConfig, f64, Option<f64>)>,
    /// Rounds to run.
    pub rounds: usize,
    /// Clients in the population.
    pub clients: usize,
    /// Clients sampled per round.
    pub per_round: usize,
    /// How the training set is split across clients.
    pub scheme: Scheme,
    /// Seed of partitioning, sampling, initialisation and training.
    pub seed: u64,
}

/// What one round produced.
#[derive(Debug, Clone, Serialize)]
pub struct RoundLog {
    /// Round number, from 1.
    pub round: usize,
    /// Test accuracy of the new global model.
    pub accuracy: f32,
    /// Test loss of the new global model.
    pub loss: f32,
    /// Mean local training loss of the cohort.
    pub train_loss: f32,
    /// Clients that reported.
    pub participants: usize,
    /// Encoded update bytes received.
    pub bytes_up: usize,
    /// Model bytes sent (f32 parameters to each participant).
    pub bytes_down: usize,
    /// ε spent so far (PLD accountant), when differential privacy is on.
    pub epsilon: Option<f64>,
    /// Wall-clock seconds of the round.
    pub seconds: f64,
}

/// Runs `task`, calling `on_round` after each round.
pub fn run(
    task: &Task,
    train: &Dataset,
    test: &Dataset,
    compute: &dyn Compute,
    mut on_round: impl FnMut(&RoundLog),
) -> Result<(Vec<f32>, Vec<RoundLog>), String> {
    if task.per_round == 0 || task.per_round > task.clients {
        return Err(format!(
            "per_round = {} must be between 1 and the number of clients ({})",
            task.per_round, task.clients
        ));
    }
    let Partition { clients } = partition(
        train.labels(),
        train.classes(),
        task.clients,
        task.scheme,
        task.seed,
    )
    .map_err(|e| e.to_string())?;
    let layout = task.spec.layout();
    let admission = Admission {
        fingerprint: layout.fingerprint(),
        len: layout.total,
        max_norm: None,
    };
    let mut global = task.spec.init_params(task.seed);
    let mut server = task
        .strategy
        .server(layout.total)
        .map_err(|e| e.to_string())?;
    let mut ledger = match &task.dp {
        Some((_, delta, budget)) => Some(
            PrivacyLedger::new(budget.unwrap_or(f64::MAX), *delta).map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(task.seed ^ 0x5a3c_0f1e);
    let mut logs = Vec::with_capacity(task.rounds);
    let q = task.per_round as f64 / task.clients as f64;
    for round in 1..=task.rounds {
        if let (Some(ledger), Some((dp, ..))) = (&ledger, &task.dp)
            && let Err(e) = ledger.check_round(q, dp.noise_multiplier)
        {
            return Err(format!("stopping before round {round}: {e}"));
        }
        let start = Instant::now();
        let cohort: Vec<usize> = {
            let mut c = sample(&mut rng, task.clients, task.per_round).into_vec();
            c.sort_unstable();
            c
        };
        let results: Vec<Result<Report, String>> = cohort
            .par_iter()
            .map(|&k| {
                let data = train.subset(&clients[k]).map_err(|e| e.to_string())?;
                let cfg = TrainConfig {
                    seed: task.seed ^ ((round as u64) << 32) ^ k as u64,
                    ..task.train
                };
                let out = train_local(&task.spec, &global, data, &cfg, Backend::DEFAULT)
                    .map_err(|e| e.to_string())?;
                let mut delta = out.delta(&global);
                if let Some((dp, ..)) = &task.dp {
                    privatize_client_update(&mut delta, dp).map_err(|e| e.to_string())?;
                }
                let mut crng = ChaCha8Rng::seed_from_u64(cfg.seed);
                let bytes = task
                    .codec
                    .encode(&delta, &mut crng)
                    .map_err(|e| e.to_string())?;
                Ok(Report {
                    bytes,
                    examples: out.examples,
                    loss: out.mean_loss,
                })
            })
            .collect();
        let mut agg = task
            .strategy
            .aggregator(admission, compute)
            .map_err(|e| e.to_string())?;
        let (mut bytes_up, mut loss_sum, mut examples) = (0, 0.0f64, 0usize);
        for r in results {
            // A client whose local data is empty or whose training failed drops out.
            let Ok(Report {
                bytes,
                examples: n,
                loss,
            }) = r
            else {
                continue;
            };
            bytes_up += bytes.len();
            let values = decode(&bytes, layout.total).map_err(|e| e.to_string())?;
            // With DP every client weighs the same and the denominator is fixed.
            let weight = if task.dp.is_some() { 1.0 } else { n as f64 };
            if agg
                .add(&Update {
                    fingerprint: admission.fingerprint,
                    values: &values,
                    weight,
                })
                .is_ok()
            {
                loss_sum += f64::from(loss) * n as f64;
                examples += n;
            }
        }
        let participants = agg.accepted();
        let mut epsilon = None;
        if participants > 0 {
            let aggregate = agg.finish().map_err(|e| e.to_string())?;
            let delta = match &task.dp {
                Some((dp, ..)) => {
                    let sum: Vec<f32> = aggregate
                        .delta
                        .iter()
                        .map(|v| v * participants as f32)
                        .collect();
                    finish_private_sum(sum, dp).map_err(|e| e.to_string())?
                }
                None => aggregate.delta,
            };
            server
                .apply(compute, &mut global, &delta)
                .map_err(|e| e.to_string())?;
        }
        if let (Some(ledger), Some((dp, ..))) = (&mut ledger, &task.dp) {
            let z = match dp.placement {
                NoisePlacement::Server => dp.noise_multiplier,
                NoisePlacement::Client => dp.effective_noise_multiplier(participants),
            };
            ledger.record_round(q, z).map_err(|e| e.to_string())?;
            epsilon = Some(ledger.spent().map_err(|e| e.to_string())?.epsilon);
        }
        let Evaluation { loss, accuracy, .. } =
            evaluate(&task.spec, &global, test.view(), Backend::DEFAULT)
                .map_err(|e| e.to_string())?;
        let log = RoundLog {
            round,
            accuracy,
            loss,
            train_loss: if examples > 0 {
                (loss_sum / examples as f64) as f32
            } else {
                f32::NAN
            },
            participants,
            bytes_up,
            bytes_down: participants * 4 * layout.total,
            epsilon,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_round(&log);
        logs.push(log);
    }
    Ok((global, logs))
}
