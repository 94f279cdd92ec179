//! A fast exact sampler of the discrete Gaussian (Canonne, Kamath and
//! Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020),
//! for adding noise to whole model updates.
//!
//! opendp's Gaussian mechanism on floats samples the discrete Gaussian on the
//! grid `2^k` with arbitrary-precision rationals; on f32's finest grid that
//! costs far more than local training (see docs/benchmarks.md). This sampler
//! draws from the same family with machine integers only:
//!
//! 1. The grid is chosen from `σ`: `k = ⌈log₂ σ⌉ − 24`, and the scale in grid
//!    units is rounded **up** to an integer, `S = ⌈σ / 2^k⌉ ∈ (2^23, 2^24]`,
//!    so the noise standard deviation `S·2^k` is at least the requested `σ`
//!    (and within a relative 2^-23 of it): privacy can only improve.
//! 2. `Z ~ N_ℤ(0, S²)` is sampled with CKS Algorithms 1–3 — Bernoulli(exp(−γ))
//!    for rational `γ` by the alternating-series method, the discrete Laplace
//!    by rejection, the discrete Gaussian by rejection from it — entirely in
//!    u128 arithmetic, exact for `|Z| < 2^34` (a rejection of probability
//!    below 2^-1000 restarts the draw otherwise).
//! 3. The input `x` is first rounded to the lattice `2^k·ℤ`, and the output
//!    is the lattice point `round(x/2^k)·2^k + Z·2^k`, converted to f32.
//!    Adding lattice noise to a value off the lattice and rounding the sum to
//!    f32 would leave `x mod 2^k` in the output's low bits (for every output
//!    whose f32 spacing is finer than `2^k`), so two inputs that differ by
//!    less than a grid step could be told apart with certainty; this is why
//!    opendp rounds its input to the grid first, and so does this sampler.
//!    The f32 conversion is a function of the lattice point alone (exact for
//!    lattice points below `2^(k+24)` in magnitude; above, f32's spacing is
//!    itself a multiple of `2^k`), so every output lies on the lattice and
//!    reveals nothing about `x` beyond `round(x/2^k)`.
//!
//! Rounding to the lattice moves each coordinate by at most `2^(k−1)`, so
//! two neighbouring inputs at L2 distance `Δ` are at most `Δ + √d·2^k` apart
//! after rounding (each of the two inputs moves by at most `√d·2^(k−1)`).
//! [`rounding_sensitivity`] gives that extra term; the callers in
//! [`super`] add it to the sensitivity the noise is calibrated to.
//!
//! The random bits come from ChaCha20 seeded by the operating system.
//! The test `matches_opendp_on_the_same_grid` compares the integer noise with
//! opendp's sampler on the same grid and scale with a two-sample
//! Kolmogorov–Smirnov test.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Result, config};

/// Grid exponent and integer scale for a standard deviation `std`:
/// `std ≤ S·2^k < std·(1 + 2^-23)`.
pub fn grid_for(std: f64) -> (i32, u64) {
    let k = std.log2().ceil() as i32 - 24;
    let s = (std / 2f64.powi(k)).ceil() as u64;
    (k, s)
}

/// The extra L2 sensitivity that rounding `d` coordinates to the lattice
/// of the noise of standard deviation `std` adds between two neighbouring
/// inputs: `√d·2^k` (each input moves by at most `√d·2^(k−1)`).
pub fn rounding_sensitivity(d: usize, std: f64) -> f64 {
    if std == 0.0 {
        return 0.0;
    }
    let (k, _) = grid_for(std);
    (d as f64).sqrt() * 2f64.powi(k)
}

/// The value `x` rounded to the lattice `step·ℤ`, plus `z` lattice steps,
/// as f32: a function of the lattice point `round(x/step) + z` alone.
fn on_lattice(x: f32, z: i64, step: f64) -> f32 {
    // `x/step` is exact (a power of two); `round` is exact; the sum with `z`
    // is correctly rounded (a function of the exact integer sum); the product
    // with `step` is exact again; the f32 conversion is a function of it.
    let base = (f64::from(x) / step).round();
    ((base + z as f64) * step) as f32
}

/// Uniform integer in `[0, n)`, unbiased (rejection), `n > 0`.
fn uniform_below(rng: &mut impl Rng, n: u128) -> u128 {
    let zone = u128::MAX - (u128::MAX % n) - 1;
    loop {
        let v: u128 = rng.random();
        if v <= zone {
            return v % n;
        }
    }
}

/// Bernoulli(num/den), `num ≤ den`.
fn bernoulli(rng: &mut impl Rng, num: u128, den: u128) -> bool {
    uniform_below(rng, den) < num
}

/// Bernoulli(exp(−num/den)) exactly (CKS Algorithm 1).
fn bernoulli_exp(rng: &mut impl Rng, num: u128, den: u128) -> bool {
    let (mut num, den) = (num, den);
    while num > den {
        if !bernoulli_exp_le1(rng, 1, 1) {
            return false;
        }
        num -= den;
    }
    bernoulli_exp_le1(rng, num, den)
}

/// Bernoulli(exp(−γ)) for `γ = num/den ∈ [0, 1]`.
fn bernoulli_exp_le1(rng: &mut impl Rng, num: u128, den: u128) -> bool {
    let mut k: u128 = 1;
    loop {
        // A_k ~ Bernoulli(γ/k); stop at the first failure.
        if !bernoulli(rng, num, den * k) {
            return k % 2 == 1;
        }
        k += 1;
    }
}

/// Discrete Laplace with scale `t` (CKS Algorithm 2 with s = 1).
fn discrete_laplace(rng: &mut impl Rng, t: u128) -> i128 {
    loop {
        let u = uniform_below(rng, t);
        if !bernoulli_exp(rng, u, t) {
            continue;
        }
        let mut v: u128 = 0;
        while bernoulli_exp(rng, 1, 1) {
            v += 1;
        }
        let x = u + t * v;
        let negative = rng.random::<bool>();
        if negative && x == 0 {
            continue;
        }
        return if negative { -(x as i128) } else { x as i128 };
    }
}

/// One draw of `N_ℤ(0, s²)` for an integer `s ≤ 2^24` (CKS Algorithm 3).
pub fn discrete_gaussian(rng: &mut impl Rng, s: u64) -> i64 {
    let s = u128::from(s);
    if s == 0 {
        return 0;
    }
    let t = s + 1;
    let s2 = s * s;
    loop {
        let y = discrete_laplace(rng, t);
        let a = y.unsigned_abs();
        if a >= 1 << 34 {
            // Probability below exp(−2^34/t) ≈ 2^-1000: restart rather than overflow.
            continue;
        }
        // γ = (|y| − s²/t)² / (2 s²) = (|y|·t − s²)² / (2 s² t²).
        let diff = (a * t).abs_diff(s2);
        if bernoulli_exp(rng, diff * diff, 2 * s2 * t * t) {
            return y as i64;
        }
    }
}

/// A secure sampler of Gaussian noise on a grid fitted to each `σ`.
pub struct FastGaussian {
    rng: ChaCha20Rng,
}

impl FastGaussian {
    /// Seeded by the operating system's randomness.
    pub fn from_os() -> Self {
        Self {
            rng: ChaCha20Rng::from_os_rng(),
        }
    }

    /// Seeded explicitly: for tests only, never for privacy.
    pub fn from_seed_for_tests(seed: u64) -> Self {
        Self {
            rng: ChaCha20Rng::seed_from_u64(seed),
        }
    }

    /// Rounds each value to the lattice `2^k·ℤ` of `std` and adds noise of
    /// standard deviation at least `std` on it (see the module docs): every
    /// output is a lattice point. Returns the standard deviation actually
    /// used, `S·2^k`. The rounding adds [`rounding_sensitivity`] to the
    /// sensitivity of `x`; the caller accounts for it.
    pub fn add(&mut self, x: &mut [f32], std: f64) -> Result<f64> {
        if !(std.is_finite() && std >= 0.0) {
            return Err(config(
                "noise std",
                format!("{std} must be a finite number >= 0"),
            ));
        }
        if std == 0.0 {
            return Ok(0.0);
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(crate::error::Error::Privacy(format!(
                "cannot add noise to non-finite value at {i}"
            )));
        }
        let (k, s) = grid_for(std);
        let step = 2f64.powi(k);
        for v in x.iter_mut() {
            let z = discrete_gaussian(&mut self.rng, s);
            *v = on_lattice(*v, z, step);
        }
        Ok(s as f64 * step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_rounds_the_scale_up_by_at_most_one_part_in_2_pow_23() {
        for std in [1e-6, 0.01, 0.3, 1.0, 7.5, 1234.5] {
            let (k, s) = grid_for(std);
            let used = s as f64 * 2f64.powi(k);
            assert!(
                used >= std && used < std * (1.0 + 2f64.powi(-23)),
                "{std}: {used}"
            );
            assert!(s > 1 << 23 && s <= 1 << 24, "{s}");
        }
    }

    #[test]
    fn bernoulli_exp_has_the_right_mean() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for (num, den) in [(1u128, 2u128), (3, 1), (7, 3)] {
            let n = 200_000;
            let hits =
                (0..n).filter(|_| bernoulli_exp(&mut rng, num, den)).count() as f64 / n as f64;
            let p = (-(num as f64) / den as f64).exp();
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!((hits - p).abs() < 5.0 * se, "{num}/{den}: {hits} vs {p}");
        }
    }

    #[test]
    fn small_scale_matches_the_exact_probabilities() {
        // N_ℤ(0, 1): P(Z = z) ∝ exp(−z²/2); chi-square over z ∈ [−4, 4].
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let n = 200_000usize;
        let mut counts = [0usize; 9];
        let mut outside = 0;
        for _ in 0..n {
            let z = discrete_gaussian(&mut rng, 1);
            if z.abs() <= 4 {
                counts[(z + 4) as usize] += 1;
            } else {
                outside += 1;
            }
        }
        let norm: f64 = (-50..=50).map(|z: i32| (-(z * z) as f64 / 2.0).exp()).sum();
        let mut chi2 = 0.0;
        for (i, &c) in counts.iter().enumerate() {
            let z = i as f64 - 4.0;
            let e = n as f64 * (-z * z / 2.0).exp() / norm;
            chi2 += (c as f64 - e).powi(2) / e;
        }
        // 8 degrees of freedom: P(χ² > 26.1) = 0.001.
        assert!(chi2 < 26.1, "chi2 {chi2}");
        assert!(outside < 50, "{outside}");
    }

    #[test]
    fn large_scale_has_the_right_spread() {
        let mut g = FastGaussian::from_seed_for_tests(3);
        let mut x = vec![0.0f32; 100_000];
        let used = g.add(&mut x, 0.25).unwrap();
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let sd = (x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!((used - 0.25).abs() < 1e-7);
        assert!(mean.abs() < 0.004, "{mean}");
        assert!((sd - 0.25).abs() < 0.003, "{sd}");
    }

    /// Neighbouring inputs `0` and half a grid step, each coordinate noised
    /// at σ = 1 (grid step `2^-24`). Adding the lattice noise to the input
    /// as it was, as the sampler did before it rounded its input, leaves the
    /// half step in the low bits of every output whose f32 spacing is finer
    /// than the step (|output| < 1/2): for those coordinates the two inputs
    /// are told apart with certainty. Rounded to the lattice first, every
    /// output is a lattice point whichever the input, and the low bits say
    /// nothing.
    #[test]
    fn outputs_are_lattice_points_so_low_bits_do_not_reveal_the_input() {
        let std = 1.0;
        let (k, s) = grid_for(std);
        let step = 2f64.powi(k);
        assert_eq!(step, 2f64.powi(-24));
        let n = 20_000;
        let half_step = (step / 2.0) as f32;
        let off_lattice = |v: &f32| (f64::from(*v) / step).fract() != 0.0;
        // Before the fix: x + Z·2^k, rounded to f32.
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let old = |x: f32, rng: &mut ChaCha20Rng| {
            (f64::from(x) + discrete_gaussian(rng, s) as f64 * step) as f32
        };
        let zero: Vec<f32> = (0..n).map(|_| old(0.0, &mut rng)).collect();
        let half: Vec<f32> = (0..n).map(|_| old(half_step, &mut rng)).collect();
        assert_eq!(zero.iter().filter(|v| off_lattice(v)).count(), 0);
        let revealed = half.iter().filter(|v| off_lattice(v)).count() as f64 / n as f64;
        // P(|N(0, 1)| < 1/2) = 0.383.
        assert!(
            revealed > 0.35,
            "the attack should work on the old sampler: {revealed}"
        );
        // After the fix: no output is off the lattice, for either input.
        let mut g = FastGaussian::from_seed_for_tests(7);
        let mut zero = vec![0.0f32; n];
        let mut half = vec![half_step; n];
        g.add(&mut zero, std).unwrap();
        g.add(&mut half, std).unwrap();
        assert_eq!(zero.iter().filter(|v| off_lattice(v)).count(), 0);
        assert_eq!(half.iter().filter(|v| off_lattice(v)).count(), 0);
        // Large values too: f32's spacing there is a multiple of the step.
        let mut big = vec![1000.3f32; 1000];
        g.add(&mut big, std).unwrap();
        assert!(big.iter().all(|v| !off_lattice(v)));
        // The extra sensitivity of the rounding: √d·2^k.
        assert_eq!(rounding_sensitivity(100, std), 10.0 * step);
        assert_eq!(rounding_sensitivity(100, 0.0), 0.0);
    }

    /// Two-sample Kolmogorov–Smirnov distance of sorted samples: the largest
    /// gap between their empirical CDFs, evaluated after each distinct value.
    fn ks_distance(a: &[f64], b: &[f64]) -> f64 {
        let (mut i, mut j, mut d) = (0, 0, 0.0f64);
        while i < a.len() && j < b.len() {
            let v = a[i].min(b[j]);
            while i < a.len() && a[i] == v {
                i += 1;
            }
            while j < b.len() && b[j] == v {
                j += 1;
            }
            d = d.max((i as f64 / a.len() as f64 - j as f64 / b.len() as f64).abs());
        }
        d
    }

    #[cfg(feature = "opendp")]
    #[test]
    fn matches_opendp_on_the_same_grid() {
        use opendp::domains::AtomDomain;
        use opendp::measurements::make_gaussian;
        use opendp::measures::ZeroConcentratedDivergence;
        use opendp::metrics::AbsoluteDistance;
        // Same σ (already on the grid) and same k for both samplers; compare the
        // integer noise Z with a two-sample Kolmogorov–Smirnov test.
        let (k, s) = grid_for(0.05);
        let sigma = s as f64 * 2f64.powi(k);
        let meas = make_gaussian::<_, _, ZeroConcentratedDivergence>(
            AtomDomain::<f64>::new_non_nan(),
            AbsoluteDistance::<f64>::default(),
            sigma,
            Some(k),
        )
        .unwrap();
        let n = 20_000;
        let mut ours: Vec<f64> = {
            let mut rng = ChaCha20Rng::seed_from_u64(4);
            (0..n)
                .map(|_| discrete_gaussian(&mut rng, s) as f64)
                .collect()
        };
        // opendp draws from the operating system and cannot be seeded, so
        // this comparison is random: its threshold is set for a false-failure
        // probability below 1e-9. Two samples of n: P(D > c) ≤ 2·exp(−2c²·n/2)
        // (Kolmogorov's asymptotic bound, conservative for these integer
        // samples), and 2·exp(−c²·20000) ≤ 1e-9 for c ≥ 0.0328.
        let critical = 0.033;
        let mut theirs: Vec<f64> = (0..n)
            .map(|_| meas.invoke(&0.0).unwrap() / 2f64.powi(k))
            .collect();
        assert!(
            theirs.iter().all(|z| z.fract() == 0.0),
            "opendp's noise lies on the grid"
        );
        ours.sort_by(f64::total_cmp);
        theirs.sort_by(f64::total_cmp);
        let d = ks_distance(&ours, &theirs);
        assert!(d < critical, "KS distance {d}");
        // And the test has power at this size: a 30% wider Gaussian (its CDF
        // is up to 0.063 away) is told apart. Both samples seeded, so this
        // part is deterministic.
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut wider: Vec<f64> = (0..n)
            .map(|_| discrete_gaussian(&mut rng, s + 3 * s / 10) as f64)
            .collect();
        wider.sort_by(f64::total_cmp);
        let dw = ks_distance(&wider, &ours);
        assert!(
            dw > critical,
            "a wider Gaussian should be rejected: KS distance {dw}"
        );
    }
}
