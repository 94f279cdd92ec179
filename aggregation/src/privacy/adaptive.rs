//! Adaptive clipping to a target quantile (Andrew, Thakkar, McMahan and
//! Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
//! NeurIPS 2021).
//!
//! Each round, every client reports one bit: whether its update norm was at
//! most the current clip `C`. The server adds Gaussian noise of standard
//! deviation `σ_b` to the count, divides by the expected cohort `m` to get
//! `b̄`, and moves the clip geometrically towards the target quantile `γ`:
//!
//! ```text
//! C ← C · exp(−η · (b̄ − γ))
//! ```
//!
//! The bits are a second Gaussian query on the same clients, so the update
//! noise multiplier is raised to keep the total privacy cost equal to that
//! of a single query with multiplier `z` ([`update_noise_multiplier`]):
//! `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`.

use serde::{Deserialize, Serialize};

use super::noise::add_gaussian;
use crate::error::{Result, config};

/// State and settings of adaptive clipping.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClip {
    /// The current clip `C`.
    pub clip_norm: f64,
    /// Target quantile `γ` of update norms, in `(0, 1)`.
    pub target_quantile: f64,
    /// Geometric learning rate `η`.
    pub learning_rate: f64,
    /// Standard deviation `σ_b` of the noise on the count of unclipped clients.
    pub count_noise_std: f64,
}

impl AdaptiveClip {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(config(
                "clip_norm",
                format!("{} must be > 0", self.clip_norm),
            ));
        }
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(config(
                "target_quantile",
                format!("{} must be in (0, 1)", self.target_quantile),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(config(
                "learning_rate",
                format!("{} must be > 0", self.learning_rate),
            ));
        }
        if !(self.count_noise_std.is_finite() && self.count_noise_std >= 0.0) {
            return Err(config(
                "count_noise_std",
                format!("{} must be >= 0", self.count_noise_std),
            ));
        }
        Ok(())
    }

    /// Updates the clip from `unclipped` of the round's clients (out of an
    /// expected `expected_cohort`) having had norm `≤ C`; returns the new clip.
    pub fn update(&mut self, unclipped: usize, expected_cohort: usize) -> Result<f64> {
        self.validate()?;
        if expected_cohort == 0 {
            return Err(config("expected_cohort", "must be at least 1"));
        }
        let mut count = [unclipped as f32];
        if self.count_noise_std > 0.0 {
            add_gaussian(&mut count, self.count_noise_std)?;
        }
        let b = f64::from(count[0]) / expected_cohort as f64;
        self.clip_norm *= (-self.learning_rate * (b - self.target_quantile)).exp();
        Ok(self.clip_norm)
    }
}

/// The noise multiplier for the updates that keeps the privacy of
/// (updates with `z_Δ`) + (count with `σ_b`) equal to one query with `z`.
pub fn update_noise_multiplier(z: f64, count_noise_std: f64) -> Result<f64> {
    if count_noise_std == 0.0 {
        return Ok(z);
    }
    let inv = z.powi(-2) - (2.0 * count_noise_std).powi(-2);
    if inv.is_nan() || inv <= 0.0 {
        return Err(config(
            "count_noise_std",
            format!("σ_b = {count_noise_std} is too small for z = {z}: need σ_b > z/2"),
        ));
    }
    Ok(inv.powf(-0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_converges_to_the_target_quantile_without_noise() {
        // Norms uniform on [0, 10): the 0.5-quantile is 5.
        let norms: Vec<f64> = (0..1000).map(|i| i as f64 / 100.0).collect();
        let mut a = AdaptiveClip {
            clip_norm: 0.1,
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_std: 0.0,
        };
        for _ in 0..300 {
            let below = norms.iter().filter(|&&n| n <= a.clip_norm).count();
            a.update(below, norms.len()).unwrap();
        }
        assert!((a.clip_norm - 5.0).abs() < 0.1, "{}", a.clip_norm);
    }

    #[test]
    fn geometric_step_matches_the_formula() {
        let mut a = AdaptiveClip {
            clip_norm: 2.0,
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_std: 0.0,
        };
        let c = a.update(8, 10).unwrap();
        assert!((c - 2.0 * (-0.2f64 * 0.3).exp()).abs() < 1e-12);
    }

    #[test]
    fn noise_multiplier_adjustment() {
        // Andrew et al.: z = 1, σ_b = m/20 with m = 100 gives z_Δ = (1 − 1/100)^(−1/2).
        let z = update_noise_multiplier(1.0, 5.0).unwrap();
        assert!((z - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        assert!(update_noise_multiplier(1.0, 0.4).is_err());
        assert_eq!(update_noise_multiplier(1.3, 0.0).unwrap(), 1.3);
    }
}
