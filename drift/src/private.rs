//! Differentially private drift summaries.
//!
//! The unit of privacy is one served prediction: adding or removing one
//! input changes one bin of each feature histogram, one predicted-class
//! and one confidence bin, and — when its label arrived — one label bin and
//! the labelled and correct counts. Every count moves by at most 1, so the
//! L2 sensitivity of a summary is `√(features + 5)` ([`sensitivity`]).
//!
//! [`privatize`] adds opendp's discrete Gaussian noise on the integer grid
//! with standard deviation `noise_multiplier × sensitivity` to every count
//! (the Gaussian mechanism; one window is one release, accounted like one
//! round of training with sampling rate 1 by
//! [`fleet_aggregation::privacy::accountant::ledger::PrivacyLedger`]), then
//! post-processes the result into a valid summary: negative counts become
//! 0 and the correct count is capped at the labelled count. Post-processing
//! costs no privacy.

use super::sketch::{SketchSpec, Summary};
use fleet_aggregation::privacy::noise::add_gaussian_on_grid;
use fleet_aggregation::{Error, Result};

/// L2 sensitivity of a summary of `spec` to one prediction.
pub fn sensitivity(spec: &SketchSpec) -> f64 {
    ((spec.features() + 5) as f64).sqrt()
}

/// Adds Gaussian noise of standard deviation `noise_multiplier ×`
/// [`sensitivity`] to every count of `summary`, then makes it valid again.
pub fn privatize(summary: &mut Summary, spec: &SketchSpec, noise_multiplier: f64) -> Result<()> {
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(Error::Config {
            field: "drift noise multiplier",
            reason: format!("{noise_multiplier} must be a finite number > 0"),
        });
    }
    let std = noise_multiplier * sensitivity(spec);
    for part in [
        &mut summary.features,
        &mut summary.predicted,
        &mut summary.confidence,
        &mut summary.labels,
    ] {
        add_gaussian_on_grid(part, std, Some(0))?;
    }
    let mut accuracy = [summary.labeled, summary.correct];
    add_gaussian_on_grid(&mut accuracy, std, Some(0))?;
    [summary.labeled, summary.correct] = accuracy;
    for v in summary
        .features
        .iter_mut()
        .chain(&mut summary.predicted)
        .chain(&mut summary.confidence)
        .chain(&mut summary.labels)
        .chain([&mut summary.labeled, &mut summary.correct])
    {
        *v = v.max(0.0);
    }
    summary.correct = summary.correct.min(summary.labeled);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::sketch::tests::spec;
    use super::*;

    #[test]
    fn sensitivity_counts_every_histogram_one_prediction_touches() {
        // 5 features + predicted + confidence + label + labelled + correct.
        assert!((sensitivity(&spec()) - 10f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn the_noise_has_the_configured_spread_and_integer_values() {
        let sp = spec();
        let z = 0.5;
        let mut diffs = Vec::new();
        for _ in 0..40 {
            let mut s = sp.empty();
            for v in s.features.iter_mut().chain(&mut s.predicted) {
                *v = 1e6;
            }
            privatize(&mut s, &sp, z).unwrap();
            diffs.extend(
                s.features
                    .iter()
                    .chain(&s.predicted)
                    .map(|v| f64::from(*v) - 1e6),
            );
        }
        assert!(diffs.iter().all(|d| d.fract() == 0.0));
        let n = diffs.len() as f64;
        let mean = diffs.iter().sum::<f64>() / n;
        let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        let want = z * sensitivity(&sp);
        // 920 draws: the sample standard deviation is within 10% with overwhelming probability.
        assert!((sd / want - 1.0).abs() < 0.1, "sd {sd} want {want}");
        assert!(mean.abs() < 4.0 * want / n.sqrt(), "mean {mean}");
    }

    #[test]
    fn noised_summaries_stay_valid() {
        let sp = spec();
        for _ in 0..20 {
            let mut s = sp.empty();
            s.labeled = 2.0;
            s.correct = 2.0;
            privatize(&mut s, &sp, 2.0).unwrap();
            s.check(&sp).unwrap();
        }
        assert!(privatize(&mut sp.empty(), &sp, 0.0).is_err());
    }
}
