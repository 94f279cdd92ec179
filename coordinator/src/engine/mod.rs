//! The round engine: a deterministic, sans-IO state machine.
//!
//! It knows nothing of sockets, databases or clocks. A driver feeds it
//! [`Event`]s stamped with the current time in milliseconds and carries out
//! the [`Action`]s it returns; the QUIC server drives it with the wall clock,
//! the simulator with a virtual one, and both run exactly this logic.
//!
//! A round follows Bonawitz et al., "Towards Federated Learning at Scale"
//! (2019):
//!
//! 1. **Selection.** Devices check in. The first `⌈target · over_selection⌉`
//!    eligible ones are sent the plan (over-selection, 130% by default,
//!    absorbs devices that drop out). The others are told when to come back.
//!    With a selection window (`selection_window_ms`), the cohort is instead
//!    drawn at random among the devices that checked in during the window
//!    (each told to come back when it ends): answering first, or often,
//!    gains a device nothing.
//!    Selection ends when the cohort is full or `selection_timeout_ms` after
//!    it began; with fewer than `min_reports` devices selected then, the round
//!    is abandoned.
//! 2. **Reporting.** Selected devices train and report. The round closes as
//!    soon as `target` reports are accepted; later reports are stragglers and
//!    are refused. At `report_deadline_ms` after selection ended, the round
//!    closes if at least `min_reports` arrived, and is abandoned otherwise.
//! 3. The next round starts right away, until `rounds` have closed.
//!
//! **Held closes.** With [`RoundEngine::hold_closes`] (secure aggregation:
//! a round's sum is known only after the survivors unmask it), a close
//! leaves the round in a closing phase: new reports are refused, devices
//! that check in are told to come back, and the round ends when the driver
//! settles it ([`RoundEngine::settle`]): closed, or abandoned and retried.
//!
//! **Come-back times are enforced.** A device told to come back at `t` that
//! checks in earlier is told the same time again, without being selected
//! and without drawing new jitter: checking in over and over gains a device
//! nothing, and honest devices keep their place. (Reconnecting after a
//! lost connection costs a device nothing either: it is told the time it
//! already had.) The times are kept per device until it checks in at or
//! after its time; they are not persisted, so after a restart every device
//! may check in at once, as after any outage.
//!
//! **Participation limits.** With `max_participations` or `min_separation`
//! set, the engine remembers, for every device, how many closed rounds
//! aggregated its update and the last of them; a device that has reached
//! the limit, or took part too recently, is not selected (it is told to come
//! back like any device not needed). A private task's ledger charges the
//! device that took part most often ([`RoundEngine::most_participations`]).
//! The driver persists each closed round's participants and gives them back
//! on resume, so a restart forgets no participation.
//!
//! **Pace steering.** A device that is not selected is told when to check in
//! again: when the current phase ends at the latest (the selection timeout,
//! or the reporting deadline). Since a round closes as soon as its target is
//! met, devices steered away while the round is open come back sooner,
//! spread so that about one cohort returns every `retry_ms`. A
//! deterministic jitter drawn from the engine's seeded generator is added,
//! so that reconnections spread out instead of arriving together.
//!
//! Durations come from an administrator's task specification and are not
//! bounded there: every time computed from them saturates at `u64::MAX`
//! (a deadline that never falls due) instead of overflowing.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A device's identity (assigned at enrollment).
pub type DeviceId = u64;

pub use fleet_protocol::task::EngineConfig;

/// What happens to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An eligible device asks for work.
    CheckIn {
        /// The device.
        device: DeviceId,
    },
    /// A device's update for `round` arrived and passed aggregation's checks.
    Report {
        /// The device.
        device: DeviceId,
        /// The round it trained for.
        round: u64,
    },
    /// A device disconnected or gave up on its round.
    DropOut {
        /// The device.
        device: DeviceId,
    },
    /// Time passed (drivers send it at least at every deadline the engine asked for).
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the plan of `round` to `device` (the deadline follows in [`Action::StartReporting`]).
    SendPlan {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
    },
    /// Tell `device` to check in again at `at` (ms, absolute).
    ComeBackAt {
        /// The device.
        device: DeviceId,
        /// When.
        at: u64,
    },
    /// The report is accepted into the round: add the update to the aggregate.
    AcceptReport {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
    },
    /// The report is refused (straggler, duplicate, or not selected).
    RefuseReport {
        /// The device.
        device: DeviceId,
        /// The round it claimed.
        round: u64,
        /// Why.
        reason: Refusal,
    },
    /// Selection is over; reports are due by `deadline` (ms, absolute).
    StartReporting {
        /// The round.
        round: u64,
        /// Devices selected.
        selected: usize,
        /// Report deadline.
        deadline: u64,
    },
    /// Finish aggregation of `round` with the accepted reports and publish the new model.
    CloseRound {
        /// The round.
        round: u64,
        /// Reports accepted.
        reports: usize,
    },
    /// Discard `round`'s partial aggregate; the round is retried.
    AbandonRound {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// All rounds closed.
    Finished,
}

/// Why a report was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The round is closed or is not the open one.
    NotOpen,
    /// The device was not selected for the round.
    NotSelected,
    /// The device already reported for the round (a replay).
    Duplicate,
}

#[derive(Debug, Clone, PartialEq)]
enum Phase {
    Selecting {
        since: u64,
    },
    Reporting {
        deadline: u64,
    },
    /// Reports are in; the close waits for [`RoundEngine::settle`].
    Closing,
    Done,
}

/// The engine's state.
#[derive(Debug, Clone)]
pub struct RoundEngine {
    cfg: EngineConfig,
    round: u64,
    closed: u64,
    phase: Phase,
    selected: BTreeSet<DeviceId>,
    reported: BTreeSet<DeviceId>,
    dropped: BTreeSet<DeviceId>,
    rng: ChaCha8Rng,
    /// Devices steered away while reports are collected in this round.
    steered: u64,
    /// Rounds abandoned, by round number (for reports).
    abandoned: BTreeMap<u64, u32>,
    /// Closed rounds each device took part in, under a participation limit.
    history: BTreeMap<DeviceId, Participation>,
    /// The most rounds any one device took part in.
    most: u32,
    /// Devices told to come back, and when.
    come_back_at: BTreeMap<DeviceId, u64>,
    /// Under a selection window: a uniform sample (reservoir) of at most a
    /// cohort of the devices that checked in during the window.
    candidates: Vec<DeviceId>,
    /// Devices offered to the sample in this window.
    offered: u64,
    /// The sample once the window has passed: devices picked but not yet
    /// back for their plan.
    reserved: Option<BTreeSet<DeviceId>>,
    /// Whether a close waits for [`RoundEngine::settle`].
    hold: bool,
}

/// How often a device took part in a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Participation {
    /// Closed rounds whose aggregate held its update.
    pub rounds: u32,
    /// The last of them.
    pub last: u64,
}

impl RoundEngine {
    /// An engine starting round 1 at time `now`.
    pub fn new(cfg: EngineConfig, now: u64) -> Result<Self, String> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            round: 1,
            closed: 0,
            phase: Phase::Selecting { since: now },
            selected: BTreeSet::new(),
            reported: BTreeSet::new(),
            dropped: BTreeSet::new(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            steered: 0,
            abandoned: BTreeMap::new(),
            history: BTreeMap::new(),
            most: 0,
            come_back_at: BTreeMap::new(),
            candidates: Vec::new(),
            offered: 0,
            reserved: None,
            hold: false,
        })
    }

    /// Makes every close wait for [`RoundEngine::settle`] (secure
    /// aggregation, where the round's result is known only later).
    pub fn hold_closes(mut self) -> Self {
        self.hold = true;
        self
    }

    /// Whether the open round's reports are in and its close is held.
    pub fn closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// Settles a held close: `Ok` closes the round (the next one starts, or
    /// the task finishes), `Err` abandons it with the reason (it is
    /// retried). Does nothing outside the closing phase.
    pub fn settle(&mut self, outcome: Result<(), String>, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        if self.phase != Phase::Closing {
            return out;
        }
        match outcome {
            Ok(()) => self.complete_close(&mut out, now),
            Err(reason) => self.abandon(reason, now, &mut out),
        }
        out
    }

    /// Restores how often devices took part (after a restart), from the
    /// participants of the task's closed rounds, oldest first.
    pub fn restore_participation<'a>(
        &mut self,
        closed: impl IntoIterator<Item = (u64, &'a [DeviceId])>,
    ) {
        for (round, devices) in closed {
            self.count_participation(round, devices.iter().copied());
        }
    }

    fn count_participation(&mut self, round: u64, devices: impl IntoIterator<Item = DeviceId>) {
        if !self.cfg.limits_participation() {
            return;
        }
        for device in devices {
            let p = self.history.entry(device).or_default();
            p.rounds = p.rounds.saturating_add(1);
            p.last = p.last.max(round);
            self.most = self.most.max(p.rounds);
        }
    }

    /// How often `device` took part so far (counted only under a
    /// participation limit).
    pub fn participation(&self, device: DeviceId) -> Participation {
        self.history.get(&device).copied().unwrap_or_default()
    }

    /// The most rounds any one device took part in so far (counted only
    /// under a participation limit).
    pub fn most_participations(&self) -> u32 {
        self.most
    }

    /// Whether the participation limits let `device` join the open round.
    pub fn may_take_part(&self, device: DeviceId) -> bool {
        let Some(p) = self.history.get(&device) else {
            return true;
        };
        let under_cap = self.cfg.max_participations.is_none_or(|m| p.rounds < m);
        let apart = self.cfg.min_separation <= 1
            || self.round >= p.last.saturating_add(self.cfg.min_separation);
        under_cap && apart
    }

    /// Resumes at `round` (after a restart) with the devices already
    /// selected for it and the reports already accepted. With the target
    /// reached the round closes at the next event; with the cohort full it
    /// waits for reports until a fresh deadline; otherwise it goes back to
    /// selection so that new devices can fill it.
    pub fn resume(
        cfg: EngineConfig,
        round: u64,
        closed: u64,
        selected: &[DeviceId],
        accepted: &[DeviceId],
        now: u64,
    ) -> Result<Self, String> {
        let mut e = Self::new(cfg, now)?;
        e.round = round.max(1);
        e.closed = closed;
        e.reported = accepted.iter().copied().collect();
        e.selected = selected.iter().chain(accepted).copied().collect();
        e.phase = if closed >= cfg.rounds {
            Phase::Done
        } else if e.reported.len() >= cfg.target {
            Phase::Reporting { deadline: now }
        } else if e.selected.len() >= cfg.cohort() {
            Phase::Reporting {
                deadline: now.saturating_add(cfg.report_deadline_ms),
            }
        } else {
            Phase::Selecting { since: now }
        };
        Ok(e)
    }

    /// The open round (the last one once finished).
    pub fn round(&self) -> u64 {
        self.round
    }

    /// Rounds closed so far.
    pub fn closed(&self) -> u64 {
        self.closed
    }

    /// Times each round was abandoned.
    pub fn abandoned(&self) -> &BTreeMap<u64, u32> {
        &self.abandoned
    }

    /// Devices selected for the open round.
    pub fn selected(&self) -> &BTreeSet<DeviceId> {
        &self.selected
    }

    /// The next time the engine needs a [`Event::Tick`], if any.
    pub fn next_deadline(&self) -> Option<u64> {
        match self.phase {
            Phase::Selecting { since } => Some(since.saturating_add(self.cfg.selection_timeout_ms)),
            Phase::Reporting { deadline } => Some(deadline),
            Phase::Closing | Phase::Done => None,
        }
    }

    fn come_back(&mut self, device: DeviceId, now: u64) -> Action {
        // Come back when the engine's state next changes at the latest: the end
        // of selection, or the reporting deadline. But a round closes as soon
        // as its target is met, so a device turned away while the round is
        // open comes back sooner, after `retry_ms` times the number of cohorts
        // already turned away in this phase: about one cohort returns per
        // `retry_ms`, however large the fleet. A device that returns too early
        // is simply steered again; one that returns too late misses rounds.
        let phase_end = match self.phase {
            Phase::Selecting { since } => since.saturating_add(self.cfg.selection_timeout_ms),
            Phase::Reporting { deadline } => deadline,
            Phase::Closing => now.saturating_add(self.cfg.retry_ms),
            Phase::Done => now.saturating_add(self.cfg.report_deadline_ms),
        };
        let base = if self.phase == Phase::Done {
            phase_end
        } else {
            let cohorts = (self.steered / self.cfg.cohort().max(1) as u64).max(1);
            self.steered += 1;
            phase_end.min(now.saturating_add(self.cfg.retry_ms.saturating_mul(cohorts)))
        };
        let jitter = if self.cfg.pace_jitter_ms > 0 {
            self.rng.random_range(0..self.cfg.pace_jitter_ms)
        } else {
            0
        };
        let at = base.max(now).saturating_add(jitter);
        self.come_back_at.insert(device, at);
        Action::ComeBackAt { device, at }
    }

    /// When `device` was told to come back, if that is still ahead of `now`
    /// (a time that has passed is forgotten).
    fn told_to_wait(&mut self, device: DeviceId, now: u64) -> Option<u64> {
        match self.come_back_at.get(&device) {
            Some(&at) if now < at => Some(at),
            Some(_) => {
                self.come_back_at.remove(&device);
                None
            }
            None => None,
        }
    }

    /// Whether the open round is choosing devices (devices checking in may
    /// be sent plans).
    pub fn selecting(&self) -> bool {
        matches!(self.phase, Phase::Selecting { .. })
    }

    /// Devices with a come-back time held (at most the devices that
    /// checked in).
    pub fn waiting(&self) -> usize {
        self.come_back_at.len()
    }

    /// Why a report of `device` for `round` would be refused now, if it
    /// would; changes nothing.
    pub fn refusal(&self, device: DeviceId, round: u64) -> Option<Refusal> {
        if round != self.round || matches!(self.phase, Phase::Done | Phase::Closing) {
            Some(Refusal::NotOpen)
        } else if !self.selected.contains(&device) {
            Some(Refusal::NotSelected)
        } else if self.reported.contains(&device) {
            Some(Refusal::Duplicate)
        } else {
            None
        }
    }

    /// Feeds one event at time `now`; returns what to do, in order.
    pub fn handle(&mut self, event: Event, now: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::CheckIn { device } => match self.told_to_wait(device, now) {
                // Early: the same time again, nothing else.
                Some(at) => out.push(Action::ComeBackAt { device, at }),
                None => self.check_in(device, now, &mut out),
            },
            Event::Report { device, round } => match self.refusal(device, round) {
                Some(reason) => out.push(Action::RefuseReport {
                    device,
                    round,
                    reason,
                }),
                None => {
                    self.dropped.remove(&device);
                    self.reported.insert(device);
                    out.push(Action::AcceptReport { device, round });
                    if self.reported.len() >= self.cfg.target {
                        self.close(&mut out, now);
                    }
                }
            },
            Event::DropOut { device } => {
                if self.selected.contains(&device) && !self.reported.contains(&device) {
                    self.dropped.insert(device);
                }
            }
            Event::Tick => {}
        }
        self.check_deadlines(now, &mut out);
        out
    }

    fn check_in(&mut self, device: DeviceId, now: u64, out: &mut Vec<Action>) {
        if let Phase::Selecting { since } = self.phase
            && self.cfg.selection_window_ms > 0
            && !self.selected.contains(&device)
        {
            self.windowed_check_in(device, since, now, out);
            return;
        }
        match self.phase {
            Phase::Selecting { .. }
                if !self.selected.contains(&device)
                    && self.selected.len() < self.cfg.cohort()
                    && self.may_take_part(device) =>
            {
                self.select(device, now, out);
            }
            Phase::Selecting { .. }
                if self.selected.contains(&device) && !self.reported.contains(&device) =>
            {
                // A selected device that reconnects gets its plan again.
                out.push(Action::SendPlan {
                    device,
                    round: self.round,
                });
            }
            _ => out.push(self.come_back(device, now)),
        }
    }

    fn select(&mut self, device: DeviceId, now: u64, out: &mut Vec<Action>) {
        self.selected.insert(device);
        out.push(Action::SendPlan {
            device,
            round: self.round,
        });
        if self.selected.len() == self.cfg.cohort() {
            self.start_reporting(now, out);
        }
    }

    /// A check-in of a device not selected yet, under a selection window.
    /// During the window it joins a uniform sample of the devices that
    /// checked in (reservoir sampling over at most a cohort, so memory does
    /// not grow with the fleet) and is told to come back when the window
    /// ends. Afterwards the sampled devices get their plans as they come
    /// back, and places the sample left free go to the first that check in.
    fn windowed_check_in(&mut self, device: DeviceId, since: u64, now: u64, out: &mut Vec<Action>) {
        let window_end = since.saturating_add(self.cfg.selection_window_ms);
        if now < window_end {
            if self.may_take_part(device) {
                self.offer(device);
            }
            // Returns spread over a share of what is left of selection.
            let spread = self.cfg.pace_jitter_ms.min(
                self.cfg
                    .selection_timeout_ms
                    .saturating_sub(self.cfg.selection_window_ms)
                    / 2,
            );
            let jitter = if spread > 0 {
                self.rng.random_range(0..spread)
            } else {
                0
            };
            let at = window_end.saturating_add(jitter);
            self.come_back_at.insert(device, at);
            out.push(Action::ComeBackAt { device, at });
            return;
        }
        let reserved = self
            .reserved
            .get_or_insert_with(|| self.candidates.drain(..).collect());
        let picked = reserved.remove(&device);
        let free = self
            .cfg
            .cohort()
            .saturating_sub(self.selected.len() + reserved.len());
        if picked || (free > 0 && self.may_take_part(device)) {
            self.select(device, now, out);
        } else {
            out.push(self.come_back(device, now));
        }
    }

    /// Offers `device` to the window's sample: each of the `n` devices
    /// offered so far is in it with probability `cohort / n`.
    fn offer(&mut self, device: DeviceId) {
        if self.candidates.contains(&device) {
            return;
        }
        self.offered += 1;
        let k = self.cfg.cohort();
        if self.candidates.len() < k {
            self.candidates.push(device);
        } else {
            let j = self.rng.random_range(0..self.offered);
            if let Ok(j) = usize::try_from(j)
                && j < k
            {
                self.candidates[j] = device;
            }
        }
    }

    fn start_reporting(&mut self, now: u64, out: &mut Vec<Action>) {
        let deadline = now.saturating_add(self.cfg.report_deadline_ms);
        self.steered = 0;
        self.phase = Phase::Reporting { deadline };
        out.push(Action::StartReporting {
            round: self.round,
            selected: self.selected.len(),
            deadline,
        });
    }

    fn check_deadlines(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Selecting { since }
                if now >= since.saturating_add(self.cfg.selection_timeout_ms) =>
            {
                if self.selected.len() >= self.cfg.min_reports {
                    self.start_reporting(now, out);
                } else {
                    let reason = format!(
                        "selection timed out with {} devices, fewer than the {} reports needed",
                        self.selected.len(),
                        self.cfg.min_reports
                    );
                    self.abandon(reason, now, out);
                }
            }
            Phase::Reporting { deadline } => {
                // `reported` and `dropped` are disjoint subsets of `selected`
                // (a report removes its device from `dropped`), so counting
                // suffices: constant time on every event, whatever the cohort.
                let all_in = self.reported.len() + self.dropped.len() >= self.selected.len();
                if now >= deadline || all_in {
                    if self.reported.len() >= self.cfg.min_reports {
                        self.close(out, now);
                    } else {
                        let reason = format!(
                            "{} reports by the deadline, fewer than the {} needed",
                            self.reported.len(),
                            self.cfg.min_reports
                        );
                        self.abandon(reason, now, out);
                    }
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, out: &mut Vec<Action>, now: u64) {
        out.push(Action::CloseRound {
            round: self.round,
            reports: self.reported.len(),
        });
        if self.hold {
            self.phase = Phase::Closing;
        } else {
            self.complete_close(out, now);
        }
    }

    fn complete_close(&mut self, out: &mut Vec<Action>, now: u64) {
        let reported = std::mem::take(&mut self.reported);
        self.count_participation(self.round, reported.iter().copied());
        self.reported = reported;
        self.closed += 1;
        if self.closed >= self.cfg.rounds {
            self.phase = Phase::Done;
            out.push(Action::Finished);
        } else {
            self.round += 1;
            self.next_selection(now);
        }
    }

    fn abandon(&mut self, reason: String, now: u64, out: &mut Vec<Action>) {
        *self.abandoned.entry(self.round).or_default() += 1;
        out.push(Action::AbandonRound {
            round: self.round,
            reason,
        });
        self.next_selection(now);
    }

    fn next_selection(&mut self, now: u64) {
        self.steered = 0;
        self.candidates.clear();
        self.offered = 0;
        self.reserved = None;
        self.selected.clear();
        self.reported.clear();
        self.dropped.clear();
        self.phase = Phase::Selecting { since: now };
    }
}

#[cfg(test)]
mod tests;
