//! The QUIC driver: accepts connections, tells devices, administrators and
//! enrolling newcomers apart by their certificates, greets them, hands each
//! request to the [`App`] and sends its answer. It also owns the clock, the
//! live connections, the ticker and the artifact builder.
//!
//! Each connection carries one bidirectional stream of request and answer
//! frames. A connection without a client certificate may only enroll; a
//! device certificate may only take part in rounds; an admin certificate may
//! only administer. Revoking a device adds its serial to the TLS verifier's
//! list (refused at the next handshake) and closes its live connections.
//!
//! All decisions sit in [`App`], on its own thread ([`Worker`]): the
//! runtime, multi-threaded in `coordinator serve`, carries only network I/O,
//! so a long round close or a slow fsync delays answers but never the
//! endpoint. The [`Effect`]s a call leaves are carried out on that thread
//! right after the call.
//!
//! Against hostile peers and load (see `docs/security.md` and [`Limits`]):
//! live connections are capped in all, without a certificate and per
//! device; beyond a share of the cap a new connection must prove its
//! address first; a connection without a certificate has a deadline to
//! enroll in and small frames; every answer has a send timeout; a
//! connection's requests are paced. The transport itself (one stream per
//! connection, windows of one frame) is `fleet_protocol::tls::server_transport`.
//!
//! The ticker, the artifact builder, the metrics listener and the App's
//! thread are supervised: if one of them panics, [`Coordinator::serve`] closes the
//! endpoint and returns the error, so the process exits with a failure and
//! its supervisor (systemd) restarts it from the store, which holds every
//! acknowledged state. A coordinator that keeps serving with a dead clock
//! would never close a round again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, ObjectId, ObjectRef};
use fleet_protocol::stream::{StreamError, recv, send};
use fleet_protocol::tls::{Role, peer_role, server_config};
use fleet_protocol::transfer::chunks;
use fleet_protocol::{ErrorCode, MAX_FRAME, WireError, check_peer_version};
use serde::Serialize;
use tokio::sync::{Mutex, Notify};
use tracing::{Instrument, error, info, info_span, warn};

use crate::app::{
    Admission, App, ArtifactJob, DeploymentAnswer, Effect, Fetchable, RelayReply, TaskAnswer,
    describe,
};
use crate::home::Home;
use crate::limits::{ANONYMOUS_FRAME, ENROLL_ATTEMPTS, Gauge, Limits, Pace, PerAddress};
use crate::runner::refuse;
use crate::store::StoreError;
use crate::worker::Worker;

/// Application close codes (defined in the protocol crate, shared with agents).
pub use fleet_protocol::close;

/// How often the running task's deadlines and the drift monitor are looked at.
const TICK: Duration = Duration::from_millis(50);

/// A coordinator bound to its home directory.
pub struct Coordinator {
    /// The App, on its own thread.
    app: Worker,
    /// What the App's thread and the driver share.
    shared: Arc<Shared>,
    started: Instant,
    /// Added to the clock by [`Coordinator::advance_clock`] (tests only).
    skew_ms: std::sync::atomic::AtomicU64,
    server_config: quinn::ServerConfig,
    /// Held while one model's artifacts are built (one build at a time).
    build_lock: Mutex<()>,
    /// Connection and request limits.
    limits: Limits,
    /// Live connections (handshakes included).
    open_all: Arc<Gauge>,
    /// Live connections without a client certificate.
    open_anonymous: Arc<Gauge>,
    /// Live connections without a certificate, by source address.
    anonymous_sources: Arc<PerAddress>,
    /// Connections refused or closed by a limit, by reason (kept off the
    /// App's lock so that refusing stays cheap).
    refused: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

/// What the App's thread needs to carry out effects.
#[derive(Default)]
struct Shared {
    /// Live connections per device, to close on revocation.
    connections: std::sync::Mutex<HashMap<u64, Vec<quinn::Connection>>>,
    /// Wakes the artifact builder when the app queued a build.
    build_wake: Notify,
    /// Secure aggregation: wakes a device's held poll when a message waits
    /// for it (one per device that has polled, until its connection ends).
    secure_waiters: std::sync::Mutex<HashMap<u64, Arc<Notify>>>,
    /// Wakes a connection waiting for the answer to its relayed request,
    /// by request id (one per request in flight).
    relay_waiters: std::sync::Mutex<HashMap<u64, Arc<Notify>>>,
}

impl Shared {
    fn carry_out(&self, effect: Effect) {
        match effect {
            Effect::Disconnect {
                device,
                code,
                reason,
            } => {
                let conns = self.live().remove(&device).unwrap_or_default();
                for conn in conns {
                    conn.close(code.into(), reason.as_bytes());
                }
            }
            Effect::WakeBuilder => self.build_wake.notify_one(),
            Effect::RelayReady(ids) => {
                let waiters = self.relays();
                for id in ids {
                    if let Some(w) = waiters.get(&id) {
                        w.notify_one();
                    }
                }
            }
            Effect::SecureReady(devices) => {
                let waiters = self.waiters();
                for d in devices {
                    if let Some(w) = waiters.get(&d) {
                        // Stored as a permit when the device is not
                        // waiting yet: no wake-up is lost.
                        w.notify_one();
                    }
                }
            }
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        // Each change is one insert or removal: a poisoned lock is used as is.
        self.secure_waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn relays(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Notify>>> {
        self.relay_waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The waiter of `device`'s secure-aggregation polls.
    fn secure_waiter(&self, device: u64) -> Arc<Notify> {
        self.waiters().entry(device).or_default().clone()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<quinn::Connection>>> {
        // A panic while the map is held cannot leave it inconsistent (each
        // change is one insert or removal), so a poisoned lock is used as is.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why a reply could not be sent.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The peer did not take it within the send timeout.
    #[error("the peer did not take an answer within {0:?}")]
    TimedOut(Duration),
    /// The stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
}

/// Sends `msg` as the stream's last frame and waits (at most `limit`)
/// until the peer has it: closing the connection right after sending would
/// drop a refusal still in flight.
async fn send_last<T: Serialize>(tx: &mut quinn::SendStream, msg: &T, limit: Duration) {
    if send_within(tx, msg, limit).await.is_ok() && tx.finish().is_ok() {
        let _ = tokio::time::timeout(limit, tx.stopped()).await;
    }
}

/// Sends `msg`, giving up after `limit`.
async fn send_within<T: Serialize>(
    tx: &mut quinn::SendStream,
    msg: &T,
    limit: Duration,
) -> Result<(), SendError> {
    tokio::time::timeout(limit, send(tx, msg))
        .await
        .map_err(|_| SendError::TimedOut(limit))?
        .map_err(SendError::from)
}

/// How long a connection waits for the answer to a request relayed to the
/// replica running the task (which, when it just died, another replica
/// takes over within the lease's lifetime, [`crate::app::LEASE_TTL_MS`]).
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);

/// A device whose relayed check-in was not answered comes back after this.
const RELAY_RETRY_MS: u64 = 1_000;

/// Why a device's connection is closed when its relayed request was not
/// answered in time.
const RELAY_UNANSWERED: &str =
    "the replica running the task did not answer in time, or lost this exchange";

impl Coordinator {
    /// Opens the coordinator in `home`, resuming a running task if there is one.
    pub fn open(home: &Home) -> Result<Self, String> {
        let limits = home.settings()?.limits;
        limits.validate()?;
        // Opened on a thread of its own: the PostgreSQL client blocks on a
        // runtime of its own, which cannot run inside this one.
        let app = std::thread::scope(|s| {
            s.spawn(|| App::open(home))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        let (cert, key) = home.server_identity()?;
        let mut server_config = server_config(app.ca().cert(), cert, key, app.revocations())
            .map_err(|e| e.to_string())?;
        // Handshakes waiting to be looked at: a few per connection slot.
        server_config.max_incoming(2 * limits.max_connections);
        let shared = Arc::new(Shared::default());
        let effects = shared.clone();
        let app = Worker::spawn(app, move |effect| effects.carry_out(effect))
            .map_err(|e| format!("cannot start the coordinator's decision thread: {e}"))?;
        Ok(Self {
            app,
            shared,
            started: Instant::now(),
            skew_ms: Default::default(),
            server_config,
            build_lock: Mutex::new(()),
            limits,
            open_all: Arc::default(),
            open_anonymous: Arc::default(),
            anonymous_sources: Arc::default(),
            refused: Default::default(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Live connections: in all (handshakes included), and without a certificate.
    pub fn open_connections(&self) -> (usize, usize) {
        (self.open_all.get(), self.open_anonymous.get())
    }

    /// Counts a connection refused or closed by a limit.
    fn refused(&self, reason: &'static str) {
        *self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason)
            .or_default() += 1;
    }

    /// The QUIC server configuration (mutual TLS with this coordinator's CA).
    pub fn server_config(&self) -> quinn::ServerConfig {
        self.server_config.clone()
    }

    /// Milliseconds since the coordinator opened: the clock of the task core.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
            + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves this coordinator's clock forward by `ms`, as if that much time
    /// had passed: round deadlines and drift windows fall due at the next
    /// tick without waiting. For tests; a deployment never calls it.
    pub fn advance_clock(&self, ms: u64) {
        self.skew_ms
            .fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `f` on the App's thread; see [`Worker::call`].
    async fn call<R: Send + 'static>(&self, f: impl FnOnce(&mut App) -> R + Send + 'static) -> R {
        self.app.call(f).await
    }

    /// Holds the App's thread for `busy`, as a long round close would, and
    /// returns when it is free again. For tests of the driver; a deployment
    /// never calls it.
    #[doc(hidden)]
    pub async fn occupy(&self, busy: Duration) {
        self.call(move |_| std::thread::sleep(busy)).await
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<quinn::Connection>>> {
        self.shared.live()
    }

    /// The metrics as Prometheus text.
    pub async fn metrics_text(&self) -> String {
        let mut metrics = self
            .call(|app| {
                let replica = app
                    .replica()
                    .map(|r| (r.name.clone(), r.role.as_str(), r.lease().map(|l| l.task)));
                let mut m = app.metrics().clone();
                m.replica = replica;
                m
            })
            .await;
        metrics.connections_open = self.open_all.get() as u64;
        metrics.anonymous_open = self.open_anonymous.get() as u64;
        metrics.connections_refused = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        metrics.render()
    }

    /// Serves `endpoint` (and Prometheus metrics on `metrics`, if given)
    /// until the endpoint is closed. Fails, after closing the endpoint, when
    /// the ticker, the artifact builder, the metrics listener or the App's
    /// thread died (a panic): the caller should exit with a failure.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        metrics: Option<tokio::net::TcpListener>,
    ) -> Result<(), String> {
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = metrics {
            let me = self.clone();
            let render = move || {
                let me = me.clone();
                async move { me.metrics_text().await }
            };
            let limits = self.limits.clone();
            tasks.spawn(async move { crate::metrics::serve(listener, &limits, render).await });
        }
        tasks.spawn(self.clone().ticker());
        tasks.spawn(self.clone().builder());
        let why = loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => incoming,
                Some(ended) = tasks.join_next() => break failure(ended),
                why = self.app.stopped() => break why,
            };
            let Some(incoming) = incoming else {
                tasks.shutdown().await;
                return Ok(());
            };
            self.incoming(incoming);
        };
        error!("{why}; closing the endpoint and stopping (restart to resume from the store)");
        endpoint.close(close::SHUTDOWN.into(), b"internal error: restarting");
        tasks.shutdown().await;
        Err(why)
    }

    /// Admits a new connection or refuses it, before any cryptography when
    /// at the cap, and asks unproven addresses for a retry when loaded.
    fn incoming(self: &Arc<Self>, incoming: quinn::Incoming) {
        let live = self.open_all.get();
        if live >= self.limits.retry_above
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            self.refused("retry");
            // The client answers with the token and comes back as a new,
            // validated incoming connection.
            let _ = incoming.retry();
            return;
        }
        let Some(slot) = self.open_all.try_take(self.limits.max_connections) else {
            self.refused("connection_cap");
            incoming.refuse();
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match incoming.await {
                Ok(conn) => me.connection(conn).await,
                Err(e) => info!("handshake failed: {e}"),
            }
        });
    }

    /// Feeds the clock to the running task's deadlines and the drift watch.
    async fn ticker(self: Arc<Self>) -> std::convert::Infallible {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = self.now();
            self.call(move |app| app.tick(now)).await;
        }
    }

    /// Builds the queued models' artifacts, one at a time, for as long as
    /// the coordinator serves.
    async fn builder(self: Arc<Self>) -> std::convert::Infallible {
        loop {
            let next = self.call(|app| app.next_build()).await;
            match next {
                Some(model) => self.ensure_artifacts(model).await,
                None => self.shared.build_wake.notified().await,
            }
        }
    }

    /// Builds and records the float and int8 artifacts of `model` unless
    /// both are recorded already. The build and the object writes run on
    /// the blocking pool; the App's thread only reads the model and records
    /// the result.
    pub async fn ensure_artifacts(&self, model: ObjectId) {
        let _one_at_a_time = self.build_lock.lock().await;
        let job = self.call(move |app| app.artifact_job(&model)).await;
        let ArtifactJob::Build {
            spec,
            params,
            version,
            objects,
        } = job
        else {
            return;
        };
        let started = Instant::now();
        let name = spec.name();
        let work = tokio::task::spawn_blocking(move || {
            let built = crate::artifacts::build(&spec, &params, version);
            let mut rows = Vec::new();
            for (variant, result) in built.variants() {
                let row = match result {
                    Ok(a) => Ok(ObjectRef {
                        id: objects.put(&a.onnx)?,
                        size: a.onnx.len() as u64,
                    }),
                    Err(e) => Err(e.clone()),
                };
                rows.push((variant, row));
            }
            Ok::<_, StoreError>(rows)
        })
        .await;
        let took = started.elapsed();
        match work {
            Ok(Ok(rows)) => {
                self.call(move |app| app.record_artifacts(&model, &rows, &name, version, took))
                    .await
            }
            Ok(Err(e)) => {
                self.call(move |app| app.artifacts_unwritable(&model, &e))
                    .await
            }
            Err(e) => warn!("model {model}: artifact build failed: {e}"),
        }
    }

    /// The answer to `GetDeployment`: the deployed model with the artifact
    /// of the variant its task chose, built first if it is missing.
    async fn deployment_reply(&self) -> CoordinatorMessage {
        let mut built = false;
        loop {
            let answer = self.call(|app| app.deployment()).await;
            match answer {
                DeploymentAnswer::Reply(reply) => return *reply,
                DeploymentAnswer::Build(model) if !built => {
                    self.ensure_artifacts(model).await;
                    built = true;
                }
                DeploymentAnswer::Build(model) => {
                    return crate::app::artifacts_unavailable(&model);
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection) {
        match peer_role(&conn) {
            Ok((Role::Device(id), serial)) => {
                self.device(conn, id, serial)
                    .instrument(info_span!("device", id))
                    .await
            }
            Ok((Role::Admin(name), serial)) => {
                if !self.call(move |app| app.admin_allowed(&serial)).await {
                    self.refused("admin_not_allowed");
                    return conn.close(
                        close::REVOKED.into(),
                        b"this administrator certificate is revoked or unknown: get a new one \
                          (coordinator admins issue, on the coordinator's host)",
                    );
                }
                let span = info_span!("admin", %name);
                self.admin(conn, &name).instrument(span).await
            }
            Ok((Role::Coordinator, _)) => conn.close(
                close::FORBIDDEN.into(),
                b"a coordinator certificate cannot act as a client",
            ),
            // No certificate: the only thing such a client may do is enroll,
            // within a deadline, and only so many at once.
            Err(_) => {
                let Some(_slot) = self.open_anonymous.try_take(self.limits.max_anonymous) else {
                    self.refused("anonymous_cap");
                    return conn.close(
                        close::BUSY.into(),
                        b"too many connections without a certificate: try again later",
                    );
                };
                let Some(_from) = self.anonymous_sources.try_take(
                    conn.remote_address().ip(),
                    self.limits.anonymous_per_address,
                ) else {
                    self.refused("address_cap");
                    return conn.close(
                        close::BUSY.into(),
                        b"too many connections without a certificate from this address: try again later",
                    );
                };
                let deadline = self.limits.enroll();
                if tokio::time::timeout(deadline, self.enrollment(&conn))
                    .await
                    .is_err()
                {
                    self.refused("enroll_deadline");
                    conn.close(
                        close::BUSY.into(),
                        b"enrollment not completed in time: try again",
                    );
                }
            }
        }
    }

    /// A connection without a certificate: `Hello`, then at most
    /// [`ENROLL_ATTEMPTS`] enrollments, in frames of at most
    /// [`ANONYMOUS_FRAME`] bytes.
    async fn enrollment(&self, conn: &quinn::Connection) {
        let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
            return;
        };
        let mut greeted = false;
        let mut attempts = 0;
        let mut pace = Pace::new(self.limits.requests_per_sec, self.limits.request_burst);
        loop {
            pace.take().await;
            let msg = match recv::<AgentMessage>(&mut rx, ANONYMOUS_FRAME).await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => return,
            };
            let reply = match msg {
                AgentMessage::Hello {
                    version,
                    min_version,
                    ..
                } => hello(version, min_version, &mut greeted),
                _ if !greeted => refuse(ErrorCode::Malformed, "send Hello first"),
                AgentMessage::Enroll { .. } if attempts >= ENROLL_ATTEMPTS => {
                    self.refused("enroll_attempts");
                    let _ = send_within(
                        &mut tx,
                        &refuse(
                            ErrorCode::UnknownDevice,
                            "too many enrollment attempts on one connection",
                        ),
                        self.limits.send_timeout(),
                    )
                    .await;
                    return conn.close(close::BUSY.into(), b"too many enrollment attempts");
                }
                AgentMessage::Enroll { token, csr } => {
                    attempts += 1;
                    self.call(move |app| app.enroll(&token, &csr)).await
                }
                _ => self.call(|app| app.uncertified()).await,
            };
            if send_within(&mut tx, &reply, self.limits.send_timeout())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    async fn device(&self, conn: quinn::Connection, device: u64, serial: Vec<u8>) {
        // Listed before admission, so that a revocation between the two
        // closes it too.
        let listed = {
            let mut live = self.live();
            let list = live.entry(device).or_default();
            list.push(conn.clone());
            list.len()
        };
        if listed > self.limits.per_device {
            self.forget(device, &conn);
            self.refused("device_cap");
            return conn.close(
                close::BUSY.into(),
                b"too many connections for this device: try again later",
            );
        }
        let admitted_serial = serial.clone();
        let admission = self
            .call(move |app| app.connect(device, &admitted_serial))
            .await;
        let refused = match admission {
            Admission::Admitted => None,
            Admission::Refused => Some((
                close::REVOKED,
                "device unknown or revoked, or not this certificate's: enroll again",
            )),
            Admission::StorageFailed => Some((
                close::SHUTDOWN,
                "the coordinator's storage failed: try again later",
            )),
        };
        if let Some((code, reason)) = refused {
            self.forget(device, &conn);
            return conn.close(code.into(), reason.as_bytes());
        }
        let result = self.device_session(&conn, device, serial).await;
        let normal_close = matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::DONE.into()
        );
        if let Err(e) = &result
            && e.downcast_ref::<SendError>()
                .is_some_and(|e| matches!(e, SendError::TimedOut(_)))
        {
            self.refused("send_timeout");
            conn.close(close::BUSY.into(), b"answers were not taken in time");
        }
        if let Err(e) = result
            && !normal_close
        {
            info!("connection ended: {e}");
        }
        self.forget(device, &conn);
        self.call(move |app| app.disconnect(device)).await;
    }

    /// Removes `conn` from `device`'s live connections (and the device's
    /// poll waiter with its last one).
    fn forget(&self, device: u64, conn: &quinn::Connection) {
        let mut live = self.live();
        if let Some(list) = live.get_mut(&device) {
            list.retain(|c| c.stable_id() != conn.stable_id());
            if list.is_empty() {
                live.remove(&device);
            }
        }
        if !live.contains_key(&device) {
            self.shared.waiters().remove(&device);
        }
    }

    /// A secure-aggregation request. A poll that finds nothing waiting is
    /// held until a message waits for the device or the exchange ends (the
    /// App wakes it, [`Effect::SecureReady`]), at most the poll interval
    /// the answer names, and then answered: the device learns of the next
    /// stage at once instead of at its next poll. An answer to a message
    /// is never held. `None`: relayed to the task's replica, which did not
    /// answer in time.
    async fn secure(
        &self,
        device: u64,
        task: u64,
        round: u64,
        message: Option<fleet_secagg::DeviceMessage>,
    ) -> Option<CoordinatorMessage> {
        let poll = message.is_none();
        let waiter = self.shared.secure_waiter(device);
        let now = self.now();
        let msg = AgentMessage::Secure {
            task,
            round,
            message,
        };
        let answer = self
            .call(move |app| app.task_request(device, msg, now))
            .await;
        let reply = match answer {
            TaskAnswer::Now(reply) => *reply,
            // Relayed: the owner holds no poll for this replica.
            TaskAnswer::Relayed(id) => return self.relayed(id).await,
            TaskAnswer::Unavailable => return None,
        };
        let hold = match reply {
            CoordinatorMessage::Secure {
                message: None,
                after_ms,
            } if poll && after_ms > 0 => Duration::from_millis(after_ms),
            other => return Some(other),
        };
        let until = tokio::time::Instant::now() + hold;
        // A wake-up may be stale (a permit left by an earlier message):
        // look again, and wait on while nothing is there.
        while tokio::time::timeout_at(until, waiter.notified())
            .await
            .is_ok()
        {
            let now = self.now();
            let reply = self
                .call(move |app| app.secure(device, task, round, None, now))
                .await;
            if !matches!(reply, CoordinatorMessage::Secure { message: None, .. }) {
                return Some(reply);
            }
        }
        Some(CoordinatorMessage::Secure {
            message: None,
            after_ms: 0,
        })
    }

    /// A device's request to the running task (see [`App::task_request`]):
    /// its answer, from here or from the replica running the task; `None`
    /// when that replica did not answer within [`RELAY_TIMEOUT`].
    async fn task_request(
        &self,
        device: u64,
        msg: AgentMessage,
        now: u64,
    ) -> Option<CoordinatorMessage> {
        match self
            .call(move |app| app.task_request(device, msg, now))
            .await
        {
            TaskAnswer::Now(reply) => Some(*reply),
            TaskAnswer::Relayed(id) => self.relayed(id).await,
            TaskAnswer::Unavailable => None,
        }
    }

    /// Waits for the answer to relayed request `id`, at most
    /// [`RELAY_TIMEOUT`]; `None` when there is none to send (timed out, or
    /// [`RelayReply::Restart`]).
    async fn relayed(&self, id: u64) -> Option<CoordinatorMessage> {
        let waiter = self.shared.relays().entry(id).or_default().clone();
        let until = tokio::time::Instant::now() + RELAY_TIMEOUT;
        let reply = loop {
            match self.call(move |app| app.take_relay_reply(id)).await {
                Some(RelayReply::Answer(reply)) => break Some(*reply),
                Some(RelayReply::Restart) => break None,
                None => {}
            }
            if tokio::time::timeout_at(until, waiter.notified())
                .await
                .is_err()
            {
                self.call(move |app| app.forget_relay(id)).await;
                break None;
            }
        };
        self.shared.relays().remove(&id);
        reply
    }

    async fn device_session(
        &self,
        conn: &quinn::Connection,
        device: u64,
        serial: Vec<u8>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (mut tx, mut rx) = conn.accept_bi().await?;
        let mut greeted = false;
        let limit = self.limits.send_timeout();
        let mut pace = Pace::new(self.limits.requests_per_sec, self.limits.request_burst);
        loop {
            pace.take().await;
            let msg = match recv::<AgentMessage>(&mut rx, MAX_FRAME).await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(StreamError::Frame(e)) => {
                    // A malformed or oversized frame: say why, count it, end the stream.
                    let wire = e.to_wire();
                    let code = wire.code;
                    self.call(move |app| app.frame_refused(code)).await;
                    warn!("unreadable frame: {wire}");
                    send_last(&mut tx, &CoordinatorMessage::Error(wire), limit).await;
                    return Ok(());
                }
                Err(e) => return Err(Box::new(e)),
            };
            let now = self.now();
            let reply = match msg {
                AgentMessage::Hello {
                    version,
                    min_version,
                    ..
                } => hello(version, min_version, &mut greeted),
                _ if !greeted => refuse(ErrorCode::Malformed, "send Hello first"),
                AgentMessage::Enroll { .. } => {
                    refuse(ErrorCode::Malformed, "this device is already enrolled")
                }
                AgentMessage::Renew { csr } => {
                    let serial = serial.clone();
                    self.call(move |app| app.renew(device, &serial, &csr)).await
                }
                msg @ AgentMessage::CheckIn { .. } => {
                    match self.task_request(device, msg, now).await {
                        Some(reply) => reply,
                        // The task's replica did not answer: come back.
                        None => CoordinatorMessage::ComeBackLater {
                            after_ms: RELAY_RETRY_MS,
                        },
                    }
                }
                AgentMessage::GetDriftSpec => self.call(|app| app.drift_spec()).await,
                AgentMessage::DriftReport(report) => {
                    self.call(move |app| app.drift_report(device, &report))
                        .await
                }
                AgentMessage::GetDeployment => self.deployment_reply().await,
                AgentMessage::Fetch { object, offset } => {
                    let fetched = self.call(move |app| app.fetch(&object)).await;
                    match fetched {
                        Fetchable::Unknown => refuse(
                            ErrorCode::NoSuchRound,
                            format!(
                                "object {object} is not the current or deployed model or an \
                                 artifact of the deployed model"
                            ),
                        ),
                        Fetchable::Damaged(why) => {
                            warn!("fetch refused: {why}");
                            refuse(ErrorCode::Internal, why)
                        }
                        Fetchable::Bytes(bytes) if offset >= bytes.len() as u64 => {
                            self.call(|app| app.metrics().reject("fetch_range")).await;
                            refuse(
                                ErrorCode::Malformed,
                                format!(
                                    "offset {offset} is at or past the end of object {object} \
                                     ({} bytes)",
                                    bytes.len()
                                ),
                            )
                        }
                        Fetchable::Bytes(bytes) => {
                            let total = bytes.len() as u64;
                            let mut sent = 0;
                            for (off, data) in chunks(&bytes, offset) {
                                sent += data.len() as u64;
                                let chunk = CoordinatorMessage::Chunk {
                                    object,
                                    offset: off,
                                    total,
                                    data: data.to_vec(),
                                };
                                send_within(&mut tx, &chunk, limit).await?;
                            }
                            self.call(move |app| app.sent(sent)).await;
                            continue;
                        }
                    }
                }
                AgentMessage::Secure {
                    task,
                    round,
                    message,
                } => match self.secure(device, task, round, message).await {
                    Some(reply) => reply,
                    None => return Err(RELAY_UNANSWERED.into()),
                },
                msg @ (AgentMessage::BeginUpload(_)
                | AgentMessage::UploadChunk { .. }
                | AgentMessage::SecureChunk { .. }) => {
                    match self.task_request(device, msg, now).await {
                        Some(reply) => reply,
                        // Unanswered: the connection ends, and the device
                        // announces its update again on the next one (an
                        // error here would make it drop the update).
                        None => return Err(RELAY_UNANSWERED.into()),
                    }
                }
            };
            send_within(&mut tx, &reply, limit).await?;
        }
    }

    async fn admin(&self, conn: quinn::Connection, name: &str) {
        let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
            return;
        };
        let mut greeted = false;
        loop {
            let req = match recv::<AdminRequest>(&mut rx, MAX_FRAME).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(StreamError::Frame(e)) => {
                    let limit = self.limits.send_timeout();
                    send_last(&mut tx, &AdminResponse::Error(e.to_wire()), limit).await;
                    return;
                }
                Err(_) => return,
            };
            let reply = match req {
                AdminRequest::Hello {
                    version,
                    min_version,
                } => match check_peer_version(version, min_version) {
                    Ok(v) => {
                        greeted = true;
                        AdminResponse::HelloAck { version: v }
                    }
                    Err(e) => AdminResponse::Error(e.to_wire()),
                },
                _ if !greeted => AdminResponse::Error(WireError {
                    code: ErrorCode::Malformed,
                    message: "send Hello first".into(),
                }),
                req => {
                    let what = describe(&req);
                    if let Some(what) = &what {
                        info!("{what}");
                    }
                    let now = self.now();
                    let name = name.to_string();
                    self.call(move |app| {
                        let reply = app.administer(req, now);
                        if let Some(what) = &what {
                            app.audit(&name, what, &reply);
                        }
                        reply
                    })
                    .await
                }
            };
            if send_within(&mut tx, &reply, self.limits.send_timeout())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Why a supervised task (which never returns) ended: its panic's message.
fn failure(ended: Result<std::convert::Infallible, tokio::task::JoinError>) -> String {
    match ended {
        Ok(never) => match never {},
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            format!("an internal task panicked: {text}")
        }
        Err(e) => format!("an internal task ended: {e}"),
    }
}

fn hello(version: u16, min_version: u16, greeted: &mut bool) -> CoordinatorMessage {
    match check_peer_version(version, min_version) {
        Ok(v) => {
            *greeted = true;
            CoordinatorMessage::HelloAck { version: v }
        }
        // The peer learns why and may retry with a version we accept.
        Err(e) => CoordinatorMessage::Error(e.to_wire()),
    }
}

/// Opens `home`, binds QUIC (and metrics) and serves forever.
pub async fn run(home: Home) -> Result<(), String> {
    let settings = home.serve_settings()?;
    info!("{}", crate::runner::backend_line());
    let coordinator = Arc::new(Coordinator::open(&home)?);
    let endpoint = quinn::Endpoint::server(coordinator.server_config(), settings.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    let metrics = match settings.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?,
        ),
        None => None,
    };
    let listening = endpoint.local_addr().map_err(|e| e.to_string())?;
    match settings.metrics {
        Some(m) => info!("listening on {listening} (QUIC), metrics on http://{m}/metrics"),
        None => info!("listening on {listening} (QUIC)"),
    }
    coordinator.serve(endpoint, metrics).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervised task that panics is reported with its message (and
    /// `serve` then stops), instead of vanishing while the server goes on.
    #[tokio::test]
    async fn a_panicking_supervised_task_is_reported() {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async {
            tokio::task::yield_now().await;
            panic!("the clock broke at {}", 42);
        });
        tasks.spawn(std::future::pending::<std::convert::Infallible>());
        let ended = tasks.join_next().await.expect("a task ended");
        let why = failure(ended);
        assert!(why.contains("panicked: the clock broke at 42"), "{why}");
    }
}
