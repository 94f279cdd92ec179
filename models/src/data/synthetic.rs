//! The Synthetic(α, β) data of Li et al., "Federated Optimization in
//! Heterogeneous Networks" (FedProx, MLSys 2020).
//!
//! Each device `k` has its own softmax-regression model and its own input
//! distribution:
//!
//! ```text
//! u_k ~ N(0, α²)        B_k ~ N(0, β²)
//! W_k[i][j] ~ N(u_k, 1) b_k[i] ~ N(u_k, 1)        (10 × 60 and 10)
//! v_k[j] ~ N(B_k, 1)
//! x ~ N(v_k, Σ), Σ diagonal with Σ_jj = j^-1.2    (j = 1..60)
//! y = argmax(W_k x + b_k)
//! ```
//!
//! α controls how much the local models differ, β how much the local inputs
//! differ; Synthetic(0, 0) is close to IID and Synthetic(1, 1) is the
//! paper's most heterogeneous setting. As in the authors' reference code, the
//! second parameter of `N` above is read as a standard deviation.
//!
//! A device's data depends only on `(seed, device)`: the generator is a
//! ChaCha8 stream selected by the device number, so a simulator can create a
//! device's examples lazily, on the rounds it is selected, and keep nothing
//! for idle devices.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::Dataset;
use crate::error::{Error, Result};

/// Parameters of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Spread of the local models (α).
    pub alpha: f64,
    /// Spread of the local input means (β).
    pub beta: f64,
    /// Features per example (60 in the paper).
    pub features: usize,
    /// Classes (10 in the paper).
    pub classes: usize,
    /// Seed of the whole population.
    pub seed: u64,
}

impl SyntheticConfig {
    /// The paper's shape (60 features, 10 classes) with the given α, β and seed.
    pub fn new(alpha: f64, beta: f64, seed: u64) -> Self {
        Self {
            alpha,
            beta,
            features: 60,
            classes: 10,
            seed,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "alpha",
                reason: format!("{} must be a finite number >= 0", self.alpha),
            });
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return Err(Error::InvalidConfig {
                field: "beta",
                reason: format!("{} must be a finite number >= 0", self.beta),
            });
        }
        if self.features == 0 || !(2..=256).contains(&self.classes) {
            return Err(Error::InvalidConfig {
                field: "features/classes",
                reason: format!(
                    "{} features and {} classes; need at least 1 feature and 2..=256 classes",
                    self.features, self.classes
                ),
            });
        }
        Ok(())
    }

    /// Generates `n` examples of device `device`.
    pub fn device(&self, device: u64, n: usize) -> Result<Dataset> {
        self.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(device);
        let (d, c) = (self.features, self.classes);
        let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> f64 {
            let z: f64 = StandardNormal.sample(rng);
            mean + std * z
        };
        let u = normal(&mut rng, 0.0, self.alpha);
        let b_mean = normal(&mut rng, 0.0, self.beta);
        let w: Vec<f64> = (0..c * d).map(|_| normal(&mut rng, u, 1.0)).collect();
        let b: Vec<f64> = (0..c).map(|_| normal(&mut rng, u, 1.0)).collect();
        let v: Vec<f64> = (0..d).map(|_| normal(&mut rng, b_mean, 1.0)).collect();
        let std: Vec<f64> = (1..=d).map(|j| (j as f64).powf(-1.2).sqrt()).collect();

        let mut features = Vec::with_capacity(n * d);
        let mut labels = Vec::with_capacity(n);
        let mut x = vec![0.0f64; d];
        for _ in 0..n {
            for j in 0..d {
                x[j] = normal(&mut rng, v[j], std[j]);
            }
            let mut best = (f64::NEG_INFINITY, 0usize);
            for (i, bi) in b.iter().enumerate() {
                let logit = bi
                    + w[i * d..(i + 1) * d]
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| a * b)
                        .sum::<f64>();
                if logit > best.0 {
                    best = (logit, i);
                }
            }
            features.extend(x.iter().map(|&v| v as f32));
            labels.push(best.1 as u8);
        }
        Dataset::new(features, labels, vec![d], c, Vec::new())
    }

    /// Number of examples of device `device` under the paper's power law:
    /// `lognormal(4, 2)` rounded, clamped to `[min, max]`, deterministic in `(seed, device)`.
    pub fn power_law_size(&self, device: u64, min: usize, max: usize) -> usize {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_5e7e_u64);
        rng.set_stream(device);
        let z: f64 = StandardNormal.sample(&mut rng);
        let n = (4.0 + 2.0 * z).exp().round() as usize;
        n.clamp(min, max.max(min))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_device_and_different_across_devices() {
        let cfg = SyntheticConfig::new(1.0, 1.0, 7);
        let a = cfg.device(3, 40).unwrap();
        let b = cfg.device(3, 40).unwrap();
        let c = cfg.device(4, 40).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.features(), c.features());
        assert_eq!(a.len(), 40);
        assert_eq!(a.dim(), 60);
    }

    #[test]
    fn heterogeneity_grows_with_alpha_and_beta() {
        // Mean of the per-device input means spreads with β.
        let spread = |beta: f64| {
            let cfg = SyntheticConfig::new(0.0, beta, 1);
            let means: Vec<f64> = (0..50)
                .map(|k| {
                    let ds = cfg.device(k, 50).unwrap();
                    ds.features().iter().map(|&v| v as f64).sum::<f64>()
                        / ds.features().len() as f64
                })
                .collect();
            let m = means.iter().sum::<f64>() / means.len() as f64;
            means.iter().map(|v| (v - m).powi(2)).sum::<f64>() / means.len() as f64
        };
        assert!(
            spread(1.0) > 4.0 * spread(0.0),
            "{} vs {}",
            spread(1.0),
            spread(0.0)
        );
    }

    #[test]
    fn invalid_parameters_are_named() {
        let e = SyntheticConfig::new(-1.0, 0.0, 1)
            .device(0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("alpha"), "{e}");
        let e = SyntheticConfig::new(0.0, f64::NAN, 1)
            .device(0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("beta"), "{e}");
    }
}
