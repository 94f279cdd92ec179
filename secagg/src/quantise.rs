//! From a float update to integers modulo 2^32 and back (Kairouz, Liu and
//! Steinke, ICML 2021; Agarwal, Kairouz and Liu, NeurIPS 2021).
//!
//! A device clips its update to L2 norm `c`, pads it to a power of two
//! `d'`, rotates it with a random Walsh–Hadamard rotation `H·D/√d'` (`D`
//! random signs from the round's public seed) so that its mass spreads
//! evenly over the coordinates, scales it by `s`, rounds it with
//! **conditional randomised rounding** (each coordinate up with probability
//! its fractional part, redrawn until the squared norm is at most the bound
//! [`Quantiser::norm_bound_sq`]), adds its share of **Skellam noise**
//! (`Poisson(λ) − Poisson(λ)` per coordinate) and reduces modulo 2^32.
//!
//! Sensitivity, in integer units: the rounded vector's squared L2 norm is
//! at most `B = min(s²c² + d'/4 + √(2 ln(1/β))·(sc + √d'/2), (sc + √d')²)`,
//! the first term holding by the redraws (with `β = e^(−1/2)` a draw
//! passes with probability at least `1 − β`), the second for any rounding;
//! so `Δ2 = √B`, and since the coordinates are integers,
//! `Δ1 = min(B, √d'·Δ2)`. The sum of `m` devices' noise is Skellam with
//! parameter `m·λ` (variance `2mλ`); `λ` is chosen so that `m_min`
//! devices give `2·m_min·λ = (z·Δ2)²`.
//!
//! The scale `s` is the largest for which the sum of `n_max` devices'
//! integers stays within `±2^31` with a margin of `K = 8` standard
//! deviations of a rotated coordinate and of the noise, so the sum does not
//! wrap around in practice; decoding reads it as a signed 32-bit value,
//! divides by `s` and rotates back.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Poisson};
use serde::{Deserialize, Serialize};

/// Standard deviations of margin against wrap-around.
const MARGIN: f64 = 8.0;
/// Conditional rounding's bias parameter `β`.
pub const BETA: f64 = 0.606_530_659_712_633_4; // e^(-1/2)
/// Integers per clip norm, relative to `√d'`, at most.
const RESOLUTION: f64 = 4096.0;
/// Largest per-device Skellam parameter (Poisson draws stay exact in f64).
const MAX_LAMBDA: f64 = (1u64 << 50) as f64;
/// Most redraws of the rounding before giving up.
const MAX_REDRAWS: usize = 1000;

/// Why an update could not be quantised.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantiseError {
    /// Settings out of range.
    #[error("quantiser: {0}")]
    Config(String),
    /// The update has the wrong length or a non-finite value.
    #[error("quantiser: {0}")]
    Input(String),
    /// The rounding did not meet its bound in [`MAX_REDRAWS`] draws.
    #[error("quantiser: conditional rounding failed {MAX_REDRAWS} times")]
    Rounding,
}

/// The public settings of one round's quantisation, the same on every
/// device and on the server.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quantiser {
    /// Length of the updates (the model's parameters).
    pub dim: u32,
    /// The padded length `d'`, a power of two `>= dim`.
    pub padded: u32,
    /// L2 clipping norm `c`.
    pub clip: f64,
    /// Scale `s` (integers per unit).
    pub scale: f64,
    /// Each device's Skellam parameter `λ` per coordinate (0: no noise).
    pub lambda: f64,
    /// Seed of the rotation's signs.
    pub rotation_seed: u64,
}

impl Quantiser {
    /// The quantiser for updates of length `dim`, clipped to `clip`, with
    /// noise multiplier `z` (0 for none) reached by `min_survivors` devices,
    /// sized for sums of at most `max_survivors` devices.
    pub fn plan(
        dim: usize,
        clip: f64,
        z: f64,
        min_survivors: usize,
        max_survivors: usize,
        rotation_seed: u64,
    ) -> Result<Self, QuantiseError> {
        if dim == 0 || dim > 1 << 28 {
            return Err(QuantiseError::Config(format!(
                "length {dim} is outside 1..=2^28"
            )));
        }
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantiseError::Config(format!("clip {clip} must be > 0")));
        }
        if !(z.is_finite() && z >= 0.0) {
            return Err(QuantiseError::Config(format!(
                "noise multiplier {z} must be >= 0"
            )));
        }
        if min_survivors == 0 || max_survivors < min_survivors {
            return Err(QuantiseError::Config(format!(
                "survivors {min_survivors}..={max_survivors} are not a range of at least 1"
            )));
        }
        let padded = dim.next_power_of_two();
        let root_d = (padded as f64).sqrt();
        let n = max_survivors as f64;
        let r = (n / min_survivors as f64).sqrt();
        // n·(K·s·c/√d' + 1) + K·z·(s·c + √d')·r <= 2^31 − 1, with
        // Δ2 <= s·c + √d'.
        let room = f64::from(i32::MAX) - n - MARGIN * z * root_d * r;
        let per_sc = n * MARGIN / root_d + MARGIN * z * r;
        if room <= 0.0 {
            return Err(QuantiseError::Config(format!(
                "{max_survivors} devices of length {dim} with noise multiplier {z} do not fit in 32 bits"
            )));
        }
        // Finer than 2^12·√d' integers per clip norm buys little: the
        // rounding's share of the sensitivity is already about
        // 1/(2^12·√d').
        let scale = (room / (per_sc * clip)).min(RESOLUTION * root_d / clip);
        let mut q = Self {
            dim: dim as u32,
            padded: padded as u32,
            clip,
            scale,
            lambda: 0.0,
            rotation_seed,
        };
        if z > 0.0 {
            let (_, l2) = q.sensitivity();
            q.lambda = (z * l2).powi(2) / (2.0 * min_survivors as f64);
            if q.lambda > MAX_LAMBDA {
                return Err(QuantiseError::Config(format!(
                    "noise multiplier {z} needs a Skellam parameter above 2^50"
                )));
            }
        }
        q.validate()?;
        Ok(q)
    }

    /// Checks the fields (a quantiser from the wire is checked before use).
    pub fn validate(&self) -> Result<(), QuantiseError> {
        let ok = self.dim > 0
            && self.dim <= 1 << 28
            && self.padded == self.dim.next_power_of_two()
            && self.clip.is_finite()
            && self.clip > 0.0
            && self.scale.is_finite()
            && self.scale > 0.0
            && self.lambda.is_finite()
            && self.lambda >= 0.0
            && self.lambda <= MAX_LAMBDA;
        if ok {
            Ok(())
        } else {
            Err(QuantiseError::Config(format!("invalid settings {self:?}")))
        }
    }

    /// The bound `B` on a rounded vector's squared L2 norm.
    pub fn norm_bound_sq(&self) -> f64 {
        let sc = self.scale * self.clip;
        let d = f64::from(self.padded);
        let conditional =
            sc * sc + d / 4.0 + (2.0 * (1.0 / BETA).ln()).sqrt() * (sc + d.sqrt() / 2.0);
        conditional.min((sc + d.sqrt()).powi(2))
    }

    /// `(Δ1, Δ2)`: L1 and L2 sensitivity of the integer sum to one
    /// device's update (replaced by zero), in integer units.
    pub fn sensitivity(&self) -> (f64, f64) {
        let b = self.norm_bound_sq();
        let l2 = b.sqrt();
        (b.min(f64::from(self.padded).sqrt() * l2), l2)
    }

    /// The Skellam parameter of the sum of `survivors` devices' noise.
    pub fn total_mu(&self, survivors: usize) -> f64 {
        self.lambda * survivors as f64
    }

    /// The signs of the rotation.
    fn signs(&self) -> Vec<bool> {
        let mut rng = ChaCha20Rng::seed_from_u64(self.rotation_seed);
        (0..self.padded).map(|_| rng.random::<bool>()).collect()
    }

    /// Clips, rotates, scales, rounds and noises `update`: the device's
    /// input to the masked sum.
    pub fn encode(
        &self,
        update: &[f32],
        rng: &mut impl RngCore,
    ) -> Result<Vec<u32>, QuantiseError> {
        self.validate()?;
        if update.len() != self.dim as usize {
            return Err(QuantiseError::Input(format!(
                "{} values, the round's length is {}",
                update.len(),
                self.dim
            )));
        }
        if update.iter().any(|v| !v.is_finite()) {
            return Err(QuantiseError::Input("a NaN or infinite value".into()));
        }
        let norm = update
            .iter()
            .map(|&v| f64::from(v).powi(2))
            .sum::<f64>()
            .sqrt();
        let factor = if norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        let mut x = vec![0f64; self.padded as usize];
        for (xi, &v) in x.iter_mut().zip(update) {
            *xi = f64::from(v) * factor;
        }
        for (xi, s) in x.iter_mut().zip(self.signs()) {
            if s {
                *xi = -*xi;
            }
        }
        hadamard(&mut x);
        let k = self.scale / f64::from(self.padded).sqrt();
        for xi in &mut x {
            *xi *= k;
        }
        let bound = self.norm_bound_sq().floor() as u128;
        let mut rounded = vec![0i64; x.len()];
        let mut ok = false;
        for _ in 0..MAX_REDRAWS {
            let mut sq: u128 = 0;
            for (z, &xi) in rounded.iter_mut().zip(&x) {
                let f = xi.floor();
                let up = rng.random::<f64>() < xi - f;
                *z = f as i64 + i64::from(up);
                sq += (z.unsigned_abs() as u128).pow(2);
            }
            if sq <= bound {
                ok = true;
                break;
            }
        }
        if !ok {
            return Err(QuantiseError::Rounding);
        }
        if self.lambda > 0.0 {
            let poisson = Poisson::new(self.lambda)
                .map_err(|e| QuantiseError::Config(format!("Poisson({}): {e}", self.lambda)))?;
            for z in &mut rounded {
                let a = poisson.sample(rng) as i64;
                let b = poisson.sample(rng) as i64;
                *z += a - b;
            }
        }
        Ok(rounded.into_iter().map(|z| z as u32).collect())
    }

    /// The sum (of updates, with noise) that a sum of encoded inputs modulo
    /// 2^32 stands for, in the model's units and length.
    pub fn decode(&self, sum: &[u32]) -> Result<Vec<f32>, QuantiseError> {
        self.validate()?;
        if sum.len() != self.padded as usize {
            return Err(QuantiseError::Input(format!(
                "a sum of {} values, the round's padded length is {}",
                sum.len(),
                self.padded
            )));
        }
        let k = 1.0 / (self.scale * f64::from(self.padded).sqrt());
        let mut x: Vec<f64> = sum.iter().map(|&v| f64::from(v as i32) * k).collect();
        hadamard(&mut x);
        Ok(x.iter()
            .zip(self.signs())
            .take(self.dim as usize)
            .map(|(&v, s)| (if s { -v } else { v }) as f32)
            .collect())
    }
}

/// The unnormalised Walsh–Hadamard transform in place (`x.len()` a power
/// of two); applied twice it multiplies by the length.
pub fn hadamard(x: &mut [f64]) {
    let n = x.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for block in x.chunks_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*u, *v);
                *u = p + q;
                *v = p - q;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
    }

    /// Against the 4×4 Hadamard matrix written out.
    #[test]
    fn hadamard_matches_the_matrix() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        hadamard(&mut x);
        // rows: [1 1 1 1], [1 -1 1 -1], [1 1 -1 -1], [1 -1 -1 1]
        assert_eq!(x, vec![10.0, -2.0, -4.0, 0.0]);
    }

    /// Property: without noise, decoding the sum of encodings gives the sum
    /// of the clipped updates within the rounding error, for random
    /// lengths, cohorts and updates (some clipped).
    #[test]
    fn the_decoded_sum_is_the_sum_of_clipped_updates() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        for case in 0..40 {
            let dim = rng.random_range(1..3000usize);
            let n = rng.random_range(1..30usize);
            let clip = rng.random_range(0.1..10.0);
            let q = Quantiser::plan(dim, clip, 0.0, n, n, case).unwrap();
            let mut sum = vec![0u32; q.padded as usize];
            let mut expected = vec![0f64; dim];
            for _ in 0..n {
                let scale = rng.random_range(0.0..2.0) * clip / (dim as f64).sqrt();
                let u: Vec<f32> = (0..dim)
                    .map(|_| (rng.random_range(-1.0..1.0) * scale * 3.0) as f32)
                    .collect();
                let nm = norm(&u);
                let f = if nm > clip { clip / nm } else { 1.0 };
                for (e, &v) in expected.iter_mut().zip(&u) {
                    *e += f64::from(v) * f;
                }
                let enc = q.encode(&u, &mut rng).unwrap();
                for (s, v) in sum.iter_mut().zip(enc) {
                    *s = s.wrapping_add(v);
                }
            }
            let got = q.decode(&sum).unwrap();
            // Rounding moves each coordinate by < 1/s per device.
            let tol = n as f64 * (q.padded as f64).sqrt() / q.scale * 2.0 + 1e-6;
            let err: f64 = got
                .iter()
                .zip(&expected)
                .map(|(&g, &e)| (f64::from(g) - e).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(err <= tol, "case {case}: error {err} > {tol}");
        }
    }

    /// Property: every rounded vector meets the norm bound the
    /// sensitivity is computed from (checked on encodings without noise).
    #[test]
    fn rounded_vectors_meet_the_norm_bound() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        for case in 0..30 {
            let dim = rng.random_range(1..5000usize);
            // A coarse scale makes the rounding matter.
            let mut q = Quantiser::plan(dim, 1.0, 0.0, 1, 1, case).unwrap();
            q.scale = rng.random_range(0.5..50.0);
            let u: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
            let enc = q.encode(&u, &mut rng).unwrap();
            let sq: f64 = enc.iter().map(|&v| f64::from(v as i32).powi(2)).sum();
            assert!(
                sq <= q.norm_bound_sq(),
                "case {case}: {sq} > {}",
                q.norm_bound_sq()
            );
        }
    }

    /// The noise's variance is `2λ` per coordinate for each device.
    #[test]
    fn skellam_noise_has_its_variance() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut q = Quantiser::plan(1 << 14, 1.0, 0.0, 1, 1, 1).unwrap();
        q.lambda = 50.0;
        let zero = vec![0f32; 1 << 14];
        let enc = q.encode(&zero, &mut rng).unwrap();
        let vals: Vec<f64> = enc.iter().map(|&v| f64::from(v as i32)).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!(mean.abs() < 0.3, "mean {mean}");
        assert!(
            (var / 100.0 - 1.0).abs() < 0.05,
            "variance {var}, expected 100"
        );
    }

    #[test]
    fn the_noise_is_calibrated_to_the_sensitivity() {
        let q = Quantiser::plan(199_210, 1.0, 1.2, 50, 100, 1).unwrap();
        let (l1, l2) = q.sensitivity();
        assert!(l1 >= l2);
        // Fifty devices give the target: 2·50·λ = (z·Δ2)².
        let sigma = (2.0 * q.total_mu(50)).sqrt();
        assert!((sigma / (1.2 * l2) - 1.0).abs() < 1e-9);
        // The rounding's share of the sensitivity is small.
        assert!(
            l2 / (q.scale * q.clip) < 1.000_01,
            "{}",
            l2 / (q.scale * q.clip)
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let q = Quantiser::plan(10, 1.0, 1.0, 2, 4, 1).unwrap();
        assert!(q.encode(&[0.0; 9], &mut rng).is_err());
        let mut nan = vec![0.0f32; 10];
        nan[3] = f32::NAN;
        assert!(q.encode(&nan, &mut rng).is_err());
        assert!(q.decode(&[0; 10]).is_err());
        assert!(Quantiser::plan(0, 1.0, 1.0, 1, 1, 1).is_err());
        assert!(Quantiser::plan(10, f64::NAN, 1.0, 1, 1, 1).is_err());
        assert!(Quantiser::plan(10, 1.0, -1.0, 1, 1, 1).is_err());
        assert!(Quantiser::plan(10, 1.0, 1.0, 3, 2, 1).is_err());
        let mut bad = q;
        bad.padded = 3;
        assert!(bad.encode(&[0.0; 10], &mut rng).is_err());
    }
}
