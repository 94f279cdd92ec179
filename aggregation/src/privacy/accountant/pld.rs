//! Privacy-loss-distribution (PLD) accountant for the Poisson-subsampled
//! Gaussian mechanism, following Google's `dp_accounting` `pld` package
//! (Koskela et al. 2020; Doroshenko et al. 2022, "Connect the Dots").
//!
//! # Construction
//!
//! One round is discretised with the **pessimistic connect-the-dots**
//! algorithm on the grid `ε_i = i·Δ` (`Δ` = `value_discretization_interval`,
//! 1e-4 by default): the exact hockey-stick divergence `δ(ε_i)` of the
//! mechanism is evaluated at every grid point and the discrete PLD is the one
//! whose `δ(ε)` curve linearly interpolates those points in `e^ε`, which upper
//! bounds the true curve everywhere. The Gaussian noise is truncated where its
//! tails have mass `exp(log_mass_truncation_bound)` (default `e^-50`); that
//! mass goes to the `+∞` loss.
//!
//! # Adjacency
//!
//! Add-or-remove-one adjacency has two directions with different PLDs when
//! `q < 1`: *remove* (`P = (1-q)N(0,σ²) + qN(-1,σ²)` vs `Q = N(0,σ²)`) and
//! *add* (`P = N(0,σ²)` vs `Q = (1-q)N(0,σ²) + qN(1,σ²)`). Neither dominates
//! for every `(ε, δ)`, so — as `dp_accounting` does — both are composed
//! separately over all rounds and the reported ε (δ) is the **maximum** of the
//! two. This is the sound choice: the guarantee must hold for every pair of
//! neighbouring datasets, whichever direction it is. For `q = 1` the two
//! coincide and only one is computed.
//!
//! # Composition
//!
//! `T`-fold self-composition uses one FFT: the support of the result is
//! bounded with a Chernoff bound so that at most `tail_mass_truncation`
//! (1e-15) lies outside, the PMF is transformed, raised to the `T`-th power
//! pointwise and transformed back (wrap-around only moves that tail mass);
//! the truncated mass is added to the `+∞` loss, keeping the result
//! pessimistic. Heterogeneous groups are composed by FFT linear convolution
//! with pessimistic tail truncation. FFT round-off can leave tiny negative
//! masses; they are clamped to zero.
//!
//! `δ(ε) = Σ_{l>ε} p(l)(1 − e^{ε−l}) + p(∞)`, and `ε(δ)` is obtained by
//! inverting that piecewise function exactly (the same closed form
//! `dp_accounting` uses, equivalent to a binary search on `ε`).

use serde::{Deserialize, Serialize};

use super::special::{log_a_times_exp_b_plus_c, log_norm_cdf, norm_cdf, norm_quantile_from_log};
use super::{AccountantError, Result, SubsampledGaussian, check_delta};
use super::{check_noise_multiplier, check_rounds, check_sampling_rate};

/// Largest grid / FFT length the accountant will allocate (2^23 points,
/// 128 MiB of complex FFT buffer).
pub const MAX_GRID_POINTS: u64 = 1 << 23;

/// Discretisation and truncation settings of the PLD accountant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PldConfig {
    /// Spacing `Δ` of the privacy-loss grid, in `[1e-7, 1]` (default 1e-4).
    pub value_discretization_interval: f64,
    /// `ln` of the noise mass truncated (and counted as `+∞` loss) per round,
    /// in `[-700, -10]` (default -50).
    pub log_mass_truncation_bound: f64,
    /// Mass that each composition may truncate from the tails (added to the
    /// `+∞` loss), in `[0, 1e-6]` (default 1e-15).
    pub tail_mass_truncation: f64,
}

impl Default for PldConfig {
    fn default() -> Self {
        Self {
            value_discretization_interval: 1e-4,
            log_mass_truncation_bound: -50.0,
            tail_mass_truncation: 1e-15,
        }
    }
}

impl PldConfig {
    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<()> {
        let d = self.value_discretization_interval;
        if !(1e-7..=1.0).contains(&d) {
            return Err(AccountantError::InvalidParameter {
                name: "value_discretization_interval",
                value: d,
                allowed: "in [1e-7, 1]",
            });
        }
        let b = self.log_mass_truncation_bound;
        if !(-700.0..=-10.0).contains(&b) {
            return Err(AccountantError::InvalidParameter {
                name: "log_mass_truncation_bound",
                value: b,
                allowed: "in [-700, -10]",
            });
        }
        let t = self.tail_mass_truncation;
        if !(0.0..=1e-6).contains(&t) {
            return Err(AccountantError::InvalidParameter {
                name: "tail_mass_truncation",
                value: t,
                allowed: "in [0, 1e-6]",
            });
        }
        Ok(())
    }
}

/// ε of `m` at `delta` with the PLD accountant and the given settings.
/// `+∞` when no finite ε reaches `delta` (e.g. `delta` below the truncated
/// mass).
pub fn epsilon_pld_with(m: &SubsampledGaussian, delta: f64, config: &PldConfig) -> Result<f64> {
    m.validate()?;
    check_delta(delta)?;
    let pld = PrivacyLossDistribution::from_subsampled_gaussian(
        m.sampling_rate,
        m.noise_multiplier,
        config,
    )?
    .self_compose(m.rounds, config)?;
    Ok(pld.epsilon_for_delta(delta))
}

/// A discrete privacy-loss distribution on the grid `k·Δ`, plus a mass at `+∞`.
#[derive(Debug, Clone, PartialEq)]
pub struct DensePmf {
    interval: f64,
    lower_index: i64,
    probs: Vec<f64>,
    infinity_mass: f64,
}

impl DensePmf {
    /// The PLD of a mechanism with no privacy loss (all mass at loss 0).
    pub fn identity(interval: f64) -> Self {
        Self {
            interval,
            lower_index: 0,
            probs: vec![1.0],
            infinity_mass: 0.0,
        }
    }

    /// Mass at loss `+∞`.
    pub fn infinity_mass(&self) -> f64 {
        self.infinity_mass
    }

    /// Number of grid points carried.
    pub fn len(&self) -> usize {
        self.probs.len()
    }

    /// Whether no grid point is carried.
    pub fn is_empty(&self) -> bool {
        self.probs.is_empty()
    }

    /// Smallest and largest finite loss carried.
    pub fn loss_range(&self) -> (f64, f64) {
        let lo = self.lower_index as f64 * self.interval;
        let hi = (self.lower_index + self.probs.len() as i64 - 1) as f64 * self.interval;
        (lo, hi)
    }

    /// Total finite mass plus the mass at `+∞` (≈ 1).
    pub fn total_mass(&self) -> f64 {
        self.probs.iter().sum::<f64>() + self.infinity_mass
    }

    fn loss(&self, i: usize) -> f64 {
        (self.lower_index + i as i64) as f64 * self.interval
    }

    /// Hockey-stick divergence `δ(ε) = p(∞) + Σ_{l>ε} p(l)(1 − e^{ε−l})`.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let mut delta = self.infinity_mass;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let l = self.loss(i);
            if l <= epsilon {
                break;
            }
            delta += -(epsilon - l).exp_m1() * p;
        }
        delta.clamp(0.0, 1.0)
    }

    /// Smallest `ε >= 0` with `δ(ε) <= delta` (`+∞` if none), solving the
    /// piecewise closed form exactly as `dp_accounting` does.
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        if self.infinity_mass > delta {
            return f64::INFINITY;
        }
        let mut mass_upper = self.infinity_mass;
        let mut mass_lower = 0.0f64;
        for (i, &p) in self.probs.iter().enumerate().rev() {
            let l = self.loss(i);
            if mass_upper > delta
                && mass_lower > 0.0
                && ((mass_upper - delta) / mass_lower).ln() >= l
            {
                break;
            }
            mass_upper += p;
            mass_lower += (-l).exp() * p;
            if mass_upper >= delta && mass_lower == 0.0 {
                return l.max(0.0);
            }
        }
        if mass_upper <= mass_lower + delta {
            return 0.0;
        }
        ((mass_upper - delta) / mass_lower).ln().max(0.0)
    }

    /// `T`-fold self-composition via one FFT with Chernoff-bounded support.
    pub fn self_compose(&self, times: u64, tail_mass_truncation: f64) -> Result<Self> {
        check_rounds(times)?;
        if times == 1 {
            return Ok(Self {
                infinity_mass: self.infinity_mass + tail_mass_truncation,
                ..self.clone()
            });
        }
        let n = self.probs.len();
        let (lo, hi) = self_convolve_bounds(&self.probs, times, tail_mass_truncation)?;
        let out_len = (hi - lo + 1) as u64;
        let fft_len = out_len.max(n as u64).next_power_of_two();
        if fft_len > MAX_GRID_POINTS {
            return Err(AccountantError::PldTooLarge {
                required: fft_len,
                limit: MAX_GRID_POINTS,
            });
        }
        let fft_len = (fft_len as usize).max(4);
        let plan = RealFft::new(fft_len);
        let mut spec = plan.forward(&self.probs);
        let t = times as f64;
        for z in spec.iter_mut() {
            *z = z.powf(t);
        }
        let conv = plan.inverse(&spec);
        let probs: Vec<f64> = (0..out_len as i64)
            .map(|j| conv[(lo + j).rem_euclid(fft_len as i64) as usize].max(0.0))
            .collect();
        let lower_index = i64::try_from(times)
            .ok()
            .and_then(|t| self.lower_index.checked_mul(t))
            .and_then(|v| v.checked_add(lo))
            .ok_or(AccountantError::PldTooLarge {
                required: u64::MAX,
                limit: MAX_GRID_POINTS,
            })?;
        // 1 − (1 − p∞)^T, computed stably, plus the truncated tails.
        let inf = tail_mass_truncation - (t * (-self.infinity_mass).ln_1p()).exp_m1();
        Ok(Self {
            interval: self.interval,
            lower_index,
            probs,
            infinity_mass: inf.min(1.0),
        })
    }

    /// Composition with another PMF on the same grid (linear convolution),
    /// truncating at most `tail_mass_truncation` pessimistically.
    pub fn compose(&self, other: &Self, tail_mass_truncation: f64) -> Result<Self> {
        if self.interval != other.interval {
            return Err(AccountantError::InvalidParameter {
                name: "value_discretization_interval",
                value: other.interval,
                allowed: "equal for both distributions being composed",
            });
        }
        let probs = convolve(&self.probs, &other.probs)?;
        let (offset, probs, right_mass) = truncate_tails(probs, tail_mass_truncation);
        let inf =
            self.infinity_mass + other.infinity_mass - self.infinity_mass * other.infinity_mass;
        Ok(Self {
            interval: self.interval,
            lower_index: self.lower_index + other.lower_index + offset as i64,
            probs,
            infinity_mass: (inf + right_mass).min(1.0),
        })
    }
}

/// The PLD of a mechanism under add-or-remove adjacency: the *remove* and
/// *add* directions, composed separately. `add == None` means both are equal
/// (symmetric, e.g. `q = 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacyLossDistribution {
    remove: DensePmf,
    add: Option<DensePmf>,
}

impl PrivacyLossDistribution {
    /// The PLD of doing nothing.
    pub fn identity(config: &PldConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            remove: DensePmf::identity(config.value_discretization_interval),
            add: None,
        })
    }

    /// One round of the Poisson-subsampled Gaussian (sensitivity 1).
    pub fn from_subsampled_gaussian(q: f64, sigma: f64, config: &PldConfig) -> Result<Self> {
        check_sampling_rate(q)?;
        check_noise_multiplier(sigma)?;
        config.validate()?;
        let remove = connect_dots_pmf(
            &GaussianLoss::new(q, sigma, Direction::Remove, config),
            config,
        )?;
        let add = if q == 1.0 {
            None
        } else {
            Some(connect_dots_pmf(
                &GaussianLoss::new(q, sigma, Direction::Add, config),
                config,
            )?)
        };
        Ok(Self { remove, add })
    }

    /// The *remove*-direction PMF.
    pub fn remove_pmf(&self) -> &DensePmf {
        &self.remove
    }

    /// The *add*-direction PMF (equal to the remove one when symmetric).
    pub fn add_pmf(&self) -> &DensePmf {
        self.add.as_ref().unwrap_or(&self.remove)
    }

    /// `T`-fold self-composition.
    pub fn self_compose(&self, times: u64, config: &PldConfig) -> Result<Self> {
        config.validate()?;
        let t = config.tail_mass_truncation;
        Ok(Self {
            remove: self.remove.self_compose(times, t)?,
            add: match &self.add {
                Some(a) => Some(a.self_compose(times, t)?),
                None => None,
            },
        })
    }

    /// Composition with another PLD on the same grid.
    pub fn compose(&self, other: &Self, config: &PldConfig) -> Result<Self> {
        config.validate()?;
        let t = config.tail_mass_truncation;
        let remove = self.remove.compose(&other.remove, t)?;
        let add = if self.add.is_none() && other.add.is_none() {
            None
        } else {
            Some(self.add_pmf().compose(other.add_pmf(), t)?)
        };
        Ok(Self { remove, add })
    }

    /// `δ(ε)`: the larger of the two directions.
    pub fn delta_for_epsilon(&self, epsilon: f64) -> f64 {
        let r = self.remove.delta_for_epsilon(epsilon);
        match &self.add {
            Some(a) => r.max(a.delta_for_epsilon(epsilon)),
            None => r,
        }
    }

    /// `ε(δ)`: the larger of the two directions (`+∞` if unreachable).
    pub fn epsilon_for_delta(&self, delta: f64) -> f64 {
        let r = self.remove.epsilon_for_delta(delta);
        match &self.add {
            Some(a) => r.max(a.epsilon_for_delta(delta)),
            None => r,
        }
    }
}

/// Composes groups of `(q, σ, rounds)` into one PLD.
pub fn pld_for_groups(
    groups: &[(f64, f64, u64)],
    config: &PldConfig,
) -> Result<PrivacyLossDistribution> {
    let mut acc = PrivacyLossDistribution::identity(config)?;
    for &(q, sigma, rounds) in groups {
        let g = PrivacyLossDistribution::from_subsampled_gaussian(q, sigma, config)?
            .self_compose(rounds, config)?;
        acc = acc.compose(&g, config)?;
    }
    Ok(acc)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Remove,
    Add,
}

/// Privacy loss of one round of the subsampled Gaussian, sensitivity 1, in one
/// adjacency direction (`dp_accounting`'s `GaussianPrivacyLoss`).
struct GaussianLoss {
    q: f64,
    sigma: f64,
    dir: Direction,
    /// Noise truncation point in standard units (`Φ(z) = e^bound / 2`).
    z_trunc: f64,
}

impl GaussianLoss {
    fn new(q: f64, sigma: f64, dir: Direction, config: &PldConfig) -> Self {
        let z_trunc =
            norm_quantile_from_log(config.log_mass_truncation_bound - std::f64::consts::LN_2);
        Self {
            q,
            sigma,
            dir,
            z_trunc,
        }
    }

    /// Loss without subsampling, remove direction: `(-1/2 - x)/σ²`.
    fn loss_plain_remove(&self, x: f64) -> f64 {
        (-0.5 - x) / (self.sigma * self.sigma)
    }

    fn loss_remove(&self, x: f64) -> f64 {
        let l = self.loss_plain_remove(x);
        if self.q == 1.0 {
            l
        } else {
            log_a_times_exp_b_plus_c(self.q, l, 1.0 - self.q)
        }
    }

    fn loss(&self, x: f64) -> f64 {
        match self.dir {
            Direction::Remove => self.loss_remove(x),
            Direction::Add => -self.loss_remove(-x),
        }
    }

    /// Inverse of the plain remove loss.
    fn inverse_plain_remove(&self, loss: f64) -> f64 {
        -0.5 - loss * self.sigma * self.sigma
    }

    /// Largest `x` whose loss is at least `loss`.
    fn inverse_loss(&self, loss: f64) -> f64 {
        let q = self.q;
        match self.dir {
            Direction::Remove => {
                if q == 1.0 {
                    return self.inverse_plain_remove(loss);
                }
                let floor = (-q).ln_1p();
                if is_close(loss, floor) {
                    return f64::NEG_INFINITY;
                }
                let plain = log_a_times_exp_b_plus_c(1.0 / q, loss, 1.0 - 1.0 / q);
                self.inverse_plain_remove(plain)
            }
            Direction::Add => {
                if q == 1.0 {
                    return 1.0 + self.inverse_plain_remove(loss);
                }
                let ceil = -(-q).ln_1p();
                if is_close(loss, ceil) {
                    return f64::NEG_INFINITY;
                }
                let plain = -log_a_times_exp_b_plus_c(1.0 / q, -loss, 1.0 - 1.0 / q);
                1.0 + self.inverse_plain_remove(plain)
            }
        }
    }

    /// `(x_lo, x_hi)` outside which the noise is truncated.
    fn truncation(&self) -> (f64, f64) {
        let lo = self.z_trunc * self.sigma;
        match self.dir {
            Direction::Remove => (lo - 1.0, -lo),
            Direction::Add => (lo, -lo + 1.0),
        }
    }

    /// CDF of the upper (numerator) distribution at `x`.
    fn upper_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.dir {
            Direction::Add => norm_cdf(x / s),
            Direction::Remove => {
                if self.q == 1.0 {
                    norm_cdf((x + 1.0) / s)
                } else {
                    (1.0 - self.q) * norm_cdf(x / s) + self.q * norm_cdf((x + 1.0) / s)
                }
            }
        }
    }

    /// Log-CDF of the lower (denominator) distribution at `x`.
    fn lower_log_cdf(&self, x: f64) -> f64 {
        let s = self.sigma;
        match self.dir {
            Direction::Remove => log_norm_cdf(x / s),
            Direction::Add => {
                if self.q == 1.0 {
                    log_norm_cdf((x - 1.0) / s)
                } else {
                    super::special::log_add(
                        (-self.q).ln_1p() + log_norm_cdf(x / s),
                        self.q.ln() + log_norm_cdf((x - 1.0) / s),
                    )
                }
            }
        }
    }

    /// Exact hockey-stick divergence `δ(ε)` of one round in this direction.
    fn delta_for_epsilon(&self, eps: f64) -> f64 {
        let q = self.q;
        if q < 1.0 {
            match self.dir {
                Direction::Add if eps >= -(-q).ln_1p() => return 0.0,
                Direction::Remove if eps <= (-q).ln_1p() => return (-eps.exp_m1()).clamp(0.0, 1.0),
                _ => {}
            }
        }
        let x = self.inverse_loss(eps);
        let d = self.upper_cdf(x) - (eps + self.lower_log_cdf(x)).exp();
        // NaN cannot occur for valid inputs; if it did, 1 is the safe value.
        if d.is_nan() { 1.0 } else { d.clamp(0.0, 1.0) }
    }
}

/// `math.isclose` with its default relative tolerance 1e-9.
fn is_close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// Pessimistic connect-the-dots PMF on contiguous grid points
/// (`create_pmf_pessimistic_connect_dots_fixed_gap` in `dp_accounting`).
fn connect_dots_pmf(loss: &GaussianLoss, config: &PldConfig) -> Result<DensePmf> {
    let d = config.value_discretization_interval;
    let (x_lo, x_hi) = loss.truncation();
    let eps_upper = loss.loss(x_lo);
    let eps_lower = loss.loss(x_hi);
    let hi = (eps_upper / d).ceil();
    let lo = (eps_lower / d).floor();
    let count = hi - lo + 1.0;
    if !count.is_finite() || count > MAX_GRID_POINTS as f64 {
        return Err(AccountantError::PldTooLarge {
            required: if count.is_finite() {
                count as u64
            } else {
                u64::MAX
            },
            limit: MAX_GRID_POINTS,
        });
    }
    let lo = lo as i64;
    let n = count as usize;
    let mut deltas: Vec<f64> = (0..n)
        .map(|i| loss.delta_for_epsilon((lo + i as i64) as f64 * d))
        .collect();
    // δ(ε) is non-increasing; remove round-off wiggles.
    for i in 1..n {
        if deltas[i] > deltas[i - 1] {
            deltas[i] = deltas[i - 1];
        }
    }
    if n == 1 {
        return Ok(DensePmf {
            interval: d,
            lower_index: lo,
            probs: vec![1.0 - deltas[0]],
            infinity_mass: deltas[0],
        });
    }
    let em1 = d.exp_m1();
    let e = d.exp();
    let mut probs = vec![0.0; n];
    probs[0] = 1.0 - deltas[0] + (deltas[1] - deltas[0]) / em1;
    for i in 1..n - 1 {
        let next = deltas[i + 1] - deltas[i];
        let prev = deltas[i] - deltas[i - 1];
        probs[i] = (next - prev * e) / em1;
    }
    probs[n - 1] = (deltas[n - 1] - deltas[n - 2]) / (-d).exp_m1();
    for p in probs.iter_mut() {
        if p.is_nan() || *p < 0.0 {
            *p = 0.0;
        }
    }
    Ok(DensePmf {
        interval: d,
        lower_index: lo,
        probs,
        infinity_mass: deltas[n - 1],
    })
}

/// Chernoff bounds `[lo, hi]` on the index support of the `times`-fold
/// self-convolution, each tail outside holding at most `tail / 2`
/// (`compute_self_convolve_bounds` in `dp_accounting`).
fn self_convolve_bounds(probs: &[f64], times: u64, tail: f64) -> Result<(i64, i64)> {
    let n = probs.len();
    let t = times as f64;
    let max_hi = (n as f64 - 1.0) * t;
    if tail == 0.0 {
        if max_hi + 1.0 > MAX_GRID_POINTS as f64 {
            return Err(AccountantError::PldTooLarge {
                required: (max_hi + 1.0) as u64,
                limit: MAX_GRID_POINTS,
            });
        }
        return Ok((0, max_hi as i64));
    }
    let log_two_over_tail = (2.0 / tail).ln();
    let mut lo = 0.0f64;
    let mut hi = max_hi;
    for k in (-20i32..=20).filter(|k| *k != 0) {
        // Orders k/n keep |order·i| <= 20, so the MGF Σ p_i e^{order·i} needs
        // no log-sum-exp; e^{order·i} is advanced by multiplication and
        // re-anchored every 256 steps.
        let order = f64::from(k) / n as f64;
        let step = order.exp();
        let mut mgf = 0.0;
        let mut w = 1.0;
        for (i, &p) in probs.iter().enumerate() {
            if i % 256 == 0 {
                w = (order * i as f64).exp();
            }
            mgf += p * w;
            w *= step;
        }
        if mgf.is_nan() || mgf <= 0.0 {
            continue;
        }
        let bound = (t * mgf.ln() + log_two_over_tail) / order;
        if !bound.is_finite() {
            continue;
        }
        if order > 0.0 {
            hi = hi.min(bound.ceil());
        } else {
            lo = lo.max(bound.floor());
        }
    }
    if hi < lo {
        hi = lo;
    }
    if hi - lo + 1.0 > MAX_GRID_POINTS as f64 || hi > (i64::MAX / 4) as f64 {
        return Err(AccountantError::PldTooLarge {
            required: (hi - lo + 1.0).min(u64::MAX as f64) as u64,
            limit: MAX_GRID_POINTS,
        });
    }
    Ok((lo as i64, hi as i64))
}

/// Linear convolution; direct for small inputs, FFT otherwise. Negative
/// round-off is clamped to zero.
fn convolve(a: &[f64], b: &[f64]) -> Result<Vec<f64>> {
    let out_len = a.len() + b.len() - 1;
    if a.len().min(b.len()) <= 64 {
        let mut out = vec![0.0; out_len];
        for (i, &x) in a.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            for (j, &y) in b.iter().enumerate() {
                out[i + j] += x * y;
            }
        }
        return Ok(out);
    }
    let n = (out_len as u64).next_power_of_two().max(4);
    if n > MAX_GRID_POINTS {
        return Err(AccountantError::PldTooLarge {
            required: n,
            limit: MAX_GRID_POINTS,
        });
    }
    let plan = RealFft::new(n as usize);
    let mut fa = plan.forward(a);
    let fb = plan.forward(b);
    for (x, y) in fa.iter_mut().zip(&fb) {
        *x = x.mul(*y);
    }
    let mut out = plan.inverse(&fa);
    out.truncate(out_len);
    for v in out.iter_mut() {
        *v = v.max(0.0);
    }
    Ok(out)
}

/// Drops a prefix and a suffix each of mass at most `tail / 2`; the prefix
/// mass is moved onto the first kept point (rounding losses up), the suffix
/// mass is returned to be added at `+∞`. Returns `(offset, probs, right_mass)`.
fn truncate_tails(probs: Vec<f64>, tail: f64) -> (usize, Vec<f64>, f64) {
    if tail == 0.0 || probs.is_empty() {
        return (0, probs, 0.0);
    }
    let half = tail / 2.0;
    let prefix = |it: &mut dyn Iterator<Item = &f64>| {
        let mut s = 0.0;
        let mut count = 0usize;
        for &v in it {
            s += v;
            if s > half {
                break;
            }
            count += 1;
        }
        count
    };
    let n = probs.len();
    let left = prefix(&mut probs.iter());
    let right_count = prefix(&mut probs.iter().rev());
    let right_idx = (n - right_count.min(n)).max(left + 1).min(n);
    let left = left.min(right_idx.saturating_sub(1));
    let left_mass: f64 = probs[..left].iter().sum();
    let right_mass: f64 = probs[right_idx..].iter().sum();
    let mut kept = probs[left..right_idx].to_vec();
    if let Some(first) = kept.first_mut() {
        *first += left_mass;
    }
    (left, kept, right_mass)
}

/// Minimal complex number for the FFT.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Complex {
    re: f64,
    im: f64,
}

impl Complex {
    const ZERO: Self = Self { re: 0.0, im: 0.0 };

    fn new(re: f64, im: f64) -> Self {
        Self { re, im }
    }

    fn add(self, o: Self) -> Self {
        Self::new(self.re + o.re, self.im + o.im)
    }

    fn sub(self, o: Self) -> Self {
        Self::new(self.re - o.re, self.im - o.im)
    }

    fn mul(self, o: Self) -> Self {
        Self::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }

    fn conj(self) -> Self {
        Self::new(self.re, -self.im)
    }

    fn scale(self, k: f64) -> Self {
        Self::new(self.re * k, self.im * k)
    }

    /// `self^t` in polar form.
    fn powf(self, t: f64) -> Self {
        let r = self.re.hypot(self.im);
        if r == 0.0 {
            return Self::ZERO;
        }
        let rt = r.powf(t);
        let th = self.im.atan2(self.re) * t;
        Self::new(rt * th.cos(), rt * th.sin())
    }
}

/// Radix-2 FFT of real sequences of length `n` (a power of two, `>= 4`),
/// computed as a complex FFT of length `n/2` on the even/odd-packed input.
struct RealFft {
    n: usize,
    /// `exp(-2πik/n)` for `k < n/2`; the half-length FFT uses every other one.
    twiddles: Vec<Complex>,
}

impl RealFft {
    fn new(n: usize) -> Self {
        let base = -2.0 * std::f64::consts::PI / n as f64;
        let twiddles = (0..n / 2)
            .map(|k| {
                let a = base * k as f64;
                Complex::new(a.cos(), a.sin())
            })
            .collect();
        Self { n, twiddles }
    }

    /// Spectrum bins `0..=n/2` of `x` zero-padded to `n` (`x.len() <= n`).
    fn forward(&self, x: &[f64]) -> Vec<Complex> {
        let h = self.n / 2;
        let mut z = vec![Complex::ZERO; h];
        for (k, zk) in z.iter_mut().enumerate() {
            let re = x.get(2 * k).copied().unwrap_or(0.0);
            let im = x.get(2 * k + 1).copied().unwrap_or(0.0);
            *zk = Complex::new(re, im);
        }
        self.complex_fft(&mut z, false);
        let mut out = vec![Complex::ZERO; h + 1];
        for (k, o) in out.iter_mut().enumerate() {
            let zk = z[k % h];
            let zc = z[(h - k) % h].conj();
            let even = zk.add(zc).scale(0.5);
            // (zk - zc) / (2i) = -i/2 · (zk - zc)
            let d = zk.sub(zc);
            let odd = Complex::new(d.im * 0.5, -d.re * 0.5);
            let w = if k < h {
                self.twiddles[k]
            } else {
                Complex::new(-1.0, 0.0)
            };
            *o = even.add(w.mul(odd));
        }
        out
    }

    /// Inverse of [`RealFft::forward`] (normalised), from bins `0..=n/2`.
    fn inverse(&self, spec: &[Complex]) -> Vec<f64> {
        let h = self.n / 2;
        let mut z = vec![Complex::ZERO; h];
        for (k, zk) in z.iter_mut().enumerate() {
            let xk = spec[k];
            let xc = spec[h - k].conj();
            let even = xk.add(xc).scale(0.5);
            let odd = xk.sub(xc).scale(0.5).mul(self.twiddles[k].conj());
            // Z = E + i·O
            *zk = Complex::new(even.re - odd.im, even.im + odd.re);
        }
        self.complex_fft(&mut z, true);
        let scale = 1.0 / h as f64;
        let mut out = vec![0.0; self.n];
        for (k, zk) in z.iter().enumerate() {
            out[2 * k] = zk.re * scale;
            out[2 * k + 1] = zk.im * scale;
        }
        out
    }

    /// In-place iterative radix-2 complex FFT of length `n/2`; the inverse is
    /// unnormalised.
    fn complex_fft(&self, a: &mut [Complex], inverse: bool) {
        let m = a.len();
        if m <= 1 {
            return;
        }
        let mut j = 0usize;
        for i in 1..m {
            let mut bit = m >> 1;
            while j & bit != 0 {
                j ^= bit;
                bit >>= 1;
            }
            j |= bit;
            if i < j {
                a.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= m {
            // twiddle for butterfly k of this stage: exp(∓2πik/len) = tw[k·n/len]
            let stride = self.n / len;
            let half = len / 2;
            for chunk in a.chunks_exact_mut(len) {
                let (lo, hi) = chunk.split_at_mut(half);
                for (k, (u, v)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
                    let mut w = self.twiddles[k * stride];
                    if inverse {
                        w = w.conj();
                    }
                    let t = v.mul(w);
                    let uu = *u;
                    *u = uu.add(t);
                    *v = uu.sub(t);
                }
            }
            len <<= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fft_convolution_matches_direct() {
        let a: Vec<f64> = (0..300)
            .map(|i| ((i * 37 % 11) as f64 + 1.0) / 1000.0)
            .collect();
        let b: Vec<f64> = (0..200)
            .map(|i| ((i * 13 % 7) as f64 + 1.0) / 500.0)
            .collect();
        let fast = convolve(&a, &b).unwrap();
        let mut direct = vec![0.0; a.len() + b.len() - 1];
        for (i, x) in a.iter().enumerate() {
            for (j, y) in b.iter().enumerate() {
                direct[i + j] += x * y;
            }
        }
        for (f, d) in fast.iter().zip(&direct) {
            assert!((f - d).abs() < 1e-14, "{f} vs {d}");
        }
    }

    #[test]
    fn self_compose_matches_repeated_compose() {
        let cfg = PldConfig {
            value_discretization_interval: 1e-2,
            ..PldConfig::default()
        };
        let one = PrivacyLossDistribution::from_subsampled_gaussian(0.2, 1.0, &cfg).unwrap();
        let fast = one.self_compose(5, &cfg).unwrap();
        let mut slow = PrivacyLossDistribution::identity(&cfg).unwrap();
        for _ in 0..5 {
            slow = slow.compose(&one, &cfg).unwrap();
        }
        for eps in [0.0, 0.5, 1.0, 2.0] {
            let a = fast.delta_for_epsilon(eps);
            let b = slow.delta_for_epsilon(eps);
            assert!((a - b).abs() < 1e-12 + 1e-9 * b, "eps={eps}: {a} vs {b}");
        }
    }

    #[test]
    fn single_round_mass_is_one_and_pessimistic() {
        let cfg = PldConfig::default();
        for (q, s) in [(1.0, 1.0), (0.01, 1.0), (0.3, 0.8)] {
            let pld = PrivacyLossDistribution::from_subsampled_gaussian(q, s, &cfg).unwrap();
            for pmf in [pld.remove_pmf(), pld.add_pmf()] {
                // Exactly 1 in exact arithmetic; clamping round-off negatives
                // (as dp_accounting does) can only add a little mass.
                let m = pmf.total_mass();
                assert!((-1e-12..1e-6).contains(&(m - 1.0)), "q={q}: {m}");
            }
            // Discrete δ(ε) upper-bounds the exact one at grid points.
            for dir in [Direction::Remove, Direction::Add] {
                let exact = GaussianLoss::new(q, s, dir, &cfg);
                let pmf = if dir == Direction::Remove {
                    pld.remove_pmf()
                } else {
                    pld.add_pmf()
                };
                for eps in [0.0, 0.1, 0.5, 1.0, 2.0] {
                    let d_exact = exact.delta_for_epsilon(eps);
                    let d_pld = pmf.delta_for_epsilon(eps);
                    assert!(
                        d_pld >= d_exact - 1e-12,
                        "q={q} eps={eps}: {d_pld} < {d_exact}"
                    );
                    assert!(
                        d_pld <= d_exact * 1.001 + 1e-9,
                        "q={q} eps={eps}: {d_pld} vs {d_exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn q_one_gaussian_delta_is_analytic() {
        // δ(ε) of the Gaussian mechanism: Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ).
        let cfg = PldConfig::default();
        let s = 2.0;
        let pld = PrivacyLossDistribution::from_subsampled_gaussian(1.0, s, &cfg).unwrap();
        for eps in [0.0, 0.3, 1.0] {
            let want = norm_cdf(0.5 / s - eps * s) - eps.exp() * norm_cdf(-0.5 / s - eps * s);
            let got = pld.delta_for_epsilon(eps);
            assert!(
                got >= want - 1e-12 && got <= want * 1.0001 + 1e-12,
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn truncate_tails_keeps_mass() {
        let probs = vec![1e-17, 1e-17, 0.5, 0.5 - 4e-17, 1e-17, 1e-17];
        let (off, kept, right) = truncate_tails(probs, 1e-15);
        assert_eq!(off, 2);
        assert_eq!(kept.len(), 2);
        assert!((kept.iter().sum::<f64>() + right - 1.0).abs() < 1e-15);
    }

    #[test]
    fn bad_config_rejected() {
        let bad = PldConfig {
            value_discretization_interval: 0.0,
            ..PldConfig::default()
        };
        assert!(PrivacyLossDistribution::from_subsampled_gaussian(0.1, 1.0, &bad).is_err());
        let bad = PldConfig {
            tail_mass_truncation: f64::NAN,
            ..PldConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn huge_grid_is_an_error_not_an_allocation() {
        let cfg = PldConfig {
            value_discretization_interval: 1e-7,
            ..PldConfig::default()
        };
        let r = PrivacyLossDistribution::from_subsampled_gaussian(1.0, 0.05, &cfg);
        assert!(
            matches!(r, Err(AccountantError::PldTooLarge { .. })),
            "{r:?}"
        );
    }
}
