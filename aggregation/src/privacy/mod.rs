//! Differential privacy for federated averaging (DP-FedAvg, McMahan et al.,
//! 2018).
//!
//! Each client's update is clipped to L2 norm `C` ([`clip`]), so one client
//! changes the sum of a round by at most `C`. Gaussian noise of standard
//! deviation `z·C` on that sum, for a noise multiplier `z`, makes each round
//! a Gaussian mechanism; the [`accountant`] turns `z`, the sampling rate and
//! the number of rounds into `(ε, δ)`.
//!
//! Noise is added either by the server on the sum, or by each client
//! ([`NoisePlacement::Client`]) with standard deviation `z·C/√m` for an
//! expected cohort of `m`, so that the sum over the cohort carries the same
//! `z·C` ("distributed noise": the server never sees an unnoised update).
//! If fewer than `m` clients report, the sum carries less noise than
//! planned; the coordinator accounts for the cohort it actually closes a
//! round with (see [`DpConfig::effective_noise_multiplier`]).
//!
//! Update noise comes from [`discrete::FastGaussian`], an exact sampler of
//! the discrete Gaussian on a fine grid fitted to `σ` (with OS-seeded
//! ChaCha20), tested against opendp's Gaussian mechanism ([`noise`]) on the
//! same grid; opendp on f32's finest grid costs 17–22 s per million
//! values here, which would dominate a round.

pub mod accountant;
pub mod adaptive;
pub mod discrete;
pub mod noise;

use serde::{Deserialize, Serialize};

use crate::check::l2_norm;
use crate::error::{Result, config};

/// Where the Gaussian noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoisePlacement {
    /// By each client, `z·C/√m` each.
    Client,
    /// By the server, `z·C` on the sum.
    Server,
}

/// Differential-privacy settings of a task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpConfig {
    /// L2 clipping norm `C` of each client update.
    pub clip_norm: f64,
    /// Noise multiplier `z`: the noise standard deviation on the sum is `z·C`.
    pub noise_multiplier: f64,
    /// Where noise is added.
    pub placement: NoisePlacement,
    /// Expected number of clients per round `m`, the denominator of the average.
    pub expected_cohort: usize,
}

impl DpConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            return Err(config(
                "clip_norm",
                format!("{} must be a finite number > 0", self.clip_norm),
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
            return Err(config(
                "noise_multiplier",
                format!("{} must be a finite number >= 0", self.noise_multiplier),
            ));
        }
        if self.expected_cohort == 0 {
            return Err(config("expected_cohort", "must be at least 1"));
        }
        Ok(())
    }

    /// Standard deviation of the noise one client adds (0 when the server adds it).
    pub fn client_noise_std(&self) -> f64 {
        match self.placement {
            NoisePlacement::Client => {
                self.noise_multiplier * self.clip_norm / (self.expected_cohort as f64).sqrt()
            }
            NoisePlacement::Server => 0.0,
        }
    }

    /// Standard deviation of the noise the server adds to the sum (0 when clients add it).
    pub fn server_noise_std(&self) -> f64 {
        match self.placement {
            NoisePlacement::Client => 0.0,
            NoisePlacement::Server => self.noise_multiplier * self.clip_norm,
        }
    }

    /// The noise multiplier a round really had when `reported` clients' noise
    /// reached the sum: with client noise it is `z·√(reported/m)`.
    pub fn effective_noise_multiplier(&self, reported: usize) -> f64 {
        match self.placement {
            NoisePlacement::Client => {
                self.noise_multiplier * ((reported as f64) / self.expected_cohort as f64).sqrt()
            }
            NoisePlacement::Server => self.noise_multiplier,
        }
    }
}

/// Scales `x` so that its L2 norm is at most `clip_norm`; returns the norm before clipping.
pub fn clip(x: &mut [f32], clip_norm: f64) -> f64 {
    let norm = l2_norm(x);
    if norm > clip_norm {
        let s = (clip_norm / norm) as f32;
        x.iter_mut().for_each(|v| *v *= s);
    }
    norm
}

/// What a client does to its update before encoding it: clip to `C` and,
/// with client placement, add `N(0, (z·C)²/m)` to every coordinate.
/// Returns the norm before clipping (for adaptive clipping).
pub fn privatize_client_update(x: &mut [f32], dp: &DpConfig) -> Result<f64> {
    dp.validate()?;
    let norm = clip(x, dp.clip_norm);
    let std = dp.client_noise_std();
    if std > 0.0 {
        discrete::FastGaussian::from_os().add(x, std)?;
    }
    Ok(norm)
}

/// What the server does to the sum of a round's clipped updates before
/// dividing by the fixed denominator `m`: with server placement, add
/// `N(0, (z·C)²)` to every coordinate. Returns the average `sum/m`.
pub fn finish_private_sum(mut sum: Vec<f32>, dp: &DpConfig) -> Result<Vec<f32>> {
    dp.validate()?;
    let std = dp.server_noise_std();
    if std > 0.0 {
        discrete::FastGaussian::from_os().add(&mut sum, std)?;
    }
    let m = dp.expected_cohort as f32;
    sum.iter_mut().for_each(|v| *v /= m);
    Ok(sum)
}

/// A DP-FedAvg round's model delta from the unweighted mean of its
/// `participants` clipped updates: the mean is turned back into the sum,
/// then [`finish_private_sum`] divides by the fixed denominator `m` (adding
/// server noise when placed there). The simulator and the coordinator both
/// close private rounds with this.
pub fn private_round_delta(mean: &[f32], participants: usize, dp: &DpConfig) -> Result<Vec<f32>> {
    let n = participants as f32;
    finish_private_sum(mean.iter().map(|v| v * n).collect(), dp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_direction() {
        let mut x = vec![3.0f32, 4.0];
        assert_eq!(clip(&mut x, 1.0), 5.0);
        assert!((l2_norm(&x) - 1.0).abs() < 1e-6);
        assert!((x[0] / x[1] - 0.75).abs() < 1e-6);
        let mut small = vec![0.1f32, 0.1];
        clip(&mut small, 1.0);
        assert_eq!(small, vec![0.1, 0.1]);
    }

    #[test]
    fn client_noise_sums_to_the_target_multiplier() {
        let dp = DpConfig {
            clip_norm: 2.0,
            noise_multiplier: 1.5,
            placement: NoisePlacement::Client,
            expected_cohort: 25,
        };
        // 25 clients each with variance (zC)²/25 sum to variance (zC)².
        let per = dp.client_noise_std();
        assert!(((per * per * 25.0).sqrt() - 3.0).abs() < 1e-12);
        assert_eq!(dp.server_noise_std(), 0.0);
        assert!((dp.effective_noise_multiplier(16) - 1.5 * 0.8).abs() < 1e-12);
        let server = DpConfig {
            placement: NoisePlacement::Server,
            ..dp
        };
        assert_eq!(server.server_noise_std(), 3.0);
        assert_eq!(server.effective_noise_multiplier(3), 1.5);
    }

    #[test]
    fn invalid_settings_are_named() {
        let dp = DpConfig {
            clip_norm: 0.0,
            noise_multiplier: 1.0,
            placement: NoisePlacement::Server,
            expected_cohort: 10,
        };
        assert!(dp.validate().unwrap_err().to_string().contains("clip_norm"));
        let dp = DpConfig {
            clip_norm: 1.0,
            noise_multiplier: f64::NAN,
            ..dp
        };
        assert!(
            dp.validate()
                .unwrap_err()
                .to_string()
                .contains("noise_multiplier")
        );
    }
}
