//! The definition of a federated task, as an administrator submits it and the
//! coordinator stores it: model, local training, aggregation, privacy and the
//! round engine's settings.

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_aggregation::privacy::DpConfig;
use fleet_aggregation::privacy::accountant::ledger::PrivacyBudget;
use fleet_models::export::Variant;
use fleet_models::{ModelSpec, TrainConfig};
use serde::{Deserialize, Serialize};

use crate::message::{ObjectRef, Plan};

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
        Ok(())
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
    /// Devices eligible for the task: the sampling rate of a round is the
    /// cohort divided by this (privacy accounting).
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
        }
    }

    /// Checks every part; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name: must not be empty".into());
        }
        self.model.validate().map_err(|e| format!("model: {e}"))?;
        self.strategy
            .validate()
            .map_err(|e| format!("strategy: {e}"))?;
        self.engine.validate().map_err(|e| format!("engine: {e}"))?;
        if let Some(dp) = &self.dp {
            dp.validate().map_err(|e| format!("dp: {e}"))?;
        }
        if self.budget.is_some() && self.dp.is_none() {
            return Err("budget: a privacy budget needs dp settings".into());
        }
        if self.strategy.rule != fleet_aggregation::Rule::Mean
            && self.engine.target > self.strategy.max_buffered
        {
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
        Ok(())
    }

    /// The Poisson sampling rate used for accounting: reports per round over population.
    pub fn sampling_rate(&self) -> f64 {
        (self.engine.target as f64 / self.population as f64).min(1.0)
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
