//! The QUIC driver of the round engine: one task per connection, one shared
//! task state, the engine fed with the wall clock.
//!
//! Each connection carries one bidirectional stream on which the agent sends
//! requests and the coordinator answers. The driver checks versions and the
//! peer's role (only devices take part in rounds), turns check-ins and
//! completed uploads into engine events, carries out the engine's actions —
//! send a plan, steer a device away, add an update to the round's streaming
//! aggregate, close a round and publish the next model — and serves model
//! bytes in chunks.
//!
//! State is in memory for now; the embedded database comes next.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_aggregation::codec::{Codec, decode as decode_update};
use fleet_aggregation::privacy::DpConfig;
use fleet_aggregation::{Admission, Cpu, Server as ServerOpt, StrategyConfig, Update};
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::message::{
    AgentMessage, CoordinatorMessage, ObjectId, ObjectRef, Plan, params_to_bytes,
};
use fleet_protocol::stream::{recv, send};
use fleet_protocol::tls::{Role, peer_role};
use fleet_protocol::transfer::{Assembler, chunks};
use fleet_protocol::{ErrorCode, MAX_FRAME, WireError, check_peer_version};
use tokio::sync::Mutex;

use crate::engine::{Action, EngineConfig, Event, Refusal, RoundEngine};

static CPU: Cpu = Cpu;

/// A federated task as the coordinator runs it.
#[derive(Debug, Clone)]
pub struct TaskConfig {
    /// Task id.
    pub id: u64,
    /// Model.
    pub spec: ModelSpec,
    /// Local training sent to devices.
    pub train: TrainConfig,
    /// Aggregation.
    pub strategy: StrategyConfig,
    /// Update codec.
    pub codec: Codec,
    /// Differential privacy devices apply.
    pub dp: Option<DpConfig>,
    /// Rounds, cohort and deadlines.
    pub engine: EngineConfig,
    /// Seed of the initial model.
    pub seed: u64,
}

struct Upload {
    device: u64,
    examples: u64,
    assembler: Assembler,
}

struct State {
    task: TaskConfig,
    engine: RoundEngine,
    global: Vec<f32>,
    model: Vec<u8>,
    model_ref: ObjectRef,
    aggregator: fleet_aggregation::Aggregator<'static>,
    server_opt: ServerOpt,
    uploads: HashMap<ObjectId, Upload>,
    history: Vec<RoundSummary>,
}

/// What a closed round produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundSummary {
    /// Round number.
    pub round: u64,
    /// Updates aggregated.
    pub reports: usize,
    /// The new model object.
    pub model: ObjectRef,
}

/// A running coordinator.
pub struct Coordinator {
    state: Arc<Mutex<State>>,
    started: Instant,
}

fn wire(code: ErrorCode, message: impl Into<String>) -> CoordinatorMessage {
    CoordinatorMessage::Error(WireError {
        code,
        message: message.into(),
    })
}

impl State {
    fn admission(&self) -> Admission {
        let layout = self.task.spec.layout();
        Admission {
            fingerprint: layout.fingerprint(),
            len: layout.total,
            max_norm: None,
        }
    }

    fn plan(&self, round: u64) -> Plan {
        Plan {
            task: self.task.id,
            round,
            model: self.model_ref,
            spec: self.task.spec.clone(),
            train: self.task.train,
            dp: self.task.dp,
            codec: self.task.codec,
            report_within_ms: self.task.engine.report_deadline_ms,
        }
    }

    /// Carries out engine actions that concern the round; returns the reply for `device`, if any.
    fn apply(
        &mut self,
        actions: Vec<Action>,
        device: Option<u64>,
        now: u64,
    ) -> Option<CoordinatorMessage> {
        let mut reply = None;
        for a in actions {
            match a {
                Action::SendPlan { device: d, round } if Some(d) == device => {
                    reply = Some(CoordinatorMessage::Plan(self.plan(round)))
                }
                Action::ComeBackAt { device: d, at } if Some(d) == device => {
                    reply = Some(CoordinatorMessage::ComeBackLater {
                        after_ms: at.saturating_sub(now),
                    })
                }
                Action::RefuseReport {
                    device: d, reason, ..
                } if Some(d) == device => {
                    let code = match reason {
                        Refusal::Duplicate => ErrorCode::Replayed,
                        Refusal::NotOpen | Refusal::NotSelected => ErrorCode::NoSuchRound,
                    };
                    reply = Some(wire(code, format!("report refused: {reason:?}")))
                }
                Action::CloseRound { round, reports } => self.close_round(round, reports),
                Action::AbandonRound { .. } => {
                    self.aggregator = self
                        .task
                        .strategy
                        .aggregator(self.admission(), &CPU)
                        .expect("strategy was validated at start");
                }
                _ => {}
            }
        }
        reply
    }

    fn close_round(&mut self, round: u64, reports: usize) {
        let fresh = self
            .task
            .strategy
            .aggregator(self.admission(), &CPU)
            .expect("strategy was validated at start");
        let done = std::mem::replace(&mut self.aggregator, fresh);
        if let Ok(agg) = done.finish()
            && self
                .server_opt
                .apply(&CPU, &mut self.global, &agg.delta)
                .is_ok()
        {
            self.model = params_to_bytes(&self.global);
            self.model_ref = ObjectRef {
                id: ObjectId::of(&self.model),
                size: self.model.len() as u64,
            };
        }
        self.uploads.clear();
        self.history.push(RoundSummary {
            round,
            reports,
            model: self.model_ref,
        });
    }
}

impl Coordinator {
    /// Sets up a task with its initial model.
    pub fn new(task: TaskConfig) -> Result<Self, String> {
        task.strategy.validate().map_err(|e| e.to_string())?;
        task.spec.validate().map_err(|e| e.to_string())?;
        let global = task.spec.init_params(task.seed);
        let model = params_to_bytes(&global);
        let model_ref = ObjectRef {
            id: ObjectId::of(&model),
            size: model.len() as u64,
        };
        let layout = task.spec.layout();
        let admission = Admission {
            fingerprint: layout.fingerprint(),
            len: layout.total,
            max_norm: None,
        };
        let state = State {
            engine: RoundEngine::new(task.engine, 0)?,
            aggregator: task
                .strategy
                .aggregator(admission, &CPU)
                .map_err(|e| e.to_string())?,
            server_opt: task
                .strategy
                .server(layout.total)
                .map_err(|e| e.to_string())?,
            task,
            global,
            model,
            model_ref,
            uploads: HashMap::new(),
            history: Vec::new(),
        };
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            started: Instant::now(),
        })
    }

    fn now(started: Instant) -> u64 {
        started.elapsed().as_millis() as u64
    }

    /// Serves `endpoint` until every round has closed.
    pub async fn serve(&self, endpoint: quinn::Endpoint) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let state = self.state.clone();
                    let started = self.started;
                    tokio::spawn(async move {
                        if let Ok(conn) = incoming.await {
                            let _ = handle_connection(conn, state, started).await;
                        }
                    });
                }
                _ = tick.tick() => {
                    let mut s = self.state.lock().await;
                    let now = Self::now(self.started);
                    let actions = s.engine.handle(Event::Tick, now);
                    s.apply(actions, None, now);
                    if s.engine.next_deadline().is_none() {
                        break;
                    }
                }
            }
        }
        // Tell every agent the task is over (code 0), then stop.
        endpoint.close(0u32.into(), b"task finished");
    }

    /// The current global parameters.
    pub async fn global(&self) -> Vec<f32> {
        self.state.lock().await.global.clone()
    }

    /// The open round and the number of closed rounds.
    pub async fn progress(&self) -> (u64, u64) {
        let s = self.state.lock().await;
        (s.engine.round(), s.engine.closed())
    }

    /// The closed rounds.
    pub async fn history(&self) -> Vec<RoundSummary> {
        self.state.lock().await.history.clone()
    }
}

async fn handle_connection(
    conn: quinn::Connection,
    state: Arc<Mutex<State>>,
    started: Instant,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let device = match peer_role(&conn) {
        Ok((Role::Device(id), _)) => id,
        Ok((other, _)) => {
            conn.close(
                1u32.into(),
                format!("{other:?} may not take part in rounds").as_bytes(),
            );
            return Ok(());
        }
        Err(e) => {
            conn.close(1u32.into(), e.to_string().as_bytes());
            return Ok(());
        }
    };
    let (mut tx, mut rx) = conn.accept_bi().await?;
    let mut greeted = false;
    while let Some(msg) = recv::<AgentMessage>(&mut rx, MAX_FRAME).await? {
        let now = Coordinator::now(started);
        let reply = match msg {
            AgentMessage::Hello {
                version,
                min_version,
                ..
            } => match check_peer_version(version, min_version) {
                Ok(v) => {
                    greeted = true;
                    CoordinatorMessage::HelloAck { version: v }
                }
                // The agent learns why and may retry with a version we accept.
                Err(e) => CoordinatorMessage::Error(e.to_wire()),
            },
            _ if !greeted => wire(ErrorCode::Malformed, "send Hello first"),
            AgentMessage::CheckIn { capabilities } => {
                let mut s = state.lock().await;
                if !capabilities.eligible {
                    CoordinatorMessage::ComeBackLater { after_ms: 60_000 }
                } else {
                    let actions = s.engine.handle(Event::CheckIn { device }, now);
                    s.apply(actions, Some(device), now)
                        .unwrap_or(CoordinatorMessage::ComeBackLater { after_ms: 1_000 })
                }
            }
            AgentMessage::Fetch { object, offset } => {
                let (model, model_ref) = {
                    let s = state.lock().await;
                    (s.model.clone(), s.model_ref)
                };
                if object != model_ref.id {
                    wire(
                        ErrorCode::NoSuchRound,
                        format!("object {object} is not the current model"),
                    )
                } else {
                    for (off, data) in chunks(&model, offset) {
                        let chunk = CoordinatorMessage::Chunk {
                            object,
                            offset: off,
                            total: model_ref.size,
                            data: data.to_vec(),
                        };
                        send(&mut tx, &chunk).await?;
                    }
                    continue;
                }
            }
            AgentMessage::BeginUpload(meta) => {
                let mut s = state.lock().await;
                let max = 8 * s.task.spec.layout().total as u64 + 1024;
                if meta.task != s.task.id || meta.round != s.engine.round() {
                    wire(
                        ErrorCode::NoSuchRound,
                        format!("round {} of task {} is not open", meta.round, meta.task),
                    )
                } else if meta.fingerprint != s.admission().fingerprint {
                    wire(
                        ErrorCode::UpdateRejected,
                        "update computed for another model layout",
                    )
                } else {
                    match s.uploads.get(&meta.object.id) {
                        Some(u) if u.device == device => CoordinatorMessage::UploadProgress {
                            object: meta.object.id,
                            received: u.assembler.received(),
                        },
                        Some(_) => wire(
                            ErrorCode::Replayed,
                            "this update was announced by another device",
                        ),
                        None => match Assembler::new(meta.object, max) {
                            Ok(assembler) => {
                                s.uploads.insert(
                                    meta.object.id,
                                    Upload {
                                        device,
                                        examples: meta.examples,
                                        assembler,
                                    },
                                );
                                CoordinatorMessage::UploadProgress {
                                    object: meta.object.id,
                                    received: 0,
                                }
                            }
                            Err(e) => CoordinatorMessage::Error(e.to_wire()),
                        },
                    }
                }
            }
            AgentMessage::UploadChunk {
                object,
                offset,
                data,
            } => {
                let mut s = state.lock().await;
                s.receive_chunk(device, object, offset, &data, now)
            }
        };
        send(&mut tx, &reply).await?;
    }
    Ok(())
}

impl State {
    fn receive_chunk(
        &mut self,
        device: u64,
        object: ObjectId,
        offset: u64,
        data: &[u8],
        now: u64,
    ) -> CoordinatorMessage {
        let Some(upload) = self.uploads.get_mut(&object).filter(|u| u.device == device) else {
            return wire(
                ErrorCode::Malformed,
                "chunk for an update that was not announced",
            );
        };
        if let Err(e) = upload.assembler.accept(offset, data) {
            return CoordinatorMessage::Error(e.to_wire());
        }
        if !upload.assembler.is_complete() {
            return CoordinatorMessage::UploadProgress {
                object,
                received: upload.assembler.received(),
            };
        }
        let upload = self.uploads.remove(&object).expect("present");
        let bytes = match upload.assembler.finish() {
            Ok(b) => b,
            Err(e) => return CoordinatorMessage::Error(e.to_wire()),
        };
        let admission = self.admission();
        let values = match decode_update(&bytes, admission.len) {
            Ok(v) => v,
            Err(e) => return wire(ErrorCode::UpdateRejected, e.to_string()),
        };
        let weight = if self.task.dp.is_some() {
            1.0
        } else {
            upload.examples as f64
        };
        let update = Update {
            fingerprint: admission.fingerprint,
            values: &values,
            weight,
        };
        if let Err(r) = admission.check(&update) {
            return wire(ErrorCode::UpdateRejected, r.to_string());
        }
        let round = self.engine.round();
        let actions = self.engine.handle(Event::Report { device, round }, now);
        let accepted = actions
            .iter()
            .any(|a| matches!(a, Action::AcceptReport { device: d, .. } if *d == device));
        if accepted && let Err(r) = self.aggregator.add(&update) {
            return wire(ErrorCode::UpdateRejected, r.to_string());
        }
        let refusal = self.apply(actions, Some(device), now);
        match (accepted, refusal) {
            (true, _) => CoordinatorMessage::UploadAccepted { object },
            (false, Some(r)) => r,
            (false, None) => wire(ErrorCode::NoSuchRound, "report refused"),
        }
    }
}

/// Binds a QUIC endpoint for the coordinator.
pub fn bind(addr: SocketAddr, config: quinn::ServerConfig) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::server(config, addr)
}
