//! `edge-agent run`: the training loop, and the deployment and drift
//! services started beside it ([`crate::deploy`], [`crate::drift`], the
//! prediction socket of [`crate::serving`]).
//!
//! The training loop carries out what the [`Machine`] asks, in the style of
//! an embedded executor. One current-thread tokio runtime runs a fixed set
//! of long-lived parts joined by bounded channels:
//!
//! - the control loop (this module's [`run`]): owns the machine, the link's
//!   send half and the timer, and is the only writer of the state directory
//!   (except `deployment/` and the credentials);
//! - one reader task per connection: turns frames into [`Input::Message`]
//!   (channel of 8);
//! - one trainer thread (training is CPU-bound and must not block the
//!   runtime): one job at a time in, one result out (channels of 1). It
//!   reads the local data for each job and frees it after: an idle agent
//!   holds no training data (5,000 images are 15.7 MB as f32), and data
//!   collected between rounds is trained on in the next;
//! - the services: deployment, drift reports and certificate renewal
//!   ([`crate::renew`], the only other writer of the state directory, and
//!   only of the credential files).
//!
//! Nothing queues without bound: a reader blocks when the loop is behind,
//! and the trainer never has more than one plan.
//!
//! The loop stops for good when the coordinator no longer accepts this
//! device, told by the connection's close code or the TLS refusal of its
//! certificate ([`SessionError::revoked`]), or when it refuses the agent's
//! protocol version ([`RunError`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_models::Dataset;
use fleet_models::data::device;
use fleet_protocol::MAX_FRAME;
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, Plan};
use fleet_protocol::stream::{StreamError, recv, send};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

pub use crate::config::RunConfig;
use crate::deploy::Deployer;
use crate::drift::{DriftPrivacy, PrivacyError};
use crate::log::log;
use crate::machine::{Config, Input, Machine, Output, SecureIdentity, Trained};
use crate::serving::{Serving, serve_socket};
use crate::session::{Coordinator, SessionError, SetupError};
use crate::state::StateDir;
use crate::work::{plan_update, secure_input};
use fleet_protocol::secure::{CaAuthenticator, CertSigner};

/// Why `edge-agent run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// No data directory is configured.
    #[error("no data directory: pass --data DIR (see `edge-agent data split`)")]
    NoData,
    /// The local training data could not be read.
    #[error(transparent)]
    Data(fleet_models::Error),
    /// The state directory could not be read or written.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The connection to the coordinator could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The prediction socket could not be opened.
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Noised drift summaries cannot be accounted.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// The trainer thread could not be started.
    #[error("cannot start the trainer thread: {0}")]
    Trainer(#[source] std::io::Error),
    /// The coordinator no longer accepts this device: it must enroll again.
    #[error("{}", revoked(.0))]
    Revoked(SessionError),
    /// The coordinator refused this agent's protocol version: upgrade the agent.
    #[error("{0}")]
    Incompatible(String),
    /// The device's credentials cannot sign secure aggregation's keys.
    #[error("the device's credentials cannot be used for secure aggregation: {0}")]
    Secure(String),
}

/// The exit status of an agent that stopped for good: revoked, or refused
/// by the coordinator's protocol. Restarting it cannot help (the systemd
/// unit does not, `RestartPreventExitStatus`); other failures exit with 1.
pub const STOPPED_FOR_GOOD: u8 = 3;

impl RunError {
    /// The process exit status for this error: [`STOPPED_FOR_GOOD`] when
    /// only an operator can mend it, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Revoked(_) | Self::Incompatible(_) => STOPPED_FOR_GOOD,
            _ => 1,
        }
    }
}

fn revoked(e: &SessionError) -> String {
    match (e.close_code(), e.connection()) {
        (Some(_), _) => "the coordinator no longer accepts this device: it was revoked, or this \
                         certificate is not the one the coordinator issued for it (enroll again)"
            .into(),
        (None, Some(reason)) => format!("this device's certificate is refused: {reason}"),
        (None, None) => e.to_string(),
    }
}

enum LinkEvent {
    Message(u64, CoordinatorMessage),
    /// The link is gone; with the reason when the device was revoked.
    Down(u64, Option<SessionError>),
}

struct Link {
    generation: u64,
    conn: quinn::Connection,
    tx: quinn::SendStream,
}

/// What secure aggregation signs with (the device's certificate key) and
/// checks neighbours against (the fleet CA), with a secret seed from the
/// operating system.
fn secure_identity(state: &StateDir) -> Result<SecureIdentity, RunError> {
    let (cert, key, ca) = state.credentials()?;
    let signer = CertSigner::new(&cert, &key).map_err(|e| RunError::Secure(e.to_string()))?;
    let authenticator = CaAuthenticator::new(ca).map_err(|e| RunError::Secure(e.to_string()))?;
    let mut seed = [0u8; 32];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut seed)
        .map_err(|e| RunError::Secure(format!("no randomness from the operating system: {e}")))?;
    Ok(SecureIdentity::new(
        Box::new(signer),
        Box::new(authenticator),
        seed,
    ))
}

/// Trains on a plan and encodes the update (on the trainer thread).
fn train(device: u64, data: &Dataset, plan: &Plan, global: &[f32]) -> Result<Trained, String> {
    let u = plan_update(plan, device, global, data.view(), |_| {})?;
    let secure_input = match &plan.secure {
        Some(secure) => {
            use rand::SeedableRng;
            let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
            Some(secure_input(secure, &u.bytes, global.len(), &mut rng)?)
        }
        None => None,
    };
    Ok(Trained {
        secure_input,
        task: plan.task,
        round: plan.round,
        fingerprint: plan.spec.layout().fingerprint(),
        bytes: u.bytes,
        examples: u.examples as u64,
        loss: u.loss,
    })
}

async fn reader(
    generation: u64,
    mut rx: quinn::RecvStream,
    conn: quinn::Connection,
    events: mpsc::Sender<LinkEvent>,
) {
    loop {
        match recv::<CoordinatorMessage>(&mut rx, MAX_FRAME).await {
            Ok(Some(m)) => {
                if events
                    .send(LinkEvent::Message(generation, m))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            other => {
                let gone = conn.close_reason().map(SessionError::Closed);
                let revoked = gone.filter(SessionError::revoked);
                if let (Err(StreamError::Frame(e)), None) = (&other, &revoked) {
                    log!(format!("bad frame from the coordinator: {e}"));
                }
                let _ = events.send(LinkEvent::Down(generation, revoked)).await;
                return;
            }
        }
    }
}

/// The services beside the training loop; dropping it stops them.
struct Services {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Services {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the services on the current runtime: restores the persisted
/// artifact, serves on `cfg.socket` when given, reports drift and checks
/// for new deployments at start and every `cfg.deployment_check_secs`
/// (never when 0).
fn start_services(
    state: &StateDir,
    cfg: &RunConfig,
    coordinator: &Coordinator,
) -> Result<Services, RunError> {
    let serving = Serving::with_drift_sampling(cfg.drift_sample_every);
    let mut deployer = Deployer::new(state, serving.clone());
    match deployer.restore() {
        Ok(Some(v)) => log!(format!("deploy: serving the persisted model version {v}")),
        Ok(None) => {}
        Err(e) => log!(format!("deploy: {e}")),
    }
    let mut tasks = Vec::new();
    if let Some(path) = &cfg.socket {
        let socket = serve_socket(path, serving.clone()).map_err(|source| RunError::Listen {
            path: path.clone(),
            source,
        })?;
        tasks.push(socket);
    }
    let every = cfg.deployment_check_secs;
    if cfg.drift_sample_every > 0 && every > 0 {
        let privacy = cfg
            .drift_noise_multiplier
            .map(|z| DriftPrivacy::open(state, z, cfg.drift_epsilon, cfg.drift_delta))
            .transpose()?;
        tasks.push(tokio::spawn(
            crate::drift::report(
                coordinator.clone(),
                serving.clone(),
                cfg.drift_tags.clone(),
                every,
                privacy,
            )
            .in_current_span(),
        ));
    }
    if every > 0 {
        tasks.push(tokio::spawn(
            deployer
                .follow(coordinator.clone(), every)
                .in_current_span(),
        ));
    }
    tasks.push(tokio::spawn(
        crate::renew::keep_fresh(state.clone(), coordinator.clone()).in_current_span(),
    ));
    Ok(Services { tasks })
}

/// Runs the agent until it is stopped, revoked, or has `max_rounds` accepted updates.
/// Its log lines, and its services', carry the device id (span `agent`).
pub async fn run(state: &StateDir, cfg: RunConfig) -> Result<(), RunError> {
    let identity = state.identity().map_err(RunError::State)?;
    let span = tracing::info_span!("agent", device = identity.device);
    run_as(state, cfg, identity).instrument(span).await
}

async fn run_as(
    state: &StateDir,
    cfg: RunConfig,
    identity: crate::state::Identity,
) -> Result<(), RunError> {
    let data_dir = cfg
        .data
        .clone()
        .or(identity.data.clone())
        .ok_or(RunError::NoData)?;
    // Read once here so that a missing or malformed data set stops the
    // agent at start, with the reason, rather than at its first round.
    let examples = device::load(&data_dir).map_err(RunError::Data)?.len();
    log!(format!(
        "device {} with {examples} local examples from {}",
        identity.device,
        data_dir.display()
    ));
    let coordinator = Coordinator::of_device(state)?.with_replicas(&cfg.replicas);
    let _services = start_services(state, &cfg, &coordinator)?;

    // The trainer thread: one job in, one result out.
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(Plan, Arc<Vec<f32>>)>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Trained, String>>(1);
    let device_id = identity.device;
    std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            while let Ok((plan, global)) = job_rx.recv() {
                let result = device::load(&data_dir)
                    .map_err(|e| format!("reading the local data: {e}"))
                    .and_then(|data| train(device_id, &data, &plan, &global));
                if done_tx.blocking_send(result).is_err() {
                    return;
                }
            }
        })
        .map_err(RunError::Trainer)?;

    let (link_tx, mut link_rx) = mpsc::channel::<LinkEvent>(8);
    let mut machine = Machine::new(
        Config {
            device: identity.device,
            memory_mib: cfg.memory_mib,
            ..Config::default()
        },
        state.cached_model().map_err(RunError::State)?,
        state.pending().map_err(RunError::State)?,
    );
    machine.set_secure_identity(secure_identity(state)?);
    if machine.has_pending() {
        log!("an update from before the restart awaits upload; resuming it");
    }
    let mut status = state.status().map_err(RunError::State)?;
    let mut link: Option<Link> = None;
    let mut generation = 0u64;
    let mut timer: Option<Instant> = None;
    let mut queue: std::collections::VecDeque<Output> = machine.start().into();
    let mut accepted_now = 0u64;
    let mut renew_identity = false;

    loop {
        while let Some(out) = queue.pop_front() {
            let dirty = matches!(
                out,
                Output::Train { .. }
                    | Output::CacheModel(..)
                    | Output::Accepted { .. }
                    | Output::Refused(_)
            );
            let mut feed = |input: Input, queue: &mut std::collections::VecDeque<Output>| {
                queue.extend(machine.handle(input));
            };
            match out {
                Output::Connect => {
                    generation += 1;
                    match coordinator.connect().await {
                        Ok(session) => {
                            let (_, conn, tx, rx) = session.into_parts();
                            tokio::spawn(
                                reader(generation, rx, conn.clone(), link_tx.clone())
                                    .in_current_span(),
                            );
                            link = Some(Link {
                                generation,
                                conn,
                                tx,
                            });
                            feed(Input::Connected, &mut queue);
                        }
                        Err(e) if e.revoked() => {
                            return stop(state, &mut status, RunError::Revoked(e));
                        }
                        Err(e) => {
                            log!(match (&e, e.connection()) {
                                (SessionError::TimedOut { .. }, _) => e.to_string(),
                                (SessionError::Connect { source, .. }, _) => {
                                    format!("cannot connect to {}: {source}", coordinator.addr())
                                }
                                (_, Some(reason)) => {
                                    format!("cannot connect to {}: {reason}", coordinator.addr())
                                }
                                _ => format!("cannot connect to {}: {e}", coordinator.addr()),
                            });
                            if coordinator.fail_over() {
                                log!(format!("next: the replica at {}", coordinator.addr()));
                            }
                            feed(Input::Disconnected, &mut queue);
                        }
                    }
                }
                Output::Send(msg) => {
                    let msg = match msg {
                        AgentMessage::CheckIn { mut capabilities } => {
                            capabilities.eligible = match cfg.eligibility.check() {
                                Ok(()) => true,
                                Err(why) => {
                                    log!(format!("not eligible to train now: {why}"));
                                    false
                                }
                            };
                            AgentMessage::CheckIn { capabilities }
                        }
                        other => other,
                    };
                    if let AgentMessage::UploadChunk { data, .. } = &msg {
                        if let Some(bw) = cfg.upload_bytes_per_sec {
                            let secs = data.len() as f64 / bw.max(1) as f64;
                            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
                        }
                        status.bytes_up += data.len() as u64;
                    }
                    let Some(l) = link.as_mut() else {
                        continue;
                    };
                    if let Err(e) = send(&mut l.tx, &msg).await {
                        log!(format!("send failed: {e}"));
                        link = None;
                        feed(Input::Disconnected, &mut queue);
                    }
                }
                Output::Train { plan, global } => {
                    // Sign a secure round's keys with the current
                    // certificate (it may have been renewed).
                    renew_identity = plan.secure.is_some();
                    log!(format!(
                        "training for task {} round {} ({} epochs)",
                        plan.task, plan.round, plan.train.epochs
                    ));
                    status.last_round = Some((plan.task, plan.round));
                    if job_tx.try_send((plan, global)).is_err() {
                        feed(
                            Input::Trained(Err("the trainer is busy".into())),
                            &mut queue,
                        );
                    }
                }
                Output::CacheModel(id, bytes) => {
                    status.bytes_down += bytes.len() as u64;
                    state.cache_model(&id, &bytes).map_err(RunError::State)?;
                }
                Output::SavePending(p) => state.save_pending(&p).map_err(RunError::State)?,
                Output::ClearPending => state.clear_pending().map_err(RunError::State)?,
                Output::Wait(ms) => timer = Some(Instant::now() + Duration::from_millis(ms)),
                Output::Log(line) => log!(line),
                Output::Accepted { task, round } => {
                    log!(format!("update for task {task} round {round} accepted"));
                    status.accepted += 1;
                    accepted_now += 1;
                }
                Output::Refused(why) => {
                    log!(&why);
                    status.refused += 1;
                    status.last_error = Some(why);
                }
                Output::Stop(why) => {
                    return stop(state, &mut status, RunError::Incompatible(why));
                }
            }
            if std::mem::take(&mut renew_identity) {
                machine.set_secure_identity(secure_identity(state)?);
            }
            if dirty {
                status.updated_at = fleet_protocol::time::unix_secs();
                state.save_status(&status).map_err(RunError::State)?;
            }
            if cfg.max_rounds.is_some_and(|m| accepted_now >= m) {
                if let Some(l) = link.take() {
                    l.conn.close(fleet_protocol::close::DONE.into(), b"done");
                }
                coordinator.endpoint().wait_idle().await;
                return Ok(());
            }
        }
        let sleep = async {
            match timer {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ev = link_rx.recv() => match ev {
                Some(LinkEvent::Message(g, m)) if link.as_ref().is_some_and(|l| l.generation == g) => {
                    queue.extend(machine.handle(Input::Message(m)));
                }
                Some(LinkEvent::Down(g, revoked)) if link.as_ref().is_some_and(|l| l.generation == g) => {
                    link = None;
                    if let Some(e) = revoked {
                        return stop(state, &mut status, RunError::Revoked(e));
                    }
                    // The replica may be gone: the next connection tries another.
                    if coordinator.fail_over() {
                        log!(format!("next: the replica at {}", coordinator.addr()));
                    }
                    queue.extend(machine.handle(Input::Disconnected));
                }
                Some(_) => {} // from a connection already replaced
                None => unreachable!("the loop holds a sender"),
            },
            done = done_rx.recv() => {
                let result = done.unwrap_or_else(|| Err("the trainer thread stopped".into()));
                queue.extend(machine.handle(Input::Trained(result)));
            }
            _ = sleep => {
                timer = None;
                queue.extend(machine.handle(Input::Timer));
            }
        }
    }
}

/// Stops the loop for good with `why`, kept as the status's last error.
fn stop(
    state: &StateDir,
    status: &mut crate::state::Status,
    why: RunError,
) -> Result<(), RunError> {
    status.last_error = Some(why.to_string());
    state.save_status(status).map_err(RunError::State)?;
    Err(why)
}
