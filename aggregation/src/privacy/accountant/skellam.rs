//! Rényi DP of the (distributed) multi-dimensional Skellam mechanism.
//!
//! Each device adds `Poisson(λ) − Poisson(λ)` to every coordinate of its
//! clipped, rotated, integer-quantised update; the sum over the devices then
//! carries `Sk(μ) = Poisson(μ) − Poisson(μ)` per coordinate with `μ = Σλ`,
//! independently across coordinates (variance `2μ` a coordinate). Removing or
//! adding one device changes the integer sum by a vector `Δ ∈ ℤ^d` with
//! `‖Δ‖₁ ≤ Δ₁` and `‖Δ‖₂ ≤ Δ₂`.
//!
//! # The bound
//!
//! Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
//! Federated Learning", NeurIPS 2021 (arXiv:2110.04995), Theorem 3.5: for
//! every **integer** order `α > 1`, the mechanism is `(α, ε(α))`-RDP with
//!
//! ```text
//! ε(α) ≤ α·Δ₂²/(2V) + min( ((2α−1)·Δ₂² + 6·Δ₁)/(4V²), 3·Δ₁/(2V) )
//! ```
//!
//! where `V` is the per-coordinate variance of the noise (the paper's `μ`:
//! its `Sk` has mass `e^{−V}·I_k(V)`, two Poissons of mean `V/2`). This is
//! the form in the authors' accounting code
//! (`google-research/federated`, `distributed_dp/accounting_utils.py`,
//! `_skellam_rdp` at scale 1). Here [`Skellam::mu`] is the mean of each
//! Poisson, `V = 2μ`, so
//!
//! ```text
//! ε(α) ≤ α·Δ₂²/(4μ) + min( ((2α−1)·Δ₂² + 6·Δ₁)/(16μ²), 3·Δ₁/(4μ) ).
//! ```
//!
//! The first term is the Gaussian mechanism's `α·Δ₂²/(2σ²)` at `σ² = 2μ`;
//! the `min` is the price of the discrete noise and vanishes relative to it
//! as `μ → ∞`. The bound grows with `Δ₁` and `Δ₂` and shrinks with `μ`, so
//! any upper bounds on the sensitivities may be used.
//!
//! # Orders
//!
//! [`Skellam::rdp`] gives the theorem's value and refuses orders it does not
//! cover (non-integer, `≤ 1`, not finite). [`Skellam::rdp_curve`] accepts any
//! order grid valid for [`super::rdp::epsilon_from_rdp`]: a fractional order
//! `α` is charged the theorem's value at `⌈α⌉`, a valid upper bound because
//! Rényi divergence is non-decreasing in its order.
//!
//! # Units
//!
//! `Δ₁`, `Δ₂` are in units of the integer lattice the noise is added on
//! (after scaling and conditional randomised rounding), `μ` is a count in
//! the same units (the Poisson mean), and `ε(α)` is in nats for one round.
//! Rounds compose by adding their RDP curves; the curve is the mechanism's
//! with every device in the sum (no amplification by sampling is claimed).

use serde::{Deserialize, Serialize};

use super::rdp::validate_orders;
use super::{AccountantError, Result, check_rounds};

/// One round of the Skellam mechanism on an integer sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Skellam {
    /// L1 sensitivity bound `Δ₁` of the integer sum (finite, `> 0`,
    /// `>= l2`).
    pub l1: f64,
    /// L2 sensitivity bound `Δ₂` of the integer sum (finite, `> 0`).
    pub l2: f64,
    /// Mean `μ` of each of the two Poissons of the total noise, per
    /// coordinate (finite, `> 0`); the noise variance is `2μ`.
    pub mu: f64,
}

impl Skellam {
    /// Builds a validated mechanism description.
    pub fn new(l1: f64, l2: f64, mu: f64) -> Result<Self> {
        let s = Self { l1, l2, mu };
        s.validate()?;
        Ok(s)
    }

    /// Checks that `l1`, `l2` and `mu` are finite and `> 0`, and that
    /// `l1 >= l2`.
    ///
    /// Every vector has `‖Δ‖₂ ≤ ‖Δ‖₁`, so `l1 < l2` can only come from a
    /// mistake (most likely the two swapped, which would under-charge the
    /// L1 term) and is refused. `l1 <= l2²`, which also holds for integer
    /// vectors, is not required: a larger `l1` is a valid, looser bound.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("l1", self.l1), ("l2", self.l2), ("mu", self.mu)] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(AccountantError::InvalidParameter {
                    name,
                    value,
                    allowed: "a finite number > 0",
                });
            }
        }
        if self.l1 < self.l2 {
            return Err(AccountantError::InvalidParameter {
                name: "l1",
                value: self.l1,
                allowed: ">= l2 (an L1 norm is at least the L2 norm)",
            });
        }
        Ok(())
    }

    /// RDP at the integer order `alpha > 1` of one round (Theorem 3.5 of
    /// Agarwal et al. 2021; see the module documentation). Non-integer
    /// orders, orders `<= 1` and non-finite orders are errors: the theorem
    /// does not state them. May be `+∞` for extreme parameters.
    pub fn rdp(&self, alpha: f64) -> Result<f64> {
        self.validate()?;
        if !(alpha > 1.0 && alpha.is_finite() && alpha.fract() == 0.0) {
            return Err(AccountantError::InvalidParameter {
                name: "order",
                value: alpha,
                allowed: "an integer > 1 (the Skellam bound holds for integer orders)",
            });
        }
        Ok(self.rdp_unchecked(alpha))
    }

    /// RDP curve of one round on `orders` (each finite and `> 1`, as for
    /// [`super::rdp::epsilon_from_rdp`]). An integer order gets
    /// [`Skellam::rdp`]; a fractional order `α` gets the value at `⌈α⌉`,
    /// an upper bound since RDP is non-decreasing in the order.
    pub fn rdp_curve(&self, orders: &[f64]) -> Result<Vec<f64>> {
        self.validate()?;
        validate_orders(orders)?;
        Ok(orders
            .iter()
            .map(|&a| self.rdp_unchecked(a.ceil()))
            .collect())
    }

    /// The bound at an integer order `a >= 2`, for validated parameters.
    fn rdp_unchecked(&self, a: f64) -> f64 {
        let (l1, l2, mu) = (self.l1, self.l2, self.mu);
        let l2sq = l2 * l2;
        let gaussian = a * l2sq / (4.0 * mu);
        // Divided by μ twice rather than by μ², which could overflow.
        let second_order = ((2.0 * a - 1.0) * l2sq + 6.0 * l1) / (16.0 * mu) / mu;
        let first_order = 3.0 * l1 / (4.0 * mu);
        gaussian + second_order.min(first_order)
    }
}

/// RDP curve of `rounds` rounds of `sk` on `orders` (`rounds ×` the
/// per-round [`Skellam::rdp_curve`]), to be summed with other curves on the
/// same orders and converted with [`super::rdp::epsilon_from_rdp`].
pub fn compute_rdp_skellam(sk: &Skellam, rounds: u64, orders: &[f64]) -> Result<Vec<f64>> {
    check_rounds(rounds)?;
    let t = rounds as f64;
    Ok(sk.rdp_curve(orders)?.into_iter().map(|r| r * t).collect())
}

#[cfg(test)]
mod tests {
    use super::super::rdp::default_orders;
    use super::*;

    /// `ln P(k)` for `k = 0..=kmax` of `Poisson(μ) − Poisson(μ)` (symmetric
    /// in `k`): `P(k) = e^{−2μ} Σ_j μ^{2j+k} / (j! (j+k)!)`, summed in log
    /// space.
    fn skellam_log_pmf(mu: f64, kmax: usize) -> Vec<f64> {
        let jmax = (mu + 40.0 * mu.sqrt() + 100.0) as usize;
        let mut ln_fact = vec![0.0f64; jmax + kmax + 2];
        for i in 1..ln_fact.len() {
            ln_fact[i] = ln_fact[i - 1] + (i as f64).ln();
        }
        let ln_mu = mu.ln();
        (0..=kmax)
            .map(|k| {
                let terms: Vec<f64> = (0..=jmax)
                    .map(|j| (2 * j + k) as f64 * ln_mu - ln_fact[j] - ln_fact[j + k])
                    .collect();
                -2.0 * mu + log_sum_exp(&terms)
            })
            .collect()
    }

    fn log_sum_exp(xs: &[f64]) -> f64 {
        let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    }

    /// Exact `D_α(Sk(μ) + Δ ‖ Sk(μ))` from a table of `ln P(|k|)`, with
    /// a check that the truncated tails are negligible.
    fn exact_renyi(log_pmf: &[f64], shift: i64, alpha: f64) -> f64 {
        let kmax = log_pmf.len() as i64 - 1;
        let lp = |k: i64| log_pmf[k.unsigned_abs() as usize];
        let terms: Vec<f64> = (-kmax + shift..=kmax)
            .map(|k| alpha * lp(k - shift) + (1.0 - alpha) * lp(k))
            .collect();
        let log_s = log_sum_exp(&terms);
        let edge = terms[0].max(terms[terms.len() - 1]);
        assert!(edge - log_s < -60.0, "grid too short: {edge} vs {log_s}");
        log_s / (alpha - 1.0)
    }

    #[test]
    fn skellam_bound_is_above_the_exact_divergence_and_tight_for_large_mu() {
        for (mu, kmax) in [(5.0, 400), (50.0, 600), (500.0, 1500)] {
            let log_pmf = skellam_log_pmf(mu, kmax);
            // The table is a distribution.
            let mass: f64 = log_pmf.iter().map(|l| 2.0 * l.exp()).sum::<f64>() - log_pmf[0].exp();
            assert!((mass - 1.0).abs() < 1e-9, "mu {mu}: mass {mass}");
            for shift in [1i64, 2, 5] {
                let d = shift as f64;
                let sk = Skellam::new(d, d, mu).unwrap();
                for a in 2..=32 {
                    let alpha = f64::from(a);
                    let exact = exact_renyi(&log_pmf, shift, alpha);
                    let bound = sk.rdp(alpha).unwrap();
                    assert!(
                        bound >= exact,
                        "mu {mu} shift {shift} alpha {a}: bound {bound} < exact {exact}"
                    );
                    if mu >= 500.0 {
                        assert!(
                            bound <= 1.02 * exact,
                            "mu {mu} shift {shift} alpha {a}: bound {bound} vs exact {exact}"
                        );
                    }
                }
                // Fractional orders on a grid are charged at ⌈α⌉, which
                // stays above the exact divergence at α.
                let orders = [1.1, 1.5, 2.5, 7.3, 12.0];
                let curve = sk.rdp_curve(&orders).unwrap();
                for (&alpha, &r) in orders.iter().zip(&curve) {
                    assert_eq!(r, sk.rdp(alpha.ceil()).unwrap());
                    let exact = exact_renyi(&log_pmf, shift, alpha);
                    assert!(r >= exact, "mu {mu} shift {shift} alpha {alpha}");
                }
            }
        }
    }

    #[test]
    fn skellam_bound_covers_a_two_dimensional_shift() {
        // Independent coordinates: the divergence of Δ = (2, 3) is the sum
        // of the coordinates' divergences; Δ₁ = 5, Δ₂ = √13.
        let mu = 20.0;
        let log_pmf = skellam_log_pmf(mu, 500);
        let sk = Skellam::new(5.0, 13f64.sqrt(), mu).unwrap();
        for a in 2..=32 {
            let alpha = f64::from(a);
            let exact = exact_renyi(&log_pmf, 2, alpha) + exact_renyi(&log_pmf, 3, alpha);
            let bound = sk.rdp(alpha).unwrap();
            assert!(bound >= exact, "alpha {a}: bound {bound} < exact {exact}");
        }
    }

    #[test]
    fn skellam_bound_approaches_the_gaussian_for_large_mu() {
        let (l1, l2) = (40.0, 6.0);
        for a in [2.0, 8.0, 32.0, 63.0] {
            let mut last_excess = f64::INFINITY;
            for mu in [1e2, 1e4, 1e6, 1e8] {
                let sk = Skellam::new(l1, l2, mu).unwrap();
                // σ² = 2μ.
                let gaussian = a * l2 * l2 / (2.0 * (2.0 * mu));
                let bound = sk.rdp(a).unwrap();
                let excess = bound / gaussian - 1.0;
                assert!(excess >= 0.0, "alpha {a} mu {mu}");
                assert!(excess < last_excess, "alpha {a} mu {mu}");
                last_excess = excess;
            }
            // Relative excess ~ (2α−1)Δ₂²+6Δ₁ over 4αμΔ₂² at μ = 1e8.
            assert!(last_excess < 1e-7, "alpha {a}: {last_excess}");
        }
    }

    #[test]
    fn skellam_bad_parameters_are_errors() {
        let good = Skellam::new(2.0, 1.0, 10.0).unwrap();
        for bad in [f64::NAN, 0.0, -1.0, f64::INFINITY, f64::NEG_INFINITY] {
            for sk in [
                Skellam { l1: bad, ..good },
                Skellam { l2: bad, ..good },
                Skellam { mu: bad, ..good },
            ] {
                assert!(sk.validate().is_err(), "{sk:?}");
                assert!(sk.rdp(2.0).is_err(), "{sk:?}");
                assert!(sk.rdp_curve(&[2.0]).is_err(), "{sk:?}");
                assert!(compute_rdp_skellam(&sk, 1, &[2.0]).is_err(), "{sk:?}");
            }
        }
        // An L1 bound below the L2 bound is inconsistent.
        assert!(Skellam::new(1.0, 2.0, 10.0).is_err());
        assert!(Skellam::new(2.0, 2.0, 10.0).is_ok());
        // Orders the theorem does not state.
        for alpha in [f64::NAN, f64::INFINITY, 1.0, 0.5, -3.0, 1.5, 2.25] {
            assert!(good.rdp(alpha).is_err(), "{alpha}");
        }
        for orders in [vec![], vec![1.0], vec![2.0, f64::NAN], vec![f64::INFINITY]] {
            assert!(good.rdp_curve(&orders).is_err(), "{orders:?}");
        }
        assert!(compute_rdp_skellam(&good, 0, &[2.0]).is_err());
        // Extreme but valid parameters give a bound, never NaN.
        for sk in [
            Skellam::new(1e300, 1e300, 1e-300).unwrap(),
            Skellam::new(1e-300, 1e-300, 1e300).unwrap(),
        ] {
            for r in sk.rdp_curve(&default_orders()).unwrap() {
                assert!(r >= 0.0, "{sk:?}: {r}");
            }
        }
    }

    #[test]
    fn skellam_rounds_multiply_the_curve() {
        let sk = Skellam::new(30.0, 5.0, 400.0).unwrap();
        let orders = default_orders();
        let one = sk.rdp_curve(&orders).unwrap();
        let seven = compute_rdp_skellam(&sk, 7, &orders).unwrap();
        for (o, s) in one.iter().zip(&seven) {
            assert_eq!(*s, o * 7.0);
        }
        // Non-decreasing along the grid, as RDP must be.
        assert!(one.windows(2).all(|w| w[0] <= w[1]));
    }
}
