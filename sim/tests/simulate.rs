//! Whole simulated runs: learning, bit-for-bit determinism whatever the
//! thread count, lazily generated devices, dropouts and stragglers,
//! privacy accounting, Byzantine devices, and fleets that cannot work.

use fleet_aggregation::Cpu;
use fleet_sim::driver::{Outcome, RoundLog, Start, run, run_from};
use fleet_sim::fleet::Fleet;

fn small(extra: &str) -> Fleet {
    Fleet::from_toml(&format!(
        "seed = 3\ndevices = 50\n\
         [task]\nrounds = 6\ntarget = 5\nover_selection = 1.4\nepochs = 1\n\
         [[profiles]]\ndropout = 0.1\n{extra}"
    ))
    .unwrap()
}

fn simulate(fleet: &Fleet) -> Result<Outcome, String> {
    let (data, test) = fleet_sim::data::load(fleet)?;
    run(fleet, &data, &test, &Cpu, |_| {})
}

fn in_pool(threads: usize, fleet: &Fleet) -> Outcome {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(|| simulate(fleet))
        .unwrap()
}

/// Everything a round logs except wall-clock time.
fn fingerprint(l: &RoundLog) -> (u64, u32, u32, [usize; 5], [u64; 3], u64) {
    (
        l.round,
        l.accuracy.to_bits(),
        l.loss.to_bits(),
        [
            l.selected,
            l.participants,
            l.dropouts,
            l.refused,
            l.rejected,
        ],
        [l.checkins, l.bytes_up, l.bytes_down],
        l.virtual_s.to_bits(),
    )
}

#[test]
fn same_fleet_and_seed_give_the_same_run_bit_for_bit_on_any_thread_count() {
    let mut fleet = small("");
    fleet.task.rounds = 10;
    let runs: Vec<Outcome> = [1, 2, 4].iter().map(|&t| in_pool(t, &fleet)).collect();
    let curve = |o: &Outcome| o.logs.iter().map(fingerprint).collect::<Vec<_>>();
    for other in &runs[1..] {
        assert_eq!(curve(&runs[0]), curve(other));
        assert!(
            runs[0]
                .global
                .iter()
                .zip(&other.global)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
    }
    let logs = &runs[0].logs;
    assert_eq!(logs.len(), 10);
    assert!(
        logs[9].accuracy > 0.55 && logs[9].accuracy > logs[0].accuracy,
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .all(|l| l.participants >= 4 && l.virtual_s > 0.0)
    );
    // Another seed is another run.
    let other = in_pool(2, &fleet.clone_with_seed(4));
    assert_ne!(curve(&runs[0]), curve(&other));
}

/// Training ahead of the reports (at plans, and for the devices due to
/// check in next) changes nothing but the wall time: the same run as
/// training each update when its report is due, with over-selection,
/// drop-outs and devices that are not always available (so that some
/// guesses of the lookahead are wrong and thrown away).
#[test]
fn training_ahead_gives_the_run_of_training_on_demand_bit_for_bit() {
    for extra in ["", "availability = 0.5\n"] {
        let fleet = small(extra);
        let (data, test) = fleet_sim::data::load(&fleet).unwrap();
        let go = |no_training_ahead: bool| {
            let start = Start {
                no_training_ahead,
                ..Start::default()
            };
            run_from(&fleet, &data, &test, &Cpu, start, |_| {}).unwrap()
        };
        let (ahead, on_demand) = (go(false), go(true));
        let curve = |o: &Outcome| o.logs.iter().map(fingerprint).collect::<Vec<_>>();
        assert_eq!(curve(&ahead), curve(&on_demand), "{extra}");
        assert!(
            ahead
                .global
                .iter()
                .zip(&on_demand.global)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // Every report trained on demand was trained ahead or on demand
        // here too; wrong guesses add trainings.
        assert!(
            ahead.stats.trainings >= on_demand.stats.trainings,
            "{extra}"
        );
    }
}

trait WithSeed {
    fn clone_with_seed(&self, seed: u64) -> Fleet;
}

impl WithSeed for Fleet {
    fn clone_with_seed(&self, seed: u64) -> Fleet {
        Fleet {
            seed,
            ..self.clone()
        }
    }
}

#[test]
fn synthetic_devices_are_generated_only_when_they_train() {
    let fleet = Fleet::from_toml(
        "devices = 20000\nmodel = \"logreg\"\n\
         [data]\nset = \"synthetic\"\nexamples = 40\n\
         [task]\nrounds = 8\ntarget = 20\nepochs = 2\nlr = 0.05\n",
    )
    .unwrap();
    let out = simulate(&fleet).unwrap();
    let logs = &out.logs;
    assert_eq!(logs.len(), 8);
    // Only devices whose reports were needed trained: at most the selected ones.
    let selected: usize = logs.iter().map(|l| l.selected).sum();
    assert!(out.stats.trainings as usize <= selected, "{:?}", out.stats);
    assert!(out.stats.trainings >= 8 * 20);
    // What an idle device costs is measured in tests/idle_memory.rs.
    assert!(out.stats.queue_peak <= 20000 && out.stats.queue_peak > 19000);
    // Every device labels with its own random linear model in Synthetic(1, 1),
    // so held-out examples of other devices say little; the global model
    // must still have moved and stay finite.
    let init = fleet.model_spec().init_params(fleet.seed);
    assert!(out.global.iter().all(|v| v.is_finite()));
    assert!(out.global.iter().zip(&init).any(|(a, b)| a != b));
    assert!(
        logs.iter()
            .all(|l| l.loss.is_finite() && l.participants >= 16)
    );
}

#[test]
fn dropouts_and_stragglers_are_counted_and_rounds_still_close() {
    let fleet =
        small("[[profiles]]\ndropout = 0.3\nexamples_per_second = 50.0\n").clone_with_seed(5);
    let fleet = Fleet {
        task: fleet_sim::fleet::TaskConfig {
            over_selection: 2.0,
            ..fleet.task
        },
        ..fleet
    };
    let logs = simulate(&fleet).unwrap().logs;
    assert!(
        logs.iter().map(|l| l.dropouts).sum::<usize>() > 0,
        "{logs:?}"
    );
    assert!(
        logs.iter().map(|l| l.refused).sum::<usize>() > 0,
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .all(|l| l.participants <= 5 && l.participants >= 4)
    );
    assert!(
        logs.iter()
            .all(|l| l.bytes_up > 0 && l.bytes_down > l.bytes_up / 2)
    );
}

#[test]
fn dp_rounds_spend_a_growing_epsilon_and_stop_at_the_budget() {
    let dp = "[task.dp]\nnoise_multiplier = 1.0\nclip = 1.0\n";
    let mut fleet = small(dp);
    fleet.task.rounds = 3;
    let out = simulate(&fleet).unwrap();
    let eps: Vec<f64> = out.logs.iter().map(|l| l.epsilon.unwrap()).collect();
    assert!(
        eps.len() == 3 && eps[0] > 0.0 && eps[0] < eps[1] && eps[1] < eps[2],
        "{eps:?}"
    );
    assert!(out.stopped.is_none());
    // The summary prints the last ε with what it assumes.
    let summary = fleet_sim::report::Summary::new(&fleet, &out, 0.0);
    assert_eq!(summary.epsilon, Some(eps[2]));
    let assumptions = summary.privacy_assumptions.join(" ");
    assert!(
        assumptions.contains("noise on the server")
            && assumptions.contains("no sampling amplification"),
        "{assumptions}"
    );
    let mut budgeted = fleet.clone();
    budgeted.task.dp.as_mut().unwrap().budget = Some((eps[1] + eps[2]) / 2.0);
    let out = simulate(&budgeted).unwrap();
    assert_eq!(out.logs.len(), 2);
    let why = out.stopped.unwrap();
    assert!(why.contains("before round 3"), "{why}");
}

/// The simulator runs the coordinator's participation rule: no device's
/// update is aggregated more often than the limit, and ε stops growing
/// once the busiest device has used its rounds.
#[test]
fn a_participation_limit_caps_each_device_and_its_epsilon() {
    let dp = "[task.dp]\nnoise_multiplier = 1.0\nclip = 1.0\n";
    let mut fleet = small(dp);
    fleet.task.rounds = 12;
    fleet.task.max_participations = Some(2);
    let out = simulate(&fleet).unwrap();
    assert_eq!(out.logs.len(), 12, "{:?}", out.stopped);
    let mut count = std::collections::BTreeMap::<u32, u32>::new();
    for l in &out.logs {
        for d in &l.devices {
            *count.entry(*d).or_default() += 1;
        }
    }
    assert_eq!(count.values().max(), Some(&2), "{count:?}");
    // 12 rounds of 5 reports from 50 devices, at most twice each: the ε of
    // two full steps at z = 1, whatever the number of rounds.
    let mut two =
        fleet_aggregation::privacy::accountant::ledger::PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    two.record_rounds(1.0, 1.0, 2).unwrap();
    let last = out.logs.last().unwrap().epsilon.unwrap();
    assert_eq!(last, two.spent().unwrap().epsilon);
    let summary = fleet_sim::report::Summary::new(&fleet, &out, 0.0);
    assert!(
        summary
            .privacy_assumptions
            .join(" ")
            .contains("at most 2 of the 12 rounds"),
        "{:?}",
        summary.privacy_assumptions
    );
    // Without the limit the same fleet is charged all 12 rounds.
    fleet.task.max_participations = None;
    let free = simulate(&fleet).unwrap();
    assert!(free.logs.last().unwrap().epsilon.unwrap() > 2.0 * last);
}

/// Adaptive clipping runs in the simulator as in the coordinator: the
/// plans carry the moving clip, and each round is charged one step at z.
#[test]
fn adaptive_clipping_is_charged_one_step_at_z_per_round() {
    let dp = "[task.dp]\nnoise_multiplier = 1.0\nclip = 0.01\n\
              adaptive_quantile = 0.5\nadaptive_count_noise = 1.0\n";
    let mut fleet = small(dp);
    fleet.task.rounds = 3;
    let out = simulate(&fleet).unwrap();
    assert_eq!(out.logs.len(), 3, "{:?}", out.stopped);
    let mut three =
        fleet_aggregation::privacy::accountant::ledger::PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    three.record_rounds(1.0, 1.0, 3).unwrap();
    assert_eq!(
        out.logs.last().unwrap().epsilon.unwrap(),
        three.spent().unwrap().epsilon
    );
    // With devices adding the noise there is no adaptive clipping.
    let client = format!("{dp}placement = \"client\"\n");
    let e = Fleet::from_toml(&format!("seed = 3\ndevices = 50\n{client}"))
        .map(|f| f.task_spec().validate())
        .unwrap()
        .unwrap_err();
    assert!(
        e.contains("adaptive clipping needs noise on the server"),
        "{e}"
    );
}

#[test]
fn sign_flipping_devices_hurt_fedavg() {
    // FedAvg with the relative bound alone (centred clipping off): the
    // attack shows. With centred clipping (the default) it costs less.
    let bound_only = |extra: &str| {
        let mut f = small(extra).clone_with_seed(6);
        f.task.centred = false;
        f
    };
    let attack = "[scenarios.byzantine]\nfraction = 0.3\nattack = \"sign-flip\"\nscale = 4.0\n";
    let a = simulate(&bound_only("")).unwrap().logs;
    let b = simulate(&bound_only(attack)).unwrap().logs;
    let c = simulate(&small(attack).clone_with_seed(6)).unwrap().logs;
    let last = |l: &[RoundLog]| l.last().unwrap().accuracy;
    assert!(
        last(&b) + 0.1 < last(&a),
        "clean {} attacked {}",
        last(&a),
        last(&b)
    );
    assert!(
        last(&c) > last(&b),
        "attacked, centred {} bound only {}",
        last(&c),
        last(&b)
    );
}

#[test]
fn a_fleet_that_cannot_fill_its_rounds_stops_with_a_reason() {
    let fleet = Fleet::from_toml(
        "devices = 10\n[task]\ntarget = 8\nmin_reports = 8\nover_selection = 1.0\nepochs = 1\n\
         [[profiles]]\ndropout = 0.9\n",
    )
    .unwrap();
    let e = simulate(&fleet).unwrap_err();
    assert!(e.contains("abandoned") && e.contains("task.target"), "{e}");
}

#[test]
fn a_run_directory_holds_the_logs_the_summary_and_the_report() {
    let mut fleet = small("");
    fleet.task.rounds = 2;
    let out = simulate(&fleet).unwrap();
    let dir = std::env::temp_dir().join(format!("fleet-sim-run-{}", std::process::id()));
    let summary = fleet_sim::report::Summary::new(&fleet, &out, 1.0);
    fleet_sim::report::write_run(&dir, &fleet, &out, &summary, None).unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let csv = read("rounds.csv");
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.starts_with("round,accuracy,loss,"));
    let json: serde_json::Value = serde_json::from_str(&read("rounds.json")).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    assert_eq!(json[1]["participants"], out.logs[1].participants);
    // The effective fleet file reproduces the fleet.
    assert_eq!(Fleet::from_toml(&read("fleet.toml")).unwrap(), fleet);
    let html = read("report.html");
    assert_eq!(
        html.matches("<svg").count(),
        5,
        "accuracy, loss, participation, traffic, time"
    );
    assert!(html.contains("Participation") && html.contains("</html>"));
    let summary: serde_json::Value = serde_json::from_str(&read("summary.json")).unwrap();
    assert_eq!(summary["rounds"], 2);
    assert_eq!(
        summary["bytes_per_idle_device"],
        out.stats.bytes_per_idle_device
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_exported_task_and_round_cohorts_describe_the_run() {
    let mut fleet = small("");
    fleet.task.rounds = 3;
    let (data, test) = fleet_sim::data::load(&fleet).unwrap();
    let out = run(&fleet, &data, &test, &Cpu, |_| {}).unwrap();
    for l in &out.logs {
        assert_eq!(l.devices.len(), l.participants, "{l:?}");
        assert!(l.devices.windows(2).all(|w| w[0] < w[1]), "{l:?}");
        assert!(l.devices.iter().all(|&d| d < fleet.devices), "{l:?}");
    }
    assert_ne!(out.logs[0].devices, out.logs[1].devices);
    let dir = std::env::temp_dir().join(format!("fleet-sim-task-{}", std::process::id()));
    fleet_sim::report::write_task(&dir, &fleet, &data, &out).unwrap();
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("task.json")).unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(task["model"], fleet.model_spec().name());
    let initial: Vec<f32> = serde_json::from_value(task["initial"].clone()).unwrap();
    assert_eq!(initial, fleet_sim::driver::initial_global(&fleet));
    let layout = fleet.model_spec().layout();
    assert_eq!(
        task["layout"].as_array().unwrap().len(),
        layout.entries.len()
    );
    assert_eq!(task["layout"][0]["shape"], serde_json::json!([784, 200]));
    let devices: Vec<Vec<usize>> = serde_json::from_value(task["devices"].clone()).unwrap();
    let fleet_sim::data::DeviceData::Partitioned { devices: parts, .. } = &data else {
        panic!("the small fleet uses a labelled data set");
    };
    assert_eq!(&devices, parts);
    // Each aggregated device's batch order: a permutation of its examples per epoch.
    let orders = task["orders"].as_array().unwrap();
    assert_eq!(orders.len(), out.logs.len());
    for (log, round) in out.logs.iter().zip(orders) {
        let round = round.as_object().unwrap();
        assert_eq!(round.len(), log.devices.len());
        for &d in &log.devices {
            let epochs: Vec<Vec<usize>> =
                serde_json::from_value(round[&d.to_string()].clone()).unwrap();
            assert_eq!(epochs.len(), fleet.task.epochs);
            let mut sorted = epochs[0].clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..parts[d as usize].len()).collect::<Vec<_>>());
        }
    }
}
