//! The agent's protocol logic as a sans-IO state machine.
//!
//! [`Machine`] is fed [`Input`]s (the link came up or went down, a message
//! arrived, local training finished, a timer fired) with the current time
//! and returns [`Output`]s for its driver to carry out (send a message,
//! start training, persist or forget a pending update, cache a model, wait,
//! reconnect). It never blocks and does no I/O, so the same logic runs in
//! the agent binary and under a simulator's virtual clock, and its tests
//! need no network.
//!
//! The link and the work are separate: training goes on while the link is
//! down, and a trained update is kept (and persisted by the driver) until
//! the coordinator accepts or refuses it. After a reconnection the pending
//! update is announced again and its upload resumes from the offset the
//! coordinator reports.
//!
//! A plan with secure aggregation ends differently: the trained update,
//! quantised with the round's noise share, is never uploaded. The machine
//! runs the device's side of SecAgg+ ([`fleet_secagg::Device`], see
//! `secure.rs`): it advertises its round keys signed with the device's
//! certificate key, then polls the coordinator for the protocol's messages
//! and answers each (encrypted shares, the masked input in chunks, the
//! reveal). The exchange survives a lost link: after reconnecting the
//! machine polls again (a masked input in flight starts over).
//!
//! Reconnection uses exponential backoff with full jitter (AWS's
//! "Exponential Backoff and Jitter", 2015): the `n`th consecutive failure
//! waits a uniform time in `[0, min(cap, base·2ⁿ)]`.

use std::sync::Arc;

use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, Plan, UpdateMeta, bytes_to_params,
};
use fleet_protocol::transfer::{Assembler, CHUNK_SIZE};
use fleet_protocol::{ErrorCode, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::state::Pending;

mod secure;
pub use secure::SecureIdentity;
use secure::SecureRound;

/// Settings of the machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// This device's id (seeds its jitter and local training).
    pub device: u64,
    /// Memory the agent may use for training, in MiB (told to the coordinator).
    pub memory_mib: u32,
    /// First backoff bound (ms).
    pub backoff_base_ms: u64,
    /// Largest backoff bound (ms).
    pub backoff_cap_ms: u64,
    /// Largest model accepted (bytes).
    pub max_model_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device: 0,
            memory_mib: 256,
            backoff_base_ms: 500,
            backoff_cap_ms: 60_000,
            max_model_bytes: 1 << 30,
        }
    }
}

/// A trained, encoded update.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    /// The plan it answers.
    pub task: u64,
    /// Round.
    pub round: u64,
    /// Layout it was computed for.
    pub fingerprint: fleet_models::LayoutFingerprint,
    /// Encoded update.
    pub bytes: Vec<u8>,
    /// Local examples.
    pub examples: u64,
    /// Mean training loss.
    pub loss: f32,
    /// With secure aggregation: the update as the round's quantiser made
    /// it (clipped, rotated, scaled, rounded, with the device's noise).
    pub secure_input: Option<Vec<u32>>,
}

/// What happens to the machine.
#[derive(Debug)]
pub enum Input {
    /// The link to the coordinator is up.
    Connected,
    /// The link went down; `task_over` when the coordinator closed it normally.
    Disconnected,
    /// A message from the coordinator.
    Message(CoordinatorMessage),
    /// Local training finished.
    Trained(Result<Trained, String>),
    /// The wait the machine asked for is over.
    Timer,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Open a connection now.
    Connect,
    /// Send a message on the link.
    Send(AgentMessage),
    /// Train on the local data from `global` as `plan` says.
    Train {
        /// The plan.
        plan: Plan,
        /// The global model.
        global: Arc<Vec<f32>>,
    },
    /// Store the fetched model (for a restart).
    CacheModel(ObjectId, Arc<Vec<u8>>),
    /// Persist this update before uploading it.
    SavePending(Pending),
    /// The pending update is settled (accepted or refused): forget it.
    ClearPending,
    /// Feed [`Input::Timer`] after this many milliseconds (replaces any earlier timer).
    Wait(u64),
    /// Something worth a log line.
    Log(String),
    /// An update was accepted.
    Accepted {
        /// Task.
        task: u64,
        /// Round.
        round: u64,
    },
    /// An update was refused or discarded.
    Refused(String),
    /// The coordinator speaks an incompatible protocol: stop.
    Stop(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Greeting,
    Up,
}

#[derive(Debug)]
enum Work {
    /// Nothing in hand: check in when the link is up.
    Idle,
    /// Check-in sent, waiting for a plan or a come-back time.
    CheckingIn,
    /// Told to come back later.
    Sleeping,
    /// Downloading the model of a plan.
    Fetching { plan: Box<Plan>, asm: Assembler },
    /// Training in the background (for a private task when `private`: its
    /// report then reveals neither its examples nor its loss; with secure
    /// aggregation when `secure`).
    Training {
        private: bool,
        secure: Option<Box<fleet_protocol::message::SecurePlan>>,
    },
    /// An update is announced or being uploaded.
    Uploading,
    /// In a round's secure-aggregation exchange.
    Secure(Box<SecureRound>),
}

/// The agent's state machine.
#[derive(Debug)]
pub struct Machine {
    cfg: Config,
    link: Link,
    work: Work,
    model: Option<(ObjectId, Arc<Vec<f32>>)>,
    pending: Option<Pending>,
    /// An announcement awaits its first progress report.
    announced: bool,
    failures: u32,
    rng: ChaCha8Rng,
    /// The keys of secure aggregation, when the driver has them.
    identity: Option<SecureIdentity>,
}

impl Machine {
    /// A machine with the model cached on disk (if any) and a pending update (if any).
    pub fn new(cfg: Config, cached: Option<(ObjectId, Vec<u8>)>, pending: Option<Pending>) -> Self {
        let model =
            cached.and_then(|(id, bytes)| bytes_to_params(&bytes).map(|p| (id, Arc::new(p))));
        Self {
            cfg,
            link: Link::Down,
            work: Work::Idle,
            model,
            pending,
            announced: false,
            failures: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.device ^ 0x6167_656e_7400),
            identity: None,
        }
    }

    /// Sets (or replaces, after a certificate renewal) what secure
    /// aggregation signs and checks advertisements with. Without it, a
    /// plan with secure aggregation is refused.
    pub fn set_secure_identity(&mut self, identity: SecureIdentity) {
        self.identity = Some(identity);
    }

    /// Starts the machine: connect.
    pub fn start(&mut self) -> Vec<Output> {
        vec![Output::Connect]
    }

    /// Whether an update awaits upload.
    pub fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The object of the update awaiting upload, if any.
    pub fn pending_object(&self) -> Option<ObjectId> {
        self.pending.as_ref().map(|p| p.meta.object.id)
    }

    fn backoff(&mut self) -> u64 {
        let exp = self.failures.min(20);
        let bound = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1 << exp)
            .min(self.cfg.backoff_cap_ms);
        self.failures = self.failures.saturating_add(1);
        self.rng.random_range(0..=bound)
    }

    fn check_in(&mut self, out: &mut Vec<Output>) {
        self.work = Work::CheckingIn;
        out.push(Output::Send(AgentMessage::CheckIn {
            capabilities: Capabilities {
                memory_mib: self.cfg.memory_mib,
                // The driver sets this from the eligibility rules when it sends.
                eligible: true,
            },
        }));
    }

    fn announce(&mut self, out: &mut Vec<Output>) {
        if let Some(p) = &self.pending {
            self.work = Work::Uploading;
            self.announced = true;
            out.push(Output::Send(AgentMessage::BeginUpload(p.meta.clone())));
        }
    }

    /// What to do next once the link is up and nothing is in flight.
    fn next(&mut self, out: &mut Vec<Output>) {
        if self.pending.is_some() {
            self.announce(out);
        } else {
            self.check_in(out);
        }
    }

    fn settle(&mut self, out: &mut Vec<Output>) {
        self.pending = None;
        out.push(Output::ClearPending);
        self.check_in(out);
    }

    /// Feeds one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Connected => {
                self.link = Link::Greeting;
                out.push(Output::Send(AgentMessage::Hello {
                    version: PROTOCOL_VERSION,
                    min_version: MIN_SUPPORTED_VERSION,
                    software: concat!("fleet-edge-agent ", env!("CARGO_PKG_VERSION")).into(),
                }));
            }
            Input::Disconnected => {
                self.link = Link::Down;
                // Training and a secure exchange go on; anything else
                // waiting for an answer starts over.
                if !matches!(self.work, Work::Training { .. } | Work::Secure(_)) {
                    self.work = Work::Idle;
                }
                let wait = self.backoff();
                out.push(Output::Log(format!("link down; reconnecting in {wait} ms")));
                out.push(Output::Wait(wait));
            }
            Input::Timer => match (self.link, &self.work) {
                (Link::Down, _) => out.push(Output::Connect),
                (Link::Up, Work::Sleeping | Work::Idle) => self.next(&mut out),
                (Link::Up, Work::Secure(_)) => self.secure_poll(&mut out),
                _ => {}
            },
            Input::Trained(result) => {
                // A private task's report keeps the device's example count
                // and loss to itself: the coordinator would see them in the
                // clear, outside the noise.
                let (private, secure) = match std::mem::replace(&mut self.work, Work::Idle) {
                    Work::Training { private, secure } => (private, secure),
                    _ => (false, None),
                };
                match result {
                    Ok(t) if secure.is_some() => {
                        let plan = secure.expect("checked");
                        self.secure_start(t, *plan, &mut out);
                    }
                    Ok(t) => {
                        let meta = UpdateMeta {
                            task: t.task,
                            round: t.round,
                            fingerprint: t.fingerprint,
                            object: fleet_protocol::message::ObjectRef {
                                id: ObjectId::of(&t.bytes),
                                size: t.bytes.len() as u64,
                            },
                            examples: (!private).then_some(t.examples),
                            train_loss: (!private).then_some(t.loss),
                        };
                        let p = Pending {
                            meta,
                            bytes: t.bytes,
                        };
                        out.push(Output::SavePending(p.clone()));
                        self.pending = Some(p);
                        if self.link == Link::Up {
                            self.announce(&mut out);
                        }
                    }
                    Err(e) => {
                        out.push(Output::Refused(format!("local training failed: {e}")));
                        if self.link == Link::Up {
                            self.work = Work::Sleeping;
                            out.push(Output::Wait(self.cfg.backoff_base_ms));
                        }
                    }
                }
            }
            Input::Message(msg) => self.message(msg, &mut out),
        }
        out
    }

    fn message(&mut self, msg: CoordinatorMessage, out: &mut Vec<Output>) {
        match msg {
            CoordinatorMessage::HelloAck { .. } if self.link == Link::Greeting => {
                self.link = Link::Up;
                self.failures = 0;
                match self.work {
                    Work::Training { .. } => {}
                    Work::Secure(_) => self.secure_resume(out),
                    _ => self.next(out),
                }
            }
            CoordinatorMessage::Error(e) if self.link == Link::Greeting => {
                if e.code == ErrorCode::IncompatibleVersion {
                    out.push(Output::Stop(format!(
                        "the coordinator refused this agent's protocol: {}; upgrade the agent",
                        e.message
                    )));
                } else {
                    out.push(Output::Log(format!("hello refused: {e}")));
                    self.link = Link::Down;
                    let wait = self.backoff();
                    out.push(Output::Wait(wait));
                }
            }
            CoordinatorMessage::ComeBackLater { after_ms } => {
                self.work = Work::Sleeping;
                if after_ms >= 10_000 {
                    out.push(Output::Log(format!(
                        "no work now; checking in again in {} s",
                        after_ms / 1000
                    )));
                }
                out.push(Output::Wait(after_ms));
            }
            CoordinatorMessage::Plan(plan) => self.plan(plan, out),
            CoordinatorMessage::Chunk {
                object,
                offset,
                data,
                ..
            } => {
                let Work::Fetching { plan, asm } = &mut self.work else {
                    out.push(Output::Log("unexpected model chunk ignored".into()));
                    return;
                };
                if object != plan.model.id {
                    out.push(Output::Log("chunk of another object ignored".into()));
                    return;
                }
                if let Err(e) = asm.accept(offset, &data) {
                    out.push(Output::Refused(format!("model download failed: {e}")));
                    self.check_in(out);
                    return;
                }
                if !asm.is_complete() {
                    return;
                }
                let (private, secure) = match &self.work {
                    Work::Fetching { plan, .. } => (plan.dp.is_some(), plan.secure.clone()),
                    _ => (false, None),
                };
                let Work::Fetching { plan, asm } =
                    std::mem::replace(&mut self.work, Work::Training { private, secure })
                else {
                    unreachable!("matched above")
                };
                match asm.finish().ok().and_then(|b| {
                    let params = bytes_to_params(&b)?;
                    Some((b, params))
                }) {
                    Some((bytes, params)) => {
                        let global = Arc::new(params);
                        self.model = Some((plan.model.id, global.clone()));
                        out.push(Output::CacheModel(plan.model.id, Arc::new(bytes)));
                        out.push(Output::Train {
                            plan: *plan,
                            global,
                        });
                    }
                    None => {
                        out.push(Output::Refused("downloaded model is corrupt".into()));
                        self.check_in(out);
                    }
                }
            }
            CoordinatorMessage::UploadProgress { object, received } => {
                let Some(p) = &self.pending else { return };
                if object != p.meta.object.id {
                    return;
                }
                if std::mem::take(&mut self.announced) && received > 0 {
                    out.push(Output::Log(format!(
                        "resuming the upload at byte {received} of {}",
                        p.bytes.len()
                    )));
                }
                let start = received.min(p.bytes.len() as u64) as usize;
                let end = (start + CHUNK_SIZE).min(p.bytes.len());
                if start == end {
                    // Everything arrived but no verdict: announce again for it.
                    self.announce(out);
                    return;
                }
                self.work = Work::Uploading;
                out.push(Output::Send(AgentMessage::UploadChunk {
                    object,
                    offset: start as u64,
                    data: p.bytes[start..end].to_vec(),
                }));
            }
            CoordinatorMessage::UploadAccepted { object } => {
                if let Some(p) = &self.pending
                    && p.meta.object.id == object
                {
                    out.push(Output::Accepted {
                        task: p.meta.task,
                        round: p.meta.round,
                    });
                    self.settle(out);
                }
            }
            CoordinatorMessage::Secure { message, after_ms } => {
                self.secure_reply(message, after_ms, out);
            }
            CoordinatorMessage::Error(e) => match self.work {
                Work::Secure(_) => self.secure_refused(&e, out),
                Work::Uploading => {
                    // The round closed, the update was a replay or was refused:
                    // it can never be accepted, so it is dropped.
                    out.push(Output::Refused(format!("update refused: {e}")));
                    self.settle(out);
                }
                _ => {
                    out.push(Output::Log(format!("coordinator refused: {e}")));
                    self.work = Work::Sleeping;
                    let wait = self.backoff();
                    out.push(Output::Wait(wait));
                }
            },
            CoordinatorMessage::HelloAck { .. }
            | CoordinatorMessage::Enrolled { .. }
            | CoordinatorMessage::Renewed { .. }
            | CoordinatorMessage::Deployment(_)
            | CoordinatorMessage::DriftSpec(_)
            | CoordinatorMessage::DriftAccepted { .. } => {
                out.push(Output::Log("unexpected message ignored".into()));
            }
        }
    }

    fn plan(&mut self, plan: Plan, out: &mut Vec<Output>) {
        if self.pending.is_some() {
            // An older update is unsettled; finish it first.
            self.announce(out);
            return;
        }
        if plan.secure.is_some() && self.identity.is_none() {
            out.push(Output::Refused(
                "plan refused: the task runs secure aggregation, which needs this device's \
                 certificate key to sign its round keys, and none is configured"
                    .into(),
            ));
            self.work = Work::Sleeping;
            out.push(Output::Wait(self.cfg.backoff_cap_ms));
            return;
        }
        if let Some((id, global)) = &self.model
            && *id == plan.model.id
        {
            self.work = Work::Training {
                private: plan.dp.is_some(),
                secure: plan.secure.clone(),
            };
            out.push(Output::Train {
                plan,
                global: global.clone(),
            });
            return;
        }
        match Assembler::new(plan.model, self.cfg.max_model_bytes) {
            Ok(asm) => {
                out.push(Output::Send(AgentMessage::Fetch {
                    object: plan.model.id,
                    offset: 0,
                }));
                self.work = Work::Fetching {
                    plan: Box::new(plan),
                    asm,
                };
            }
            Err(e) => {
                out.push(Output::Refused(format!("plan refused: {e}")));
                self.work = Work::Sleeping;
                out.push(Output::Wait(self.cfg.backoff_cap_ms));
            }
        }
    }
}

#[cfg(test)]
mod tests;
