//! The monitoring phase end to end: devices serve and summarise, the
//! coordinator's monitor flags drift where it happens and nowhere else, and
//! its retraining policy trains on the drifted data.

use fleet_aggregation::Cpu;
use fleet_sim::driver::{Start, run_from};
use fleet_sim::fleet::Fleet;
use fleet_sim::monitor::{self, MonitorOutcome};

/// 200 devices on the embedded images, two cohorts of 100; logistic
/// regression keeps training fast in debug builds.
fn fleet(drift: &str) -> Fleet {
    Fleet::from_toml(&format!(
        "seed = 5\ndevices = 200\nmodel = \"logreg\"\n\
         [data]\nset = \"fashion-embedded\"\n[data.partition]\nscheme = \"iid\"\n\
         [task]\nrounds = 5\ntarget = 10\nepochs = 1\n\
         [[profiles]]\ndropout = 0.0\n\
         [monitor]\nwindows = 10\npredictions = 20\ncohorts = 2\n\
         [monitor.retrain]\nenabled = true\nrounds = 3\ncooldown_windows = 20\n{drift}"
    ))
    .unwrap()
}

fn monitored(fleet: &Fleet) -> MonitorOutcome {
    let (data, test) = fleet_sim::data::load(fleet).unwrap();
    let sketch = monitor::fit_sketch(fleet, &data).unwrap();
    let start = Start {
        sketch: Some(&sketch),
        ..Start::default()
    };
    let trained = run_from(fleet, &data, &test, &Cpu, start, |_| {}).unwrap();
    let training = trained.training.clone().expect("training summaries");
    monitor::run(
        fleet,
        &data,
        &test,
        &Cpu,
        &sketch,
        trained.global,
        training,
        |_| {},
    )
    .unwrap()
}

#[test]
fn brightness_drift_on_one_cohort_is_flagged_named_and_retrained() {
    let out = monitored(&fleet(
        "[scenarios.drift]\nkind = \"brightness\"\nstrength = 0.3\nfraction = 0.5\nfrom_window = 4\n",
    ));
    assert_eq!(out.drift_from, Some(4));
    assert_eq!(out.false_alarms, 0, "{:?}", out.windows);
    // Two windows above the threshold raise a flag: windows 4 and 5.
    assert_eq!(out.fleet_detected, Some(5));
    assert_eq!(out.cohort_detected, Some((5, "cohort-1".to_string())));
    assert_eq!(out.wrong_cohorts, 0);
    assert_eq!(out.delay(out.fleet_detected), Some(2));
    // The policy retrained once, on the drifted data, and the monitor moved on.
    assert_eq!(out.retrain_rounds.len(), 1);
    assert_eq!(out.retrain_rounds[0].len(), 3);
    let w5 = &out.windows[5];
    assert!(w5.retrain.as_deref().unwrap().contains("cohort cohort-1"));
    assert_eq!(out.windows[6].version, 2);
    // Drifted accuracy fell when the drift began.
    let before = out.windows[3].drifting_accuracy.unwrap();
    let during = out.windows[4].drifting_accuracy.unwrap();
    assert!(during < before, "{before} → {during}");
    // Summaries are about 0.5 KB on the wire, as documented (README, "Drift
    // monitoring"; aggregation/src/drift/sketch.rs: 132 numbers): 132 f32
    // counts are 528 bytes, plus postcard's lengths and fixed fields. Within
    // 10% of 512 bytes.
    let sizes: Vec<usize> = out.windows.iter().map(|w| w.max_summary_bytes).collect();
    assert!(
        sizes.iter().all(|b| (460..=563).contains(b)),
        "largest summary of each window, bytes: {sizes:?}"
    );
}

#[test]
fn no_drift_raises_no_alert() {
    let mut f = fleet("");
    f.monitor.as_mut().unwrap().windows = 12;
    let out = monitored(&f);
    assert_eq!(out.false_alarms, 0);
    assert!(
        out.windows
            .iter()
            .all(|w| w.events.is_empty() && w.retrain.is_none())
    );
    assert_eq!(out.fleet_detected, None);
}

#[test]
fn drift_settings_are_checked_by_field() {
    let err = |extra: &str| {
        Fleet::from_toml(&format!("[monitor]\n{extra}"))
            .and_then(|f| f.validate())
            .unwrap_err()
            .to_string()
    };
    assert!(err("cohorts = 0").contains("monitor.cohorts"));
    assert!(
        err("[monitor.thresholds]\ncovariate = { raise = 0.1, clear = 0.3, raise_after = 1, clear_after = 1 }")
            .contains("monitor.thresholds.covariate")
    );
    assert!(
        err("[scenarios.drift]\nkind = \"brightness\"\nstrength = 3.0")
            .contains("scenarios.drift.strength")
    );
    let e = err("[scenarios.drift]\nkind = \"blur\"");
    assert!(e.contains("blur") && e.contains("brightness"), "{e}");
    let no_monitor = Fleet::from_toml("[scenarios.drift]\nkind = \"noise\"")
        .and_then(|f| f.validate())
        .unwrap_err()
        .to_string();
    assert!(no_monitor.contains("add a [monitor] table"), "{no_monitor}");
}
