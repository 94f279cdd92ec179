//! Devices' requests to the running task on a replica that does not run it.
//!
//! Any replica accepts any device. Requests that need the task's core (a
//! check-in, an upload's announcement and chunks, secure aggregation's
//! messages) are answered at once by the replica that owns the task, and
//! otherwise **relayed** through the shared store: the receiving replica
//! writes the request (`relay_requests`) and the QUIC driver waits for its
//! answer; the owner, on every tick, answers the relayed requests of its
//! task in order exactly as it answers its own devices' (the same
//! methods), and writes each answer (`relay_replies`) in the transaction
//! that removes the request; the receiving replica, on every tick, takes
//! the answers addressed to it and wakes the waiting connections
//! ([`Effect::RelayReady`]).
//!
//! An update is acknowledged only when the owner's answer says so, after
//! the owner committed it, so relaying loses nothing acknowledged. A
//! request still waiting when its owner dies is answered by the next owner
//! once it takes the lease (or expires, and the device, whose connection
//! the driver closes when it waits too long, announces its update again).

use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::{ErrorCode, WireError};
use tracing::warn;

use super::{App, Effect};
use crate::runner::refuse;
use crate::store::{StoreError, unix_millis};

/// Requests of its task an owner answers per tick (a tick is 50 ms).
pub const RELAY_BATCH: usize = 256;

/// The relay tables are read at least this often (driver milliseconds),
/// notified or not.
pub const RELAY_POLL_MS: u64 = 1_000;

/// Relayed requests and answers older than this are dropped: their
/// replica stopped waiting long ago, or died.
pub const RELAY_EXPIRY_MS: u64 = 60_000;

/// What the owner answered to a relayed request.
#[derive(Debug, Clone, PartialEq)]
pub enum RelayReply {
    /// The answer, to send to the device.
    Answer(Box<CoordinatorMessage>),
    /// The owner has not heard of the upload this chunk belongs to (it took
    /// the task over after the announcement): end the device's connection,
    /// so that it announces the update again on its next one. (An error
    /// would make it drop the update.)
    Restart,
}

/// How a [`RelayReply::Restart`] is stored: no message.
const RESTART: &[u8] = &[];

/// The answer to a device's request to the running task.
#[derive(Debug)]
pub enum TaskAnswer {
    /// Answered here.
    Now(Box<CoordinatorMessage>),
    /// Relayed to the owner: the answer comes under this id
    /// ([`App::take_relay_reply`], announced by [`Effect::RelayReady`]).
    Relayed(u64),
    /// On a shared store, the store failed under an upload: no answer (an
    /// error would make the device drop its update); the driver ends the
    /// connection (or, to a check-in, says come back later) and the device
    /// announces the update again on its next one.
    Unavailable,
}

impl App {
    /// A device's request to the running task: answered here when this
    /// process runs the task (or no replica does), else relayed to its
    /// owner through the store.
    pub fn task_request(&mut self, device: u64, msg: AgentMessage, now: u64) -> TaskAnswer {
        let relay_to = match (&self.replica, &self.runner) {
            (Some(replica), None) => replica.running,
            _ => None,
        };
        let Some(task) = relay_to else {
            let upload = matches!(
                msg,
                AgentMessage::BeginUpload(_) | AgentMessage::UploadChunk { .. }
            );
            let reply = self.answer_task_request(device, msg, now);
            if upload
                && self.replica.is_some()
                && matches!(&reply, CoordinatorMessage::Error(e) if e.code == ErrorCode::Internal)
            {
                return TaskAnswer::Unavailable;
            }
            return TaskAnswer::Now(Box::new(reply));
        };
        let bytes = match postcard::to_stdvec(&msg) {
            Ok(b) => b,
            Err(e) => {
                return TaskAnswer::Now(Box::new(CoordinatorMessage::Error(WireError {
                    code: ErrorCode::Internal,
                    message: format!("cannot relay the request: {e}"),
                })));
            }
        };
        let name = self
            .replica
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        match self.store.relay_request(task, device, &name, &bytes) {
            Ok(id) => {
                self.metrics.relayed_out += 1;
                TaskAnswer::Relayed(id)
            }
            Err(e) => {
                self.storage_failed("relaying a request to the task's replica", &e);
                TaskAnswer::Unavailable
            }
        }
    }

    /// The answer to a relayed request, once it has arrived.
    pub fn take_relay_reply(&mut self, id: u64) -> Option<RelayReply> {
        self.relay_replies.remove(&id)
    }

    /// Forgets a relayed request the driver no longer waits for.
    pub fn forget_relay(&mut self, id: u64) {
        self.relay_replies.remove(&id);
    }

    /// Answers a request to the running task here.
    fn answer_task_request(
        &mut self,
        device: u64,
        msg: AgentMessage,
        now: u64,
    ) -> CoordinatorMessage {
        match msg {
            AgentMessage::CheckIn { capabilities } => self.check_in(device, capabilities, now),
            AgentMessage::BeginUpload(meta) => self.begin_upload(device, meta),
            AgentMessage::UploadChunk {
                object,
                offset,
                data,
            } => self.upload_chunk(device, object, offset, &data, now),
            AgentMessage::Secure {
                task,
                round,
                message,
            } => self.secure(device, task, round, message, now),
            AgentMessage::SecureChunk {
                task,
                round,
                offset,
                data,
            } => self.secure_chunk(device, (task, round), offset, &data, now),
            _ => refuse(ErrorCode::Malformed, "not a request to the running task"),
        }
    }

    /// On a shared store, every tick: the owner answers its task's relayed
    /// requests; every replica collects the answers addressed to it.
    ///
    /// The tables are read when PostgreSQL announced a write to them
    /// (`LISTEN`, [`crate::store::Store::relay_notified`]) and at least
    /// every [`RELAY_POLL_MS`] in case an announcement was missed (a
    /// reconnection), so an idle replica costs the database no transaction
    /// per tick.
    pub(super) fn relay_tick(&mut self, now: u64) {
        let Some(replica) = self.replica.as_mut() else {
            return;
        };
        let due = now >= replica.next_relay_poll;
        match self.store.relay_notified() {
            Ok(false) if !due => return,
            Ok(_) => {}
            Err(e) => warn!("relay notifications not read: {e}"),
        }
        replica.next_relay_poll = now + RELAY_POLL_MS;
        if let Err(e) = self.serve_relayed(now) {
            warn!("relayed requests not answered: {e}");
        }
        if let Err(e) = self.collect_replies() {
            warn!("relayed answers not collected: {e}");
        }
    }

    fn serve_relayed(&mut self, now: u64) -> Result<(), StoreError> {
        let Some(task) = self.runner.as_ref().map(|r| r.id()) else {
            return Ok(());
        };
        for req in self.store.relayed_requests(task, RELAY_BATCH)? {
            let reply = match fleet_protocol::frame::decode::<AgentMessage>(&req.message) {
                Ok(AgentMessage::UploadChunk { object, .. })
                    if self
                        .runner
                        .as_ref()
                        .is_some_and(|r| !r.knows_upload(req.device, &object)) =>
                {
                    RelayReply::Restart
                }
                Ok(msg) => {
                    RelayReply::Answer(Box::new(self.answer_task_request(req.device, msg, now)))
                }
                Err(e) => RelayReply::Answer(Box::new(refuse(
                    ErrorCode::Malformed,
                    format!("a relayed request that does not decode: {e}"),
                ))),
            };
            self.metrics.relayed_in += 1;
            let bytes = match &reply {
                RelayReply::Restart => RESTART.to_vec(),
                RelayReply::Answer(m) => postcard::to_stdvec(m).map_err(|e| {
                    StoreError::Corrupt(format!("an answer that does not encode: {e}"))
                })?,
            };
            self.store.relay_reply(req.id, &req.replica, &bytes)?;
            if self.runner.is_none() {
                // The task ended (or was suspended) while answering.
                break;
            }
        }
        Ok(())
    }

    fn collect_replies(&mut self) -> Result<(), StoreError> {
        let name = match &self.replica {
            Some(r) => r.name.clone(),
            None => return Ok(()),
        };
        let mut ready = Vec::new();
        for (id, bytes) in self.store.take_relay_replies(&name)? {
            if bytes == RESTART {
                self.relay_replies.insert(id, RelayReply::Restart);
                ready.push(id);
                continue;
            }
            match fleet_protocol::frame::decode::<CoordinatorMessage>(&bytes) {
                Ok(reply) => {
                    self.relay_replies
                        .insert(id, RelayReply::Answer(Box::new(reply)));
                    ready.push(id);
                }
                Err(e) => warn!("a relayed answer that does not decode: {e}"),
            }
        }
        if !ready.is_empty() {
            self.effects.push(Effect::RelayReady(ready));
        }
        Ok(())
    }

    /// Drops relayed requests and answers nobody waits for any more.
    pub(super) fn expire_relays(&mut self) {
        if self.replica.is_some()
            && let Err(e) = self
                .store
                .expire_relays(unix_millis().saturating_sub(RELAY_EXPIRY_MS))
        {
            warn!("old relayed requests not dropped: {e}");
        }
    }
}
