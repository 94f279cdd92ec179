//! The task core on a small model: reports, refusals, closes and resume.

use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{Cpu, Rejection, StrategyConfig};
use fleet_protocol::admin::TaskState;
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
