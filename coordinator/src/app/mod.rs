//! What the coordinator decides, without network I/O: the state behind the
//! server's one lock and the answers to devices' and administrators'
//! requests.
//!
//! [`App`] owns the [`Store`], the running task's [`Runner`], the drift
//! [`Watch`], the metrics and the queue of model versions whose inference
//! artifacts are to be built. The QUIC driver (`server`) owns connections
//! and streams: it greets peers, dispatches each request to one method
//! here, sends the answer, and carries out the [`Effect`]s the call left
//! (closing a revoked device's connections, waking the artifact builder).
//!
//! A storage error while serving one request answers that request with
//! `Internal` and is logged and counted; it never ends the process. One in
//! the middle of the running task's work also suspends the task (see
//! [`App::task_storage_failed`]).
//!
//! - `devices`: enrollment, admission of a device's connection, and its
//!   requests to the running task and the drift monitor;
//! - `deployments`: the deployed model, the objects devices may fetch, and
//!   the bookkeeping of artifact builds;
//! - `admin`: administrators' requests;
//! - `retraining`: following the deployment, closing drift windows and the
//!   retraining they may start.

mod admin;
mod deployments;
mod devices;
mod relay;
mod replica;
mod retraining;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use fleet_protocol::admin::TaskState;
use fleet_protocol::message::ObjectId;
use fleet_protocol::tls::{CertificateAuthority, RevocationList};
use fleet_protocol::{ErrorCode, WireError};
use tracing::{error, info, warn};

use crate::home::Home;
use crate::metrics::Metrics;
use crate::runner::{Io, Outcome, Runner};
use crate::store::{Engine, Store, StoreError};
use crate::watch::Watch;

pub use admin::describe;
pub use deployments::{
    ArtifactJob, BuiltArtifact, DeploymentAnswer, Fetchable, artifacts_unavailable,
};
pub use devices::Admission;
pub use relay::{RELAY_BATCH, RELAY_EXPIRY_MS, RelayReply, TaskAnswer};
pub use replica::{ALIVE_MS, LEASE_TTL_MS, Replica, Role};

/// Something the driver must do after a call, because it owns the I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Close every live connection of `device` with the application close
    /// `code` and `reason`.
    Disconnect {
        /// The device.
        device: u64,
        /// A close code of [`fleet_protocol::close`].
        code: u32,
        /// The reason sent with the close.
        reason: &'static str,
    },
    /// Model versions were queued for the artifact builder.
    WakeBuilder,
    /// Secure aggregation: these devices have a message waiting (or their
    /// exchange ended); answer their held polls.
    SecureReady(Vec<u64>),
    /// Answers to these relayed requests arrived ([`App::take_relay_reply`]).
    RelayReady(Vec<u64>),
}

/// The coordinator's state and decisions (see the module documentation).
pub struct App {
    store: Store,
    runner: Option<Runner>,
    metrics: Metrics,
    /// Live connections per device (the driver holds the connections).
    connected: HashMap<u64, u32>,
    revoked: Arc<RevocationList>,
    ca: CertificateAuthority,
    watch: Watch,
    /// Ticks until the deployment is looked up again (drift monitoring follows it).
    follow_in: u32,
    /// Model versions whose inference artifacts are to be built, in order.
    builds: VecDeque<ObjectId>,
    /// What the driver must do once the current call returns.
    effects: Vec<Effect>,
    /// Verified bytes of the deployed model's objects, for fetches.
    fetch_cache: deployments::FetchCache,
    /// Model versions a task keeps (`Settings::keep_models`).
    keep_models: Option<usize>,
    /// Days a device certificate is valid (`limits.device_cert_days`).
    device_cert_days: u64,
    /// Checks secure aggregation's advertisements against the CA.
    authenticator: fleet_protocol::secure::CaAuthenticator,
    /// On a shared (PostgreSQL) store: this replica and its lease.
    replica: Option<Replica>,
    /// Answers to requests relayed to the task's replica, until taken.
    relay_replies: HashMap<u64, RelayReply>,
    /// On a replica that does not run the task: the task's model last
    /// fetched, verified.
    shared_model: Option<(ObjectId, Arc<Vec<u8>>)>,
}

impl App {
    /// Opens the application state of `home`, resuming a running task if
    /// there is one and queueing the builds of model versions that lack
    /// inference artifacts.
    pub fn open(home: &Home) -> Result<Self, String> {
        let ca = home.ca()?;
        let mut store = home.open_store()?;
        let replica = (store.engine() == Engine::Postgres)
            .then(|| Replica::new(home.replica_name(), home.role()));
        if replica.is_some() {
            store.listen_relays().map_err(|e| e.to_string())?;
        }
        if let Some(r) = &replica {
            info!(
                "replica {} on the shared store {}",
                r.name,
                home.store_location()?.display()
            );
        }
        // Nothing writes objects yet: files no row names are leftovers of a
        // crash (a model written for a close that never committed, a prune
        // cut short).
        match store.sweep_objects() {
            Ok(0) => {}
            Ok(n) => info!("removed {n} object files no record names"),
            Err(e) => warn!("object files not swept: {e}"),
        }
        // A home made before administrators were recorded: its first
        // administrator's certificate becomes the first recorded one.
        if store.admins().map_err(|e| e.to_string())?.is_empty()
            && let Ok((cert, _)) = home.admin_identity()
            && let Ok((fleet_protocol::tls::Role::Admin(name), serial)) =
                fleet_protocol::tls::role_of(&cert)
        {
            store.add_admin(&name, &serial).map_err(|e| e.to_string())?;
        }
        let revoked = Arc::new(RevocationList::default());
        for serial in store.revoked_serials().map_err(|e| e.to_string())? {
            revoked.revoke(serial);
        }
        let settings = home.settings()?;
        let keep_models = settings.keep_models;
        let device_cert_days = settings.limits.device_cert_days;
        let drift = settings.drift;
        drift.thresholds.validate("drift.thresholds")?;
        let watch = Watch::new(drift.window_secs, drift.thresholds, drift.retrain);
        let mut runner = None;
        // On a shared store the running task is resumed by whichever
        // replica takes its lease (on the first tick).
        for row in store.tasks().map_err(|e| e.to_string())? {
            if row.state == TaskState::Running && replica.is_none() {
                match Runner::load(&mut store, &row, 0) {
                    Ok(r) => {
                        info!(
                            task = row.id,
                            "resuming task {} at round {} ({} closed)",
                            row.id,
                            row.round,
                            row.closed
                        );
                        runner = Some(r);
                    }
                    // A task that cannot be rebuilt from what is stored is
                    // stopped, with the reason, rather than failing every
                    // start of the coordinator. Storage errors still do.
                    Err(StoreError::Corrupt(why)) => {
                        let note = format!("could not be resumed: {why}");
                        error!(task = row.id, "task {}: {note}; stopped", row.id);
                        store
                            .set_task_state(row.id, TaskState::Stopped, Some(&note))
                            .map_err(|e| e.to_string())?;
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
        // Model versions without artifacts (a crash between a round's close
        // and the build, a store from before artifacts): built in the
        // background once serving starts, newest first.
        let builds: VecDeque<ObjectId> = store
            .models_without_artifacts()
            .map_err(|e| e.to_string())?
            .into();
        if !builds.is_empty() {
            info!(
                "{} model version(s) lack inference artifacts; building them",
                builds.len()
            );
        }
        let authenticator = fleet_protocol::secure::CaAuthenticator::new(ca.cert().clone())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            authenticator,
            store,
            runner,
            metrics: Metrics::default(),
            connected: HashMap::new(),
            revoked,
            ca,
            watch,
            follow_in: 0,
            builds,
            effects: Vec::new(),
            fetch_cache: Default::default(),
            keep_models,
            device_cert_days,
            replica,
            relay_replies: HashMap::new(),
            shared_model: None,
        })
    }

    /// The CA that issues device certificates (and verifies peers).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The revoked serials, shared with the TLS verifier.
    pub fn revocations(&self) -> Arc<RevocationList> {
        self.revoked.clone()
    }

    /// The metrics.
    pub fn metrics(&mut self) -> &mut Metrics {
        &mut self.metrics
    }

    /// The effects left by the calls since the last take, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The running task's deadlines and the drift monitor, at `now`
    /// (milliseconds on the driver's clock).
    pub fn tick(&mut self, now: u64) {
        if let Err(e) = self.watch_drift(now) {
            self.storage_failed("watching drift", &e);
        }
        self.keep_ownership(now);
        self.relay_tick(now);
        let Some(runner) = self.runner.as_mut() else {
            return;
        };
        let mut outcomes = Vec::new();
        let result = runner.tick(io(&mut self.store, &mut self.metrics, now, &mut outcomes));
        if let Err(e) = result {
            self.task_storage_failed("running the task's deadlines", &e);
        }
        self.finish_outcomes(outcomes);
    }

    /// Queues the artifacts of `model` for the builder (once).
    /// Forgets the model versions of `task` past what it keeps, once a
    /// round's close is committed (a failure costs disk space only: it is
    /// logged), and drops them from the build queue.
    fn prune_models(&mut self, task: u64) {
        let Some(keep) = self.keep_models else {
            return;
        };
        match self.store.prune_models(task, keep) {
            Ok(gone) => self.builds.retain(|m| !gone.contains(m)),
            Err(e) => warn!(task, "old model versions of task {task} not removed: {e}"),
        }
    }

    fn queue_build(&mut self, model: ObjectId) {
        if !self.builds.contains(&model) {
            self.builds.push_back(model);
            self.effects.push(Effect::WakeBuilder);
        }
    }

    /// The answer to a request whose storage failed: the failure is logged
    /// and counted, the request is answered with `Internal`, and the process
    /// goes on serving everything else.
    fn storage_failed(&mut self, what: &str, e: &StoreError) -> WireError {
        warn!("storage failed while {what}: {e}");
        self.metrics.reject("storage");
        WireError {
            code: ErrorCode::Internal,
            message: format!("the coordinator's storage failed while {what}; try again later"),
        }
    }

    /// A storage failure in the middle of the running task's work: the
    /// task's memory may now be ahead of what the store holds, so it is
    /// dropped from memory (devices are told no task runs); the store keeps
    /// the task as it was last committed, running. It resumes from there at
    /// the next start, or as soon as an operator starts it again once the
    /// storage is fixed.
    fn task_storage_failed(&mut self, what: &str, e: &StoreError) -> WireError {
        let wire = self.storage_failed(what, e);
        if self.replica.is_some() {
            if let Some(id) = self.runner.as_ref().map(Runner::id) {
                warn!(
                    task = id,
                    "the task is given up until its storage works: this replica or another \
                     takes it over from its last committed state"
                );
            }
            self.give_up_task();
            return wire;
        }
        if let Some(r) = self.runner.take() {
            let id = r.id();
            warn!(
                task = id,
                "the task is suspended until its storage works: fix it, then \
                 `coordinator tasks start {id}` (or restart the coordinator) resumes it \
                 from its last committed state"
            );
        }
        wire
    }

    /// Logs what the running task's last call did and acts on it: a closed
    /// round's model is queued for its artifacts, an ended task leaves memory.
    fn finish_outcomes(&mut self, outcomes: Vec<Outcome>) {
        let Some(task) = self.runner.as_ref().map(Runner::id) else {
            return;
        };
        let ready = self
            .runner
            .as_mut()
            .map(Runner::take_secure_ready)
            .unwrap_or_default();
        if !ready.is_empty() {
            self.effects.push(Effect::SecureReady(ready));
        }
        for o in outcomes {
            match o {
                Outcome::Closed {
                    round,
                    reports,
                    epsilon,
                    bounded,
                    model,
                } => {
                    let epsilon = epsilon.map_or(String::new(), |e| format!(", ε = {e:.4}"));
                    let bounded = match bounded {
                        0 => String::new(),
                        n => format!(" ({n} scaled down or weight-capped by the relative bound)"),
                    };
                    info!(
                        task,
                        "task {task}: round {round} closed with {reports} updates{bounded}{epsilon}"
                    );
                    // Committed already: the build runs afterwards, off this thread.
                    self.queue_build(model);
                    self.prune_models(task);
                }
                Outcome::Abandoned { round, reason } => {
                    info!(
                        task,
                        "task {task}: round {round} abandoned: {reason}; retrying"
                    );
                }
                Outcome::Ended(state, note) => {
                    let note = note.map_or(String::new(), |n| format!(": {n}"));
                    info!(task, "task {task}: {state:?}{note}");
                    // Its lease, on a shared store, is free at once.
                    self.give_up_task();
                    return;
                }
            }
        }
    }
}

/// The runner's view of one request's surroundings.
fn io<'a>(
    store: &'a mut Store,
    metrics: &'a mut Metrics,
    now: u64,
    log: &'a mut Vec<Outcome>,
) -> Io<'a> {
    Io {
        store,
        metrics,
        now,
        log,
    }
}

#[cfg(test)]
mod tests;
