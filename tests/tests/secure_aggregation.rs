//! Secure aggregation over QUIC: a coordinator process and five agent
//! processes on loopback run SecAgg+ rounds through the two binaries and
//! the admin command line. Each agent signs its round keys with its
//! enrolled certificate's key and checks its neighbours' against the fleet
//! CA; the coordinator sees only each round's sum.

use fleet_e2e::ProcessFleet;
use fleet_models::data::fashion::{self, Split};
use fleet_models::{Backend, ModelSpec, evaluate};

fn accuracy(fleet: &ProcessFleet, test: &fleet_models::Dataset, model: &str) -> f32 {
    evaluate(
        &ModelSpec::fashion_2nn(),
        &fleet.model(model),
        test.view(),
        Backend::DEFAULT,
    )
    .unwrap()
    .accuracy
}

#[test]
fn five_agent_processes_run_secure_aggregation_with_and_without_noise() {
    let dir = fashion::default_dir();
    assert!(
        fashion::available(&dir),
        "this test needs Fashion-MNIST: apt-get install dataset-fashion-mnist"
    );
    let test = fashion::load(&dir, Split::Test).unwrap();
    let mut fleet = ProcessFleet::new("secure", 5, "fashion-mnist");
    for k in 0..5 {
        fleet.start_agent(k, &[]);
    }
    let common = [
        "--batch",
        "32",
        "--lr",
        "0.05",
        "--report-deadline",
        "120",
        "--secure",
        "--secure-degree",
        "4",
        "--secure-threshold",
        "3",
        "--secure-stage-timeout",
        "60",
    ];

    // Secure aggregation alone: every device clips its update at 5 and
    // quantises it; the coordinator unmasks the sum.
    let mut args = common.to_vec();
    args.extend(["--secure-clip", "5"]);
    let out = fleet.create_task("secure", 3, 1, &args);
    assert!(out.contains("task 1 created"), "{out}");
    fleet.admin(&["tasks", "start", "1"]);
    fleet.wait_finished(1, 600);
    let models = fleet.closed_round_models(1);
    assert_eq!(
        models.iter().map(|m| m.0).collect::<Vec<_>>(),
        [1, 2, 3],
        "every round closed on its first attempt"
    );
    for (round, _, participants) in &models {
        assert_eq!(participants, &[1, 2, 3, 4, 5], "round {round}");
    }
    let first = accuracy(&fleet, &test, &models[0].1);
    let last = accuracy(&fleet, &test, &models[2].1);
    eprintln!("secure FedAvg: test accuracy {first:.4} after round 1, {last:.4} after round 3");
    assert!(last > 0.70, "accuracy after 3 rounds: {last}");
    assert!(last > first, "{first} → {last}");

    // With distributed noise: each device adds its Skellam share, and the
    // ledger charges the sum's Skellam mechanism.
    let mut args = common.to_vec();
    args.extend([
        "--dp-noise",
        "1.0",
        "--dp-clip",
        "1.0",
        "--budget-epsilon",
        "1000",
    ]);
    let out = fleet.create_task("secure-dp", 2, 1, &args);
    assert!(out.contains("task 2 created"), "{out}");
    fleet.admin(&["tasks", "start", "2"]);
    fleet.wait_finished(2, 600);
    let budget = fleet.admin_json(&["budget", "2"]);
    assert_eq!(budget["rounds"], 2, "{budget}");
    let epsilon = budget["spent"]["epsilon"].as_f64().unwrap();
    assert!(epsilon.is_finite() && epsilon > 0.0, "{budget}");
    assert!(
        budget["spent"]["epsilon_pld"].is_null()
            || budget["spent"]["epsilon_pld"].as_f64() == Some(f64::INFINITY),
        "the PLD accountant has no Skellam mechanism: {budget}"
    );
    eprintln!("secure DP-FedAvg (z = 1, C = 1, 5 devices, 2 rounds): ε = {epsilon:.3} at δ = 1e-5");
    // The printed ε names what it rests on.
    let text = fleet.admin(&["budget", "2"]);
    assert!(
        text.contains("honest-but-curious coordinator") && text.contains("neighbours collude"),
        "{text}"
    );

    // Every agent took part in every round through the protocol.
    for k in 0..5 {
        let log = fleet.agents[k].as_ref().unwrap().output();
        assert_eq!(
            log.matches("the reveal was taken").count(),
            5,
            "agent {k}:\n{log}"
        );
    }
}
