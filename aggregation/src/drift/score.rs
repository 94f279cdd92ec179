//! A window's drift scores against a model version's reference.
//!
//! The reference has two parts. The **training** part (feature and label
//! histograms of the data the version was trained on) is what the inputs
//! are compared with: covariate shift is the largest PSI over the features
//! (Jensen–Shannon and Kolmogorov–Smirnov are reported for the same
//! features). The **baseline** part is the fleet's serving summary in the
//! first window(s) after the version was deployed: a model's outputs have
//! no training-time reference, so label shift (predicted-class histogram),
//! confidence shift and the accuracy drop are measured against it. Without
//! a baseline yet, label shift falls back to the training labels.

use serde::{Deserialize, Serialize};

use super::sketch::{SketchSpec, Summary};
use super::stats::{js_distance, ks, psi};

/// What a window is compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// Training data: feature and label histograms.
    pub training: Summary,
    /// Serving baseline of the version: predicted classes, confidence, accuracy.
    pub baseline: Option<Summary>,
}

/// One kind of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
pub fn score(window: &Summary, reference: &Reference, spec: &SketchSpec) -> Scores {
    let bins = usize::from(spec.bins);
    let mut s = Scores {
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
    if s.inputs > 0.0 && reference.training.inputs(spec) > 0.0 {
        for f in 0..spec.features() {
            let (a, b) = (window.feature(f, bins), reference.training.feature(f, bins));
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
        match &reference.baseline {
            Some(base) if base.predictions() > 0.0 => {
                s.label_psi = Some(psi(&window.predicted, &base.predicted));
                s.confidence_psi = Some(psi(&window.confidence, &base.confidence));
            }
            _ if reference.training.labels.iter().any(|&c| c > 0.0) => {
                s.label_psi = Some(psi(&window.predicted, &reference.training.labels));
            }
            _ => {}
        }
    }
    if let (Some(acc), Some(base)) = (
        s.accuracy,
        reference.baseline.as_ref().and_then(Summary::accuracy),
    ) {
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

    fn setup() -> (SketchSpec, Reference, ChaCha8Rng) {
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
        let reference = Reference {
            training: b.take(),
            baseline: None,
        };
        (spec, reference, rng)
    }

    #[test]
    fn fitted_bins_hold_equal_mass_on_training_data() {
        let (spec, reference, _) = setup();
        let bins = usize::from(spec.bins);
        for f in 0..spec.features() {
            for &c in reference.training.feature(f, bins) {
                assert!((c - 400.0).abs() <= 40.0, "feature {f}: {c}");
            }
        }
    }

    #[test]
    fn a_shift_of_the_inputs_is_covariate_drift_and_fresh_data_is_not() {
        let (spec, reference, mut rng) = setup();
        let sk = Sketcher::new(spec.clone()).unwrap();
        let window = |rng: &mut ChaCha8Rng, shift| {
            let mut b = SummaryBuilder::new(sk.clone());
            for x in images(2000, rng, shift) {
                b.observe(&x, &[0.0, 1.0, 0.5], Some(1));
            }
            b.take()
        };
        let same = score(&window(&mut rng, 0.0), &reference, &spec);
        let shifted = score(&window(&mut rng, 0.1), &reference, &spec);
        assert!(same.covariate_psi < 0.02, "{same:?}");
        assert!(shifted.covariate_psi > 0.2, "{shifted:?}");
        // The mean is the feature that moved most.
        assert_eq!(shifted.covariate_feature, 0);
        assert!(shifted.covariate_ks > same.covariate_ks);
        assert!(shifted.covariate_js > same.covariate_js);
        // Every prediction is class 1, against uniform training labels.
        assert!(same.label_psi.unwrap() > 1.0);
    }

    #[test]
    fn accuracy_drop_needs_a_baseline() {
        let (spec, mut reference, _) = setup();
        let mut w = spec.empty();
        w.labeled = 100.0;
        w.correct = 70.0;
        assert_eq!(score(&w, &reference, &spec).accuracy_drop, None);
        let mut base = spec.empty();
        base.labeled = 100.0;
        base.correct = 85.0;
        reference.baseline = Some(base);
        let d = score(&w, &reference, &spec).accuracy_drop.unwrap();
        assert!((d - 0.15).abs() < 1e-9);
    }
}
