//! A coordinator process and five agent processes on loopback: real QUIC,
//! mutual TLS with certificates obtained by enrollment, real training on
//! disjoint Dirichlet(0.5) shares of the full Fashion-MNIST training set.
//! The coordinator's state is its SQLite database; everything here goes
//! through the two binaries and the admin command line, as an operator would.

use fleet_aggregation::privacy::accountant::{SubsampledGaussian, epsilon_pld, epsilon_rdp};
use fleet_e2e::ProcessFleet;
use fleet_models::data::fashion::{self, Split};
use fleet_models::{Backend, ModelSpec, evaluate};

fn accuracy(fleet: &ProcessFleet, test: &fleet_models::Dataset, model: &str) -> f32 {
    let params = fleet.model(model);
    evaluate(
        &ModelSpec::fashion_2nn(),
        &params,
        test.view(),
        Backend::DEFAULT,
    )
    .unwrap()
    .accuracy
}

/// The models of a task's closed rounds, by round.
fn round_models(fleet: &ProcessFleet, task: u64) -> Vec<(u64, String)> {
    fleet
        .closed_round_models(task)
        .into_iter()
        .map(|(round, model, _)| (round, model))
        .collect()
}

#[test]
fn five_agent_processes_train_the_2nn_with_and_without_privacy() {
    let dir = fashion::default_dir();
    assert!(
        fashion::available(&dir),
        "this test needs Fashion-MNIST: apt-get install dataset-fashion-mnist"
    );
    let test = fashion::load(&dir, Split::Test).unwrap();
    let mut fleet = ProcessFleet::new("federated", 5, "fashion-mnist");
    for k in 0..5 {
        fleet.start_agent(k, &[]);
    }

    // FedAvg, 5 rounds, every device in every round.
    let create = |name: &str, rounds: u64, extra: &[&str]| {
        let mut args = vec!["--batch", "32", "--lr", "0.05", "--report-deadline", "120"];
        args.extend_from_slice(extra);
        fleet.create_task(name, rounds, 1, &args)
    };
    let out = create("fedavg", 5, &[]);
    assert!(out.contains("task 1 created"), "{out}");
    fleet.admin(&["tasks", "start", "1"]);
    fleet.wait_finished(1, 600);
    let models = round_models(&fleet, 1);
    assert_eq!(
        models.iter().map(|m| m.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let first = accuracy(&fleet, &test, &models[0].1);
    let last = accuracy(&fleet, &test, &models[4].1);
    eprintln!("FedAvg: test accuracy {first:.4} after round 1, {last:.4} after round 5");
    assert!(last > 0.80, "accuracy after 5 rounds: {last}");
    assert!(last > first, "{first} → {last}");
    for (round, p) in fleet.closed_rounds(1) {
        assert_eq!(p, [1, 2, 3, 4, 5], "round {round}");
    }

    // DP-FedAvg with noise on the server (the default placement): the
    // coordinator clips every update again, noises the sum and accounts ε.
    create(
        "dp",
        3,
        &[
            "--dp-noise",
            "0.8",
            "--dp-clip",
            "1.0",
            "--budget-epsilon",
            "1000",
            "--budget-delta",
            "1e-5",
        ],
    );
    fleet.admin(&["tasks", "start", "2"]);
    fleet.wait_finished(2, 600);
    let budget = fleet.admin_json(&["budget", "2"]);
    let spent = &budget["spent"];
    assert_eq!(budget["rounds"], 3);
    // Every round is charged in full (q = 1, no amplification by sampling)
    // at z = 0.8: the ledger's ε is the accountants' ε for 3 such rounds.
    let m = SubsampledGaussian {
        sampling_rate: 1.0,
        noise_multiplier: 0.8,
        rounds: 3,
    };
    let rdp = epsilon_rdp(&m, 1e-5).unwrap().epsilon;
    let pld = epsilon_pld(&m, 1e-5).unwrap();
    assert!(
        (spent["epsilon_rdp"].as_f64().unwrap() - rdp).abs() < 1e-9 * rdp,
        "{budget}"
    );
    assert!(
        (spent["epsilon_pld"].as_f64().unwrap() - pld).abs() < 1e-9 * pld,
        "{budget}"
    );
    assert_eq!(spent["epsilon"].as_f64().unwrap(), rdp.min(pld));
    let text = fleet.admin(&["budget", "2"]);
    assert!(text.contains(&format!("ε = {:.4}", rdp.min(pld))), "{text}");
    let dp_models = round_models(&fleet, 2);
    assert_eq!(dp_models.len(), 3);
    // With five devices the noise a useful ε allows swamps the signal (σ·C/m
    // = 0.16 per coordinate here); the run shows the mechanism and its
    // accounting, not utility.
    let dp_last = accuracy(&fleet, &test, &dp_models[2].1);
    eprintln!(
        "DP-FedAvg (z = 0.8, C = 1, 5 devices): accuracy {dp_last:.4} after round 3, ε = {:.3} at δ = 1e-5",
        rdp.min(pld)
    );
    assert_ne!(dp_models[0].1, dp_models[2].1, "the model moved");
}
