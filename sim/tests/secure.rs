//! Simulated fleets with secure aggregation: the same learning as without
//! it, drop-outs at every stage of the exchange, the ε of the distributed
//! Skellam noise, and fleet files that cannot work.

use fleet_aggregation::Cpu;
use fleet_sim::driver::{Outcome, run};
use fleet_sim::fleet::Fleet;

fn fleet(extra: &str) -> Fleet {
    Fleet::from_toml(&format!(
        "seed = 4\ndevices = 60\n\
         [task]\nrounds = 8\ntarget = 10\nover_selection = 1.3\nepochs = 1\n\
         bound = false\ncentred = false\n\
         [[profiles]]\ndropout = 0.05\n{extra}"
    ))
    .unwrap()
}

fn simulate(fleet: &Fleet) -> Result<Outcome, String> {
    let (data, test) = fleet_sim::data::load(fleet)?;
    run(fleet, &data, &test, &Cpu, |_| {})
}

/// Secure aggregation averages with equal weights (a device's example
/// count would be seen in the clear), plain FedAvg by examples, and the
/// exchange shifts later rounds in time (other devices are selected): the
/// curves are close, not equal. That the sum itself is exact up to the
/// rounding is the task core's test
/// (`a_secure_round_closes_with_the_mean_of_the_survivors_updates`).
#[test]
fn secure_aggregation_learns_as_well_as_plain_averaging() {
    let plain = simulate(&fleet("")).unwrap();
    // A clip no update reaches: the only change is the quantisation.
    let secure = simulate(&fleet(
        "[task.secure_aggregation]\nclip = 100.0\nstage_dropout = 0.0\n",
    ))
    .unwrap();
    assert_eq!(secure.logs.len(), 8);
    let a = plain.logs.last().unwrap().accuracy;
    let b = secure.logs.last().unwrap().accuracy;
    assert!(b > 0.5, "secure run: accuracy {b}");
    assert!((a - b).abs() < 0.08, "plain {a} vs secure {b}");
    for l in &secure.logs {
        assert_eq!(l.participants, 10, "round {}: {l:?}", l.round);
        assert_eq!(l.devices.len(), 10);
        assert!(l.epsilon.is_none());
    }
}

#[test]
fn drop_outs_at_every_stage_leave_rounds_that_still_close() {
    let o = simulate(&fleet(
        "[task.secure_aggregation]\nclip = 100.0\nstage_dropout = 0.08\n",
    ))
    .unwrap();
    assert_eq!(o.logs.len(), 8);
    // Some devices advertised and left during the exchange: rounds closed
    // with fewer survivors than the target, and still at least the quorum.
    assert!(o.logs.iter().any(|l| l.participants < 10), "{:?}", o.logs);
    for l in &o.logs {
        assert!(
            l.participants >= 8,
            "round {}: {} survivors",
            l.round,
            l.participants
        );
    }
    assert!(o.logs.last().unwrap().accuracy > 0.4);
}

#[test]
fn a_private_secure_fleet_spends_the_skellam_mechanisms_epsilon() {
    let o = simulate(&fleet(
        "[task.dp]\nnoise_multiplier = 1.0\nclip = 1.0\nplacement = \"client\"\n\
         [task.secure_aggregation]\nstage_dropout = 0.0\n",
    ))
    .unwrap();
    let eps: Vec<f64> = o.logs.iter().map(|l| l.epsilon.unwrap()).collect();
    assert!(eps.windows(2).all(|w| w[1] > w[0]), "{eps:?}");
    // Each device's noise is calibrated so that the quorum (8 of the
    // target 10) carries z = 1; every round closed with 10 survivors, so
    // the sum carries z·√(10/8). Eight such Skellam rounds cost at least
    // what eight Gaussian rounds of that multiplier cost, and not much more.
    assert!(o.logs.iter().all(|l| l.participants == 10));
    let z = (10.0f64 / 8.0).sqrt();
    let gaussian = fleet_aggregation::privacy::accountant::epsilon_rdp(
        &fleet_aggregation::privacy::accountant::SubsampledGaussian::new(1.0, z, 8).unwrap(),
        1e-5,
    )
    .unwrap()
    .epsilon;
    assert!(
        eps[7] >= gaussian * 0.999,
        "{} vs Gaussian {gaussian}",
        eps[7]
    );
    assert!(eps[7] < gaussian * 1.2, "{} vs Gaussian {gaussian}", eps[7]);
}

#[test]
fn fleets_that_cannot_aggregate_securely_are_refused_with_the_field() {
    for (extra, needle) in [
        (
            "[task.dp]\nplacement = \"server\"\n[task.secure_aggregation]\n",
            "dp.placement",
        ),
        ("[task.secure_aggregation]\n", "clip_norm"),
        (
            "[task.secure_aggregation]\nclip = 1.0\nthreshold = 9\ndegree = 8\n",
            "threshold",
        ),
        (
            "[task.secure_aggregation]\nclip = 1.0\nstage_dropout = 1.0\n",
            "stage_dropout",
        ),
    ] {
        let toml = format!(
            "seed = 4\ndevices = 60\n[task]\nrounds = 2\ntarget = 10\n[[profiles]]\n{extra}"
        );
        let err = Fleet::from_toml(&toml)
            .err()
            .unwrap_or_else(|| panic!("accepted: {extra}"))
            .to_string();
        assert!(err.contains(needle), "{extra}: {err}");
    }
    // A robust rule needs every update.
    let toml = "seed = 4\ndevices = 60\n[task]\nrounds = 2\ntarget = 10\nstrategy = \"median\"\n\
                [[profiles]]\n[task.secure_aggregation]\nclip = 1.0\n";
    let err = Fleet::from_toml(toml).unwrap_err().to_string();
    assert!(err.contains("mean"), "{err}");
}
