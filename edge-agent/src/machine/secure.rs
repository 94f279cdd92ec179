//! The device's side of a secure-aggregation round, inside the [`Machine`].
//!
//! After training, the machine holds a [`fleet_secagg::Device`] and the
//! quantised input, and talks to the coordinator in request–answer pairs:
//!
//! 1. `Secure { Advertise }`: its round keys, signed with the device's
//!    certificate key ([`SecureIdentity`]); the coordinator accepts the
//!    advertisement as the device's report.
//! 2. polls (`Secure { None }`) until the coordinator's answer carries a
//!    protocol message; each is answered at once: the neighbours' keys
//!    (checked against the fleet CA) with encrypted shares, the shares
//!    with the masked input (in [`SecureChunk`]s of [`CHUNK_SIZE`] bytes),
//!    the unmasking request with the reveal.
//! 3. the reveal acknowledged, the device's input is in the round's sum:
//!    [`Output::Accepted`], and the machine checks in again.
//!
//! Any refusal — the coordinator's, or the device's own of a message that
//! breaks the protocol (a forged neighbour, a request for both shares of
//! one neighbour) — ends the exchange for this device; it checks in again.
//!
//! [`SecureChunk`]: AgentMessage::SecureChunk

use fleet_protocol::WireError;
use fleet_protocol::message::{AgentMessage, SecurePlan};
use fleet_protocol::transfer::CHUNK_SIZE;
use fleet_secagg::message::Words;
use fleet_secagg::{Authenticator, DeviceMessage, ServerMessage, Signer};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

use super::{Link, Machine, Output, Trained, Work};

/// What the device signs its round keys with and checks its neighbours'
/// with, and the randomness of its keys and shares.
pub struct SecureIdentity {
    signer: Box<dyn Signer + Send + Sync>,
    authenticator: Box<dyn Authenticator + Send + Sync>,
    rng: ChaCha20Rng,
}

impl std::fmt::Debug for SecureIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureIdentity").finish_non_exhaustive()
    }
}

impl SecureIdentity {
    /// An identity signing with `signer` and checking neighbours with
    /// `authenticator`; the round keys and Shamir shares are drawn from a
    /// ChaCha20 generator seeded with `seed`, which must be secret and
    /// random (the agent takes it from the operating system).
    pub fn new(
        signer: Box<dyn Signer + Send + Sync>,
        authenticator: Box<dyn Authenticator + Send + Sync>,
        seed: [u8; 32],
    ) -> Self {
        Self {
            signer,
            authenticator,
            rng: ChaCha20Rng::from_seed(seed),
        }
    }
}

/// A masked input being uploaded.
struct Upload {
    bytes: Vec<u8>,
    /// Bytes the coordinator acknowledged.
    acked: usize,
    /// End of the chunk in flight.
    sent: usize,
}

/// One round's exchange in hand.
pub(super) struct SecureRound {
    task: u64,
    round: u64,
    device: fleet_secagg::Device,
    input: Option<Vec<u32>>,
    /// A message to send once the link is up.
    unsent: Option<DeviceMessage>,
    masked: Option<Upload>,
    /// The reveal went out: its acknowledgement ends the exchange.
    revealed: bool,
    /// Waiting for the timer to poll.
    polling: bool,
}

impl std::fmt::Debug for SecureRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureRound")
            .field("task", &self.task)
            .field("round", &self.round)
            .field("revealed", &self.revealed)
            .finish_non_exhaustive()
    }
}

impl SecureRound {
    fn message(&self, message: Option<DeviceMessage>) -> AgentMessage {
        AgentMessage::Secure {
            task: self.task,
            round: self.round,
            message,
        }
    }

    /// The next chunk of the masked input.
    fn chunk(&mut self) -> Option<AgentMessage> {
        let up = self.masked.as_mut()?;
        let end = (up.acked + CHUNK_SIZE).min(up.bytes.len());
        up.sent = end;
        Some(AgentMessage::SecureChunk {
            task: self.task,
            round: self.round,
            offset: up.acked as u64,
            data: up.bytes[up.acked..end].to_vec(),
        })
    }
}

impl Machine {
    /// Training for a secure round finished: draw the round keys and
    /// advertise them.
    pub(super) fn secure_start(&mut self, t: Trained, plan: SecurePlan, out: &mut Vec<Output>) {
        let started = match (&mut self.identity, t.secure_input) {
            (None, _) => Err("no certificate key to sign the round keys with".to_string()),
            (Some(_), None) => Err("training returned no quantised input".to_string()),
            (Some(id), Some(input)) => fleet_secagg::Device::new(
                self.cfg.device,
                plan.context,
                id.signer.as_ref(),
                &mut id.rng,
            )
            .map(|(device, ad)| (device, ad, input))
            .map_err(|e| e.to_string()),
        };
        match started {
            Ok((device, ad, input)) => {
                self.work = Work::Secure(Box::new(SecureRound {
                    task: t.task,
                    round: t.round,
                    device,
                    input: Some(input),
                    unsent: Some(ad),
                    masked: None,
                    revealed: false,
                    polling: false,
                }));
                if self.link == Link::Up {
                    self.secure_resume(out);
                }
            }
            Err(e) => {
                out.push(Output::Refused(format!("secure aggregation: {e}")));
                if self.link == Link::Up {
                    self.check_in(out);
                }
            }
        }
    }

    /// The link is up again (or for the first time) during the exchange:
    /// send what is waiting, restart a masked input from its start, or poll.
    pub(super) fn secure_resume(&mut self, out: &mut Vec<Output>) {
        let Work::Secure(r) = &mut self.work else {
            return;
        };
        r.polling = false;
        if let Some(up) = &mut r.masked {
            // The coordinator drops a partial input with the connection.
            up.acked = 0;
            out.extend(r.chunk().map(Output::Send));
        } else if let Some(m) = r.unsent.take() {
            out.push(Output::Send(r.message(Some(m))));
        } else {
            out.push(Output::Send(r.message(None)));
        }
    }

    /// The poll timer fired.
    pub(super) fn secure_poll(&mut self, out: &mut Vec<Output>) {
        if let Work::Secure(r) = &mut self.work
            && std::mem::take(&mut r.polling)
        {
            out.push(Output::Send(r.message(None)));
        }
    }

    /// The coordinator answered a secure request.
    pub(super) fn secure_reply(
        &mut self,
        message: Option<ServerMessage>,
        after_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let Work::Secure(r) = &mut self.work else {
            out.push(Output::Log(
                "unexpected secure-aggregation message ignored".into(),
            ));
            return;
        };
        if let Some(up) = &mut r.masked {
            up.acked = up.sent;
            if up.acked < up.bytes.len() {
                out.extend(r.chunk().map(Output::Send));
                return;
            }
            r.masked = None;
        }
        if r.revealed {
            let (task, round) = (r.task, r.round);
            out.push(Output::Log(format!(
                "secure aggregation: task {task} round {round}: the reveal was taken"
            )));
            out.push(Output::Accepted { task, round });
            self.work = Work::Idle;
            self.check_in(out);
            return;
        }
        let Some(message) = message else {
            r.polling = true;
            out.push(Output::Wait(after_ms));
            return;
        };
        let answer = match message {
            ServerMessage::Neighbours(ads) => {
                let id = self
                    .identity
                    .as_mut()
                    .expect("a round starts only with one");
                r.device.share(&ads, id.authenticator.as_ref(), &mut id.rng)
            }
            ServerMessage::Shares(shares) => {
                let input = r.input.take().unwrap_or_default();
                r.device.mask(&shares, input)
            }
            ServerMessage::Unmask { survivors, dropped } => r.device.reveal(&survivors, &dropped),
        };
        match answer {
            Ok(DeviceMessage::Masked(Words(words))) => {
                let mut bytes = Vec::with_capacity(4 * words.len());
                for w in words {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
                r.masked = Some(Upload {
                    bytes,
                    acked: 0,
                    sent: 0,
                });
                out.extend(r.chunk().map(Output::Send));
            }
            Ok(m) => {
                r.revealed = matches!(m, DeviceMessage::Reveal(_));
                out.push(Output::Send(r.message(Some(m))));
            }
            Err(e) => {
                let (task, round) = (r.task, r.round);
                out.push(Output::Refused(format!(
                    "secure aggregation: task {task} round {round}: this device refused the \
                     coordinator's message and left the round: {e}"
                )));
                self.work = Work::Idle;
                self.check_in(out);
            }
        }
    }

    /// The coordinator refused a secure request: the exchange is over for
    /// this device.
    pub(super) fn secure_refused(&mut self, e: &WireError, out: &mut Vec<Output>) {
        if let Work::Secure(r) = &self.work {
            out.push(Output::Refused(format!(
                "secure aggregation: task {} round {}: {e}",
                r.task, r.round
            )));
        }
        self.work = Work::Idle;
        self.check_in(out);
    }
}
