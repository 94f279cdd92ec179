//! The fleet drift monitor: a sans-IO state machine, like the round engine.
//!
//! Devices send summaries ([`fleet_drift::Summary`]) of what
//! their model saw and predicted during a reporting window; the monitor
//! checks each one, merges it into three kinds of scope — the device, each
//! cohort the device belongs to (group, region, hardware class: tags the
//! device reports; the model version is one more cohort, `version:<n>`), and
//! the fleet — and, when the driver closes the window
//! ([`DriftMonitor::close_window`]), scores every scope with enough inputs
//! against the model version's [`Reference`] and feeds one hysteresis
//! [`Flag`] per scope and signal. Flag changes are [`DriftEvent`]s; the
//! [`RetrainPolicy`] turns a raised cohort or fleet flag into a
//! [`Retrain`] request, at most once per cool-down.
//!
//! The reference of a version is the summary of its training data plus, for
//! the fleet and each cohort, that scope's own serving baseline: the merged
//! windows of the first `baseline_windows` windows after the version was
//! set. During those windows only the inputs are scored (against the
//! training data); afterwards every signal is scored against the scope's
//! baseline, so a cohort whose data always differed a little from the
//! fleet's training mixture is not flagged, and one whose data changes is.
//! Devices have no baseline (memory): they are compared with the training
//! data.
//!
//! The QUIC server drives it with the wall clock and `fleet-sim` with a
//! virtual one; it owns no clock, socket or database. Memory is one
//! summary (under 1 KB for the 2NN) per scope seen in the open window, plus
//! one flag per scope and signal.

use std::collections::{BTreeMap, BTreeSet};

use fleet_drift::score::score;
use fleet_drift::{
    Flag, Hysteresis, Reference, Scores, Signal, SketchSpec, Sketcher, Summary, SummaryError,
    Transition,
};
use serde::{Deserialize, Serialize};

/// Cohort tags a device may report.
pub const MAX_TAGS: usize = 8;
/// Longest cohort tag, in bytes.
pub const MAX_TAG_LEN: usize = 64;
/// Distinct cohort tags a monitor keeps state for (summaries, baselines,
/// flags, metric series). Tags are chosen by devices, so without a bound a
/// few devices inventing new tags every window would grow memory and the
/// metrics without end. Beyond it, a summary's new tags are ignored (the
/// summary still counts for the fleet, its version and its known cohorts)
/// and counted ([`DriftMonitor::tags_ignored`]).
pub const MAX_COHORTS: usize = 256;

/// Settings of the monitor (thresholds on PSI: by a common convention 0.1
/// is a moderate shift and 0.25 a large one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// A scope is scored only with at least this many inputs in the window
    /// (PSI of `b` bins on `n` inputs is about `(b − 1) / n` with no drift at all).
    pub min_inputs: u64,
    /// Score device scopes too (one summary per reporting device per window).
    pub devices: bool,
    /// Windows after a new model version whose fleet summaries form its serving baseline.
    pub baseline_windows: u32,
    /// Largest feature PSI.
    pub covariate: Hysteresis,
    /// PSI of the predicted classes.
    pub label: Hysteresis,
    /// PSI of the confidence histogram.
    pub confidence: Hysteresis,
    /// Accuracy drop (fraction, 0.05 = 5 points) on labelled predictions.
    pub accuracy: Hysteresis,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        let h = |raise, clear| Hysteresis {
            raise,
            clear,
            raise_after: 2,
            clear_after: 3,
        };
        Self {
            min_inputs: 500,
            devices: true,
            baseline_windows: 1,
            covariate: h(0.1, 0.05),
            label: h(0.1, 0.05),
            confidence: h(0.1, 0.05),
            accuracy: h(0.05, 0.02),
        }
    }
}

impl MonitorConfig {
    /// Checks every field; errors name it (`prefix.field`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if self.min_inputs == 0 {
            return Err(format!("{prefix}.min_inputs must be ≥ 1"));
        }
        for s in Signal::ALL {
            self.thresholds(s)
                .validate(&format!("{prefix}.{}", s.name()))?;
        }
        Ok(())
    }

    /// The thresholds of `signal`.
    pub fn thresholds(&self, signal: Signal) -> &Hysteresis {
        match signal {
            Signal::Covariate => &self.covariate,
            Signal::Label => &self.label,
            Signal::Confidence => &self.confidence,
            Signal::Accuracy => &self.accuracy,
        }
    }
}

/// What a window's summaries are merged into.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Scope {
    /// All devices.
    Fleet,
    /// Devices sharing a tag.
    Cohort(String),
    /// One device.
    Device(u64),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Fleet => f.write_str("fleet"),
            Scope::Cohort(c) => write!(f, "cohort {c}"),
            Scope::Device(d) => write!(f, "device {d}"),
        }
    }
}

/// A summary from one device.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSummary<'a> {
    /// The device.
    pub device: u64,
    /// Its cohort tags.
    pub tags: &'a [String],
    /// The model version that served the predictions.
    pub version: u64,
    /// The counts.
    pub summary: &'a Summary,
}

/// Why a summary was refused; the monitor is unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriftRejection {
    /// Shapes or counts.
    #[error("{0}")]
    Summary(#[from] SummaryError),
    /// The summary is for a model version the monitor does not know.
    #[error("summary is for model version {found}; the monitored version is {expected}")]
    Version {
        /// The monitored version.
        expected: u64,
        /// The summary's.
        found: u64,
    },
    /// Too many or too long cohort tags.
    #[error("at most {MAX_TAGS} cohort tags of at most {MAX_TAG_LEN} bytes each")]
    Tags,
    /// The device already sent a summary in this window.
    #[error("device {0} already sent a summary in this window")]
    Duplicate(u64),
    /// No model is monitored now (nothing deployed, or a model without
    /// calibration data).
    #[error("no deployed model is monitored for drift; ask GetDriftSpec before sending summaries")]
    Unmonitored,
}

impl DriftRejection {
    /// A short stable label, for metrics (`drift_rejected{reason=…}`).
    pub fn reason(&self) -> &'static str {
        match self {
            DriftRejection::Summary(e) => e.reason(),
            DriftRejection::Version { .. } => "version",
            DriftRejection::Tags => "tags",
            DriftRejection::Duplicate(_) => "duplicate",
            DriftRejection::Unmonitored => "unmonitored",
        }
    }
}

/// A flag that changed at the end of a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftEvent {
    /// The window that closed.
    pub window: u64,
    /// Where.
    pub scope: Scope,
    /// Which signal.
    pub signal: Signal,
    /// Up or down.
    pub transition: Transition,
    /// The score of the window that made it change.
    pub score: f64,
}

/// A scope's scores in a closed window and its flags after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeReport {
    /// The scope.
    pub scope: Scope,
    /// Devices that reported into it.
    pub devices: u64,
    /// Scores (`None`: fewer inputs than `min_inputs`).
    pub scores: Option<Scores>,
    /// Signals whose flag is up after this window.
    pub raised: Vec<Signal>,
}

/// What the policy asks for when a cohort or the fleet drifts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrain {
    /// The window that triggered it.
    pub window: u64,
    /// The drifting scope.
    pub scope: Scope,
    /// The signal.
    pub signal: Signal,
    /// Rounds to train.
    pub rounds: u64,
    /// Why, for the task history.
    pub reason: String,
}

/// When drift starts new training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrainPolicy {
    /// Whether drift starts training at all.
    pub enabled: bool,
    /// Signals that trigger it.
    pub signals: Vec<Signal>,
    /// Rounds of each retraining.
    pub rounds: u64,
    /// Windows after a retraining request during which no other is made.
    pub cooldown_windows: u64,
}

impl Default for RetrainPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            signals: vec![Signal::Covariate, Signal::Label, Signal::Accuracy],
            rounds: 20,
            cooldown_windows: 10,
        }
    }
}

/// The result of closing a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowReport {
    /// The window.
    pub window: u64,
    /// Model version monitored.
    pub version: u64,
    /// Whether the window went into the version's baseline (output signals not scored).
    pub baseline: bool,
    /// Every scope that received summaries, fleet first, then cohorts, then devices.
    pub scopes: Vec<ScopeReport>,
    /// Flags that changed.
    pub events: Vec<DriftEvent>,
    /// Retraining requested by the policy.
    pub retrain: Option<Retrain>,
}

impl WindowReport {
    /// The report of `scope`, if it received summaries.
    pub fn scope(&self, scope: &Scope) -> Option<&ScopeReport> {
        self.scopes.iter().find(|s| &s.scope == scope)
    }
}

#[derive(Debug, Clone, Default)]
struct Open {
    summary: Option<Summary>,
    devices: u64,
}

/// The monitor of one model's fleet.
#[derive(Debug, Clone)]
pub struct DriftMonitor {
    cfg: MonitorConfig,
    policy: RetrainPolicy,
    sketcher: Sketcher,
    version: u64,
    training: Summary,
    baselines: BTreeMap<Scope, Summary>,
    baseline_left: u32,
    window: u64,
    open: BTreeMap<Scope, Open>,
    flags: BTreeMap<(Scope, Signal), Flag>,
    last_retrain: Option<u64>,
    rejected: BTreeMap<&'static str, u64>,
    /// Cohort tags with state here (at most [`MAX_COHORTS`]).
    cohorts: BTreeSet<String>,
    tags_ignored: u64,
}

impl DriftMonitor {
    /// Monitors model `version`, whose training data is summarised by
    /// `training` (features and labels, in `spec`'s bins).
    pub fn new(
        cfg: MonitorConfig,
        policy: RetrainPolicy,
        spec: SketchSpec,
        version: u64,
        training: Summary,
    ) -> Result<Self, String> {
        cfg.validate("drift")?;
        let sketcher = Sketcher::new(spec).map_err(|e| e.to_string())?;
        training
            .check(sketcher.spec())
            .map_err(|e| format!("training summary: {e}"))?;
        Ok(Self {
            baseline_left: cfg.baseline_windows,
            cfg,
            policy,
            sketcher,
            version,
            training,
            baselines: BTreeMap::new(),
            window: 0,
            open: BTreeMap::new(),
            flags: BTreeMap::new(),
            last_retrain: None,
            rejected: BTreeMap::new(),
            cohorts: BTreeSet::new(),
            tags_ignored: 0,
        })
    }

    /// The sketch spec devices must use.
    pub fn spec(&self) -> &SketchSpec {
        self.sketcher.spec()
    }

    /// The monitored model version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The open window's number (from 0).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// The training-data summary of the monitored version.
    pub fn training(&self) -> &Summary {
        &self.training
    }

    /// The serving baseline of `scope` under the monitored version, once built.
    pub fn baseline(&self, scope: &Scope) -> Option<&Summary> {
        self.baselines.get(scope)
    }

    /// Cohort tags ignored because [`MAX_COHORTS`] tags were known already.
    pub fn tags_ignored(&self) -> u64 {
        self.tags_ignored
    }

    /// Refused summaries so far, by reason.
    pub fn rejected(&self) -> &BTreeMap<&'static str, u64> {
        &self.rejected
    }

    /// Monitors a new model version from the next window on. Flags are kept:
    /// they clear through their hysteresis once the new version's scores are low.
    pub fn new_version(&mut self, version: u64, training: Summary) -> Result<(), SummaryError> {
        training.check(self.sketcher.spec())?;
        self.version = version;
        self.training = training;
        self.baselines.clear();
        self.baseline_left = self.cfg.baseline_windows;
        Ok(())
    }

    /// Checks a device's summary and merges it into its scopes.
    pub fn ingest(&mut self, s: &DeviceSummary<'_>) -> Result<(), DriftRejection> {
        let r = self.check(s);
        if let Err(e) = &r {
            *self.rejected.entry(e.reason()).or_default() += 1;
            return r;
        }
        let mut scopes = vec![
            Scope::Fleet,
            Scope::Cohort(format!("version:{}", s.version)),
        ];
        for tag in s.tags {
            if self.cohorts.contains(tag) || self.cohorts.len() < MAX_COHORTS {
                let cohort = Scope::Cohort(tag.clone());
                if !scopes.contains(&cohort) {
                    self.cohorts.insert(tag.clone());
                    scopes.push(cohort);
                }
            } else {
                self.tags_ignored += 1;
            }
        }
        if self.cfg.devices {
            scopes.push(Scope::Device(s.device));
        }
        for scope in scopes {
            let open = self.open.entry(scope).or_default();
            open.devices += 1;
            match &mut open.summary {
                Some(sum) => sum.merge(s.summary),
                None => open.summary = Some(s.summary.clone()),
            }
        }
        Ok(())
    }

    fn check(&self, s: &DeviceSummary<'_>) -> Result<(), DriftRejection> {
        if s.version != self.version {
            return Err(DriftRejection::Version {
                expected: self.version,
                found: s.version,
            });
        }
        s.summary.check(self.sketcher.spec())?;
        if s.tags.len() > MAX_TAGS || s.tags.iter().any(|t| t.len() > MAX_TAG_LEN || t.is_empty()) {
            return Err(DriftRejection::Tags);
        }
        if self.cfg.devices && self.open.contains_key(&Scope::Device(s.device)) {
            return Err(DriftRejection::Duplicate(s.device));
        }
        Ok(())
    }

    /// Closes the open window: scores, flags, events, and the policy's decision.
    pub fn close_window(&mut self) -> WindowReport {
        let window = self.window;
        self.window += 1;
        let open = std::mem::take(&mut self.open);
        let baseline = self.baseline_left > 0;
        let spec = self.sketcher.spec().clone();
        // Outputs are scored against the baseline, which this window may be building.
        let mut scopes = Vec::with_capacity(open.len());
        let mut events = Vec::new();
        for (scope, o) in open {
            let summary = o.summary.expect("an open scope has a summary");
            let enough = summary.inputs(&spec) >= self.cfg.min_inputs as f64;
            let reference = Reference {
                training: &self.training,
                baseline: self.baselines.get(&scope).filter(|_| !baseline),
            };
            let scores = enough.then(|| score(&summary, reference, &spec));
            if baseline && !matches!(scope, Scope::Device(_)) {
                match self.baselines.get_mut(&scope) {
                    Some(b) => b.merge(&summary),
                    None => {
                        self.baselines.insert(scope.clone(), summary);
                    }
                }
            }
            let mut raised = Vec::new();
            for signal in Signal::ALL {
                let value = scores.as_ref().and_then(|s| s.signal(signal));
                // Output signals wait for the baseline.
                let value = value.filter(|_| !baseline || signal == Signal::Covariate);
                let flag = self.flags.entry((scope.clone(), signal)).or_default();
                if let Some(t) = flag.update(self.cfg.thresholds(signal), value) {
                    events.push(DriftEvent {
                        window,
                        scope: scope.clone(),
                        signal,
                        transition: t,
                        score: value.unwrap_or(f64::NAN),
                    });
                }
                if flag.raised {
                    raised.push(signal);
                }
            }
            scopes.push(ScopeReport {
                scope,
                devices: o.devices,
                scores,
                raised,
            });
        }
        if baseline {
            self.baseline_left -= 1;
        }
        let retrain = self.decide(window, &events);
        WindowReport {
            window,
            version: self.version,
            baseline,
            scopes,
            events,
            retrain,
        }
    }

    fn decide(&mut self, window: u64, events: &[DriftEvent]) -> Option<Retrain> {
        if !self.policy.enabled {
            return None;
        }
        if let Some(last) = self.last_retrain
            && window < last + self.policy.cooldown_windows
        {
            return None;
        }
        // A cohort names where the drift is; the fleet flag alone is a fallback.
        let signals = &self.policy.signals;
        let pick = |cohort: bool| {
            events.iter().find(|e| {
                let scope_ok = match &e.scope {
                    Scope::Cohort(c) => cohort && !c.starts_with("version:"),
                    Scope::Fleet => !cohort,
                    Scope::Device(_) => false,
                };
                scope_ok && e.transition == Transition::Raised && signals.contains(&e.signal)
            })
        };
        let e = pick(true).or_else(|| pick(false))?;
        self.last_retrain = Some(window);
        Some(Retrain {
            window,
            scope: e.scope.clone(),
            signal: e.signal,
            rounds: self.policy.rounds,
            reason: format!(
                "{} drift in {} (score {:.3}) at window {window}",
                e.signal.name(),
                e.scope,
                e.score
            ),
        })
    }

    /// Scopes whose flag for some signal is up.
    pub fn raised(&self) -> Vec<(Scope, Signal)> {
        self.flags
            .iter()
            .filter(|(_, f)| f.raised)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests;
