//! One running task: the round engine, the global model, the open round's
//! streaming aggregate, uploads in progress and the privacy ledger, kept in
//! step with the [`Store`].
//!
//! The runner does no network I/O: the server hands it requests and sends
//! back the replies it returns. Every state change that must survive a crash
//! is committed to the store before the reply that acknowledges it. On
//! restart [`Runner::load`] rebuilds the open round from the store: the
//! accepted updates are decoded and added to a fresh aggregator in their
//! acceptance order, and the engine resumes with the round's selected and
//! reporting devices.

use std::collections::HashMap;
use std::sync::OnceLock;

use fleet_aggregation::codec::decode as decode_update;
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_aggregation::privacy::private_round_delta;
use fleet_aggregation::{
    Admission, Aggregator, Compute, Server as ServerOpt, Update, report_weight,
};
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::{
    CoordinatorMessage, ObjectId, ObjectRef, Plan, UpdateMeta, bytes_to_params, params_to_bytes,
};
use fleet_protocol::task::TaskSpec;
use fleet_protocol::transfer::Assembler;
use fleet_protocol::{ErrorCode, WireError};

use crate::engine::{Action, Event, Refusal, RoundEngine};
use crate::metrics::Metrics;
use crate::store::{ClosedRound, Store, StoreError, StoredUpdate, TaskRow};

/// The aggregation backend of this process and the line saying why it was
/// chosen: selected once ([`fleet_aggregation::select`]: the GPU when built
/// with the `cuda` feature and one answers, else the CPU).
static BACKEND: OnceLock<(Box<dyn Compute>, String)> = OnceLock::new();

/// The aggregation backend, selected on first use.
pub fn backend() -> &'static dyn Compute {
    BACKEND.get_or_init(fleet_aggregation::select).0.as_ref()
}

/// Selects the backend now (if not yet) and returns the line that names it,
/// for the start-up log.
pub fn backend_line() -> &'static str {
    &BACKEND.get_or_init(fleet_aggregation::select).1
}

/// δ at which a private task without a budget reports ε (the admin CLI's
/// default `--budget-delta`).
pub const UNBUDGETED_DELTA: f64 = 1e-5;

/// A wire refusal.
pub fn refuse(code: ErrorCode, message: impl Into<String>) -> CoordinatorMessage {
    CoordinatorMessage::Error(WireError {
        code,
        message: message.into(),
    })
}

struct Upload {
    device: u64,
    meta: UpdateMeta,
    assembler: Assembler,
}

/// What happened to the task, for logs.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A round closed.
    Closed {
        /// Round.
        round: u64,
        /// Reports aggregated.
        reports: usize,
        /// ε spent after it, when private.
        epsilon: Option<f64>,
        /// The new global model (its inference artifacts are built next).
        model: ObjectId,
    },
    /// A round attempt was abandoned.
    Abandoned {
        /// Round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// The task ended (finished, or stopped with the reason).
    Ended(TaskState, Option<String>),
}

/// A running task.
pub struct Runner {
    id: u64,
    spec: TaskSpec,
    engine: RoundEngine,
    global: Vec<f32>,
    model: std::sync::Arc<Vec<u8>>,
    model_ref: ObjectRef,
    aggregator: Aggregator<'static>,
    server: ServerOpt,
    ledger: Option<PrivacyLedger>,
    uploads: HashMap<ObjectId, Upload>,
    round_started: u64,
    participants: Vec<u64>,
    state: TaskState,
}

fn server_state_bytes(server: &ServerOpt) -> Vec<u8> {
    let (m, v) = server.state();
    let mut out = params_to_bytes(m);
    out.extend(params_to_bytes(v));
    out
}

impl Runner {
    /// Registers a new task in the store (paused); returns its id.
    pub fn create(store: &mut Store, spec: &TaskSpec) -> Result<u64, String> {
        spec.validate()?;
        if let Some(b) = &spec.budget {
            PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| format!("budget: {e}"))?;
        }
        let global = spec.model.init_params(spec.seed);
        Self::create_from(store, spec, &global)
    }

    /// Stores a new task whose first global model is `global` (warm start,
    /// e.g. retraining the deployed model); returns its id.
    pub fn create_from(store: &mut Store, spec: &TaskSpec, global: &[f32]) -> Result<u64, String> {
        spec.validate()?;
        if let Some(b) = &spec.budget {
            PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| format!("budget: {e}"))?;
        }
        if global.len() != spec.model.layout().total {
            return Err(format!(
                "the starting model has {} parameters, {} has {}",
                global.len(),
                spec.model.name(),
                spec.model.layout().total
            ));
        }
        store
            .create_task(spec, &params_to_bytes(global))
            .map_err(|e| e.to_string())
    }

    /// Loads a task from the store at time `now` (ms, the driver's clock),
    /// rebuilding its open round.
    pub fn load(store: &Store, row: &TaskRow, now: u64) -> Result<Self, StoreError> {
        let spec = row.spec.clone();
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("task {}: {what}: {e}", row.id))
        };
        let layout = spec.model.layout();
        let model = store.get_object(&row.model)?;
        let global = bytes_to_params(&model)
            .filter(|p| p.len() == layout.total)
            .ok_or_else(|| corrupt("model", &"does not match the layout"))?;
        let mut server = spec
            .strategy
            .server(layout.total)
            .map_err(|e| corrupt("strategy", &e))?;
        if let Some(bytes) = &row.server_state {
            let all = bytes_to_params(bytes).ok_or_else(|| corrupt("server state", &"length"))?;
            let (m, v) = all.split_at(all.len() / 2);
            server
                .restore(m.to_vec(), v.to_vec())
                .map_err(|e| corrupt("server state", &e))?;
        }
        let ledger = match (&row.ledger, &spec.budget, &spec.dp) {
            (Some(json), _, _) => {
                Some(serde_json::from_str(json).map_err(|e| corrupt("ledger", &e))?)
            }
            (None, Some(b), _) => {
                Some(PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| corrupt("budget", &e))?)
            }
            // A private task without a budget still accounts what it spends.
            (None, None, Some(_)) => Some(
                PrivacyLedger::new(f64::MAX, UNBUDGETED_DELTA)
                    .map_err(|e| corrupt("ledger", &e))?,
            ),
            (None, None, None) => None,
        };
        let admission = admission(&spec);
        let mut aggregator = spec
            .strategy
            .aggregator(admission, backend())
            .map_err(|e| corrupt("strategy", &e))?;
        let updates = store.updates(row.id, row.round)?;
        let mut accepted = Vec::with_capacity(updates.len());
        for u in &updates {
            let values =
                decode_update(&u.bytes, layout.total).map_err(|e| corrupt("stored update", &e))?;
            aggregator
                .add(&Update {
                    fingerprint: admission.fingerprint,
                    values: &values,
                    weight: u.weight,
                })
                .map_err(|e| corrupt("stored update", &e))?;
            accepted.push(u.device);
        }
        let selected = store.selected(row.id, row.round)?;
        let engine = RoundEngine::resume(
            spec.engine,
            row.round,
            row.closed,
            &selected,
            &accepted,
            now,
        )
        .map_err(|e| corrupt("engine", &e))?;
        let model_ref = ObjectRef {
            id: row.model,
            size: model.len() as u64,
        };
        Ok(Self {
            id: row.id,
            spec,
            engine,
            global,
            model: std::sync::Arc::new(model),
            model_ref,
            aggregator,
            server,
            ledger,
            uploads: HashMap::new(),
            round_started: now,
            participants: accepted,
            state: row.state,
        })
    }

    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The current global model's bytes and reference.
    pub fn model(&self) -> (std::sync::Arc<Vec<u8>>, ObjectRef) {
        (self.model.clone(), self.model_ref)
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.engine.round()
    }

    /// The next time the runner needs a tick (ms).
    pub fn next_deadline(&self) -> Option<u64> {
        self.engine.next_deadline()
    }

    /// The task's state.
    pub fn state(&self) -> TaskState {
        self.state
    }

    fn plan(&self, round: u64) -> Plan {
        Plan {
            task: self.id,
            round,
            model: self.model_ref,
            spec: self.spec.model.clone(),
            train: self.spec.train,
            dp: self.spec.dp,
            codec: self.spec.codec,
            report_within_ms: self.spec.engine.report_deadline_ms,
        }
    }

    /// A device asks for work.
    pub fn check_in(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        device: u64,
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<CoordinatorMessage, StoreError> {
        let actions = self.engine.handle(Event::CheckIn { device }, now);
        let reply = self.apply(store, metrics, actions, Some(device), now, log)?;
        Ok(reply.unwrap_or(CoordinatorMessage::ComeBackLater { after_ms: 1_000 }))
    }

    /// A device disconnected.
    pub fn drop_out(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        device: u64,
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let actions = self.engine.handle(Event::DropOut { device }, now);
        self.apply(store, metrics, actions, None, now, log)?;
        Ok(())
    }

    /// Time passed.
    pub fn tick(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let actions = self.engine.handle(Event::Tick, now);
        self.apply(store, metrics, actions, None, now, log)?;
        Ok(())
    }

    /// A device announces an update (or asks how much of it arrived).
    pub fn begin_upload(
        &mut self,
        store: &Store,
        device: u64,
        meta: UpdateMeta,
    ) -> Result<CoordinatorMessage, StoreError> {
        let layout = self.spec.model.layout();
        if meta.task != self.id || meta.round != self.engine.round() {
            return Ok(refuse(
                ErrorCode::NoSuchRound,
                format!("round {} of task {} is not open", meta.round, meta.task),
            ));
        }
        // Accepted before, but the acknowledgement was lost (a restart in
        // between): acknowledge again, count nothing.
        if store.accepted_object(self.id, meta.round, device)? == Some(meta.object.id) {
            return Ok(CoordinatorMessage::UploadAccepted {
                object: meta.object.id,
            });
        }
        if meta.fingerprint != layout.fingerprint() {
            return Ok(refuse(
                ErrorCode::UpdateRejected,
                "update computed for another model layout",
            ));
        }
        if let Some(u) = self.uploads.get(&meta.object.id) {
            return Ok(if u.device == device {
                CoordinatorMessage::UploadProgress {
                    object: meta.object.id,
                    received: u.assembler.received(),
                }
            } else {
                refuse(
                    ErrorCode::Replayed,
                    "this update was announced by another device",
                )
            });
        }
        // Bound on any encoding (sparse top-k spends 8 bytes a value) plus a header.
        let max = 8 * layout.total as u64 + 4096;
        Ok(match Assembler::new(meta.object, max) {
            Ok(assembler) => {
                // One upload per device at a time: a new announcement replaces an old one.
                self.uploads.retain(|_, u| u.device != device);
                let object = meta.object.id;
                self.uploads.insert(
                    object,
                    Upload {
                        device,
                        meta,
                        assembler,
                    },
                );
                CoordinatorMessage::UploadProgress {
                    object,
                    received: 0,
                }
            }
            Err(e) => CoordinatorMessage::Error(e.to_wire()),
        })
    }

    /// Bytes of an announced update; the last ones submit it to the round.
    #[allow(clippy::too_many_arguments)]
    pub fn upload_chunk(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        device: u64,
        object: ObjectId,
        offset: u64,
        data: &[u8],
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<CoordinatorMessage, StoreError> {
        let Some(upload) = self.uploads.get_mut(&object).filter(|u| u.device == device) else {
            metrics.reject("unannounced");
            return Ok(refuse(
                ErrorCode::Malformed,
                "chunk for an update that was not announced",
            ));
        };
        if let Err(e) = upload.assembler.accept(offset, data) {
            metrics.reject("transfer");
            return Ok(CoordinatorMessage::Error(e.to_wire()));
        }
        metrics.bytes_up += data.len() as u64;
        if !upload.assembler.is_complete() {
            return Ok(CoordinatorMessage::UploadProgress {
                object,
                received: upload.assembler.received(),
            });
        }
        let upload = self.uploads.remove(&object).expect("present");
        let meta = upload.meta;
        let bytes = match upload.assembler.finish() {
            Ok(b) => b,
            Err(e) => {
                metrics.reject("hash_mismatch");
                return Ok(CoordinatorMessage::Error(e.to_wire()));
            }
        };
        let admission = admission(&self.spec);
        let values = match decode_update(&bytes, admission.len) {
            Ok(v) => v,
            Err(e) => {
                metrics.reject("undecodable");
                return Ok(refuse(ErrorCode::UpdateRejected, e.to_string()));
            }
        };
        let weight = report_weight(self.spec.dp.is_some(), meta.examples);
        let update = Update {
            fingerprint: admission.fingerprint,
            values: &values,
            weight,
        };
        if let Err(r) = admission.check(&update) {
            metrics.reject(r.reason());
            return Ok(refuse(ErrorCode::UpdateRejected, r.to_string()));
        }
        let round = self.engine.round();
        let actions = self.engine.handle(Event::Report { device, round }, now);
        let accepted = actions
            .iter()
            .any(|a| matches!(a, Action::AcceptReport { device: d, .. } if *d == device));
        if accepted {
            // Durable first: once acknowledged, the update survives a crash.
            let fresh = store.accept_update(
                self.id,
                round,
                &StoredUpdate {
                    device,
                    weight,
                    examples: meta.examples,
                    train_loss: meta.train_loss,
                    bytes,
                },
            )?;
            debug_assert!(fresh, "the engine refuses duplicates before the store");
            if let Err(r) = self.aggregator.add(&update) {
                metrics.reject(r.reason());
                return Ok(refuse(ErrorCode::UpdateRejected, r.to_string()));
            }
            self.participants.push(device);
            metrics.updates_accepted += 1;
        }
        let refusal = self.apply(store, metrics, actions, Some(device), now, log)?;
        Ok(match (accepted, refusal) {
            (true, _) => CoordinatorMessage::UploadAccepted { object },
            (false, Some(r)) => r,
            (false, None) => refuse(ErrorCode::NoSuchRound, "report refused"),
        })
    }

    /// Carries out engine actions; returns the reply for `device`, if any.
    fn apply(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        actions: Vec<Action>,
        device: Option<u64>,
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<Option<CoordinatorMessage>, StoreError> {
        let mut reply = None;
        for a in actions {
            match a {
                Action::SendPlan { device: d, round } => {
                    store.select(self.id, round, d)?;
                    if Some(d) == device {
                        reply = Some(CoordinatorMessage::Plan(self.plan(round)));
                    }
                }
                Action::ComeBackAt { device: d, at } if Some(d) == device => {
                    reply = Some(CoordinatorMessage::ComeBackLater {
                        after_ms: at.saturating_sub(now),
                    })
                }
                Action::RefuseReport {
                    device: d, reason, ..
                } if Some(d) == device => {
                    let (code, label) = match reason {
                        Refusal::Duplicate => (ErrorCode::Replayed, "replayed"),
                        Refusal::NotOpen => (ErrorCode::NoSuchRound, "not_open"),
                        Refusal::NotSelected => (ErrorCode::NoSuchRound, "not_selected"),
                    };
                    metrics.reject(label);
                    reply = Some(refuse(code, format!("report refused: {reason:?}")))
                }
                Action::CloseRound { round, reports } => {
                    self.close_round(store, metrics, round, reports, now, log)?
                }
                Action::AbandonRound { round, reason } => {
                    store.abandon_round(self.id, round, &reason)?;
                    metrics.rounds_abandoned += 1;
                    self.reset_round(now);
                    log.push(Outcome::Abandoned { round, reason });
                }
                Action::Finished => {
                    log.push(Outcome::Ended(TaskState::Finished, None));
                }
                _ => {}
            }
        }
        Ok(reply)
    }

    fn reset_round(&mut self, now: u64) {
        self.aggregator = self
            .spec
            .strategy
            .aggregator(admission(&self.spec), backend())
            .expect("strategy was validated when the task was created");
        self.uploads.clear();
        self.participants.clear();
        self.round_started = now;
    }

    fn close_round(
        &mut self,
        store: &mut Store,
        metrics: &mut Metrics,
        round: u64,
        reports: usize,
        now: u64,
        log: &mut Vec<Outcome>,
    ) -> Result<(), StoreError> {
        let fresh = self
            .spec
            .strategy
            .aggregator(admission(&self.spec), backend())
            .expect("strategy was validated when the task was created");
        let done = std::mem::replace(&mut self.aggregator, fresh);
        let mut note = None;
        match done.finish() {
            Ok(agg) => {
                let delta = match &self.spec.dp {
                    Some(dp) => private_round_delta(&agg.delta, agg.updates, dp),
                    None => Ok(agg.delta),
                };
                match delta.map_err(|e| e.to_string()).and_then(|d| {
                    self.server
                        .apply(backend(), &mut self.global, &d)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(()) => {}
                    Err(e) => note = Some(format!("round {round} could not be applied: {e}")),
                }
            }
            Err(e) => note = Some(format!("round {round} could not be aggregated: {e}")),
        }
        let mut epsilon = None;
        if let (Some(ledger), Some(dp)) = (&mut self.ledger, &self.spec.dp) {
            let q = self.spec.sampling_rate();
            let z = dp.effective_noise_multiplier(reports);
            ledger
                .record_round(q, z)
                .map_err(|e| StoreError::Corrupt(format!("privacy ledger: {e}")))?;
            epsilon = Some(
                ledger
                    .spent()
                    .map_err(|e| StoreError::Corrupt(format!("privacy ledger: {e}")))?
                    .epsilon,
            );
        }
        let closed = self.engine.closed();
        let mut state = if closed >= self.spec.engine.rounds {
            TaskState::Finished
        } else {
            TaskState::Running
        };
        if state == TaskState::Running
            && let (Some(ledger), Some(dp)) = (&self.ledger, &self.spec.dp)
            && let Err(e) = ledger.check_round(self.spec.sampling_rate(), dp.noise_multiplier)
        {
            note = Some(format!("stopped before round {}: {e}", round + 1));
        }
        if note.is_some() {
            state = TaskState::Stopped;
        }
        let model = params_to_bytes(&self.global);
        let id = store.put_object(&model)?;
        let ledger_json = self
            .ledger
            .as_ref()
            .map(|l| serde_json::to_string(l).expect("ledger serialises"));
        store.close_round(&ClosedRound {
            task: self.id,
            round,
            model: id,
            model_size: model.len() as u64,
            closed,
            server_state: server_state_bytes(&self.server),
            ledger: ledger_json,
            epsilon,
            participants: &self.participants,
            state,
            note: note.as_deref(),
        })?;
        metrics.round_closed(now.saturating_sub(self.round_started) as f64 / 1000.0);
        self.model_ref = ObjectRef {
            id,
            size: model.len() as u64,
        };
        self.model = std::sync::Arc::new(model);
        self.reset_round(now);
        log.push(Outcome::Closed {
            round,
            reports,
            epsilon,
            model: id,
        });
        if state == TaskState::Stopped {
            log.push(Outcome::Ended(state, note));
        }
        self.state = state;
        Ok(())
    }
}

fn admission(spec: &TaskSpec) -> Admission {
    let layout = spec.model.layout();
    Admission {
        fingerprint: layout.fingerprint(),
        len: layout.total,
        max_norm: None,
    }
}
