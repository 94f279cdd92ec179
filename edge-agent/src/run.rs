//! The agent's driver: carries out what the [`Machine`] asks, in the style of
//! an embedded executor.
//!
//! One current-thread tokio runtime runs a fixed set of long-lived parts
//! joined by bounded channels:
//!
//! - the control loop (this module's [`run`]): owns the machine, the link's
//!   send half and the timer, and is the only writer of the state directory;
//! - one reader task per connection: turns frames into [`Input::Message`]
//!   (channel of 8);
//! - one trainer thread (training is CPU-bound and must not block the
//!   runtime): one job at a time in, one result out (channels of 1).
//!
//! Nothing queues without bound: a reader blocks when the loop is behind,
//! and the trainer never has more than one plan.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fleet_models::Dataset;
use fleet_models::data::device;
use fleet_protocol::MAX_FRAME;
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, Plan};
use fleet_protocol::stream::{StreamError, recv, send};
use fleet_protocol::tls::client_config;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::eligibility::Rules;
use crate::machine::{Config, Input, Machine, Output, Trained};
use crate::state::StateDir;
use crate::work::plan_update;

/// How the agent runs (`config.json` in the state directory, overridden by flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Directory of local training data (images.idx, labels.idx).
    pub data: Option<PathBuf>,
    /// Eligibility rules checked before each check-in.
    pub eligibility: Rules,
    /// Upload bandwidth limit in bytes per second (metered links); none by default.
    pub upload_bytes_per_sec: Option<u64>,
    /// Memory the agent may use for training (MiB), told to the coordinator.
    pub memory_mib: u32,
    /// Exit after this many accepted updates (for tests and one-shot runs).
    pub max_rounds: Option<u64>,
    /// Seconds between checks for a newly deployed model (0: never check).
    pub deployment_check_secs: u64,
    /// Unix socket on which to serve predictions from the deployed model.
    pub socket: Option<PathBuf>,
    /// Cohort tags sent with drift summaries (region, hardware class, group).
    pub drift_tags: Vec<String>,
    /// Summarise one served prediction in this many for drift monitoring
    /// (1: every prediction; 0: no drift summaries).
    pub drift_sample_every: u64,
    /// Gaussian noise on drift summaries (noise multiplier; none: no noise).
    pub drift_noise_multiplier: Option<f64>,
    /// ε budget of the noised drift summaries (no more are sent once spent).
    pub drift_epsilon: f64,
    /// δ of that budget.
    pub drift_delta: f64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data: None,
            eligibility: Rules::default(),
            upload_bytes_per_sec: None,
            memory_mib: 256,
            max_rounds: None,
            deployment_check_secs: 300,
            socket: None,
            drift_tags: Vec::new(),
            drift_sample_every: 1,
            drift_noise_multiplier: None,
            drift_epsilon: 10.0,
            drift_delta: 1e-5,
        }
    }
}

enum LinkEvent {
    Message(u64, CoordinatorMessage),
    Down(u64, Option<String>),
}

struct Link {
    generation: u64,
    conn: quinn::Connection,
    tx: quinn::SendStream,
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
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let t = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64();
    eprintln!("[edge-agent {t:9.3}s] {}", line.as_ref());
}

/// Trains on a plan and encodes the update (on the trainer thread).
fn train(device: u64, data: &Dataset, plan: &Plan, global: &[f32]) -> Result<Trained, String> {
    let u = plan_update(plan, device, global, data.view(), |_| {})?;
    Ok(Trained {
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
                let reason = match (other, conn.close_reason()) {
                    (_, Some(quinn::ConnectionError::ApplicationClosed(c)))
                        if c.error_code == fleet_protocol::close::REVOKED.into() =>
                    {
                        Some("this device was revoked by the coordinator's administrator".into())
                    }
                    (_, Some(r)) if r.to_string().to_lowercase().contains("revoked") => {
                        Some(format!("this device's certificate is refused: {r}"))
                    }
                    (Err(StreamError::Frame(e)), _) => {
                        log(format!("bad frame from the coordinator: {e}"));
                        None
                    }
                    _ => None,
                };
                let _ = events.send(LinkEvent::Down(generation, reason)).await;
                return;
            }
        }
    }
}

/// Runs the agent until it is stopped, revoked, or has `max_rounds` accepted updates.
pub async fn run(state: &StateDir, cfg: RunConfig) -> Result<(), String> {
    let identity = state.identity()?;
    let data_dir = cfg
        .data
        .clone()
        .or(identity.data.clone())
        .ok_or("no data directory: pass --data DIR (see `edge-agent data split`)")?;
    let data = Arc::new(device::load(&data_dir).map_err(|e| e.to_string())?);
    log(format!(
        "device {} with {} local examples from {}",
        identity.device,
        data.len(),
        data_dir.display()
    ));
    let (cert, key, ca) = state.credentials()?;
    let bind: SocketAddr = if identity.coordinator.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    endpoint.set_default_client_config(client_config(&ca, cert, key).map_err(|e| e.to_string())?);
    let (coordinator, name) = (identity.coordinator, identity.server_name.clone());
    let _deployment = crate::deploy::start(state, &cfg, endpoint.clone(), coordinator, name)?;

    // The trainer thread: one job in, one result out.
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(Plan, Arc<Vec<f32>>)>(1);
    let (done_tx, mut done_rx) = mpsc::channel::<Result<Trained, String>>(1);
    let device_id = identity.device;
    let trainer_data = data.clone();
    std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            while let Ok((plan, global)) = job_rx.recv() {
                let result = train(device_id, &trainer_data, &plan, &global);
                if done_tx.blocking_send(result).is_err() {
                    return;
                }
            }
        })
        .map_err(|e| format!("cannot start the trainer thread: {e}"))?;

    let (link_tx, mut link_rx) = mpsc::channel::<LinkEvent>(8);
    let mut machine = Machine::new(
        Config {
            device: identity.device,
            memory_mib: cfg.memory_mib,
            ..Config::default()
        },
        state.cached_model()?,
        state.pending()?,
    );
    if machine.has_pending() {
        log("an update from before the restart awaits upload; resuming it");
    }
    let mut status = state.status()?;
    let mut link: Option<Link> = None;
    let mut generation = 0u64;
    let mut timer: Option<Instant> = None;
    let mut queue: std::collections::VecDeque<Output> = machine.start().into();
    let mut accepted_now = 0u64;

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
                    let attempt = async {
                        let conn = endpoint
                            .connect(identity.coordinator, &identity.server_name)
                            .map_err(|e| e.to_string())?
                            .await
                            .map_err(|e| e.to_string())?;
                        let (tx, rx) = conn.open_bi().await.map_err(|e| e.to_string())?;
                        Ok::<_, String>((conn, tx, rx))
                    };
                    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                        Ok(Ok((conn, tx, rx))) => {
                            tokio::spawn(reader(generation, rx, conn.clone(), link_tx.clone()));
                            link = Some(Link {
                                generation,
                                conn,
                                tx,
                            });
                            feed(Input::Connected, &mut queue);
                        }
                        Ok(Err(e)) => {
                            log(format!("cannot connect to {}: {e}", identity.coordinator));
                            feed(Input::Disconnected, &mut queue);
                        }
                        Err(_) => {
                            log(format!("connecting to {} timed out", identity.coordinator));
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
                                    log(format!("not eligible to train now: {why}"));
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
                        log(format!("send failed: {e}"));
                        link = None;
                        feed(Input::Disconnected, &mut queue);
                    }
                }
                Output::Train { plan, global } => {
                    log(format!(
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
                    state.cache_model(&id, &bytes)?;
                }
                Output::SavePending(p) => state.save_pending(&p)?,
                Output::ClearPending => state.clear_pending()?,
                Output::Wait(ms) => timer = Some(Instant::now() + Duration::from_millis(ms)),
                Output::Log(line) => log(line),
                Output::Accepted { task, round } => {
                    log(format!("update for task {task} round {round} accepted"));
                    status.accepted += 1;
                    accepted_now += 1;
                }
                Output::Refused(why) => {
                    log(&why);
                    status.refused += 1;
                    status.last_error = Some(why);
                }
                Output::Stop(why) => {
                    status.last_error = Some(why.clone());
                    state.save_status(&status)?;
                    return Err(why);
                }
            }
            if dirty {
                status.updated_at = fleet_protocol::time::unix_secs();
                state.save_status(&status)?;
            }
            if cfg.max_rounds.is_some_and(|m| accepted_now >= m) {
                if let Some(l) = link.take() {
                    l.conn.close(0u32.into(), b"done");
                }
                endpoint.wait_idle().await;
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
                Some(LinkEvent::Down(g, reason)) if link.as_ref().is_some_and(|l| l.generation == g) => {
                    link = None;
                    if let Some(why) = reason {
                        status.last_error = Some(why.clone());
                        state.save_status(&status)?;
                        return Err(why);
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
