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
//! calibration data here and are not monitored (said once in the log). The
//! calibration sketch and summary are built once, at the first deployment,
//! and reused for later ones. Summaries sent while nothing is monitored are
//! refused (`unmonitored`).
//! Flag history is kept in memory (the last [`EVENTS_KEPT`] changes).

use std::collections::VecDeque;

use fleet_drift::sketch::FitConfig;
use fleet_drift::{SketchSpec, Sketcher, Summary, SummaryBuilder, Transition};
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

/// Inputs of the calibration data the sketch's bins are fitted on (the
/// simulator fits on as many).
pub const FIT_INPUTS: usize = 2000;

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
    /// The calibration data's sketch and summary, built on first use (they
    /// do not depend on the model version, only on its input shape).
    calibration: Option<Calibration>,
}

/// The sketch fitted on the calibration images and their summary.
#[derive(Debug, Clone)]
struct Calibration {
    dim: usize,
    classes: usize,
    sketch: SketchSpec,
    training: Summary,
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
            calibration: None,
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
        match self.monitor_for(spec, version) {
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
            return Err(DriftRejection::Unmonitored);
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

impl Watch {
    /// A monitor for `spec` (a 28×28, 10-class image model), fitted and
    /// referenced on the embedded training images (built once per watch).
    fn monitor_for(&mut self, spec: &ModelSpec, version: u64) -> Result<DriftMonitor, String> {
        let c = match &self.calibration {
            Some(c) => c.clone(),
            None => {
                let c = calibration()?;
                self.calibration = Some(c.clone());
                c
            }
        };
        if spec.inputs() != c.dim || spec.classes() != c.classes {
            return Err(format!(
                "the calibration data has {} inputs and {} classes, {} has {} and {}",
                c.dim,
                c.classes,
                spec.name(),
                spec.inputs(),
                spec.classes()
            ));
        }
        DriftMonitor::new(
            self.cfg.clone(),
            self.policy.clone(),
            c.sketch,
            version,
            c.training,
        )
    }
}

/// The sketch fitted on the embedded training images, and their summary.
fn calibration() -> Result<Calibration, String> {
    let train = embedded::load(Split::Train).map_err(|e| e.to_string())?;
    let fit = (0..FIT_INPUTS.min(train.len())).map(|i| train.example(i));
    let sketch = SketchSpec::fit(train.dim(), train.classes(), fit, FitConfig::default())
        .map_err(|e| e.to_string())?;
    let mut b = SummaryBuilder::new(Sketcher::new(sketch.clone()).map_err(|e| e.to_string())?);
    for i in 0..train.len() {
        b.observe_training(train.example(i), train.labels()[i]);
    }
    Ok(Calibration {
        dim: train.dim(),
        classes: train.classes(),
        sketch,
        training: b.take(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        Watch::new(60, MonitorConfig::default(), RetrainPolicy::default())
    }

    #[test]
    fn summaries_without_a_monitored_model_are_refused_with_a_reason() {
        let mut w = watch();
        let r = DriftReport {
            deployment: 1,
            tags: vec![],
            summary: Summary {
                features: vec![],
                predicted: vec![],
                confidence: vec![],
                labels: vec![],
                labeled: 0.0,
                correct: 0.0,
            },
        };
        let e = w.report(1, &r).unwrap_err();
        assert_eq!(e.reason(), "unmonitored");
        assert!(e.to_string().contains("GetDriftSpec"));
        // A model without calibration data is not monitored either, and says why.
        let synthetic = ModelSpec::LogReg {
            inputs: 60,
            classes: 10,
        };
        let line = w.follow(Some((1, &synthetic)), 0).unwrap();
        assert!(
            line.contains("off for deployment 1") && line.contains("60"),
            "{line}"
        );
        assert!(w.spec().is_none());
        assert_eq!(w.report(1, &r).unwrap_err().reason(), "unmonitored");
    }

    #[test]
    fn deployments_follow_one_another_on_the_same_calibration() {
        let mut w = watch();
        let spec = ModelSpec::fashion_2nn();
        assert!(
            w.follow(Some((1, &spec)), 0)
                .unwrap()
                .contains("deployment 1")
        );
        let first = w.spec().unwrap();
        // Unchanged deployment: nothing to say.
        assert!(w.follow(Some((1, &spec)), 10).is_none());
        assert!(
            w.follow(Some((2, &spec)), 20)
                .unwrap()
                .contains("deployment 2")
        );
        let second = w.spec().unwrap();
        assert_eq!((first.deployment, second.deployment), (1, 2));
        assert_eq!(first.spec, second.spec);
        assert!(w.follow(None, 30).unwrap().contains("nothing deployed"));
        assert!(w.spec().is_none());
    }
}
