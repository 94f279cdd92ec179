//! The server's side of one SecAgg+ round, sans IO.
//!
//! Fed device messages, drop-outs and time; answers with [`Output`]s for
//! its driver to deliver. Stages close when every device still expected
//! has answered or when the stage's deadline passes; a stage that ends with
//! fewer devices than [`crate::Params::min_survivors`], or an unmasking
//! that cannot reconstruct a secret it needs, abandons the round with a
//! reason ([`Output::Abandoned`]); nothing waits forever.
//!
//! Masked inputs are summed as they arrive, so the server holds one vector
//! of the round's length however many devices take part. A device's
//! message that breaks the protocol (wrong stage, sizes, addressees,
//! shares at points that are not its own) is refused with a
//! [`Refusal`], and the device counts as dropped from then on; nothing a
//! device sends can end the round for the others beyond its own drop-out.

use std::collections::{BTreeMap, BTreeSet};

use crate::DeviceId;
use crate::crypto::{self, KeyPair, Purpose};
use crate::graph;
use crate::message::{
    Advertisement, CIPHERTEXT_LEN, Context, DeviceMessage, EncryptedShare, Reveal, ServerMessage,
};
use crate::shamir::{self, Share};

/// A stage of the round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Collecting advertisements.
    Advertise,
    /// Collecting encrypted shares.
    Share,
    /// Collecting masked inputs.
    MaskedInput,
    /// Collecting reveals.
    Unmask,
    /// Finished or abandoned.
    Over,
}

impl Stage {
    /// The stage's name.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Advertise => "advertise",
            Stage::Share => "share",
            Stage::MaskedInput => "masked_input",
            Stage::Unmask => "unmask",
            Stage::Over => "over",
        }
    }
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Send a message to a device.
    Send(DeviceId, ServerMessage),
    /// The round finished: the sum of the survivors' inputs, modulo 2^32.
    Finished {
        /// The unmasked sum.
        sum: Vec<u32>,
        /// The devices whose inputs it holds.
        survivors: Vec<DeviceId>,
    },
    /// A device's message was refused and the device dropped from the
    /// round (tell it, close its part).
    Refused(Refusal),
    /// The round was abandoned.
    Abandoned {
        /// The stage it was abandoned in.
        stage: Stage,
        /// Why.
        reason: String,
    },
}

/// Why a device's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device}, {stage} stage: {reason}")]
pub struct Refusal {
    /// The device.
    pub device: DeviceId,
    /// The stage the round was in.
    pub stage: &'static str,
    /// What was wrong.
    pub reason: String,
}

/// One round on the server.
pub struct Server {
    context: Context,
    digest: [u8; 32],
    stage: Stage,
    /// Per-stage timeout.
    stage_timeout: u64,
    deadline: u64,
    graph_seed: u64,
    /// Devices whose answer the current stage waits for.
    expected: BTreeSet<DeviceId>,
    /// Devices that answered the current stage.
    answered: BTreeSet<DeviceId>,
    ads: BTreeMap<DeviceId, Advertisement>,
    graph: BTreeMap<DeviceId, Vec<DeviceId>>,
    /// Ciphertexts by addressee.
    inbox: BTreeMap<DeviceId, Vec<EncryptedShare>>,
    u2: BTreeSet<DeviceId>,
    u3: BTreeSet<DeviceId>,
    sum: Vec<u32>,
    /// What each survivor was asked to reveal: (survivors, dropped).
    asked: BTreeMap<DeviceId, (BTreeSet<DeviceId>, BTreeSet<DeviceId>)>,
    self_shares: BTreeMap<DeviceId, Vec<Share>>,
    key_shares: BTreeMap<DeviceId, Vec<Share>>,
}

impl Server {
    /// A round over `devices` (the selected cohort), starting at `now`,
    /// each stage lasting at most `stage_timeout`; `graph_seed` shuffles
    /// the neighbourhood ring.
    pub fn new(
        context: Context,
        devices: impl IntoIterator<Item = DeviceId>,
        now: u64,
        stage_timeout: u64,
        graph_seed: u64,
    ) -> Result<Self, String> {
        context.params.validate()?;
        Ok(Self {
            digest: context.digest(),
            context,
            stage: Stage::Advertise,
            stage_timeout,
            deadline: now.saturating_add(stage_timeout),
            graph_seed,
            expected: devices.into_iter().collect(),
            answered: BTreeSet::new(),
            ads: BTreeMap::new(),
            graph: BTreeMap::new(),
            inbox: BTreeMap::new(),
            u2: BTreeSet::new(),
            u3: BTreeSet::new(),
            sum: Vec::new(),
            asked: BTreeMap::new(),
            self_shares: BTreeMap::new(),
            key_shares: BTreeMap::new(),
        })
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The current stage's deadline.
    pub fn deadline(&self) -> Option<u64> {
        (self.stage != Stage::Over).then_some(self.deadline)
    }

    /// The round's context.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The devices the current stage still waits for.
    pub fn waiting_for(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.expected.difference(&self.answered).copied()
    }

    /// Whether the current stage waits for `device`'s message.
    pub fn awaits(&self, device: DeviceId) -> bool {
        self.stage != Stage::Over
            && self.expected.contains(&device)
            && !self.answered.contains(&device)
    }

    fn threshold(&self) -> usize {
        usize::from(self.context.params.threshold)
    }

    fn refuse(&mut self, device: DeviceId, reason: impl Into<String>) -> Refusal {
        // A device that broke the protocol is dropped from the round.
        self.expected.remove(&device);
        Refusal {
            device,
            stage: self.stage.name(),
            reason: reason.into(),
        }
    }

    /// A device's message. A message that breaks the protocol is answered
    /// with [`Output::Refused`] and drops the device from the round; a
    /// message that completes the stage closes it.
    pub fn receive(&mut self, device: DeviceId, message: DeviceMessage, now: u64) -> Vec<Output> {
        if !self.expected.contains(&device) || self.answered.contains(&device) {
            return vec![Output::Refused(Refusal {
                device,
                stage: self.stage.name(),
                reason: "not expected in this stage (not selected, dropped or already answered)"
                    .into(),
            })];
        }
        let outcome = match (self.stage, message) {
            (Stage::Advertise, DeviceMessage::Advertise(ad)) => self.advertised(device, ad),
            (Stage::Share, DeviceMessage::Shares(shares)) => self.shared(device, shares),
            (Stage::MaskedInput, DeviceMessage::Masked(values)) => self.masked(device, values.0),
            (Stage::Unmask, DeviceMessage::Reveal(reveal)) => self.revealed(device, reveal),
            (_, m) => {
                let got = m.stage();
                Err(self.refuse(device, format!("a {got} message")))
            }
        };
        let mut out = Vec::new();
        match outcome {
            Ok(()) => {
                self.answered.insert(device);
            }
            Err(refusal) => out.push(Output::Refused(refusal)),
        }
        out.extend(self.advance_if_complete(now));
        out
    }

    /// A device went away (its connection closed, or it gave up).
    pub fn drop_out(&mut self, device: DeviceId, now: u64) -> Vec<Output> {
        if self.answered.contains(&device) {
            // It answered this stage; it will be missing from the next.
            return Vec::new();
        }
        if self.expected.remove(&device) {
            self.advance_if_complete(now)
        } else {
            Vec::new()
        }
    }

    /// Time passed: closes the stage at its deadline.
    pub fn tick(&mut self, now: u64) -> Vec<Output> {
        if self.stage != Stage::Over && now >= self.deadline {
            self.close_stage(now)
        } else {
            Vec::new()
        }
    }

    fn advance_if_complete(&mut self, now: u64) -> Vec<Output> {
        if self.stage != Stage::Over && self.answered.is_superset(&self.expected) {
            self.close_stage(now)
        } else {
            Vec::new()
        }
    }

    fn abandon(&mut self, reason: String) -> Vec<Output> {
        let stage = self.stage;
        self.stage = Stage::Over;
        self.sum = Vec::new();
        self.self_shares.clear();
        self.key_shares.clear();
        vec![Output::Abandoned { stage, reason }]
    }

    fn enough(&mut self, got: usize, what: &str) -> Option<Vec<Output>> {
        let min = self.context.params.min_survivors as usize;
        (got < min).then(|| self.abandon(format!("{got} devices {what}, the round needs {min}")))
    }

    fn next_stage(&mut self, stage: Stage, now: u64) {
        self.stage = stage;
        self.expected = std::mem::take(&mut self.answered);
        self.deadline = now.saturating_add(self.stage_timeout);
    }

    fn close_stage(&mut self, now: u64) -> Vec<Output> {
        match self.stage {
            Stage::Advertise => {
                let u1: Vec<DeviceId> = self.answered.iter().copied().collect();
                if let Some(out) = self.enough(u1.len(), "advertised keys") {
                    return out;
                }
                if u1.len() <= self.threshold() {
                    return self.abandon(format!(
                        "{} devices advertised keys, a threshold of {} needs at least {}",
                        u1.len(),
                        self.threshold(),
                        self.threshold() + 1
                    ));
                }
                self.graph = graph::neighbours(
                    &u1,
                    usize::from(self.context.params.degree),
                    self.graph_seed,
                );
                self.ads.retain(|d, _| self.answered.contains(d));
                self.next_stage(Stage::Share, now);
                self.graph
                    .iter()
                    .map(|(d, nbs)| {
                        let list = nbs.iter().map(|n| self.ads[n].clone()).collect();
                        Output::Send(*d, ServerMessage::Neighbours(list))
                    })
                    .collect()
            }
            Stage::Share => {
                self.u2 = self.answered.clone();
                if let Some(out) = self.enough(self.u2.len(), "shared their keys") {
                    return out;
                }
                self.next_stage(Stage::MaskedInput, now);
                self.sum = vec![0u32; self.context.params.length as usize];
                let mut inbox = std::mem::take(&mut self.inbox);
                self.u2
                    .iter()
                    .map(|d| {
                        let mut list = inbox.remove(d).unwrap_or_default();
                        list.retain(|s| self.u2.contains(&s.from));
                        Output::Send(*d, ServerMessage::Shares(list))
                    })
                    .collect()
            }
            Stage::MaskedInput => {
                self.u3 = self.answered.clone();
                if let Some(out) = self.enough(self.u3.len(), "sent masked input") {
                    return out;
                }
                self.next_stage(Stage::Unmask, now);
                let mut out = Vec::with_capacity(self.u3.len());
                for &d in &self.u3 {
                    let (mut survivors, mut dropped) = (BTreeSet::new(), BTreeSet::new());
                    for &v in &self.graph[&d] {
                        if self.u3.contains(&v) {
                            survivors.insert(v);
                        } else if self.u2.contains(&v) {
                            dropped.insert(v);
                        }
                    }
                    out.push(Output::Send(
                        d,
                        ServerMessage::Unmask {
                            survivors: survivors.iter().copied().collect(),
                            dropped: dropped.iter().copied().collect(),
                        },
                    ));
                    self.asked.insert(d, (survivors, dropped));
                }
                out
            }
            Stage::Unmask => self.unmask(),
            Stage::Over => Vec::new(),
        }
    }

    fn advertised(&mut self, device: DeviceId, ad: Advertisement) -> Result<(), Refusal> {
        if ad.device != device {
            return Err(self.refuse(device, format!("an advertisement for device {}", ad.device)));
        }
        if !ad.sizes_ok() {
            return Err(self.refuse(device, "oversized credential or signature"));
        }
        // Devices check the signature against the credential; the server
        // keeps and forwards both unchanged.
        self.ads.insert(device, ad);
        Ok(())
    }

    fn shared(&mut self, device: DeviceId, shares: Vec<EncryptedShare>) -> Result<(), Refusal> {
        let Some(nbs) = self.graph.get(&device) else {
            return Err(self.refuse(device, "not in the round's graph"));
        };
        let mut to: Vec<DeviceId> = shares.iter().map(|s| s.to).collect();
        to.sort_unstable();
        if &to != nbs {
            return Err(self.refuse(device, "shares are not one per neighbour"));
        }
        if shares
            .iter()
            .any(|s| s.from != device || s.ciphertext.len() != CIPHERTEXT_LEN)
        {
            return Err(self.refuse(device, "a share with the wrong sender or length"));
        }
        for s in shares {
            self.inbox.entry(s.to).or_default().push(s);
        }
        Ok(())
    }

    fn masked(&mut self, device: DeviceId, values: Vec<u32>) -> Result<(), Refusal> {
        if values.len() != self.sum.len() {
            let expected = self.sum.len();
            return Err(self.refuse(
                device,
                format!("{} values, the round's length is {expected}", values.len()),
            ));
        }
        for (s, v) in self.sum.iter_mut().zip(&values) {
            *s = s.wrapping_add(*v);
        }
        Ok(())
    }

    fn revealed(&mut self, device: DeviceId, reveal: Reveal) -> Result<(), Refusal> {
        let (survivors, dropped) = self.asked.get(&device).cloned().unwrap_or_default();
        let sm: BTreeSet<DeviceId> = reveal.self_masks.iter().map(|(d, _)| *d).collect();
        let mk: BTreeSet<DeviceId> = reveal.mask_keys.iter().map(|(d, _)| *d).collect();
        if sm != survivors
            || mk != dropped
            || sm.len() != reveal.self_masks.len()
            || mk.len() != reveal.mask_keys.len()
        {
            return Err(self.refuse(device, "the reveal does not answer what was asked"));
        }
        // A share's point is the holder's place among the owner's
        // neighbours; one at another point is refused.
        for (owner, share) in reveal.self_masks.iter().chain(&reveal.mask_keys) {
            if self.share_point(*owner, device) != Some(share.x) {
                return Err(self.refuse(
                    device,
                    format!("a share of device {owner} at the wrong point"),
                ));
            }
        }
        for (owner, share) in reveal.self_masks {
            self.self_shares.entry(owner).or_default().push(share);
        }
        for (owner, share) in reveal.mask_keys {
            self.key_shares.entry(owner).or_default().push(share);
        }
        Ok(())
    }

    /// The point of the share `owner` gave `holder`.
    fn share_point(&self, owner: DeviceId, holder: DeviceId) -> Option<u8> {
        let i = self.graph.get(&owner)?.iter().position(|&d| d == holder)?;
        u8::try_from(i + 1).ok()
    }

    fn unmask(&mut self) -> Vec<Output> {
        let t = self.threshold();
        // Every mask to remove, reconstructed first and then expanded in
        // one pass over the sum (cut over the cores).
        let mut masks = Vec::new();
        for &u in &self.u3 {
            let shares = self.self_shares.remove(&u).unwrap_or_default();
            match shamir::combine(&shares, t) {
                Ok(seed) => masks.push(crypto::Mask { seed, add: false }),
                Err(e) => {
                    return self.abandon(format!("cannot remove the self mask of device {u}: {e}"));
                }
            }
        }
        let dropped: Vec<DeviceId> = self.u2.difference(&self.u3).copied().collect();
        for v in dropped {
            let shares = self.key_shares.remove(&v).unwrap_or_default();
            let key = match shamir::combine(&shares, t) {
                Ok(secret) => KeyPair::from_secret(secret),
                Err(e) => {
                    return self.abandon(format!(
                        "cannot remove the masks of dropped device {v}: {e}"
                    ));
                }
            };
            if key.public != self.ads[&v].mask_key {
                return self.abandon(format!(
                    "the reconstructed mask key of device {v} does not match its advertisement"
                ));
            }
            for &u in &self.graph[&v] {
                if !self.u3.contains(&u) {
                    continue;
                }
                let Some(shared) = key.agree(&self.ads[&u].mask_key) else {
                    return self.abandon(format!("device {u} advertised a low-order key"));
                };
                // Device u added the mask when u < v, subtracted it otherwise.
                masks.push(crypto::Mask {
                    seed: crypto::derive(&shared, &self.digest, Purpose::Mask, u, v),
                    add: u >= v,
                });
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        crypto::apply_masks(&masks, &mut sum);
        drop(masks);
        self.stage = Stage::Over;
        vec![Output::Finished {
            sum,
            survivors: self.u3.iter().copied().collect(),
        }]
    }
}
