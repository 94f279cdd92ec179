//! Ownership of the running task among coordinator replicas that share a
//! PostgreSQL store.
//!
//! One replica at a time runs a task's core (engine, aggregator, ledger):
//! the holder of the task's lease ([`Store::acquire_lease`]). Every second
//! (on the driver's tick) the holder renews its lease, and gives the task
//! up when the store says it no longer runs (paused or stopped through
//! another replica) or when another replica has taken the lease; a replica
//! without the task tries to take the lease of the running task and, once
//! it holds it, resumes the task from the store exactly as a restarted
//! coordinator does ([`Runner::load`]). The store is fenced with the lease,
//! so a holder that lost it (a pause longer than the lease, a partition)
//! writes nothing more of the round.
//!
//! A replica started with `--role aggregator` is preferred as the owner:
//! while one is alive (its heartbeat in the `replicas` table is recent),
//! serving replicas leave the lease to it, and a serving replica holding
//! the lease gives it up, so that rounds are aggregated on the aggregation
//! servers (with a GPU, where the `cuda` feature is built) while the others
//! serve devices.
//!
//! On the embedded SQLite store there is one process and no lease.

use fleet_protocol::admin::TaskState;
use tracing::{info, warn};

use super::App;
use crate::runner::Runner;
use crate::store::{Lease, StoreError, unix_millis, unix_secs};

/// How long a lease lasts unless renewed: a dead owner's task waits at
/// most this long (plus one check) for another replica.
pub const LEASE_TTL_MS: u64 = 5_000;

/// How often ownership is looked at (driver milliseconds).
const CHECK_EVERY_MS: u64 = 1_000;

/// A replica whose heartbeat is older than this is taken for dead (its
/// aggregator role no longer keeps the lease from the others).
pub const ALIVE_MS: u64 = 3 * CHECK_EVERY_MS;

/// What a replica is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Serves devices; runs the task when no aggregator is alive.
    #[default]
    Serve,
    /// Preferred as the task's owner (an aggregation server).
    Aggregator,
}

impl Role {
    /// Its name in the `replicas` table.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Aggregator => "aggregator",
        }
    }
}

/// This replica's part in the shared store.
#[derive(Debug)]
pub struct Replica {
    /// Its name, unique among the replicas (leases and metrics carry it).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// When it started (Unix milliseconds).
    started_at: u64,
    /// The lease of the task this replica runs, if any.
    lease: Option<Lease>,
    /// The task the store says runs (owned here or elsewhere), as last seen.
    pub(super) running: Option<u64>,
    /// Revocations up to this time (Unix seconds) are applied here.
    revocations_seen: u64,
    /// When ownership is looked at next.
    next_check: u64,
    /// When the relay tables are read next, notified or not.
    pub(super) next_relay_poll: u64,
}

impl Replica {
    /// A replica named `name` that owns nothing yet.
    pub fn new(name: String, role: Role) -> Self {
        Self {
            name,
            role,
            started_at: unix_millis(),
            lease: None,
            running: None,
            revocations_seen: unix_secs(),
            next_check: 0,
            next_relay_poll: 0,
        }
    }

    /// The lease it holds.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }
}

impl App {
    /// On a shared store, every [`CHECK_EVERY_MS`]: keeps, gives up or
    /// takes the running task's lease (see the module documentation).
    pub(super) fn keep_ownership(&mut self, now: u64) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        if now < replica.next_check {
            return;
        }
        replica.next_check = now + CHECK_EVERY_MS;
        if let Err(e) = self.own(now) {
            warn!("task ownership not checked: {e}");
        }
        self.expire_relays();
    }

    fn own(&mut self, now: u64) -> Result<(), StoreError> {
        let replica = self.replica.as_mut().expect("a shared store");
        let wall = unix_millis();
        // Revocations made through other replicas: their certificates are
        // refused at the next handshake here, their connections closed.
        let since = replica.revocations_seen.saturating_sub(2);
        replica.revocations_seen = wall / 1000;
        for (device, serials) in self.store.revoked_since(since)? {
            for serial in serials {
                self.revoked.revoke(serial);
            }
            if self.connected.remove(&device).is_some() {
                self.metrics.connected_devices = self.connected.len() as u64;
                self.effects.push(super::Effect::Disconnect {
                    device,
                    code: fleet_protocol::close::REVOKED,
                    reason: "device revoked",
                });
            }
        }
        let replica = self.replica.as_mut().expect("a shared store");
        self.store.heartbeat(
            &replica.name,
            replica.role.as_str(),
            replica.started_at,
            wall,
        )?;
        replica.running = self.store.running_task()?;
        let defer = replica.role == Role::Serve && self.aggregator_alive(wall)?;
        let replica = self.replica.as_mut().expect("a shared store");
        if let (Some(runner), Some(lease)) = (self.runner.as_ref(), replica.lease.clone()) {
            let task = runner.id();
            if replica.running != Some(task) {
                info!(task, "task {task} no longer runs: giving up its lease");
                self.give_up_task();
                return Ok(());
            }
            if defer {
                info!(
                    task,
                    "an aggregation replica is alive: handing task {task} over to it"
                );
                self.give_up_task();
                return Ok(());
            }
            match self
                .store
                .renew_lease(&lease, unix_millis(), LEASE_TTL_MS)?
            {
                Some(renewed) => replica.lease = Some(renewed),
                None => {
                    warn!(
                        task,
                        "the lease of task {task} was taken by another replica: no longer running it"
                    );
                    self.runner = None;
                    replica.lease = None;
                    self.store.fence(None);
                }
            }
            return Ok(());
        }
        if defer {
            return Ok(());
        }
        self.take_running_task(now)
    }

    /// Whether a replica of the aggregator role other than this one is
    /// alive.
    fn aggregator_alive(&self, wall: u64) -> Result<bool, StoreError> {
        let me = self.replica.as_ref().map(|r| r.name.as_str());
        Ok(self.store.replicas()?.iter().any(|r| {
            r.role == Role::Aggregator.as_str()
                && Some(r.name.as_str()) != me
                && r.seen_at + ALIVE_MS >= wall
        }))
    }

    /// Takes the lease of the task the store says runs, if it is free, and
    /// resumes the task from the store.
    pub(super) fn take_running_task(&mut self, now: u64) -> Result<(), StoreError> {
        let Some(replica) = self.replica.as_mut() else {
            return Ok(());
        };
        if self.runner.is_some() {
            return Ok(());
        }
        let Some(task) = self.store.running_task()? else {
            return Ok(());
        };
        let Some(lease) =
            self.store
                .acquire_lease(task, &replica.name, unix_millis(), LEASE_TTL_MS)?
        else {
            return Ok(());
        };
        self.store.fence(Some(lease.clone()));
        replica.lease = Some(lease.clone());
        // Read under the lease: what the previous owner last committed.
        let loaded = match self.store.task(task)? {
            Some(row) if row.state == TaskState::Running => {
                Runner::load(&mut self.store, &row, now).map(|r| (r, row))
            }
            _ => Err(StoreError::Corrupt(format!("task {task} no longer runs"))),
        };
        match loaded {
            Ok((r, row)) => {
                info!(
                    task = row.id,
                    "took the lease of task {} (epoch {}): running it from round {} ({} closed)",
                    row.id,
                    lease.epoch,
                    row.round,
                    row.closed
                );
                self.runner = Some(r);
                Ok(())
            }
            Err(e) => {
                self.give_up_task();
                Err(e)
            }
        }
    }

    /// Drops the running task and releases its lease.
    pub(super) fn give_up_task(&mut self) {
        self.runner = None;
        self.store.fence(None);
        if let Some(lease) = self.replica.as_mut().and_then(|r| r.lease.take())
            && let Err(e) = self.store.release_lease(&lease)
        {
            warn!(
                task = lease.task,
                "lease of task {} not released: {e}", lease.task
            );
        }
    }

    /// This replica's name and lease, on a shared store.
    pub fn replica(&self) -> Option<&Replica> {
        self.replica.as_ref()
    }
}
