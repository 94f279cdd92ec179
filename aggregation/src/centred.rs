//! Centred clipping: each report's deviation from the fleet's recent
//! direction is bounded.
//!
//! A [`RelativeBound`](crate::RelativeBound) keeps every report within a
//! multiple of the typical norm, but a hostile device that sends the same
//! direction every round still moves the model by up to that norm, in that
//! direction, each time it is selected: honest updates point in changing
//! directions and partly cancel, the hostile ones add up.
//!
//! Centred clipping (Karimireddy, He and Jaggi, "Learning from History for
//! Byzantine Robust Optimization", ICML 2021) clips each report's
//! *deviation from a reference* rather than its norm:
//!
//! ```text
//! yᵢ = r + cᵢ·(xᵢ − r),   cᵢ = min(1, τ / ‖xᵢ − r‖)
//! ```
//!
//! and aggregates the `yᵢ` as the rule would the `xᵢ`. The reference `r`
//! is the history: the previous round's combined delta (the paper's
//! server-side momentum; in federated rounds, the direction the fleet took
//! last). The radius `τ` is `radius_factor` times a [`History`] radius:
//! the lower median of the previous round's deviations `‖xᵢ − r‖` (each
//! report as the relative bound left it, against that round's reference),
//! risen at most [`CentredClip::MAX_GROWTH`] times from the radius before
//! it (it may fall freely; from zero it takes the median as it is). A round without a history (the first) clips
//! nothing beyond the relative bound, and measures its deviations from a
//! zero reference (its reports' norms).
//!
//! Robustness: a hostile report moves the round's mean by at most
//! `τ · weight / Σ weights` away from the reference, whatever it sends, and
//! `τ` is an honest report's deviation as long as hostile reports are
//! fewer than half of the previous round's. Honest reports close to the
//! fleet's direction are left as they are; with a deviation above the
//! radius they are pulled towards the reference, not dropped.
//!
//! Memory: the reference (`4·d` bytes) and one deviation a report (8
//! bytes); the mean still streams: `Σ wᵢ·yᵢ = Σ wᵢcᵢ·xᵢ + (Σ wᵢ(1 − cᵢ))·r`,
//! one running sum and one scalar. Determinism: the reference and the
//! radius are fixed for the round, so each report's clip depends only on
//! the report; a coordinator that resumes a round with the same
//! [`History`] and re-adds the stored reports in their arrival order
//! reaches the same result. The history is carried from round to round
//! like the relative bound's basis ([`Aggregator::with_history`],
//! [`Aggregate::history`]) and must be stored with the task to resume a
//! round.
//!
//! [`Aggregator::with_history`]: crate::Aggregator::with_history
//! [`Aggregate::history`]: crate::Aggregate::history

use serde::{Deserialize, Serialize};

use crate::error::{Result, config};

/// Settings of centred clipping; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CentredClip {
    /// The radius is this times the history's radius (the previous round's
    /// lower median deviation), a finite number > 0.
    pub radius_factor: f64,
}

impl Default for CentredClip {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl CentredClip {
    /// The default of new tasks: deviations within the previous round's
    /// lower median deviation.
    pub const DEFAULT: Self = Self { radius_factor: 1.0 };

    /// Most the history's radius may rise from one round to the next (a factor).
    pub const MAX_GROWTH: f64 = 2.0;

    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        let v = self.radius_factor;
        if !(v.is_finite() && v > 0.0) {
            return Err(config(
                "centred.radius_factor",
                format!("{v} must be a finite number > 0"),
            ));
        }
        Ok(())
    }

    /// The clipping radius of a round with history `h`.
    pub fn radius(&self, h: &History) -> f64 {
        self.radius_factor * h.radius
    }
}

/// What centred clipping carries from one round to the next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// The reference: the previous round's combined delta.
    pub reference: Vec<f32>,
    /// The previous round's lower median deviation from its own reference,
    /// risen at most [`CentredClip::MAX_GROWTH`] times from the radius before.
    pub radius: f64,
}

impl History {
    /// Whether the history fits a model of `len` parameters: a reference of
    /// that length, finite, and a finite radius not negative (a stored
    /// history is checked with this before it is used).
    pub fn is_valid(&self, len: usize) -> bool {
        self.reference.len() == len
            && self.reference.iter().all(|v| v.is_finite())
            && self.radius.is_finite()
            && self.radius >= 0.0
    }

    /// The history a round leaves: its combined `delta` as the reference,
    /// and the lower median of its `deviations`, risen at most
    /// [`CentredClip::MAX_GROWTH`] times from `previous` (the radius of the
    /// round's own history, if it had one and it was not 0: a zero radius
    /// is not a limit to grow from). None without deviations or with a
    /// non-finite delta.
    pub fn next(delta: &[f32], deviations: &[f64], previous: Option<f64>) -> Option<History> {
        let median = crate::bound::lower_median(deviations)?;
        let radius = match previous {
            Some(p) if p > 0.0 => median.min(CentredClip::MAX_GROWTH * p),
            _ => median,
        };
        let h = History {
            reference: delta.to_vec(),
            radius,
        };
        h.is_valid(delta.len()).then_some(h)
    }
}

/// The clip of one report of a round with reference `reference` and radius
/// `radius`: the report is `scale · values` (the relative bound's scale);
/// returns its deviation `‖scale·values − reference‖` and the factor `c` its
/// deviation is multiplied by (at most 1).
pub fn clip(values: &[f32], scale: f64, reference: &[f32], radius: f64) -> (f64, f64) {
    let deviation = crate::kernels::par_scaled_squared_distance(values, scale, reference).sqrt();
    factor(deviation, radius)
}

/// A report's deviation `deviation` and the factor centred clipping
/// multiplies it by: 1 within `radius`, `radius / deviation` beyond.
pub fn factor(deviation: f64, radius: f64) -> (f64, f64) {
    let c = if deviation > radius {
        radius / deviation
    } else {
        1.0
    };
    (deviation, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Admission, Aggregate, Basis, Cpu, RelativeBound, Rule, StrategyConfig, Update};
    use fleet_models::{LayoutFingerprint, ModelSpec};

    fn fp() -> LayoutFingerprint {
        ModelSpec::LogReg {
            inputs: 2,
            classes: 2,
        }
        .layout()
        .fingerprint()
    }

    /// FedAvg with the default bound (norms within 2, weights within 1
    /// times the basis) and centred clipping of radius factor 1.
    fn strategy(centred: Option<CentredClip>) -> StrategyConfig {
        StrategyConfig {
            centred,
            ..StrategyConfig::fedavg()
        }
    }

    /// One round of `reports` (values, weight) under `cfg`, with the
    /// previous round's `basis` and `history`.
    fn round(
        cfg: StrategyConfig,
        basis: Option<Basis>,
        history: Option<History>,
        reports: &[(Vec<f32>, f64)],
    ) -> Aggregate {
        let admission = Admission {
            fingerprint: fp(),
            len: reports[0].0.len(),
            max_norm: None,
        };
        let mut agg = cfg
            .aggregator(admission, &Cpu)
            .unwrap()
            .with_basis(basis)
            .with_history(history);
        for (values, weight) in reports {
            agg.add(&Update {
                fingerprint: fp(),
                values,
                weight: *weight,
            })
            .unwrap();
        }
        agg.finish().unwrap()
    }

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (f64::from(*x) - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "coordinate {i}: {x} vs {y} ({a:?})"
            );
        }
    }

    const BASIS: Option<Basis> = Some(Basis {
        norm: 10.0,
        weight: 100.0,
    });

    #[test]
    fn the_streaming_mean_clips_each_deviation_from_the_reference() {
        // Reference (1, 0), radius 1. Report 1 (1, 0.5), weight 30:
        // deviation 0.5, kept. Report 2 (4, 4), weight 10: deviation
        // (3, 4), norm 5, clipped to (1, 0) + 0.2·(3, 4) = (1.6, 0.8).
        // Mean: (30·(1, 0.5) + 10·(1.6, 0.8)) / 40 = (1.15, 0.575).
        let history = History {
            reference: vec![1.0, 0.0],
            radius: 1.0,
        };
        let reports = [(vec![1.0, 0.5], 30.0), (vec![4.0, 4.0], 10.0)];
        let agg = round(
            strategy(Some(CentredClip::DEFAULT)),
            BASIS,
            Some(history.clone()),
            &reports,
        );
        close(&agg.delta, &[1.15, 0.575]);
        assert_eq!(agg.recentred, 1);
        assert_eq!(agg.bounded, 0);
        assert_eq!(agg.total_weight, 40.0);
        // The next history: this delta, and the lower median of the
        // deviations 0.5 and 5.
        let next = agg.history.expect("a history for the next round");
        assert_eq!(next.reference, agg.delta);
        assert_eq!(next.radius, 0.5);

        // Radius factor 2: report 2 is clipped to (1, 0) + 0.4·(3, 4) =
        // (2.2, 1.6); mean (30 + 22, 15 + 16) / 40 = (1.3, 0.775).
        let agg = round(
            strategy(Some(CentredClip { radius_factor: 2.0 })),
            BASIS,
            Some(history),
            &reports,
        );
        close(&agg.delta, &[1.3, 0.775]);
    }

    #[test]
    fn centred_clipping_applies_after_the_relative_bound() {
        // Basis norm 1, weight 1: limits 2 and 1. The report (30, 40) is
        // scaled to (1.2, 1.6) and counts with weight 1; against the
        // reference (0, 2) its deviation is (1.2, −0.4), norm √1.6, clipped
        // to radius 0.5: (0, 2) + 0.5/√1.6·(1.2, −0.4).
        let basis = Some(Basis {
            norm: 1.0,
            weight: 1.0,
        });
        let history = History {
            reference: vec![0.0, 2.0],
            radius: 0.5,
        };
        let agg = round(
            strategy(Some(CentredClip::DEFAULT)),
            basis,
            Some(history),
            &[(vec![30.0, 40.0], 1e6)],
        );
        let k = 0.5 / 1.6f64.sqrt();
        close(&agg.delta, &[1.2 * k, 2.0 - 0.4 * k]);
        assert_eq!((agg.bounded, agg.recentred), (1, 1));
        assert_eq!(agg.total_weight, 1.0);
        // The next radius: the deviation √1.6, at most twice 0.5.
        assert_eq!(agg.history.unwrap().radius, 1.0);
    }

    #[test]
    fn a_same_direction_attacker_is_held_to_the_radius_where_the_bound_lets_it_pull() {
        // Three honest reports g = (0.5, −0.5, 0.5, −0.5) (norm 1), weight
        // 1, and one hostile: f32::MAX everywhere, 10⁶ examples. Basis norm
        // 1, weight 1: the bound scales the hostile report to (1, 1, 1, 1)
        // (norm 2) with weight 1.
        let g = [0.5f32, -0.5, 0.5, -0.5];
        let reports = [
            (g.to_vec(), 1.0),
            (vec![f32::MAX; 4], 1e6),
            (g.to_vec(), 1.0),
            (g.to_vec(), 1.0),
        ];
        let basis = Some(Basis {
            norm: 1.0,
            weight: 1.0,
        });
        // The plain bound: (3g + (1, 1, 1, 1)) / 4, a pull of
        // (0.125, 0.375, 0.125, 0.375) away from g, norm √0.3125 ≈ 0.56.
        let plain = round(strategy(None), basis, None, &reports);
        close(&plain.delta, &[0.625, -0.125, 0.625, -0.125]);
        assert_eq!(plain.history, None);
        // Centred on the previous round's delta g, radius 0.1 (the honest
        // reports did not deviate more): the hostile deviation
        // (0.5, 1.5, 0.5, 1.5), norm √5, is clipped to 0.1, and the pull is
        // 0.1 / 4 = 0.025 in its direction.
        let history = History {
            reference: g.to_vec(),
            radius: 0.1,
        };
        let centred = round(
            strategy(Some(CentredClip::DEFAULT)),
            basis,
            Some(history),
            &reports,
        );
        let k = 0.025 / 5f64.sqrt();
        close(
            &centred.delta,
            &[0.5 + 0.5 * k, -0.5 + 1.5 * k, 0.5 + 0.5 * k, -0.5 + 1.5 * k],
        );
        let pull = |d: &[f32]| {
            d.iter()
                .zip(&g)
                .map(|(&a, &b)| f64::from(a - b).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        assert!((pull(&plain.delta) - 0.3125f64.sqrt()).abs() < 1e-6);
        assert!((pull(&centred.delta) - 0.025).abs() < 1e-6);
        assert_eq!(centred.recentred, 1);
        // The hostile report did not raise the next radius: the lower
        // median of the deviations 0, √5, 0, 0 is an honest one.
        assert_eq!(centred.history.unwrap().radius, 0.0);
    }

    #[test]
    fn over_rounds_the_attacker_pulls_less_than_under_the_plain_bound() {
        // Honest reports g ± e (norm √1.04) agree on g and differ by e;
        // one hostile report in four sends f32::MAX. Under the plain bound
        // (basis: the lower median norm √1.04, limit 2·√1.04) the hostile
        // report counts as √1.04·(1, 1, 1, 1), and each round's delta moves
        // √1.04 / 4 · 2 along (1, 1, 1, 1)/2 (the honest parts add nothing
        // along it). Centred clipping holds the hostile deviation from the
        // previous delta to the radius, which follows the honest deviations
        // (about ‖e‖ = 0.2).
        let g = [0.5f32, -0.5, 0.5, -0.5];
        let e = [0.1f32, 0.1, -0.1, -0.1];
        let plus: Vec<f32> = g.iter().zip(&e).map(|(a, b)| a + b).collect();
        let minus: Vec<f32> = g.iter().zip(&e).map(|(a, b)| a - b).collect();
        let mut drift = [0.0f64; 2];
        let mut last = [0.0f64; 2];
        for (k, centred) in [None, Some(CentredClip::DEFAULT)].into_iter().enumerate() {
            let cfg = strategy(centred);
            let mut basis = None;
            let mut history = None;
            for r in 0..20 {
                let (a, b) = if r % 2 == 0 {
                    (&plus, &minus)
                } else {
                    (&minus, &plus)
                };
                let reports = [
                    (a.clone(), 1.0),
                    (b.clone(), 1.0),
                    (vec![f32::MAX; 4], 1e6),
                    (a.clone(), 1.0),
                ];
                let agg = round(cfg, basis, history.take(), &reports);
                basis = agg.basis;
                history = agg.history;
                last[k] = agg.delta.iter().map(|&v| f64::from(v)).sum::<f64>() / 2.0;
                drift[k] += last[k];
            }
        }
        assert!(
            (drift[0] - 20.0 * 1.04f64.sqrt() / 2.0).abs() < 1e-4,
            "{drift:?}"
        );
        assert!((last[0] - 1.04f64.sqrt() / 2.0).abs() < 1e-6, "{last:?}");
        // About four times less in all (2.56 against 10.2), over six times
        // less a round at the end.
        assert!(drift[1] < 0.26 * drift[0], "{drift:?}");
        assert!(last[1] < last[0] / 6.0, "{last:?}");
    }

    #[test]
    fn buffered_rules_take_the_recentred_rows() {
        // The coordinate-wise median of (0, 0), (1, 1) recentred on (0, 0)
        // with radius 0.5·√2... radius 1: (1, 1) has deviation √2, is
        // clipped to (1/√2, 1/√2); and (3, 3) to the same. Median of the
        // three rows: 1/√2.
        let history = History {
            reference: vec![0.0, 0.0],
            radius: 1.0,
        };
        let agg = round(
            strategy(Some(CentredClip::DEFAULT)).with_rule(Rule::Median),
            BASIS,
            Some(history),
            &[
                (vec![0.0, 0.0], 1.0),
                (vec![1.0, 1.0], 1.0),
                (vec![3.0, 3.0], 1.0),
            ],
        );
        let h = std::f64::consts::FRAC_1_SQRT_2;
        close(&agg.delta, &[h, h]);
        assert_eq!(agg.recentred, 2);
    }

    #[test]
    fn a_first_round_clips_nothing_and_measures_deviations_from_zero() {
        // No history: the bound alone (basis norm 10: limit 20, nothing
        // scaled); the next radius is the lower median of the norms 1, 5, 2.
        let agg = round(
            strategy(Some(CentredClip::DEFAULT)),
            BASIS,
            None,
            &[
                (vec![1.0, 0.0], 1.0),
                (vec![3.0, 4.0], 1.0),
                (vec![0.0, 2.0], 1.0),
            ],
        );
        close(&agg.delta, &[4.0 / 3.0, 2.0]);
        assert_eq!(agg.recentred, 0);
        let h = agg.history.unwrap();
        assert_eq!(h.radius, 2.0);
        assert_eq!(h.reference, agg.delta);
        // A history that does not fit the model is ignored: the same
        // result as without one.
        let misfit = History {
            reference: vec![0.0; 3],
            radius: 0.0,
        };
        let again = round(
            strategy(Some(CentredClip::DEFAULT)),
            BASIS,
            Some(misfit),
            &[
                (vec![1.0, 0.0], 1.0),
                (vec![3.0, 4.0], 1.0),
                (vec![0.0, 2.0], 1.0),
            ],
        );
        assert_eq!(again.delta, agg.delta);
    }

    #[test]
    fn a_stored_history_reaches_the_same_result_bit_for_bit() {
        let history = History {
            reference: vec![0.1, -0.2, 0.3],
            radius: 0.25,
        };
        // Stored and read back, as a coordinator would keep it.
        let stored = serde_json::to_string(&history).unwrap();
        let restored: History = serde_json::from_str(&stored).unwrap();
        assert_eq!(restored, history);
        let reports: Vec<(Vec<f32>, f64)> = (0..7)
            .map(|i| {
                let x = i as f32;
                (
                    vec![0.1 * x, -0.3 + 0.05 * x, 1.0 - 0.2 * x],
                    10.0 + f64::from(x),
                )
            })
            .collect();
        let cfg = strategy(Some(CentredClip::DEFAULT));
        let a = round(cfg, BASIS, Some(history), &reports);
        let b = round(cfg, BASIS, Some(restored), &reports);
        assert_eq!(a, b);
        assert!(a.recentred > 0);
    }

    #[test]
    fn the_strategy_refuses_centred_clipping_without_the_bound_or_with_a_bad_factor() {
        let e = StrategyConfig {
            bound: None,
            ..strategy(Some(CentredClip::DEFAULT))
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("centred"), "{e}");
        let e = strategy(Some(CentredClip { radius_factor: 0.0 }))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("centred.radius_factor"), "{e}");
        assert!(strategy(Some(CentredClip::DEFAULT)).validate().is_ok());
        assert!(
            StrategyConfig {
                bound: Some(RelativeBound::DEFAULT),
                ..strategy(None)
            }
            .validate()
            .is_ok()
        );
        // New tasks get it; definitions stored without the field do not.
        assert_eq!(StrategyConfig::fedavg().centred, Some(CentredClip::DEFAULT));
        let mut old = serde_json::to_value(StrategyConfig::fedavg()).unwrap();
        old.as_object_mut().unwrap().remove("centred");
        let old: StrategyConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.centred, None);
    }

    #[test]
    fn clip_measures_the_deviation_of_the_scaled_report_and_shrinks_it_to_the_radius() {
        // 0.5·(8, 6) − (1, 0) = (3, 3): deviation √18; radius 3.
        let (dev, c) = clip(&[8.0, 6.0], 0.5, &[1.0, 0.0], 3.0);
        assert!((dev - 18f64.sqrt()).abs() < 1e-12);
        assert!((c - 3.0 / 18f64.sqrt()).abs() < 1e-12);
        // Within the radius: left as it is.
        assert_eq!(clip(&[1.0, 2.0], 1.0, &[1.0, 0.0], 3.0), (2.0, 1.0));
        // On the reference: deviation 0, nothing to clip.
        assert_eq!(clip(&[1.0, 0.0], 1.0, &[1.0, 0.0], 0.0), (0.0, 1.0));
    }

    #[test]
    fn the_next_history_is_the_delta_and_the_lower_median_deviation_capped() {
        let h = History::next(&[0.5, -1.0], &[3.0, 100.0, 1.0, 2.0], None).unwrap();
        assert_eq!(h.reference, vec![0.5, -1.0]);
        assert_eq!(h.radius, 2.0);
        // At most twice the previous radius; falls freely.
        let h = History::next(&[0.0], &[9.0, 10.0, 11.0], Some(4.0)).unwrap();
        assert_eq!(h.radius, 8.0);
        let h = History::next(&[0.0], &[1.0], Some(4.0)).unwrap();
        assert_eq!(h.radius, 1.0);
        // From a zero radius, the median as it is.
        let h = History::next(&[0.0], &[3.0], Some(0.0)).unwrap();
        assert_eq!(h.radius, 3.0);
        assert_eq!(History::next(&[0.0], &[], None), None);
        assert_eq!(History::next(&[f32::INFINITY], &[1.0], None), None);
    }

    #[test]
    fn a_history_fits_only_its_model() {
        let h = History {
            reference: vec![1.0, 2.0],
            radius: 0.5,
        };
        assert!(h.is_valid(2));
        assert!(!h.is_valid(3));
        for bad in [
            History {
                reference: vec![f32::NAN, 0.0],
                ..h.clone()
            },
            History {
                radius: -1.0,
                ..h.clone()
            },
            History {
                radius: f64::INFINITY,
                ..h.clone()
            },
        ] {
            assert!(!bad.is_valid(2), "{bad:?}");
        }
    }

    #[test]
    fn validate_refuses_a_radius_that_would_not_clip_or_would_drop_everything() {
        assert!(CentredClip::DEFAULT.validate().is_ok());
        assert!(
            CentredClip {
                radius_factor: 0.25
            }
            .validate()
            .is_ok()
        );
        for v in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(CentredClip { radius_factor: v }.validate().is_err(), "{v}");
        }
        assert_eq!(CentredClip::default(), CentredClip::DEFAULT);
        assert_eq!(
            CentredClip { radius_factor: 3.0 }.radius(&History {
                reference: vec![],
                radius: 0.5
            }),
            1.5
        );
    }
}
