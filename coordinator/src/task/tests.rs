//! The task core on a small model: reports, refusals, closes and resume.

use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{Cpu, Rejection, StrategyConfig};
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::ObjectRef;
use fleet_protocol::task::TaskSpec;

use super::*;
use crate::engine::Refusal;
use crate::testing::small_spec;

static CPU: Cpu = Cpu;

fn spec(target: usize, min_reports: usize) -> TaskSpec {
    small_spec(target, target, min_reports)
}

fn core(spec: TaskSpec) -> TaskCore<'static> {
    TaskCore::new(spec, vec![0.0; 10], &CPU, 0).unwrap()
}

fn report(device: u64, round: u64, values: &[f32]) -> Report<'_> {
    Report {
        device,
        round,
        examples: 10,
        values,
    }
}

fn refused(effects: &[Effect]) -> Vec<&ReportRefusal> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Refused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect()
}

fn closed(effects: &[Effect]) -> Option<&Closed> {
    effects.iter().find_map(|e| match e {
        Effect::Closed(c) => Some(c),
        _ => None,
    })
}

#[test]
fn an_update_the_aggregator_refuses_never_reaches_the_engine() {
    let mut c = core(spec(2, 2));
    c.check_in(1, 0);
    c.check_in(2, 0);
    let big = [0.5f32; 10]; // norm 1.58 > max_norm 1
    let fx = c.report(&report(2, 1, &big), 10);
    assert!(
        matches!(
            refused(&fx)[..],
            [ReportRefusal::Rejected(Rejection::NormTooLarge { .. })]
        ),
        "{fx:?}"
    );
    assert!(c.participants().is_empty());
    // The device may still send a good one; with the target met the round
    // closes on the report that meets it, in the same call.
    let small = [0.1f32; 10];
    let fx = c.report(&report(2, 1, &small), 20);
    assert!(
        matches!(fx[..], [Effect::Accepted { device: 2, .. }]),
        "{fx:?}"
    );
    let fx = c.report(&report(1, 1, &[0.2f32; 10]), 30);
    assert!(
        matches!(fx[0], Effect::Accepted { device: 1, .. }),
        "{fx:?}"
    );
    let close = closed(&fx).expect("the round closes");
    assert_eq!(close.reports, 2);
    assert_eq!(close.participants, vec![2, 1]);
    assert!(close.applied);
    assert_eq!(close.state, TaskState::Running);
    assert_eq!(c.round(), 2);
    // FedAvg with equal weights, server learning rate 1: the mean delta.
    for v in c.global() {
        assert!((v - 0.15).abs() < 1e-6, "{v}");
    }
}

#[test]
fn engine_refusals_come_before_the_values_are_looked_at() {
    let mut c = core(spec(2, 2));
    c.check_in(1, 0);
    // Not selected, with an update that would fail every check.
    let fx = c.report(&report(9, 1, &[]), 1);
    assert_eq!(
        refused(&fx),
        vec![&ReportRefusal::Engine(Refusal::NotSelected)]
    );
    // Another round.
    let fx = c.report(&report(1, 7, &[]), 1);
    assert_eq!(refused(&fx), vec![&ReportRefusal::Engine(Refusal::NotOpen)]);
    // A replay of an accepted report.
    c.report(&report(1, 1, &[0.1; 10]), 2);
    let fx = c.report(&report(1, 1, &[0.1; 10]), 3);
    assert_eq!(
        refused(&fx),
        vec![&ReportRefusal::Engine(Refusal::Duplicate)]
    );
    assert_eq!(c.participants(), &[1]);
}

#[test]
fn non_finite_wrong_length_and_weightless_updates_are_rejected() {
    let mut c = core(spec(2, 2));
    c.check_in(1, 0);
    c.check_in(2, 0);
    let mut nan = [0.0f32; 10];
    nan[3] = f32::NAN;
    let cases: [(&[f32], u64); 3] = [(&nan, 10), (&[0.0; 9], 10), (&[0.0; 10], 0)];
    for (values, examples) in cases {
        let fx = c.report(
            &Report {
                device: 1,
                round: 1,
                examples,
                values,
            },
            1,
        );
        assert!(
            matches!(refused(&fx)[..], [ReportRefusal::Rejected(_)]),
            "{fx:?}"
        );
    }
    assert!(c.participants().is_empty());
    assert_eq!(c.global(), &[0.0; 10]);
}

#[test]
fn a_rejected_update_counts_as_a_drop_out_so_the_round_ends_without_waiting() {
    // Target 2, quorum 1: once device 2's update is rejected, every
    // selected device is accounted for and the round closes with one.
    let mut c = core(spec(2, 1));
    c.check_in(1, 0);
    c.check_in(2, 0);
    c.report(&report(1, 1, &[0.1; 10]), 1);
    let fx = c.report(&report(2, 1, &[5.0; 10]), 2);
    let close = closed(&fx).expect("closes without waiting for the deadline");
    assert_eq!(close.participants, vec![1]);
}

#[test]
fn a_non_finite_new_model_leaves_the_model_and_stops_the_task() {
    let mut s = spec(1, 1);
    s.strategy = StrategyConfig::fedavg(); // no norm bound
    let mut c = TaskCore::new(s, vec![f32::MAX; 10], &CPU, 0).unwrap();
    c.check_in(1, 0);
    let fx = c.report(&report(1, 1, &[f32::MAX; 10]), 1);
    let close = closed(&fx).expect("the round closes");
    assert_eq!(close.state, TaskState::Stopped);
    assert!(
        close.note.as_deref().unwrap().contains("non-finite"),
        "{close:?}"
    );
    assert_eq!(c.global(), &[f32::MAX; 10]);
    assert_eq!(c.state(), TaskState::Stopped);
}

#[test]
fn a_private_task_weighs_reports_equally_and_charges_its_ledger() {
    let mut s = spec(2, 2);
    s.strategy = StrategyConfig::fedavg();
    s.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: NoisePlacement::Client,
        expected_cohort: 2,
        adaptive: None,
    });
    let mut c = core(s);
    assert!(
        c.ledger().is_some(),
        "an unbudgeted private task still accounts"
    );
    assert_eq!(c.weight(0), 1.0);
    assert_eq!(c.weight(5000), 1.0);
    c.check_in(1, 0);
    c.check_in(2, 0);
    // A private report of 0 examples is a report like any other.
    let fx = c.report(
        &Report {
            device: 1,
            round: 1,
            examples: 0,
            values: &[0.1; 10],
        },
        1,
    );
    assert!(matches!(fx[..], [Effect::Accepted { weight, .. }] if weight == 1.0));
    let fx = c.report(&report(2, 1, &[0.3; 10]), 2);
    let close = closed(&fx).unwrap();
    let eps = close.epsilon.expect("ε is reported");
    assert!(eps.is_finite() && eps > 0.0, "{eps}");
    assert_eq!(c.ledger().unwrap().spent().unwrap().epsilon, eps);
}

#[test]
fn resume_leaves_out_stored_updates_the_aggregator_refuses() {
    let s = spec(3, 3);
    let server = s.strategy.server(10).unwrap();
    let updates = vec![
        (1, 10.0, vec![0.1f32; 10]),
        (2, 10.0, vec![9.0f32; 10]), // beyond max_norm
        (3, 10.0, vec![0.2f32; 10]),
    ];
    let (mut c, refused) = TaskCore::resume(
        s,
        vec![0.0; 10],
        &CPU,
        Resume {
            round: 1,
            closed: 0,
            selected: &[1, 2, 3],
            server,
            ledger: None,
            closed_rounds: &[],
            clip_norm: None,
            basis: None,
            history: None,
            state: TaskState::Running,
        },
        &updates,
        0,
    )
    .unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, 2);
    assert_eq!(c.participants(), &[1, 3]);
    // Device 2 is still selected and may report again.
    let fx = c.report(&report(2, 1, &[0.3; 10]), 1);
    let close = closed(&fx).expect("the third report closes the round");
    assert_eq!(close.participants, vec![1, 3, 2]);
}

fn private_spec(target: usize, min_reports: usize, placement: NoisePlacement, z: f64) -> TaskSpec {
    let mut s = spec(target, min_reports);
    s.strategy = StrategyConfig::fedavg(); // no norm bound: clipping is DP's
    s.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: z,
        placement,
        expected_cohort: target,
        adaptive: None,
    });
    s
}

#[test]
fn with_server_noise_every_update_is_clipped_before_the_aggregate() {
    // Almost no noise (z = 1e-3), so the aggregate shows what went in.
    let mut c = core(private_spec(2, 2, NoisePlacement::Server, 1e-3));
    c.check_in(1, 0);
    c.check_in(2, 0);
    // Norm √10·5 ≈ 15.8: a device that did not clip.
    let fx = c.report(&report(1, 1, &[5.0; 10]), 1);
    assert!(matches!(fx[..], [Effect::Accepted { .. }]), "{fx:?}");
    let fx = c.report(&report(2, 1, &[-0.01; 10]), 2);
    assert!(closed(&fx).is_some(), "{fx:?}");
    // Clipped to norm 1: 1/√10 per coordinate; sum with the small one over m = 2.
    let expect = ((1.0 / 10f64.sqrt()) - 0.01) / 2.0;
    for v in c.global() {
        assert!((f64::from(*v) - expect).abs() < 5e-3, "{v} vs {expect}");
    }
    // The helper: clipped for server noise, left alone otherwise.
    let server = private_spec(2, 2, NoisePlacement::Server, 1.0);
    let v = [3.0f32; 10];
    let (clipped, within) = server_clipped(server.dp.as_ref(), &v);
    assert!(fleet_aggregation::check::l2_norm(&clipped) <= 1.0);
    assert!(!within, "norm 9.5 is beyond the clip");
    assert!(server_clipped(server.dp.as_ref(), &[0.1; 10]).1);
    let client = private_spec(2, 2, NoisePlacement::Client, 1.0);
    assert_eq!(&*server_clipped(client.dp.as_ref(), &v).0, &v);
    assert_eq!(&*server_clipped(spec(2, 2).dp.as_ref(), &v).0, &v);
}

#[test]
fn resumed_updates_are_clipped_too() {
    let s = private_spec(3, 3, NoisePlacement::Server, 1e-3);
    let server = s.strategy.server(10).unwrap();
    let updates = vec![(1, 1.0, vec![9.0f32; 10]), (2, 1.0, vec![9.0f32; 10])];
    let (mut c, refused) = TaskCore::resume(
        s,
        vec![0.0; 10],
        &CPU,
        Resume {
            round: 1,
            closed: 0,
            selected: &[1, 2, 3],
            server,
            ledger: None,
            closed_rounds: &[],
            clip_norm: None,
            basis: None,
            history: None,
            state: TaskState::Running,
        },
        &updates,
        0,
    )
    .unwrap();
    assert!(refused.is_empty());
    let fx = c.report(&report(3, 1, &[9.0; 10]), 1);
    assert!(closed(&fx).is_some(), "{fx:?}");
    // Three updates of norm 1 over m = 3: 1/√10 per coordinate.
    for v in c.global() {
        assert!((f64::from(*v) - 1.0 / 10f64.sqrt()).abs() < 5e-3, "{v}");
    }
}

#[test]
fn the_ledger_charges_full_rounds_for_exactly_the_updates_aggregated() {
    // Client noise, m = 3: device 2's update is refused, so the sum carries
    // the noise of two updates only, z·√(2/3), and that is what is charged,
    // at sampling rate 1 whatever the population (100 here).
    let mut c = core(private_spec(3, 1, NoisePlacement::Client, 1.5));
    for d in [1, 2, 3] {
        c.check_in(d, 0);
    }
    c.report(&report(1, 1, &[0.1; 10]), 1);
    let mut nan = [0.0f32; 10];
    nan[0] = f32::NAN;
    c.report(&report(2, 1, &nan), 2);
    let fx = c.report(&report(3, 1, &[0.1; 10]), 3);
    let close = closed(&fx).expect("closes: every selected device is accounted for");
    assert_eq!(close.participants, vec![1, 3]);
    let groups = c.ledger().unwrap().groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].sampling_rate, 1.0);
    assert_eq!(groups[0].rounds, 1);
    assert!((groups[0].noise_multiplier - 1.5 * (2.0f64 / 3.0).sqrt()).abs() < 1e-12);
    // The ε is the full Gaussian's: RDP of one step is α/(2z²) at every order.
    let z = groups[0].noise_multiplier;
    let orders = fleet_aggregation::privacy::accountant::rdp::default_orders();
    let rdp: Vec<f64> = orders.iter().map(|a| a / (2.0 * z * z)).collect();
    let closed_form =
        fleet_aggregation::privacy::accountant::rdp::epsilon_from_rdp(&orders, &rdp, 1e-5)
            .unwrap()
            .epsilon;
    let spent = c.ledger().unwrap().spent().unwrap();
    assert!(
        (spent.epsilon_rdp - closed_form).abs() < 1e-9 * closed_form,
        "{spent:?} vs {closed_form}"
    );
    assert_eq!(close.epsilon, Some(spent.epsilon));
}

#[test]
fn the_next_round_is_checked_with_the_least_noise_it_can_close_with() {
    // Client noise, z = 2, m = 4, quorum 1: a round closing with one report
    // carries z·√(1/4) = 1. The budget fits that round alone, but not after
    // a full round at z = 2, so the task stops after round 1, although two
    // rounds at the nominal z = 2 would fit.
    let mut s = private_spec(4, 1, NoisePlacement::Client, 2.0);
    let delta = 1e-5;
    let eps = |rounds: &[f64]| {
        let mut l = PrivacyLedger::new(f64::MAX, delta).unwrap();
        for z in rounds {
            l.record_round(1.0, *z).unwrap();
        }
        l.spent().unwrap().epsilon
    };
    let budget = (eps(&[1.0]) + eps(&[2.0, 1.0])) / 2.0;
    assert!(eps(&[2.0, 2.0]) < budget, "the nominal check would go on");
    s.budget = Some(
        fleet_aggregation::privacy::accountant::ledger::PrivacyBudget {
            epsilon: budget,
            delta,
        },
    );
    let mut c = core(s);
    for d in 1..=4 {
        c.check_in(d, 0);
    }
    let mut last = Vec::new();
    for d in 1..=4 {
        last = c.report(&report(d, 1, &[0.01; 10]), d);
    }
    let close = closed(&last).expect("closes at the target");
    assert_eq!(close.state, TaskState::Stopped);
    assert!(
        close
            .note
            .as_deref()
            .unwrap()
            .contains("stopped before round 2"),
        "{close:?}"
    );
    assert!((close.epsilon.unwrap() - eps(&[2.0])).abs() < 1e-9);
    assert_eq!(c.state(), TaskState::Stopped);
}

#[test]
fn a_round_over_the_budget_is_discarded_and_the_task_stops() {
    // A task resumed with a ledger that has less left than its open round
    // will spend (a ledger from before the checks, or another budget): the
    // round is not applied, nothing is charged, the task stops with the
    // reason, and nothing panics.
    let s = private_spec(2, 2, NoisePlacement::Server, 1.0);
    let server = s.strategy.server(10).unwrap();
    let mut ledger = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    ledger.record_round(1.0, 1.0).unwrap();
    let one = ledger.spent().unwrap().epsilon;
    // Same rounds, a budget of 1.5 rounds' worth.
    let json = serde_json::to_value(&ledger).unwrap();
    let mut json = json;
    json["budget"]["epsilon"] = (1.5 * one).into();
    let ledger: PrivacyLedger = serde_json::from_value(json).unwrap();
    let (mut c, _) = TaskCore::resume(
        s,
        vec![0.0; 10],
        &CPU,
        Resume {
            round: 2,
            closed: 1,
            selected: &[1, 2],
            server,
            ledger: Some(ledger.clone()),
            closed_rounds: &[],
            clip_norm: None,
            basis: None,
            history: None,
            state: TaskState::Running,
        },
        &[(1, 1.0, vec![0.5; 10])],
        0,
    )
    .unwrap();
    let fx = c.report(&report(2, 2, &[0.5; 10]), 1);
    let close = closed(&fx).expect("the round closes");
    assert_eq!(close.state, TaskState::Stopped);
    assert!(
        close.note.as_deref().unwrap().contains("budget"),
        "{close:?}"
    );
    assert_eq!(c.global(), &[0.0; 10], "the round was not applied");
    assert!(!close.applied);
    assert_eq!(c.ledger().unwrap(), &ledger, "nothing was charged");
    assert_eq!(close.epsilon, Some(one));
}

#[test]
fn private_tasks_with_other_rules_or_no_noise_are_refused_by_the_core() {
    let mut s = private_spec(3, 3, NoisePlacement::Server, 1.0);
    s.strategy = StrategyConfig::fedavg().with_rule(fleet_aggregation::Rule::Median);
    let e = TaskCore::new(s, vec![0.0; 10], &CPU, 0).err().unwrap();
    assert!(e.contains("strategy.rule must be the mean"), "{e}");
    let s = private_spec(3, 3, NoisePlacement::Server, 0.0);
    let e = TaskCore::new(s, vec![0.0; 10], &CPU, 0).err().unwrap();
    assert!(e.contains("noise_multiplier"), "{e}");
}

/// Closes the open round of `c` with reports from `devices` (all selected
/// first); returns the close.
fn close_with(c: &mut TaskCore<'static>, devices: &[u64], now: u64) -> Closed {
    let round = c.round();
    for &d in devices {
        c.check_in(d, now);
    }
    let mut last = Vec::new();
    for &d in devices {
        last = c.report(&report(d, round, &[0.1; 10]), now);
    }
    closed(&last).cloned().expect("the round closes")
}

#[test]
fn under_a_participation_limit_the_ledger_charges_the_busiest_device() {
    let mut s = private_spec(2, 2, NoisePlacement::Server, 1.0);
    s.engine.rounds = 6;
    s.engine.max_participations = Some(2);
    s.population = 6;
    let mut c = core(s.clone());
    // Rounds 1 and 2 with devices 1 and 2, then 3 and 4, then 5 and 6: no
    // device takes part more than twice.
    for pair in [[1, 2], [1, 2], [3, 4], [3, 4], [5, 6]] {
        let close = close_with(&mut c, &pair, 0);
        assert!(close.note.is_none(), "{close:?}");
    }
    assert_eq!(c.engine().most_participations(), 2);
    let mut two = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    two.record_rounds(1.0, 1.0, 2).unwrap();
    let spent = c.ledger().unwrap().spent().unwrap();
    assert_eq!(spent, two.spent().unwrap(), "five rounds, two per device");
    assert_eq!(c.ledger().unwrap().rounds(), 5);
    // Devices 1 and 2 are done: they are not selected for round 6.
    let fx = c.check_in(1, 0);
    assert!(
        matches!(fx[..], [Effect::ComeBackAt { device: 1, .. }]),
        "{fx:?}"
    );
    // A restart counts the stored rounds again: the same refusal, and the
    // stored ledger carries on.
    let closed_rounds: Vec<(u64, Vec<u64>)> = vec![
        (1, vec![1, 2]),
        (2, vec![1, 2]),
        (3, vec![3, 4]),
        (4, vec![3, 4]),
        (5, vec![5, 6]),
    ];
    let (mut r, _) = TaskCore::resume(
        s.clone(),
        vec![0.0; 10],
        &CPU,
        Resume {
            round: 6,
            closed: 5,
            selected: &[],
            server: s.strategy.server(10).unwrap(),
            ledger: c.ledger().cloned(),
            clip_norm: None,
            basis: None,
            history: None,
            closed_rounds: &closed_rounds,
            state: TaskState::Running,
        },
        &[],
        0,
    )
    .unwrap();
    assert_eq!(r.engine().most_participations(), 2);
    let fx = r.check_in(2, 0);
    assert!(
        matches!(fx[..], [Effect::ComeBackAt { device: 2, .. }]),
        "{fx:?}"
    );
    let last = close_with(&mut r, &[5, 6], 0);
    assert_eq!(last.state, TaskState::Finished);
    assert_eq!(r.ledger().unwrap().spent().unwrap(), two.spent().unwrap());
    // The same six rounds without the limit charge every one of them.
    let mut free = private_spec(2, 2, NoisePlacement::Server, 1.0);
    free.engine.rounds = 6;
    let mut f = core(free);
    for _ in 0..6 {
        close_with(&mut f, &[1, 2], 0);
    }
    let mut six = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    six.record_rounds(1.0, 1.0, 6).unwrap();
    assert_eq!(f.ledger().unwrap().spent().unwrap(), six.spent().unwrap());
}

/// Adaptive clipping: the coordinator counts the updates within the
/// round's clip, moves the clip towards the target quantile, sends the new
/// clip in the next plans and clips to it, and charges each round as one
/// step at `z` (updates and count together).
#[test]
fn adaptive_clipping_follows_the_norms_and_is_charged_as_one_step() {
    use fleet_aggregation::privacy::adaptive::AdaptiveClipping;
    let devices: Vec<u64> = (1..=40).collect();
    let mut s = private_spec(40, 40, NoisePlacement::Server, 1.0);
    s.population = 40;
    let adaptive = AdaptiveClipping {
        target_quantile: 0.5,
        learning_rate: 0.2,
        // The centred count over 40 updates gets noise 2: its mean moves
        // by 0.05, far less than the 0.5 it is compared with.
        count_noise_std: 2.0,
    };
    s.dp.as_mut().unwrap().adaptive = Some(adaptive);
    s.validate().unwrap();
    let mut c = core(s.clone());
    let model = ObjectRef {
        id: fleet_protocol::message::ObjectId::of(b"m"),
        size: 40,
    };
    assert_eq!(c.plan(1, model, 0).dp.unwrap().clip_norm, 1.0);
    // Every update far beyond the clip: all clipped, the clip grows by
    // about exp(0.2 × 0.5).
    let round = c.round();
    for &d in &devices {
        c.check_in(d, 0);
    }
    let mut last = Vec::new();
    for &d in &devices {
        last = c.report(&report(d, round, &[3.0; 10]), 0);
    }
    assert!(closed(&last).unwrap().note.is_none(), "{last:?}");
    let grown = c.clip_norm().unwrap();
    assert!(
        (1.08..1.13).contains(&grown),
        "all clipped: the clip grows, to {grown}"
    );
    // The next plans carry it and the coordinator clips to it.
    assert_eq!(c.plan(1, model, 0).dp.unwrap().clip_norm, grown);
    assert_eq!(c.round_dp().unwrap().noise_multiplier, 1.0, "plans keep z");
    // One step at z = 1 charged, not one at z_Δ plus one for the count.
    let mut one = PrivacyLedger::new(f64::MAX, 1e-5).unwrap();
    one.record_round(1.0, 1.0).unwrap();
    assert_eq!(c.ledger().unwrap().spent().unwrap(), one.spent().unwrap());
    // All updates well within: the clip shrinks.
    let round = c.round();
    for &d in &devices {
        c.check_in(d, 0);
    }
    for &d in &devices {
        c.report(&report(d, round, &[0.001; 10]), 0);
    }
    let shrunk = c.clip_norm().unwrap();
    assert!(shrunk < grown * 0.93, "{shrunk} after {grown}");
    // A restart resumes with the stored clip.
    let (r, _) = TaskCore::resume(
        s.clone(),
        c.global().to_vec(),
        &CPU,
        Resume {
            round: c.round(),
            closed: 2,
            selected: &[],
            server: s.strategy.server(10).unwrap(),
            ledger: c.ledger().cloned(),
            clip_norm: Some(shrunk),
            basis: None,
            history: None,
            closed_rounds: &[],
            state: TaskState::Running,
        },
        &[],
        0,
    )
    .unwrap();
    assert_eq!(r.plan(1, model, 0).dp.unwrap().clip_norm, shrunk);
    // Client noise cannot have it: devices would reveal their bit.
    let mut bad = s.clone();
    bad.dp.as_mut().unwrap().placement = NoisePlacement::Client;
    let e = bad.validate().unwrap_err();
    assert!(
        e.contains("adaptive clipping needs noise on the server"),
        "{e}"
    );
    // A count noise that would take the whole budget is refused.
    let mut bad = s;
    bad.dp
        .as_mut()
        .unwrap()
        .adaptive
        .as_mut()
        .unwrap()
        .count_noise_std = 0.4;
    let e = bad.validate().unwrap_err();
    assert!(e.contains("must exceed z/2"), "{e}");
}

/// A stored adaptive clip that is not a clipping norm (damaged, or stored
/// for a task without DP) refuses the resume with the reason.
#[test]
fn a_stored_clip_that_is_no_clipping_norm_is_refused_on_resume() {
    let private = private_spec(2, 2, NoisePlacement::Server, 1.0);
    for (s, clip) in [
        (private.clone(), f64::NAN),
        (private.clone(), 0.0),
        (private, -1.0),
        (spec(2, 2), 1.0),
    ] {
        let server = s.strategy.server(10).unwrap();
        let e = TaskCore::resume(
            s,
            vec![0.0; 10],
            &CPU,
            Resume {
                round: 2,
                closed: 1,
                selected: &[],
                server,
                ledger: None,
                clip_norm: Some(clip),
                basis: None,
                history: None,
                closed_rounds: &[],
                state: TaskState::Running,
            },
            &[],
            0,
        )
        .err()
        .expect("resumed with a bad clip");
        assert!(e.contains("is not a clipping norm"), "{clip}: {e}");
    }
}

/// A task of three reports a round, no absolute norm bound, the relative
/// bound with its defaults (norms within twice the basis, weights at most the basis).
fn bounded_spec() -> TaskSpec {
    let mut s = spec(3, 3);
    s.strategy = StrategyConfig::fedavg();
    assert_eq!(
        s.strategy.bound,
        Some(fleet_aggregation::RelativeBound::DEFAULT)
    );
    s
}

fn weighted(device: u64, examples: u64, values: &[f32]) -> Report<'_> {
    Report {
        device,
        round: 0,
        examples,
        values,
    }
}

/// Runs one round of `reports` (device, examples, value in every coordinate).
fn bounded_round(c: &mut TaskCore<'static>, reports: &[(u64, u64, f32)], now: u64) -> Closed {
    let round = c.round();
    for &(d, _, _) in reports {
        c.check_in(d, now);
    }
    let mut last = None;
    for &(d, examples, v) in reports {
        let values = [v; 10];
        let fx = c.report(
            &Report {
                round,
                ..weighted(d, examples, &values)
            },
            now,
        );
        last = closed(&fx).cloned().or(last);
    }
    last.expect("the round closed")
}

#[test]
fn the_relative_bound_carries_its_basis_to_the_next_round_and_across_a_resume() {
    let mut c = core(bounded_spec());
    // Round 1: three honest reports of 0.1 a coordinate (norm 0.316),
    // 100 examples each: limits from them, nothing bounded.
    let r1 = bounded_round(&mut c, &[(1, 100, 0.1), (2, 100, 0.1), (3, 100, 0.1)], 0);
    assert_eq!(r1.bounded, 0);
    let basis = r1.basis.expect("a basis for round 2");
    assert!((basis.norm - 0.1 * 10f64.sqrt()).abs() < 1e-6, "{basis:?}");
    assert_eq!(basis.weight, 100.0);
    assert_eq!(c.basis(), Some(basis));

    // Round 2, resumed from the store with device 4's huge report stored
    // first: the stored basis bounds it from the start. It counts as norm
    // 0.632 (0.2 a coordinate) with weight 100.
    let s = bounded_spec();
    let server = s.strategy.server(10).unwrap();
    let start = c.global().to_vec();
    let (mut resumed, refused) = TaskCore::resume(
        s,
        start.clone(),
        &CPU,
        Resume {
            round: 2,
            closed: 1,
            selected: &[4, 5, 6],
            server,
            ledger: None,
            closed_rounds: &[(1, vec![1, 2, 3])],
            clip_norm: None,
            basis: Some(basis),
            history: None,
            state: TaskState::Running,
        },
        &[(4, 1e6, vec![f32::MAX; 10])],
        0,
    )
    .unwrap();
    assert!(refused.is_empty());
    let fx = resumed.report(
        &Report {
            round: 2,
            ..weighted(5, 100, &[0.1; 10])
        },
        1,
    );
    assert!(closed(&fx).is_none());
    let fx = resumed.report(
        &Report {
            round: 2,
            ..weighted(6, 100, &[0.1; 10])
        },
        2,
    );
    let r2 = closed(&fx).expect("closed");
    assert_eq!(r2.bounded, 1);
    let expected = (100.0 * 0.2 + 100.0 * 0.1 + 100.0 * 0.1) / 300.0;
    for (v, v0) in resumed.global().iter().zip(&start) {
        assert!((f64::from(v - v0) - expected).abs() < 1e-6, "{v}");
    }
    // The huge report did not raise the next basis: medians of the round's
    // three are an honest report's.
    assert_eq!(r2.basis, Some(basis));
}

/// Round 2 of a bounded task resumed from the store with `history`, device
/// 4's report stored, then devices 5 and 6 reporting: the new model.
fn resumed_round_2(
    global: &[f32],
    basis: Option<Basis>,
    history: Option<History>,
    reports: &[(u64, u64, f32)],
) -> Vec<f32> {
    let s = bounded_spec();
    let server = s.strategy.server(10).unwrap();
    let (first, rest) = reports.split_first().unwrap();
    let (mut resumed, refused) = TaskCore::resume(
        s,
        global.to_vec(),
        &CPU,
        Resume {
            round: 2,
            closed: 1,
            selected: &[4, 5, 6],
            server,
            ledger: None,
            closed_rounds: &[(1, vec![1, 2, 3])],
            clip_norm: None,
            basis,
            history,
            state: TaskState::Running,
        },
        &[(first.0, first.1 as f64, vec![first.2; 10])],
        0,
    )
    .unwrap();
    assert!(refused.is_empty());
    let mut last = None;
    for (i, &(d, examples, v)) in rest.iter().enumerate() {
        let values = [v; 10];
        let fx = resumed.report(
            &Report {
                round: 2,
                ..weighted(d, examples, &values)
            },
            1 + i as u64,
        );
        last = closed(&fx).cloned();
    }
    assert!(last.expect("closed").applied);
    resumed.global().to_vec()
}

#[test]
fn centred_clipping_carries_its_history_to_the_next_round_and_across_a_resume() {
    let mut c = core(bounded_spec());
    assert_eq!(
        c.spec().strategy.centred,
        Some(fleet_aggregation::CentredClip::DEFAULT)
    );
    // Round 1, no history: 0.1, 0.2 and 0.3 a coordinate (norms 0.316,
    // 0.632, 0.949), nothing clipped; the delta is 0.2 a coordinate, and
    // the next radius the lower median norm, 0.632.
    bounded_round(&mut c, &[(1, 100, 0.1), (2, 100, 0.2), (3, 100, 0.3)], 0);
    let h = c.history().cloned().expect("a history for round 2");
    for v in &h.reference {
        assert!((v - 0.2).abs() < 1e-6, "{h:?}");
    }
    assert!((h.radius - 0.2 * 10f64.sqrt()).abs() < 1e-6, "{h:?}");
    let start = c.global().to_vec();
    let basis = c.basis();

    // Round 2: 0.2, 0.2 and −0.2 a coordinate. The last deviates from the
    // reference by 0.4·√10, twice the radius: it counts as 0.2 − 0.5·0.4 =
    // 0, and the round's delta is (0.2 + 0.2 + 0) / 3 (without centred
    // clipping it would be 0.2 / 3).
    let reports = [(4, 100, 0.2), (5, 100, 0.2), (6, 100, -0.2)];
    let r2 = bounded_round(&mut c, &reports, 10);
    assert!(r2.applied);
    for (v, v0) in c.global().iter().zip(&start) {
        assert!((f64::from(v - v0) - 0.4 / 3.0).abs() < 1e-6, "{v}");
    }
    // The same round resumed from the store with the history as kept
    // reaches the same model to the bit; without it (a store that did not
    // keep it), the round clips nothing beyond the bound.
    let resumed = resumed_round_2(&start, basis, Some(h.clone()), &reports);
    assert_eq!(resumed, c.global());
    let forgotten = resumed_round_2(&start, basis, None, &reports);
    for (v, v0) in forgotten.iter().zip(&start) {
        assert!((f64::from(v - v0) - 0.2 / 3.0).abs() < 1e-6, "{v}");
    }
}

#[test]
fn a_stored_history_that_does_not_fit_the_task_refuses_the_resume() {
    let resume = |spec: TaskSpec, history: History| {
        let server = spec.strategy.server(10).unwrap();
        TaskCore::resume(
            spec,
            vec![0.0; 10],
            &CPU,
            Resume {
                round: 2,
                closed: 1,
                selected: &[],
                server,
                ledger: None,
                closed_rounds: &[],
                clip_norm: None,
                basis: None,
                history: Some(history),
                state: TaskState::Running,
            },
            &[],
            0,
        )
        .map(|_| ())
    };
    let good = History {
        reference: vec![0.1; 10],
        radius: 1.0,
    };
    assert!(resume(bounded_spec(), good.clone()).is_ok());
    for bad in [
        History {
            reference: vec![0.1; 9],
            radius: 1.0,
        },
        History {
            radius: f64::NAN,
            ..good.clone()
        },
    ] {
        let e = resume(bounded_spec(), bad).unwrap_err();
        assert!(e.contains("history"), "{e}");
    }
    // A task without centred clipping has no history to resume with.
    let mut off = bounded_spec();
    off.strategy.centred = None;
    let e = resume(off, good).unwrap_err();
    assert!(e.contains("history"), "{e}");
}

#[test]
fn a_stored_basis_that_is_not_one_refuses_the_resume() {
    let s = bounded_spec();
    let server = s.strategy.server(10).unwrap();
    let bad = fleet_aggregation::Basis {
        norm: f64::NAN,
        weight: 1.0,
    };
    let resume = |spec: TaskSpec, basis| {
        TaskCore::resume(
            spec,
            vec![0.0; 10],
            &CPU,
            Resume {
                round: 2,
                closed: 1,
                selected: &[],
                server: server.clone(),
                ledger: None,
                closed_rounds: &[],
                clip_norm: None,
                basis: Some(basis),
                history: None,
                state: TaskState::Running,
            },
            &[],
            0,
        )
        .map(|_| ())
    };
    let e = resume(s, bad).unwrap_err();
    assert!(e.contains("basis"), "{e}");
    // A task without the bound has no basis to resume with.
    let good = fleet_aggregation::Basis {
        norm: 1.0,
        weight: 1.0,
    };
    let e = resume(spec(3, 3), good).unwrap_err();
    assert!(e.contains("basis"), "{e}");
}

#[test]
fn a_private_task_with_server_noise_aggregates_without_the_relative_bound() {
    let s = private_spec(2, 2, NoisePlacement::Server, 1.0);
    assert!(s.strategy.bound.is_some());
    assert_eq!(effective_strategy(&s).bound, None);
    let client = private_spec(2, 2, NoisePlacement::Client, 1.0);
    assert_eq!(effective_strategy(&client).bound, client.strategy.bound);
}

fn secure_spec(target: usize, cohort: usize, min_reports: usize, z: Option<f64>) -> TaskSpec {
    let mut s = small_spec(target, cohort, min_reports);
    s.strategy = StrategyConfig::fedavg();
    s.secure_aggregation = Some(fleet_protocol::task::SecureAggregation {
        threshold: 2,
        degree: 4,
        stage_timeout_ms: 1_000,
        clip_norm: Some(1.0),
    });
    s.dp = z.map(|z| DpConfig {
        clip_norm: 1.0,
        noise_multiplier: z,
        placement: NoisePlacement::Client,
        expected_cohort: target,
        adaptive: None,
    });
    s
}

/// The updates of a secure round's devices, each of norm below the clip.
fn secure_updates(devices: &[u64]) -> std::collections::BTreeMap<u64, Vec<f32>> {
    devices
        .iter()
        .map(|&d| {
            let v: Vec<f32> = (0..10)
                .map(|i| ((d as f32 + 1.0) * 0.01 * (i as f32 - 4.5)).sin() * 0.2)
                .collect();
            (d, v)
        })
        .collect()
}

/// Runs the open round of a secure task: `devices` check in and
/// advertise; every protocol message is answered at once, except that a
/// device in `drop_at` drops out when the message of that stage reaches it
/// ("neighbours", "shares", "unmask"). Returns every effect, in order.
fn secure_round(
    c: &mut TaskCore<'static>,
    devices: &[u64],
    drop_at: &[(u64, &str)],
    now: u64,
) -> Vec<Effect> {
    use fleet_secagg::pki::{SimPki, SimSigner};
    use rand::SeedableRng;
    let updates = secure_updates(devices);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(now);
    let pki = SimPki::new(5);
    let mut all = Vec::new();
    for &d in devices {
        all.extend(c.check_in(d, now));
    }
    let plan = *c.secure_plan().unwrap();
    let round = c.round();
    let mut machines = std::collections::BTreeMap::new();
    let mut queue = std::collections::VecDeque::new();
    for &d in devices {
        let input = plan.quantiser.encode(&updates[&d], &mut rng).unwrap();
        let (dev, ad) =
            fleet_secagg::Device::new(d, plan.context, &SimSigner::new(5, d), &mut rng).unwrap();
        machines.insert(d, (dev, Some(input)));
        queue.extend(c.secure_message(d, round, ad, now));
    }
    while let Some(e) = queue.pop_front() {
        if let Effect::SecureSend {
            device, message, ..
        } = &e
        {
            let stage = match message {
                ServerMessage::Neighbours(_) => "neighbours",
                ServerMessage::Shares(_) => "shares",
                ServerMessage::Unmask { .. } => "unmask",
            };
            if drop_at.contains(&(*device, stage)) {
                queue.extend(c.drop_out(*device, now));
            } else {
                let (dev, input) = machines.get_mut(device).unwrap();
                let answer = match message.clone() {
                    ServerMessage::Neighbours(ads) => dev.share(&ads, &pki, &mut rng),
                    ServerMessage::Shares(s) => dev.mask(&s, input.take().unwrap()),
                    ServerMessage::Unmask { survivors, dropped } => {
                        dev.reveal(&survivors, &dropped)
                    }
                }
                .unwrap();
                queue.extend(c.secure_message(*device, round, answer, now));
            }
        }
        all.push(e);
    }
    all
}

#[test]
fn a_secure_round_closes_with_the_mean_of_the_survivors_updates() {
    let mut c = core(secure_spec(6, 6, 4, None)).for_task(9);
    assert_eq!(c.secure_plan().unwrap().context.task, 9);
    let devices = [1u64, 2, 3, 4, 5, 6];
    let fx = secure_round(&mut c, &devices, &[(3, "shares"), (5, "unmask")], 10);
    let close = closed(&fx).expect("the round closes");
    // Device 3 left before masking its input; device 5 after: its input is
    // in the sum (its neighbours revealed its self mask).
    assert_eq!(close.participants, vec![1, 2, 4, 5, 6]);
    assert_eq!(close.reports, 5);
    assert!(close.applied);
    let updates = secure_updates(&devices);
    let q = c.spec().secure_plan(9, 1, 0).unwrap().unwrap().quantiser;
    let mut mean = vec![0f32; 10];
    for d in [1u64, 2, 4, 5, 6] {
        for (m, v) in mean.iter_mut().zip(&updates[&d]) {
            *m += v / 5.0;
        }
    }
    for (i, (&got, &mean)) in c.global().iter().zip(&mean).enumerate() {
        // FedAvg with server learning rate 1: the global model moves by the
        // mean; each device's rounding moves the sum by < 1/scale.
        assert!(
            (got - mean).abs() < (8.0 / q.scale) as f32,
            "coordinate {i}: {got} vs {mean}"
        );
    }
    assert_eq!(c.round(), 2);
}

#[test]
fn a_secure_round_below_the_minimum_is_abandoned_and_retried() {
    let mut c = core(secure_spec(6, 6, 5, None));
    let devices = [1u64, 2, 3, 4, 5, 6];
    let fx = secure_round(&mut c, &devices, &[(2, "shares"), (4, "shares")], 10);
    assert!(closed(&fx).is_none());
    let reason = fx
        .iter()
        .find_map(|e| match e {
            Effect::Abandoned { round: 1, reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("abandoned");
    assert!(
        reason.contains("masked_input stage") && reason.contains("4 devices sent masked input"),
        "{reason}"
    );
    assert_eq!((c.round(), c.engine().closed()), (1, 0));
    // The retry is a fresh protocol run (attempt 1): it closes round 1.
    assert_eq!(c.secure_plan().unwrap().context.attempt, 1);
    let fx = secure_round(&mut c, &devices, &[], 5_000);
    assert_eq!(closed(&fx).expect("closes").round, 1);
    assert_eq!(c.engine().closed(), 1);
}

#[test]
fn late_advertisements_are_refused_while_the_close_is_held() {
    let mut c = core(secure_spec(4, 6, 3, None));
    for d in 1..=6u64 {
        c.check_in(d, 0);
    }
    let plan = *c.secure_plan().unwrap();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
    let mut last = Vec::new();
    for d in 1..=5u64 {
        let signer = fleet_secagg::pki::SimSigner::new(5, d);
        let (_, ad) = fleet_secagg::Device::new(d, plan.context, &signer, &mut rng).unwrap();
        last = c.secure_message(d, 1, ad, 10);
    }
    // The fifth came after the target of four: refused, the round not open.
    assert!(
        matches!(
            refused(&last)[..],
            [ReportRefusal::Engine(Refusal::NotOpen)]
        ),
        "{last:?}"
    );
    // Not before the round is closed: a message of another stage now.
    let fx = c.secure_message(
        6,
        1,
        DeviceMessage::Masked(fleet_secagg::message::Words(vec![
            0;
            plan.context.params.length
                as usize
        ])),
        20,
    );
    assert!(
        matches!(fx[..], [Effect::SecureRefused { device: 6, .. }]),
        "{fx:?}"
    );
    // The exchange has deadlines: nobody answers, and the round is
    // abandoned, not stalled.
    let deadline = c.next_deadline().expect("a stage deadline");
    let fx = c.tick(deadline);
    assert!(
        fx.iter()
            .any(|e| matches!(e, Effect::Abandoned { round: 1, .. })),
        "{fx:?}"
    );
}

#[test]
fn a_private_secure_round_is_charged_as_the_skellam_mechanism() {
    let mut c = core(secure_spec(6, 6, 4, Some(1.0)));
    let fx = secure_round(&mut c, &[1, 2, 3, 4, 5, 6], &[(6, "shares")], 10);
    let close = closed(&fx).expect("closes");
    assert_eq!(close.reports, 5);
    let plan = c.spec().secure_plan(0, 1, 0).unwrap().unwrap();
    let mut expected = new_ledger(c.spec()).unwrap().unwrap();
    expected.record_skellam_round(plan.mechanism(5)).unwrap();
    let eps = expected.spent().unwrap().epsilon;
    assert!(eps.is_finite() && eps > 0.0);
    assert_eq!(close.epsilon, Some(eps));
    // Charged with the five survivors' noise, not the quorum's four.
    let mut fewer = new_ledger(c.spec()).unwrap().unwrap();
    fewer.record_skellam_round(plan.mechanism(4)).unwrap();
    assert!(fewer.spent().unwrap().epsilon > eps);
}
