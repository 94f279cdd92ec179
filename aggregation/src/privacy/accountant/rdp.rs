//! Rényi-DP accountant for the Poisson-subsampled Gaussian mechanism.
//!
//! Follows Mironov, Talwar, Zhang (2019), "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism", exactly as TensorFlow Privacy and Opacus
//! implement it (`opacus/accountants/analysis/rdp.py`):
//!
//! * integer orders `α`: the binomial expansion
//!   `A_α = Σ_i C(α,i) q^i (1-q)^(α-i) exp((i²-i)/(2σ²))`, summed in log space;
//! * fractional orders: the two-sided series with `erfc` tails
//!   (`_compute_log_a_for_frac_alpha`), summed in log space until terms drop
//!   below `e^-30`;
//! * `q = 1`: the plain Gaussian, `α/(2σ²)`.
//!
//! The per-round RDP `ln(A_α)/(α-1)` composes additively over rounds (and over
//! heterogeneous rounds). The conversion to `(ε, δ)` is the one of Balle et al.
//! 2020 (Thm. 21) used by Opacus's `get_privacy_spent`:
//! `ε = rdp − (ln δ + ln α)/(α−1) + ln((α−1)/α)`, minimised over the grid and
//! clamped at 0.

use super::special::{log_add, log_erfc, log_sub};
use super::{AccountantError, EpsilonReport, Result, check_delta};
use super::{check_noise_multiplier, check_rounds, check_sampling_rate};

/// Safety cap on the number of terms of the fractional-order series. The
/// series' terms decay polynomially; if the cap is hit the order is treated
/// as giving no bound (`+∞`), which is always valid.
const MAX_FRAC_TERMS: usize = 20_000_000;

/// Opacus's `RDPAccountant.DEFAULT_ALPHAS`:
/// `[1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))`,
/// i.e. 1.1, 1.2, …, 10.9, 12, 13, …, 63 (151 orders).
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// Checks an order grid: non-empty, every order finite and `> 1`.
pub fn validate_orders(orders: &[f64]) -> Result<()> {
    if orders.is_empty() {
        return Err(AccountantError::InvalidParameter {
            name: "orders.len()",
            value: 0.0,
            allowed: ">= 1",
        });
    }
    for &a in orders {
        if !(a > 1.0 && a.is_finite()) {
            return Err(AccountantError::InvalidParameter {
                name: "order",
                value: a,
                allowed: "a finite number > 1",
            });
        }
    }
    Ok(())
}

/// RDP at `order` of **one** round of the sampled Gaussian mechanism with
/// sampling rate `q` and noise multiplier `sigma`. May be `+∞` when the
/// series cannot be evaluated (a valid, vacuous bound).
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, order: f64) -> Result<f64> {
    check_sampling_rate(q)?;
    check_noise_multiplier(sigma)?;
    validate_orders(&[order])?;
    Ok(rdp_unchecked(q, sigma, order))
}

/// RDP curve of `rounds` rounds on the given orders (`rounds × per-round`).
pub fn compute_rdp(q: f64, sigma: f64, rounds: u64, orders: &[f64]) -> Result<Vec<f64>> {
    check_sampling_rate(q)?;
    check_noise_multiplier(sigma)?;
    check_rounds(rounds)?;
    validate_orders(orders)?;
    let t = rounds as f64;
    Ok(orders
        .iter()
        .map(|&a| rdp_unchecked(q, sigma, a) * t)
        .collect())
}

/// Converts an RDP curve to `(ε, δ)` (Balle et al. 2020, as in Opacus's
/// `get_privacy_spent`), returning the best ε over the grid and its order.
/// NaN entries are ignored; ties keep the first (smallest) order.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<EpsilonReport> {
    validate_orders(orders)?;
    check_delta(delta)?;
    if orders.len() != rdp.len() {
        return Err(AccountantError::InvalidParameter {
            name: "rdp.len()",
            value: rdp.len() as f64,
            allowed: "equal to orders.len()",
        });
    }
    let log_delta = delta.ln();
    let mut best = EpsilonReport {
        epsilon: f64::INFINITY,
        order: orders[orders.len() - 1],
    };
    for (&a, &r) in orders.iter().zip(rdp) {
        if r.is_nan() {
            continue;
        }
        // RDP is non-negative; clamp round-off below zero.
        let r = r.max(0.0);
        let eps = r - (log_delta + a.ln()) / (a - 1.0) + ((a - 1.0) / a).ln();
        if eps < best.epsilon {
            best = EpsilonReport {
                epsilon: eps,
                order: a,
            };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    Ok(best)
}

/// Accumulates RDP over (possibly heterogeneous) rounds on a fixed order grid.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// Empty accountant on Opacus's [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// Empty accountant on a custom order grid (each order finite and `> 1`).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self> {
        validate_orders(&orders)?;
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// Adds `rounds` rounds at sampling rate `q` and noise multiplier `sigma`.
    pub fn compose(&mut self, q: f64, sigma: f64, rounds: u64) -> Result<()> {
        let add = compute_rdp(q, sigma, rounds, &self.orders)?;
        for (acc, r) in self.rdp.iter_mut().zip(add) {
            *acc += r;
        }
        Ok(())
    }

    /// The order grid.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Accumulated RDP, one value per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// ε at `delta` and the optimal order.
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonReport> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// Per-round RDP for validated inputs.
fn rdp_unchecked(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 && alpha <= 1e6 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    let r = log_a / (alpha - 1.0);
    if r.is_nan() { f64::INFINITY } else { r }
}

/// `ln A_α` for integer `α` by the binomial expansion.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_s2 = 2.0 * sigma * sigma;
    let mut log_a = f64::NEG_INFINITY;
    // ln C(α, i), built incrementally: ln C(α,i) = ln C(α,i-1) + ln((α-i+1)/i).
    let mut log_binom = 0.0;
    for i in 0..=alpha {
        if i > 0 {
            log_binom += ((alpha - i + 1) as f64).ln() - (i as f64).ln();
        }
        let fi = i as f64;
        let s = log_binom + fi * log_q + (alpha - i) as f64 * log_1mq + (fi * fi - fi) / two_s2;
        log_a = log_add(log_a, s);
    }
    log_a
}

/// `ln A_α` for fractional `α` (Mironov et al. 2019, Sec. 3.3), as Opacus's
/// `_compute_log_a_for_frac_alpha`. Returns `+∞` if the alternating series
/// cannot be summed stably.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let s2 = sigma * sigma;
    let z0 = s2 * (1.0 / q - 1.0).ln() + 0.5;
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let ln_half = -std::f64::consts::LN_2;
    let mut log_a0 = f64::NEG_INFINITY;
    let mut log_a1 = f64::NEG_INFINITY;
    // binom(α, i) = Π_{k=1..i} (α-k+1)/k, kept as a signed float (|C| <= 2^α).
    let mut coef = 1.0f64;
    for i in 0..MAX_FRAC_TERMS {
        let fi = i as f64;
        if i > 0 {
            coef *= (alpha - fi + 1.0) / fi;
        }
        let log_coef = coef.abs().ln();
        let j = alpha - fi;
        let log_t0 = log_coef + fi * log_q + j * log_1mq;
        let log_t1 = log_coef + j * log_q + fi * log_1mq;
        let log_e0 = ln_half + log_erfc((fi - z0) / sqrt2_sigma);
        let log_e1 = ln_half + log_erfc((z0 - j) / sqrt2_sigma);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * s2) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * s2) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            match (log_sub(log_a0, log_s0), log_sub(log_a1, log_s1)) {
                (Some(a0), Some(a1)) => {
                    log_a0 = a0;
                    log_a1 = a1;
                }
                _ => return f64::INFINITY,
            }
        }
        if log_s0.max(log_s1) < -30.0 {
            return log_add(log_a0, log_a1);
        }
        if coef == 0.0 || !coef.is_finite() {
            return f64::INFINITY;
        }
    }
    f64::INFINITY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grid_is_opacus() {
        let o = default_orders();
        assert_eq!(o.len(), 151);
        assert_eq!(o[0], 1.1);
        assert_eq!(o[9], 2.0);
        assert_eq!(o[98], 10.9);
        assert_eq!(o[99], 12.0);
        assert_eq!(o[149], 62.0);
        assert_eq!(o[150], 63.0);
    }

    #[test]
    fn q_one_is_plain_gaussian() {
        let r = rdp_sampled_gaussian(1.0, 2.0, 3.5).unwrap();
        assert!((r - 3.5 / 8.0).abs() < 1e-15);
    }

    #[test]
    fn bad_orders_rejected() {
        assert!(RdpAccountant::with_orders(vec![]).is_err());
        assert!(RdpAccountant::with_orders(vec![2.0, 1.0]).is_err());
        assert!(RdpAccountant::with_orders(vec![f64::NAN]).is_err());
        assert!(epsilon_from_rdp(&[2.0, 3.0], &[0.1], 1e-5).is_err());
    }
}
