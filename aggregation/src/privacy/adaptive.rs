//! Adaptive clipping to a target quantile (Andrew, Thakkar, McMahan and
//! Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
//! NeurIPS 2021).
//!
//! Each round, every aggregated update contributes one bit: whether its
//! norm was at most the round's clip `C` (the coordinator sees the update
//! before clipping it, so it computes the bit itself; devices send
//! nothing). The bits are centred, `b − ½`, so that one device moves their
//! sum by at most ½; Gaussian noise of standard deviation `σ_b` is added to
//! that sum, and with `n` reports and expected cohort `m`
//!
//! ```text
//! b̄ = (Σ(bᵢ − ½) + N(0, σ_b²)) / m + n / (2m)
//! C ← C · exp(−η · (b̄ − γ))
//! ```
//!
//! moves the clip geometrically towards the target quantile `γ` of the
//! update norms. The count is a second Gaussian query on the same devices,
//! of sensitivity ½ and noise `σ_b`, i.e. multiplier `2σ_b`. Together with
//! the sum of updates (sensitivity `C`, noise `z_Δ·C`) it is one Gaussian
//! mechanism of multiplier `z` with `z⁻² = z_Δ⁻² + (2σ_b)⁻²`: the updates get
//! `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)` ([`AdaptiveClipping::update_noise_multiplier`])
//! and the round is charged to the ledger as one step at `z`.

use serde::{Deserialize, Serialize};

#[cfg(feature = "opendp")]
use super::noise::add_gaussian;
use crate::error::{Result, config};

/// Settings of adaptive clipping; the clip starts at the task's clipping
/// norm.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveClipping {
    /// Target quantile `γ` of update norms, in `(0, 1)`.
    pub target_quantile: f64,
    /// Geometric learning rate `η` (`> 0`; 0.2 in Andrew et al.).
    pub learning_rate: f64,
    /// Standard deviation `σ_b` of the noise on the sum of centred bits
    /// (`m/20` in Andrew et al.); must exceed `z/2`.
    pub count_noise_std: f64,
}

impl AdaptiveClipping {
    /// Checks ranges, and that `σ_b` leaves the updates some noise for a
    /// task noise multiplier `z`.
    pub fn validate(&self, z: f64) -> Result<()> {
        if !(self.target_quantile > 0.0 && self.target_quantile < 1.0) {
            return Err(config(
                "target_quantile",
                format!("{} must be in (0, 1)", self.target_quantile),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(config(
                "learning_rate",
                format!("{} must be a finite number > 0", self.learning_rate),
            ));
        }
        self.update_noise_multiplier(z).map(|_| ())
    }

    /// The noise multiplier of the updates, `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`,
    /// so that updates and count together cost one step at `z`.
    pub fn update_noise_multiplier(&self, z: f64) -> Result<f64> {
        let s = self.count_noise_std;
        if !(s.is_finite() && s > 0.0) {
            return Err(config(
                "count_noise_std",
                format!(
                    "{s} must be a finite number > 0: the count of clipped updates is private too"
                ),
            ));
        }
        let inv = z.powi(-2) - (2.0 * s).powi(-2);
        if !(inv.is_finite() && inv > 0.0) {
            return Err(config(
                "count_noise_std",
                format!(
                    "σ_b = {s} is too small for z = {z}: the count alone would spend the round's \
                     budget; it must exceed z/2 = {}",
                    z / 2.0
                ),
            ));
        }
        Ok(inv.powf(-0.5))
    }

    /// The next round's clip, from `clip`, `unclipped` of the round's
    /// `reports` aggregated updates having had norm `≤ clip`, and the
    /// expected cohort `m`. Draws the count's noise (opendp's mechanism:
    /// feature `opendp`, which the coordinator enables).
    #[cfg(feature = "opendp")]
    pub fn next_clip(
        &self,
        clip: f64,
        unclipped: usize,
        reports: usize,
        expected_cohort: usize,
    ) -> Result<f64> {
        self.next_clip_with(clip, unclipped, reports, expected_cohort, |count| {
            add_gaussian(count, self.count_noise_std)
        })
    }

    #[cfg_attr(not(feature = "opendp"), allow(dead_code))]
    fn next_clip_with(
        &self,
        clip: f64,
        unclipped: usize,
        reports: usize,
        expected_cohort: usize,
        noise: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> Result<f64> {
        if unclipped > reports || expected_cohort == 0 {
            return Err(config(
                "reports",
                format!(
                    "{unclipped} unclipped of {reports} reports, expected cohort \
                     {expected_cohort}: the count cannot exceed the reports, nor the cohort be 0"
                ),
            ));
        }
        // Σ(bᵢ − ½): an integer or a half-integer, exact in f32.
        let mut centred = [unclipped as f32 - reports as f32 / 2.0];
        noise(&mut centred)?;
        let m = expected_cohort as f64;
        let b = f64::from(centred[0]) / m + reports as f64 / (2.0 * m);
        let next = clip * (-self.learning_rate * (b - self.target_quantile)).exp();
        if !(next.is_finite() && next > 0.0) {
            return Err(config(
                "clip_norm",
                format!("adaptive clipping reached {next} from {clip}"),
            ));
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(count_noise_std: f64) -> AdaptiveClipping {
        AdaptiveClipping {
            target_quantile: 0.5,
            learning_rate: 0.2,
            count_noise_std,
        }
    }

    #[test]
    fn the_clip_converges_to_the_target_quantile_without_noise() {
        // Norms uniform on [0, 10): the 0.5-quantile is 5.
        let norms: Vec<f64> = (0..1000).map(|i| i as f64 / 100.0).collect();
        let a = settings(1.0);
        let mut clip = 0.1;
        for _ in 0..300 {
            let below = norms.iter().filter(|&&n| n <= clip).count();
            clip = a
                .next_clip_with(clip, below, norms.len(), norms.len(), |_| Ok(()))
                .unwrap();
        }
        assert!((clip - 5.0).abs() < 0.1, "{clip}");
    }

    #[test]
    fn the_geometric_step_matches_the_formula_with_centred_bits() {
        let a = settings(1.0);
        // 8 of 10 reports unclipped, cohort 10, no noise: b̄ = 0.8.
        let c = a.next_clip_with(2.0, 8, 10, 10, |_| Ok(())).unwrap();
        assert!((c - 2.0 * (-0.2f64 * 0.3).exp()).abs() < 1e-12);
        // The noise lands on the centred sum: 8 − 5 = 3, plus 1.5, over 10.
        let c = a
            .next_clip_with(2.0, 8, 10, 10, |x| {
                assert_eq!(x, [3.0]);
                x[0] += 1.5;
                Ok(())
            })
            .unwrap();
        assert!((c - 2.0 * (-0.2f64 * (0.95 - 0.5)).exp()).abs() < 1e-12);
        assert!(a.next_clip_with(2.0, 11, 10, 10, |_| Ok(())).is_err());
        // With real noise the clip still moves the right way on average.
        #[cfg(feature = "opendp")]
        {
            let noisy = settings(0.5);
            let mean: f64 = (0..200)
                .map(|_| noisy.next_clip(1.0, 100, 100, 100).unwrap())
                .sum::<f64>()
                / 200.0;
            assert!(mean < 1.0, "all unclipped: the clip shrinks, {mean}");
        }
    }

    #[test]
    fn update_noise_leaves_the_joint_mechanism_at_z() {
        // Andrew et al.: z = 1, σ_b = m/20 = 5 for m = 100: the centred
        // count has multiplier 2σ_b = 10, so z_Δ = (1 − 1/100)^(−1/2).
        let z = settings(5.0).update_noise_multiplier(1.0).unwrap();
        assert!((z - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-12);
        // Joint: 1/z_Δ² + 1/(2σ_b)² = 1/z².
        for (zt, s) in [(0.8, 3.0), (2.0, 1.5), (1.3, 10.0)] {
            let zd = settings(s).update_noise_multiplier(zt).unwrap();
            let joint = (zd.powi(-2) + (2.0 * s).powi(-2)).powf(-0.5);
            assert!((joint - zt).abs() < 1e-12, "{zt} {s}: {joint}");
        }
        // σ_b must exceed z/2, and be there at all.
        for s in [0.5, 0.4, 0.0, f64::NAN] {
            let e = settings(s).validate(1.0).unwrap_err().to_string();
            assert!(e.contains("count_noise_std"), "{s}: {e}");
        }
        let mut bad = settings(5.0);
        bad.target_quantile = 1.0;
        assert!(bad.validate(1.0).is_err());
        bad = settings(5.0);
        bad.learning_rate = 0.0;
        assert!(bad.validate(1.0).is_err());
    }
}
