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
//! All decisions sit in [`App`], behind one lock that is never held across
//! network I/O; after each call the driver carries out the [`Effect`]s the
//! call left.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, ObjectId, ObjectRef};
use fleet_protocol::stream::{StreamError, recv, send};
use fleet_protocol::tls::{Role, peer_role, server_config};
use fleet_protocol::transfer::chunks;
use fleet_protocol::{ErrorCode, MAX_FRAME, WireError, check_peer_version};
use tokio::sync::{Mutex, MutexGuard, Notify};
use tracing::{Instrument, info, info_span, warn};

use crate::app::{Admission, App, ArtifactJob, DeploymentAnswer, Effect, Fetchable, describe};
use crate::home::Home;
use crate::runner::refuse;
use crate::store::StoreError;

/// Application close codes (defined in the protocol crate, shared with agents).
pub use fleet_protocol::close;

/// How often the running task's deadlines and the drift monitor are looked at.
const TICK: Duration = Duration::from_millis(50);

/// A coordinator bound to its home directory.
pub struct Coordinator {
    app: Mutex<App>,
    /// Live connections per device, to close on revocation.
    connections: std::sync::Mutex<HashMap<u64, Vec<quinn::Connection>>>,
    started: Instant,
    /// Added to the clock by [`Coordinator::advance_clock`] (tests only).
    skew_ms: std::sync::atomic::AtomicU64,
    server_config: quinn::ServerConfig,
    /// Wakes the artifact builder when the app queued a build.
    build_wake: Notify,
    /// Held while one model's artifacts are built (one build at a time).
    build_lock: Mutex<()>,
}

/// The lock on the [`App`]; dropping it carries out the effects the calls
/// made under it left.
struct Locked<'a> {
    app: MutexGuard<'a, App>,
    coordinator: &'a Coordinator,
}

impl std::ops::Deref for Locked<'_> {
    type Target = App;
    fn deref(&self) -> &App {
        &self.app
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut App {
        &mut self.app
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        for effect in self.app.take_effects() {
            self.coordinator.carry_out(effect);
        }
    }
}

impl Coordinator {
    /// Opens the coordinator in `home`, resuming a running task if there is one.
    pub fn open(home: &Home) -> Result<Self, String> {
        let app = App::open(home)?;
        let (cert, key) = home.server_identity()?;
        let server_config = server_config(app.ca().cert(), cert, key, app.revocations())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            app: Mutex::new(app),
            connections: std::sync::Mutex::new(HashMap::new()),
            started: Instant::now(),
            skew_ms: Default::default(),
            server_config,
            build_wake: Notify::new(),
            build_lock: Mutex::new(()),
        })
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

    async fn lock(&self) -> Locked<'_> {
        Locked {
            app: self.app.lock().await,
            coordinator: self,
        }
    }

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
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<quinn::Connection>>> {
        // A panic while the map is held cannot leave it inconsistent (each
        // change is one insert or removal), so a poisoned lock is used as is.
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The metrics as Prometheus text.
    pub async fn metrics_text(&self) -> String {
        self.lock().await.metrics().render()
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
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tick.tick().await;
                    let now = me.now();
                    me.lock().await.tick(now);
                }
            })
        };
        let builder = tokio::spawn(self.clone().builder());
        while let Some(incoming) = endpoint.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                match incoming.await {
                    Ok(conn) => me.connection(conn).await,
                    Err(e) => info!("handshake failed: {e}"),
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
            let next = self.lock().await.next_build();
            match next {
                Some(model) => self.ensure_artifacts(model).await,
                None => self.build_wake.notified().await,
            }
        }
    }

    /// Builds and records the float and int8 artifacts of `model` unless
    /// both are recorded already. The build and the object writes run on
    /// the blocking pool; the lock is taken only to read the model and to
    /// record the result.
    pub async fn ensure_artifacts(&self, model: ObjectId) {
        let _one_at_a_time = self.build_lock.lock().await;
        let job = self.lock().await.artifact_job(&model);
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
        let mut app = self.lock().await;
        match work {
            Ok(Ok(rows)) => app.record_artifacts(&model, &rows, &name, version, started.elapsed()),
            Ok(Err(e)) => app.artifacts_unwritable(&model, &e),
            Err(e) => warn!("model {model}: artifact build failed: {e}"),
        }
    }

    /// The answer to `GetDeployment`: the deployed model with the artifact
    /// of the variant its task chose, built first if it is missing.
    async fn deployment_reply(&self) -> CoordinatorMessage {
        let mut built = false;
        loop {
            let answer = self.lock().await.deployment();
            match answer {
                DeploymentAnswer::Reply(reply) => return reply,
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
            Ok((Role::Device(id), _)) => {
                self.device(conn, id)
                    .instrument(info_span!("device", id))
                    .await
            }
            Ok((Role::Admin(name), _)) => {
                let span = info_span!("admin", %name);
                self.admin(conn).instrument(span).await
            }
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
                AgentMessage::Enroll { token, csr } => self.lock().await.enroll(&token, &csr),
                _ => self.lock().await.uncertified(),
            };
            if send(&mut tx, &reply).await.is_err() {
                return;
            }
        }
    }

    async fn device(&self, conn: quinn::Connection, device: u64) {
        // Listed before admission, so that a revocation between the two
        // closes it too.
        self.live().entry(device).or_default().push(conn.clone());
        let admission = self.lock().await.connect(device);
        let refused = match admission {
            Admission::Admitted => None,
            Admission::Refused => Some((close::REVOKED, "device unknown or revoked: enroll again")),
            Admission::StorageFailed => Some((
                close::SHUTDOWN,
                "the coordinator's storage failed: try again later",
            )),
        };
        if let Some((code, reason)) = refused {
            self.forget(device, &conn);
            return conn.close(code.into(), reason.as_bytes());
        }
        let result = self.device_session(&conn, device).await;
        let normal_close = matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == close::DONE.into()
        );
        if let Err(e) = result
            && !normal_close
        {
            info!("connection ended: {e}");
        }
        self.forget(device, &conn);
        self.lock().await.disconnect(device);
    }

    /// Removes `conn` from `device`'s live connections.
    fn forget(&self, device: u64, conn: &quinn::Connection) {
        let mut live = self.live();
        if let Some(list) = live.get_mut(&device) {
            list.retain(|c| c.stable_id() != conn.stable_id());
            if list.is_empty() {
                live.remove(&device);
            }
        }
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
                    self.lock().await.frame_refused(wire.code);
                    warn!("unreadable frame: {wire}");
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
                    self.lock()
                        .await
                        .check_in(device, capabilities.eligible, now)
                }
                AgentMessage::GetDriftSpec => self.lock().await.drift_spec(),
                AgentMessage::DriftReport(report) => {
                    self.lock().await.drift_report(device, &report)
                }
                AgentMessage::GetDeployment => self.deployment_reply().await,
                AgentMessage::Fetch { object, offset } => {
                    let fetched = self.lock().await.fetch(&object);
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
                            self.lock().await.sent(sent);
                            continue;
                        }
                    }
                }
                AgentMessage::BeginUpload(meta) => self.lock().await.begin_upload(device, meta),
                AgentMessage::UploadChunk {
                    object,
                    offset,
                    data,
                } => self
                    .lock()
                    .await
                    .upload_chunk(device, object, offset, &data, now),
            };
            send(&mut tx, &reply).await?;
        }
    }

    async fn admin(&self, conn: quinn::Connection) {
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
                        info!("{what}");
                    }
                    let now = self.now();
                    self.lock().await.administer(req, now)
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

/// Opens the home at `dir`, binds QUIC (and metrics) and serves forever.
pub async fn run(dir: &Path) -> Result<(), String> {
    let home = Home::at(dir);
    let settings = home.settings()?;
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
    coordinator.serve(endpoint, metrics).await;
    Ok(())
}
