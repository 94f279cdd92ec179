//! A working device as the agent runs it: the simulator feeds the agent's
//! own sans-IO state machine ([`fleet_edge_agent::machine::Machine`]) the
//! messages the coordinator would send, and takes the update from the
//! upload the machine makes.
//!
//! A device gets a machine when it is sent a plan and loses it when its
//! work ends (report or dropout); idle devices stay a check-in time in the
//! driver's queue. The exchange happens at the virtual instants the driver
//! chooses — the plan when the engine selects the device, the upload when
//! its report is due — and costs no virtual time itself (the profile's
//! bandwidths account for transfers):
//!
//! 1. `Connected` → the machine says `Hello` → `HelloAck` → it checks in →
//!    the engine's plan → it fetches the model → chunks of the global
//!    model's bytes → it checks their SHA-256 and asks to train ([`start`]);
//! 2. the driver trains (lazily, in parallel) and feeds the result → the
//!    machine announces the update and uploads it chunk by chunk, each chunk
//!    acknowledged with the bytes held, and the simulated coordinator
//!    reassembles and verifies it ([`Agent::upload`]);
//! 3. the engine's verdict goes back as `UploadAccepted` or a refusal, and
//!    the machine settles its pending update ([`Agent::verdict`]).
//!
//! With secure aggregation step 2 ends differently: the machine advertises
//! its round keys ([`Agent::advertise`]), and the driver hands it each of the
//! core's protocol messages when it arrives ([`Agent::answer`]: shares,
//! the masked input in chunks, the reveal); the exchange ends when the
//! reveal is taken ([`Agent::revealed`]). Simulated devices sign with
//! Ed25519 keys derived from the fleet's seed (`fleet_secagg::pki`).
//!
//! Any deviation from that exchange is an error naming the step: the
//! simulation then tests the agent's protocol logic on every plan.

use std::sync::Arc;

use fleet_edge_agent::machine::{Config, Input, Machine, Output, SecureIdentity, Trained};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, ObjectRef, Plan, UpdateMeta};
use fleet_protocol::transfer::{Assembler, chunks};
use fleet_protocol::{ErrorCode, PROTOCOL_VERSION, WireError};
use fleet_secagg::message::Words;
use fleet_secagg::{DeviceMessage, ServerMessage};

/// The global model of the open round, as the coordinator serves it.
#[derive(Debug, Clone)]
pub struct ModelObject {
    /// Its name and size.
    pub object: ObjectRef,
    /// Its bytes (flat parameters, little-endian f32).
    pub bytes: Arc<Vec<u8>>,
}

impl ModelObject {
    /// The object of `params`.
    pub fn of(params: &[f32]) -> Self {
        let bytes = fleet_protocol::message::params_to_bytes(params);
        Self {
            object: ObjectRef {
                id: fleet_protocol::message::ObjectId::of(&bytes),
                size: bytes.len() as u64,
            },
            bytes: Arc::new(bytes),
        }
    }
}

/// A device's agent, between its plan and the end of its work.
#[derive(Debug)]
pub struct Agent {
    machine: Machine,
    plan: Plan,
}

/// The messages the machine sent in answer to one input.
fn sent(outputs: Vec<Output>) -> Vec<AgentMessage> {
    outputs
        .into_iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

/// Why the machine gave up, if it did.
fn refusal(outputs: &[Output]) -> Option<String> {
    outputs.iter().find_map(|o| match o {
        Output::Refused(why) => Some(why.clone()),
        _ => None,
    })
}

fn one(step: &str, outputs: Vec<Output>) -> Result<AgentMessage, String> {
    let mut msgs = sent(outputs);
    match (msgs.pop(), msgs.is_empty()) {
        (Some(m), true) => Ok(m),
        (m, _) => Err(format!(
            "agent protocol, {step}: expected one message, got {m:?}"
        )),
    }
}

/// Device `device` receives `plan` for `model`: the agent greets, checks in,
/// fetches and verifies the model, and asks to train. `identity` signs a
/// secure round's keys.
pub fn start(
    device: u64,
    plan: Plan,
    model: &ModelObject,
    identity: Option<SecureIdentity>,
) -> Result<Agent, String> {
    let mut m = Machine::new(
        Config {
            device,
            ..Config::default()
        },
        None,
        None,
    );
    if let Some(identity) = identity {
        m.set_secure_identity(identity);
    }
    match one("connect", m.handle(Input::Connected))? {
        AgentMessage::Hello { .. } => {}
        other => return Err(format!("agent protocol: expected Hello, got {other:?}")),
    }
    let ack = CoordinatorMessage::HelloAck {
        version: PROTOCOL_VERSION,
    };
    match one("hello", m.handle(Input::Message(ack)))? {
        AgentMessage::CheckIn { .. } => {}
        other => return Err(format!("agent protocol: expected CheckIn, got {other:?}")),
    }
    let offset = match one(
        "plan",
        m.handle(Input::Message(CoordinatorMessage::Plan(plan.clone()))),
    )? {
        AgentMessage::Fetch { object, offset } if object == model.object.id => offset,
        other => {
            return Err(format!(
                "agent protocol: expected Fetch of the model, got {other:?}"
            ));
        }
    };
    let mut train = false;
    for (off, data) in chunks(&model.bytes, offset) {
        let chunk = CoordinatorMessage::Chunk {
            object: model.object.id,
            offset: off,
            total: model.object.size,
            data: data.to_vec(),
        };
        for o in m.handle(Input::Message(chunk)) {
            match o {
                Output::Train { plan: p, .. } => train = p == plan,
                Output::Refused(why) => return Err(format!("agent refused the model: {why}")),
                _ => {}
            }
        }
    }
    if !train {
        return Err("agent protocol: the model arrived but the agent did not train".into());
    }
    Ok(Agent { machine: m, plan })
}

impl Agent {
    /// The plan the device received.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// What the trainer hands the machine for this plan.
    fn trained(
        &self,
        (bytes, examples, loss): (Vec<u8>, u64, f32),
        secure_input: Option<Vec<u32>>,
    ) -> Trained {
        Trained {
            task: self.plan.task,
            round: self.plan.round,
            fingerprint: self.plan.spec.layout().fingerprint(),
            bytes,
            examples,
            loss,
            secure_input,
        }
    }

    /// Local training finished with `result` (encoded update, examples,
    /// loss): the agent uploads it. Returns what the coordinator received,
    /// verified against the announcement, or why training failed.
    pub fn upload(
        &mut self,
        result: Result<(Vec<u8>, u64, f32), String>,
    ) -> Result<(UpdateMeta, Vec<u8>), String> {
        let trained = result.map(|r| self.trained(r, None));
        let failed = trained.as_ref().err().cloned();
        let mut msgs = sent(self.machine.handle(Input::Trained(trained)));
        if let Some(e) = failed {
            return Err(e);
        }
        let meta = match (msgs.pop(), msgs.is_empty()) {
            (Some(AgentMessage::BeginUpload(meta)), true) => meta,
            other => {
                return Err(format!(
                    "agent protocol: expected BeginUpload, got {other:?}"
                ));
            }
        };
        let mut asm = Assembler::new(meta.object, meta.object.size).map_err(|e| e.to_string())?;
        let mut received = 0;
        loop {
            let progress = CoordinatorMessage::UploadProgress {
                object: meta.object.id,
                received,
            };
            match one("upload", self.machine.handle(Input::Message(progress)))? {
                AgentMessage::UploadChunk {
                    object,
                    offset,
                    data,
                } if object == meta.object.id => {
                    asm.accept(offset, &data).map_err(|e| e.to_string())?;
                    received = offset + data.len() as u64;
                    // The last chunk: the coordinator answers with its verdict.
                    if asm.is_complete() {
                        break;
                    }
                }
                other => {
                    return Err(format!(
                        "agent protocol: expected UploadChunk, got {other:?}"
                    ));
                }
            }
        }
        let bytes = asm.finish().map_err(|e| format!("uploaded update: {e}"))?;
        Ok((meta, bytes))
    }

    /// Secure aggregation: training finished with the quantised `input`
    /// (and the encoded update, examples and loss the machine is told);
    /// returns the advertisement of the device's round keys.
    pub fn advertise(
        &mut self,
        result: (Vec<u8>, u64, f32),
        input: Vec<u32>,
    ) -> Result<DeviceMessage, String> {
        let trained = self.trained(result, Some(input));
        let outputs = self.machine.handle(Input::Trained(Ok(trained)));
        if let Some(why) = refusal(&outputs) {
            return Err(why);
        }
        match one("advertise", outputs)? {
            AgentMessage::Secure {
                message: Some(ad @ DeviceMessage::Advertise(_)),
                ..
            } => Ok(ad),
            other => Err(format!(
                "agent protocol: expected an advertisement, got {other:?}"
            )),
        }
    }

    /// Secure aggregation: the core's `message` reaches the device; returns
    /// its answer (a masked input sent in chunks is reassembled as the
    /// coordinator does), or why the device left the round.
    pub fn answer(&mut self, message: ServerMessage) -> Result<DeviceMessage, String> {
        let reply = CoordinatorMessage::Secure {
            message: Some(message),
            after_ms: 0,
        };
        let outputs = self.machine.handle(Input::Message(reply));
        if let Some(why) = refusal(&outputs) {
            return Err(why);
        }
        let mut masked = Vec::new();
        let mut msg = one("secure exchange", outputs)?;
        loop {
            match msg {
                AgentMessage::Secure {
                    message: Some(m), ..
                } => return Ok(m),
                AgentMessage::SecureChunk { offset, data, .. } if offset == masked.len() as u64 => {
                    masked.extend_from_slice(&data);
                    if masked.len() == 4 * self.secure_length()? {
                        let words = masked
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                            .collect();
                        return Ok(DeviceMessage::Masked(Words(words)));
                    }
                    let ack = CoordinatorMessage::Secure {
                        message: None,
                        after_ms: 0,
                    };
                    msg = one("masked input", self.machine.handle(Input::Message(ack)))?;
                }
                other => {
                    return Err(format!(
                        "agent protocol: expected a secure-aggregation answer, got {other:?}"
                    ));
                }
            }
        }
    }

    /// Secure aggregation: the coordinator took the device's last message.
    /// After the reveal the agent counts its round accepted.
    pub fn taken(&mut self, revealed: bool) -> Result<(), String> {
        let ack = CoordinatorMessage::Secure {
            message: None,
            after_ms: 1_000,
        };
        let outs = self.machine.handle(Input::Message(ack));
        let accepted = outs.iter().any(|o| matches!(o, Output::Accepted { .. }));
        if accepted == revealed {
            Ok(())
        } else {
            Err(format!(
                "agent protocol: after its {} message the agent did {outs:?}",
                if revealed { "last" } else { "a" }
            ))
        }
    }

    fn secure_length(&self) -> Result<usize, String> {
        self.plan
            .secure
            .as_ref()
            .map(|s| s.context.params.length as usize)
            .ok_or_else(|| "agent protocol: a masked input in a plain round".to_string())
    }

    /// The coordinator's verdict on the upload; the agent settles its update.
    pub fn verdict(mut self, accepted: bool) -> Result<(), String> {
        let object = self
            .machine
            .pending_object()
            .ok_or("agent protocol: no pending update to settle")?;
        let reply = if accepted {
            CoordinatorMessage::UploadAccepted { object }
        } else {
            CoordinatorMessage::Error(WireError {
                code: ErrorCode::NoSuchRound,
                message: format!("round {} is not open", self.plan.round),
            })
        };
        let outs = self.machine.handle(Input::Message(reply));
        let settled = outs.iter().any(|o| matches!(o, Output::ClearPending));
        if settled && !self.machine.has_pending() {
            Ok(())
        } else {
            Err(format!(
                "agent protocol: the verdict did not settle the update ({outs:?})"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_aggregation::codec::Codec;
    use fleet_models::{ModelSpec, TrainConfig};

    fn plan(model: &ModelObject) -> Plan {
        Plan {
            task: 1,
            round: 3,
            model: model.object,
            spec: ModelSpec::LogReg {
                inputs: 4,
                classes: 2,
            },
            train: TrainConfig::default(),
            dp: None,
            codec: Codec::F32,
            report_within_ms: 1000,
            secure: None,
        }
    }

    #[test]
    fn a_plan_is_fetched_trained_uploaded_and_settled() {
        // Large enough for several chunks.
        let params: Vec<f32> = (0..200_000).map(|i| i as f32).collect();
        let model = ModelObject::of(&params);
        let mut a = start(7, plan(&model), &model, None).unwrap();
        let update: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let (meta, bytes) = a.upload(Ok((update.clone(), 12, 0.5))).unwrap();
        assert_eq!(bytes, update);
        assert_eq!((meta.task, meta.round, meta.examples), (1, 3, Some(12)));
        a.verdict(true).unwrap();
    }

    #[test]
    fn a_refused_update_is_settled_too_and_failures_are_reported() {
        let model = ModelObject::of(&[1.0; 10]);
        let mut a = start(1, plan(&model), &model, None).unwrap();
        a.upload(Ok((vec![1, 2, 3], 1, 0.1))).unwrap();
        a.verdict(false).unwrap();
        let mut b = start(2, plan(&model), &model, None).unwrap();
        let e = b.upload(Err("no local data".into())).unwrap_err();
        assert_eq!(e, "no local data");
    }

    #[test]
    fn a_model_that_does_not_match_its_name_is_refused_by_the_agent() {
        let mut model = ModelObject::of(&[1.0; 10]);
        let mut damaged = (*model.bytes).clone();
        damaged[3] ^= 1;
        model.bytes = Arc::new(damaged);
        let e = start(1, plan(&model), &model, None).unwrap_err();
        assert!(e.contains("agent refused the model"), "{e}");
    }
}
