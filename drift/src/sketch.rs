//! What a device summarises: fixed features of its inputs on fixed bins, and
//! its model's predictions.
//!
//! **Features.** An input of `dim` values (a normalised image, or a feature
//! vector) is reduced to `2 + projections` numbers: its mean, its standard
//! deviation (brightness and contrast, for images) and `projections` sparse
//! random projections, each the signed sum of `taps` input values chosen by a
//! seeded generator, divided by `√taps` (these move with rotations, noise and
//! any change of the input's shape). Sparse taps keep the cost per input at
//! `dim + projections · taps` additions, small against a forward pass.
//!
//! **Bins.** Each feature has `bins` bins whose inner edges are quantiles of
//! the feature over training data ([`SketchSpec::fit`]), so on the training
//! distribution every bin holds about the same mass — the setting in which
//! the population stability index is most sensitive. The confidence (largest
//! softmax probability) has `confidence_bins` equal bins on `[1/classes, 1]`.
//!
//! **Summaries.** A [`Summary`] holds counts, not inputs: `f32` so that
//! noised counts (differential privacy) fit the same type. For the 2NN on
//! Fashion-MNIST with the default spec it is 132 numbers, about 0.5 KB on the
//! wire. [`Summary::check`] is what a receiver runs before merging.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Features summarised besides the projections: mean and standard deviation.
pub const MOMENT_FEATURES: usize = 2;

/// Why a summary or a spec was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SummaryError {
    /// A histogram has the wrong number of bins for the spec.
    #[error("{part} has {found} bins, the spec has {expected}")]
    Bins {
        /// Which histogram.
        part: &'static str,
        /// Bins the spec has.
        expected: usize,
        /// Bins received.
        found: usize,
    },
    /// A count is negative, NaN or infinite.
    #[error("{part} bin {index} has count {value} (counts must be finite and ≥ 0)")]
    Count {
        /// Which histogram.
        part: &'static str,
        /// Bin.
        index: usize,
        /// The count.
        value: f32,
    },
    /// The accuracy counts are inconsistent.
    #[error("{correct} correct out of {labeled} labelled predictions")]
    Accuracy {
        /// Correct predictions.
        correct: f32,
        /// Labelled predictions.
        labeled: f32,
    },
    /// An invalid spec.
    #[error("drift spec: {0}")]
    Spec(String),
}

impl SummaryError {
    /// A short stable label, for metrics (`drift_rejected{reason=…}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SummaryError::Bins { .. } => "bins",
            SummaryError::Count { .. } => "count",
            SummaryError::Accuracy { .. } => "accuracy",
            SummaryError::Spec(_) => "spec",
        }
    }
}

/// Which features are summarised and on which bins (one per model version).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SketchSpec {
    /// Values per input.
    pub dim: u32,
    /// Output classes of the model.
    pub classes: u16,
    /// Random projections.
    pub projections: u16,
    /// Input values per projection.
    pub taps: u16,
    /// Seed of the projections' taps and signs.
    pub seed: u64,
    /// Bins per feature.
    pub bins: u16,
    /// Bins of the confidence histogram.
    pub confidence_bins: u16,
    /// Inner bin edges, `bins − 1` ascending values per feature, feature after feature.
    pub edges: Vec<f32>,
}

/// Settings of [`SketchSpec::fit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitConfig {
    /// Random projections.
    pub projections: u16,
    /// Input values per projection.
    pub taps: u16,
    /// Bins per feature.
    pub bins: u16,
    /// Bins of the confidence histogram.
    pub confidence_bins: u16,
    /// Seed of the projections.
    pub seed: u64,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            projections: 8,
            taps: 16,
            bins: 10,
            confidence_bins: 10,
            seed: 0x5eed_d41f,
        }
    }
}

impl SketchSpec {
    /// Fits the bin edges to `inputs` (training data, `dim` values each): the
    /// inner edges of each feature are its `i / bins` quantiles.
    pub fn fit<'a>(
        dim: usize,
        classes: usize,
        inputs: impl IntoIterator<Item = &'a [f32]>,
        cfg: FitConfig,
    ) -> Result<Self, SummaryError> {
        let mut spec = SketchSpec {
            dim: u32::try_from(dim).map_err(|_| SummaryError::Spec("dim too large".into()))?,
            classes: u16::try_from(classes)
                .map_err(|_| SummaryError::Spec("too many classes".into()))?,
            projections: cfg.projections,
            taps: cfg.taps,
            seed: cfg.seed,
            bins: cfg.bins,
            confidence_bins: cfg.confidence_bins,
            edges: Vec::new(),
        };
        spec.check_shape()?;
        let sketcher = Sketcher::unfitted(&spec);
        let nf = spec.features();
        let mut columns: Vec<Vec<f32>> = vec![Vec::new(); nf];
        let mut row = vec![0.0; nf];
        for x in inputs {
            if x.len() != dim {
                return Err(SummaryError::Spec(format!(
                    "a fitting input has {} values, expected {dim}",
                    x.len()
                )));
            }
            sketcher.features(x, &mut row);
            for (c, &v) in columns.iter_mut().zip(&row) {
                c.push(v);
            }
        }
        let n = columns[0].len();
        if n < usize::from(spec.bins) {
            return Err(SummaryError::Spec(format!(
                "{n} fitting inputs for {} bins; give at least as many inputs as bins",
                spec.bins
            )));
        }
        let bins = usize::from(spec.bins);
        for c in &mut columns {
            c.sort_unstable_by(f32::total_cmp);
            for i in 1..bins {
                spec.edges.push(c[(i * n / bins).min(n - 1)]);
            }
        }
        spec.check()?;
        Ok(spec)
    }

    /// Features per input: mean, standard deviation and the projections.
    pub fn features(&self) -> usize {
        MOMENT_FEATURES + usize::from(self.projections)
    }

    fn check_shape(&self) -> Result<(), SummaryError> {
        let bad = |m: &str| Err(SummaryError::Spec(m.to_string()));
        if self.dim == 0 {
            return bad("dim must be > 0");
        }
        if self.classes < 2 {
            return bad("classes must be ≥ 2");
        }
        if self.bins < 2 || self.confidence_bins < 1 {
            return bad("bins must be ≥ 2 and confidence_bins ≥ 1");
        }
        if self.projections > 0 && (self.taps == 0 || u32::from(self.taps) > self.dim) {
            return bad("taps must be in 1..=dim");
        }
        Ok(())
    }

    /// Checks the spec's consistency (edges count and order).
    pub fn check(&self) -> Result<(), SummaryError> {
        self.check_shape()?;
        let per = usize::from(self.bins) - 1;
        if self.edges.len() != self.features() * per {
            return Err(SummaryError::Spec(format!(
                "{} edges, expected {} features × {per}",
                self.edges.len(),
                self.features()
            )));
        }
        for (f, e) in self.edges.chunks(per.max(1)).enumerate() {
            if e.iter().any(|v| !v.is_finite()) || e.windows(2).any(|w| w[0] > w[1]) {
                return Err(SummaryError::Spec(format!(
                    "edges of feature {f} must be finite and ascending"
                )));
            }
        }
        Ok(())
    }

    /// An empty summary shaped for this spec.
    pub fn empty(&self) -> Summary {
        Summary {
            features: vec![0.0; self.features() * usize::from(self.bins)],
            predicted: vec![0.0; usize::from(self.classes)],
            confidence: vec![0.0; usize::from(self.confidence_bins)],
            labels: vec![0.0; usize::from(self.classes)],
            labeled: 0.0,
            correct: 0.0,
        }
    }
}

/// A spec made ready for use: the projections' taps drawn once.
#[derive(Debug, Clone)]
pub struct Sketcher {
    spec: SketchSpec,
    /// `taps` input indices per projection.
    index: Vec<u32>,
    /// `taps` signs (±1/√taps) per projection.
    sign: Vec<f32>,
}

impl Sketcher {
    /// Prepares `spec` (checked).
    pub fn new(spec: SketchSpec) -> Result<Self, SummaryError> {
        spec.check()?;
        Ok(Self::unfitted(&spec))
    }

    fn unfitted(spec: &SketchSpec) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let taps = usize::from(spec.taps);
        let total = usize::from(spec.projections) * taps;
        let mut index = Vec::with_capacity(total);
        let mut sign = Vec::with_capacity(total);
        let scale = 1.0 / (taps.max(1) as f32).sqrt();
        for _ in 0..total {
            index.push(rng.random_range(0..spec.dim));
            sign.push(if rng.random::<bool>() { scale } else { -scale });
        }
        // Taps of a projection in input order: the gathers walk forward in memory.
        for p in 0..usize::from(spec.projections) {
            let r = p * taps..(p + 1) * taps;
            let mut pairs: Vec<(u32, f32)> = index[r.clone()]
                .iter()
                .copied()
                .zip(sign[r.clone()].iter().copied())
                .collect();
            pairs.sort_by_key(|&(i, _)| i);
            for (k, (i, g)) in pairs.into_iter().enumerate() {
                index[r.start + k] = i;
                sign[r.start + k] = g;
            }
        }
        Self {
            spec: spec.clone(),
            index,
            sign,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &SketchSpec {
        &self.spec
    }

    /// Writes the features of `x` into `out` (`spec.features()` values).
    pub fn features(&self, x: &[f32], out: &mut [f32]) {
        let n = x.len().max(1) as f32;
        // Eight independent lanes, so that the compiler can vectorise the sums.
        let (mut s, mut s2) = ([0.0f32; 8], [0.0f32; 8]);
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                s[k] += c[k];
                s2[k] += c[k] * c[k];
            }
        }
        for (k, &v) in rest.iter().enumerate() {
            s[k] += v;
            s2[k] += v * v;
        }
        let (s, s2): (f32, f32) = (s.iter().sum(), s2.iter().sum());
        let mean = s / n;
        out[0] = mean;
        out[1] = (s2 / n - mean * mean).max(0.0).sqrt();
        let taps = usize::from(self.spec.taps);
        if taps == 0 {
            return;
        }
        for (p, (idx, sg)) in self
            .index
            .chunks_exact(taps)
            .zip(self.sign.chunks_exact(taps))
            .enumerate()
        {
            let mut acc = 0.0f32;
            for (&i, &g) in idx.iter().zip(sg) {
                acc += g * x[i as usize];
            }
            out[MOMENT_FEATURES + p] = acc;
        }
    }

    /// Bin of value `v` of feature `f`: the number of inner edges ≤ `v`.
    fn bin(&self, f: usize, v: f32) -> usize {
        let per = usize::from(self.spec.bins) - 1;
        self.spec.edges[f * per..(f + 1) * per].partition_point(|&e| e <= v)
    }

    /// Bin of a confidence `c` in `[1/classes, 1]`.
    fn confidence_bin(&self, c: f32) -> usize {
        let k = usize::from(self.spec.confidence_bins);
        let lo = 1.0 / f32::from(self.spec.classes);
        let t = ((c - lo) / (1.0 - lo)).clamp(0.0, 1.0);
        ((t * k as f32) as usize).min(k - 1)
    }
}

/// Counts over a window, in a spec's bins. Merge by adding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Per-feature histograms, `bins` counts per feature, feature after feature.
    pub features: Vec<f32>,
    /// Predicted classes (empty counts when no prediction was made, e.g. for training data).
    pub predicted: Vec<f32>,
    /// Largest softmax probability of each prediction.
    pub confidence: Vec<f32>,
    /// True labels, where known.
    pub labels: Vec<f32>,
    /// Predictions whose label became known.
    pub labeled: f32,
    /// Of those, the correct ones.
    pub correct: f32,
}

impl Summary {
    /// Inputs summarised: the mass of the first feature's histogram.
    pub fn inputs(&self, spec: &SketchSpec) -> f64 {
        let bins = usize::from(spec.bins).min(self.features.len());
        self.features[..bins].iter().map(|&c| f64::from(c)).sum()
    }

    /// Predictions summarised.
    pub fn predictions(&self) -> f64 {
        self.predicted.iter().map(|&c| f64::from(c)).sum()
    }

    /// Checks the summary against `spec`: bin counts, finite non-negative
    /// counts, at most as many correct as labelled predictions.
    pub fn check(&self, spec: &SketchSpec) -> Result<(), SummaryError> {
        let parts: [(&'static str, &[f32], usize); 4] = [
            (
                "features",
                &self.features,
                spec.features() * usize::from(spec.bins),
            ),
            ("predicted", &self.predicted, usize::from(spec.classes)),
            (
                "confidence",
                &self.confidence,
                usize::from(spec.confidence_bins),
            ),
            ("labels", &self.labels, usize::from(spec.classes)),
        ];
        for (part, values, expected) in parts {
            if values.len() != expected {
                return Err(SummaryError::Bins {
                    part,
                    expected,
                    found: values.len(),
                });
            }
            if let Some((index, &value)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| !v.is_finite() || **v < 0.0)
            {
                return Err(SummaryError::Count { part, index, value });
            }
        }
        for (part, value) in [("labeled", self.labeled), ("correct", self.correct)] {
            if !value.is_finite() || value < 0.0 {
                return Err(SummaryError::Count {
                    part,
                    index: 0,
                    value,
                });
            }
        }
        if self.correct > self.labeled {
            return Err(SummaryError::Accuracy {
                correct: self.correct,
                labeled: self.labeled,
            });
        }
        Ok(())
    }

    /// Adds `other`'s counts (same spec, checked by the caller).
    pub fn merge(&mut self, other: &Summary) {
        for (a, b) in [
            (&mut self.features, &other.features),
            (&mut self.predicted, &other.predicted),
            (&mut self.confidence, &other.confidence),
            (&mut self.labels, &other.labels),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        self.labeled += other.labeled;
        self.correct += other.correct;
    }

    /// Histogram of feature `f`, given `bins` per feature.
    pub fn feature(&self, f: usize, bins: usize) -> &[f32] {
        &self.features[f * bins..(f + 1) * bins]
    }

    /// Accuracy of the labelled predictions, if any.
    pub fn accuracy(&self) -> Option<f64> {
        (self.labeled > 0.0).then(|| f64::from(self.correct) / f64::from(self.labeled))
    }
}

/// Accumulates a [`Summary`] one input at a time. No allocation per input.
#[derive(Debug, Clone)]
pub struct SummaryBuilder {
    sketcher: Sketcher,
    summary: Summary,
    scratch: Vec<f32>,
}

impl SummaryBuilder {
    /// An empty window for `sketcher`'s spec.
    pub fn new(sketcher: Sketcher) -> Self {
        let summary = sketcher.spec.empty();
        let scratch = vec![0.0; sketcher.spec.features()];
        Self {
            sketcher,
            summary,
            scratch,
        }
    }

    /// The spec.
    pub fn spec(&self) -> &SketchSpec {
        &self.sketcher.spec
    }

    fn add_features(&mut self, x: &[f32]) {
        self.sketcher.features(x, &mut self.scratch);
        let bins = usize::from(self.sketcher.spec.bins);
        for f in 0..self.scratch.len() {
            let b = self.sketcher.bin(f, self.scratch[f]);
            self.summary.features[f * bins + b] += 1.0;
        }
    }

    /// Records one training example: its features and label.
    pub fn observe_training(&mut self, x: &[f32], label: u8) {
        self.add_features(x);
        if let Some(c) = self.summary.labels.get_mut(usize::from(label)) {
            *c += 1.0;
        }
    }

    /// Records one prediction: the input, the model's logits and, where known, the true label.
    pub fn observe(&mut self, x: &[f32], logits: &[f32], label: Option<u8>) {
        self.add_features(x);
        let (mut best, mut max) = (0usize, f32::NEG_INFINITY);
        for (i, &v) in logits.iter().enumerate() {
            if v > max {
                (best, max) = (i, v);
            }
        }
        let denom: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
        let confidence = if denom.is_finite() && denom > 0.0 {
            1.0 / denom
        } else {
            0.0
        };
        if let Some(c) = self.summary.predicted.get_mut(best) {
            *c += 1.0;
        }
        let cb = self.sketcher.confidence_bin(confidence);
        self.summary.confidence[cb] += 1.0;
        if let Some(label) = label {
            if let Some(c) = self.summary.labels.get_mut(usize::from(label)) {
                *c += 1.0;
            }
            self.summary.labeled += 1.0;
            if usize::from(label) == best {
                self.summary.correct += 1.0;
            }
        }
    }

    /// Records the late label of a prediction of class `predicted` already
    /// summarised (its features and prediction were counted then).
    pub fn label(&mut self, predicted: usize, label: u8) {
        if let Some(c) = self.summary.labels.get_mut(usize::from(label)) {
            *c += 1.0;
            self.summary.labeled += 1.0;
            if usize::from(label) == predicted {
                self.summary.correct += 1.0;
            }
        }
    }

    /// Records a batch of predictions: `inputs` `[n, dim]`, `logits` `[n, classes]`.
    pub fn observe_batch(&mut self, inputs: &[f32], logits: &[f32], labels: Option<&[u8]>) {
        let dim = self.sketcher.spec.dim as usize;
        let classes = usize::from(self.sketcher.spec.classes);
        for (i, (x, l)) in inputs
            .chunks_exact(dim)
            .zip(logits.chunks_exact(classes))
            .enumerate()
        {
            self.observe(x, l, labels.and_then(|ls| ls.get(i).copied()));
        }
    }

    /// The window so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Ends the window: returns its summary and starts an empty one.
    pub fn take(&mut self) -> Summary {
        std::mem::replace(&mut self.summary, self.sketcher.spec.empty())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small spec for tests: 16 inputs, 3 classes, 2 moments and 3
    /// projections of 4 taps, 4 bins each.
    pub(crate) fn spec() -> SketchSpec {
        let inputs: Vec<Vec<f32>> = (0..100)
            .map(|i| (0..16).map(|j| ((i * 7 + j * 3) % 11) as f32).collect())
            .collect();
        let cfg = FitConfig {
            taps: 4,
            projections: 3,
            bins: 4,
            ..FitConfig::default()
        };
        SketchSpec::fit(16, 3, inputs.iter().map(Vec::as_slice), cfg).unwrap()
    }

    #[test]
    fn features_are_mean_std_and_signed_projections() {
        let sk = Sketcher::new(spec()).unwrap();
        let x: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let mut out = vec![0.0; 5];
        sk.features(&x, &mut out);
        assert!((out[0] - 7.5).abs() < 1e-5);
        // Population standard deviation of 0..16.
        assert!((out[1] - (255.0f32 / 12.0).sqrt()).abs() < 1e-4);
        for p in 0..3 {
            let taps = &sk.index[p * 4..(p + 1) * 4];
            let signs = &sk.sign[p * 4..(p + 1) * 4];
            let direct: f32 = taps.iter().zip(signs).map(|(&i, &s)| s * i as f32).sum();
            assert!((out[2 + p] - direct).abs() < 1e-5);
            assert!(signs.iter().all(|s| (s.abs() - 0.5).abs() < 1e-6));
        }
    }

    #[test]
    fn confidence_and_accuracy_are_counted() {
        let mut b = SummaryBuilder::new(Sketcher::new(spec()).unwrap());
        let x = [1.0f32; 16];
        // Uniform logits: confidence 1/3, the lowest bin.
        b.observe(&x, &[0.0, 0.0, 0.0], Some(0));
        // A confident prediction of class 2: the top bin.
        b.observe(&x, &[0.0, 0.0, 20.0], Some(1));
        let s = b.take();
        assert_eq!(s.predicted, vec![1.0, 0.0, 1.0]);
        assert_eq!(s.confidence.first(), Some(&1.0));
        assert_eq!(s.confidence.last(), Some(&1.0));
        assert_eq!((s.labeled, s.correct), (2.0, 1.0));
        assert_eq!(s.accuracy(), Some(0.5));
        assert_eq!(s.inputs(&spec()), 2.0);
        // `take` starts a fresh window.
        assert_eq!(b.summary().predictions(), 0.0);
    }

    #[test]
    fn merging_adds_counts() {
        let sp = spec();
        let mut b = SummaryBuilder::new(Sketcher::new(sp.clone()).unwrap());
        b.observe_training(&[2.0; 16], 1);
        let one = b.take();
        let mut two = one.clone();
        two.merge(&one);
        assert_eq!(two.inputs(&sp), 2.0);
        assert_eq!(two.labels[1], 2.0);
        assert!(two.check(&sp).is_ok());
    }

    #[test]
    fn bad_summaries_are_refused_with_a_reason() {
        let sp = spec();
        let mut s = sp.empty();
        s.features.pop();
        let e = s.check(&sp).unwrap_err();
        assert_eq!(e.reason(), "bins");
        assert!(
            e.to_string()
                .contains("features has 19 bins, the spec has 20"),
            "{e}"
        );
        let mut s = sp.empty();
        s.confidence[3] = -1.0;
        assert_eq!(s.check(&sp).unwrap_err().reason(), "count");
        let mut s = sp.empty();
        s.predicted[0] = f32::NAN;
        assert_eq!(s.check(&sp).unwrap_err().reason(), "count");
        let mut s = sp.empty();
        s.correct = 3.0;
        s.labeled = 2.0;
        assert_eq!(s.check(&sp).unwrap_err().reason(), "accuracy");
    }

    #[test]
    fn bad_specs_are_refused() {
        let mut sp = spec();
        sp.edges.swap(0, 2);
        sp.edges[0] = 100.0;
        assert!(Sketcher::new(sp).is_err());
        let few: Vec<Vec<f32>> = vec![vec![0.0; 4]; 3];
        assert!(
            SketchSpec::fit(4, 2, few.iter().map(Vec::as_slice), FitConfig::default()).is_err()
        );
    }
}
