//! The definition of a federated task, as an administrator submits it and the
//! coordinator stores it: model, local training, aggregation, privacy and the
//! round engine's settings.

use fleet_aggregation::codec::Codec;
use fleet_aggregation::privacy::accountant::ledger::{PrivacyBudget, PrivacyLedger};
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{Rule, StrategyConfig};
use fleet_models::export::Variant;
use fleet_models::{ModelSpec, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::message::{ObjectRef, Plan, SecurePlan, UpdateMeta};

/// Settings of the round engine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Reports wanted per round.
    pub target: usize,
    /// Devices selected per target report (1.3 in Bonawitz et al.).
    pub over_selection: f64,
    /// Fewest reports with which a round still closes.
    pub min_reports: usize,
    /// How long selection may last (ms).
    pub selection_timeout_ms: u64,
    /// How long selected devices have to report (ms).
    pub report_deadline_ms: u64,
    /// Rounds to run.
    pub rounds: u64,
    /// Largest random delay added to a come-back time (ms).
    pub pace_jitter_ms: u64,
    /// How soon a device that checks in while reports are being collected
    /// comes back (ms): the round closes as soon as enough reports arrive, so
    /// the next selection may start long before the reporting deadline.
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// Seed of the engine's random choices.
    pub seed: u64,
    /// Most rounds a device's update may be aggregated in (`None`: no
    /// limit). The engine does not select a device that has reached it, and
    /// a private task's ledger then charges the device that took part most
    /// often instead of every round ([`TaskSpec::participation_bound`]).
    #[serde(default)]
    pub max_participations: Option<u32>,
    /// Fewest rounds from one participation of a device to its next
    /// (0 or 1: none; 2: never in two consecutive rounds).
    #[serde(default)]
    pub min_separation: u64,
    /// How long (ms) from the start of selection the engine gathers the
    /// devices that check in before it picks the cohort among them at
    /// random (0: the first devices to check in are selected). Shorter
    /// than `selection_timeout_ms`.
    #[serde(default)]
    pub selection_window_ms: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            target: 10,
            over_selection: 1.3,
            min_reports: 8,
            selection_timeout_ms: 60_000,
            report_deadline_ms: 300_000,
            rounds: 10,
            pace_jitter_ms: 30_000,
            retry_ms: default_retry_ms(),
            seed: 0,
            max_participations: None,
            min_separation: 0,
            selection_window_ms: 0,
        }
    }
}

impl EngineConfig {
    /// Devices selected per round.
    pub fn cohort(&self) -> usize {
        ((self.target as f64) * self.over_selection).ceil() as usize
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.target == 0 {
            return Err("target must be at least 1".into());
        }
        if !(self.over_selection.is_finite() && self.over_selection >= 1.0) {
            return Err(format!(
                "over_selection {} must be >= 1",
                self.over_selection
            ));
        }
        if self.min_reports == 0 || self.min_reports > self.target {
            return Err(format!(
                "min_reports {} must be in 1..={}",
                self.min_reports, self.target
            ));
        }
        if self.rounds == 0 || self.selection_timeout_ms == 0 || self.report_deadline_ms == 0 {
            return Err("rounds, selection_timeout_ms and report_deadline_ms must be > 0".into());
        }
        if self.max_participations == Some(0) {
            return Err("max_participations must be at least 1 (or absent: no limit)".into());
        }
        if self.selection_window_ms >= self.selection_timeout_ms {
            return Err(format!(
                "selection_window_ms {} must be shorter than selection_timeout_ms {}",
                self.selection_window_ms, self.selection_timeout_ms
            ));
        }
        Ok(())
    }

    /// Whether the settings limit how often a device takes part.
    pub fn limits_participation(&self) -> bool {
        self.max_participations.is_some() || self.min_separation > 1
    }

    /// The most rounds one device can be aggregated in over the whole task:
    /// `rounds`, capped by `max_participations` and by `min_separation`
    /// (participations at least `s` rounds apart fit `⌊(rounds − 1)/s⌋ + 1`
    /// times in `rounds` rounds).
    pub fn participation_bound(&self) -> u64 {
        let mut k = self.rounds;
        if let Some(m) = self.max_participations {
            k = k.min(u64::from(m));
        }
        if self.min_separation > 1 {
            k = k.min((self.rounds.saturating_sub(1)) / self.min_separation + 1);
        }
        k
    }
}

fn default_retry_ms() -> u64 {
    10_000
}

/// A federated task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// A name for people.
    pub name: String,
    /// Architecture.
    pub model: ModelSpec,
    /// Local training sent to devices.
    pub train: TrainConfig,
    /// How updates are combined and the global model moves.
    pub strategy: StrategyConfig,
    /// How devices encode updates.
    pub codec: Codec,
    /// Differential privacy devices (or the server) apply.
    pub dp: Option<DpConfig>,
    /// The (ε, δ) budget; rounds that would exceed it are refused.
    pub budget: Option<PrivacyBudget>,
    /// Devices eligible for the task (at least the target). Not used by
    /// privacy accounting: the coordinator does not sample devices Poisson
    /// style, so it claims no amplification by sampling
    /// ([`TaskSpec::accounting_sampling_rate`]).
    pub population: u64,
    /// Rounds, cohort, quorum and deadlines.
    pub engine: EngineConfig,
    /// Seed of the initial model.
    pub seed: u64,
    /// The inference artifact agents receive when a model of this task is
    /// deployed: `int8` (the default; a quarter of the size) or `float`.
    /// The coordinator builds both for every model version. Absent in specs
    /// stored before the field existed, which therefore ship int8.
    #[serde(default)]
    pub variant: Variant,
    /// Most local examples a report may declare. In a task without DP a
    /// report's weight in the mean is its declared example count, which a
    /// device chooses: the cap bounds what one device can claim, and a
    /// report above it is refused before its update is uploaded. Absent in
    /// stored specs of before the field: [`DEFAULT_MAX_EXAMPLES`].
    #[serde(default = "default_max_examples")]
    pub max_examples: u64,
    /// Secure aggregation (SecAgg+): the coordinator learns only the sum of
    /// the surviving devices' quantised updates. Absent in stored specs of
    /// before the field: off.
    #[serde(default)]
    pub secure_aggregation: Option<SecureAggregation>,
}

/// A task's secure-aggregation settings (`fleet_secagg`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecureAggregation {
    /// Shares needed to reconstruct a device's secrets, out of its
    /// neighbours: a device's input stays hidden unless `threshold` of its
    /// neighbours collude with the coordinator.
    pub threshold: u16,
    /// Neighbours of each device on the round's random ring (rounded up to
    /// even, at most 254; `O(log n)` keeps a device's work small).
    pub degree: u16,
    /// Longest wait for each stage after the reports are in (advertised
    /// keys are the reports).
    pub stage_timeout_ms: u64,
    /// L2 clip of each update when the task has no `dp` settings (with
    /// them, `dp.clip_norm`).
    #[serde(default)]
    pub clip_norm: Option<f64>,
}

impl SecureAggregation {
    /// Default settings for a cohort of `cohort` devices: degree
    /// `2·⌈log2 n⌉` (at least 4, at most `n − 1`, even), threshold a
    /// majority of it, 30 s a stage.
    pub fn for_cohort(cohort: usize) -> Self {
        let n = cohort.max(2);
        let log = usize::BITS - (n - 1).leading_zeros();
        let degree = (2 * log as usize).clamp(4, 254).min(n - 1).max(2);
        let degree = degree.div_ceil(2) * 2;
        Self {
            threshold: (degree / 2 + 1).min(degree).max(2) as u16,
            degree: degree.min(254) as u16,
            stage_timeout_ms: 30_000,
            clip_norm: None,
        }
    }
}

/// The default cap on a report's declared examples: more than any edge
/// device holds, far below what would let one report swamp f64 sums.
pub const DEFAULT_MAX_EXAMPLES: u64 = 1_000_000;

fn default_max_examples() -> u64 {
    DEFAULT_MAX_EXAMPLES
}

impl TaskSpec {
    /// The plan a selected device receives for `round` of task `task`,
    /// whose global model is `model`, with `report_within_ms` left to report.
    pub fn plan(&self, task: u64, round: u64, model: ObjectRef, report_within_ms: u64) -> Plan {
        Plan {
            task,
            round,
            model,
            spec: self.model.clone(),
            train: self.train,
            dp: self.dp,
            codec: self.codec,
            report_within_ms,
            secure: None,
        }
    }

    /// The clip of a secure task's updates: `dp.clip_norm`, or the secure
    /// aggregation's own without DP.
    pub fn secure_clip(&self) -> Option<f64> {
        let sa = self.secure_aggregation?;
        Some(
            self.dp
                .map_or(sa.clip_norm.unwrap_or(0.0), |dp| dp.clip_norm),
        )
    }

    /// The secure-aggregation part of the plan of `round` of task `task`
    /// (attempt `attempt`): the protocol's context and the quantiser, with
    /// the noise of each device calibrated so that `min_reports` survivors
    /// carry the task's noise multiplier. `None` for a task without secure
    /// aggregation.
    pub fn secure_plan(
        &self,
        task: u64,
        round: u64,
        attempt: u32,
    ) -> Result<Option<SecurePlan>, String> {
        let Some(sa) = self.secure_aggregation else {
            return Ok(None);
        };
        let clip = self.secure_clip().unwrap_or(0.0);
        let z = self.dp.map_or(0.0, |dp| dp.noise_multiplier);
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, b"fleet rotation");
        for v in [self.seed, task, round, u64::from(attempt)] {
            sha2::Digest::update(&mut h, v.to_le_bytes());
        }
        let digest: [u8; 32] = sha2::Digest::finalize(h).into();
        let rotation_seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        let quantiser = fleet_secagg::quantise::Quantiser::plan(
            self.model.layout().total,
            clip,
            z,
            self.engine.min_reports,
            self.engine.cohort().max(self.engine.min_reports),
            rotation_seed,
        )
        .map_err(|e| format!("secure_aggregation: {e}"))?;
        let params = fleet_secagg::Params {
            threshold: sa.threshold,
            degree: sa.degree,
            min_survivors: u32::try_from(self.engine.min_reports).unwrap_or(u32::MAX),
            length: quantiser.padded,
        };
        params.validate()?;
        Ok(Some(SecurePlan {
            context: fleet_secagg::Context {
                task,
                round,
                attempt,
                params,
            },
            quantiser,
            stage_timeout_ms: sa.stage_timeout_ms,
        }))
    }

    /// Checks what a report declares besides its update: a private task's
    /// reports carry neither example count nor loss (every update weighs
    /// the same, and both would be seen in the clear, outside the noise); a
    /// task without DP weighs each report by its example count, which it
    /// must declare.
    pub fn check_update_meta(&self, meta: &UpdateMeta) -> Result<(), String> {
        match (self.dp.is_some(), meta.examples, meta.train_loss) {
            (false, Some(0), _) => Err("a report must declare at least one example".into()),
            (false, Some(n), _) if n > self.max_examples => Err(format!(
                "the report declares {n} local examples, more than the task's max_examples \
                 {}: a report's weight is capped",
                self.max_examples
            )),
            (true, None, None) | (false, Some(_), _) => Ok(()),
            (true, _, _) => Err(
                "a private task's report must not carry its example count or training loss: \
                 upgrade the agent"
                    .into(),
            ),
            (false, None, _) => {
                Err("a report must declare its example count (its weight in the average)".into())
            }
        }
    }

    /// Checks every part; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name: must not be empty".into());
        }
        if self.max_examples == 0 {
            return Err("max_examples: must be at least 1".into());
        }
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.strategy
            .validate()
            .map_err(|e| format!("strategy: {e}"))?;
        self.engine.validate().map_err(|e| format!("engine: {e}"))?;
        if let Some(dp) = &self.dp {
            dp.validate().map_err(|e| format!("dp: {e}"))?;
            if self.strategy.rule != Rule::Mean {
                return Err(format!(
                    "dp: differential privacy needs the plain mean, so strategy.rule must be the \
                     mean, not {:?}: the noise is calibrated to one update moving the sum by at \
                     most the clipping norm, and one update can move a median, a trimmed mean or \
                     Krum's choice by far more",
                    self.strategy.rule
                ));
            }
            if dp.placement == NoisePlacement::Client && self.codec != Codec::F32 {
                return Err(format!(
                    "codec: {:?} is lossy and, with noise on the devices (dp.placement client), \
                     runs on each update after its noise: the sum no longer carries z·C. Use \
                     f32, or noise on the server (which clips every decoded update again)",
                    self.codec
                ));
            }
        }
        if let Some(sa) = &self.secure_aggregation {
            self.validate_secure(sa)?;
        }
        if self.budget.is_some() && self.dp.is_none() {
            return Err("budget: a privacy budget needs dp settings".into());
        }
        if self.strategy.rule != Rule::Mean && self.engine.target > self.strategy.max_buffered {
            return Err(format!(
                "engine: a target of {} reports does not fit the {} updates a robust rule \
                 buffers (strategy.max_buffered); lower the target or raise the buffer",
                self.engine.target, self.strategy.max_buffered
            ));
        }
        if self.population < self.engine.target as u64 {
            return Err(format!(
                "population: {} is smaller than the target of {} reports per round",
                self.population, self.engine.target
            ));
        }
        if self.engine.limits_participation() {
            let room = self
                .population
                .saturating_mul(self.engine.participation_bound());
            let needed = self
                .engine
                .rounds
                .saturating_mul(self.engine.min_reports as u64);
            if room < needed {
                return Err(format!(
                    "engine: {} devices taking part at most {} times each give {room} \
                     participations, fewer than the {needed} that {} rounds of at least {} reports \
                     need; raise max_participations, lower min_separation, the rounds or \
                     min_reports, or enroll more devices",
                    self.population,
                    self.engine.participation_bound(),
                    self.engine.rounds,
                    self.engine.min_reports
                ));
            }
        }
        if let (Some(b), Some(_), Some(plan)) = (&self.budget, &self.dp, self.secure_plan(0, 1, 0)?)
        {
            let ledger =
                PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| format!("budget: {e}"))?;
            let sk = plan.mechanism(self.engine.min_reports);
            if let Err(e) = ledger.check_skellam_round(sk) {
                return Err(format!(
                    "budget: not even round 1 fits (Skellam noise of {} devices, no sampling \
                     amplification): {e}",
                    self.engine.min_reports
                ));
            }
        } else if let (Some(b), Some(_)) = (&self.budget, &self.dp) {
            let ledger =
                PrivacyLedger::new(b.epsilon, b.delta).map_err(|e| format!("budget: {e}"))?;
            let z = self.least_noise_multiplier().expect("private");
            if let Err(e) = ledger.check_round(self.accounting_sampling_rate(), z) {
                return Err(format!(
                    "budget: not even round 1 fits (noise multiplier {z} if it closes with the \
                     fewest reports, no sampling amplification): {e}"
                ));
            }
        }
        Ok(())
    }

    fn validate_secure(&self, sa: &SecureAggregation) -> Result<(), String> {
        if self.strategy.rule != Rule::Mean {
            return Err(format!(
                "secure_aggregation: the coordinator sees only the sum, so strategy.rule must be \
                 the mean, not {:?}",
                self.strategy.rule
            ));
        }
        if self.codec != Codec::F32 {
            return Err(format!(
                "codec: secure aggregation quantises updates itself; use f32, not {:?}",
                self.codec
            ));
        }
        match (&self.dp, sa.clip_norm) {
            (Some(dp), _) if dp.placement != NoisePlacement::Client => {
                return Err(
                    "dp.placement: with secure aggregation the noise is added by the \
                            devices (their Skellam shares sum to the task's noise); use client"
                        .into(),
                );
            }
            (Some(dp), _) if dp.adaptive.is_some() => {
                return Err(
                    "dp.adaptive: adaptive clipping needs the coordinator to count \
                            clipped updates, which secure aggregation hides"
                        .into(),
                );
            }
            (None, None) => {
                return Err(
                    "secure_aggregation.clip_norm: a task without dp settings needs a \
                            clipping norm for the quantiser"
                        .into(),
                );
            }
            (None, Some(c)) if !(c.is_finite() && c > 0.0) => {
                return Err(format!("secure_aggregation.clip_norm: {c} must be > 0"));
            }
            _ => {}
        }
        if sa.stage_timeout_ms == 0 {
            return Err("secure_aggregation.stage_timeout_ms: must be at least 1".into());
        }
        if self.engine.min_reports <= usize::from(sa.threshold) {
            return Err(format!(
                "secure_aggregation.threshold: {} needs at least {} reports a round \
                 (engine.min_reports is {})",
                sa.threshold,
                usize::from(sa.threshold) + 1,
                self.engine.min_reports
            ));
        }
        self.secure_plan(0, 1, 0)?;
        Ok(())
    }

    /// The most rounds the privacy ledger charges one device with, when the
    /// task limits participation ([`EngineConfig::participation_bound`]);
    /// `None` when every round is charged.
    pub fn participation_bound(&self) -> Option<u64> {
        self.engine
            .limits_participation()
            .then(|| self.engine.participation_bound())
    }

    /// The sampling rate the privacy ledger charges each round with: 1.
    /// Amplification by sampling needs each device to take part
    /// independently with a known probability (Poisson sampling); the
    /// coordinator instead plans the first devices that check in and keeps
    /// the first reports, with no limit on how often a device takes part, so
    /// every round is composed as a full Gaussian step.
    pub fn accounting_sampling_rate(&self) -> f64 {
        1.0
    }

    /// The smallest noise multiplier a round of this task can close with
    /// (`None` for a task without DP): `z` with server noise; with client
    /// noise `z·√(min_reports/m)`, when only the quorum reports. Budget
    /// checks before a round use it, so that the round, however it closes,
    /// fits.
    pub fn least_noise_multiplier(&self) -> Option<f64> {
        self.dp
            .map(|dp| dp.effective_noise_multiplier(self.engine.min_reports))
    }

    fn participation_rule(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.engine.max_participations {
            parts.push(format!("max_participations {m}"));
        }
        if self.engine.min_separation > 1 {
            parts.push(format!("min_separation {}", self.engine.min_separation));
        }
        parts.join(", ")
    }

    /// What an ε of this task assumes, one sentence each, for printing next
    /// to it (empty for a task without DP).
    pub fn privacy_assumptions(&self) -> Vec<String> {
        let Some(dp) = &self.dp else {
            return Vec::new();
        };
        let z = dp.noise_multiplier;
        let c = dp.clip_norm;
        if let Some(sa) = &self.secure_aggregation {
            let mut out = vec![format!(
                "secure aggregation (SecAgg+, honest-but-curious coordinator): the coordinator \
                 sees only the sum of the surviving devices' quantised updates, as long as fewer \
                 than {} of any device's {} neighbours collude with it",
                sa.threshold, sa.degree
            )];
            out.push(format!(
                "distributed noise: each device clips to C = {c}, rounds and adds Skellam noise \
                 so that {} survivors carry z = {z}; ε is that of the Skellam mechanism (RDP) \
                 with the survivors' noise, and assumes every surviving device adds its share \
                 (a device that does not lowers the noise); neighbouring: one device's update \
                 replaced by zero; noise drawn with floating-point Poisson samplers",
                self.engine.min_reports
            ));
            out.push(match self.participation_bound() {
                None => "no sampling amplification: each round is composed in full".into(),
                Some(k) => format!(
                    "participation limit enforced by the coordinator: at most {k} rounds per \
                     device; which rounds a device joins is assumed not to depend on its data"
                ),
            });
            return out;
        }
        let mut out = vec![match dp.placement {
            NoisePlacement::Server => format!(
                "noise on the server: z = {z} on the sum of updates clipped to C = {c} (the \
                 coordinator clips every update again); the coordinator is trusted: it sees each \
                 update before the noise"
            ),
            NoisePlacement::Client => format!(
                "noise on the devices: z = {z} on the sum only if every device clips to C = {c} \
                 and adds its share; there is no secure aggregation, so the coordinator sees each \
                 update with noise multiplier z/√m = {:.4} (m = {}) and ε against it is that of \
                 z/√m",
                dp.per_update_noise_multiplier(),
                dp.expected_cohort
            ),
        }];
        out.push(match self.participation_bound() {
            None => "no sampling amplification: each round is composed in full (sampling rate \
                     1), T rounds by T-fold composition"
                .into(),
            Some(k) => format!(
                "participation limit enforced by the coordinator: a device's update is in at \
                 most {k} of the {} rounds ({}); ε is that of the device that took part most \
                 often, its rounds composed in full (no sampling amplification) at the least \
                 noise of any round; it assumes which rounds a device joins does not depend on \
                 its data (its availability and timing are not private)",
                self.engine.rounds,
                self.participation_rule()
            ),
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_aggregation::codec::Codec;

    fn spec() -> TaskSpec {
        TaskSpec {
            name: "t".into(),
            model: ModelSpec::fashion_2nn(),
            train: TrainConfig::default(),
            strategy: StrategyConfig::fedavg(),
            codec: Codec::F32,
            dp: None,
            budget: None,
            population: 10,
            engine: EngineConfig::default(),
            seed: 1,
            variant: Variant::Float,
            max_examples: DEFAULT_MAX_EXAMPLES,
            secure_aggregation: None,
        }
    }

    #[test]
    fn a_robust_rule_must_buffer_the_whole_target() {
        let mut s = spec();
        s.strategy = StrategyConfig::fedavg().with_rule(fleet_aggregation::Rule::Median);
        s.strategy.max_buffered = s.engine.target;
        s.validate().unwrap();
        s.strategy.max_buffered = s.engine.target - 1;
        let e = s.validate().unwrap_err();
        assert!(e.contains("max_buffered"), "{e}");
        // The mean streams: no buffer to fit.
        s.strategy.rule = fleet_aggregation::Rule::Mean;
        s.validate().unwrap();
    }

    fn private(placement: NoisePlacement) -> TaskSpec {
        TaskSpec {
            dp: Some(DpConfig {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
                placement,
                expected_cohort: 10,
                adaptive: None,
            }),
            ..spec()
        }
    }

    #[test]
    fn dp_needs_the_plain_mean() {
        use fleet_aggregation::Rule;
        private(NoisePlacement::Server).validate().unwrap();
        for rule in [
            Rule::Median,
            Rule::TrimmedMean { beta: 0.1 },
            Rule::Krum { f: 1 },
            Rule::MultiKrum { f: 1, m: 3 },
            Rule::Bulyan { f: 1 },
        ] {
            let mut s = private(NoisePlacement::Server);
            s.strategy = StrategyConfig::fedavg().with_rule(rule);
            let e = s.validate().unwrap_err();
            assert!(
                e.starts_with("dp:") && e.contains("strategy.rule must be the mean"),
                "{rule:?}: {e}"
            );
            // The same rule without DP is fine.
            s.dp = None;
            s.validate().unwrap();
        }
        // Server optimisers act on the noised mean: post-processing.
        let mut s = private(NoisePlacement::Server);
        s.strategy = StrategyConfig::fedadam(0.01, 1e-3);
        s.validate().unwrap();
    }

    #[test]
    fn dp_needs_noise() {
        for z in [0.0, -0.5, f64::NAN, f64::INFINITY] {
            let mut s = private(NoisePlacement::Server);
            s.dp.as_mut().unwrap().noise_multiplier = z;
            let e = s.validate().unwrap_err();
            assert!(
                e.starts_with("dp:") && e.contains("noise_multiplier"),
                "{z}: {e}"
            );
        }
    }

    #[test]
    fn lossy_codecs_are_refused_only_after_client_noise() {
        for codec in [
            Codec::F16,
            Codec::Int8 { chunk: 256 },
            Codec::TopK {
                fraction: 0.1,
                values: fleet_aggregation::codec::ValueCodec::F16,
            },
        ] {
            let mut s = private(NoisePlacement::Client);
            s.codec = codec;
            let e = s.validate().unwrap_err();
            assert!(e.starts_with("codec:") && e.contains("placement"), "{e}");
            // With server noise the coordinator clips what it decodes.
            s.dp.as_mut().unwrap().placement = NoisePlacement::Server;
            s.validate().unwrap();
        }
    }

    #[test]
    fn accounting_claims_no_amplification_and_checks_round_one() {
        let mut s = private(NoisePlacement::Server);
        s.population = 1_000_000;
        assert_eq!(s.accounting_sampling_rate(), 1.0);
        // One full Gaussian step at z = 1: RDP ε(α) = α/2; with δ = 1e-5 the
        // ledger's ε is a few units. A budget of 0.5 cannot hold it.
        s.budget = Some(PrivacyBudget {
            epsilon: 0.5,
            delta: 1e-5,
        });
        let e = s.validate().unwrap_err();
        assert!(e.starts_with("budget: not even round 1 fits"), "{e}");
        s.budget = Some(PrivacyBudget {
            epsilon: 10.0,
            delta: 1e-5,
        });
        s.validate().unwrap();
        // With client noise the least noise is that of the quorum.
        let mut c = private(NoisePlacement::Client);
        c.engine.min_reports = 4;
        c.engine.target = 10;
        assert!((c.least_noise_multiplier().unwrap() - (0.4f64).sqrt()).abs() < 1e-12);
        assert_eq!(s.least_noise_multiplier(), Some(1.0));
        assert_eq!(spec().least_noise_multiplier(), None);
    }

    #[test]
    fn privacy_assumptions_name_placement_trust_and_no_amplification() {
        assert!(spec().privacy_assumptions().is_empty());
        let server = private(NoisePlacement::Server)
            .privacy_assumptions()
            .join(" ");
        assert!(
            server.contains("noise on the server") && server.contains("trusted"),
            "{server}"
        );
        assert!(server.contains("no sampling amplification"), "{server}");
        let client = private(NoisePlacement::Client)
            .privacy_assumptions()
            .join(" ");
        assert!(
            client.contains("noise on the devices") && client.contains("z/√m = 0.3162"),
            "{client}"
        );
        assert!(client.contains("no secure aggregation"), "{client}");
    }

    #[test]
    fn participation_limits_bound_rounds_and_must_leave_enough_devices() {
        let mut s = private(NoisePlacement::Server);
        s.engine.rounds = 10;
        s.engine.min_reports = 8;
        assert_eq!(s.participation_bound(), None);
        s.engine.max_participations = Some(3);
        assert_eq!(s.participation_bound(), Some(3));
        // Participations 3 rounds apart: rounds 1, 4, 7, 10.
        s.engine.max_participations = None;
        s.engine.min_separation = 3;
        assert_eq!(s.participation_bound(), Some(4));
        s.engine.max_participations = Some(2);
        assert_eq!(s.participation_bound(), Some(2));
        // 10 rounds of at least 8 reports need 80 participations; 10
        // devices give 20.
        s.population = 10;
        let e = s.validate().unwrap_err();
        assert!(e.starts_with("engine:") && e.contains("80"), "{e}");
        s.population = 40;
        s.validate().unwrap();
        s.engine.max_participations = Some(0);
        let e = s.validate().unwrap_err();
        assert!(e.contains("max_participations"), "{e}");
        // The ε's assumptions name the limit and what it rests on.
        s.engine.max_participations = Some(2);
        let said = s.privacy_assumptions().join(" ");
        assert!(
            said.contains("at most 2 of the 10 rounds")
                && said.contains("max_participations 2, min_separation 3")
                && said.contains("does not depend on its data"),
            "{said}"
        );
        assert!(!said.contains("T-fold"), "{said}");
    }

    #[test]
    fn max_examples_defaults_in_stored_specs_and_must_be_positive() {
        let mut json: serde_json::Value = serde_json::to_value(spec()).unwrap();
        json.as_object_mut().unwrap().remove("max_examples");
        let old: TaskSpec = serde_json::from_value(json).unwrap();
        assert_eq!(old.max_examples, DEFAULT_MAX_EXAMPLES);
        let mut s = spec();
        s.max_examples = 0;
        assert!(s.validate().unwrap_err().starts_with("max_examples"));
    }

    #[test]
    fn variant_defaults_to_int8_in_stored_specs_and_is_checked_when_given() {
        let mut json: serde_json::Value = serde_json::to_value(spec()).unwrap();
        assert_eq!(json["variant"], "float");
        let float: TaskSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(float.variant, Variant::Float);
        // A spec stored before the field existed ships int8.
        json.as_object_mut().unwrap().remove("variant");
        let old: TaskSpec = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(old.variant, Variant::Int8);
        old.validate().unwrap();
        // An unknown variant is refused, naming the accepted ones.
        json["variant"] = "int4".into();
        let e = serde_json::from_value::<TaskSpec>(json)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("int4") && e.contains("float") && e.contains("int8"),
            "{e}"
        );
    }
}
