//! Every rule and server optimiser against a direct textbook computation.

use fleet_aggregation::{
    Admission, Basis, Cpu, Error, Limits, Rejection, RelativeBound, Rule, ServerOptimizer,
    StrategyConfig, Update,
};
use fleet_models::{LayoutFingerprint, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn fp() -> LayoutFingerprint {
    ModelSpec::LogReg {
        inputs: 2,
        classes: 2,
    }
    .layout()
    .fingerprint()
}

fn admission(len: usize) -> Admission {
    Admission {
        fingerprint: fp(),
        len,
        max_norm: None,
    }
}

/// The rule of `cfg` alone, without its relative bound and centred clipping
/// (they have their own tests).
fn run(
    cfg: StrategyConfig,
    rows: &[Vec<f32>],
    weights: &[f64],
) -> Result<fleet_aggregation::Aggregate, Error> {
    run_as_given(
        StrategyConfig {
            bound: None,
            centred: None,
            ..cfg
        },
        rows,
        weights,
    )
}

fn run_as_given(
    cfg: StrategyConfig,
    rows: &[Vec<f32>],
    weights: &[f64],
) -> Result<fleet_aggregation::Aggregate, Error> {
    let mut agg = cfg.aggregator(admission(rows[0].len()), &Cpu)?;
    for (r, &w) in rows.iter().zip(weights) {
        agg.add(&Update {
            fingerprint: fp(),
            values: r,
            weight: w,
        })
        .unwrap();
    }
    agg.finish()
}

fn random_rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..d).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect()
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (f64::from(*x) - y).abs() <= tol * (1.0 + y.abs()),
            "coordinate {i}: {x} vs {y}"
        );
    }
}

#[test]
fn weighted_mean_matches_the_formula_and_streaming_equals_batch() {
    let rows = random_rows(9, 40_000, 1);
    let weights: Vec<f64> = (1..=9).map(|w| f64::from(w) * 10.0).collect();
    let total: f64 = weights.iter().sum();
    let want: Vec<f64> = (0..rows[0].len())
        .map(|j| {
            rows.iter()
                .zip(&weights)
                .map(|(r, w)| w * f64::from(r[j]))
                .sum::<f64>()
                / total
        })
        .collect();
    let got = run(StrategyConfig::fedavg(), &rows, &weights).unwrap();
    close(&got.delta, &want, 1e-6);
    assert_eq!(got.updates, 9);
    assert_eq!(got.total_weight, total);
    // Arrival order does not matter.
    let mut rev_rows = rows.clone();
    rev_rows.reverse();
    let mut rev_w = weights.clone();
    rev_w.reverse();
    let again = run(StrategyConfig::fedavg(), &rev_rows, &rev_w).unwrap();
    close(&again.delta, &want, 1e-6);
}

#[test]
fn server_optimisers_follow_reddi_et_al() {
    let d = 5;
    let deltas = random_rows(4, d, 2);
    let x0: Vec<f32> = vec![0.5, -0.25, 0.0, 1.0, -1.0];
    type Ref = fn(&mut f64, f64, &mut f64, &mut f64);
    let cases: Vec<(ServerOptimizer, Ref, f64)> = vec![
        (
            ServerOptimizer::Sgd { lr: 0.7 },
            |x, d, _, _| *x += 0.7 * d,
            0.0,
        ),
        (
            ServerOptimizer::Momentum {
                lr: 0.5,
                momentum: 0.9,
            },
            |x, d, m, _| {
                *m = 0.9 * *m + d;
                *x += 0.5 * *m;
            },
            0.0,
        ),
        (
            ServerOptimizer::Adagrad {
                lr: 0.1,
                beta1: 0.9,
                tau: 0.01,
            },
            |x, d, m, v| {
                *m = 0.9 * *m + 0.1 * d;
                *v += d * d;
                *x += 0.1 * *m / (v.sqrt() + 0.01);
            },
            1e-4,
        ),
        (
            ServerOptimizer::Adam {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.01,
            },
            |x, d, m, v| {
                *m = 0.9 * *m + 0.1 * d;
                *v = 0.99 * *v + 0.01 * d * d;
                *x += 0.1 * *m / (v.sqrt() + 0.01);
            },
            1e-4,
        ),
        (
            ServerOptimizer::Yogi {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.01,
            },
            |x, d, m, v| {
                *m = 0.9 * *m + 0.1 * d;
                *v -= 0.01 * d * d * (*v - d * d).signum();
                *x += 0.1 * *m / (v.sqrt() + 0.01);
            },
            1e-4,
        ),
    ];
    for (opt, reference, v0) in cases {
        let cfg = StrategyConfig {
            server: opt,
            ..StrategyConfig::fedavg()
        };
        let mut server = cfg.server(d).unwrap();
        let mut x = x0.clone();
        let mut rx: Vec<f64> = x0.iter().map(|&v| f64::from(v)).collect();
        let (mut rm, mut rv) = (vec![0.0f64; d], vec![v0; d]);
        for delta in &deltas {
            server.apply(&Cpu, &mut x, delta).unwrap();
            for j in 0..d {
                reference(&mut rx[j], f64::from(delta[j]), &mut rm[j], &mut rv[j]);
            }
        }
        close(&x, &rx, 1e-5);
    }
}

#[test]
fn median_and_trimmed_mean_on_hand_made_cases() {
    let rows = vec![
        vec![1.0, 10.0, -3.0],
        vec![2.0, 20.0, 100.0],
        vec![3.0, -1000.0, -2.0],
        vec![4.0, 30.0, -1.0],
        vec![1000.0, 40.0, 0.0],
    ];
    let w = vec![1.0; 5];
    let med = run(StrategyConfig::fedavg().with_rule(Rule::Median), &rows, &w).unwrap();
    assert_eq!(med.delta, vec![3.0, 20.0, -1.0]);
    let even = run(
        StrategyConfig::fedavg().with_rule(Rule::Median),
        &rows[..4],
        &w[..4],
    )
    .unwrap();
    assert_eq!(even.delta, vec![2.5, 15.0, -1.5]);
    // β = 0.2 of 5 drops one value at each end.
    let tm = run(
        StrategyConfig::fedavg().with_rule(Rule::TrimmedMean { beta: 0.2 }),
        &rows,
        &w,
    )
    .unwrap();
    close(&tm.delta, &[3.0, 20.0, -1.0], 1e-6);
    let tm0 = run(
        StrategyConfig::fedavg().with_rule(Rule::TrimmedMean { beta: 0.0 }),
        &rows,
        &w,
    )
    .unwrap();
    close(&tm0.delta, &[202.0, -180.0, 18.8], 1e-6);
    // Weights do not matter to robust rules.
    let heavy = run(
        StrategyConfig::fedavg().with_rule(Rule::Median),
        &rows,
        &[100.0, 1.0, 1.0, 1.0, 1.0],
    )
    .unwrap();
    assert_eq!(heavy.delta, med.delta);
}

fn byzantine_setup() -> (Vec<Vec<f32>>, Vec<f64>) {
    // Seven honest updates around (1, 1), two attackers far away.
    let honest = [
        [1.0, 1.0],
        [1.1, 0.9],
        [0.9, 1.1],
        [1.05, 1.0],
        [0.95, 0.95],
        [1.0, 1.1],
        [1.2, 1.0],
    ];
    let mut rows: Vec<Vec<f32>> = honest.iter().map(|r| r.to_vec()).collect();
    rows.insert(2, vec![-50.0, 40.0]);
    rows.push(vec![30.0, 30.0]);
    let w = vec![1.0; rows.len()];
    (rows, w)
}

#[test]
fn krum_multi_krum_and_bulyan_reject_the_attackers() {
    let (rows, w) = byzantine_setup();
    let n = rows.len();
    // Krum scores by hand: each row's sum of squared distances to its n − f − 2 nearest.
    let f = 2;
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    rows[i]
                        .iter()
                        .zip(&rows[j])
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum()
                })
                .collect();
            d.sort_by(f64::total_cmp);
            d[..n - f - 2].iter().sum()
        })
        .collect();
    let best = (0..n)
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap();
    let krum = run(
        StrategyConfig::fedavg().with_rule(Rule::Krum { f }),
        &rows,
        &w,
    )
    .unwrap();
    assert_eq!(krum.selected, Some(vec![best]));
    assert_eq!(krum.delta, rows[best]);
    assert!(best != 2 && best != n - 1);

    let mk = run(
        StrategyConfig::fedavg().with_rule(Rule::MultiKrum { f, m: 5 }),
        &rows,
        &w,
    )
    .unwrap();
    let chosen = mk.selected.clone().unwrap();
    assert_eq!(chosen.len(), 5);
    assert!(!chosen.contains(&2) && !chosen.contains(&(n - 1)));
    let avg: Vec<f64> = (0..2)
        .map(|j| chosen.iter().map(|&i| f64::from(rows[i][j])).sum::<f64>() / 5.0)
        .collect();
    close(&mk.delta, &avg, 1e-6);

    // Bulyan with f = 1 needs n ≥ 7: nine rows, θ = 7 selected, β = 5 kept per coordinate.
    let bul = run(
        StrategyConfig::fedavg().with_rule(Rule::Bulyan { f: 1 }),
        &rows,
        &w,
    )
    .unwrap();
    let sel = bul.selected.clone().unwrap();
    assert_eq!(sel.len(), 7);
    assert!(
        bul.delta.iter().all(|v| (0.85..1.15).contains(v)),
        "{:?}",
        bul.delta
    );

    // The plain mean is dragged away by the attackers.
    let mean = run(StrategyConfig::fedavg(), &rows, &w).unwrap();
    assert!(mean.delta[0] < 0.0);
}

#[test]
fn robust_rules_refuse_too_few_updates() {
    let (rows, w) = byzantine_setup();
    let e = run(
        StrategyConfig::fedavg().with_rule(Rule::Krum { f: 3 }),
        &rows[..8],
        &w[..8],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooFew {
                needed: 9,
                got: 8,
                ..
            }
        ),
        "{e}"
    );
    let e = run(
        StrategyConfig::fedavg().with_rule(Rule::Bulyan { f: 2 }),
        &rows,
        &w,
    )
    .unwrap_err();
    assert!(matches!(e, Error::TooFew { needed: 11, .. }), "{e}");
    let agg = StrategyConfig::fedavg()
        .aggregator(admission(2), &Cpu)
        .unwrap();
    assert!(matches!(agg.finish(), Err(Error::TooFew { got: 0, .. })));
}

#[test]
fn bad_updates_are_rejected_and_change_nothing() {
    let cfg = StrategyConfig {
        max_norm: Some(10.0),
        ..StrategyConfig::fedavg()
    };
    let mut agg = cfg.aggregator(admission(3), &Cpu).unwrap();
    let good = [1.0f32, 2.0, 3.0];
    agg.add(&Update {
        fingerprint: fp(),
        values: &good,
        weight: 2.0,
    })
    .unwrap();
    let other = ModelSpec::LogReg {
        inputs: 3,
        classes: 2,
    }
    .layout()
    .fingerprint();
    let cases: Vec<(Update<'_>, &str)> = vec![
        (
            Update {
                fingerprint: other,
                values: &good,
                weight: 1.0,
            },
            "layout",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &good[..2],
                weight: 1.0,
            },
            "length",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &[1.0, f32::NAN, 0.0],
                weight: 1.0,
            },
            "non_finite",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &[f32::INFINITY, 0.0, 0.0],
                weight: 1.0,
            },
            "non_finite",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &[10.0, 10.0, 0.0],
                weight: 1.0,
            },
            "norm",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &good,
                weight: 0.0,
            },
            "weight",
        ),
        (
            Update {
                fingerprint: fp(),
                values: &good,
                weight: f64::NAN,
            },
            "weight",
        ),
    ];
    for (u, reason) in cases {
        let e = agg.add(&u).unwrap_err();
        assert_eq!(e.reason(), reason, "{e}");
    }
    assert_eq!(agg.accepted(), 1);
    assert_eq!(agg.total_weight(), 2.0);
    assert_eq!(agg.finish().unwrap().delta, good.to_vec());

    let nan = Update {
        fingerprint: fp(),
        values: &[f32::NAN, 0.0, 0.0],
        weight: 1.0,
    };
    assert!(matches!(
        cfg.aggregator(admission(3), &Cpu).unwrap().add(&nan),
        Err(Rejection::NonFinite { index: 0, .. })
    ));
}

#[test]
fn robust_buffers_are_bounded() {
    let cfg = StrategyConfig {
        max_buffered: 2,
        ..StrategyConfig::fedavg().with_rule(Rule::Median)
    };
    let mut agg = cfg.aggregator(admission(2), &Cpu).unwrap();
    let u = Update {
        fingerprint: fp(),
        values: &[1.0, 1.0],
        weight: 1.0,
    };
    agg.add(&u).unwrap();
    agg.add(&u).unwrap();
    assert_eq!(agg.add(&u), Err(Rejection::BufferFull { capacity: 2 }));
    assert_eq!(agg.accepted(), 2);
}

#[test]
fn invalid_configurations_are_named() {
    let bad = [
        (
            StrategyConfig::fedavg().with_rule(Rule::TrimmedMean { beta: 0.5 }),
            "beta",
        ),
        (StrategyConfig::fedadam(-1.0, 0.01), "lr"),
        (StrategyConfig::fedyogi(0.1, 0.0), "tau"),
        (
            StrategyConfig {
                max_norm: Some(f64::NAN),
                ..StrategyConfig::fedavg()
            },
            "max_norm",
        ),
        (
            StrategyConfig::fedavg().with_rule(Rule::MultiKrum { f: 1, m: 0 }),
            "Multi-Krum",
        ),
    ];
    for (cfg, word) in bad {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(word), "{e}");
    }
}

/// Five honest reports of norms 1 to 5 and weights 10 to 50, and one of
/// `f32::MAX` everywhere declaring a million examples, at `at`.
fn huge_report_at(at: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut rows: Vec<Vec<f32>> = (1..=5).map(|k| vec![k as f32 * 0.5; 4]).collect();
    let mut w: Vec<f64> = (1..=5).map(|k| 10.0 * f64::from(k)).collect();
    rows.insert(at, vec![f32::MAX; 4]);
    w.insert(at, 1e6);
    (rows, w)
}

#[test]
fn the_relative_bound_holds_a_huge_report_to_the_honest_medians() {
    // Limits from the first five: the lower median norm of {1..5} or of
    // {huge, 1..4} is 3 and the weight 30, so norms are cut to 9 and
    // weights to 120. The huge report becomes 4.5 per coordinate (norm 9),
    // counted with weight 120: (5·Σk² + 120·4.5) / (150 + 120) per coordinate.
    let expected = (5.0 * 55.0 + 120.0 * 4.5) / 270.0;
    for at in [0, 2, 5] {
        let (rows, w) = huge_report_at(at);
        let agg = run_as_given(bounded(), &rows, &w).unwrap();
        close(&agg.delta, &[expected; 4], 1e-6);
        assert_eq!(agg.bounded, 1, "at {at}");
        assert_eq!(agg.total_weight, 270.0);
        assert_eq!(
            agg.limits,
            Some(Limits {
                norm: 9.0,
                weight: 120.0
            })
        );
        // The next round's basis: medians of all six as they arrived
        // (norms 1..5 and huge: 3; weights 10..50 and 1e6: 30).
        assert_eq!(
            agg.basis,
            Some(Basis {
                norm: 3.0,
                weight: 30.0
            })
        );
        // Without the bound the same report takes the model.
        let raw = run(StrategyConfig::fedavg(), &rows, &w).unwrap();
        assert!(raw.delta.iter().all(|v| *v > 1e30), "{:?}", raw.delta);
        assert_eq!(raw.basis, None);
    }
}

/// A relative bound with limits from the first five reports, norms within
/// 3 and weights within 4 times their medians.
fn bounded() -> StrategyConfig {
    StrategyConfig {
        bound: Some(RelativeBound {
            warmup: 5,
            norm_factor: 3.0,
            weight_factor: 4.0,
        }),
        ..StrategyConfig::fedavg()
    }
}

#[test]
fn a_round_with_a_basis_bounds_from_its_first_report() {
    // The previous round's basis: norm 1, weight 10; limits 3 and 40.
    let basis = Some(Basis {
        norm: 1.0,
        weight: 10.0,
    });
    let mut agg = bounded()
        .aggregator(admission(4), &Cpu)
        .unwrap()
        .with_basis(basis);
    for (values, weight) in [([f32::MAX; 4], 1e6), ([0.5; 4], 10.0)] {
        agg.add(&Update {
            fingerprint: fp(),
            values: &values,
            weight,
        })
        .unwrap();
    }
    let agg = agg.finish().unwrap();
    // The huge one scaled to norm 3 (1.5 a coordinate), weight 40.
    close(&agg.delta, &[(40.0 * 1.5 + 10.0 * 0.5) / 50.0; 4], 1e-6);
    assert_eq!(agg.bounded, 1);
    // This round's lower medians (norm 1, weight 10) are within twice the
    // basis: the next round's basis. A round of huge reports only may raise
    // it at most twice.
    assert_eq!(agg.basis, basis);
    let mut hostile = bounded()
        .aggregator(admission(4), &Cpu)
        .unwrap()
        .with_basis(basis);
    for _ in 0..3 {
        hostile
            .add(&Update {
                fingerprint: fp(),
                values: &[f32::MAX; 4],
                weight: 1e6,
            })
            .unwrap();
    }
    assert_eq!(
        hostile.finish().unwrap().basis,
        Some(Basis {
            norm: 2.0,
            weight: 20.0
        })
    );
}

#[test]
fn the_relative_bound_with_fewer_reports_than_its_warmup() {
    // Two reports: limits from both (lower median norm 1, weight 1).
    let rows = vec![vec![1.0, 0.0], vec![0.0, 100.0]];
    let agg = run_as_given(bounded(), &rows, &[1.0, 1.0]).unwrap();
    close(&agg.delta, &[0.5, 1.5], 1e-6);
    assert_eq!(agg.bounded, 1);
    // One report: its own limits, taken as it is.
    let agg = run_as_given(bounded(), &rows[1..], &[7.0]).unwrap();
    assert_eq!(agg.delta, vec![0.0, 100.0]);
    assert_eq!(agg.bounded, 0);
}

#[test]
fn the_relative_bound_scales_buffered_rows_for_robust_rules() {
    let (rows, w) = huge_report_at(5);
    let cfg = bounded().with_rule(Rule::TrimmedMean { beta: 0.0 });
    let agg = run_as_given(cfg, &rows, &w).unwrap();
    // Unweighted: (0.5 + 1 + 1.5 + 2 + 2.5 + 4.5) / 6.
    close(&agg.delta, &[2.0; 4], 1e-6);
    assert_eq!(agg.bounded, 1);
}

#[test]
fn the_relative_bound_is_validated() {
    let cfg = StrategyConfig {
        bound: Some(RelativeBound {
            norm_factor: 0.5,
            ..RelativeBound::DEFAULT
        }),
        ..StrategyConfig::fedavg()
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("bound.norm_factor"), "{e}");
}

/// `check` then `add_checked` is `add`: the same aggregate to the bit under
/// the default strategy in steady state (relative bound and centred
/// clipping, with the previous round's basis and history), also when the
/// check was another aggregator's (measured again, against this one's
/// reference).
#[test]
fn a_checked_update_adds_as_add_does() {
    let rows = random_rows(14, 50, 9);
    let weights: Vec<f64> = (0..14).map(|i| 5.0 + i as f64).collect();
    let first = run_as_given(StrategyConfig::fedavg(), &rows[..6], &weights[..6]).unwrap();
    assert!(first.basis.is_some() && first.history.is_some());
    let fresh = || {
        StrategyConfig::fedavg()
            .aggregator(admission(50), &Cpu)
            .unwrap()
            .with_basis(first.basis)
            .with_history(first.history.clone())
    };
    let (mut by_add, mut by_check) = (fresh(), fresh());
    let other = StrategyConfig::fedavg()
        .aggregator(admission(50), &Cpu)
        .unwrap();
    for (i, (r, &w)) in rows[6..].iter().zip(&weights[6..]).enumerate() {
        // Some updates far off, so that the bound and the clipping act.
        let scaled: Vec<f32> = r
            .iter()
            .map(|v| v * if i % 3 == 0 { 9.0 } else { 1.0 })
            .collect();
        let u = Update {
            fingerprint: fp(),
            values: &scaled,
            weight: w,
        };
        by_add.add(&u).unwrap();
        let checked = if i % 2 == 0 {
            by_check.check(&u).unwrap()
        } else {
            other.check(&u).unwrap()
        };
        assert!((checked.norm() - fleet_aggregation::check::l2_norm(&scaled)).abs() < 1e-12);
        by_check.add_checked(checked).unwrap();
    }
    let (a, b) = (by_add.finish().unwrap(), by_check.finish().unwrap());
    assert!(a.recentred > 0 && a.bounded > 0, "{a:?}");
    assert_eq!(a, b);
}

/// A check says there is room in a robust rule's buffer; if other updates
/// fill it before the checked one is added, the add refuses it.
#[test]
fn a_checked_update_is_refused_when_the_buffer_filled_meanwhile() {
    let cfg = StrategyConfig {
        max_buffered: 1,
        bound: None,
        centred: None,
        ..StrategyConfig::fedavg().with_rule(Rule::Median)
    };
    let mut agg = cfg.aggregator(admission(3), &Cpu).unwrap();
    let (x, y) = ([1.0f32, 2.0, 3.0], [3.0f32, 2.0, 1.0]);
    let ux = Update {
        fingerprint: fp(),
        values: &x,
        weight: 1.0,
    };
    let uy = Update { values: &y, ..ux };
    let (cx, cy) = (agg.check(&ux).unwrap(), agg.check(&uy).unwrap());
    agg.add_checked(cx).unwrap();
    assert_eq!(
        agg.add_checked(cy).unwrap_err(),
        Rejection::BufferFull { capacity: 1 }
    );
    assert_eq!(agg.accepted(), 1);
}
