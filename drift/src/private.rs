//! Differentially private drift summaries.
//!
//! The unit of privacy is one served prediction: adding or removing one
//! input changes one bin of each feature histogram, one predicted-class
//! and one confidence bin, and — when its label arrived — one label bin and
//! the labelled and correct counts. Every count moves by at most 1, so the
//! L2 sensitivity of a summary is `√(features + 5)` ([`sensitivity`]).
//!
//! [`privatize`] adds discrete Gaussian noise of standard deviation (at
//! least) `noise_multiplier × sensitivity` to every count with
//! [`FastGaussian`], the exact sampler devices noise their updates with
//! (ChaCha20 seeded by the operating system; tested against opendp's
//! mechanism in `fleet_aggregation`). Its lattice `2^k·ℤ` has
//! `k = ⌈log₂ σ⌉ − 24 ≤ 0` for `σ < 2^24`, so integer counts lie on it and
//! are not moved by its rounding: the release is the discrete Gaussian
//! mechanism on that lattice, whose guarantee is the one on the integers
//! (both scaled by `2^-k`). Larger `σ` is refused. One window is one
//! release, accounted like one round of training with sampling rate 1 by
//! [`fleet_aggregation::privacy::accountant::ledger::PrivacyLedger`]; the
//! result is then post-processed into a valid summary: negative counts
//! become 0 and the correct count is capped at the labelled count.
//! Post-processing costs no privacy.

use super::sketch::{SketchSpec, Summary};
use fleet_aggregation::privacy::discrete::FastGaussian;
use fleet_aggregation::{Error, Result};

/// Noise standard deviations from here on would put a lattice coarser
/// than the integers under the counts.
const MAX_STD: f64 = (1u64 << 24) as f64;

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
    if std >= MAX_STD {
        return Err(Error::Config {
            field: "drift noise multiplier",
            reason: format!(
                "{noise_multiplier} gives a noise standard deviation of {std} counts; \
                 below {MAX_STD} is supported (the counts must lie on the noise's lattice)"
            ),
        });
    }
    if let Some(v) = [
        &summary.features,
        &summary.predicted,
        &summary.confidence,
        &summary.labels,
    ]
    .into_iter()
    .flatten()
    .chain([&summary.labeled, &summary.correct])
    .find(|v| v.fract() != 0.0)
    {
        return Err(Error::Privacy(format!(
            "drift summary count {v} is not an integer: its sensitivity is not the one accounted"
        )));
    }
    let mut noise = FastGaussian::from_os();
    for part in [
        &mut summary.features,
        &mut summary.predicted,
        &mut summary.confidence,
        &mut summary.labels,
    ] {
        noise.add(part, std)?;
    }
    let mut accuracy = [summary.labeled, summary.correct];
    noise.add(&mut accuracy, std)?;
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
    fn the_noise_has_the_configured_spread_and_lies_on_the_lattice() {
        let sp = spec();
        let z = 0.5;
        let want = z * sensitivity(&sp);
        let (k, _) = fleet_aggregation::privacy::discrete::grid_for(want);
        assert!(k <= 0, "integer counts lie on the lattice 2^{k}");
        let step = 2f64.powi(k);
        let mut diffs = Vec::new();
        for _ in 0..40 {
            let mut s = sp.empty();
            for v in s.features.iter_mut().chain(&mut s.predicted) {
                *v = 1e3;
            }
            privatize(&mut s, &sp, z).unwrap();
            diffs.extend(
                s.features
                    .iter()
                    .chain(&s.predicted)
                    .map(|v| f64::from(*v) - 1e3),
            );
        }
        // Every output is a lattice point, so it reveals nothing finer.
        assert!(diffs.iter().all(|d| (d / step).fract() == 0.0));
        assert!(
            diffs.iter().any(|d| d.fract() != 0.0),
            "finer than the integers"
        );
        let n = diffs.len() as f64;
        let mean = diffs.iter().sum::<f64>() / n;
        let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        // 920 draws: the sample standard deviation is within 10% with overwhelming probability.
        assert!((sd / want - 1.0).abs() < 0.1, "sd {sd} want {want}");
        assert!(mean.abs() < 4.0 * want / n.sqrt(), "mean {mean}");
    }

    #[test]
    fn counts_off_the_integers_and_huge_noise_are_refused() {
        let sp = spec();
        let mut s = sp.empty();
        s.features[0] = 0.5;
        let err = privatize(&mut s, &sp, 1.0).unwrap_err().to_string();
        assert!(err.contains("not an integer"), "{err}");
        let err = privatize(&mut sp.empty(), &sp, 1e7)
            .unwrap_err()
            .to_string();
        assert!(err.contains("below"), "{err}");
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
