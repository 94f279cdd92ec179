//! The task core: one task's round logic, sans IO.
//!
//! A [`TaskCore`] owns everything that decides what happens to one task:
//! the round engine, the open round's aggregator, differential privacy, the
//! server optimiser, the global model and the privacy ledger. It is fed
//! check-ins, decoded reports, drop-outs and time, and answers with
//! [`Effect`]s for its driver to carry out in order. It does no I/O: the
//! coordinator's [`crate::runner::Runner`] persists the effects in the store
//! and answers devices over QUIC, the simulator turns them into simulated
//! devices' work, and both run exactly this logic.
//!
//! Order of a report: a report the engine would refuse (round not open,
//! device not selected, a duplicate) is refused without its values being
//! looked at; otherwise the update is checked by the aggregator without
//! changing anything ([`fleet_aggregation::Aggregator::check`]), then the
//! engine decides, the core adds it (an add after a passed check cannot
//! fail), and the driver persists it ([`Effect::Accepted`]) before it
//! acknowledges it. A report that fails the check never reaches the engine
//! (it counts as the device dropping out: agents give up on a refused
//! update), so an accepted report is always in the aggregate and a round's
//! close is never lost.
//!
//! In a private task with noise on the server, every decoded update is
//! clipped to the clipping norm `C` here, before the aggregator sees it
//! ([`server_clipped`]), whatever the device did: the sum's sensitivity is
//! `C` because the coordinator enforces it. (With noise on the devices the
//! noise is already in the update and clipping it again would cut the
//! noise; there the bound rests on the devices.)
//!
//! Closing a round: aggregate → budget check with the noise multiplier the
//! aggregate really carries (the round is discarded, the model left as it
//! was and the task stopped if it does not fit) → DP
//! ([`private_round_delta`]) → ledger entry for exactly the updates in the
//! aggregate → server step → budget check for the next round with the
//! least noise it can close with → [`Effect::Closed`]. Every round is
//! charged at sampling rate 1 ([`TaskSpec::accounting_sampling_rate`]).
//! The driver then reads the new model, server state and ledger from the
//! core ([`TaskCore::global`], [`TaskCore::server_state`],
//! [`TaskCore::ledger`]) and persists them before it acknowledges anything
//! else.

use std::borrow::Cow;

use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement, clip, private_round_delta};
use fleet_aggregation::{
    Admission, Aggregator, Basis, Checked, Compute, History, Rejection, Server as ServerOpt,
    Update, report_weight,
};
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::{ObjectRef, Plan, SecurePlan};
use fleet_protocol::task::TaskSpec;
use fleet_secagg::{DeviceMessage, ServerMessage};

use crate::engine::{Action, DeviceId, Event, Refusal, RoundEngine};

/// δ at which a private task without a budget reports ε (the admin CLI's
/// default `--budget-delta`).
pub const UNBUDGETED_DELTA: f64 = 1e-5;

/// The admission checks of a task's updates: its model's layout, no norm
/// bound beyond the strategy's own.
pub fn admission(spec: &TaskSpec) -> Admission {
    let layout = spec.model.layout();
    Admission {
        fingerprint: layout.fingerprint(),
        len: layout.total,
        max_norm: None,
    }
}

/// The ledger a task keeps: its budget's, or, for a private task without a
/// budget, one that only accounts (ε reported at [`UNBUDGETED_DELTA`]);
/// none for a task without DP. Under a participation limit it also charges
/// the device that took part most often
/// ([`PrivacyLedger::with_participation_limit`]).
pub fn new_ledger(spec: &TaskSpec) -> Result<Option<PrivacyLedger>, String> {
    let ledger = match (&spec.budget, &spec.dp) {
        (Some(b), _) => {
            PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| format!("budget: {e}"))?
        }
        (None, Some(_)) => {
            PrivacyLedger::new(f64::MAX, UNBUDGETED_DELTA).map_err(|e| format!("ledger: {e}"))?
        }
        (None, None) => return Ok(None),
    };
    match spec.participation_bound() {
        Some(k) => ledger
            .with_participation_limit(k)
            .map(Some)
            .map_err(|e| format!("engine: {e}")),
        None => Ok(Some(ledger)),
    }
}

/// The strategy a task's rounds aggregate with: its own, without the
/// relative bound in a private task with noise on the server, where the
/// coordinator clips every update to the clipping norm and every report
/// weighs 1 (a bound relative to the round's median would only clip honest
/// reports further, and the clip already bounds a hostile one).
pub fn effective_strategy(spec: &TaskSpec) -> fleet_aggregation::StrategyConfig {
    if spec.secure_aggregation.is_some() {
        // The coordinator never sees one update, only the sum: the devices'
        // clip (in the quantiser) is the only bound there is.
        return fleet_aggregation::StrategyConfig {
            bound: None,
            centred: None,
            ..spec.strategy
        };
    }
    match spec.dp {
        Some(dp) if dp.placement == NoisePlacement::Server => fleet_aggregation::StrategyConfig {
            bound: None,
            centred: None,
            ..spec.strategy
        },
        _ => spec.strategy,
    }
}

/// The values of a decoded update as they enter a round with privacy
/// settings `dp` (the round's clip): with noise on the server, clipped to
/// the clipping norm (the one place the coordinator enforces the
/// sensitivity); otherwise as they are. Also whether its norm was within
/// the clip (adaptive clipping's bit).
pub fn server_clipped<'v>(dp: Option<&DpConfig>, values: &'v [f32]) -> (Cow<'v, [f32]>, bool) {
    match dp {
        Some(dp) if dp.placement == NoisePlacement::Server => {
            let mut v = values.to_vec();
            let norm = clip(&mut v, dp.clip_norm);
            (Cow::Owned(v), norm <= dp.clip_norm)
        }
        _ => (Cow::Borrowed(values), true),
    }
}

/// A decoded report offered to the open round.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// The device.
    pub device: DeviceId,
    /// The round it trained for.
    pub round: u64,
    /// Local examples it declares (its weight in a non-private task).
    pub examples: u64,
    /// The decoded update, in the model's flat layout.
    pub values: &'a [f32],
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportRefusal {
    /// The engine refused it (not open, not selected, duplicate).
    Engine(Refusal),
    /// The aggregator's checks refused the update.
    Rejected(Rejection),
}

impl ReportRefusal {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Engine(Refusal::Duplicate) => "replayed",
            Self::Engine(Refusal::NotOpen) => "not_open",
            Self::Engine(Refusal::NotSelected) => "not_selected",
            Self::Rejected(r) => r.reason(),
        }
    }
}

impl std::fmt::Display for ReportRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Engine(r) => write!(f, "report refused: {r:?}"),
            Self::Rejected(r) => write!(f, "{r}"),
        }
    }
}

/// A closed round, as the driver persists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// The round.
    pub round: u64,
    /// Reports aggregated.
    pub reports: usize,
    /// The devices whose reports were aggregated, in acceptance order.
    pub participants: Vec<DeviceId>,
    /// Rounds closed so far, this one included.
    pub closed: u64,
    /// ε spent after it, when private.
    pub epsilon: Option<f64>,
    /// The task's state after it.
    pub state: TaskState,
    /// Why the task stopped, or why the round left the model unchanged.
    pub note: Option<String>,
    /// Whether the round moved the global model; `false`: it was
    /// discarded (over the budget, not aggregable, or a non-finite model),
    /// and `note` says why.
    pub applied: bool,
    /// Reports the strategy's relative bound scaled down or counted with a
    /// capped weight.
    pub bounded: usize,
    /// Under a relative bound, the next round's basis (persist it: a
    /// resumed task gets it back through [`Resume::basis`]).
    pub basis: Option<Basis>,
}

/// Where a resumed task stands, as persisted.
pub struct Resume<'a> {
    /// The open round.
    pub round: u64,
    /// Rounds closed so far.
    pub closed: u64,
    /// Devices selected for the open round.
    pub selected: &'a [DeviceId],
    /// The server optimiser with its stored state.
    pub server: ServerOpt,
    /// The stored ledger (`None`: a fresh one, as [`new_ledger`] makes).
    pub ledger: Option<PrivacyLedger>,
    /// The open round's clip as stored, when adaptive clipping moved it
    /// (`None`: the task's clipping norm).
    pub clip_norm: Option<f64>,
    /// The participants of every closed round, oldest first (the engine
    /// counts them under a participation limit).
    pub closed_rounds: &'a [(u64, Vec<DeviceId>)],
    /// The open round's basis under a relative bound, as stored (`None`:
    /// none yet, the round takes it from its first reports).
    pub basis: Option<Basis>,
    /// The open round's history under centred clipping, as stored
    /// ([`TaskCore::history`]; `None`: none, the round clips nothing beyond
    /// the relative bound).
    pub history: Option<History>,
    /// The task's state.
    pub state: TaskState,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send the plan of `round` to `device` (and remember the selection).
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
    /// Selection ended; reports are due by `deadline` (ms, absolute).
    StartReporting {
        /// The round.
        round: u64,
        /// Report deadline.
        deadline: u64,
    },
    /// The report is in the round's aggregate: persist the update, then
    /// acknowledge it.
    Accepted {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
        /// Its weight in the aggregate.
        weight: f64,
    },
    /// The report is refused; nothing changed.
    Refused {
        /// The device.
        device: DeviceId,
        /// The round it claimed.
        round: u64,
        /// Why.
        reason: ReportRefusal,
    },
    /// A round closed: persist the new model, server state and ledger.
    Closed(Closed),
    /// The open round's attempt was abandoned; its partial aggregate is gone.
    Abandoned {
        /// The round.
        round: u64,
        /// Why.
        reason: String,
    },
    /// All rounds closed.
    Finished,
    /// Secure aggregation: deliver a protocol message to `device`.
    SecureSend {
        /// The device.
        device: DeviceId,
        /// The round.
        round: u64,
        /// The message.
        message: ServerMessage,
    },
    /// Secure aggregation: a device's message was refused and the device
    /// is out of the round's exchange.
    SecureRefused {
        /// The device.
        device: DeviceId,
        /// Why.
        reason: String,
    },
}

/// The open round's secure aggregation (see [`TaskCore::secure_message`]).
struct Secure {
    /// The id the driver gives the task (bound into the protocol's context).
    task: u64,
    /// The open attempt's plan.
    plan: SecurePlan,
    /// Advertisements the engine accepted as reports, in order.
    ads: Vec<(DeviceId, DeviceMessage)>,
    /// An advertisement being offered to the engine.
    offered: Option<(DeviceId, DeviceMessage)>,
    /// The protocol's server, once the reports are in.
    server: Option<fleet_secagg::Server>,
}

/// One task's round logic (see the module documentation).
pub struct TaskCore<'c> {
    spec: TaskSpec,
    engine: RoundEngine,
    global: Vec<f32>,
    admission: Admission,
    compute: &'c dyn Compute,
    aggregator: Aggregator<'c>,
    server: ServerOpt,
    ledger: Option<PrivacyLedger>,
    participants: Vec<DeviceId>,
    /// Updates of the open round whose norm was within the clip.
    unclipped: usize,
    /// The open round's clip (private tasks; adaptive clipping moves it).
    clip: f64,
    /// The open round's basis under a relative bound.
    basis: Option<Basis>,
    /// The open round's history under centred clipping: from the last
    /// closed round, or from [`Resume::history`] (the store keeps it with
    /// each close). Like the basis, it is taken from a round even when its
    /// delta was discarded.
    history: Option<History>,
    state: TaskState,
    /// Secure aggregation, for a task that has it.
    secure: Option<Secure>,
}

impl<'c> TaskCore<'c> {
    /// A task at its first round, at time `now`, from the global model
    /// `global`.
    pub fn new(
        spec: TaskSpec,
        global: Vec<f32>,
        compute: &'c dyn Compute,
        now: u64,
    ) -> Result<Self, String> {
        spec.validate()?;
        let engine = RoundEngine::new(spec.engine, now)?;
        let server = spec
            .strategy
            .server(spec.model.layout().total)
            .map_err(|e| format!("strategy: {e}"))?;
        let ledger = new_ledger(&spec)?;
        Self::assemble(
            spec,
            engine,
            global,
            server,
            ledger,
            TaskState::Running,
            compute,
        )
    }

    /// A task resumed from persisted state (after a restart): the server
    /// optimiser's state and the ledger as stored, the open round's
    /// selected devices, and its stored updates `(device, weight, values)`
    /// in acceptance order. Updates the aggregator refuses (a store written
    /// with other bounds) are left out and returned with the reason, for
    /// the caller to quarantine; the engine resumes with the others.
    pub fn resume(
        spec: TaskSpec,
        global: Vec<f32>,
        compute: &'c dyn Compute,
        at: Resume<'_>,
        updates: &[(DeviceId, f64, Vec<f32>)],
        now: u64,
    ) -> Result<(Self, Vec<(DeviceId, Rejection)>), String> {
        // A definition stored by an older coordinator may break a rule
        // added since (DP with a robust rule, no noise): it does not run.
        spec.validate()
            .map_err(|e| format!("the stored definition is no longer accepted: {e}"))?;
        let ledger = match at.ledger {
            Some(l) => Some(l),
            None => new_ledger(&spec)?,
        };
        // A placeholder engine until the accepted reports are known.
        let engine = RoundEngine::new(spec.engine, now)?;
        let mut core = Self::assemble(spec, engine, global, at.server, ledger, at.state, compute)?;
        if let Some(c) = at.clip_norm {
            if !(c.is_finite() && c > 0.0 && core.spec.dp.is_some()) {
                return Err(format!(
                    "the stored clip {c} is not a clipping norm of this task"
                ));
            }
            core.clip = c;
        }
        if let Some(b) = at.basis {
            if !(b.is_valid() && effective_strategy(&core.spec).bound.is_some()) {
                return Err(format!(
                    "the stored basis {b:?} is not a relative bound's basis of this task"
                ));
            }
            core.basis = Some(b);
            core.aggregator = core.fresh_aggregator();
        }
        if let Some(h) = at.history {
            if !(h.is_valid(core.admission.len) && effective_strategy(&core.spec).centred.is_some())
            {
                return Err(format!(
                    "the stored history (radius {}, {} values) is not a centred clip's history of this task",
                    h.radius,
                    h.reference.len()
                ));
            }
            core.history = Some(h);
            core.aggregator = core.fresh_aggregator();
        }
        let mut refused = Vec::new();
        for (device, weight, values) in updates {
            let round_dp = core.round_dp();
            let (values, within) = server_clipped(round_dp.as_ref(), values);
            let update = Update {
                fingerprint: core.admission.fingerprint,
                values: &values,
                weight: *weight,
            };
            match core.aggregator.add(&update) {
                Ok(()) => {
                    core.participants.push(*device);
                    core.unclipped += usize::from(within);
                }
                Err(r) => refused.push((*device, r)),
            }
        }
        core.engine = RoundEngine::resume(
            core.spec.engine,
            at.round,
            at.closed,
            at.selected,
            &core.participants,
            now,
        )?;
        if core.secure.is_some() {
            // A secure round's exchange lives in memory only: the open
            // round starts its attempt afresh.
            core.engine = core.engine.hold_closes();
            core.refresh_secure_plan();
        }
        core.engine.restore_participation(
            at.closed_rounds
                .iter()
                .map(|(round, devices)| (*round, devices.as_slice())),
        );
        Ok((core, refused))
    }

    fn assemble(
        spec: TaskSpec,
        engine: RoundEngine,
        global: Vec<f32>,
        server: ServerOpt,
        ledger: Option<PrivacyLedger>,
        state: TaskState,
        compute: &'c dyn Compute,
    ) -> Result<Self, String> {
        let admission = admission(&spec);
        if global.len() != admission.len {
            return Err(format!(
                "the starting model has {} parameters, {} has {}",
                global.len(),
                spec.model.name(),
                admission.len
            ));
        }
        let aggregator = effective_strategy(&spec)
            .aggregator(admission, compute)
            .map_err(|e| format!("strategy: {e}"))?;
        let spec_clip = spec.dp.map_or(0.0, |dp| dp.clip_norm);
        let (engine, secure) = match spec.secure_plan(0, engine.round(), 0)? {
            Some(plan) => (
                engine.hold_closes(),
                Some(Secure {
                    task: 0,
                    plan,
                    ads: Vec::new(),
                    offered: None,
                    server: None,
                }),
            ),
            None => (engine, None),
        };
        Ok(Self {
            spec,
            engine,
            global,
            admission,
            compute,
            aggregator,
            server,
            ledger,
            participants: Vec::new(),
            unclipped: 0,
            clip: spec_clip,
            basis: None,
            history: None,
            state,
            secure,
        })
    }

    /// Names the task as its driver does (the id in its plans), which the
    /// secure-aggregation protocol binds every key and mask to.
    pub fn for_task(mut self, task: u64) -> Self {
        if let Some(sec) = &mut self.secure {
            sec.task = task;
        }
        self.refresh_secure_plan();
        self
    }

    /// Recomputes the secure plan for the open round and attempt.
    fn refresh_secure_plan(&mut self) {
        let round = self.engine.round();
        let attempt = self.engine.abandoned().get(&round).copied().unwrap_or(0);
        if let Some(sec) = &mut self.secure
            && let Ok(Some(plan)) = self.spec.secure_plan(sec.task, round, attempt)
        {
            sec.plan = plan;
        }
    }

    /// The task's definition.
    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The open round's privacy settings, as its plan carries them: the
    /// task's, with the round's clip (adaptive clipping moves it).
    pub fn round_dp(&self) -> Option<DpConfig> {
        self.spec.dp.map(|dp| DpConfig {
            clip_norm: self.clip,
            ..dp
        })
    }

    /// The open round's clip, in a private task (persisted by the driver
    /// after each close: adaptive clipping moves it).
    pub fn clip_norm(&self) -> Option<f64> {
        self.spec.dp.map(|_| self.clip)
    }

    /// The plan of the open round for task `task`, whose global model is
    /// `model`, with `report_within_ms` left to report.
    pub fn plan(&self, task: u64, model: ObjectRef, report_within_ms: u64) -> Plan {
        let mut plan = self.spec.plan(task, self.round(), model, report_within_ms);
        plan.dp = self.round_dp();
        plan.secure = self.secure.as_ref().map(|s| Box::new(s.plan));
        plan
    }

    /// The open attempt's secure-aggregation plan, for a task with secure
    /// aggregation.
    pub fn secure_plan(&self) -> Option<&SecurePlan> {
        self.secure.as_ref().map(|s| &s.plan)
    }

    /// The round engine.
    pub fn engine(&self) -> &RoundEngine {
        &self.engine
    }

    /// The current global model.
    pub fn global(&self) -> &[f32] {
        &self.global
    }

    /// The server optimiser's state (moments), for persistence.
    pub fn server_state(&self) -> (&[f32], &[f32]) {
        self.server.state()
    }

    /// The privacy ledger, when the task is private.
    pub fn ledger(&self) -> Option<&PrivacyLedger> {
        self.ledger.as_ref()
    }

    /// The open round.
    pub fn round(&self) -> u64 {
        self.engine.round()
    }

    /// The task's state.
    pub fn state(&self) -> TaskState {
        self.state
    }

    /// Devices whose reports are in the open round's aggregate.
    pub fn participants(&self) -> &[DeviceId] {
        &self.participants
    }

    /// Whether one more round fits the privacy budget, with the least noise
    /// a round of this task can close with
    /// ([`TaskSpec::least_noise_multiplier`]) and no sampling amplification;
    /// `Ok` for a task without DP. The message says why not.
    pub fn check_next_round(&self) -> Result<(), String> {
        // Under a participation limit the ledger assumes the worst device
        // takes part again, up to the limit.
        if let (Some(ledger), Some(sec), Some(_)) = (&self.ledger, &self.secure, &self.spec.dp) {
            // A secure round closes with at least `min_reports` survivors,
            // whose noise shares it carries.
            let sk = sec.plan.mechanism(self.spec.engine.min_reports);
            return ledger
                .check_skellam_round(sk)
                .map(|_| ())
                .map_err(|e| e.to_string());
        }
        match (&self.ledger, self.spec.least_noise_multiplier()) {
            (Some(ledger), Some(z)) => ledger
                .check_round(self.spec.accounting_sampling_rate(), z)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// The next time the core needs [`TaskCore::tick`], if any.
    pub fn next_deadline(&self) -> Option<u64> {
        let secure = self
            .secure
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .and_then(|s| s.deadline());
        match (self.engine.next_deadline(), secure) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The weight a report declaring `examples` local examples gets.
    pub fn weight(&self, examples: u64) -> f64 {
        report_weight(self.spec.dp.is_some(), examples)
    }

    /// A device asks for work.
    pub fn check_in(&mut self, device: DeviceId, now: u64) -> Vec<Effect> {
        let actions = self.engine.handle(Event::CheckIn { device }, now);
        self.apply(actions, None, now)
    }

    /// A device disconnected or gave up on its round.
    pub fn drop_out(&mut self, device: DeviceId, now: u64) -> Vec<Effect> {
        let actions = self.engine.handle(Event::DropOut { device }, now);
        let mut out = self.apply(actions, None, now);
        if let Some(server) = self.secure.as_mut().and_then(|s| s.server.as_mut()) {
            let outputs = server.drop_out(device, now);
            out.extend(self.secure_outputs(outputs, now));
        }
        out
    }

    /// Time passed.
    pub fn tick(&mut self, now: u64) -> Vec<Effect> {
        let actions = self.engine.handle(Event::Tick, now);
        let mut out = self.apply(actions, None, now);
        if let Some(server) = self.secure.as_mut().and_then(|s| s.server.as_mut()) {
            let outputs = server.tick(now);
            out.extend(self.secure_outputs(outputs, now));
        }
        out
    }

    /// The stage of the open round's secure exchange, once it runs (the
    /// reports are in); `None` before, and in a task without secure
    /// aggregation.
    pub fn secure_stage(&self) -> Option<fleet_secagg::server::Stage> {
        self.secure
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .map(|s| s.stage())
    }

    /// Whether the open round's secure exchange waits for `device`'s
    /// message in its current stage.
    pub fn secure_awaits(&self, device: DeviceId) -> bool {
        self.secure
            .as_ref()
            .and_then(|s| s.server.as_ref())
            .is_some_and(|s| s.awaits(device))
    }

    /// A secure-aggregation message of `device` for `round`.
    ///
    /// The advertisement of a device's keys is its report: the engine
    /// accepts or refuses it as it would an update (not open, not selected,
    /// a duplicate), and the round's reports are in when the engine would
    /// close it. The engine then holds the close while the protocol's
    /// server runs its remaining stages with the accepted devices; the
    /// round closes with the unmasked sum, or is abandoned (and retried)
    /// when the protocol cannot finish.
    pub fn secure_message(
        &mut self,
        device: DeviceId,
        round: u64,
        message: DeviceMessage,
        now: u64,
    ) -> Vec<Effect> {
        let refused = |reason: String| vec![Effect::SecureRefused { device, reason }];
        let Some(sec) = self.secure.as_mut() else {
            return refused("the task has no secure aggregation".into());
        };
        if let DeviceMessage::Advertise(ad) = &message {
            if let Some(reason) = self.engine.refusal(device, round) {
                return vec![Effect::Refused {
                    device,
                    round,
                    reason: ReportRefusal::Engine(reason),
                }];
            }
            if ad.device != device || !ad.sizes_ok() {
                return refused("an advertisement for another device, or oversized".into());
            }
            sec.offered = Some((device, message));
            let actions = self.engine.handle(Event::Report { device, round }, now);
            return self.apply(actions, None, now);
        }
        if round != self.engine.round() {
            return refused(format!("round {round} is not the open round"));
        }
        let Some(server) = sec.server.as_mut() else {
            return refused("the round's secure exchange has not started".into());
        };
        let outputs = server.receive(device, message, now);
        self.secure_outputs(outputs, now)
    }

    fn secure_outputs(&mut self, outputs: Vec<fleet_secagg::Output>, now: u64) -> Vec<Effect> {
        let round = self.engine.round();
        let mut out = Vec::new();
        for o in outputs {
            match o {
                fleet_secagg::Output::Send(device, message) => out.push(Effect::SecureSend {
                    device,
                    round,
                    message,
                }),
                fleet_secagg::Output::Refused(r) => out.push(Effect::SecureRefused {
                    device: r.device,
                    reason: r.to_string(),
                }),
                fleet_secagg::Output::Finished { sum, survivors } => {
                    let actions = self.engine.settle(Ok(()), now);
                    let closed = self.close_secure(round, &sum, survivors);
                    out.push(Effect::Closed(closed));
                    out.extend(self.apply(actions, None, now));
                }
                fleet_secagg::Output::Abandoned { stage, reason } => {
                    let actions = self.engine.settle(
                        Err(format!(
                            "secure aggregation, {} stage: {reason}",
                            stage.name()
                        )),
                        now,
                    );
                    out.extend(self.apply(actions, None, now));
                }
            }
        }
        out
    }

    /// A decoded report arrives. A report the engine would refuse (round
    /// not open, device not selected, a duplicate) is refused without
    /// looking at its values. An update the aggregator refuses is refused
    /// before the engine hears of it, and counts as the device dropping out
    /// of the round (it may still send a good one).
    pub fn report(&mut self, report: &Report<'_>, now: u64) -> Vec<Effect> {
        if let Some(reason) = self.engine.refusal(report.device, report.round) {
            return vec![Effect::Refused {
                device: report.device,
                round: report.round,
                reason: ReportRefusal::Engine(reason),
            }];
        }
        let round_dp = self.round_dp();
        let (values, within) = server_clipped(round_dp.as_ref(), report.values);
        let update = Update {
            fingerprint: self.admission.fingerprint,
            values: &values,
            weight: self.weight(report.examples),
        };
        let checked = match self.aggregator.check(&update) {
            Ok(checked) => checked,
            Err(rejection) => {
                let mut out = vec![Effect::Refused {
                    device: report.device,
                    round: report.round,
                    reason: ReportRefusal::Rejected(rejection),
                }];
                let actions = self.engine.handle(
                    Event::DropOut {
                        device: report.device,
                    },
                    now,
                );
                out.extend(self.apply(actions, None, now));
                return out;
            }
        };
        let actions = self.engine.handle(
            Event::Report {
                device: report.device,
                round: report.round,
            },
            now,
        );
        self.apply(actions, Some((checked, within)), now)
    }

    fn apply(
        &mut self,
        actions: Vec<Action>,
        update: Option<(Checked<'_>, bool)>,
        now: u64,
    ) -> Vec<Effect> {
        let mut out = Vec::with_capacity(actions.len());
        for action in actions {
            match action {
                Action::AcceptReport { device, round } if self.secure.is_some() => {
                    let sec = self.secure.as_mut().expect("checked");
                    if let Some(offered) = sec.offered.take() {
                        sec.ads.push(offered);
                    }
                    out.push(Effect::Accepted {
                        device,
                        round,
                        weight: 1.0,
                    });
                }
                Action::CloseRound { round, .. } if self.secure.is_some() => {
                    out.extend(self.start_secure_exchange(round, now));
                }
                Action::SendPlan { device, round } => out.push(Effect::SendPlan { device, round }),
                Action::ComeBackAt { device, at } => out.push(Effect::ComeBackAt { device, at }),
                Action::StartReporting {
                    round, deadline, ..
                } => out.push(Effect::StartReporting { round, deadline }),
                Action::AcceptReport { device, round } => {
                    let (checked, within) =
                        update.expect("the engine accepts only the report it was given");
                    let weight = checked.update().weight;
                    match self.aggregator.add_checked(checked) {
                        Ok(()) => {
                            self.participants.push(device);
                            self.unclipped += usize::from(within);
                            out.push(Effect::Accepted {
                                device,
                                round,
                                weight,
                            });
                        }
                        // Unreachable: the same update passed `check` on
                        // this aggregator just before. Refused rather than
                        // trusted, so the aggregate never misses an
                        // acknowledged update.
                        Err(rejection) => out.push(Effect::Refused {
                            device,
                            round,
                            reason: ReportRefusal::Rejected(rejection),
                        }),
                    }
                }
                Action::RefuseReport {
                    device,
                    round,
                    reason,
                } => out.push(Effect::Refused {
                    device,
                    round,
                    reason: ReportRefusal::Engine(reason),
                }),
                Action::CloseRound { round, reports } => {
                    let closed = self.close_round(round, reports);
                    out.push(Effect::Closed(closed));
                }
                Action::AbandonRound { round, reason } => {
                    self.reset_round();
                    self.reset_secure();
                    out.push(Effect::Abandoned { round, reason });
                }
                Action::Finished => out.push(Effect::Finished),
            }
        }
        out
    }

    /// The reports are in: the protocol's server starts with the devices
    /// whose advertisements the engine accepted.
    fn start_secure_exchange(&mut self, round: u64, now: u64) -> Vec<Effect> {
        let sec = self.secure.as_mut().expect("a secure task");
        let ads = std::mem::take(&mut sec.ads);
        let digest = sec.plan.context.digest();
        let graph_seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        let server = fleet_secagg::Server::new(
            sec.plan.context,
            ads.iter().map(|(d, _)| *d),
            now,
            sec.plan.stage_timeout_ms,
            graph_seed,
        );
        let mut server = match server {
            Ok(s) => s,
            Err(e) => {
                let actions = self.engine.settle(
                    Err(format!("secure aggregation of round {round}: {e}")),
                    now,
                );
                return self.apply(actions, None, now);
            }
        };
        let mut outputs = Vec::new();
        for (device, ad) in ads {
            outputs.extend(server.receive(device, ad, now));
        }
        self.secure.as_mut().expect("a secure task").server = Some(server);
        self.secure_outputs(outputs, now)
    }

    /// Forgets the open attempt's exchange and plans the next one.
    fn reset_secure(&mut self) {
        if let Some(sec) = &mut self.secure {
            sec.ads.clear();
            sec.offered = None;
            sec.server = None;
        }
        self.refresh_secure_plan();
    }

    /// Closes a secure round with the unmasked `sum` of the `survivors`'
    /// quantised inputs: decoded, divided by the task's denominator (the
    /// expected cohort `m` in a private task, the survivors otherwise),
    /// charged to the ledger as a Skellam mechanism with the survivors'
    /// noise, and applied.
    fn close_secure(&mut self, round: u64, sum: &[u32], survivors: Vec<DeviceId>) -> Closed {
        let plan = self.secure.as_ref().expect("a secure task").plan;
        let n = survivors.len();
        let mut note = None;
        let mut epsilon = None;
        let mut over_budget = false;
        let delta = plan
            .quantiser
            .decode(sum)
            .map_err(|e| e.to_string())
            .map(|mut v| {
                let denominator = self.spec.dp.map_or(n, |dp| dp.expected_cohort).max(1) as f32;
                for x in &mut v {
                    *x /= denominator;
                }
                v
            });
        let delta = match (&self.spec.dp, &mut self.ledger) {
            (Some(_), Some(ledger)) => {
                let sk = plan.mechanism(n);
                let most = u64::from(self.engine.most_participations());
                let limited = ledger.worst_device().is_some();
                let recorded = if limited {
                    ledger.record_skellam_round_for(sk, most)
                } else {
                    ledger.record_skellam_round(sk)
                };
                match recorded.and_then(|_| ledger.spent()) {
                    Ok(spent) => {
                        epsilon = Some(spent.epsilon);
                        delta
                    }
                    Err(e) => {
                        over_budget = true;
                        Err(format!("discarded, the model left as it was: {e}"))
                    }
                }
            }
            (Some(_), None) => Err("a private task without a ledger".to_string()),
            (None, _) => delta,
        };
        if let Err(e) = &delta {
            note = Some(format!("round {round} could not be applied: {e}"));
        }
        let moved = self.publish(round, delta, over_budget, &mut note);
        self.reset_secure();
        self.conclude(round, n, survivors, epsilon, note, moved, 0)
    }

    fn fresh_aggregator(&self) -> Aggregator<'c> {
        effective_strategy(&self.spec)
            .aggregator(self.admission, self.compute)
            .expect("the strategy was validated when the core was built")
            .with_basis(self.basis)
            .with_history(self.history.clone())
    }

    /// The open round's history under centred clipping (the previous
    /// round's delta and radius).
    pub fn history(&self) -> Option<&History> {
        self.history.as_ref()
    }

    /// The open round's basis under a relative bound (persisted with the
    /// task so that a resumed round applies the same limits).
    pub fn basis(&self) -> Option<Basis> {
        self.basis
    }

    fn reset_round(&mut self) {
        self.aggregator = self.fresh_aggregator();
        self.participants.clear();
        self.unclipped = 0;
    }

    fn close_round(&mut self, round: u64, reports: usize) -> Closed {
        let fresh = self.fresh_aggregator();
        let done = std::mem::replace(&mut self.aggregator, fresh);
        let participants = std::mem::take(&mut self.participants);
        let unclipped = std::mem::take(&mut self.unclipped);
        let mut note = None;
        let mut epsilon = None;
        let mut over_budget = false;
        let mut moved = false;
        let mut bounded = 0;
        match done.finish() {
            Ok(mut agg) => {
                bounded = agg.bounded;
                let history = agg.history.take();
                if agg.basis.is_some() || history.is_some() {
                    if agg.basis.is_some() {
                        self.basis = agg.basis;
                    }
                    if history.is_some() {
                        self.history = history;
                    }
                    self.aggregator = self.fresh_aggregator();
                }
                let delta = match (&self.spec.dp, &mut self.ledger) {
                    (Some(dp), Some(ledger)) => {
                        // Charged for exactly the updates in the aggregate:
                        // with client noise, only theirs is in the sum.
                        let q = self.spec.accounting_sampling_rate();
                        let z = dp.effective_noise_multiplier(agg.updates);
                        // Under a participation limit: the device that took
                        // part most often, this round counted.
                        let most = u64::from(self.engine.most_participations());
                        let limited = ledger.worst_device().is_some();
                        let check = if limited {
                            ledger.check_round_for(q, z, most)
                        } else {
                            ledger.check_round(q, z)
                        };
                        match check {
                            Err(e) => {
                                over_budget = true;
                                Err(format!("discarded, the model left as it was: {e}"))
                            }
                            Ok(_) => {
                                // With adaptive clipping the updates get
                                // z_Δ and the count of unclipped ones the
                                // rest of the step charged at z.
                                let d = dp
                                    .for_round(self.clip)
                                    .and_then(|round| {
                                        private_round_delta(&agg.delta, agg.updates, &round)
                                    })
                                    .map_err(|e| e.to_string());
                                if d.is_ok()
                                    && let Some(a) = &dp.adaptive
                                {
                                    match a.next_clip(
                                        self.clip,
                                        unclipped,
                                        agg.updates,
                                        dp.expected_cohort,
                                    ) {
                                        Ok(c) => self.clip = c,
                                        Err(e) => note = Some(format!("adaptive clipping: {e}")),
                                    }
                                }
                                // Noise drawn: charged, even if the step
                                // below fails and nothing is published.
                                if d.is_ok() {
                                    let recorded = if limited {
                                        ledger.record_round_for(q, z, most)
                                    } else {
                                        ledger.record_round(q, z)
                                    };
                                    match recorded.and_then(|_| ledger.spent()) {
                                        Ok(spent) => epsilon = Some(spent.epsilon),
                                        Err(e) => {
                                            over_budget = true;
                                            note = Some(format!("privacy ledger: {e}"));
                                        }
                                    }
                                }
                                d
                            }
                        }
                    }
                    (Some(_), None) => Err("a private task without a ledger".to_string()),
                    (None, _) => Ok(agg.delta),
                };
                moved = self.publish(round, delta, over_budget, &mut note);
            }
            Err(e) => note = Some(format!("round {round} could not be aggregated: {e}")),
        }
        self.conclude(round, reports, participants, epsilon, note, moved, bounded)
    }

    /// Applies a round's delta with the server optimiser and takes the new
    /// model, unless the ledger refused the round or the model would not
    /// be finite; whether the model moved (`note` says why not).
    fn publish(
        &mut self,
        round: u64,
        delta: Result<Vec<f32>, String>,
        over_budget: bool,
        note: &mut Option<String>,
    ) -> bool {
        let mut moved = false;
        let applied = delta.and_then(|d| {
            if over_budget {
                return Err("the privacy ledger refused the round".into());
            }
            let mut next = self.global.clone();
            self.server
                .apply(self.compute, &mut next, &d)
                .map_err(|e| e.to_string())?;
            if let Some(i) = next.iter().position(|v| !v.is_finite()) {
                return Err(format!("the new model has a non-finite parameter at {i}"));
            }
            self.global = next;
            moved = true;
            Ok(())
        });
        if let Err(e) = applied
            && note.is_none()
        {
            *note = Some(format!("round {round} could not be applied: {e}"));
        }
        moved
    }

    /// The task's state after a round and the [`Closed`] record of it.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        round: u64,
        reports: usize,
        participants: Vec<DeviceId>,
        mut epsilon: Option<f64>,
        mut note: Option<String>,
        moved: bool,
        bounded: usize,
    ) -> Closed {
        if epsilon.is_none()
            && let Some(ledger) = &self.ledger
        {
            // Nothing charged this round: report what was spent before it.
            epsilon = ledger.spent().ok().map(|s| s.epsilon);
        }
        let closed = self.engine.closed();
        let mut state = if closed >= self.spec.engine.rounds {
            TaskState::Finished
        } else {
            TaskState::Running
        };
        if state == TaskState::Running
            && note.is_none()
            && let Err(e) = self.check_next_round()
        {
            note = Some(format!("stopped before round {}: {e}", round + 1));
        }
        if note.is_some() {
            state = TaskState::Stopped;
        }
        self.state = state;
        Closed {
            round,
            reports,
            participants,
            closed,
            epsilon,
            state,
            note,
            applied: moved,
            bounded,
            basis: self.basis,
        }
    }
}

#[cfg(test)]
mod tests;
