//! A window's drift scores against a model version's reference.
//!
//! The reference has two parts. The **training** part holds the feature and
//! label histograms of the data the version was trained on. The
//! **baseline** part is what the same scope (fleet or cohort) served in the
//! first window(s) after the version was deployed. Drift is a change against
//! the baseline when there is one: a cohort that was always a little
//! different from the fleet's training mixture is not drifting, one whose
//! inputs change is. Without a baseline (the baseline windows themselves, or
//! a device), inputs are compared with the training data and predicted
//! classes with the training labels; confidence and accuracy have no
//! training-time reference and are not scored.
//!
//! Covariate shift is the largest PSI over the features; Jensen–Shannon and
//! Kolmogorov–Smirnov are reported for the same features. Label shift is the
//! PSI of the predicted-class histogram, confidence shift that of the
//! confidence histogram, and the accuracy drop is baseline minus window
//! accuracy on labelled predictions.

use serde::{Deserialize, Serialize};

use super::sketch::{SketchSpec, Summary};
use super::stats::{js_distance, ks, psi};

/// What a window is compared with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference<'a> {
    /// Training data: feature and label histograms.
    pub training: &'a Summary,
    /// What the same scope served right after the version was deployed.
    pub baseline: Option<&'a Summary>,
}

/// One kind of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// The inputs moved away from the training data (largest feature PSI).
    Covariate,
    /// The predicted classes moved (PSI of the predicted-class histogram).
    Label,
    /// The model's confidence moved (PSI of the confidence histogram).
    Confidence,
    /// Accuracy on labelled predictions fell (baseline minus window, in points of 1.0).
    Accuracy,
}

impl Signal {
    /// Every signal.
    pub const ALL: [Signal; 4] = [
        Signal::Covariate,
        Signal::Label,
        Signal::Confidence,
        Signal::Accuracy,
    ];

    /// Lower-case name (metrics label, CLI).
    pub fn name(self) -> &'static str {
        match self {
            Signal::Covariate => "covariate",
            Signal::Label => "label",
            Signal::Confidence => "confidence",
            Signal::Accuracy => "accuracy",
        }
    }
}

/// Scores of one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Whether inputs and predictions were compared with the scope's
    /// baseline (otherwise with the training data).
    pub against_baseline: bool,
    /// Inputs in the window.
    pub inputs: f64,
    /// Predictions in the window.
    pub predictions: f64,
    /// Largest per-feature PSI against the training data.
    pub covariate_psi: f64,
    /// The feature with that PSI (0 mean, 1 standard deviation, 2… projections).
    pub covariate_feature: usize,
    /// Largest per-feature Jensen–Shannon distance.
    pub covariate_js: f64,
    /// Largest per-feature Kolmogorov–Smirnov statistic.
    pub covariate_ks: f64,
    /// PSI of the predicted classes against the baseline (or the training labels).
    pub label_psi: Option<f64>,
    /// PSI of the confidence histogram against the baseline.
    pub confidence_psi: Option<f64>,
    /// Accuracy of the labelled predictions.
    pub accuracy: Option<f64>,
    /// Baseline accuracy minus window accuracy.
    pub accuracy_drop: Option<f64>,
}

impl Scores {
    /// The value a detector watches for `signal`, if the window has one.
    pub fn signal(&self, signal: Signal) -> Option<f64> {
        match signal {
            Signal::Covariate => (self.inputs > 0.0).then_some(self.covariate_psi),
            Signal::Label => self.label_psi,
            Signal::Confidence => self.confidence_psi,
            Signal::Accuracy => self.accuracy_drop,
        }
    }
}

/// Scores `window` against `reference` (both shaped for `spec`).
pub fn score(window: &Summary, reference: Reference<'_>, spec: &SketchSpec) -> Scores {
    let bins = usize::from(spec.bins);
    let base = reference
        .baseline
        .filter(|b| b.inputs(spec) > 0.0 && b.predictions() > 0.0);
    let inputs_ref = base.unwrap_or(reference.training);
    let mut s = Scores {
        against_baseline: base.is_some(),
        inputs: window.inputs(spec),
        predictions: window.predictions(),
        covariate_psi: 0.0,
        covariate_feature: 0,
        covariate_js: 0.0,
        covariate_ks: 0.0,
        label_psi: None,
        confidence_psi: None,
        accuracy: window.accuracy(),
        accuracy_drop: None,
    };
    if s.inputs > 0.0 && inputs_ref.inputs(spec) > 0.0 {
        for f in 0..spec.features() {
            let (a, b) = (window.feature(f, bins), inputs_ref.feature(f, bins));
            let p = psi(a, b);
            if p > s.covariate_psi {
                s.covariate_psi = p;
                s.covariate_feature = f;
            }
            s.covariate_js = s.covariate_js.max(js_distance(a, b));
            s.covariate_ks = s.covariate_ks.max(ks(a, b));
        }
    }
    if s.predictions > 0.0 {
        match base {
            Some(base) => {
                s.label_psi = Some(psi(&window.predicted, &base.predicted));
                s.confidence_psi = Some(psi(&window.confidence, &base.confidence));
            }
            None if reference.training.labels.iter().any(|&c| c > 0.0) => {
                s.label_psi = Some(psi(&window.predicted, &reference.training.labels));
            }
            None => {}
        }
    }
    if let (Some(acc), Some(base)) = (s.accuracy, base.and_then(Summary::accuracy)) {
        s.accuracy_drop = Some(base - acc);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::sketch::{FitConfig, Sketcher, SummaryBuilder};
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn images(n: usize, rng: &mut ChaCha8Rng, shift: f32) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| {
                (0..64)
                    .map(|i| (i as f32 / 64.0) + rng.random::<f32>() + shift)
                    .collect()
            })
            .collect()
    }

    fn setup() -> (SketchSpec, Summary, ChaCha8Rng) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let train = images(4000, &mut rng, 0.0);
        let cfg = FitConfig {
            taps: 8,
            ..FitConfig::default()
        };
        let spec = SketchSpec::fit(64, 3, train.iter().map(Vec::as_slice), cfg).unwrap();
        let mut b = SummaryBuilder::new(Sketcher::new(spec.clone()).unwrap());
        for (i, x) in train.iter().enumerate() {
            b.observe_training(x, (i % 3) as u8);
        }
        (spec, b.take(), rng)
    }

    #[test]
    fn fitted_bins_hold_equal_mass_on_training_data() {
        let (spec, training, _) = setup();
        let bins = usize::from(spec.bins);
        for f in 0..spec.features() {
            for &c in training.feature(f, bins) {
                assert!((c - 400.0).abs() <= 40.0, "feature {f}: {c}");
            }
        }
    }

    #[test]
    fn a_shift_of_the_inputs_is_covariate_drift_and_fresh_data_is_not() {
        let (spec, training, mut rng) = setup();
        let reference = Reference {
            training: &training,
            baseline: None,
        };
        let sk = Sketcher::new(spec.clone()).unwrap();
        let window = |rng: &mut ChaCha8Rng, shift| {
            let mut b = SummaryBuilder::new(sk.clone());
            for x in images(2000, rng, shift) {
                b.observe(&x, &[0.0, 1.0, 0.5], Some(1));
            }
            b.take()
        };
        let same = score(&window(&mut rng, 0.0), reference, &spec);
        let shifted = score(&window(&mut rng, 0.1), reference, &spec);
        assert!(same.covariate_psi < 0.02, "{same:?}");
        assert!(shifted.covariate_psi > 0.2, "{shifted:?}");
        // The mean is the feature that moved most.
        assert_eq!(shifted.covariate_feature, 0);
        assert!(shifted.covariate_ks > same.covariate_ks);
        assert!(shifted.covariate_js > same.covariate_js);
        // Every prediction is class 1, against uniform training labels.
        assert!(same.label_psi.unwrap() > 1.0);
        assert!(!same.against_baseline);
        // Against a baseline that was already shifted, the shifted window is stable.
        let base = window(&mut rng, 0.1);
        let against = Reference {
            training: &training,
            baseline: Some(&base),
        };
        let s = score(&window(&mut rng, 0.1), against, &spec);
        assert!(s.against_baseline && s.covariate_psi < 0.02, "{s:?}");
        assert!(s.label_psi.unwrap() < 0.01);
    }

    #[test]
    fn accuracy_drop_needs_a_baseline() {
        let (spec, training, _) = setup();
        let mut w = spec.empty();
        w.labeled = 100.0;
        w.correct = 70.0;
        w.predicted[0] = 100.0;
        w.features[0] = 100.0;
        let mut reference = Reference {
            training: &training,
            baseline: None,
        };
        assert_eq!(score(&w, reference, &spec).accuracy_drop, None);
        let mut base = spec.empty();
        base.labeled = 100.0;
        base.correct = 85.0;
        base.predicted[0] = 100.0;
        base.features[0] = 100.0;
        reference.baseline = Some(&base);
        let d = score(&w, reference, &spec).accuracy_drop.unwrap();
        assert!((d - 0.15).abs() < 1e-9);
    }
}
