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
//! The round logic is the coordinator's own [`TaskCore`], fed exactly as the
//! QUIC server's runner feeds it: check-ins, decoded reports, drop-outs and
//! ticks. The driver carries out its [`Effect`]s in simulated form: plans
//! start device work, come-back times become check-ins, accepted and
//! refused reports are the agents' verdicts, and a closed round (aggregated,
//! privatised, stepped and accounted by the core) is evaluated and logged.
//!
//! **Training.** An update's bytes are needed only when its report arrives,
//! and its arrival time does not depend on its contents (the encoded size of
//! every codec is fixed by the model size). Each result is a pure function
//! of `(global model, device, round, seed)`. So the first `target` devices
//! an attempt sends plans to train at once, on rayon's threads, while the
//! driver goes on through the fleet's events on its own (devices are chosen
//! one check-in at a time, so waiting for their reports would train them one
//! at a time); the report takes its result when it arrives. Any other
//! device whose report arrives untrained is trained then, with the earliest
//! pending reports of its round — as many as the round still needs, and at
//! least one per core — in parallel. Results are consumed in event order, so
//! thread scheduling changes nothing but the wall time. Reports that can
//! only be refused (the round they trained for has closed) are trained only
//! if they were among those started ahead.
//!
//! **Secure aggregation.** In a task with `[task.secure_aggregation]` a
//! device's report is the advertisement of its SecAgg+ keys
//! (identity keys from [`fleet_secagg::pki`]):
//! at its report time it quantises its trained update with the round's
//! quantiser (which clips it and adds its share of the Skellam noise) and
//! advertises. The core's protocol messages reach it after the network's
//! latency and the transfer times of the message and of its answer; at
//! each delivery it drops out with the stage drop-out probability, and
//! otherwise answers at once. The agent's own machine runs the device's
//! side, as on a real device: it advertises keys signed with the device's
//! simulated identity key, answers each stage, and sends its masked input
//! in chunks, which the driver reassembles as the coordinator does.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::Instant;

use fleet_aggregation::Compute;
use fleet_aggregation::codec::decode_into;
use fleet_coordinator::task::{Closed, Effect, Report, ReportRefusal, TaskCore};
use fleet_drift::{Sketcher, Summary, SummaryBuilder};
use fleet_edge_agent::machine::SecureIdentity;
use fleet_edge_agent::work::{plan_update, secure_input, training_seed};
use fleet_models::{Backend, Dataset, Evaluation, evaluate};
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::Plan;
use fleet_secagg::pki::{SimPki, SimSigner};
use fleet_secagg::{DeviceMessage, ServerMessage};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::agent::{self, Agent, ModelObject};
use crate::data::DeviceData;
use crate::fleet::Fleet;
use crate::population::Population;
use crate::scenario::{Drift, corrupt_update, drifted_data};

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
    /// The devices whose reports were accepted into the aggregate, ascending.
    pub devices: Vec<u32>,
    /// Selected devices that dropped out (including failed training).
    pub dropouts: usize,
    /// Reports the engine refused (stragglers, or devices of an abandoned attempt).
    pub refused: usize,
    /// Updates that failed the admission checks.
    pub rejected: usize,
    /// Aggregated updates the relative bound scaled down or weight-capped.
    pub bounded: usize,
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
    /// Drift summary of the accepted reports' training data, when
    /// [`Start::sketch`] was given: the reference of the model trained.
    pub training: Option<Summary>,
}

/// How a run starts: by default from the spec's initial parameters, with
/// every device's data as partitioned.
#[derive(Debug, Clone, Default)]
pub struct Start<'a> {
    /// Parameters of the first global model.
    pub global: Option<Vec<f32>>,
    /// Devices whose training data has drifted.
    pub drift: Option<Drift>,
    /// Summarise each report's training data on these bins.
    pub sketch: Option<&'a Sketcher>,
    /// Train each update only when its report is due, never ahead (the
    /// schedule that training ahead is tested against: results are equal).
    pub no_training_ahead: bool,
}

/// A training started ahead of its report.
struct Ahead {
    /// Tells its result from that of an earlier training of the device.
    ticket: u64,
    /// Its plan, less the report time (which training does not read).
    plan: Plan,
    /// The result, once received.
    result: Option<Result<Trained, String>>,
}

/// `plan` without what differs between the devices of a round: the time
/// each has to report.
fn training_part(plan: &Plan) -> Plan {
    Plan {
        report_within_ms: 0,
        ..plan.clone()
    }
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
    /// The device's agent state machine, from its plan to the end of its work.
    agent: Agent,
}

/// A report handed to the task core: the training result and the agent
/// awaiting its verdict (none for a secure round's advertisement: that
/// agent goes on in the exchange).
type Offered = (Trained, Option<Agent>);

/// A trained, privatised, encoded update.
struct Trained {
    bytes: Vec<u8>,
    examples: usize,
    loss: f32,
    summary: Option<Summary>,
}

#[derive(Default)]
/// What the open round has seen so far (reset when it closes).
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

/// Everything a local training needs besides the plan, shared across threads.
#[derive(Clone)]
struct Trainer<'a> {
    pop: &'a Population,
    data: &'a DeviceData,
    spec: fleet_models::ModelSpec,
    drift: Option<Drift>,
    sketch: Option<&'a Sketcher>,
}

impl Trainer<'_> {
    /// What `device` computes for the `plan` its agent received.
    fn train(&self, device: u32, plan: &Plan, global: &[f32]) -> Result<Trained, String> {
        let attack = self.pop.attack(device);
        let (u, summary) = self.data.with(device, |d| {
            let drifted;
            let d = match &self.drift {
                Some(drift) if drift.affects(device) && drift.changes_training() => {
                    let seed = training_seed(plan.train.seed, u64::from(device), plan.round);
                    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xd41f);
                    drifted = drifted_data(d, &drift.scenario, &mut rng)?;
                    drifted.view()
                }
                _ => d,
            };
            let summary = self.sketch.map(|sketch| {
                let mut b = SummaryBuilder::new(sketch.clone());
                for i in 0..d.len() {
                    let (x, y) = d.get(i);
                    b.observe_training(x, y);
                }
                b.take()
            });
            let u = plan_update(plan, u64::from(device), global, d, |delta| {
                if let Some(b) = attack {
                    corrupt_update(b.attack, b.scale, delta);
                }
            })?;
            Ok((u, summary))
        })?;
        // A Byzantine device may also lie about its data size.
        let examples = match attack.and_then(|b| b.examples) {
            Some(claimed) => usize::try_from(claimed).unwrap_or(usize::MAX),
            None => u.examples,
        };
        Ok(Trained {
            bytes: u.bytes,
            examples,
            loss: u.loss,
            summary,
        })
    }
}

/// The simulation's state between events.
struct Sim<'a> {
    fleet: &'a Fleet,
    test: &'a Dataset,
    trainer: Trainer<'a>,
    /// The task's round logic, as the coordinator runs it.
    core: TaskCore<'a>,
    /// Target reports per round, from the engine's settings.
    target: usize,
    /// Time devices have to report (ms), told in plans before the deadline is fixed.
    report_deadline_ms: u64,
    /// The global model as the coordinator serves it (bytes and SHA-256).
    model: ModelObject,
    /// The same model's values, shared with trainings running ahead.
    global: Arc<[f32]>,
    /// The last update decoded (its allocation reused by the next).
    decoded: Vec<f32>,
    model_bytes: u64,
    update_bytes: u64,
    rng: ChaCha8Rng,
    /// Idle devices' next check-ins.
    checkins: BinaryHeap<Reverse<(u64, u32)>>,
    /// Working devices' report or dropout times.
    busy: BinaryHeap<Reverse<(u64, u32)>>,
    jobs: HashMap<u32, Job>,
    /// Devices of the open attempt whose report is due and not trained yet.
    pending: Vec<u32>,
    trained: HashMap<u32, Result<Trained, String>>,
    /// Trainings started ahead of their reports, by device (see [`Sim::start_ahead`]).
    ahead: HashMap<u32, Ahead>,
    /// Trainings to hand to the thread pool after the current event.
    ahead_queue: Vec<(u32, u64, Plan)>,
    next_ticket: u64,
    /// Devices of the open attempt that started training at their plan (at most `target`).
    started: usize,
    /// Off: every update is trained when its report is due.
    no_ahead: bool,
    /// Results of trainings run ahead: device, ticket, result.
    ahead_tx: Sender<(u32, u64, Result<Trained, String>)>,
    ahead_rx: Receiver<(u32, u64, Result<Trained, String>)>,
    /// Identifies the open attempt of the open round (bumped at close and abandon).
    attempt: u64,
    /// Devices whose reports were accepted in the open attempt.
    accepted: Vec<u32>,
    /// Report deadline of the open attempt, once selection ended.
    deadline: Option<u64>,
    c: Counters,
    stats: RunStats,
    logs: Vec<RoundLog>,
    stopped: Option<String>,
    training: Option<Summary>,
    finished: bool,
    last_close: u64,
    round_start: Instant,
    threads: usize,
    /// Secure aggregation: devices in the open attempt's exchange.
    secure: HashMap<u32, Agent>,
    /// Protocol messages on their way: when the device answers, and to what.
    secure_queue: BinaryHeap<Reverse<(u64, u32)>>,
    secure_inbox: HashMap<u32, ServerMessage>,
    /// Drop-outs during the exchange (apart from `rng`, so that turning
    /// them on changes nothing else).
    secure_rng: ChaCha8Rng,
}

impl<'a> Sim<'a> {
    fn new(
        fleet: &'a Fleet,
        pop: &'a Population,
        data: &'a DeviceData,
        test: &'a Dataset,
        compute: &'a dyn Compute,
        start: Start<'a>,
    ) -> Result<Self, String> {
        let trainer = Trainer {
            pop,
            data,
            spec: fleet.model_spec(),
            drift: start.drift,
            sketch: start.sketch,
        };
        let layout = trainer.spec.layout();
        let spec = fleet.task_spec();
        let ecfg = spec.engine;
        let global = match start.global {
            Some(g) if g.len() == layout.total => g,
            Some(g) => {
                return Err(format!(
                    "the starting model has {} parameters, {} has {}",
                    g.len(),
                    trainer.spec.name(),
                    layout.total
                ));
            }
            None => initial_global(fleet),
        };
        let model = ModelObject::of(&global);
        let shared: Arc<[f32]> = global.as_slice().into();
        let core = TaskCore::new(spec, global, compute, 0)?.for_task(1);
        // Every codec's output size depends only on the model size.
        let update_bytes = fleet
            .codec()
            .encode(&vec![0.0; layout.total], &mut ChaCha8Rng::seed_from_u64(0))
            .map_err(|e| e.to_string())?
            .len() as u64;
        // The task spec's validation (in `TaskCore::new`) refused a budget
        // that not even round 1 fits; this is the same check on the core.
        core.check_next_round()
            .map_err(|e| format!("task.dp.budget: not even round 1 fits: {e}"))?;
        let mut rng = ChaCha8Rng::seed_from_u64(fleet.seed ^ 0xc0ff_ee11);
        let (ahead_tx, ahead_rx) = channel();
        let mut checkins = BinaryHeap::with_capacity(fleet.devices as usize);
        for device in 0..fleet.devices {
            let mean = pop.profile(device).checkin_interval_s;
            let at = (rng.random::<f64>() * mean * 1000.0) as u64;
            checkins.push(Reverse((at, device)));
        }
        Ok(Self {
            fleet,
            test,
            trainer,
            core,
            target: ecfg.target,
            report_deadline_ms: ecfg.report_deadline_ms,
            model,
            global: shared,
            decoded: Vec::new(),
            model_bytes: 4 * layout.total as u64,
            update_bytes,
            rng,
            checkins,
            busy: BinaryHeap::new(),
            jobs: HashMap::new(),
            pending: Vec::new(),
            trained: HashMap::new(),
            ahead: HashMap::new(),
            ahead_queue: Vec::new(),
            next_ticket: 0,
            started: 0,
            no_ahead: start.no_training_ahead,
            ahead_tx,
            ahead_rx,
            attempt: 0,
            accepted: Vec::new(),
            deadline: None,
            c: Counters::default(),
            stats: RunStats {
                bytes_per_idle_device: std::mem::size_of::<Reverse<(u64, u32)>>(),
                ..RunStats::default()
            },
            logs: Vec::new(),
            stopped: None,
            training: None,
            finished: false,
            last_close: 0,
            round_start: Instant::now(),
            threads: rayon::current_num_threads().max(1),
            secure: HashMap::new(),
            secure_queue: BinaryHeap::new(),
            secure_inbox: HashMap::new(),
            secure_rng: ChaCha8Rng::seed_from_u64(fleet.seed ^ 0x5ec0_11de),
        })
    }

    /// A device of a secure task reports: it quantises its update (as the
    /// agent's trainer does) and its agent advertises its round keys.
    fn secure_report(
        &mut self,
        device: u32,
        round: u64,
        t: Trained,
        mut agent: Agent,
        now: u64,
    ) -> Result<(Vec<Effect>, Option<Offered>), String> {
        let id = u64::from(device);
        let plan = *self.core.secure_plan().expect("a secure task");
        let mut rng = ChaCha8Rng::seed_from_u64(
            training_seed(self.fleet.seed, id, round) ^ 0x5ec_a99 ^ self.attempt,
        );
        let advertised = secure_input(&plan, &t.bytes, self.core.global().len(), &mut rng)
            .and_then(|input| agent.advertise((Vec::new(), t.examples as u64, t.loss), input));
        match advertised {
            Ok(ad) => {
                self.c.bytes_up += message_bytes(&ad);
                self.secure.insert(device, agent);
                Ok((
                    self.core.secure_message(id, round, ad, now),
                    Some((t, None)),
                ))
            }
            Err(_) => {
                // A non-finite update (or a quantiser it cannot meet): the
                // device gives up.
                self.c.rejected += 1;
                Ok((self.core.drop_out(id, now), None))
            }
        }
    }

    /// A protocol message reaches a device of the secure exchange: it drops
    /// out with the stage drop-out probability, or its agent answers and
    /// the coordinator acknowledges the answer.
    fn secure_deliver(&mut self, device: u32, now: u64) -> Result<Vec<Effect>, String> {
        let id = u64::from(device);
        let (Some(message), Some(mut agent)) = (
            self.secure_inbox.remove(&device),
            self.secure.remove(&device),
        ) else {
            return Ok(Vec::new());
        };
        let p = self.stage_dropout(device);
        if self.secure_rng.random::<f64>() < p {
            self.c.dropouts += 1;
            return Ok(self.core.drop_out(id, now));
        }
        let round = self.core.round();
        match agent.answer(message) {
            Ok(m) => {
                self.c.bytes_up += message_bytes(&m);
                let last = matches!(m, DeviceMessage::Reveal(_));
                agent.taken(last)?;
                if !last {
                    self.secure.insert(device, agent);
                }
                Ok(self.core.secure_message(id, round, m, now))
            }
            Err(_) => {
                self.c.refused += 1;
                Ok(self.core.drop_out(id, now))
            }
        }
    }

    /// The probability that `device` drops out at a stage of the exchange.
    fn stage_dropout(&self, device: u32) -> f64 {
        self.fleet
            .task
            .secure_aggregation
            .and_then(|s| s.stage_dropout)
            .unwrap_or_else(|| self.trainer.pop.profile(device).dropout)
    }

    /// Schedules a protocol message's delivery and its answer: latency both
    /// ways and both transfers at the device's bandwidths.
    fn secure_send(&mut self, device: u32, message: ServerMessage, now: u64) {
        if !self.secure.contains_key(&device) {
            return;
        }
        let p = self.trainer.pop.profile(device);
        let latency = self
            .fleet
            .task
            .secure_aggregation
            .map_or(0.05, |s| s.latency_s);
        let plan = self.core.secure_plan().copied();
        let answer = match &message {
            ServerMessage::Neighbours(ads) => {
                ads.len() as u64 * (fleet_secagg::message::CIPHERTEXT_LEN as u64 + 24)
            }
            ServerMessage::Shares(_) => 4 * plan.map_or(0, |p| u64::from(p.context.params.length)),
            ServerMessage::Unmask { survivors, dropped } => {
                (survivors.len() + dropped.len()) as u64 * 48
            }
        };
        let down = serialized_len(&message);
        self.c.bytes_down += down;
        let secs = 2.0 * latency
            + down as f64 * 8.0 / (p.download_mbps * 1e6)
            + answer as f64 * 8.0 / (p.upload_mbps * 1e6);
        let at = now + ((secs * 1000.0).ceil() as u64).max(1);
        self.secure_inbox.insert(device, message);
        self.secure_queue.push(Reverse((at, device)));
    }

    /// Whether `device`'s job ends in a report for the open attempt.
    fn is_current(&self, device: u32) -> bool {
        self.jobs
            .get(&device)
            .is_some_and(|j| j.report && j.round == self.core.round() && j.attempt == self.attempt)
    }

    /// Schedules an idle device's next check-in, `from` at the earliest.
    fn idle(&mut self, device: u32, from: u64) {
        let mean = self.trainer.pop.profile(device).checkin_interval_s;
        let at = from + exp_ms(&mut self.rng, mean).max(1);
        self.checkins.push(Reverse((at, device)));
    }

    /// Trains, in parallel, the earliest pending reports of the open attempt:
    /// as many as the round still needs and at least one per thread, `device` included.
    fn train_pending(&mut self, device: u32, now: u64) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.retain(|d| {
            self.is_current(*d) && !self.trained.contains_key(d) && !self.ahead.contains_key(d)
        });
        pending.sort_unstable_by_key(|d| (self.jobs.get(d).map_or(now, |j| j.at), *d));
        let need = self
            .target
            .saturating_sub(self.accepted.len())
            .max(self.threads);
        let mut batch: Vec<u32> = pending.iter().copied().take(need).collect();
        if !batch.contains(&device) {
            batch.push(device);
        }
        let (global, trainer, jobs) = (self.core.global(), &self.trainer, &self.jobs);
        let results: Vec<(u32, Result<Trained, String>)> = batch
            .par_iter()
            .map(|&d| {
                let plan = jobs[&d].agent.plan();
                (d, trainer.train(d, plan, global))
            })
            .collect();
        self.stats.trainings += results.len() as u64;
        self.trained.extend(results);
        pending.retain(|d| !self.trained.contains_key(d));
        self.pending = pending;
    }

    /// A working device finishes: it reports or drops out. Returns the
    /// task core's effects and the report it was offered, if any.
    fn device_done(
        &mut self,
        device: u32,
        now: u64,
    ) -> Result<(Vec<Effect>, Option<Offered>), String> {
        let current = self.is_current(device);
        if current {
            self.take_ahead(device)?;
        }
        if current && !self.trained.contains_key(&device) {
            self.train_pending(device, now);
        }
        let job = self.jobs.remove(&device).expect("a busy device has a job");
        let id = u64::from(device);
        let mut agent = job.agent;
        let out = if !job.report {
            // The device dropped out: its agent is gone with its link.
            self.c.dropouts += 1;
            (self.core.drop_out(id, now), None)
        } else {
            self.c.bytes_up += self.update_bytes;
            // A report of a closed round is refused by the core without
            // looking at it: it is never trained.
            match self.trained.remove(&device).filter(|_| current) {
                None => {
                    let report = Report {
                        device: id,
                        round: job.round,
                        examples: 0,
                        values: &[],
                    };
                    (self.core.report(&report, now), None)
                }
                Some(Err(e)) => {
                    // Training failed on the device (e.g. no local data): it gives up.
                    let _ = agent.upload(Err(e));
                    self.c.dropouts += 1;
                    (self.core.drop_out(id, now), None)
                }
                Some(Ok(t)) if self.core.secure_plan().is_some() => {
                    self.secure_report(device, job.round, t, agent, now)?
                }
                Some(Ok(mut t)) => {
                    let bytes = std::mem::take(&mut t.bytes);
                    let (meta, bytes) = agent.upload(Ok((bytes, t.examples as u64, t.loss)))?;
                    // What the coordinator checks before the bytes arrive.
                    let decoded = self.core.spec().check_update_meta(&meta).is_ok()
                        && decode_into(&bytes, self.core.global().len(), &mut self.decoded).is_ok();
                    match decoded {
                        true => {
                            let report = Report {
                                device: id,
                                round: meta.round,
                                examples: meta.examples.unwrap_or(0),
                                values: &self.decoded,
                            };
                            (self.core.report(&report, now), Some((t, Some(agent))))
                        }
                        false => {
                            self.c.rejected += 1;
                            agent.verdict(false)?;
                            (self.core.drop_out(id, now), None)
                        }
                    }
                }
            }
        };
        // Idle again: the device checks in after its round's deadline at the earliest.
        self.idle(device, job.deadline.unwrap_or(now).max(now));
        Ok(out)
    }

    /// An idle device's check-in: the engine hears it if the device is available.
    fn check_in(&mut self, device: u32, now: u64) -> Vec<Effect> {
        if self.rng.random::<f64>() < self.trainer.pop.availability(device, now) {
            self.c.checkins += 1;
            self.core.check_in(u64::from(device), now)
        } else {
            self.idle(device, now);
            Vec::new()
        }
    }

    /// A plan reaches `device`: it downloads, trains and uploads, or drops out on the way.
    fn start_work(&mut self, device: u32, round: u64, now: u64) -> Result<(), String> {
        let within = self
            .deadline
            .map_or(self.report_deadline_ms, |d| d.saturating_sub(now));
        debug_assert_eq!(round, self.core.round(), "plans are of the open round");
        let plan = self.core.plan(1, self.model.object, within);
        let identity = plan.secure.is_some().then(|| {
            // The seed of the device's round keys and shares (secret on a
            // real device; here reproducible from the fleet's seed).
            let mut seed = [0u8; 32];
            ChaCha8Rng::seed_from_u64(
                training_seed(self.fleet.seed, u64::from(device), round) ^ 0x1d_5eed ^ self.attempt,
            )
            .fill_bytes(&mut seed);
            SecureIdentity::new(
                Box::new(SimSigner::new(self.fleet.seed, u64::from(device))),
                Box::new(SimPki::new(self.fleet.seed)),
                seed,
            )
        });
        let agent = agent::start(u64::from(device), plan, &self.model, identity)?;
        let p = self.trainer.pop.profile(device);
        let n = self.trainer.data.examples(device) as f64;
        let secs = self.model_bytes as f64 * 8.0 / (p.download_mbps * 1e6)
            + n * self.fleet.task.epochs as f64 / p.examples_per_second
            + self.update_bytes as f64 * 8.0 / (p.upload_mbps * 1e6);
        let span = ((secs * 1000.0).ceil() as u64).max(1);
        let report = self.rng.random::<f64>() >= p.dropout;
        let at = if report {
            let plan = training_part(agent.plan());
            match self.ahead.get(&device) {
                // Trained (or training) ahead for this very plan.
                Some(a) if a.plan == plan => {}
                _ if self.started < self.target && !self.no_ahead => {
                    self.started += 1;
                    self.queue_ahead(device, plan);
                }
                _ => {
                    self.ahead.remove(&device);
                    self.pending.push(device);
                }
            }
            now + span
        } else {
            now + ((self.rng.random::<f64>() * span as f64) as u64).max(1)
        };
        self.c.bytes_down += self.model_bytes;
        self.c.selected += 1;
        self.jobs.insert(
            device,
            Job {
                round,
                at,
                attempt: self.attempt,
                report,
                deadline: self.deadline,
                agent,
            },
        );
        self.busy.push(Reverse((at, device)));
        Ok(())
    }

    /// Counts an accepted report's training into the round's figures.
    fn accepted(&mut self, device: u32, t: &Trained) {
        self.accepted.push(device);
        if let Some(s) = &t.summary {
            match &mut self.training {
                Some(sum) => sum.merge(s),
                None => self.training = Some(s.clone()),
            }
        }
        self.c.loss_sum += f64::from(t.loss) * t.examples as f64;
        self.c.examples += t.examples;
    }

    /// Forgets the open attempt (after a close or an abandon). Trainings
    /// still running ahead for it finish unheard.
    fn next_attempt(&mut self) {
        self.started = 0;
        self.accepted.clear();
        self.secure.clear();
        self.secure_inbox.clear();
        self.secure_queue.clear();
        self.attempt += 1;
        self.deadline = None;
        self.trained.clear();
    }

    /// A round closed in the core: the new model is served, evaluated and logged.
    fn close_round(
        &mut self,
        closed: Closed,
        now: u64,
        on_round: &mut dyn FnMut(&RoundLog),
    ) -> Result<(), String> {
        let mut devices = std::mem::take(&mut self.accepted);
        if self.core.secure_plan().is_some() {
            // The sum holds the survivors of the exchange.
            devices = closed.participants.iter().map(|&d| d as u32).collect();
        }
        devices.sort_unstable();
        self.model = ModelObject::of(self.core.global());
        self.global = self.core.global().into();
        // Every plan from now on names the new model.
        self.ahead.clear();
        let Evaluation { loss, accuracy, .. } = evaluate(
            &self.trainer.spec,
            self.core.global(),
            self.test.view(),
            Backend::DEFAULT,
        )
        .map_err(|e| e.to_string())?;
        let c = std::mem::take(&mut self.c);
        let log = RoundLog {
            round: closed.round,
            accuracy,
            loss,
            train_loss: if c.examples > 0 {
                (c.loss_sum / c.examples as f64) as f32
            } else {
                f32::NAN
            },
            selected: c.selected,
            participants: closed.reports,
            devices,
            dropouts: c.dropouts,
            refused: c.refused,
            rejected: c.rejected,
            bounded: closed.bounded,
            abandoned: c.abandoned,
            checkins: c.checkins,
            bytes_up: c.bytes_up,
            bytes_down: c.bytes_down,
            virtual_s: now as f64 / 1000.0,
            round_virtual_s: (now - self.last_close) as f64 / 1000.0,
            wall_s: self.round_start.elapsed().as_secs_f64(),
            epsilon: closed.epsilon,
        };
        on_round(&log);
        self.logs.push(log);
        self.last_close = now;
        self.round_start = Instant::now();
        self.next_attempt();
        if closed.state == TaskState::Stopped {
            self.stopped = closed.note;
            self.finished = true;
        }
        Ok(())
    }

    /// Carries out the task core's effects, in order.
    fn apply(
        &mut self,
        effects: Vec<Effect>,
        mut offered: Option<Offered>,
        now: u64,
        on_round: &mut dyn FnMut(&RoundLog),
    ) -> Result<(), String> {
        for effect in effects {
            match effect {
                Effect::SendPlan { device, round } => self.start_work(device as u32, round, now)?,
                Effect::ComeBackAt { device, at } => {
                    self.checkins
                        .push(Reverse((at.max(now + 1), device as u32)));
                }
                Effect::Accepted { device, .. } => {
                    let (t, agent) = offered.take().expect("the report being handled");
                    self.accepted(device as u32, &t);
                    if let Some(agent) = agent {
                        agent.verdict(true)?;
                    }
                }
                Effect::SecureSend {
                    device, message, ..
                } => self.secure_send(device as u32, message, now),
                Effect::SecureRefused { device, .. } => {
                    self.c.refused += 1;
                    self.secure.remove(&(device as u32));
                    self.secure_inbox.remove(&(device as u32));
                }
                Effect::Refused { reason, device, .. } => {
                    self.secure.remove(&(device as u32));
                    match reason {
                        ReportRefusal::Engine(_) => self.c.refused += 1,
                        ReportRefusal::Rejected(_) => self.c.rejected += 1,
                    }
                    if let Some((_, Some(agent))) = offered.take() {
                        agent.verdict(false)?;
                    }
                }
                Effect::StartReporting { deadline, .. } => {
                    self.deadline = Some(deadline);
                    let attempt = self.attempt;
                    for job in self.jobs.values_mut().filter(|j| j.attempt == attempt) {
                        job.deadline = Some(deadline);
                    }
                }
                Effect::Abandoned { round, reason } => {
                    self.c.abandoned += 1;
                    if self.c.abandoned >= MAX_ABANDONS {
                        return Err(format!(
                            "round {round} was abandoned {MAX_ABANDONS} times in a row (last: {reason}); \
                             the fleet has too few available devices for task.target / task.min_reports"
                        ));
                    }
                    self.next_attempt();
                }
                Effect::Closed(closed) => self.close_round(closed, now, on_round)?,
                Effect::Finished => self.finished = true,
            }
        }
        Ok(())
    }

    /// Queues `device`'s training for `plan` (its training part) to start ahead.
    fn queue_ahead(&mut self, device: u32, plan: Plan) {
        self.next_ticket += 1;
        self.ahead.insert(
            device,
            Ahead {
                ticket: self.next_ticket,
                plan: plan.clone(),
                result: None,
            },
        );
        self.ahead_queue.push((device, self.next_ticket, plan));
    }

    /// While the open round selects devices and fewer trainings than
    /// threads run ahead, starts those of the devices due to check in
    /// next, as if the round selected them: the devices are chosen one
    /// check-in at a time, and each one's report usually arrives before the
    /// next one checks in, so without this lookahead the round's trainings
    /// would run one after the other. A guess that proves wrong (the
    /// device is unavailable, or the round's cohort fills first) costs a
    /// training nobody reads.
    fn look_ahead(&mut self) {
        if self.no_ahead || !self.core.engine().selecting() {
            return;
        }
        let running = self.ahead.values().filter(|a| a.result.is_none()).count();
        let mut room = self.threads.saturating_sub(running);
        if room == 0 {
            return;
        }
        let plan = training_part(&self.core.plan(1, self.model.object, 0));
        let mut next = Vec::with_capacity(2 * self.threads);
        while next.len() < 2 * self.threads
            && let Some(c) = self.checkins.pop()
        {
            next.push(c);
        }
        for &Reverse((_, device)) in &next {
            if room == 0 {
                break;
            }
            let id = u64::from(device);
            let engine = self.core.engine();
            let known = self.ahead.get(&device).is_some_and(|a| a.plan == plan);
            if known || engine.selected().contains(&id) || !engine.may_take_part(id) {
                continue;
            }
            self.queue_ahead(device, plan.clone());
            room -= 1;
        }
        // Popped and pushed back: the heap yields the same order.
        self.checkins.extend(next);
    }

    /// Hands the trainings queued by the last event to `scope`'s threads.
    ///
    /// A device's update is a pure function of the global model, its plan
    /// (less the time it has to report) and its data, so it can be
    /// computed before its report is due, on another core, while the driver
    /// goes on through the fleet's events: the first `target` devices an
    /// attempt sends plans start training at once, and [`Sim::look_ahead`]
    /// starts the devices due to check in next. The report takes the result
    /// when it arrives ([`Sim::take_ahead`]); any other report trains when
    /// it is due ([`Sim::train_pending`]). Either way the result is the
    /// same: only the wall time changes.
    fn start_ahead<'s>(&mut self, scope: &rayon::Scope<'s>)
    where
        'a: 's,
    {
        for (device, ticket, plan) in self.ahead_queue.drain(..) {
            self.stats.trainings += 1;
            let trainer = self.trainer.clone();
            let global = Arc::clone(&self.global);
            let tx = self.ahead_tx.clone();
            scope.spawn(move |_| {
                let result = trainer.train(device, &plan, &global);
                // The driver may be gone (an error ended the run).
                let _ = tx.send((device, ticket, result));
            });
        }
    }

    /// Moves `device`'s training run ahead for the plan of its job, if
    /// there is one, into `trained`, waiting for it if need be; results
    /// received meanwhile are kept, stale ones dropped.
    fn take_ahead(&mut self, device: u32) -> Result<(), String> {
        let plan = training_part(self.jobs[&device].agent.plan());
        if !self.ahead.get(&device).is_some_and(|a| a.plan == plan) {
            return Ok(());
        }
        while self.ahead[&device].result.is_none() {
            let (d, ticket, result) = match self.ahead_rx.try_recv() {
                Ok(received) => received,
                Err(TryRecvError::Disconnected) => {
                    return Err("a training running ahead was lost".into());
                }
                // On one of the pool's threads (a run inside `install`),
                // run queued trainings here rather than wait for threads
                // that may all be this one; once none is queued, the rest
                // are running elsewhere and will send.
                Err(TryRecvError::Empty) => {
                    if rayon::current_thread_index().is_some()
                        && rayon::yield_now() == Some(rayon::Yield::Executed)
                    {
                        continue;
                    }
                    self.ahead_rx
                        .recv()
                        .map_err(|_| "a training running ahead was lost".to_string())?
                }
            };
            if let Some(a) = self.ahead.get_mut(&d).filter(|a| a.ticket == ticket) {
                a.result = Some(result);
            }
        }
        let a = self.ahead.remove(&device).expect("checked");
        self.trained.insert(device, a.result.expect("received"));
        Ok(())
    }

    /// Processes the next event; false when there is none.
    fn step(&mut self, on_round: &mut dyn FnMut(&RoundLog)) -> Result<bool, String> {
        self.stats.queue_peak = self.stats.queue_peak.max(self.checkins.len());
        self.stats.queue_bytes = self
            .stats
            .queue_bytes
            .max(self.checkins.capacity() * self.stats.bytes_per_idle_device);
        // Ties: device work first, then protocol messages, then the
        // engine's deadline, then check-ins.
        let work = self.busy.peek().map(|Reverse((t, _))| (*t, 0u8));
        let secure = self.secure_queue.peek().map(|Reverse((t, _))| (*t, 1u8));
        let tick = self.core.next_deadline().map(|t| (t, 2u8));
        let checkin = self.checkins.peek().map(|Reverse((t, _))| (*t, 3u8));
        let Some((now, source)) = [work, secure, tick, checkin].into_iter().flatten().min() else {
            return Ok(false);
        };
        self.stats.events += 1;
        let (actions, offered) = match source {
            0 => {
                let Reverse((_, device)) = self.busy.pop().expect("peeked");
                self.device_done(device, now)?
            }
            1 => {
                let Reverse((_, device)) = self.secure_queue.pop().expect("peeked");
                (self.secure_deliver(device, now)?, None)
            }
            2 => (self.core.tick(now), None),
            _ => {
                let Reverse((_, device)) = self.checkins.pop().expect("peeked");
                (self.check_in(device, now), None)
            }
        };
        self.apply(actions, offered, now, on_round)?;
        Ok(true)
    }
}

/// Bytes of a protocol message on the wire (postcard).
fn serialized_len<T: Serialize>(m: &T) -> u64 {
    postcard::to_allocvec(m).map_or(0, |v| v.len() as u64)
}

/// Bytes a device sends for a protocol message.
fn message_bytes(m: &DeviceMessage) -> u64 {
    serialized_len(m)
}

/// The first global model of a run that starts from scratch: the model's
/// initialisation drawn from the fleet's seed.
pub fn initial_global(fleet: &Fleet) -> Vec<f32> {
    fleet.model_spec().init_params(fleet.seed)
}

/// Runs `fleet` (validated) on `data`, evaluating on `test`, calling `on_round` after each round.
pub fn run(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    compute: &dyn Compute,
    on_round: impl FnMut(&RoundLog),
) -> Result<Outcome, String> {
    run_from(fleet, data, test, compute, Start::default(), on_round)
}

/// [`run`], starting as `start` says.
pub fn run_from(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    compute: &dyn Compute,
    start: Start<'_>,
    mut on_round: impl FnMut(&RoundLog),
) -> Result<Outcome, String> {
    fleet.validate().map_err(|e| e.to_string())?;
    let pop = Population::new(fleet);
    let started = Instant::now();
    let mut sim = Sim::new(fleet, &pop, data, test, compute, start)?;
    rayon::in_place_scope(|scope| {
        while !sim.finished {
            if !sim.step(&mut on_round)? {
                return Err("no more events before the task finished".to_string());
            }
            sim.look_ahead();
            sim.start_ahead(scope);
        }
        Ok(())
    })?;
    let mut stats = sim.stats;
    stats.virtual_s = sim.last_close as f64 / 1000.0;
    stats.wall_s = started.elapsed().as_secs_f64();
    Ok(Outcome {
        global: sim.core.global().to_vec(),
        logs: sim.logs,
        stopped: sim.stopped,
        stats,
        training: sim.training,
    })
}
