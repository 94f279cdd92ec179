//! Differential privacy for federated averaging (DP-FedAvg, McMahan et al.,
//! 2018).
//!
//! Each client's update is clipped to L2 norm `C` ([`clip`]), so one client
//! changes the sum of a round by at most `C`. Gaussian noise of standard
//! deviation `z·C` on that sum, for a noise multiplier `z`, makes each round
//! a Gaussian mechanism; the [`accountant`] turns `z` and the number of
//! rounds into `(ε, δ)`. The coordinator does not sample devices Poisson
//! style (it takes the first devices that check in), so no amplification by
//! sampling is claimed: every round is charged as a full Gaussian step
//! (sampling rate 1).
//!
//! Noise is added either by the server on the sum ([`NoisePlacement::Server`],
//! the default), or by each client ([`NoisePlacement::Client`]) with
//! standard deviation `z·C/√m` for an expected cohort of `m`, so that the
//! sum over the cohort carries the same `z·C`. There is no secure
//! aggregation: with client noise the coordinator sees every update with
//! only its own noise, a Gaussian mechanism of multiplier `z/√m`
//! ([`DpConfig::per_update_noise_multiplier`]). If fewer than `m` clients
//! report, the sum carries less noise than planned; the coordinator
//! accounts for the updates it actually closes a round with (see
//! [`DpConfig::effective_noise_multiplier`]).
//!
//! Sensitivity, as the noise is calibrated: the noise is added by
//! [`discrete::FastGaussian`], which first rounds its input to a lattice of
//! step `2^k` (about `σ·2^-24`); that rounding adds up to `√d·2^k` to the
//! L2 distance between neighbouring inputs of `d` coordinates. On the
//! server the sum is also computed in floating point (f64, then f32), which
//! adds at most `2^-21·(n+1)·C` for `n` updates. The noise standard
//! deviation is raised so that it is at least `z` times the sensitivity
//! with both terms ([`noise_std_for`]); for real models they are below a
//! part in 10^4 of `C`.
//!
//! Update noise comes from [`discrete::FastGaussian`], an exact sampler of
//! the discrete Gaussian on a fine grid fitted to `σ` (with OS-seeded
//! ChaCha20), tested against opendp's Gaussian mechanism ([`noise`]) on the
//! same grid; opendp on f32's finest grid costs 17–22 s per million
//! values here, which would dominate a round.

pub mod accountant;
pub mod adaptive;
pub mod discrete;
#[cfg(feature = "opendp")]
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
    /// Adaptive clipping: the clip starts at `clip_norm` and follows a
    /// quantile of update norms (noise on the server only). Absent: a
    /// fixed clip.
    #[serde(default)]
    pub adaptive: Option<adaptive::AdaptiveClipping>,
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
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(config(
                "noise_multiplier",
                format!(
                    "{} must be a finite number > 0 (without noise there is no privacy to account)",
                    self.noise_multiplier
                ),
            ));
        }
        if self.expected_cohort == 0 {
            return Err(config("expected_cohort", "must be at least 1"));
        }
        if let Some(a) = &self.adaptive {
            if self.placement != NoisePlacement::Server {
                return Err(config(
                    "adaptive",
                    "adaptive clipping needs noise on the server: with noise on the devices \
                     each would have to send whether it was clipped, in the clear",
                ));
            }
            a.validate(self.noise_multiplier)?;
        }
        Ok(())
    }

    /// This configuration for a round whose clip is `clip_norm` (adaptive
    /// clipping moves it), with the noise multiplier the round's updates
    /// get: `z` with a fixed clip, `z_Δ` with adaptive clipping (the count
    /// of clipped updates takes the rest, see [`adaptive`]).
    pub fn for_round(&self, clip_norm: f64) -> Result<Self> {
        let noise_multiplier = match &self.adaptive {
            Some(a) => a.update_noise_multiplier(self.noise_multiplier)?,
            None => self.noise_multiplier,
        };
        Ok(Self {
            clip_norm,
            noise_multiplier,
            ..*self
        })
    }

    /// The noise multiplier of one update as the coordinator sees it: `z/√m`
    /// with client noise (there is no secure aggregation), 0 with server
    /// noise (the coordinator sees the clipped update as it is).
    pub fn per_update_noise_multiplier(&self) -> f64 {
        match self.placement {
            NoisePlacement::Client => self.noise_multiplier / (self.expected_cohort as f64).sqrt(),
            NoisePlacement::Server => 0.0,
        }
    }

    /// Nominal standard deviation of the noise one client adds, `z·C/√m`
    /// (0 when the server adds it); the sampler adds slightly more (see
    /// [`noise_std_for`]).
    pub fn client_noise_std(&self) -> f64 {
        match self.placement {
            NoisePlacement::Client => {
                self.noise_multiplier * self.clip_norm / (self.expected_cohort as f64).sqrt()
            }
            NoisePlacement::Server => 0.0,
        }
    }

    /// Nominal standard deviation of the noise the server adds to the sum,
    /// `z·C` (0 when clients add it); the sampler adds slightly more (see
    /// [`noise_std_for`]).
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

/// Scales `x` so that its L2 norm is at most `clip_norm`; returns the norm
/// before clipping. The bound holds for the values as stored (f32), the
/// rounding of the scaling and of the norm's own computation included: the
/// scaled vector is checked and shrunk again until it is within the bound
/// (and zeroed if that ever failed), so a clipped update never exceeds `C`.
pub fn clip(x: &mut [f32], clip_norm: f64) -> f64 {
    let norm = l2_norm(x);
    // The f64 sum of squares of `d` terms is within a relative `d·2^-53` of
    // the exact one; its square root within half that.
    let slack = 1.0 + x.len() as f64 * 2f64.powi(-52);
    let within = |x: &[f32]| l2_norm(x) * slack <= clip_norm;
    if within(x) {
        return norm;
    }
    if !norm.is_finite() {
        // Not clippable; left for the admission checks to refuse.
        return norm;
    }
    let s = (clip_norm / norm).min(1.0) as f32;
    x.iter_mut().for_each(|v| *v *= s);
    let shrink = 1.0 - 2f32.powi(-20);
    for _ in 0..64 {
        if within(x) {
            return norm;
        }
        x.iter_mut().for_each(|v| *v *= shrink);
    }
    x.iter_mut().for_each(|v| *v = 0.0);
    norm
}

/// The standard deviation to ask [`discrete::FastGaussian`] for so that the
/// noise on `d` coordinates is at least `multiplier` times the sensitivity
/// of what it is added to: `sensitivity` plus the lattice rounding's
/// [`discrete::rounding_sensitivity`] (which itself grows with the standard
/// deviation, hence the fixed point).
pub fn noise_std_for(multiplier: f64, sensitivity: f64, d: usize) -> Result<f64> {
    if !(multiplier.is_finite() && multiplier > 0.0) {
        return Err(config(
            "noise_multiplier",
            format!("{multiplier} must be a finite number > 0"),
        ));
    }
    if !(sensitivity.is_finite() && sensitivity > 0.0) {
        return Err(config(
            "sensitivity",
            format!("{sensitivity} must be a finite number > 0"),
        ));
    }
    let mut std = multiplier * sensitivity;
    for _ in 0..64 {
        let need = multiplier * (sensitivity + discrete::rounding_sensitivity(d, std));
        if std >= need {
            return Ok(std);
        }
        std = need;
    }
    Err(config(
        "noise_multiplier",
        format!(
            "{multiplier} on {d} coordinates: the lattice rounding's sensitivity grows as fast \
             as the noise"
        ),
    ))
}

/// The L2 sensitivity of the server's floating-point sum of `n` updates
/// clipped to `clip_norm`, between neighbouring rounds (one update more or
/// less): `C`, plus the rounding of the f64 sum, of the f32 mean and of the
/// f32 product back to the sum, `2^-21·(n+1)·C` (each of the two sums is
/// within a relative `2^-23 + (n+1)·2^-52` of the exact one, per
/// coordinate; the bound holds for `n < 2^20`).
pub fn server_sum_sensitivity(clip_norm: f64, n: usize) -> f64 {
    clip_norm * (1.0 + 2f64.powi(-21) * (n as f64 + 1.0))
}

/// What a client does to its update before encoding it: clip to `C` and,
/// with client placement, add noise of at least `z·C/√m` (the sensitivity
/// `C` plus the lattice rounding, times `z/√m`) to every coordinate.
/// Returns the norm before clipping (for adaptive clipping).
pub fn privatize_client_update(x: &mut [f32], dp: &DpConfig) -> Result<f64> {
    dp.validate()?;
    let norm = clip(x, dp.clip_norm);
    if dp.placement == NoisePlacement::Client {
        let std = noise_std_for(dp.per_update_noise_multiplier(), dp.clip_norm, x.len())?;
        discrete::FastGaussian::from_os().add(x, std)?;
    }
    Ok(norm)
}

/// What the server does to the sum of a round's `n` clipped updates before
/// dividing by the fixed denominator `m`: with server placement, add noise
/// of at least `z` times the sum's sensitivity ([`server_sum_sensitivity`]
/// plus the lattice rounding) to every coordinate. Returns the average
/// `sum/m`.
pub fn finish_private_sum(mut sum: Vec<f32>, n: usize, dp: &DpConfig) -> Result<Vec<f32>> {
    dp.validate()?;
    if dp.placement == NoisePlacement::Server {
        let sensitivity = server_sum_sensitivity(dp.clip_norm, n);
        let std = noise_std_for(dp.noise_multiplier, sensitivity, sum.len())?;
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
    finish_private_sum(mean.iter().map(|v| v * n).collect(), participants, dp)
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
            adaptive: None,
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
            adaptive: None,
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
        // No noise is no privacy: refused rather than passed to the ledger.
        for z in [0.0, -1.0, f64::INFINITY] {
            let dp = DpConfig {
                noise_multiplier: z,
                ..dp
            };
            let e = dp.validate().unwrap_err().to_string();
            assert!(
                e.contains("noise_multiplier") && e.contains("> 0"),
                "{z}: {e}"
            );
        }
    }

    #[test]
    fn clipping_holds_the_bound_exactly_as_stored() {
        // Vectors whose scaled f32 values round up: the stored norm must
        // still be within C, as computed, with the slack for the sum.
        let mut worst: f64 = 0.0;
        for seed in 0..200u32 {
            let mut x: Vec<f32> = (0..1000)
                .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 37.0 - 13.0)
                .collect();
            let c = 0.1 + f64::from(seed) * 0.013;
            clip(&mut x, c);
            let n = l2_norm(&x);
            assert!(
                n * (1.0 + 1000.0 * 2f64.powi(-52)) <= c,
                "{seed}: {n} > {c}"
            );
            worst = worst.max(n / c);
        }
        // And it is still a clip, not a shrink to nothing.
        assert!(worst > 1.0 - 1e-5, "{worst}");
        // Non-finite input is left for the admission checks.
        let mut bad = vec![f32::NAN, 1.0];
        assert!(clip(&mut bad, 1.0).is_nan());
    }

    #[test]
    fn noise_covers_the_lattice_rounding_and_the_float_sum() {
        use super::discrete::rounding_sensitivity;
        let d = 200_000;
        for (z, c) in [(1.0, 1.0), (0.5, 0.01), (3.0, 20.0)] {
            let std = noise_std_for(z, c, d).unwrap();
            assert!(std >= z * (c + rounding_sensitivity(d, std)), "{z} {c}");
            // And not much more than asked for.
            assert!(std < z * c * (1.0 + 1e-3), "{std}");
        }
        assert!(noise_std_for(0.0, 1.0, 10).is_err());
        assert!(noise_std_for(1.0, 0.0, 10).is_err());
        let s = server_sum_sensitivity(1.0, 100);
        assert!(s > 1.0 && s < 1.0 + 1e-4, "{s}");
    }
}
