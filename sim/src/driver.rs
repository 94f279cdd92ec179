//! The virtual-clock driver: a discrete-event simulation of a fleet around
//! the coordinator's [`RoundEngine`].
//!
//! Time is a virtual millisecond counter. Three sources of events are merged
//! in time order (ties: device events, then the engine's deadline, then
//! check-ins, each by device number), so a run is a pure function of the
//! fleet file and its seed:
//!
//! - **check-ins**: every idle device has exactly one pending check-in in a
//!   binary heap of `(time, device)` — 16 bytes, its only state. At a
//!   check-in the device is available with its profile's day/night
//!   probability; if it is, the engine hears [`Event::CheckIn`], otherwise
//!   the device tries again after an exponential delay;
//! - **device work**: a device sent the plan downloads the model
//!   (`model bytes / download bandwidth`), trains
//!   (`examples · epochs / examples per second`) and uploads
//!   (`update bytes / upload bandwidth`), unless it drops out at a uniform
//!   point of that span with its profile's probability;
//! - **engine deadlines**: [`RoundEngine::next_deadline`] becomes a
//!   [`Event::Tick`].
//!
//! Each of the engine's [`Action`]s is carried out as the QUIC server does:
//! plans start device work, come-back times become check-ins, an update is
//! decoded and passes [`Admission`] before the engine hears of the report,
//! accepted updates stream into the round's [`fleet_aggregation::Aggregator`],
//! and `CloseRound` applies the server optimiser, accounts privacy and
//! evaluates the new model.
//!
//! **Training.** An update's bytes are needed only when its report arrives,
//! and its arrival time does not depend on its contents (the encoded size of
//! every codec is fixed by the model size). So devices are trained lazily:
//! when the first untrained report of the open round arrives, the earliest
//! pending reports of that round — as many as the round still needs, and at
//! least one per core — are trained in parallel with rayon. Each result is a
//! pure function of `(global model, device, round, seed)` and is consumed in
//! event order, so thread scheduling changes nothing but the wall time.
//! Reports that can only be refused (the round they trained for has closed)
//! are never trained at all.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

use fleet_aggregation::codec::decode;
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_aggregation::privacy::{NoisePlacement, finish_private_sum, privatize_client_update};
use fleet_aggregation::{Admission, Aggregator, Compute, Update};
use fleet_coordinator::engine::{Action, Event, RoundEngine};
use fleet_models::{Backend, Dataset, Evaluation, TrainConfig, evaluate, train_local};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::data::DeviceData;
use crate::fleet::Fleet;
use crate::population::Population;
use crate::scenario::corrupt_update;

/// Consecutive abandoned attempts of one round after which the run stops.
pub const MAX_ABANDONS: u32 = 50;

/// What one closed round produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundLog {
    /// Round number, from 1.
    pub round: u64,
    /// Test accuracy of the new global model.
    pub accuracy: f32,
    /// Test loss of the new global model.
    pub loss: f32,
    /// Mean local training loss of the accepted reports.
    pub train_loss: f32,
    /// Plans sent: devices selected, over-selection and abandoned attempts included.
    pub selected: usize,
    /// Reports accepted into the aggregate.
    pub participants: usize,
    /// Selected devices that dropped out (including failed training).
    pub dropouts: usize,
    /// Reports the engine refused (stragglers, or devices of an abandoned attempt).
    pub refused: usize,
    /// Updates that failed the admission checks.
    pub rejected: usize,
    /// Attempts of this round that were abandoned before it closed.
    pub abandoned: u32,
    /// Check-ins the engine heard during the round.
    pub checkins: u64,
    /// Update bytes uploaded during the round.
    pub bytes_up: u64,
    /// Model bytes downloaded during the round.
    pub bytes_down: u64,
    /// Virtual time at which the round closed (seconds since the start).
    pub virtual_s: f64,
    /// Virtual duration of the round (seconds).
    pub round_virtual_s: f64,
    /// Wall-clock duration of the round (seconds).
    pub wall_s: f64,
    /// ε spent so far (PLD accountant), with differential privacy.
    pub epsilon: Option<f64>,
}

/// Totals of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunStats {
    /// Events processed.
    pub events: u64,
    /// Local trainings run.
    pub trainings: u64,
    /// Largest number of entries in the check-in queue.
    pub queue_peak: usize,
    /// Bytes reserved by the check-in queue at its largest.
    pub queue_bytes: usize,
    /// Bytes of one queue entry (an idle device's whole state).
    pub bytes_per_idle_device: usize,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
    /// Wall-clock seconds of the event loop (data loading excluded).
    pub wall_s: f64,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The final global model.
    pub global: Vec<f32>,
    /// One entry per closed round.
    pub logs: Vec<RoundLog>,
    /// Why the run stopped early (privacy budget), if it did.
    pub stopped: Option<String>,
    /// Totals.
    pub stats: RunStats,
}

/// A device's work for a round.
struct Job {
    round: u64,
    /// When the work ends (report or dropout).
    at: u64,
    /// Close/abandon count when the plan was sent (identifies the attempt).
    attempt: u64,
    /// Whether it ends with a report (otherwise with a dropout).
    report: bool,
    /// Report deadline of the round, once known.
    deadline: Option<u64>,
}

/// A trained, privatised, encoded update.
struct Trained {
    bytes: Vec<u8>,
    examples: usize,
    loss: f32,
}

#[derive(Default)]
struct Counters {
    selected: usize,
    dropouts: usize,
    refused: usize,
    rejected: usize,
    abandoned: u32,
    checkins: u64,
    bytes_up: u64,
    bytes_down: u64,
    loss_sum: f64,
    examples: usize,
}

fn exp_ms(rng: &mut ChaCha8Rng, mean_s: f64) -> u64 {
    let u: f64 = rng.random();
    (-(1.0 - u).ln() * mean_s * 1000.0).round() as u64
}

/// Everything a local training needs, shared across threads.
struct Trainer<'a> {
    fleet: &'a Fleet,
    pop: &'a Population,
    data: &'a DeviceData,
    spec: fleet_models::ModelSpec,
    train: TrainConfig,
    codec: fleet_aggregation::Codec,
    dp: Option<fleet_aggregation::privacy::DpConfig>,
}

impl Trainer<'_> {
    fn train(&self, device: u32, round: u64, global: &[f32]) -> Result<Trained, String> {
        let cfg = TrainConfig {
            seed: self.fleet.seed ^ (round << 32) ^ u64::from(device),
            ..self.train
        };
        let out = self.data.with(device, |d| {
            train_local(&self.spec, global, d, &cfg, Backend::DEFAULT).map_err(|e| e.to_string())
        })?;
        let mut delta = out.delta(global);
        if let Some((attack, scale)) = self.pop.attack(device) {
            corrupt_update(attack, scale, &mut delta);
        }
        if let Some(dp) = &self.dp {
            privatize_client_update(&mut delta, dp).map_err(|e| e.to_string())?;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let bytes = self
            .codec
            .encode(&delta, &mut rng)
            .map_err(|e| e.to_string())?;
        Ok(Trained {
            bytes,
            examples: out.examples,
            loss: out.mean_loss,
        })
    }
}

/// Runs `fleet` (validated) on `data`, evaluating on `test`, calling `on_round` after each round.
pub fn run(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    compute: &dyn Compute,
    mut on_round: impl FnMut(&RoundLog),
) -> Result<Outcome, String> {
    fleet.validate().map_err(|e| e.to_string())?;
    let pop = Population::new(fleet);
    let trainer = Trainer {
        fleet,
        pop: &pop,
        data,
        spec: fleet.model_spec(),
        train: fleet.train_config(),
        codec: fleet.codec(),
        dp: fleet.dp(),
    };
    let spec = &trainer.spec;
    let layout = spec.layout();
    let admission = Admission {
        fingerprint: layout.fingerprint(),
        len: layout.total,
        max_norm: None,
    };
    let strategy = fleet.strategy();
    let ecfg = fleet.engine_config();
    let mut engine = RoundEngine::new(ecfg, 0)?;
    let mut global = spec.init_params(fleet.seed);
    let mut server = strategy.server(layout.total).map_err(|e| e.to_string())?;
    let new_aggregator = || -> Result<Aggregator<'_>, String> {
        strategy
            .aggregator(admission, compute)
            .map_err(|e| e.to_string())
    };
    let mut agg = new_aggregator()?;
    let model_bytes = 4 * layout.total as u64;
    // Every codec's output size depends only on the model size.
    let update_bytes = trainer
        .codec
        .encode(&vec![0.0; layout.total], &mut ChaCha8Rng::seed_from_u64(0))
        .map_err(|e| e.to_string())?
        .len() as u64;
    let dp = trainer.dp;
    let mut ledger = match (&fleet.task.dp, &dp) {
        (Some(s), Some(_)) => Some(
            PrivacyLedger::new(s.budget.unwrap_or(f64::MAX), s.delta).map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    let q = ecfg.target as f64 / f64::from(fleet.devices);
    if let (Some(ledger), Some(dp)) = (&ledger, &dp)
        && let Err(e) = ledger.check_round(q, dp.noise_multiplier)
    {
        return Err(format!("task.dp: not even round 1 fits the budget: {e}"));
    }

    let mut rng = ChaCha8Rng::seed_from_u64(fleet.seed ^ 0xc0ff_ee11);
    let mut checkins: BinaryHeap<Reverse<(u64, u32)>> =
        BinaryHeap::with_capacity(fleet.devices as usize);
    for device in 0..fleet.devices {
        let mean = pop.profile(device).checkin_interval_s;
        let at = (rng.random::<f64>() * mean * 1000.0) as u64;
        checkins.push(Reverse((at, device)));
    }
    let mut busy: BinaryHeap<Reverse<(u64, u32)>> = BinaryHeap::new();
    let mut jobs: HashMap<u32, Job> = HashMap::new();
    let mut pending: Vec<u32> = Vec::new();
    let mut trained: HashMap<u32, Result<Trained, String>> = HashMap::new();

    let mut stats = RunStats {
        bytes_per_idle_device: std::mem::size_of::<Reverse<(u64, u32)>>(),
        ..RunStats::default()
    };
    let mut logs = Vec::new();
    let mut c = Counters::default();
    let mut attempt = 0u64;
    let mut accepted = 0usize;
    let mut deadline: Option<u64> = None;
    let mut stopped = None;
    let mut finished = false;
    let (mut last_close, start) = (0u64, Instant::now());
    let mut round_start = Instant::now();
    let threads = rayon::current_num_threads().max(1);

    while !finished {
        stats.queue_peak = stats.queue_peak.max(checkins.len());
        stats.queue_bytes = stats
            .queue_bytes
            .max(checkins.capacity() * stats.bytes_per_idle_device);
        let tb = busy.peek().map(|Reverse((t, _))| (*t, 0u8));
        let tt = engine.next_deadline().map(|t| (t, 1u8));
        let tc = checkins.peek().map(|Reverse((t, _))| (*t, 2u8));
        let Some((now, source)) = [tb, tt, tc].into_iter().flatten().min() else {
            return Err("no more events before the task finished".into());
        };
        stats.events += 1;
        // An update that passed admission and waits for the engine's verdict.
        let mut offered: Option<(Vec<f32>, Trained)> = None;
        let mut after: Option<(u32, Option<u64>)> = None;
        let actions = match source {
            0 => {
                let Reverse((_, device)) = busy.pop().expect("peeked");
                let is_current = jobs
                    .get(&device)
                    .is_some_and(|j| j.report && j.round == engine.round() && j.attempt == attempt);
                if is_current && !trained.contains_key(&device) {
                    // Train the earliest pending reports of this attempt in parallel.
                    pending.retain(|d| {
                        jobs.get(d).is_some_and(|j| {
                            j.report && j.round == engine.round() && j.attempt == attempt
                        }) && !trained.contains_key(d)
                    });
                    pending.sort_unstable_by_key(|d| (jobs.get(d).map_or(now, |j| j.at), *d));
                    let need = ecfg.target.saturating_sub(accepted).max(threads);
                    let mut batch: Vec<u32> = pending.iter().copied().take(need).collect();
                    if !batch.contains(&device) {
                        batch.push(device);
                    }
                    let round = engine.round();
                    let g = &global;
                    let results: Vec<(u32, Result<Trained, String>)> = batch
                        .par_iter()
                        .map(|&d| (d, trainer.train(d, round, g)))
                        .collect();
                    stats.trainings += results.len() as u64;
                    for (d, r) in results {
                        trained.insert(d, r);
                    }
                    pending.retain(|d| !trained.contains_key(d));
                }
                let job = jobs.remove(&device).expect("a busy device has a job");
                after = Some((device, job.deadline));
                let id = u64::from(device);
                if !job.report {
                    c.dropouts += 1;
                    engine.handle(Event::DropOut { device: id }, now)
                } else {
                    c.bytes_up += update_bytes;
                    match trained.remove(&device).filter(|_| is_current) {
                        None => engine.handle(
                            Event::Report {
                                device: id,
                                round: job.round,
                            },
                            now,
                        ),
                        Some(Err(_)) => {
                            // Training failed on the device (e.g. no local data): it gives up.
                            c.dropouts += 1;
                            engine.handle(Event::DropOut { device: id }, now)
                        }
                        Some(Ok(t)) => {
                            let checked = decode(&t.bytes, layout.total)
                                .map_err(|e| e.to_string())
                                .and_then(|values| {
                                    admission
                                        .check(&Update {
                                            fingerprint: admission.fingerprint,
                                            values: &values,
                                            weight: t.examples as f64,
                                        })
                                        .map(|_| values)
                                        .map_err(|e| e.to_string())
                                });
                            match checked {
                                Ok(values) => {
                                    offered = Some((values, t));
                                    engine.handle(
                                        Event::Report {
                                            device: id,
                                            round: job.round,
                                        },
                                        now,
                                    )
                                }
                                Err(_) => {
                                    c.rejected += 1;
                                    engine.handle(Event::DropOut { device: id }, now)
                                }
                            }
                        }
                    }
                }
            }
            1 => engine.handle(Event::Tick, now),
            _ => {
                let Reverse((_, device)) = checkins.pop().expect("peeked");
                if rng.random::<f64>() < pop.availability(device, now) {
                    c.checkins += 1;
                    engine.handle(
                        Event::CheckIn {
                            device: u64::from(device),
                        },
                        now,
                    )
                } else {
                    let mean = pop.profile(device).checkin_interval_s;
                    checkins.push(Reverse((now + exp_ms(&mut rng, mean).max(1), device)));
                    Vec::new()
                }
            }
        };
        if let Some((device, until)) = after {
            // The device is idle again; it checks in after its round's deadline at the earliest.
            let mean = pop.profile(device).checkin_interval_s;
            let from = until.unwrap_or(now).max(now);
            checkins.push(Reverse((from + exp_ms(&mut rng, mean).max(1), device)));
        }
        for action in actions {
            match action {
                Action::SendPlan { device, round } => {
                    let device = device as u32;
                    let p = pop.profile(device);
                    let n = data.examples(device) as f64;
                    let secs = model_bytes as f64 * 8.0 / (p.download_mbps * 1e6)
                        + n * fleet.task.epochs as f64 / p.examples_per_second
                        + update_bytes as f64 * 8.0 / (p.upload_mbps * 1e6);
                    let span = ((secs * 1000.0).ceil() as u64).max(1);
                    let report = rng.random::<f64>() >= p.dropout;
                    let at = if report {
                        pending.push(device);
                        now + span
                    } else {
                        now + ((rng.random::<f64>() * span as f64) as u64).max(1)
                    };
                    c.bytes_down += model_bytes;
                    c.selected += 1;
                    jobs.insert(
                        device,
                        Job {
                            round,
                            at,
                            attempt,
                            report,
                            deadline,
                        },
                    );
                    busy.push(Reverse((at, device)));
                }
                Action::ComeBackAt { device, at } => {
                    checkins.push(Reverse((at.max(now + 1), device as u32)));
                }
                Action::AcceptReport { .. } => {
                    let (values, t) = offered.take().expect("the report being handled");
                    // With DP every device weighs the same (fixed denominator).
                    let weight = if dp.is_some() { 1.0 } else { t.examples as f64 };
                    if agg
                        .add(&Update {
                            fingerprint: admission.fingerprint,
                            values: &values,
                            weight,
                        })
                        .is_ok()
                    {
                        accepted += 1;
                        c.loss_sum += f64::from(t.loss) * t.examples as f64;
                        c.examples += t.examples;
                    } else {
                        c.rejected += 1;
                    }
                }
                Action::RefuseReport { .. } => c.refused += 1,
                Action::StartReporting { deadline: d, .. } => {
                    deadline = Some(d);
                    for job in jobs.values_mut() {
                        if job.attempt == attempt {
                            job.deadline = Some(d);
                        }
                    }
                }
                Action::AbandonRound { round, reason } => {
                    c.abandoned += 1;
                    if c.abandoned >= MAX_ABANDONS {
                        return Err(format!(
                            "round {round} was abandoned {MAX_ABANDONS} times in a row (last: {reason}); \
                             the fleet has too few available devices for task.target / task.min_reports"
                        ));
                    }
                    agg = new_aggregator()?;
                    accepted = 0;
                    attempt += 1;
                    deadline = None;
                    trained.clear();
                }
                Action::CloseRound { round, reports } => {
                    let done = std::mem::replace(&mut agg, new_aggregator()?);
                    let participants = done.accepted();
                    debug_assert_eq!(participants, reports);
                    if participants > 0 {
                        let aggregate = done.finish().map_err(|e| e.to_string())?;
                        let delta = match &dp {
                            Some(dp) => {
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
                    let mut epsilon = None;
                    if let (Some(ledger), Some(dp)) = (&mut ledger, &dp) {
                        let z = match dp.placement {
                            NoisePlacement::Server => dp.noise_multiplier,
                            NoisePlacement::Client => dp.effective_noise_multiplier(participants),
                        };
                        ledger.record_round(q, z).map_err(|e| e.to_string())?;
                        epsilon = Some(ledger.spent().map_err(|e| e.to_string())?.epsilon);
                    }
                    let Evaluation { loss, accuracy, .. } =
                        evaluate(spec, &global, test.view(), Backend::DEFAULT)
                            .map_err(|e| e.to_string())?;
                    let log = RoundLog {
                        round,
                        accuracy,
                        loss,
                        train_loss: if c.examples > 0 {
                            (c.loss_sum / c.examples as f64) as f32
                        } else {
                            f32::NAN
                        },
                        selected: c.selected,
                        participants,
                        dropouts: c.dropouts,
                        refused: c.refused,
                        rejected: c.rejected,
                        abandoned: c.abandoned,
                        checkins: c.checkins,
                        bytes_up: c.bytes_up,
                        bytes_down: c.bytes_down,
                        virtual_s: now as f64 / 1000.0,
                        round_virtual_s: (now - last_close) as f64 / 1000.0,
                        wall_s: round_start.elapsed().as_secs_f64(),
                        epsilon,
                    };
                    on_round(&log);
                    logs.push(log);
                    c = Counters::default();
                    last_close = now;
                    round_start = Instant::now();
                    accepted = 0;
                    attempt += 1;
                    deadline = None;
                    trained.clear();
                    if round < ecfg.rounds
                        && let (Some(ledger), Some(dp)) = (&ledger, &dp)
                        && let Err(e) = ledger.check_round(q, dp.noise_multiplier)
                    {
                        stopped = Some(format!("stopping before round {}: {e}", round + 1));
                        finished = true;
                    }
                }
                Action::Finished => finished = true,
            }
        }
    }
    stats.virtual_s = last_close as f64 / 1000.0;
    stats.wall_s = start.elapsed().as_secs_f64();
    Ok(Outcome {
        global,
        logs,
        stopped,
        stats,
    })
}
