//! The drift monitor as the server runs it.
//!
//! [`Watch`] follows the deployed model: when the deployment changes it
//! builds a [`DriftMonitor`] for it, with a sketch fitted on the
//! coordinator's calibration data (the embedded Fashion-MNIST training
//! images, the same data int8 quantization calibrates on) and that data's
//! summary as the training reference. Devices fetch the sketch
//! ([`Watch::spec`]), summarise what they serve, and send one summary per
//! window ([`Watch::report`]); every `window_secs` the driver closes the
//! window ([`Watch::tick`]), which yields flag changes for the log and the
//! metrics, and keeps the last window's scores for the admin report.
//!
//! Models whose inputs are not 28×28 images with 10 classes have no
//! calibration data here and are not monitored (said once in the log).
//! Flag history is kept in memory (the last [`EVENTS_KEPT`] changes).

use std::collections::VecDeque;

use fleet_aggregation::drift::sketch::FitConfig;
use fleet_aggregation::drift::{SketchSpec, Sketcher, SummaryBuilder, Transition};
use fleet_models::ModelSpec;
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_protocol::admin::{DriftEventInfo, DriftInfo, DriftScopeInfo};
use fleet_protocol::message::{DriftReport, DriftSpecInfo};

use crate::drift::{
    DeviceSummary, DriftMonitor, DriftRejection, MonitorConfig, RetrainPolicy, WindowReport,
};

/// Flag changes kept for the admin report.
pub const EVENTS_KEPT: usize = 200;

/// Inputs of the calibration data the sketch's bins are fitted on.
const FIT_INPUTS: usize = 2000;

/// The deployed model's drift monitor, as the server drives it.
#[derive(Debug)]
pub struct Watch {
    window_ms: u64,
    cfg: MonitorConfig,
    policy: RetrainPolicy,
    watched: Option<(u64, DriftMonitor)>,
    /// The deployment last seen, monitored or not.
    seen: Option<u64>,
    next_close: u64,
    last: Option<(WindowReport, u64)>,
    events: VecDeque<DriftEventInfo>,
}

impl Watch {
    /// A watch closing a window every `window_secs` (at least 1).
    pub fn new(window_secs: u64, cfg: MonitorConfig, policy: RetrainPolicy) -> Self {
        Self {
            window_ms: window_secs.max(1) * 1000,
            cfg,
            policy,
            watched: None,
            seen: None,
            next_close: u64::MAX,
            last: None,
            events: VecDeque::new(),
        }
    }

    /// Follows the deployment: `deployment` of a model of architecture
    /// `spec` (none: nothing deployed). Returns a sentence for the log when
    /// something changed.
    pub fn follow(&mut self, deployment: Option<(u64, &ModelSpec)>, now_ms: u64) -> Option<String> {
        let version = deployment.map(|d| d.0);
        if version == self.seen {
            return None;
        }
        self.seen = version;
        self.last = None;
        let Some((version, spec)) = deployment else {
            self.watched = None;
            return Some("drift monitoring off: nothing deployed".into());
        };
        match monitor_for(spec, version, &self.cfg, &self.policy) {
            Ok(m) => {
                self.watched = Some((version, m));
                self.next_close = now_ms + self.window_ms;
                Some(format!(
                    "drift monitoring deployment {version}: windows of {} s",
                    self.window_ms / 1000
                ))
            }
            Err(e) => {
                self.watched = None;
                Some(format!(
                    "drift monitoring off for deployment {version}: {e}"
                ))
            }
        }
    }

    /// What devices need to summarise for the monitored deployment.
    pub fn spec(&self) -> Option<DriftSpecInfo> {
        self.watched.as_ref().map(|(v, m)| DriftSpecInfo {
            deployment: *v,
            spec: m.spec().clone(),
            window_secs: self.window_ms / 1000,
        })
    }

    /// A device's summary: merged into the open window, whose number is returned.
    pub fn report(&mut self, device: u64, r: &DriftReport) -> Result<u64, DriftRejection> {
        let Some((_, m)) = self.watched.as_mut() else {
            return Err(DriftRejection::Version {
                expected: 0,
                found: r.deployment,
            });
        };
        m.ingest(&DeviceSummary {
            device,
            tags: &r.tags,
            version: r.deployment,
            summary: &r.summary,
        })?;
        Ok(m.window())
    }

    /// Closes the window when it is due: the report, to log and count.
    pub fn tick(&mut self, now_ms: u64, unix_secs: u64) -> Option<&WindowReport> {
        let (_, m) = self.watched.as_mut()?;
        if now_ms < self.next_close {
            return None;
        }
        self.next_close = now_ms + self.window_ms;
        let report = m.close_window();
        for e in &report.events {
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            let action = report
                .retrain
                .as_ref()
                .filter(|r| r.scope == e.scope && r.signal == e.signal)
                .map(|r| format!("retraining requested: {}", r.reason));
            self.events.push_back(DriftEventInfo {
                window: e.window,
                at: unix_secs,
                scope: e.scope.to_string(),
                signal: e.signal,
                raised: e.transition == Transition::Raised,
                score: e.score,
                action,
            });
        }
        self.last = Some((report, unix_secs));
        self.last.as_ref().map(|(r, _)| r)
    }

    /// The admin report.
    pub fn info(&self) -> Option<DriftInfo> {
        let (version, m) = self.watched.as_ref()?;
        let (window, closed_at, scopes) = match &self.last {
            Some((r, at)) => (
                Some(r.window),
                Some(*at),
                r.scopes
                    .iter()
                    .map(|s| DriftScopeInfo {
                        scope: s.scope.to_string(),
                        devices: s.devices,
                        scores: s.scores.clone(),
                        raised: s.raised.clone(),
                    })
                    .collect(),
            ),
            None => (None, None, Vec::new()),
        };
        Some(DriftInfo {
            deployment: *version,
            window_secs: self.window_ms / 1000,
            window,
            closed_at,
            scopes,
            events: self.events.iter().cloned().collect(),
            rejected: m
                .rejected()
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        })
    }
}

/// A monitor for `spec` (a 28×28, 10-class image model), fitted and
/// referenced on the embedded training images.
fn monitor_for(
    spec: &ModelSpec,
    version: u64,
    cfg: &MonitorConfig,
    policy: &RetrainPolicy,
) -> Result<DriftMonitor, String> {
    let train = embedded::load(Split::Train).map_err(|e| e.to_string())?;
    if spec.inputs() != train.dim() || spec.classes() != train.classes() {
        return Err(format!(
            "the calibration data has {} inputs and {} classes, {} has {} and {}",
            train.dim(),
            train.classes(),
            spec.name(),
            spec.inputs(),
            spec.classes()
        ));
    }
    let fit = (0..FIT_INPUTS.min(train.len())).map(|i| train.example(i));
    let sketch = SketchSpec::fit(train.dim(), train.classes(), fit, FitConfig::default())
        .map_err(|e| e.to_string())?;
    let mut b = SummaryBuilder::new(Sketcher::new(sketch.clone()).map_err(|e| e.to_string())?);
    for i in 0..train.len() {
        b.observe_training(train.example(i), train.labels()[i]);
    }
    DriftMonitor::new(cfg.clone(), policy.clone(), sketch, version, b.take())
}
