//! One running task as the coordinator runs it: the [`TaskCore`] (round
//! logic, sans IO), uploads in progress, and the store kept in step with it.
//!
//! The runner does no network I/O and makes no decision of its own: the
//! server hands it requests, it reassembles uploads, decodes them, feeds the
//! core, persists the core's effects in the [`Store`] and returns the reply
//! for the device. Every state change that must survive a crash is
//! committed to the store before the reply that acknowledges it. On restart
//! [`Runner::load`] rebuilds the open round from the store: the accepted
//! updates are decoded and added to a fresh aggregate in their acceptance
//! order, and the engine resumes with the round's selected and reporting
//! devices. A stored update that can no longer be decoded or aggregated is
//! quarantined (moved aside and logged), never a reason to stop.
//!
//! A task with secure aggregation exchanges the protocol's messages instead
//! of uploads ([`Runner::secure`], [`Runner::secure_chunk`]): a device's
//! advertisement is its report, and the coordinator's messages wait in an
//! outbox until the device polls for them. That exchange lives in memory
//! only: after a restart the open attempt cannot finish, and its devices
//! are refused at their next request (the round is retried at its
//! deadline).

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use fleet_aggregation::Compute;
use fleet_aggregation::codec::{decode as decode_update, decode_into};
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::{
    CoordinatorMessage, ObjectId, ObjectRef, Plan, UpdateMeta, bytes_to_params, params_to_bytes,
};
use fleet_protocol::task::TaskSpec;
use fleet_protocol::transfer::{Assembler, CHUNK_SIZE};
use fleet_protocol::{ErrorCode, WireError};
use fleet_secagg::message::Words;
use fleet_secagg::{DeviceMessage, ServerMessage};

use crate::engine::Refusal;
use crate::metrics::Metrics;
use crate::store::{CLOSED, ClosedRound, DISCARDED, Store, StoreError, StoredUpdate, TaskRow};
use crate::task::{Effect, Report, ReportRefusal, TaskCore, new_ledger};

pub use crate::task::UNBUDGETED_DELTA;

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

/// A wire refusal.
pub fn refuse(code: ErrorCode, message: impl Into<String>) -> CoordinatorMessage {
    CoordinatorMessage::Error(WireError {
        code,
        message: message.into(),
    })
}

/// How long a device of a secure round waits between polls while the
/// round's reports come in (ms).
pub const SECURE_POLL_REPORTING_MS: u64 = 1_000;
/// How long a device of a secure round waits between polls once the
/// exchange runs (ms).
pub const SECURE_POLL_EXCHANGE_MS: u64 = 200;

/// The open attempt's secure exchange as the coordinator serves it.
#[derive(Default)]
struct SecureLink {
    /// Devices whose advertisement the core accepted.
    members: HashSet<u64>,
    /// Each device's next protocol message, until it polls.
    outbox: HashMap<u64, ServerMessage>,
    /// Devices dropped from the exchange, and why (told at their next
    /// request).
    refused: HashMap<u64, String>,
    /// Masked inputs being uploaded, by device.
    masked: HashMap<u64, Vec<u8>>,
    /// Devices whose outbox got a message since the driver last asked
    /// ([`Runner::take_secure_ready`]).
    ready: Vec<u64>,
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
        /// Reports the relative bound scaled down or weight-capped.
        bounded: usize,
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
    core: TaskCore<'static>,
    model: std::sync::Arc<Vec<u8>>,
    model_ref: ObjectRef,
    uploads: HashMap<ObjectId, Upload>,
    round_started: u64,
    /// Memory (MiB) a device needs to train the task's model.
    training_memory_mib: u64,
    /// The open attempt's secure exchange (a task with secure aggregation).
    secure: SecureLink,
    /// The last update decoded (its allocation reused by the next).
    decoded: Vec<f32>,
}

fn server_state_bytes((m, v): (&[f32], &[f32])) -> Vec<u8> {
    let mut out = params_to_bytes(m);
    out.extend(params_to_bytes(v));
    out
}

/// What a driver call needs besides the request: the store that effects are
/// persisted in, the metrics they count in, the clock (ms) and the log of
/// what happened to the task.
pub struct Io<'a> {
    /// The store.
    pub store: &'a mut Store,
    /// The metrics.
    pub metrics: &'a mut Metrics,
    /// Now, ms on the driver's clock.
    pub now: u64,
    /// What happened, for the server's log.
    pub log: &'a mut Vec<Outcome>,
}

impl Runner {
    /// Registers a new task in the store (paused); returns its id.
    pub fn create(store: &mut Store, spec: &TaskSpec) -> Result<u64, String> {
        spec.validate()?;
        let global = spec.model.init_params(spec.seed);
        Self::create_from(store, spec, &global)
    }

    /// Stores a new task whose first global model is `global` (warm start,
    /// e.g. retraining the deployed model); returns its id.
    pub fn create_from(store: &mut Store, spec: &TaskSpec, global: &[f32]) -> Result<u64, String> {
        spec.validate()?;
        new_ledger(spec)?;
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
    /// rebuilding its open round. Stored updates that cannot be decoded or
    /// aggregated any more are quarantined and logged.
    pub fn load(store: &mut Store, row: &TaskRow, now: u64) -> Result<Self, StoreError> {
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
        let ledger: Option<PrivacyLedger> = match &row.ledger {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| corrupt("ledger", &e))?),
            None => None,
        };
        let mut decoded = Vec::new();
        for u in store.updates(row.id, row.round)? {
            match decode_update(&u.bytes, layout.total) {
                Ok(values) => decoded.push((u.device, u.weight, values)),
                Err(e) => quarantine(store, row.id, row.round, u.device, &e.to_string())?,
            }
        }
        let selected = store.selected(row.id, row.round)?;
        let closed_rounds: Vec<(u64, Vec<u64>)> = store
            .rounds(row.id)?
            .into_iter()
            // A discarded round may have been charged (noise drawn before
            // the model step failed): its participants count too.
            .filter(|r| r.outcome == CLOSED || r.outcome.starts_with(DISCARDED))
            .map(|r| (r.round, r.participants))
            .collect();
        let (core, refused) = TaskCore::resume(
            spec,
            global,
            backend(),
            crate::task::Resume {
                round: row.round,
                closed: row.closed,
                selected: &selected,
                server,
                ledger,
                clip_norm: row.clip_norm,
                closed_rounds: &closed_rounds,
                basis: row.basis,
                history: row.history.clone(),
                state: row.state,
            },
            &decoded,
            now,
        )
        .map_err(|e| corrupt("task", &e))?;
        for (device, why) in refused {
            quarantine(store, row.id, row.round, device, &why.to_string())?;
        }
        let model_ref = ObjectRef {
            id: row.model,
            size: model.len() as u64,
        };
        let spec = core.spec();
        let training_memory_mib = spec
            .model
            .training_memory_bytes(spec.train.batch_size)
            .div_ceil(1 << 20);
        Ok(Self {
            id: row.id,
            core,
            model: std::sync::Arc::new(model),
            model_ref,
            uploads: HashMap::new(),
            round_started: now,
            training_memory_mib,
            secure: SecureLink::default(),
            decoded: Vec::new(),
        })
    }

    /// The task's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The task's round logic.
    pub fn core(&self) -> &TaskCore<'static> {
        &self.core
    }

    /// The current global model's bytes and reference.
    pub fn model(&self) -> (std::sync::Arc<Vec<u8>>, ObjectRef) {
        (self.model.clone(), self.model_ref)
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.core.round()
    }

    /// The next time the runner needs a tick (ms).
    pub fn next_deadline(&self) -> Option<u64> {
        self.core.next_deadline()
    }

    /// The task's state.
    pub fn state(&self) -> TaskState {
        self.core.state()
    }

    /// The open round's plan (the engine sends plans of the open round only).
    fn plan(&self) -> Plan {
        let within = self.core.spec().engine.report_deadline_ms;
        self.core.plan(self.id, self.model_ref, within)
    }

    /// A device asks for work.
    pub fn check_in(&mut self, io: Io<'_>, device: u64) -> Result<CoordinatorMessage, StoreError> {
        let effects = self.core.check_in(device, io.now);
        let reply = self.apply(io, effects, Some(device), None)?;
        Ok(reply.unwrap_or(CoordinatorMessage::ComeBackLater { after_ms: 1_000 }))
    }

    /// The memory (MiB, rounded up) a device needs to train this task's
    /// model (`ModelSpec::training_memory_bytes` at the task's batch size).
    pub fn training_memory_mib(&self) -> u64 {
        self.training_memory_mib
    }

    /// A device disconnected.
    pub fn drop_out(&mut self, io: Io<'_>, device: u64) -> Result<(), StoreError> {
        let effects = self.core.drop_out(device, io.now);
        self.apply(io, effects, None, None)?;
        Ok(())
    }

    /// Time passed.
    pub fn tick(&mut self, io: Io<'_>) -> Result<(), StoreError> {
        let effects = self.core.tick(io.now);
        self.apply(io, effects, None, None)?;
        Ok(())
    }

    /// Whether `device` announced the update `object` to this runner (one
    /// that took the task over from another replica has not heard of the
    /// uploads in progress there).
    pub fn knows_upload(&self, device: u64, object: &ObjectId) -> bool {
        self.uploads.get(object).is_some_and(|u| u.device == device)
    }

    /// A device announces an update (or asks how much of it arrived).
    pub fn begin_upload(
        &mut self,
        store: &Store,
        metrics: &mut Metrics,
        device: u64,
        meta: UpdateMeta,
    ) -> Result<CoordinatorMessage, StoreError> {
        let layout = self.core.spec().model.layout();
        if self.core.secure_plan().is_some() {
            metrics.reject("secure");
            return Ok(refuse(
                ErrorCode::UpdateRejected,
                "this task runs secure aggregation: its updates go only through the \
                 protocol's exchange (AgentMessage::Secure)",
            ));
        }
        if meta.task != self.id || meta.round != self.core.round() {
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
        // Only a device selected in the open round may upload: anyone else
        // is refused before any memory is reserved for the upload, as the
        // core would refuse the report. (A selected device that reported
        // already holds at most one upload, like any selected device; its
        // replay is refused when it completes, as before.)
        if let Some(why @ (Refusal::NotSelected | Refusal::NotOpen)) =
            self.core.engine().refusal(device, meta.round)
        {
            let why = ReportRefusal::Engine(why);
            metrics.reject(why.label());
            return Ok(refuse(ErrorCode::NoSuchRound, why.to_string()));
        }
        if meta.fingerprint != layout.fingerprint() {
            return Ok(refuse(
                ErrorCode::UpdateRejected,
                "update computed for another model layout",
            ));
        }
        if let Err(why) = self.core.spec().check_update_meta(&meta) {
            metrics.reject("meta");
            return Ok(refuse(ErrorCode::UpdateRejected, why));
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

    /// Bytes of an announced update; the last ones submit it to the round:
    /// decoded, offered to the task core, and persisted when accepted.
    pub fn upload_chunk(
        &mut self,
        io: Io<'_>,
        device: u64,
        object: ObjectId,
        offset: u64,
        data: &[u8],
    ) -> Result<CoordinatorMessage, StoreError> {
        let Some(upload) = self.uploads.get_mut(&object).filter(|u| u.device == device) else {
            io.metrics.reject("unannounced");
            return Ok(refuse(
                ErrorCode::Malformed,
                "chunk for an update that was not announced",
            ));
        };
        if let Err(e) = upload.assembler.accept(offset, data) {
            io.metrics.reject("transfer");
            return Ok(CoordinatorMessage::Error(e.to_wire()));
        }
        io.metrics.bytes_up += data.len() as u64;
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
                io.metrics.reject("hash_mismatch");
                return Ok(CoordinatorMessage::Error(e.to_wire()));
            }
        };
        if let Err(e) = decode_into(&bytes, self.core.global().len(), &mut self.decoded) {
            io.metrics.reject("undecodable");
            return Ok(refuse(ErrorCode::UpdateRejected, e.to_string()));
        }
        let effects = self.core.report(
            &Report {
                device,
                round: meta.round,
                examples: meta.examples.unwrap_or(0),
                values: &self.decoded,
            },
            io.now,
        );
        let stored = StoredUpdate {
            device,
            weight: self.core.weight(meta.examples.unwrap_or(0)),
            examples: meta.examples,
            train_loss: meta.train_loss,
            bytes,
        };
        let reply = self.apply(io, effects, Some(device), Some(stored))?;
        Ok(match reply {
            Some(CoordinatorMessage::UploadAccepted { .. }) => {
                CoordinatorMessage::UploadAccepted { object }
            }
            Some(r) => r,
            None => refuse(ErrorCode::NoSuchRound, "report refused"),
        })
    }

    /// Checks a secure request's task and round, and tells a device that
    /// was dropped from the exchange why.
    fn secure_check(&mut self, device: u64, task: u64, round: u64) -> Option<CoordinatorMessage> {
        if task != self.id || self.core.secure_plan().is_none() {
            return Some(refuse(
                ErrorCode::NoSuchRound,
                format!("task {task} is not a running task with secure aggregation"),
            ));
        }
        if let Some(why) = self.secure.refused.remove(&device) {
            return Some(refuse(ErrorCode::UpdateRejected, why));
        }
        if round != self.core.round() {
            return Some(refuse(
                ErrorCode::NoSuchRound,
                format!("round {round} of task {task} is not open"),
            ));
        }
        None
    }

    /// The answer to a secure request the exchange took: the device's next
    /// message, or when to poll again.
    fn secure_answer(&mut self, device: u64) -> CoordinatorMessage {
        let after_ms = if self.core.secure_stage().is_some() {
            SECURE_POLL_EXCHANGE_MS
        } else {
            SECURE_POLL_REPORTING_MS
        };
        CoordinatorMessage::Secure {
            message: self.secure.outbox.remove(&device),
            after_ms,
        }
    }

    /// A secure-aggregation message of `device` (an advertisement, shares
    /// or a reveal; the caller has checked an advertisement's signature),
    /// or a poll when `message` is `None`.
    pub fn secure(
        &mut self,
        io: Io<'_>,
        device: u64,
        task: u64,
        round: u64,
        message: Option<DeviceMessage>,
    ) -> Result<CoordinatorMessage, StoreError> {
        if let Some(refused) = self.secure_check(device, task, round) {
            return Ok(refused);
        }
        match message {
            None if !self.secure.members.contains(&device) => Ok(refuse(
                ErrorCode::NoSuchRound,
                "this device is not in the open round's secure exchange",
            )),
            None => Ok(self.secure_answer(device)),
            Some(DeviceMessage::Masked(_)) => Ok(refuse(
                ErrorCode::Malformed,
                "a masked input goes in SecureChunk messages",
            )),
            Some(message) => {
                let effects = self.core.secure_message(device, round, message, io.now);
                // Taken (the last reveal may have closed the round and
                // emptied the exchange): the answer carries what waits.
                match self.apply(io, effects, Some(device), None)? {
                    Some(refused @ CoordinatorMessage::Error(_)) => Ok(refused),
                    _ => Ok(self.secure_answer(device)),
                }
            }
        }
    }

    /// Bytes of `device`'s masked input, in order from offset 0; the last
    /// ones hand the input to the exchange. Only a device the exchange
    /// waits for may start one, and it may hold at most the round's
    /// `4 · length` bytes.
    pub fn secure_chunk(
        &mut self,
        io: Io<'_>,
        device: u64,
        task: u64,
        round: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<CoordinatorMessage, StoreError> {
        if let Some(refused) = self.secure_check(device, task, round) {
            return Ok(refused);
        }
        let plan = *self.core.secure_plan().expect("checked");
        let total = 4 * plan.context.params.length as usize;
        if data.len() > CHUNK_SIZE {
            io.metrics.reject("secure_chunk");
            return Ok(refuse(
                ErrorCode::TooLarge,
                format!("a chunk of {} bytes; at most {CHUNK_SIZE}", data.len()),
            ));
        }
        if offset == 0 {
            let waited = self.core.secure_stage() == Some(fleet_secagg::server::Stage::MaskedInput)
                && self.core.secure_awaits(device);
            if !waited {
                self.secure.masked.remove(&device);
                io.metrics.reject("secure_chunk");
                return Ok(refuse(
                    ErrorCode::NoSuchRound,
                    "the exchange does not wait for this device's masked input",
                ));
            }
            self.secure.masked.insert(device, Vec::with_capacity(total));
        }
        let Some(held) = self.secure.masked.get_mut(&device) else {
            io.metrics.reject("secure_chunk");
            return Ok(refuse(
                ErrorCode::Malformed,
                "a masked input starts at offset 0",
            ));
        };
        let fits = held.len() as u64 == offset && held.len() + data.len() <= total;
        if !fits {
            let had = held.len();
            self.secure.masked.remove(&device);
            io.metrics.reject("secure_chunk");
            return Ok(refuse(
                ErrorCode::Malformed,
                format!(
                    "a chunk of {} bytes at offset {offset}, after {had} of a {total}-byte \
                     masked input: send it again from offset 0",
                    data.len()
                ),
            ));
        }
        held.extend_from_slice(data);
        io.metrics.bytes_up += data.len() as u64;
        if held.len() < total {
            return Ok(CoordinatorMessage::Secure {
                message: None,
                after_ms: 0,
            });
        }
        let bytes = self.secure.masked.remove(&device).expect("held");
        let words = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let effects =
            self.core
                .secure_message(device, round, DeviceMessage::Masked(Words(words)), io.now);
        match self.apply(io, effects, Some(device), None)? {
            Some(refused @ CoordinatorMessage::Error(_)) => Ok(refused),
            _ => Ok(self.secure_answer(device)),
        }
    }

    /// Forgets the open attempt's secure exchange (devices waiting for a
    /// message are woken to hear that it is over).
    fn reset_secure(&mut self) {
        let waiting = self.secure.members.iter().copied();
        let ready: Vec<u64> = std::mem::take(&mut self.secure.ready)
            .into_iter()
            .chain(waiting)
            .collect();
        self.secure = SecureLink {
            ready,
            ..SecureLink::default()
        };
    }

    /// The devices that have a secure-aggregation message waiting, or
    /// whose exchange ended, since the last call: a driver holding their
    /// polls answers them now.
    pub fn take_secure_ready(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.secure.ready)
    }

    /// Persists the core's effects in order; returns the reply for `device`,
    /// if any. `update` is the report being handled, stored when accepted.
    fn apply(
        &mut self,
        io: Io<'_>,
        effects: Vec<Effect>,
        device: Option<u64>,
        mut update: Option<StoredUpdate>,
    ) -> Result<Option<CoordinatorMessage>, StoreError> {
        let Io {
            store,
            metrics,
            now,
            log,
        } = io;
        let mut reply = None;
        for effect in effects {
            match effect {
                Effect::SendPlan { device: d, round } => {
                    store.select(self.id, round, d)?;
                    if Some(d) == device {
                        reply = Some(CoordinatorMessage::Plan(self.plan()));
                    }
                }
                Effect::ComeBackAt { device: d, at } if Some(d) == device => {
                    reply = Some(CoordinatorMessage::ComeBackLater {
                        after_ms: at.saturating_sub(now),
                    })
                }
                Effect::ComeBackAt { .. } | Effect::StartReporting { .. } => {}
                // A secure round's report is an advertisement: nothing to
                // store (the exchange is in memory only).
                Effect::Accepted { device: d, .. } if self.core.secure_plan().is_some() => {
                    self.secure.members.insert(d);
                    metrics.updates_accepted += 1;
                }
                Effect::Accepted {
                    device: d, round, ..
                } => {
                    let stored = update
                        .take()
                        .filter(|u| u.device == d)
                        .expect("the core accepts only the report it was given");
                    // Durable before the acknowledgement: an accepted update
                    // survives a crash.
                    let object = ObjectId::of(&stored.bytes);
                    let fresh = store.accept_update(self.id, round, &stored)?;
                    debug_assert!(fresh, "the engine refuses duplicates before the store");
                    metrics.updates_accepted += 1;
                    if Some(d) == device {
                        reply = Some(CoordinatorMessage::UploadAccepted { object });
                    }
                }
                Effect::Refused {
                    device: d, reason, ..
                } => {
                    metrics.reject(reason.label());
                    if Some(d) == device {
                        let code = match &reason {
                            ReportRefusal::Engine(Refusal::Duplicate) => ErrorCode::Replayed,
                            ReportRefusal::Engine(_) => ErrorCode::NoSuchRound,
                            ReportRefusal::Rejected(_) => ErrorCode::UpdateRejected,
                        };
                        reply = Some(refuse(code, reason.to_string()));
                    }
                }
                Effect::Closed(c) => {
                    let model = params_to_bytes(self.core.global());
                    let id = store.put_object(&model)?;
                    let ledger_json = self
                        .core
                        .ledger()
                        .map(|l| serde_json::to_string(l).expect("ledger serialises"));
                    store.close_round(&ClosedRound {
                        task: self.id,
                        round: c.round,
                        model: id,
                        model_size: model.len() as u64,
                        closed: c.closed,
                        server_state: server_state_bytes(self.core.server_state()),
                        ledger: ledger_json,
                        clip_norm: self.core.clip_norm(),
                        basis: c.basis,
                        history: self.core.history(),
                        epsilon: c.epsilon,
                        participants: &c.participants,
                        state: c.state,
                        note: c.note.as_deref(),
                        applied: c.applied,
                    })?;
                    metrics.round_closed(now.saturating_sub(self.round_started) as f64 / 1000.0);
                    metrics.updates_bounded += c.bounded as u64;
                    self.model_ref = ObjectRef {
                        id,
                        size: model.len() as u64,
                    };
                    self.model = std::sync::Arc::new(model);
                    self.uploads.clear();
                    self.reset_secure();
                    self.round_started = now;
                    log.push(Outcome::Closed {
                        round: c.round,
                        reports: c.reports,
                        epsilon: c.epsilon,
                        bounded: c.bounded,
                        model: id,
                    });
                    if c.state == TaskState::Stopped {
                        log.push(Outcome::Ended(c.state, c.note));
                    }
                }
                Effect::Abandoned { round, reason } => {
                    store.abandon_round(self.id, round, &reason)?;
                    metrics.rounds_abandoned += 1;
                    self.uploads.clear();
                    self.reset_secure();
                    self.round_started = now;
                    log.push(Outcome::Abandoned { round, reason });
                }
                Effect::Finished => log.push(Outcome::Ended(TaskState::Finished, None)),
                Effect::SecureSend {
                    device: d, message, ..
                } => {
                    self.secure.outbox.insert(d, message);
                    self.secure.ready.push(d);
                }
                Effect::SecureRefused { device: d, reason } => {
                    metrics.reject("secure");
                    self.secure.members.remove(&d);
                    self.secure.masked.remove(&d);
                    self.secure.outbox.remove(&d);
                    let reason = format!("secure aggregation: {reason}");
                    if Some(d) == device {
                        reply = Some(refuse(ErrorCode::UpdateRejected, reason));
                    } else {
                        self.secure.refused.insert(d, reason);
                        self.secure.ready.push(d);
                    }
                }
            }
        }
        Ok(reply)
    }
}

/// Moves a stored update that can no longer be aggregated aside, and says so.
fn quarantine(
    store: &mut Store,
    task: u64,
    round: u64,
    device: u64,
    why: &str,
) -> Result<(), StoreError> {
    store.quarantine_update(task, round, device, why)?;
    tracing::warn!(
        task,
        "task {task} round {round}: the stored update of device {device} was quarantined: {why}"
    );
    Ok(())
}

#[cfg(test)]
mod tests;
