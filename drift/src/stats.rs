//! Distances between two histograms on the same bins.
//!
//! Counts are normalised to probabilities first. PSI and the Jensen–Shannon
//! distance need every probability to be positive, so both histograms are
//! smoothed by adding [`SMOOTHING`] to every bin's probability and
//! renormalising (the usual practice for PSI; an empty bin would otherwise
//! give an infinite index). The Kolmogorov–Smirnov statistic is computed on
//! the unsmoothed cumulative distributions.

/// Probability added to every bin before PSI and Jensen–Shannon.
pub const SMOOTHING: f64 = 1e-4;

fn normalised(counts: &[f32], smoothing: f64) -> Vec<f64> {
    let total: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    let k = counts.len() as f64;
    if total <= 0.0 {
        return vec![1.0 / k; counts.len()];
    }
    counts
        .iter()
        .map(|&c| (f64::from(c) / total + smoothing) / (1.0 + smoothing * k))
        .collect()
}

/// Population stability index `Σ (p − q) ln(p / q)` of `actual` against
/// `expected`. 0 for identical histograms; by a common convention below 0.1
/// is stable, 0.1–0.25 a moderate shift, above 0.25 a large one.
pub fn psi(actual: &[f32], expected: &[f32]) -> f64 {
    debug_assert_eq!(actual.len(), expected.len());
    let p = normalised(actual, SMOOTHING);
    let q = normalised(expected, SMOOTHING);
    p.iter().zip(&q).map(|(p, q)| (p - q) * (p / q).ln()).sum()
}

/// Jensen–Shannon distance (the square root of the divergence, base 2), in `[0, 1]`.
pub fn js_distance(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let p = normalised(a, SMOOTHING);
    let q = normalised(b, SMOOTHING);
    let mut div = 0.0;
    for (p, q) in p.iter().zip(&q) {
        let m = 0.5 * (p + q);
        div += 0.5 * p * (p / m).log2() + 0.5 * q * (q / m).log2();
    }
    div.max(0.0).sqrt()
}

/// Kolmogorov–Smirnov statistic: the largest gap between the two cumulative
/// distributions, over the bin boundaries. In `[0, 1]`.
pub fn ks(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let p = normalised(a, 0.0);
    let q = normalised(b, 0.0);
    let (mut cp, mut cq, mut best) = (0.0f64, 0.0f64, 0.0f64);
    for (p, q) in p.iter().zip(&q) {
        cp += p;
        cq += q;
        best = best.max((cp - cq).abs());
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_histograms_are_at_distance_zero() {
        let h = [3.0, 5.0, 0.0, 2.0];
        assert!(psi(&h, &h).abs() < 1e-12);
        assert!(js_distance(&h, &h) < 1e-6);
        assert_eq!(ks(&h, &h), 0.0);
        // Scale does not matter: counts are normalised.
        let doubled = [6.0, 10.0, 0.0, 4.0];
        assert!(psi(&doubled, &h).abs() < 1e-12);
    }

    #[test]
    fn psi_matches_the_formula() {
        // p = (0.5, 0.5), q = (0.25, 0.75), without smoothing:
        // (0.25) ln 2 + (−0.25) ln(2/3) = 0.25 (ln 2 − ln 2/3) = 0.25 ln 3.
        let v = psi(&[1.0, 1.0], &[1.0, 3.0]);
        let exact = 0.25 * 3f64.ln();
        assert!((v - exact).abs() < 1e-3, "{v} vs {exact}");
        // Symmetric in its arguments.
        assert!((psi(&[1.0, 3.0], &[1.0, 1.0]) - v).abs() < 1e-12);
    }

    #[test]
    fn js_distance_of_disjoint_histograms_is_one() {
        let d = js_distance(&[1.0, 0.0], &[0.0, 1.0]);
        assert!(d > 0.99 && d <= 1.0, "{d}");
        // p = (0.5, 0.5), q = (1, 0): m = (0.75, 0.25);
        // JS = 0.5 [0.5 log2(2/3) + 0.5 log2 2] + 0.5 [log2(4/3)]
        let p = [1.0, 1.0];
        let q = [1.0, 0.0];
        let js = 0.5 * (0.5 * (0.5f64 / 0.75).log2() + 0.5 * (0.5f64 / 0.25).log2())
            + 0.5 * (1.0f64 / 0.75).log2();
        assert!((js_distance(&p, &q) - js.sqrt()).abs() < 1e-3);
    }

    #[test]
    fn ks_is_the_largest_cdf_gap() {
        // CDFs: a = (0.2, 0.6, 1.0), b = (0.5, 0.75, 1.0): gaps 0.3, 0.15, 0.
        let v = ks(&[1.0, 2.0, 2.0], &[2.0, 1.0, 1.0]);
        assert!((v - 0.3).abs() < 1e-12, "{v}");
        // A shift of all the mass to the last bin.
        assert!((ks(&[1.0, 0.0, 0.0], &[0.0, 0.0, 1.0]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn empty_histograms_are_uniform() {
        assert!(psi(&[0.0, 0.0], &[1.0, 1.0]).abs() < 1e-12);
    }
}
