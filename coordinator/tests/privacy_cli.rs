//! The privacy calculator as a person runs it: the real binary, its output
//! and its exit codes.

use std::process::Command;

fn coordinator(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_coordinator"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn epsilon_json_matches_the_reference_accountants() {
    // Reference: Opacus 1.6.0 (RDP) and dp-accounting 0.6.0 (PLD) give
    // 6.7127382974 and 6.1877449758 for q = 0.01, z = 1, T = 10,000, δ = 1e-5.
    // (A sampling rate below 1 assumes Poisson sampling, which the
    // coordinator does not perform; the accountants are checked here.)
    let out = coordinator(&[
        "privacy",
        "epsilon",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1",
        "--rounds",
        "10000",
        "--delta",
        "1e-5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rdp = v["epsilon_rdp"].as_f64().unwrap();
    let pld = v["epsilon_pld"].as_f64().unwrap();
    assert!((rdp - 6.7127382974).abs() < 1e-6, "{rdp}");
    assert!((pld - 6.1877449758).abs() < 1e-4, "{pld}");
}

#[test]
fn noise_search_meets_the_target() {
    let out = coordinator(&[
        "privacy",
        "noise",
        "--target-epsilon",
        "3",
        "--sampling-rate",
        "0.02",
        "--rounds",
        "500",
        "--method",
        "rdp",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let z = v["noise_multiplier"].as_f64().unwrap();
    let eps = v["epsilon_rdp"].as_f64().unwrap();
    assert!(eps <= 3.0 && eps > 2.99, "ε {eps} at z {z}");
    // A slightly smaller multiplier would overshoot: feed it back through `epsilon`.
    let smaller = format!("{}", z * 0.99);
    let out = coordinator(&[
        "privacy", "epsilon", "-q", "0.02", "-z", &smaller, "-t", "500", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["epsilon_rdp"].as_f64().unwrap() > 3.0);
}

#[test]
fn the_table_prints_both_bounds() {
    let out = coordinator(&[
        "privacy", "epsilon", "-q", "0.01", "-z", "1.1", "-t", "1000",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("ε (RDP") && text.contains("ε (PLD)"),
        "{text}"
    );
}

#[test]
fn invalid_input_names_the_parameter_and_fails() {
    let out = coordinator(&["privacy", "epsilon", "-q", "1.5", "-z", "1", "-t", "10"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("sampling_rate") && err.contains("(0, 1]"),
        "{err}"
    );
    let out = coordinator(&["privacy", "epsilon", "-q", "0.1"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap reports missing arguments with exit code 2"
    );
    let out = coordinator(&[
        "privacy", "epsilon", "-q", "0.1", "-z", "1", "-t", "10", "--delta", "0",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("delta"));
}

/// ε of `rounds` full Gaussian steps at `z` from the closed form of its RDP,
/// `rounds·α/(2z²)`, converted on Opacus's orders as the accountant does.
fn closed_form_epsilon(z: f64, rounds: u64, delta: f64) -> f64 {
    use fleet_aggregation::privacy::accountant::rdp::{default_orders, epsilon_from_rdp};
    let orders = default_orders();
    let rdp: Vec<f64> = orders
        .iter()
        .map(|a| rounds as f64 * a / (2.0 * z * z))
        .collect();
    epsilon_from_rdp(&orders, &rdp, delta).unwrap().epsilon
}

#[test]
fn the_sampling_rate_defaults_to_one_and_says_what_it_assumes() {
    let out = coordinator(&[
        "privacy", "epsilon", "-z", "5", "-t", "20", "--delta", "1e-5", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sampling_rate"], 1.0);
    assert_eq!(v["placement"], "server");
    let rdp = v["epsilon_rdp"].as_f64().unwrap();
    let expect = closed_form_epsilon(5.0, 20, 1e-5);
    assert!((rdp - expect).abs() < 1e-9 * expect, "{rdp} vs {expect}");
    // PLD is tighter, never looser.
    assert!(v["epsilon_pld"].as_f64().unwrap() <= rdp);
    let assumptions = v["assumptions"].to_string();
    assert!(
        assumptions.contains("trusted") && assumptions.contains("no sampling amplification"),
        "{assumptions}"
    );
    // The table says the same.
    let out = coordinator(&["privacy", "epsilon", "-z", "5", "-t", "20"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("noise on the server") && text.contains("q = 1"),
        "{text}"
    );
}

#[test]
fn a_sampling_rate_below_one_is_flagged_as_an_assumption_the_coordinator_does_not_meet() {
    let out = coordinator(&[
        "privacy", "epsilon", "-q", "0.01", "-z", "1.1", "-t", "1000",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("assumes Poisson sampling") && text.contains("does not perform"),
        "{text}"
    );
}

#[test]
fn client_noise_reports_the_per_update_bound_the_coordinator_faces() {
    let out = coordinator(&[
        "privacy",
        "epsilon",
        "-z",
        "4",
        "-t",
        "10",
        "--placement",
        "client",
        "--cohort",
        "16",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let per = &v["per_update"];
    assert_eq!(per["noise_multiplier"].as_f64().unwrap(), 1.0);
    // One update against the coordinator: 10 full steps at z/√m = 1.
    let eps = per["epsilon"].as_f64().unwrap();
    assert!(eps <= closed_form_epsilon(1.0, 10, 1e-5) + 1e-9, "{eps}");
    assert!(eps > v["epsilon_rdp"].as_f64().unwrap(), "{v}");
    assert!(
        v["assumptions"]
            .to_string()
            .contains("no secure aggregation"),
        "{v}"
    );
    // Without the cohort there is no per-update bound to print: refused.
    let out = coordinator(&[
        "privacy",
        "epsilon",
        "-z",
        "4",
        "-t",
        "10",
        "--placement",
        "client",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr).unwrap().contains("--cohort"));
}

#[test]
fn a_participation_limit_charges_each_device_its_own_rounds() {
    // 200 rounds, no device in more than 4: four full steps, in closed form.
    let out = coordinator(&[
        "privacy", "epsilon", "-z", "2", "-t", "200", "-k", "4", "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["rounds"].as_u64(), v["charged_rounds"].as_u64()),
        (Some(200), Some(4))
    );
    let rdp = v["epsilon_rdp"].as_f64().unwrap();
    let expect = closed_form_epsilon(2.0, 4, 1e-5);
    assert!((rdp - expect).abs() < 1e-9 * expect, "{rdp} vs {expect}");
    let said = v["assumptions"].to_string();
    assert!(
        said.contains("at most 4 of the 200 rounds")
            && said.contains("does not depend on its data"),
        "{said}"
    );
    // A limit above the rounds charges the rounds.
    let out = coordinator(&[
        "privacy", "epsilon", "-z", "2", "-t", "3", "-k", "9", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["charged_rounds"].as_u64(), Some(3));
    // The noise search calibrates to the charged rounds.
    let out = coordinator(&[
        "privacy", "noise", "-e", "8", "-t", "200", "-k", "4", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let z = v["noise_multiplier"].as_f64().unwrap();
    let out = coordinator(&["privacy", "noise", "-e", "8", "-t", "4", "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(z, w["noise_multiplier"].as_f64().unwrap());
    // Poisson sampling and a participation limit are not combined.
    let out = coordinator(&[
        "privacy", "epsilon", "-q", "0.1", "-z", "2", "-t", "200", "-k", "4",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("cannot be combined with a sampling rate below 1")
    );
}
