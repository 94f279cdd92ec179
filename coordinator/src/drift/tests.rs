//! Tests of the drift monitor on generated inputs.

use fleet_drift::sketch::FitConfig;
use fleet_drift::{SummaryBuilder, Transition};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

const DIM: usize = 32;
const CLASSES: usize = 4;

fn input(rng: &mut ChaCha8Rng, shift: f32) -> Vec<f32> {
    (0..DIM)
        .map(|i| (i % 5) as f32 * 0.1 + rng.random::<f32>() + shift)
        .collect()
}

/// Logits favouring class `x[0] > 0.5`, so predictions follow the inputs.
fn logits(x: &[f32], label: u8) -> Vec<f32> {
    let mut l = vec![0.0; CLASSES];
    l[usize::from(label)] = 2.0 + x[0];
    l
}

struct World {
    spec: SketchSpec,
    rng: ChaCha8Rng,
}

impl World {
    fn new() -> (Self, Summary) {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let train: Vec<Vec<f32>> = (0..5000).map(|_| input(&mut rng, 0.0)).collect();
        let cfg = FitConfig {
            taps: 8,
            ..FitConfig::default()
        };
        let spec = SketchSpec::fit(DIM, CLASSES, train.iter().map(Vec::as_slice), cfg).unwrap();
        let mut b = SummaryBuilder::new(Sketcher::new(spec.clone()).unwrap());
        for (i, x) in train.iter().enumerate() {
            b.observe_training(x, (i % CLASSES) as u8);
        }
        (Self { spec, rng }, b.take())
    }

    /// One device's window: `n` predictions, inputs shifted by `shift`,
    /// labels restricted to the first `labels` classes.
    fn summary(&mut self, n: usize, shift: f32, labels: usize) -> Summary {
        let mut b = SummaryBuilder::new(Sketcher::new(self.spec.clone()).unwrap());
        for _ in 0..n {
            let x = input(&mut self.rng, shift);
            let y = self.rng.random_range(0..labels) as u8;
            b.observe(&x, &logits(&x, y), Some(y));
        }
        b.take()
    }
}

fn tags(device: u64) -> Vec<String> {
    vec![format!("region:{}", device % 5)]
}

fn monitor(policy: RetrainPolicy) -> (DriftMonitor, World) {
    let (world, training) = World::new();
    let m = DriftMonitor::new(
        MonitorConfig::default(),
        policy,
        world.spec.clone(),
        1,
        training,
    )
    .unwrap();
    (m, world)
}

/// Runs `windows` windows of 100 devices × 30 predictions; devices of region
/// 4 see inputs shifted by `shift` from window `from` on.
fn run(
    m: &mut DriftMonitor,
    w: &mut World,
    windows: u64,
    from: u64,
    shift: f32,
) -> Vec<WindowReport> {
    (0..windows)
        .map(|win| {
            for d in 0..100u64 {
                let s = if win >= from && d % 5 == 4 {
                    shift
                } else {
                    0.0
                };
                let summary = w.summary(30, s, CLASSES);
                let t = tags(d);
                m.ingest(&DeviceSummary {
                    device: d,
                    tags: &t,
                    version: 1,
                    summary: &summary,
                })
                .unwrap();
            }
            m.close_window()
        })
        .collect()
}

#[test]
fn no_drift_raises_nothing_in_fifty_windows() {
    let (mut m, mut w) = monitor(RetrainPolicy {
        enabled: true,
        ..RetrainPolicy::default()
    });
    let reports = run(&mut m, &mut w, 50, u64::MAX, 0.0);
    let events: Vec<_> = reports.iter().flat_map(|r| &r.events).collect();
    assert!(events.is_empty(), "{events:?}");
    assert!(reports.iter().all(|r| r.retrain.is_none()));
    // Devices have 30 inputs, under min_inputs: never scored.
    let last = reports.last().unwrap();
    assert!(last.scope(&Scope::Device(0)).unwrap().scores.is_none());
    assert!(last.scope(&Scope::Fleet).unwrap().scores.is_some());
}

#[test]
fn a_drifting_cohort_is_named_and_retraining_is_asked_once() {
    let (mut m, mut w) = monitor(RetrainPolicy {
        enabled: true,
        cooldown_windows: 100,
        ..RetrainPolicy::default()
    });
    let reports = run(&mut m, &mut w, 10, 3, 0.5);
    let raised: Vec<&DriftEvent> = reports
        .iter()
        .flat_map(|r| &r.events)
        .filter(|e| e.transition == Transition::Raised && e.signal == Signal::Covariate)
        .collect();
    let drifting = Scope::Cohort("region:4".into());
    let first = |scope: &Scope| raised.iter().find(|e| &e.scope == scope).map(|e| e.window);
    // Two high windows raise the flag: windows 3 and 4.
    assert_eq!(first(&drifting), Some(4));
    assert_eq!(first(&Scope::Fleet), Some(4));
    for other in 0..4 {
        assert_eq!(first(&Scope::Cohort(format!("region:{other}"))), None);
    }
    let retrains: Vec<&Retrain> = reports.iter().filter_map(|r| r.retrain.as_ref()).collect();
    assert_eq!(retrains.len(), 1, "{retrains:?}");
    assert_eq!(retrains[0].scope, drifting);
    assert!(
        retrains[0]
            .reason
            .contains("covariate drift in cohort region:4")
    );
    assert!(m.raised().contains(&(drifting, Signal::Covariate)));
}

#[test]
fn output_signals_wait_for_the_baseline_and_then_see_label_shift() {
    let (mut m, mut w) = monitor(RetrainPolicy::default());
    let mut feed = |m: &mut DriftMonitor, labels: usize| {
        for d in 0..60u64 {
            let summary = w.summary(50, 0.0, labels);
            m.ingest(&DeviceSummary {
                device: d,
                tags: &[],
                version: 1,
                summary: &summary,
            })
            .unwrap();
        }
        m.close_window()
    };
    let first = feed(&mut m, CLASSES);
    assert!(first.baseline);
    assert!(first.scope(&Scope::Fleet).unwrap().raised.is_empty());
    assert!(m.baseline(&Scope::Fleet).is_some());
    // Only classes 0 and 1 from now on: label shift, not covariate shift.
    let a = feed(&mut m, 2);
    let b = feed(&mut m, 2);
    assert!(!a.baseline);
    let fleet = b.scope(&Scope::Fleet).unwrap();
    assert_eq!(fleet.raised, vec![Signal::Label], "{fleet:?}");
    let scores = fleet.scores.as_ref().unwrap();
    assert!(
        scores.label_psi.unwrap() > 0.2 && scores.covariate_psi < 0.05,
        "{scores:?}"
    );
}

#[test]
fn bad_summaries_are_refused_counted_and_change_nothing() {
    let (mut m, mut w) = monitor(RetrainPolicy::default());
    let good = w.summary(10, 0.0, CLASSES);
    let submit = |m: &mut DriftMonitor, device, version, tags: &[String], s: &Summary| {
        m.ingest(&DeviceSummary {
            device,
            tags,
            version,
            summary: s,
        })
    };
    let e = submit(&mut m, 1, 7, &[], &good).unwrap_err();
    assert_eq!(e.reason(), "version");
    assert!(e.to_string().contains("model version 7"));
    let mut short = good.clone();
    short.predicted.pop();
    assert_eq!(
        submit(&mut m, 1, 1, &[], &short).unwrap_err().reason(),
        "bins"
    );
    let mut negative = good.clone();
    negative.features[3] = -2.0;
    assert_eq!(
        submit(&mut m, 1, 1, &[], &negative).unwrap_err().reason(),
        "count"
    );
    let many: Vec<String> = (0..9).map(|i| i.to_string()).collect();
    assert_eq!(
        submit(&mut m, 1, 1, &many, &good).unwrap_err().reason(),
        "tags"
    );
    submit(&mut m, 1, 1, &[], &good).unwrap();
    assert_eq!(
        submit(&mut m, 1, 1, &[], &good).unwrap_err().reason(),
        "duplicate"
    );
    let counts: Vec<(&str, u64)> = m.rejected().iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(
        counts,
        vec![
            ("bins", 1),
            ("count", 1),
            ("duplicate", 1),
            ("tags", 1),
            ("version", 1)
        ]
    );
    // Only the good summary reached the window.
    let r = m.close_window();
    assert_eq!(r.scope(&Scope::Fleet).unwrap().devices, 1);
}

#[test]
fn a_new_version_with_drifted_training_data_clears_the_flag() {
    let (mut m, mut w) = monitor(RetrainPolicy::default());
    run(&mut m, &mut w, 5, 2, 0.5);
    assert!(m.raised().contains(&(Scope::Fleet, Signal::Covariate)));
    // Retrained on data that includes the shifted region.
    let mut b = SummaryBuilder::new(Sketcher::new(w.spec.clone()).unwrap());
    for i in 0..5000 {
        let x = input(&mut w.rng, if i % 5 == 4 { 0.5 } else { 0.0 });
        b.observe_training(&x, (i % CLASSES) as u8);
    }
    m.new_version(2, b.take()).unwrap();
    // The baseline window (against the new training data) and two more, all low.
    let reports: Vec<WindowReport> = (0..3)
        .map(|_| {
            for d in 0..100u64 {
                let summary = w.summary(30, if d % 5 == 4 { 0.5 } else { 0.0 }, CLASSES);
                m.ingest(&DeviceSummary {
                    device: d,
                    tags: &tags(d),
                    version: 2,
                    summary: &summary,
                })
                .unwrap();
            }
            m.close_window()
        })
        .collect();
    let cleared = reports.iter().flat_map(|r| &r.events).any(|e| {
        e.scope == Scope::Fleet
            && e.signal == Signal::Covariate
            && e.transition == Transition::Cleared
    });
    assert!(cleared, "{reports:?}");
    // Region 4 differs from the new training mixture, but not from its own baseline.
    let last = reports.last().unwrap();
    let region = last.scope(&Scope::Cohort("region:4".into())).unwrap();
    let scores = region.scores.as_ref().unwrap();
    assert!(
        scores.against_baseline && scores.covariate_psi < 0.1,
        "{scores:?}"
    );
    assert!(!m.raised().contains(&(Scope::Fleet, Signal::Covariate)));
}

/// Devices choose their tags: past `MAX_COHORTS` distinct ones, new tags
/// get no state (no scope, no flag, no metric series), while the summary
/// still counts for the fleet and the cohorts already known.
#[test]
fn device_chosen_tags_cannot_grow_the_cohorts_without_bound() {
    let (mut m, mut w) = monitor(RetrainPolicy::default());
    let summary = w.summary(10, 0.0, CLASSES);
    let devices = (MAX_COHORTS as u64 + 100) / MAX_TAGS as u64 + 1;
    for d in 0..devices {
        let t: Vec<String> = (0..MAX_TAGS as u64)
            .map(|k| format!("invented:{}", d * MAX_TAGS as u64 + k))
            .collect();
        m.ingest(&DeviceSummary {
            device: d,
            tags: &t,
            version: 1,
            summary: &summary,
        })
        .unwrap();
    }
    let report = m.close_window();
    let cohorts = report
        .scopes
        .iter()
        .filter(|s| matches!(&s.scope, Scope::Cohort(c) if c.starts_with("invented:")))
        .count();
    assert_eq!(cohorts, MAX_COHORTS);
    assert_eq!(
        m.tags_ignored(),
        devices * MAX_TAGS as u64 - MAX_COHORTS as u64
    );
    let fleet = report.scope(&Scope::Fleet).expect("fleet scope");
    assert_eq!(fleet.devices, devices, "every summary counts for the fleet");
    // A known cohort keeps being merged.
    let known = vec!["invented:0".to_string()];
    m.ingest(&DeviceSummary {
        device: 0,
        tags: &known,
        version: 1,
        summary: &summary,
    })
    .unwrap();
    let report = m.close_window();
    assert!(report.scope(&Scope::Cohort("invented:0".into())).is_some());
}
