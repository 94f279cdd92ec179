//! Differential-privacy accounting for DP-FedAvg / DP-SGD.
//!
//! Each round, every client is included independently with probability `q`
//! (the sampling rate); the sum of the clipped updates (L2 sensitivity 1 after
//! dividing by the clip norm) receives Gaussian noise of standard deviation `σ`
//! (the noise multiplier). This is the Poisson-subsampled Gaussian mechanism,
//! composed over `T` rounds, under add-or-remove-one adjacency.
//!
//! Two independent accountants give an upper bound on `ε` for a target `δ`:
//!
//! * [`rdp`]: Rényi DP of the sampled Gaussian (Mironov, Talwar, Zhang 2019)
//!   on Opacus's order grid, converted with the Balle et al. 2020 /
//!   Canonne–Kamath–Steinke bound: the same recipe and grid as Opacus's
//!   `RDPAccountant` (agrees with Opacus 1.6.0 to ~1e-14 relative).
//! * [`pld`]: privacy-loss distributions with the pessimistic connect-the-dots
//!   discretisation (Doroshenko et al. 2022), as in Google's `dp_accounting`
//!   `PLDAccountant` (agrees with dp-accounting 0.6.0 to ~1e-8 relative).
//!   Tighter than RDP.
//!
//! [`skellam`] bounds the RDP of the Skellam mechanism on a securely
//! aggregated integer sum (Agarwal, Kairouz, Liu 2021); it composes with the
//! Gaussian's RDP, not with its PLD.
//!
//! [`ledger`] keeps a per-task budget and refuses rounds that would exceed it.

pub mod ledger;
pub mod pld;
pub mod rdp;
pub mod skellam;
mod special;
#[cfg(test)]
mod tests;

pub use skellam::Skellam;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Errors of the accountant: bad parameters, resource limits and refused
/// rounds. No function of this module panics on bad input; it returns one of
/// these instead.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AccountantError {
    /// A parameter is outside its allowed range.
    #[error("invalid {name} = {value}: must be {allowed}")]
    InvalidParameter {
        /// Name of the offending parameter.
        name: &'static str,
        /// The value that was given.
        value: f64,
        /// Human-readable allowed range.
        allowed: &'static str,
    },
    /// The privacy-loss distribution would need a grid larger than the limit.
    #[error(
        "privacy loss distribution needs {required} grid points, more than the limit of \
         {limit}; increase value_discretization_interval or the noise multiplier"
    )]
    PldTooLarge {
        /// Grid points (or FFT length) that would be needed.
        required: u64,
        /// The limit.
        limit: u64,
    },
    /// No noise multiplier in the searched range reaches the target ε.
    #[error(
        "target epsilon {target} is unreachable with this accountant: even \
         noise_multiplier = {sigma} gives epsilon = {best}; raise the target epsilon or delta"
    )]
    TargetUnreachable {
        /// The requested ε.
        target: f64,
        /// The largest noise multiplier tried.
        sigma: f64,
        /// The ε it gave.
        best: f64,
    },
    /// Recording the round would push ε over the ledger's budget.
    #[error(
        "privacy budget exceeded: epsilon would grow from {spent} to {would_be}, over the \
         budget of {budget}"
    )]
    BudgetExceeded {
        /// ε spent so far.
        spent: f64,
        /// ε after the refused round(s).
        would_be: f64,
        /// The configured budget.
        budget: f64,
    },
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, AccountantError>;

/// `T` rounds of the Poisson-subsampled Gaussian mechanism with sensitivity 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SubsampledGaussian {
    /// Probability `q` with which each client joins a round, in `(0, 1]`.
    pub sampling_rate: f64,
    /// Noise standard deviation divided by the clipping norm, `σ > 0`.
    pub noise_multiplier: f64,
    /// Number of rounds `T >= 1`.
    pub rounds: u64,
}

impl SubsampledGaussian {
    /// Builds a validated mechanism description.
    pub fn new(sampling_rate: f64, noise_multiplier: f64, rounds: u64) -> Result<Self> {
        let m = Self {
            sampling_rate,
            noise_multiplier,
            rounds,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks `0 < q <= 1`, finite `σ > 0` and `rounds >= 1`.
    pub fn validate(&self) -> Result<()> {
        check_sampling_rate(self.sampling_rate)?;
        check_noise_multiplier(self.noise_multiplier)?;
        check_rounds(self.rounds)
    }
}

/// ε from the RDP accountant together with the Rényi order that attained it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpsilonReport {
    /// The ε bound (non-negative; `+∞` when no order gives a finite bound).
    pub epsilon: f64,
    /// The optimal Rényi order `α` on the grid (the largest order when
    /// `epsilon` is `+∞`).
    pub order: f64,
}

/// Which accountant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccountingMethod {
    /// Rényi DP (Opacus-compatible), fast, looser.
    Rdp,
    /// Privacy-loss distributions (dp_accounting-compatible), tighter.
    Pld,
}

/// ε of `m` at `delta` with the RDP accountant on Opacus's default orders.
pub fn epsilon_rdp(m: &SubsampledGaussian, delta: f64) -> Result<EpsilonReport> {
    m.validate()?;
    check_delta(delta)?;
    let mut acc = rdp::RdpAccountant::new();
    acc.compose(m.sampling_rate, m.noise_multiplier, m.rounds)?;
    acc.epsilon(delta)
}

/// ε of `m` at `delta` with the PLD accountant and [`pld::PldConfig::default`]
/// (discretisation 1e-4). `+∞` when no finite ε reaches `delta`.
pub fn epsilon_pld(m: &SubsampledGaussian, delta: f64) -> Result<f64> {
    pld::epsilon_pld_with(m, delta, &pld::PldConfig::default())
}

/// ε of `m` at `delta` with the chosen method.
pub fn epsilon(m: &SubsampledGaussian, delta: f64, method: AccountingMethod) -> Result<f64> {
    match method {
        AccountingMethod::Rdp => epsilon_rdp(m, delta).map(|r| r.epsilon),
        AccountingMethod::Pld => epsilon_pld(m, delta),
    }
}

/// Largest noise multiplier the search tries before giving up.
const MAX_SEARCH_SIGMA: f64 = 1e6;
/// Smallest noise multiplier the search tries.
const MIN_SEARCH_SIGMA: f64 = 1e-2;

/// The smallest noise multiplier `σ` (up to a relative 1e-6 for RDP, 1e-4 for
/// PLD, or until `ε(σ)` is within a relative 1e-7 below the target) such that `rounds` rounds at `sampling_rate` stay within
/// `(target_epsilon, delta)`. The returned `σ` always satisfies the target
/// (it is the upper end of the bisection bracket). If even `σ = 0.01`
/// satisfies it, `0.01` is returned.
pub fn noise_multiplier_for_epsilon(
    target_epsilon: f64,
    delta: f64,
    sampling_rate: f64,
    rounds: u64,
    method: AccountingMethod,
) -> Result<f64> {
    check_epsilon(target_epsilon, "target_epsilon")?;
    check_delta(delta)?;
    check_sampling_rate(sampling_rate)?;
    check_rounds(rounds)?;
    let eval = |sigma: f64| -> Result<f64> {
        let m = SubsampledGaussian {
            sampling_rate,
            noise_multiplier: sigma,
            rounds,
        };
        match epsilon(&m, delta, method) {
            // A grid too large only happens for tiny σ: treat as "too little noise".
            Err(AccountantError::PldTooLarge { .. }) => Ok(f64::INFINITY),
            other => other,
        }
    };
    let (start, rel_tol) = match method {
        AccountingMethod::Rdp => (1.0, 1e-6),
        // PLD ε is below the RDP ε, so the RDP answer is a good upper start.
        AccountingMethod::Pld => (
            noise_multiplier_for_epsilon(
                target_epsilon,
                delta,
                sampling_rate,
                rounds,
                AccountingMethod::Rdp,
            )
            .unwrap_or(1.0),
            1e-4,
        ),
    };
    // Upper end: ε(hi) <= target.
    let mut hi = start;
    let mut eps_hi = eval(hi)?;
    while eps_hi > target_epsilon {
        if hi >= MAX_SEARCH_SIGMA {
            return Err(AccountantError::TargetUnreachable {
                target: target_epsilon,
                sigma: hi,
                best: eps_hi,
            });
        }
        hi = (hi * 2.0).min(MAX_SEARCH_SIGMA);
        eps_hi = eval(hi)?;
    }
    // Lower end: ε(lo) > target.
    let mut lo = hi / 2.0;
    let mut eps_lo;
    loop {
        if lo < MIN_SEARCH_SIGMA {
            return Ok(hi.max(MIN_SEARCH_SIGMA));
        }
        eps_lo = eval(lo)?;
        if eps_lo > target_epsilon {
            break;
        }
        (hi, eps_hi) = (lo, eps_lo);
        lo /= 2.0;
    }
    // Illinois (modified regula falsi) on ln σ, keeping the bracket
    // ε(lo) > target >= ε(hi); bisection whenever a value is not finite.
    let (mut f_lo, mut f_hi) = (eps_lo - target_epsilon, eps_hi - target_epsilon);
    // `gap_hi` is the true target − ε(hi); `f_hi` may be scaled by Illinois.
    let mut gap_hi = -f_hi;
    let mut last_side = 0i8;
    while hi / lo > 1.0 + rel_tol && gap_hi > 1e-7 * target_epsilon {
        let (x_lo, x_hi) = (lo.ln(), hi.ln());
        let mut x = if f_lo.is_finite() && f_hi.is_finite() && f_lo != f_hi {
            x_hi - f_hi * (x_hi - x_lo) / (f_hi - f_lo)
        } else {
            0.5 * (x_lo + x_hi)
        };
        // Stay strictly inside the bracket.
        let margin = 0.01 * (x_hi - x_lo);
        x = x.clamp(x_lo + margin, x_hi - margin);
        let mid = x.exp();
        let f_mid = eval(mid)? - target_epsilon;
        if f_mid <= 0.0 {
            (hi, f_hi, gap_hi) = (mid, f_mid, -f_mid);
            if last_side == 1 {
                f_lo *= 0.5;
            }
            last_side = 1;
        } else {
            (lo, f_lo) = (mid, f_mid);
            if last_side == -1 {
                f_hi *= 0.5;
            }
            last_side = -1;
        }
    }
    Ok(hi)
}

pub(crate) fn check_sampling_rate(q: f64) -> Result<()> {
    if q > 0.0 && q <= 1.0 {
        Ok(())
    } else {
        Err(AccountantError::InvalidParameter {
            name: "sampling_rate",
            value: q,
            allowed: "in (0, 1]",
        })
    }
}

pub(crate) fn check_noise_multiplier(sigma: f64) -> Result<()> {
    if sigma > 0.0 && sigma.is_finite() {
        Ok(())
    } else {
        Err(AccountantError::InvalidParameter {
            name: "noise_multiplier",
            value: sigma,
            allowed: "a finite number > 0",
        })
    }
}

pub(crate) fn check_rounds(rounds: u64) -> Result<()> {
    if rounds >= 1 {
        Ok(())
    } else {
        Err(AccountantError::InvalidParameter {
            name: "rounds",
            value: rounds as f64,
            allowed: ">= 1",
        })
    }
}

pub(crate) fn check_delta(delta: f64) -> Result<()> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(AccountantError::InvalidParameter {
            name: "delta",
            value: delta,
            allowed: "in (0, 1)",
        })
    }
}

pub(crate) fn check_epsilon(eps: f64, name: &'static str) -> Result<()> {
    if eps > 0.0 && eps.is_finite() {
        Ok(())
    } else {
        Err(AccountantError::InvalidParameter {
            name,
            value: eps,
            allowed: "a finite number > 0",
        })
    }
}
