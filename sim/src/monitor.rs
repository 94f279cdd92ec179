//! The monitoring phase: the fleet serves predictions after training, sends
//! drift summaries, and the coordinator's [`DriftMonitor`] watches them.
//!
//! Each window, every device reports with probability
//! `monitor.report_probability`: it serves `monitor.predictions` inputs
//! drawn (with replacement, seeded) from its own data — transformed by the
//! drift scenario once the window reaches `from_window` for the drifting
//! devices, or, for label shift, drawn from the training set's first classes
//! — runs the global model on them, and summarises inputs, predictions and
//! the labels that arrive (`monitor.label_rate`) with the agent's
//! [`SummaryBuilder`]. The monitor merges the summaries into device, cohort
//! (`cohort-k`, devices split by id) and fleet windows and closes the
//! window. When its retraining policy asks, a retraining task of
//! `retrain.rounds` rounds runs through the same [`driver`] on the devices'
//! current (drifted) data, starting from the current global model, and the
//! monitor moves to the new version with its training data as reference.
//!
//! Everything is seeded: the same fleet file gives the same windows.

use fleet_aggregation::Compute;
use fleet_coordinator::drift::{DeviceSummary, DriftMonitor, Scope, WindowReport};
use fleet_drift::{
    FitConfig, Scores, Signal, SketchSpec, Sketcher, Summary, SummaryBuilder, Transition,
};
use fleet_models::{Backend, Dataset, logits};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::DeviceData;
use crate::driver::{self, RoundLog, Start};
use crate::fleet::{DriftKind, Fleet, MonitorSettings};
use crate::scenario::{Drift, drift_example};

/// One closed window, as logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowLog {
    /// Window number, from 0.
    pub window: u64,
    /// Model version served (1: the trained model; +1 per retraining).
    pub version: u64,
    /// Whether the drift scenario was active.
    pub drift_active: bool,
    /// Devices that sent a summary.
    pub reports: u64,
    /// Fleet scores.
    pub fleet: Option<Scores>,
    /// Largest feature PSI of each cohort, `cohort-0` first.
    pub cohort_covariate: Vec<Option<f64>>,
    /// Predicted-class PSI of each cohort.
    pub cohort_label: Vec<Option<f64>>,
    /// Accuracy of the served predictions of the drifting devices.
    pub drifting_accuracy: Option<f64>,
    /// Accuracy of the served predictions of the other devices.
    pub other_accuracy: Option<f64>,
    /// Flags that changed, as `scope/signal: raised|cleared`.
    pub events: Vec<String>,
    /// Retraining started after this window, with its reason.
    pub retrain: Option<String>,
    /// Largest encoded summary of the window (postcard bytes).
    pub max_summary_bytes: usize,
}

/// What the monitoring phase measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonitorOutcome {
    /// Every window.
    pub windows: Vec<WindowLog>,
    /// Rounds of each retraining, in order.
    pub retrain_rounds: Vec<Vec<RoundLog>>,
    /// First window with drifted data.
    pub drift_from: Option<u64>,
    /// Window in which the fleet flag went up (first after `drift_from`).
    pub fleet_detected: Option<u64>,
    /// Window in which a drifting cohort was first flagged, and its name.
    pub cohort_detected: Option<(u64, String)>,
    /// Flags raised with no drift active (fleet and cohorts; devices are not
    /// scored below `min_inputs`).
    pub false_alarms: u64,
    /// Cohorts without drifting devices flagged while drift was active.
    pub wrong_cohorts: u64,
    /// Summaries refused by the monitor.
    pub rejected: u64,
    /// Mean accuracy of the drifting devices in the three windows before the drift.
    pub pre_drift_accuracy: Option<f64>,
    /// Their mean accuracy over the last three windows.
    pub final_drifting_accuracy: Option<f64>,
    /// The final global model.
    pub global: Vec<f32>,
}

impl MonitorOutcome {
    /// Windows from the first drifted one to detection, counting both.
    pub fn delay(&self, detected: Option<u64>) -> Option<u64> {
        Some(detected? - self.drift_from? + 1)
    }
}

/// Fits the drift bins to training data: up to
/// [`FIT_INPUTS`](fleet_coordinator::watch::FIT_INPUTS) examples, device
/// after device (what a coordinator takes from its calibration data).
pub fn fit_sketch(fleet: &Fleet, data: &DeviceData) -> Result<Sketcher, String> {
    let spec = fleet.model_spec();
    let mut inputs: Vec<Vec<f32>> = Vec::new();
    let mut device = 0;
    let wanted = fleet_coordinator::watch::FIT_INPUTS;
    while inputs.len() < wanted && device < fleet.devices {
        data.with(device, |d| {
            for i in 0..d.len().min(wanted - inputs.len()) {
                inputs.push(d.get(i).0.to_vec());
            }
            Ok(())
        })?;
        device += 1;
    }
    let dim = inputs.first().map_or(0, Vec::len);
    let spec = SketchSpec::fit(
        dim,
        spec.classes(),
        inputs.iter().map(Vec::as_slice),
        FitConfig::default(),
    )
    .map_err(|e| format!("monitor: {e}"))?;
    Sketcher::new(spec).map_err(|e| e.to_string())
}

/// Cohort of `device` among `devices` split into `cohorts` equal blocks.
pub fn cohort(device: u32, devices: u32, cohorts: u32) -> u32 {
    (u64::from(device) * u64::from(cohorts) / u64::from(devices)) as u32
}

/// Runs the monitoring phase of `fleet` from the trained `global` model
/// whose training data `training` summarises on `sketch`'s bins.
#[allow(clippy::too_many_arguments)]
pub fn run(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    compute: &dyn Compute,
    sketch: &Sketcher,
    global: Vec<f32>,
    training: Summary,
    mut on_window: impl FnMut(&WindowLog),
) -> Result<MonitorOutcome, String> {
    let m: &MonitorSettings = fleet
        .monitor
        .as_ref()
        .ok_or("the fleet file has no [monitor] table")?;
    let spec = fleet.model_spec();
    let mut monitor = DriftMonitor::new(
        m.thresholds.clone(),
        m.retrain.clone(),
        sketch.spec().clone(),
        1,
        training,
    )?;
    let drift = fleet.scenarios.drift.map(|s| Drift::new(s, fleet.devices));
    let pool = match data {
        DeviceData::Partitioned { train, .. } => Some(train),
        DeviceData::Synthetic { .. } => None,
    };
    // Label shift: the served inputs come from these examples.
    let shifted_pool: Vec<usize> = match (drift, pool) {
        (Some(d), Some(train)) if d.scenario.kind == DriftKind::Labels => {
            let keep = d.scenario.strength.round() as u8;
            (0..train.len())
                .filter(|&i| train.labels()[i] < keep)
                .collect()
        }
        _ => Vec::new(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(fleet.seed ^ 0xd21f_7000);
    let mut out = MonitorOutcome {
        windows: Vec::new(),
        retrain_rounds: Vec::new(),
        drift_from: drift.map(|d| d.scenario.from_window),
        fleet_detected: None,
        cohort_detected: None,
        false_alarms: 0,
        wrong_cohorts: 0,
        rejected: 0,
        pre_drift_accuracy: None,
        final_drifting_accuracy: None,
        global,
    };
    let shape = test.shape().to_vec();
    let tags: Vec<[String; 1]> = (0..m.cohorts).map(|k| [format!("cohort-{k}")]).collect();
    for window in 0..m.windows {
        let active = drift.filter(|d| window >= d.scenario.from_window);
        // Gather the window's served inputs, device after device.
        let mut devices: Vec<(u32, usize)> = Vec::new();
        let mut features: Vec<f32> = Vec::new();
        let mut labels: Vec<u8> = Vec::new();
        for device in 0..fleet.devices {
            if rng.random::<f64>() >= m.report_probability {
                continue;
            }
            let drifting = active.is_some_and(|d| d.affects(device));
            let n = m.predictions as usize;
            let before = labels.len();
            if drifting && !shifted_pool.is_empty() {
                let train = pool.expect("label shift needs a pool");
                for _ in 0..n {
                    let i = shifted_pool[rng.random_range(0..shifted_pool.len())];
                    features.extend_from_slice(train.example(i));
                    labels.push(train.labels()[i]);
                }
            } else {
                data.with(device, |d| {
                    if d.is_empty() {
                        return Ok(());
                    }
                    for _ in 0..n {
                        let (x, y) = d.get(rng.random_range(0..d.len()));
                        let start = features.len();
                        features.extend_from_slice(x);
                        if let Some(a) = active.filter(|a| drifting && a.changes_training()) {
                            let s = a.scenario;
                            drift_example(
                                s.kind,
                                s.strength,
                                &mut features[start..],
                                &shape,
                                &mut rng,
                            );
                        }
                        labels.push(y);
                    }
                    Ok(())
                })?;
            }
            let served = labels.len() - before;
            if served > 0 {
                devices.push((device, served));
            }
        }
        let served = Dataset::new(
            features,
            labels,
            shape.clone(),
            test.classes(),
            test.label_names().to_vec(),
        )
        .map_err(|e| e.to_string())?;
        let z = logits(&spec, &out.global, served.view(), Backend::DEFAULT)
            .map_err(|e| e.to_string())?;
        let classes = served.classes();
        let (mut hit, mut total) = ([0usize; 2], [0usize; 2]);
        let mut offset = 0;
        let mut max_bytes = 0;
        for &(device, n) in &devices {
            let mut b = SummaryBuilder::new(sketch.clone());
            for i in offset..offset + n {
                let (x, y) = served.view().get(i);
                let row = &z[i * classes..(i + 1) * classes];
                let known = rng.random::<f64>() < m.label_rate;
                b.observe(x, row, known.then_some(y));
                let g = usize::from(drift.is_some_and(|d| d.affects(device)));
                total[g] += 1;
                if fleet_models::train::argmax(row) == usize::from(y) {
                    hit[g] += 1;
                }
            }
            offset += n;
            let summary = b.take();
            max_bytes = max_bytes.max(postcard::to_allocvec(&summary).map_or(0, |v| v.len()));
            let tag = &tags[cohort(device, fleet.devices, m.cohorts) as usize];
            if monitor
                .ingest(&DeviceSummary {
                    device: u64::from(device),
                    tags: tag,
                    version: monitor.version(),
                    summary: &summary,
                })
                .is_err()
            {
                out.rejected += 1;
            }
        }
        let report = monitor.close_window();
        let accuracy = |g: usize| (total[g] > 0).then(|| hit[g] as f64 / total[g] as f64);
        let mut log = log_window(&report, m, active.is_some(), accuracy(1), accuracy(0));
        log.max_summary_bytes = max_bytes;
        let drifting_cohort = |name: &str| {
            let k: Option<u32> = name.strip_prefix("cohort-").and_then(|k| k.parse().ok());
            // A cohort whose first device drifts is made of drifting devices only.
            let first =
                |k: u32| (u64::from(k) * u64::from(fleet.devices)).div_ceil(u64::from(m.cohorts));
            matches!((k, drift), (Some(k), Some(d)) if first(k) >= u64::from(d.first_device))
        };
        score_detection(&mut out, &report, active.is_some(), &drifting_cohort);
        if let Some(r) = &report.retrain {
            log.retrain = Some(r.reason.clone());
            let mut retrain = fleet.clone();
            retrain.task.rounds = r.rounds;
            retrain.seed = fleet.seed.wrapping_add(1 + out.retrain_rounds.len() as u64);
            let outcome = driver::run_from(
                &retrain,
                data,
                test,
                compute,
                Start {
                    global: Some(out.global.clone()),
                    drift: active,
                    sketch: Some(sketch),
                    ..Start::default()
                },
                |_| {},
            )?;
            out.global = outcome.global;
            out.retrain_rounds.push(outcome.logs);
            let reference = outcome
                .training
                .ok_or("the retraining closed no round with reports")?;
            monitor
                .new_version(monitor.version() + 1, reference)
                .map_err(|e| e.to_string())?;
        }
        on_window(&log);
        out.windows.push(log);
    }
    let mean = |ws: &[WindowLog]| {
        let v: Vec<f64> = ws.iter().filter_map(|w| w.drifting_accuracy).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    if let Some(from) = out.drift_from {
        let from = (from as usize).min(out.windows.len());
        out.pre_drift_accuracy = mean(&out.windows[from.saturating_sub(3)..from]);
    }
    let n = out.windows.len();
    out.final_drifting_accuracy = mean(&out.windows[n.saturating_sub(3)..]);
    Ok(out)
}

fn log_window(
    r: &WindowReport,
    m: &MonitorSettings,
    active: bool,
    drifting_accuracy: Option<f64>,
    other_accuracy: Option<f64>,
) -> WindowLog {
    let cohort = |k: u32, signal: Signal| {
        r.scope(&Scope::Cohort(format!("cohort-{k}")))
            .and_then(|s| s.scores.as_ref())
            .and_then(|s| s.signal(signal))
    };
    WindowLog {
        window: r.window,
        version: r.version,
        drift_active: active,
        reports: r.scope(&Scope::Fleet).map_or(0, |s| s.devices),
        fleet: r.scope(&Scope::Fleet).and_then(|s| s.scores.clone()),
        cohort_covariate: (0..m.cohorts)
            .map(|k| cohort(k, Signal::Covariate))
            .collect(),
        cohort_label: (0..m.cohorts).map(|k| cohort(k, Signal::Label)).collect(),
        drifting_accuracy,
        other_accuracy,
        events: r
            .events
            .iter()
            .map(|e| {
                format!(
                    "{}/{}: {}",
                    e.scope,
                    e.signal.name(),
                    match e.transition {
                        Transition::Raised => "raised",
                        Transition::Cleared => "cleared",
                    }
                )
            })
            .collect(),
        retrain: None,
        max_summary_bytes: 0,
    }
}

fn score_detection(
    out: &mut MonitorOutcome,
    r: &WindowReport,
    active: bool,
    drifting_cohort: &dyn Fn(&str) -> bool,
) {
    for e in r
        .events
        .iter()
        .filter(|e| e.transition == Transition::Raised)
    {
        match &e.scope {
            Scope::Device(_) => {}
            _ if !active => out.false_alarms += 1,
            Scope::Fleet => {
                out.fleet_detected.get_or_insert(r.window);
            }
            Scope::Cohort(name) if drifting_cohort(name) => {
                out.cohort_detected.get_or_insert((r.window, name.clone()));
            }
            // A cohort without drifting devices flagged while drift is on elsewhere.
            Scope::Cohort(name) if name.starts_with("cohort-") => out.wrong_cohorts += 1,
            Scope::Cohort(_) => {}
        }
    }
}
