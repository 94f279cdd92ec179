//! The fleet file: a TOML description of a simulated fleet and its task.
//!
//! Every field has a default, so an empty file is a valid fleet (the same
//! one `fleet-sim` runs with no arguments). Unknown fields and unknown enum
//! values are errors that name the field or value and list what is allowed;
//! range checks ([`Fleet::validate`]) name the field by its dotted path.
//! `sim/fleets/default.toml` is the annotated reference of every field.

use std::path::Path;

use fleet_aggregation::codec::Codec;
use fleet_aggregation::privacy::accountant::ledger::PrivacyBudget;
use fleet_aggregation::privacy::adaptive::AdaptiveClipping;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{CentredClip, RelativeBound, StrategyConfig};
use fleet_coordinator::engine::EngineConfig;
use fleet_coordinator::task::UNBUDGETED_DELTA;
use fleet_models::data::partition::Scheme;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::task::{SecureAggregation, TaskSpec};
use serde::{Deserialize, Serialize};

/// A whole fleet: devices, their data, the task and the scenarios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fleet {
    /// Seed of every random choice of the simulation.
    pub seed: u64,
    /// Registered devices.
    pub devices: u32,
    /// Where the devices' data comes from.
    pub data: DataConfig,
    /// The model trained.
    pub model: ModelKind,
    /// The federated task.
    pub task: TaskConfig,
    /// Device profiles, mixed by weight.
    pub profiles: Vec<Profile>,
    /// Scenarios applied to a share of the devices.
    pub scenarios: Scenarios,
    /// Drift monitoring after training (absent: none).
    pub monitor: Option<MonitorSettings>,
}

impl Default for Fleet {
    fn default() -> Self {
        Self {
            seed: 1,
            devices: 100,
            data: DataConfig::default(),
            model: ModelKind::TwoNn,
            task: TaskConfig::default(),
            profiles: vec![
                Profile {
                    name: "phone".into(),
                    weight: 0.7,
                    ..Profile::default()
                },
                Profile {
                    name: "tablet".into(),
                    weight: 0.3,
                    examples_per_second: 4000.0,
                    download_mbps: 50.0,
                    upload_mbps: 20.0,
                    dropout: 0.02,
                    ..Profile::default()
                },
            ],
            scenarios: Scenarios::default(),
            monitor: None,
        }
    }
}

/// The data set and how it is spread over the devices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "set", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DataConfig {
    /// The 5,000 + 1,000 Fashion-MNIST images compiled into the binary.
    FashionEmbedded {
        /// How the training set is split across devices.
        #[serde(default)]
        partition: PartitionConfig,
    },
    /// The full Fashion-MNIST (60,000 + 10,000; `apt-get install dataset-fashion-mnist`).
    FashionFull {
        /// How the training set is split across devices.
        #[serde(default)]
        partition: PartitionConfig,
    },
    /// Synthetic(α, β) of the FedProx paper, generated per device from the
    /// seed when the device is selected (nothing is stored for idle devices).
    Synthetic {
        /// Spread of the local models (α).
        #[serde(default = "one")]
        alpha: f64,
        /// Spread of the local input means (β).
        #[serde(default = "one")]
        beta: f64,
        /// Training examples per device.
        #[serde(default = "forty")]
        examples: u32,
        /// Devices whose held-out examples form the central test set.
        #[serde(default = "five_hundred")]
        test_devices: u32,
        /// Held-out examples per test device.
        #[serde(default = "twenty")]
        test_examples: u32,
    },
}

fn one() -> f64 {
    1.0
}
fn forty() -> u32 {
    40
}
fn five_hundred() -> u32 {
    500
}
fn twenty() -> u32 {
    20
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig::FashionEmbedded {
            partition: PartitionConfig::default(),
        }
    }
}

/// How a labelled training set is split across devices.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PartitionConfig {
    /// Uniformly at random.
    Iid,
    /// Label proportions per device from a symmetric Dirichlet(α).
    Dirichlet {
        /// Concentration α > 0 (smaller: more skewed).
        #[serde(default = "half")]
        alpha: f64,
    },
    /// McMahan et al.'s label-sorted shards.
    Shards {
        /// Shards per device.
        #[serde(default = "two")]
        per_device: usize,
    },
}

fn half() -> f64 {
    0.5
}
fn two() -> usize {
    2
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig::Dirichlet { alpha: 0.5 }
    }
}

impl PartitionConfig {
    /// The partitioner's scheme.
    pub fn scheme(self) -> Scheme {
        match self {
            PartitionConfig::Iid => Scheme::Iid,
            PartitionConfig::Dirichlet { alpha } => Scheme::Dirichlet { alpha },
            PartitionConfig::Shards { per_device } => Scheme::Shards {
                shards_per_client: per_device,
            },
        }
    }
}

/// The model architecture; its input size follows from the data set.
pub use fleet_models::ModelKind;

/// Aggregation strategy (named as in task definitions).
pub use fleet_aggregation::StrategyName as StrategyKind;

/// Update codec on the wire.
pub use fleet_aggregation::codec::CodecKind;

/// The federated task: round engine settings, local training, aggregation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// Rounds to close.
    pub rounds: u64,
    /// Reports wanted per round (the round closes as soon as they are in).
    pub target: usize,
    /// Devices selected per wanted report (1.3: 30% over-selection).
    pub over_selection: f64,
    /// Fewest reports with which a round still closes at its deadline
    /// (default: 80% of `target`, at least 1).
    pub min_reports: Option<usize>,
    /// Longest selection phase (virtual seconds).
    pub selection_timeout_s: f64,
    /// Start of selection during which check-ins are gathered and the
    /// cohort drawn at random among them (0: first come, first selected).
    pub selection_window_s: f64,
    /// Time selected devices have to report (virtual seconds).
    pub report_deadline_s: f64,
    /// Largest random delay added to a device's come-back time (virtual seconds).
    pub pace_jitter_s: f64,
    /// How soon devices turned away while reports are collected come back
    /// (virtual seconds; about one cohort returns per period).
    pub retry_s: f64,
    /// Most rounds one device's update may be aggregated in (absent: no
    /// limit). A private task's ε is then that of the device that took part
    /// most often.
    pub max_participations: Option<u32>,
    /// Fewest rounds between two participations of one device (0 or 1: none).
    pub min_separation: u64,
    /// Local epochs.
    pub epochs: usize,
    /// Local batch size.
    pub batch: usize,
    /// Local learning rate.
    pub lr: f64,
    /// Local SGD momentum.
    pub momentum: f64,
    /// FedProx μ (0: off).
    pub prox_mu: f64,
    /// Aggregation strategy.
    pub strategy: StrategyKind,
    /// Server learning rate (default: 1 for FedAvg and FedAvgM, 0.01 for the adaptive ones).
    pub server_lr: Option<f32>,
    /// Update codec.
    pub codec: CodecKind,
    /// Share of coordinates kept by the `topk` codec.
    pub topk_fraction: f32,
    /// Differential privacy (DP-FedAvg); absent: off.
    pub dp: Option<DpSettings>,
    /// Limits relative to the round's first reports (`RelativeBound`).
    pub bound: bool,
    /// Reports whose medians set those limits.
    pub bound_warmup: u32,
    /// Norms are scaled down to this times the median norm.
    pub bound_norm_factor: f64,
    /// Weights are capped at this times the median weight.
    pub bound_weight_factor: f64,
    /// Centred clipping around the previous round's delta (`CentredClip`;
    /// needs the relative bound).
    pub centred: bool,
    /// Its radius: this times the previous round's lower median deviation.
    pub centred_radius_factor: f64,
    /// Most local examples a report may declare.
    pub max_examples: u64,
    /// Secure aggregation (SecAgg+ with distributed Skellam noise); absent:
    /// off.
    pub secure_aggregation: Option<SecureSettings>,
}

/// Secure aggregation of the task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecureSettings {
    /// Shares that reconstruct a device's secrets (default: a majority of
    /// the degree).
    pub threshold: Option<u16>,
    /// Neighbours of each device (default: `2·⌈log2 cohort⌉`, at least 4).
    pub degree: Option<u16>,
    /// Longest wait of each stage (virtual seconds).
    pub stage_timeout_s: f64,
    /// L2 clip of each update without `[task.dp]` (with it, `dp.clip`).
    pub clip: Option<f64>,
    /// Probability that a device drops out at each stage after its
    /// advertisement (absent: its profile's `dropout`).
    pub stage_dropout: Option<f64>,
    /// One-way network latency of each protocol message (virtual seconds).
    pub latency_s: f64,
}

impl Default for SecureSettings {
    fn default() -> Self {
        Self {
            threshold: None,
            degree: None,
            stage_timeout_s: 30.0,
            clip: None,
            stage_dropout: None,
            latency_s: 0.05,
        }
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        Self {
            rounds: 100,
            target: 10,
            over_selection: 1.3,
            min_reports: None,
            selection_timeout_s: 60.0,
            selection_window_s: 0.0,
            report_deadline_s: 300.0,
            pace_jitter_s: 30.0,
            retry_s: 10.0,
            max_participations: None,
            min_separation: 0,
            epochs: 5,
            batch: 32,
            lr: 0.05,
            momentum: 0.0,
            prox_mu: 0.0,
            strategy: StrategyKind::Fedavg,
            server_lr: None,
            codec: CodecKind::F32,
            topk_fraction: 0.1,
            dp: None,
            bound: true,
            bound_warmup: RelativeBound::DEFAULT.warmup,
            bound_norm_factor: RelativeBound::DEFAULT.norm_factor,
            bound_weight_factor: RelativeBound::DEFAULT.weight_factor,
            centred: true,
            centred_radius_factor: CentredClip::DEFAULT.radius_factor,
            max_examples: fleet_protocol::task::DEFAULT_MAX_EXAMPLES,
            secure_aggregation: None,
        }
    }
}

/// Differential privacy of the task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpSettings {
    /// Noise multiplier z (noise standard deviation over the clipping norm).
    pub noise_multiplier: f64,
    /// L2 clipping norm of each update.
    pub clip: f64,
    /// δ of the accountant.
    pub delta: f64,
    /// ε budget: the run stops before a round that would exceed it.
    pub budget: Option<f64>,
    /// Who adds the noise.
    pub placement: Placement,
    /// Adaptive clipping (server noise only): the clip starts at `clip` and
    /// follows this quantile of update norms (absent: a fixed clip).
    pub adaptive_quantile: Option<f64>,
    /// Adaptive clipping's geometric learning rate η.
    pub adaptive_learning_rate: f64,
    /// Standard deviation of the noise on the count of unclipped updates
    /// (absent: target/20, as in Andrew et al.).
    pub adaptive_count_noise: Option<f64>,
}

impl Default for DpSettings {
    fn default() -> Self {
        Self {
            noise_multiplier: 1.0,
            clip: 1.0,
            delta: 1e-5,
            budget: None,
            placement: Placement::Server,
            adaptive_quantile: None,
            adaptive_learning_rate: 0.2,
            adaptive_count_noise: None,
        }
    }
}

/// Where differential-privacy noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// Each device adds its share; with no secure aggregation the
    /// coordinator sees each update with noise multiplier `z/√m`.
    Client,
    /// The server clips every update again and adds the noise to the sum
    /// (the default; the coordinator is trusted).
    Server,
}

/// A kind of device. Each device gets one profile, drawn by weight from its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// Name, for the report.
    pub name: String,
    /// Relative share of the fleet.
    pub weight: f64,
    /// Local training speed (examples per second, counting every epoch).
    pub examples_per_second: f64,
    /// Download bandwidth (megabits per second).
    pub download_mbps: f64,
    /// Upload bandwidth (megabits per second).
    pub upload_mbps: f64,
    /// Probability that a selected device drops out before reporting.
    pub dropout: f64,
    /// Mean share of the time a device is available (charging, idle, unmetered).
    pub availability: f64,
    /// Day/night swing of the availability: it is
    /// `availability + swing · cos(2π (local hour − peak_hour) / 24)`, clamped to [0, 1].
    pub day_night_swing: f64,
    /// Local hour of the highest availability.
    pub peak_hour: f64,
    /// Devices' local time offsets are spread uniformly over this many hours (0: all on UTC).
    pub timezone_spread_hours: f64,
    /// Mean time between check-ins of an idle device (virtual seconds).
    pub checkin_interval_s: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            name: "device".into(),
            weight: 1.0,
            examples_per_second: 2000.0,
            download_mbps: 20.0,
            upload_mbps: 5.0,
            dropout: 0.05,
            availability: 0.8,
            day_night_swing: 0.2,
            peak_hour: 2.0,
            timezone_spread_hours: 24.0,
            checkin_interval_s: 120.0,
        }
    }
}

/// Scenarios applied to a share of the devices.
///
/// Each scenario is one optional table. A new one (covariate drift on a
/// share of the devices from a given round, for example) is a new field
/// here and a hook in [`crate::scenario`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenarios {
    /// Devices that send corrupted updates.
    pub byzantine: Option<ByzantineConfig>,
    /// Devices whose data changes from a given monitoring window on.
    pub drift: Option<DriftScenario>,
}

/// Drift on a share of the devices: from window `from_window` of the
/// monitoring phase, the last `fraction` of the devices (by id; with equal
/// cohorts, whole cohorts from the last one down) see changed data, both
/// what they serve and what they train on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftScenario {
    /// What changes.
    pub kind: DriftKind,
    /// How much (unit depends on `kind`).
    pub strength: f32,
    /// Share of the devices affected.
    pub fraction: f64,
    /// First monitoring window (from 0) with changed data.
    pub from_window: u64,
}

impl Default for DriftScenario {
    fn default() -> Self {
        Self {
            kind: DriftKind::Brightness,
            strength: 0.3,
            fraction: 0.2,
            from_window: 10,
        }
    }
}

/// A change of the devices' data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DriftKind {
    /// Pixel intensities (0–1) shifted by `strength`, clamped.
    Brightness,
    /// Pixel intensities scaled by `strength` around 0.5, clamped.
    Contrast,
    /// Images rotated by `strength` degrees.
    Rotation,
    /// Gaussian noise of standard deviation `strength` added to intensities, clamped.
    Noise,
    /// Served inputs come only from the first `strength` classes (label shift;
    /// training data is unchanged).
    Labels,
}

/// The monitoring phase: after training, devices serve predictions with the
/// global model and send a drift summary every window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorSettings {
    /// Reporting windows simulated.
    pub windows: u64,
    /// Predictions each device serves per window (inputs drawn from its data).
    pub predictions: u32,
    /// Share of predictions whose true label becomes known.
    pub label_rate: f64,
    /// Probability that a device sends its summary in a window.
    pub report_probability: f64,
    /// Devices are split by id into this many equal cohorts, `cohort-0`, `cohort-1`, ….
    pub cohorts: u32,
    /// Thresholds and hysteresis of the coordinator's monitor.
    pub thresholds: fleet_coordinator::drift::MonitorConfig,
    /// Retraining when a cohort drifts.
    pub retrain: fleet_coordinator::drift::RetrainPolicy,
}

impl Default for MonitorSettings {
    fn default() -> Self {
        Self {
            windows: 50,
            predictions: 30,
            label_rate: 0.2,
            report_probability: 0.9,
            cohorts: 5,
            thresholds: fleet_coordinator::drift::MonitorConfig::default(),
            retrain: fleet_coordinator::drift::RetrainPolicy::default(),
        }
    }
}

/// Byzantine devices: a share of the fleet whose updates are corrupted
/// after local training, before privacy and encoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ByzantineConfig {
    /// Share of the devices that are Byzantine.
    pub fraction: f64,
    /// What they do to their update.
    pub attack: Attack,
    /// Factor of the attack: the update becomes `−scale·Δ` (sign flip) or `scale·Δ` (scaled).
    pub scale: f32,
    /// Local examples they declare instead of what they hold (their weight
    /// in a task without DP); the task's `max_examples` still applies.
    pub examples: Option<u64>,
}

impl Default for ByzantineConfig {
    fn default() -> Self {
        Self {
            fraction: 0.1,
            attack: Attack::SignFlip,
            scale: 1.0,
            examples: None,
        }
    }
}

/// A Byzantine attack on updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    /// Send `−scale·Δ`.
    SignFlip,
    /// Send `scale·Δ`.
    Scaled,
    /// Send `f32::MAX` in every coordinate (`scale` is not used).
    MaxValues,
}

/// A fleet file that cannot be used, with a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetError(pub String);

impl std::fmt::Display for FleetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for FleetError {}

fn bad<T>(field: &str, reason: impl std::fmt::Display) -> Result<T, FleetError> {
    Err(FleetError(format!("{field}: {reason}")))
}

fn finite_in(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), FleetError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        bad(field, format!("{v} must be a number in [{lo}, {hi}]"))
    }
}

fn positive(field: &str, v: f64) -> Result<(), FleetError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        bad(field, format!("{v} must be a finite number > 0"))
    }
}

impl Fleet {
    /// Parses a fleet from TOML text and checks it.
    pub fn from_toml(text: &str) -> Result<Self, FleetError> {
        let fleet: Fleet = toml::from_str(text).map_err(|e| FleetError(e.to_string()))?;
        fleet.validate()?;
        Ok(fleet)
    }

    /// Reads and checks a fleet file.
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| FleetError(format!("cannot read {}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| FleetError(format!("{}: {e}", path.display())))
    }

    /// Checks every range, naming the first bad field by its dotted path.
    pub fn validate(&self) -> Result<(), FleetError> {
        if self.devices == 0 {
            return bad("devices", "must be at least 1");
        }
        match self.data {
            DataConfig::FashionEmbedded { partition } | DataConfig::FashionFull { partition } => {
                match partition {
                    PartitionConfig::Dirichlet { alpha } => {
                        positive("data.partition.alpha", alpha)?
                    }
                    PartitionConfig::Shards { per_device: 0 } => {
                        return bad("data.partition.per_device", "must be at least 1");
                    }
                    _ => {}
                }
            }
            DataConfig::Synthetic {
                alpha,
                beta,
                examples,
                test_devices,
                test_examples,
            } => {
                finite_in("data.alpha", alpha, 0.0, f64::MAX)?;
                finite_in("data.beta", beta, 0.0, f64::MAX)?;
                if examples == 0 {
                    return bad("data.examples", "must be at least 1");
                }
                if test_devices == 0 || test_examples == 0 {
                    return bad(
                        "data.test_devices / data.test_examples",
                        "must both be at least 1",
                    );
                }
                if self.model == ModelKind::Cnn {
                    return bad(
                        "model",
                        "\"cnn\" needs images; with the synthetic data set use \"logreg\" or \"2nn\"",
                    );
                }
            }
        }
        let t = &self.task;
        if t.rounds == 0 {
            return bad("task.rounds", "must be at least 1");
        }
        if t.target == 0 {
            return bad("task.target", "must be at least 1");
        }
        if !(t.over_selection.is_finite() && t.over_selection >= 1.0) {
            return bad(
                "task.over_selection",
                format!("{} must be a number >= 1", t.over_selection),
            );
        }
        let cohort = self.engine_config().cohort();
        if cohort > self.devices as usize {
            return bad(
                "task.target",
                format!(
                    "{} reports with over-selection {} select {cohort} devices, more than the {} in the fleet",
                    t.target, t.over_selection, self.devices
                ),
            );
        }
        if let Some(m) = t.min_reports
            && (m == 0 || m > t.target)
        {
            return bad(
                "task.min_reports",
                format!("{m} must be in 1..={}", t.target),
            );
        }
        positive("task.selection_timeout_s", t.selection_timeout_s)?;
        finite_in(
            "task.selection_window_s",
            t.selection_window_s,
            0.0,
            t.selection_timeout_s,
        )?;
        positive("task.report_deadline_s", t.report_deadline_s)?;
        finite_in("task.pace_jitter_s", t.pace_jitter_s, 0.0, f64::MAX)?;
        finite_in("task.retry_s", t.retry_s, 0.001, f64::MAX)?;
        if t.epochs == 0 {
            return bad("task.epochs", "must be at least 1");
        }
        if t.batch == 0 {
            return bad("task.batch", "must be at least 1");
        }
        positive("task.lr", t.lr)?;
        if !(0.0..1.0).contains(&t.momentum) {
            return bad("task.momentum", format!("{} must be in [0, 1)", t.momentum));
        }
        finite_in("task.prox_mu", t.prox_mu, 0.0, f64::MAX)?;
        if let Some(lr) = t.server_lr {
            positive("task.server_lr", f64::from(lr))?;
        }
        if !(t.topk_fraction > 0.0 && t.topk_fraction <= 1.0) {
            return bad(
                "task.topk_fraction",
                format!("{} must be in (0, 1]", t.topk_fraction),
            );
        }
        if t.strategy == StrategyKind::Krum && t.target < 3 {
            return bad("task.strategy", "krum needs a target of at least 3 reports");
        }
        if t.bound {
            if !(1..=RelativeBound::MAX_WARMUP).contains(&t.bound_warmup) {
                return bad(
                    "task.bound_warmup",
                    format!(
                        "{} must be between 1 and {}",
                        t.bound_warmup,
                        RelativeBound::MAX_WARMUP
                    ),
                );
            }
            for (field, v) in [
                ("task.bound_norm_factor", t.bound_norm_factor),
                ("task.bound_weight_factor", t.bound_weight_factor),
            ] {
                finite_in(field, v, 1.0, f64::MAX)?;
            }
            if t.centred {
                positive("task.centred_radius_factor", t.centred_radius_factor)?;
            }
        }
        if let Err(e) = self.strategy().validate() {
            return bad("task", e.to_string());
        }
        if t.max_examples == 0 {
            return bad("task.max_examples", "must be at least 1");
        }
        if let Some(dp) = &t.dp {
            positive("task.dp.noise_multiplier", dp.noise_multiplier)?;
            positive("task.dp.clip", dp.clip)?;
            if self.strategy().rule != fleet_aggregation::Rule::Mean {
                return bad(
                    "task.strategy",
                    format!(
                        "\"{}\" with [task.dp]: differential privacy needs the plain mean \
                         (fedavg, fedavgm, fedadam, fedyogi or fedadagrad); one update can move \
                         a median, a trimmed mean or Krum's choice by more than the clipping norm",
                        t.strategy.as_str()
                    ),
                );
            }
            if dp.placement == Placement::Client && t.codec != CodecKind::F32 {
                return bad(
                    "task.codec",
                    format!(
                        "\"{}\" with task.dp.placement = \"client\": a lossy codec runs on each \
                         update after its noise, so the sum no longer carries z·C; use \"f32\", \
                         or placement = \"server\" (the coordinator clips what it decodes)",
                        t.codec.as_str()
                    ),
                );
            }
            if !(dp.delta > 0.0 && dp.delta < 1.0) {
                return bad("task.dp.delta", format!("{} must be in (0, 1)", dp.delta));
            }
            if let Some(b) = dp.budget {
                positive("task.dp.budget", b)?;
            } else if dp.delta != UNBUDGETED_DELTA {
                return bad(
                    "task.dp.delta",
                    format!(
                        "{} applies only with task.dp.budget: without a budget, ε is reported at \
                         δ = {UNBUDGETED_DELTA}, as the coordinator does",
                        dp.delta
                    ),
                );
            }
        }
        if let Some(sa) = &t.secure_aggregation {
            positive(
                "task.secure_aggregation.stage_timeout_s",
                sa.stage_timeout_s,
            )?;
            if !(sa.latency_s.is_finite() && sa.latency_s >= 0.0) {
                return bad(
                    "task.secure_aggregation.latency_s",
                    format!("{} must be >= 0", sa.latency_s),
                );
            }
            if let Some(p) = sa.stage_dropout
                && !(0.0..1.0).contains(&p)
            {
                return bad(
                    "task.secure_aggregation.stage_dropout",
                    format!("{p} must be in [0, 1)"),
                );
            }
            if let Err(e) = self.task_spec().validate() {
                return bad("task.secure_aggregation", e);
            }
        }
        if let Some(dp) = &t.dp
            && dp.budget.is_some()
        {
            let spec = self.task_spec();
            if let Err(e) = spec.validate() {
                return bad("task.dp.budget", e);
            }
        }
        if self.profiles.is_empty() {
            return bad("profiles", "need at least one [[profiles]] entry");
        }
        for (i, p) in self.profiles.iter().enumerate() {
            let f = |name: &str| format!("profiles[{i}].{name}");
            positive(&f("weight"), p.weight)?;
            positive(&f("examples_per_second"), p.examples_per_second)?;
            positive(&f("download_mbps"), p.download_mbps)?;
            positive(&f("upload_mbps"), p.upload_mbps)?;
            finite_in(&f("dropout"), p.dropout, 0.0, 1.0)?;
            finite_in(&f("availability"), p.availability, 0.0, 1.0)?;
            finite_in(&f("day_night_swing"), p.day_night_swing, 0.0, 1.0)?;
            finite_in(&f("peak_hour"), p.peak_hour, 0.0, 24.0)?;
            finite_in(
                &f("timezone_spread_hours"),
                p.timezone_spread_hours,
                0.0,
                24.0,
            )?;
            positive(&f("checkin_interval_s"), p.checkin_interval_s)?;
            if p.availability + p.day_night_swing <= 0.0 {
                return bad(
                    &f("availability"),
                    "devices of this profile would never be available",
                );
            }
        }
        if let Some(b) = &self.scenarios.byzantine {
            finite_in("scenarios.byzantine.fraction", b.fraction, 0.0, 1.0)?;
            if !(b.scale.is_finite() && b.scale > 0.0) {
                return bad(
                    "scenarios.byzantine.scale",
                    format!("{} must be a finite number > 0", b.scale),
                );
            }
            if b.examples == Some(0) {
                return bad("scenarios.byzantine.examples", "must be at least 1");
            }
        }
        if let Some(m) = &self.monitor {
            if m.windows == 0 || m.predictions == 0 {
                return bad(
                    "monitor.windows",
                    "monitor.windows and monitor.predictions must be at least 1",
                );
            }
            finite_in("monitor.label_rate", m.label_rate, 0.0, 1.0)?;
            finite_in("monitor.report_probability", m.report_probability, 0.0, 1.0)?;
            if m.cohorts == 0 || m.cohorts > self.devices {
                return bad(
                    "monitor.cohorts",
                    "must be between 1 and the number of devices",
                );
            }
            m.thresholds
                .validate("monitor.thresholds")
                .map_err(FleetError)?;
            if m.retrain.enabled && m.retrain.rounds == 0 {
                return bad("monitor.retrain.rounds", "must be at least 1");
            }
        }
        if let Some(d) = &self.scenarios.drift {
            if self.monitor.is_none() {
                return bad(
                    "scenarios.drift",
                    "drift happens during monitoring windows; add a [monitor] table",
                );
            }
            finite_in("scenarios.drift.fraction", d.fraction, 0.0, 1.0)?;
            let images = !matches!(self.data, DataConfig::Synthetic { .. });
            let (lo, hi, unit) = match d.kind {
                DriftKind::Brightness => (-1.0, 1.0, "an intensity shift"),
                DriftKind::Contrast => (0.0, 10.0, "a contrast factor"),
                DriftKind::Rotation => (-180.0, 180.0, "degrees"),
                DriftKind::Noise => (0.0, 1.0, "a standard deviation"),
                DriftKind::Labels => (1.0, 1e9, "a number of classes"),
            };
            finite_in(
                &format!("scenarios.drift.strength ({unit})"),
                f64::from(d.strength),
                lo,
                hi,
            )?;
            if !images && d.kind != DriftKind::Noise {
                return bad(
                    "scenarios.drift.kind",
                    "brightness, contrast, rotation and labels need image data (fashion-*); \
                     synthetic data allows \"noise\"",
                );
            }
        }
        Ok(())
    }

    /// The model for this fleet's data set.
    pub fn model_spec(&self) -> ModelSpec {
        let (inputs, classes) = match self.data {
            DataConfig::Synthetic { .. } => (60, 10),
            _ => (784, 10),
        };
        self.model.spec(inputs, classes)
    }

    /// The round engine's settings.
    pub fn engine_config(&self) -> EngineConfig {
        let t = &self.task;
        let ms = |s: f64| (s * 1000.0).round().max(0.0) as u64;
        EngineConfig {
            target: t.target,
            over_selection: t.over_selection,
            min_reports: t
                .min_reports
                .unwrap_or_else(|| ((t.target as f64 * 0.8).ceil() as usize).max(1)),
            selection_timeout_ms: ms(t.selection_timeout_s).max(1),
            selection_window_ms: ms(t.selection_window_s),
            report_deadline_ms: ms(t.report_deadline_s).max(1),
            rounds: t.rounds,
            pace_jitter_ms: ms(t.pace_jitter_s),
            retry_ms: ms(t.retry_s).max(1),
            seed: self.seed ^ 0xe6e1_0e5e,
            max_participations: t.max_participations,
            min_separation: t.min_separation,
        }
    }

    /// Local training settings. Their seed is the fleet's; each device
    /// trains with [`training_seed`](fleet_edge_agent::work::training_seed)
    /// of it, its id and the round, as an agent does with its plan's.
    pub fn train_config(&self) -> TrainConfig {
        let t = &self.task;
        TrainConfig {
            seed: self.seed,
            epochs: t.epochs,
            batch_size: t.batch,
            learning_rate: t.lr,
            momentum: t.momentum,
            prox_mu: t.prox_mu,
            ..TrainConfig::default()
        }
    }

    /// The aggregation strategy.
    pub fn strategy(&self) -> StrategyConfig {
        let t = &self.task;
        StrategyConfig {
            bound: t.bound.then_some(RelativeBound {
                warmup: t.bound_warmup,
                norm_factor: t.bound_norm_factor,
                weight_factor: t.bound_weight_factor,
            }),
            centred: (t.bound && t.centred).then_some(CentredClip {
                radius_factor: t.centred_radius_factor,
            }),
            ..t.strategy.config(t.server_lr, t.target)
        }
    }

    /// The update codec.
    pub fn codec(&self) -> Codec {
        self.task.codec.codec(self.task.topk_fraction)
    }

    /// The task this fleet runs, as the coordinator would be given it: the
    /// simulator's task core and the network mode's coordinator run this.
    pub fn task_spec(&self) -> TaskSpec {
        TaskSpec {
            name: "fleet-sim".into(),
            model: self.model_spec(),
            train: self.train_config(),
            strategy: self.strategy(),
            codec: self.codec(),
            dp: self.dp(),
            budget: self.task.dp.and_then(|d| {
                d.budget.map(|epsilon| PrivacyBudget {
                    epsilon,
                    delta: d.delta,
                })
            }),
            population: u64::from(self.devices),
            engine: self.engine_config(),
            seed: self.seed,
            variant: Default::default(),
            max_examples: self.task.max_examples,
            secure_aggregation: self.task.secure_aggregation.map(|sa| {
                let defaults = SecureAggregation::for_cohort(self.engine_config().cohort());
                SecureAggregation {
                    threshold: sa.threshold.unwrap_or(defaults.threshold),
                    degree: sa.degree.unwrap_or(defaults.degree),
                    stage_timeout_ms: (sa.stage_timeout_s * 1000.0).round() as u64,
                    clip_norm: sa.clip,
                }
            }),
        }
    }

    /// Differential privacy, if on.
    pub fn dp(&self) -> Option<DpConfig> {
        self.task.dp.map(|d| DpConfig {
            clip_norm: d.clip,
            noise_multiplier: d.noise_multiplier,
            placement: match d.placement {
                Placement::Client => NoisePlacement::Client,
                Placement::Server => NoisePlacement::Server,
            },
            expected_cohort: self.task.target,
            adaptive: d.adaptive_quantile.map(|q| AdaptiveClipping {
                target_quantile: q,
                learning_rate: d.adaptive_learning_rate,
                count_noise_std: d
                    .adaptive_count_noise
                    .unwrap_or(self.task.target as f64 / 20.0),
            }),
        })
    }
}
