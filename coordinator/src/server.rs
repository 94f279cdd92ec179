//! The QUIC driver: accepts connections, tells devices, administrators and
//! enrolling newcomers apart by their certificates, and feeds the running
//! task's [`Runner`] with requests and the wall clock.
//!
//! Each connection carries one bidirectional stream of request and answer
//! frames. A connection without a client certificate may only enroll; a
//! device certificate may only take part in rounds; an admin certificate may
//! only administer. Revoking a device adds its serial to the TLS verifier's
//! list (refused at the next handshake) and closes its live connections.
//!
//! All state sits behind one lock and in the [`Store`]; the lock is never
//! held across network I/O.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::admin::{
    AdminRequest, AdminResponse, BudgetInfo, TaskCommand, TaskInfo, TaskState,
};
use fleet_protocol::message::{
    AgentMessage, CoordinatorMessage, DeployedArtifact, Deployment, ObjectId, ObjectRef,
    bytes_to_params,
};
use fleet_protocol::stream::{StreamError, recv, send};
use fleet_protocol::tls::{CertificateAuthority, RevocationList, Role, peer_role, server_config};
use fleet_protocol::transfer::chunks;
use fleet_protocol::{ErrorCode, MAX_FRAME, WireError, check_peer_version};
use rand::RngCore;
use tokio::sync::{Mutex, Notify};

use crate::drift::Retrain;
use crate::home::Home;
use crate::metrics::Metrics;
use crate::runner::{Io, Outcome, Runner, refuse};
use crate::store::{ArtifactRow, Store, StoreError, unix_secs};
use crate::watch::Watch;

/// Application close codes (defined in the protocol crate, shared with agents).
pub use fleet_protocol::close;

struct Shared {
    store: Store,
    runner: Option<Runner>,
    metrics: Metrics,
    connections: HashMap<u64, Vec<quinn::Connection>>,
    revoked: Arc<RevocationList>,
    ca: CertificateAuthority,
    watch: Watch,
    /// Ticks until the deployment is looked up again (drift monitoring follows it).
    follow_in: u32,
    /// Model versions whose inference artifacts are to be built, in order.
    builds: std::collections::VecDeque<ObjectId>,
    /// Wakes the artifact builder when `builds` grows.
    build_wake: Arc<Notify>,
}

impl Shared {
    /// Queues the artifacts of `model` for the builder (once).
    fn queue_build(&mut self, model: ObjectId) {
        if !self.builds.contains(&model) {
            self.builds.push_back(model);
            self.build_wake.notify_one();
        }
    }
}

/// What a device asking for the deployment gets, or what must happen first.
enum DeploymentAnswer {
    /// The reply.
    Reply(CoordinatorMessage),
    /// The deployed model's artifacts are not built yet.
    Build(ObjectId),
}

/// An object a device asked for.
enum Fetchable {
    /// Its bytes.
    Bytes(Arc<Vec<u8>>),
    /// Not an object devices may fetch.
    Unknown,
    /// An artifact of the deployed model whose stored file is damaged or
    /// missing; it is being built again.
    Damaged(String),
}

/// A coordinator bound to its home directory.
pub struct Coordinator {
    shared: Arc<Mutex<Shared>>,
    started: Instant,
    /// Added to the clock by [`Coordinator::advance_clock`] (tests only).
    skew_ms: std::sync::atomic::AtomicU64,
    server_config: quinn::ServerConfig,
    /// Held while one model's artifacts are built (one build at a time).
    build_lock: Mutex<()>,
}

static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Silences this module's log lines (for embedders such as the simulator,
/// which runs many in one process).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn log(line: impl AsRef<str>) {
    if QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[coordinator {t:9.3}s] {}", line.as_ref());
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

/// The answer to a request whose storage failed: the failure is logged and
/// counted, the request is answered with `Internal`, and the process goes
/// on serving everything else.
fn storage_failed(s: &mut Shared, what: &str, e: &StoreError) -> WireError {
    log(format!("storage failed while {what}: {e}"));
    s.metrics.reject("storage");
    WireError {
        code: ErrorCode::Internal,
        message: format!("the coordinator's storage failed while {what}; try again later"),
    }
}

/// A storage failure in the middle of the running task's work: the task's
/// memory may now be ahead of what the store holds, so it is dropped from
/// memory (devices are told no task runs); the store keeps the task as it
/// was last committed, running. It resumes from there at the next start, or
/// as soon as an operator starts it again once the storage is fixed.
fn task_storage_failed(s: &mut Shared, what: &str, e: &StoreError) -> WireError {
    let wire = storage_failed(s, what, e);
    if let Some(r) = s.runner.take() {
        log(format!(
            "task {} is suspended until its storage works: fix it, then `coordinator tasks start {}` \
             (or restart the coordinator) resumes it from its last committed state",
            r.id(),
            r.id()
        ));
    }
    wire
}

impl Coordinator {
    /// Opens the coordinator in `home`, resuming a running task if there is one.
    pub fn open(home: &Home) -> Result<Self, String> {
        let ca = home.ca()?;
        let mut store = Store::open(home.dir()).map_err(|e| e.to_string())?;
        let revoked = Arc::new(RevocationList::default());
        for serial in store.revoked_serials().map_err(|e| e.to_string())? {
            revoked.revoke(serial);
        }
        let (cert, key) = home.server_identity()?;
        let server_config =
            server_config(ca.cert(), cert, key, revoked.clone()).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let settings = home.settings()?;
        let drift = settings.drift;
        drift.thresholds.validate("drift.thresholds")?;
        let watch = Watch::new(drift.window_secs, drift.thresholds, drift.retrain);
        let mut runner = None;
        for row in store.tasks().map_err(|e| e.to_string())? {
            if row.state == TaskState::Running {
                let r = Runner::load(&mut store, &row, 0).map_err(|e| e.to_string())?;
                log(format!(
                    "resuming task {} at round {} ({} closed)",
                    row.id, row.round, row.closed
                ));
                runner = Some(r);
            }
        }
        // Model versions without artifacts (a crash between a round's close
        // and the build, a store from before artifacts): built in the
        // background once serving starts, newest first.
        let builds: std::collections::VecDeque<ObjectId> = store
            .models_without_artifacts()
            .map_err(|e| e.to_string())?
            .into();
        if !builds.is_empty() {
            log(format!(
                "{} model version(s) lack inference artifacts; building them",
                builds.len()
            ));
        }
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                store,
                runner,
                metrics: Metrics::default(),
                connections: HashMap::new(),
                revoked,
                ca,
                watch,
                follow_in: 0,
                builds,
                build_wake: Arc::new(Notify::new()),
            })),
            started,
            skew_ms: Default::default(),
            server_config,
            build_lock: Mutex::new(()),
        })
    }

    /// The QUIC server configuration (mutual TLS with this coordinator's CA).
    pub fn server_config(&self) -> quinn::ServerConfig {
        self.server_config.clone()
    }

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

    /// The metrics as Prometheus text.
    pub async fn metrics_text(&self) -> String {
        self.shared.lock().await.metrics.render()
    }

    /// Serves `endpoint` (and Prometheus metrics on `metrics`, if given)
    /// until the endpoint is closed.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        metrics: Option<tokio::net::TcpListener>,
    ) {
        if let Some(listener) = metrics {
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let text = me.metrics_text().await;
                    tokio::spawn(crate::metrics::answer(stream, move || text));
                }
            });
        }
        let ticker = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tick.tick().await;
                    me.tick().await;
                }
            })
        };
        let builder = tokio::spawn(self.clone().builder());
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => me.connection(conn).await,
                    Err(e) => log(format!("handshake failed: {e}")),
                }
            });
        }
        ticker.abort();
        builder.abort();
    }

    /// Builds the queued models' artifacts, one at a time, for as long as
    /// the coordinator serves.
    async fn builder(self: Arc<Self>) {
        loop {
            let (next, wake) = {
                let mut s = self.shared.lock().await;
                (s.builds.pop_front(), s.build_wake.clone())
            };
            match next {
                Some(model) => self.ensure_artifacts(model).await,
                None => wake.notified().await,
            }
        }
    }

    /// Builds and records the float and int8 artifacts of `model` unless
    /// both are recorded already. The build and the object writes run on
    /// the blocking pool; the lock is taken only to read the model and to
    /// record the result.
    pub async fn ensure_artifacts(&self, model: ObjectId) {
        let _one_at_a_time = self.build_lock.lock().await;
        let short = &model.to_string()[..12];
        let (job, objects) = {
            let mut s = self.shared.lock().await;
            match artifact_job(&s.store, &model) {
                Ok(job) => (job, s.store.object_dir()),
                Err(e) => {
                    storage_failed(&mut s, &format!("reading model {short}"), &e);
                    return;
                }
            }
        };
        let (spec, params, version) = match job {
            ArtifactJob::Done => return,
            ArtifactJob::Unusable(reason) => {
                log(format!("model {short}: no inference artifacts: {reason}"));
                let rows = [
                    (fleet_models::export::Variant::Float, Err(reason.clone())),
                    (fleet_models::export::Variant::Int8, Err(reason)),
                ];
                let mut s = self.shared.lock().await;
                if let Err(e) = s.store.put_artifacts(&model, &rows) {
                    storage_failed(&mut s, &format!("recording model {short}'s artifacts"), &e);
                }
                return;
            }
            ArtifactJob::Build {
                spec,
                params,
                version,
            } => (spec, params, version),
        };
        let started = Instant::now();
        let name = spec.name();
        let work = tokio::task::spawn_blocking(move || {
            let built = crate::artifacts::build(&spec, &params, version);
            let mut rows = Vec::new();
            for (variant, result) in built.variants() {
                let row = match result {
                    Ok(a) => ObjectRef {
                        id: objects.put(&a.onnx)?,
                        size: a.onnx.len() as u64,
                    },
                    Err(e) => {
                        rows.push((variant, Err(e.clone())));
                        continue;
                    }
                };
                rows.push((variant, Ok(row)));
            }
            Ok::<_, StoreError>(rows)
        })
        .await;
        let rows = match work {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                let what = format!("writing model {short}'s artifacts");
                storage_failed(&mut *self.shared.lock().await, &what, &e);
                return;
            }
            Err(e) => {
                log(format!("model {short}: artifact build failed: {e}"));
                return;
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let mut s = self.shared.lock().await;
        if let Err(e) = s.store.put_artifacts(&model, &rows) {
            storage_failed(&mut s, &format!("recording model {short}'s artifacts"), &e);
            return;
        }
        let summary: Vec<String> = rows
            .iter()
            .map(|(variant, r)| match r {
                Ok(o) => format!("{variant} {} ({} bytes)", &o.id.to_string()[..12], o.size),
                Err(e) => format!("{variant} not built: {e}"),
            })
            .collect();
        log(format!(
            "model {short} ({name} v{version}): artifacts {} in {secs:.2} s",
            summary.join(", ")
        ));
    }

    /// The answer to `GetDeployment`: the deployed model with the artifact
    /// of the variant its task chose, built first if it is missing.
    async fn deployment_reply(&self) -> CoordinatorMessage {
        let mut built = false;
        loop {
            let answer = {
                let mut s = self.shared.lock().await;
                match deployment(&s) {
                    Ok(answer) => answer,
                    Err(e) => {
                        let wire = storage_failed(&mut s, "reading the deployment", &e);
                        return CoordinatorMessage::Error(wire);
                    }
                }
            };
            match answer {
                DeploymentAnswer::Reply(reply) => return reply,
                DeploymentAnswer::Build(model) if !built => {
                    self.ensure_artifacts(model).await;
                    built = true;
                }
                DeploymentAnswer::Build(model) => {
                    return refuse(
                        ErrorCode::Internal,
                        format!(
                            "the inference artifacts of deployed model {} are not available; \
                             ask again later",
                            &model.to_string()[..12]
                        ),
                    );
                }
            }
        }
    }

    async fn tick(&self) {
        let now = self.now();
        let mut s = self.shared.lock().await;
        let s = &mut *s;
        if let Err(e) = watch_drift(s, now) {
            storage_failed(s, "watching drift", &e);
        }
        let Some(runner) = s.runner.as_mut() else {
            return;
        };
        let mut outcomes = Vec::new();
        if let Err(e) = runner.tick(io(&mut s.store, &mut s.metrics, now, &mut outcomes)) {
            task_storage_failed(s, "running the task's deadlines", &e);
        }
        finish_outcomes(s, outcomes);
    }

    async fn connection(self: Arc<Self>, conn: quinn::Connection) {
        match peer_role(&conn) {
            Ok((Role::Device(id), _)) => self.device(conn, id).await,
            Ok((Role::Admin(name), _)) => self.admin(conn, name).await,
            Ok((Role::Coordinator, _)) => conn.close(
                close::FORBIDDEN.into(),
                b"a coordinator certificate cannot act as a client",
            ),
            // No certificate: the only thing such a client may do is enroll.
            Err(_) => self.enrollment(conn).await,
        }
    }

    async fn enrollment(&self, conn: quinn::Connection) {
        let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
            return;
        };
        let mut greeted = false;
        while let Ok(Some(msg)) = recv::<AgentMessage>(&mut rx, MAX_FRAME).await {
            let reply = match msg {
                AgentMessage::Hello {
                    version,
                    min_version,
                    ..
                } => hello(version, min_version, &mut greeted),
                _ if !greeted => refuse(ErrorCode::Malformed, "send Hello first"),
                AgentMessage::Enroll { token, csr } => {
                    let mut s = self.shared.lock().await;
                    let s = &mut *s;
                    let ca = &s.ca;
                    let result = s.store.enroll(&token, |id| {
                        let cert = ca.issue_device(&csr, id, 3650)?;
                        let (_, serial) = fleet_protocol::tls::role_of(&cert)?;
                        Ok::<_, fleet_protocol::tls::TlsError>((cert.to_vec(), serial))
                    });
                    match result {
                        Ok(Ok((device, certificate))) => {
                            s.metrics.enrollments += 1;
                            log(format!("device {device} enrolled"));
                            CoordinatorMessage::Enrolled {
                                device,
                                certificate,
                            }
                        }
                        Ok(Err(reason)) => {
                            s.metrics.reject("enrollment");
                            refuse(ErrorCode::UnknownDevice, reason)
                        }
                        Err(e) => CoordinatorMessage::Error(storage_failed(s, "enrolling", &e)),
                    }
                }
                _ => {
                    self.shared.lock().await.metrics.reject("no_certificate");
                    refuse(
                        ErrorCode::UnknownDevice,
                        "no device certificate: enroll first (edge-agent enroll)",
                    )
                }
            };
            if send(&mut tx, &reply).await.is_err() {
                return;
            }
        }
    }

    async fn device(&self, conn: quinn::Connection, device: u64) {
        {
            let mut s = self.shared.lock().await;
            match s.store.device_active(device) {
                Ok(true) => {}
                Ok(false) => {
                    s.metrics.reject("unknown_device");
                    drop(s);
                    conn.close(
                        close::REVOKED.into(),
                        b"device unknown or revoked: enroll again",
                    );
                    return;
                }
                Err(e) => {
                    storage_failed(&mut s, &format!("checking device {device}"), &e);
                    drop(s);
                    conn.close(
                        close::SHUTDOWN.into(),
                        b"the coordinator's storage failed: try again later",
                    );
                    return;
                }
            }
            if let Err(e) = s.store.touch_device(device) {
                storage_failed(&mut s, &format!("recording device {device}'s visit"), &e);
            }
            s.connections.entry(device).or_default().push(conn.clone());
            s.metrics.connected_devices = s.connections.len() as u64;
        }
        let result = self.device_session(&conn, device).await;
        let normal_close = matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::DONE.into()
        );
        if let Err(e) = result
            && !normal_close
        {
            log(format!("device {device}: {e}"));
        }
        let mut s = self.shared.lock().await;
        // A lost connection is not a drop-out: devices on mobile networks
        // reconnect and resume their uploads; the reporting deadline bounds
        // how long a round waits for them.
        if let Some(list) = s.connections.get_mut(&device) {
            list.retain(|c| c.stable_id() != conn.stable_id());
            if list.is_empty() {
                s.connections.remove(&device);
            }
        }
        s.metrics.connected_devices = s.connections.len() as u64;
    }

    async fn device_session(
        &self,
        conn: &quinn::Connection,
        device: u64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (mut tx, mut rx) = conn.accept_bi().await?;
        let mut greeted = false;
        loop {
            let msg = match recv::<AgentMessage>(&mut rx, MAX_FRAME).await {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(StreamError::Frame(e)) => {
                    // A malformed or oversized frame: say why, count it, end the stream.
                    let wire = e.to_wire();
                    self.shared.lock().await.metrics.reject(match wire.code {
                        ErrorCode::TooLarge => "too_large",
                        _ => "malformed",
                    });
                    log(format!("device {device}: {wire}"));
                    let _ = send(&mut tx, &CoordinatorMessage::Error(wire)).await;
                    let _ = tx.finish();
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
                AgentMessage::CheckIn { capabilities } => {
                    let mut s = self.shared.lock().await;
                    let s = &mut *s;
                    match s.runner.as_mut() {
                        None => CoordinatorMessage::ComeBackLater { after_ms: 2_000 },
                        Some(_) if !capabilities.eligible => {
                            CoordinatorMessage::ComeBackLater { after_ms: 60_000 }
                        }
                        Some(runner) => {
                            let mut outcomes = Vec::new();
                            let reply = runner
                                .check_in(
                                    io(&mut s.store, &mut s.metrics, now, &mut outcomes),
                                    device,
                                )
                                .unwrap_or_else(|e| {
                                    CoordinatorMessage::Error(task_storage_failed(
                                        s,
                                        "selecting devices",
                                        &e,
                                    ))
                                });
                            finish_outcomes(s, outcomes);
                            reply
                        }
                    }
                }
                AgentMessage::GetDriftSpec => {
                    CoordinatorMessage::DriftSpec(self.shared.lock().await.watch.spec())
                }
                AgentMessage::DriftReport(report) => {
                    let mut s = self.shared.lock().await;
                    let s = &mut *s;
                    match s.watch.report(device, &report) {
                        Ok(window) => {
                            s.metrics.drift_summaries += 1;
                            CoordinatorMessage::DriftAccepted { window }
                        }
                        Err(e) => {
                            *s.metrics.drift_rejected.entry(e.reason()).or_default() += 1;
                            refuse(ErrorCode::Malformed, format!("drift summary refused: {e}"))
                        }
                    }
                }
                AgentMessage::GetDeployment => self.deployment_reply().await,
                AgentMessage::Fetch { object, offset } => {
                    let bytes = {
                        let mut s = self.shared.lock().await;
                        fetchable(&mut s, &object).unwrap_or_else(|e| {
                            Fetchable::Damaged(
                                storage_failed(&mut s, "reading an object", &e).message,
                            )
                        })
                    };
                    match bytes {
                        Fetchable::Unknown => refuse(
                            ErrorCode::NoSuchRound,
                            format!(
                                "object {object} is not the current or deployed model or an \
                                 artifact of the deployed model"
                            ),
                        ),
                        Fetchable::Damaged(why) => {
                            log(format!("device {device}: {why}"));
                            refuse(ErrorCode::Internal, why)
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
                                send(&mut tx, &chunk).await?;
                            }
                            self.shared.lock().await.metrics.bytes_down += sent;
                            continue;
                        }
                    }
                }
                AgentMessage::BeginUpload(meta) => {
                    let mut s = self.shared.lock().await;
                    let s = &mut *s;
                    match s.runner.as_mut() {
                        Some(r) => match r.begin_upload(&s.store, device, meta) {
                            Ok(reply) => reply,
                            Err(e) => CoordinatorMessage::Error(storage_failed(
                                s,
                                "looking up an update",
                                &e,
                            )),
                        },
                        None => refuse(ErrorCode::NoSuchRound, "no task is running"),
                    }
                }
                AgentMessage::UploadChunk {
                    object,
                    offset,
                    data,
                } => {
                    let mut s = self.shared.lock().await;
                    let s = &mut *s;
                    match s.runner.as_mut() {
                        None => refuse(ErrorCode::NoSuchRound, "no task is running"),
                        Some(runner) => {
                            let mut outcomes = Vec::new();
                            let reply = runner
                                .upload_chunk(
                                    io(&mut s.store, &mut s.metrics, now, &mut outcomes),
                                    device,
                                    object,
                                    offset,
                                    &data,
                                )
                                .unwrap_or_else(|e| {
                                    CoordinatorMessage::Error(task_storage_failed(
                                        s,
                                        "recording an update",
                                        &e,
                                    ))
                                });
                            if let CoordinatorMessage::Error(e) = &reply {
                                log(format!("device {device}: update refused: {e}"));
                            }
                            finish_outcomes(s, outcomes);
                            reply
                        }
                    }
                }
            };
            send(&mut tx, &reply).await?;
        }
    }

    async fn admin(&self, conn: quinn::Connection, name: String) {
        let Ok((mut tx, mut rx)) = conn.accept_bi().await else {
            return;
        };
        let mut greeted = false;
        loop {
            let req = match recv::<AdminRequest>(&mut rx, MAX_FRAME).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(StreamError::Frame(e)) => {
                    let _ = send(&mut tx, &AdminResponse::Error(e.to_wire())).await;
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
                    if let Some(what) = describe(&req) {
                        log(format!("admin {name}: {what}"));
                    }
                    let mut s = self.shared.lock().await;
                    let now = self.now();
                    administer(&mut s, req, now).unwrap_or_else(|e| {
                        AdminResponse::Error(task_storage_failed(&mut s, "administering", &e))
                    })
                }
            };
            if send(&mut tx, &reply).await.is_err() {
                return;
            }
        }
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

/// What a changing request does, for the log; `None` for listings.
fn describe(req: &AdminRequest) -> Option<String> {
    Some(match req {
        AdminRequest::CreateTask(spec) => format!("create task {:?}", spec.name),
        AdminRequest::CreateToken { label, .. } => format!("create token for {label:?}"),
        AdminRequest::RevokeDevice { device } => format!("revoke device {device}"),
        AdminRequest::SetTaskState { task, command } => format!("{command:?} task {task}"),
        AdminRequest::Deploy { model } => format!("deploy {model}"),
        AdminRequest::Rollback => "roll back".into(),
        _ => return None,
    })
}

fn finish_outcomes(s: &mut Shared, outcomes: Vec<Outcome>) {
    let Some(runner) = s.runner.as_ref() else {
        return;
    };
    let task = runner.id();
    for o in outcomes {
        match o {
            Outcome::Closed {
                round,
                reports,
                epsilon,
                model,
            } => {
                log(format!(
                    "task {task}: round {round} closed with {reports} updates{}",
                    epsilon.map_or(String::new(), |e| format!(", ε = {e:.4}"))
                ));
                // Committed already: the build runs afterwards, off this thread.
                s.queue_build(model);
            }
            Outcome::Abandoned { round, reason } => log(format!(
                "task {task}: round {round} abandoned: {reason}; retrying"
            )),
            Outcome::Ended(state, note) => {
                log(format!(
                    "task {task}: {state:?}{}",
                    note.map_or(String::new(), |n| format!(": {n}"))
                ));
                s.runner = None;
                return;
            }
        }
    }
}

fn deployment(s: &Shared) -> Result<DeploymentAnswer, StoreError> {
    let none = || {
        Ok(DeploymentAnswer::Reply(CoordinatorMessage::Deployment(
            None,
        )))
    };
    let Some((version, model)) = s.store.deployment()? else {
        return none();
    };
    let Some(row) = s.store.model_row(&model)? else {
        return none();
    };
    let Some(task) = s.store.task(row.task)? else {
        return none();
    };
    let variant = task.spec.variant;
    let artifacts = s.store.artifacts(&model)?;
    Ok(match artifacts.into_iter().find(|a| a.variant == variant) {
        None => DeploymentAnswer::Build(model),
        Some(ArtifactRow {
            built: Err(reason), ..
        }) => DeploymentAnswer::Reply(refuse(
            ErrorCode::Internal,
            format!(
                "deployed model {} has no {variant} inference artifact: {reason}",
                &model.to_string()[..12]
            ),
        )),
        Some(ArtifactRow {
            built: Ok(object), ..
        }) => DeploymentAnswer::Reply(CoordinatorMessage::Deployment(Some(Deployment {
            version,
            model: ObjectRef {
                id: model,
                size: row.size,
            },
            spec: task.spec.model,
            artifact: DeployedArtifact {
                object,
                variant,
                model_version: row.round,
            },
        }))),
    })
}

/// What must be done for a model's artifacts.
enum ArtifactJob {
    /// Both are recorded.
    Done,
    /// They cannot be built (the reason is recorded for both).
    Unusable(String),
    /// Build them from these parameters.
    Build {
        spec: fleet_models::ModelSpec,
        params: Vec<f32>,
        version: u64,
    },
}

fn artifact_job(store: &Store, model: &ObjectId) -> Result<ArtifactJob, StoreError> {
    if store.artifacts(model)?.len() >= 2 {
        return Ok(ArtifactJob::Done);
    }
    let Some(row) = store.model_row(model)? else {
        return Ok(ArtifactJob::Unusable("not a stored model version".into()));
    };
    let Some(task) = store.task(row.task)? else {
        return Ok(ArtifactJob::Unusable(format!(
            "task {} is unknown",
            row.task
        )));
    };
    let bytes = match store.get_object(model) {
        Ok(b) => b,
        Err(StoreError::Io(e)) => {
            return Ok(ArtifactJob::Unusable(format!(
                "model object unreadable: {e}"
            )));
        }
        Err(StoreError::Corrupt(e)) => return Ok(ArtifactJob::Unusable(e)),
        Err(e) => return Err(e),
    };
    let spec = task.spec.model;
    match bytes_to_params(&bytes).filter(|p| p.len() == spec.layout().total) {
        Some(params) => Ok(ArtifactJob::Build {
            spec,
            params,
            version: row.round,
        }),
        None => Ok(ArtifactJob::Unusable(format!(
            "model object does not fit the layout of {}",
            spec.name()
        ))),
    }
}

/// The bytes of `object` if a device may fetch it: the running task's
/// model, the deployed one, or an artifact of the deployed one.
fn fetchable(s: &mut Shared, object: &ObjectId) -> Result<Fetchable, StoreError> {
    if let Some(r) = &s.runner {
        let (bytes, r) = r.model();
        if r.id == *object {
            return Ok(Fetchable::Bytes(bytes));
        }
    }
    let Some((_, deployed)) = s.store.deployment()? else {
        return Ok(Fetchable::Unknown);
    };
    if deployed == *object {
        return Ok(Fetchable::Bytes(Arc::new(s.store.get_object(object)?)));
    }
    if s.store.artifact_model(object)? != Some(deployed) {
        return Ok(Fetchable::Unknown);
    }
    match s.store.get_object(object) {
        Ok(bytes) => Ok(Fetchable::Bytes(Arc::new(bytes))),
        // A damaged or lost artifact is rebuilt, not fatal: the model it
        // comes from is intact.
        Err(StoreError::Corrupt(_) | StoreError::Io(_)) => {
            s.store.remove_object(object)?;
            s.store.forget_artifacts(&deployed)?;
            s.queue_build(deployed);
            Ok(Fetchable::Damaged(format!(
                "the stored artifact {} is damaged or missing; it is being built again, \
                 ask for the deployment again shortly",
                &object.to_string()[..12]
            )))
        }
        Err(e) => Err(e),
    }
}

fn admin_error(code: ErrorCode, message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(WireError {
        code,
        message: message.into(),
    })
}

fn done(message: impl Into<String>, id: Option<u64>) -> AdminResponse {
    AdminResponse::Done {
        message: message.into(),
        id,
    }
}

fn administer(s: &mut Shared, req: AdminRequest, now: u64) -> Result<AdminResponse, StoreError> {
    Ok(match req {
        AdminRequest::Hello { .. } => unreachable!("handled by the caller"),
        AdminRequest::CreateToken { label, ttl_secs } => {
            let mut raw = [0u8; 24];
            rand::rng().fill_bytes(&mut raw);
            let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let expires_at = unix_secs() + ttl_secs;
            s.store.create_token(&token, &label, expires_at)?;
            AdminResponse::Token { token, expires_at }
        }
        AdminRequest::Drift => AdminResponse::Drift(s.watch.info()),
        AdminRequest::ListDevices => {
            let connected = |id| s.connections.contains_key(&id);
            AdminResponse::Devices(s.store.devices(connected)?)
        }
        AdminRequest::RevokeDevice { device } => match s.store.revoke(device)? {
            None => admin_error(ErrorCode::UnknownDevice, format!("no device {device}")),
            Some(serial) => {
                s.revoked.revoke(serial);
                let mut dropped = 0;
                for conn in s.connections.remove(&device).unwrap_or_default() {
                    conn.close(close::REVOKED.into(), b"device revoked");
                    dropped += 1;
                }
                s.metrics.connected_devices = s.connections.len() as u64;
                if let Some(runner) = s.runner.as_mut() {
                    let mut outcomes = Vec::new();
                    runner
                        .drop_out(io(&mut s.store, &mut s.metrics, now, &mut outcomes), device)?;
                    finish_outcomes(s, outcomes);
                }
                log(format!(
                    "device {device} revoked, {dropped} connection(s) closed"
                ));
                done(
                    format!("device {device} revoked; {dropped} live connection(s) closed"),
                    Some(device),
                )
            }
        },
        AdminRequest::CreateTask(spec) => match Runner::create(&mut s.store, &spec) {
            Ok(id) => {
                if let Some(task) = s.store.task(id)? {
                    s.queue_build(task.model);
                }
                done(
                    format!(
                        "task {id} created (paused); start it with `coordinator tasks start {id}`"
                    ),
                    Some(id),
                )
            }
            Err(e) => admin_error(ErrorCode::Malformed, e),
        },
        AdminRequest::SetTaskState { task, command } => set_task_state(s, task, command, now)?,
        AdminRequest::ListTasks => AdminResponse::Tasks(
            s.store
                .tasks()?
                .into_iter()
                .map(|t| TaskInfo {
                    id: t.id,
                    spec: t.spec,
                    state: t.state,
                    rounds_closed: t.closed,
                    model: t.model.to_string(),
                    note: t.note,
                })
                .collect(),
        ),
        AdminRequest::ListRounds { task } => AdminResponse::Rounds(s.store.rounds(task)?),
        AdminRequest::ListModels { task } => AdminResponse::Models(s.store.models(task)?),
        AdminRequest::Deploy { model } => {
            let matches: Vec<_> = s
                .store
                .models(None)?
                .into_iter()
                .filter(|m| !model.is_empty() && m.id.starts_with(&model.to_lowercase()))
                .collect();
            match matches.as_slice() {
                [m] => {
                    let id = parse_object_id(&m.id).expect("stored ids are hex");
                    let version = s.store.deploy(&id)?;
                    s.queue_build(id);
                    done(
                        format!("model {} deployed as version {version}", &m.id[..12]),
                        Some(version),
                    )
                }
                [] => admin_error(
                    ErrorCode::NoSuchRound,
                    format!("no model id starts with {model:?}; see `coordinator models list`"),
                ),
                _ => admin_error(
                    ErrorCode::Malformed,
                    format!(
                        "{} models start with {model:?}; give more digits",
                        matches.len()
                    ),
                ),
            }
        }
        AdminRequest::Rollback => match s.store.previous_deployment()? {
            None => admin_error(ErrorCode::NoSuchRound, "nothing to roll back to"),
            Some(prev) => {
                let version = s.store.deploy(&prev)?;
                s.queue_build(prev);
                done(
                    format!(
                        "rolled back to model {} (version {version})",
                        &prev.to_string()[..12]
                    ),
                    Some(version),
                )
            }
        },
        AdminRequest::Budget { task } => match s.store.task(task)? {
            None => admin_error(ErrorCode::NoSuchRound, format!("no task {task}")),
            Some(row) => {
                let ledger: Option<fleet_aggregation::privacy::accountant::ledger::PrivacyLedger> =
                    match &row.ledger {
                        Some(json) => Some(
                            serde_json::from_str(json)
                                .map_err(|e| StoreError::Corrupt(format!("ledger: {e}")))?,
                        ),
                        None => None,
                    };
                let spent = match &ledger {
                    Some(l) => Some(
                        l.spent()
                            .map_err(|e| StoreError::Corrupt(format!("ledger: {e}")))?,
                    ),
                    None => None,
                };
                AdminResponse::Budget(BudgetInfo {
                    task,
                    private: row.spec.dp.is_some(),
                    budget: row.spec.budget,
                    spent,
                    delta: ledger.as_ref().map(|l| l.budget().delta),
                    rounds: ledger.as_ref().map_or(0, |l| l.rounds()),
                })
            }
        },
    })
}

/// Follows the deployment (once a second) and closes the drift window when due:
/// logs flag changes, updates the metrics and carries out retraining.
fn watch_drift(s: &mut Shared, now: u64) -> Result<(), StoreError> {
    if s.follow_in == 0 {
        s.follow_in = 20;
        let deployed = match s.store.deployment()? {
            Some((version, model)) => {
                let task = s.store.model_row(&model)?.map_or(0, |r| r.task);
                s.store.task(task)?.map(|row| (version, row.spec.model))
            }
            None => None,
        };
        if let Some(line) = s
            .watch
            .follow(deployed.as_ref().map(|(v, spec)| (*v, spec)), now)
        {
            log(line);
        }
    }
    s.follow_in -= 1;
    let Some(report) = s.watch.tick(now, unix_secs()) else {
        return Ok(());
    };
    let retrain = report.retrain.clone();
    for e in &report.events {
        log(format!(
            "drift window {}: {} {} {} (score {:.3})",
            e.window,
            e.scope,
            e.signal.name(),
            match e.transition {
                fleet_aggregation::drift::Transition::Raised => "raised",
                fleet_aggregation::drift::Transition::Cleared => "cleared",
            },
            e.score
        ));
    }
    s.metrics.drift_window(report);
    if let Some(r) = retrain {
        let line = retrain_after_drift(s, &r, now)?;
        log(format!("drift: {line}"));
    }
    Ok(())
}

/// The retraining policy's action: a new task like the deployed model's,
/// of `r.rounds` rounds, starting from the deployed model, started at once
/// unless another task is running. Its name records why.
fn retrain_after_drift(s: &mut Shared, r: &Retrain, now: u64) -> Result<String, StoreError> {
    let Some((_, model)) = s.store.deployment()? else {
        return Ok("no deployed model to retrain".into());
    };
    let Some(row) = s
        .store
        .task(s.store.model_row(&model)?.map_or(0, |r| r.task))?
    else {
        return Ok("the deployed model has no task to retrain from".into());
    };
    if let Some(running) = s.runner.as_ref().map(|r| r.id()) {
        return Ok(format!(
            "retraining not started: task {running} is running ({})",
            r.reason
        ));
    }
    let mut spec = row.spec.clone();
    spec.name = format!("{} · retrain: {}", row.spec.name, r.reason);
    spec.engine.rounds = r.rounds;
    let global = bytes_to_params(&s.store.get_object(&model)?).unwrap_or_default();
    match Runner::create_from(&mut s.store, &spec, &global) {
        Ok(task) => {
            s.store.set_task_state(task, TaskState::Running, None)?;
            let row = s.store.task(task)?.expect("just created");
            s.runner = Some(Runner::load(&mut s.store, &row, now)?);
            Ok(format!("started task {task}: {}", spec.name))
        }
        Err(e) => Ok(format!("retraining not started: {e}")),
    }
}

fn set_task_state(
    s: &mut Shared,
    task: u64,
    command: TaskCommand,
    now: u64,
) -> Result<AdminResponse, StoreError> {
    let Some(row) = s.store.task(task)? else {
        return Ok(admin_error(
            ErrorCode::NoSuchRound,
            format!("no task {task}"),
        ));
    };
    let running = s.runner.as_ref().map(|r| r.id());
    Ok(match command {
        TaskCommand::Start => {
            if matches!(row.state, TaskState::Finished | TaskState::Stopped) {
                admin_error(
                    ErrorCode::NoSuchRound,
                    format!("task {task} is {:?}; create a new task", row.state),
                )
            } else if running == Some(task) {
                done(format!("task {task} is already running"), Some(task))
            } else if let Some(other) = running {
                admin_error(
                    ErrorCode::Malformed,
                    format!("task {other} is running; pause or stop it first"),
                )
            } else {
                s.store.set_task_state(task, TaskState::Running, None)?;
                let row = s.store.task(task)?.expect("just updated");
                s.runner = Some(Runner::load(&mut s.store, &row, now)?);
                done(
                    format!("task {task} running from round {}", row.round),
                    Some(task),
                )
            }
        }
        TaskCommand::Pause | TaskCommand::Stop => {
            let state = if command == TaskCommand::Pause {
                TaskState::Paused
            } else {
                TaskState::Stopped
            };
            if matches!(row.state, TaskState::Finished | TaskState::Stopped) {
                admin_error(
                    ErrorCode::NoSuchRound,
                    format!("task {task} is {:?}", row.state),
                )
            } else {
                s.store.set_task_state(task, state, None)?;
                if running == Some(task) {
                    s.runner = None;
                }
                done(format!("task {task} {state:?}"), Some(task))
            }
        }
    })
}

/// Parses a 64-digit hex object id.
pub fn parse_object_id(hex: &str) -> Option<ObjectId> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(ObjectId(out))
}

/// Opens the home at `dir`, binds QUIC (and metrics) and serves forever.
pub async fn run(dir: &Path) -> Result<(), String> {
    let home = Home::at(dir);
    let settings = home.settings()?;
    log(crate::runner::backend_line());
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
    log(format!(
        "listening on {} (QUIC){}",
        endpoint.local_addr().map_err(|e| e.to_string())?,
        settings.metrics.map_or(String::new(), |m| format!(
            ", metrics on http://{m}/metrics"
        ))
    ));
    coordinator.serve(endpoint, metrics).await;
    Ok(())
}
