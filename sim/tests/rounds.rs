//! Federated rounds on the embedded data: learning, determinism, privacy
//! accounting, and bad input.

use fleet_aggregation::codec::Codec;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{Cpu, StrategyConfig};
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::data::partition::Scheme;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_sim::rounds::{Task, run};

fn task() -> Task {
    Task {
        spec: ModelSpec::fashion_2nn(),
        train: TrainConfig {
            epochs: 5,
            ..TrainConfig::default()
        },
        strategy: StrategyConfig::fedavg(),
        codec: Codec::F32,
        dp: None,
        rounds: 8,
        clients: 50,
        per_round: 10,
        scheme: Scheme::Dirichlet { alpha: 0.5 },
        seed: 3,
    }
}

#[test]
fn fedavg_learns_and_is_bit_for_bit_deterministic() {
    let train = embedded::load(Split::Train).unwrap();
    let test = embedded::load(Split::Test).unwrap();
    let (a, logs) = run(&task(), &train, &test, &Cpu, |_| {}).unwrap();
    let (b, again) = run(&task(), &train, &test, &Cpu, |_| {}).unwrap();
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    let curve: Vec<u32> = logs.iter().map(|l| l.accuracy.to_bits()).collect();
    assert_eq!(
        curve,
        again
            .iter()
            .map(|l| l.accuracy.to_bits())
            .collect::<Vec<_>>()
    );
    assert_eq!(logs.len(), 8);
    assert!(
        logs.iter()
            .all(|l| l.participants == 10 && l.epsilon.is_none())
    );
    assert!(
        logs[7].accuracy > 0.6 && logs[7].accuracy > logs[0].accuracy,
        "accuracy after 8 rounds {}",
        logs[7].accuracy
    );
    assert!(logs[7].loss < logs[0].loss);
    assert_eq!(logs[0].bytes_up, 10 * (5 + 4 * 199_210));
}

#[test]
fn dp_rounds_spend_a_growing_epsilon_and_stop_at_the_budget() {
    let train = embedded::load(Split::Train).unwrap();
    let test = embedded::load(Split::Test).unwrap();
    let dp = DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: NoisePlacement::Client,
        expected_cohort: 10,
    };
    let mut t = Task {
        dp: Some((dp, 1e-5, None)),
        rounds: 3,
        ..task()
    };
    let (_, logs) = run(&t, &train, &test, &Cpu, |_| {}).unwrap();
    let eps: Vec<f64> = logs.iter().map(|l| l.epsilon.unwrap()).collect();
    assert!(
        eps[0] > 0.0 && eps[0] < eps[1] && eps[1] < eps[2],
        "{eps:?}"
    );
    // A budget between rounds 2 and 3 stops the run before round 3.
    t.dp = Some((dp, 1e-5, Some((eps[1] + eps[2]) / 2.0)));
    let e = run(&t, &train, &test, &Cpu, |_| {}).unwrap_err();
    assert!(e.contains("before round 3"), "{e}");
}

#[test]
fn impossible_cohorts_are_refused() {
    let train = embedded::load(Split::Train).unwrap();
    let test = embedded::load(Split::Test).unwrap();
    let e = run(
        &Task {
            per_round: 60,
            ..task()
        },
        &train,
        &test,
        &Cpu,
        |_| {},
    )
    .unwrap_err();
    assert!(e.contains("per_round"), "{e}");
}
