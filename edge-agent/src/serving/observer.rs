//! Drift summaries on the device: an [`Observer`] for the [`Predictor`]
//! that folds every prediction into the open window's
//! [`fleet_drift::Summary`].
//!
//! The spec (features and bins) comes from the coordinator with the model
//! version; until one is set the observer does nothing. The work per
//! prediction is the sketch's fixed cost (one pass over the input for mean
//! and standard deviation, `projections × taps` additions, one binary search
//! per feature, a softmax over the logits) under an uncontended mutex; no
//! allocation. With `sample_every = k` only every k-th prediction is
//! summarised (a deterministic stride, so the window's histograms are a
//! systematic sample of the traffic), which divides that cost by k;
//! `docs/benchmarks.md` measures both against inference itself.
//!
//! [`Predictor`]: crate::inference::Predictor

use std::sync::Mutex;

use fleet_drift::{SketchSpec, Sketcher, Summary, SummaryBuilder, SummaryError};

use crate::inference::{Observation, Observer};

/// Sampled predictions remembered for labels that arrive later.
pub const RECENT: usize = 1024;

/// The open window: its model version, summary, and the classes predicted
/// for the last [`RECENT`] sampled predictions (by id), for late labels.
#[derive(Debug)]
struct Window {
    version: u64,
    builder: SummaryBuilder,
    recent: Vec<(u64, u16)>,
}

/// Collects the drift summary of the predictions served.
#[derive(Debug)]
pub struct DriftObserver {
    window: Mutex<Option<Window>>,
    sample_every: u64,
}

impl Default for DriftObserver {
    fn default() -> Self {
        Self::sampling(1)
    }
}

impl DriftObserver {
    /// An observer of every prediction, without a spec (it records nothing yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// An observer of every `every`-th prediction: those whose id `i` has
    /// `(i − 1) mod every = 0`. With 0 it observes nothing and costs nothing.
    pub fn sampling(every: u64) -> Self {
        Self {
            window: Mutex::new(None),
            sample_every: every,
        }
    }

    /// Starts summarising predictions of model `version` on `spec`'s bins,
    /// dropping any open window.
    pub fn set_spec(&self, version: u64, spec: SketchSpec) -> Result<(), SummaryError> {
        let builder = SummaryBuilder::new(Sketcher::new(spec)?);
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Some(Window {
            version,
            builder,
            recent: vec![(0, 0); RECENT],
        });
        Ok(())
    }

    /// Closes the open window: the model version and its summary, if any
    /// prediction was recorded. A new window starts empty.
    pub fn take(&self) -> Option<(u64, Summary)> {
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard.as_mut()?;
        if w.builder.summary().predictions() == 0.0 {
            return None;
        }
        Some((w.version, w.builder.take()))
    }

    fn sampled(&self, id: u64) -> bool {
        self.sample_every > 0 && id.wrapping_sub(1).is_multiple_of(self.sample_every)
    }
}

impl Observer for DriftObserver {
    fn observe(&self, o: &Observation<'_>) {
        let k = self.sample_every;
        if k == 0 {
            return;
        }
        let rows = (o.inputs.len() / o.features.max(1)) as u64;
        // The first row of this batch that falls on the stride.
        let skip = (k - o.first_id.wrapping_sub(1) % k) % k;
        if skip >= rows {
            return;
        }
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = guard.as_mut()
            && w.version == o.version
            && w.builder.spec().dim as usize == o.features
            && usize::from(w.builder.spec().classes) == o.classes
        {
            for r in (skip as usize..rows as usize).step_by(k as usize) {
                let logits = &o.logits[r * o.classes..(r + 1) * o.classes];
                w.builder.observe(
                    &o.inputs[r * o.features..(r + 1) * o.features],
                    logits,
                    None,
                );
                let id = o.first_id + r as u64;
                let class = fleet_models::train::argmax(logits) as u16;
                w.recent[(id / k) as usize % RECENT] = (id, class);
            }
        }
    }

    /// Counts a late label into the open window. Labels of predictions that
    /// were not sampled are ignored; unknown, too old (more than [`RECENT`]
    /// sampled predictions ago, or from another window's model) or
    /// out-of-range ones are refused.
    fn label(&self, id: u64, label: usize) -> Result<(), String> {
        if self.sample_every == 0 {
            return Err("drift summaries are off on this device (--drift-sample-every 0)".into());
        }
        if !self.sampled(id) {
            return Ok(());
        }
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard
            .as_mut()
            .ok_or("no drift window is open (the coordinator has sent no sketch yet)")?;
        let classes = usize::from(w.builder.spec().classes);
        let label = u8::try_from(label)
            .ok()
            .filter(|&l| usize::from(l) < classes)
            .ok_or_else(|| format!("label {label} is not a class index (0..{classes})"))?;
        let slot = w.recent[(id / self.sample_every) as usize % RECENT];
        if slot.0 != id {
            return Err(format!(
                "prediction {id} is unknown or older than the last {RECENT} summarised predictions"
            ));
        }
        w.builder.label(usize::from(slot.1), label);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fleet_drift::sketch::FitConfig;

    /// A small sketch: 8 inputs, 3 classes (shared with the drift service's tests).
    pub(crate) fn spec() -> SketchSpec {
        let inputs: Vec<Vec<f32>> = (0..50).map(|i| vec![i as f32; 8]).collect();
        let cfg = FitConfig {
            taps: 2,
            projections: 2,
            ..FitConfig::default()
        };
        SketchSpec::fit(8, 3, inputs.iter().map(Vec::as_slice), cfg).unwrap()
    }

    fn observation<'a>(
        version: u64,
        inputs: &'a [f32],
        logits: &'a [f32],
        first_id: u64,
    ) -> Observation<'a> {
        Observation {
            version,
            features: 8,
            inputs,
            classes: 3,
            logits,
            first_id,
        }
    }

    #[test]
    fn records_predictions_of_its_version_only() {
        let o = DriftObserver::new();
        let x = [1.0f32; 16];
        let z = [0.0, 5.0, 0.0, 9.0, 0.0, 0.0];
        // No spec yet: nothing.
        o.observe(&observation(3, &x, &z, 1));
        assert!(o.take().is_none());
        o.set_spec(3, spec()).unwrap();
        o.observe(&observation(3, &x, &z, 3));
        // Another version, or another shape: ignored.
        o.observe(&observation(4, &x, &z, 5));
        let (version, s) = o.take().unwrap();
        assert_eq!(version, 3);
        assert_eq!(s.predicted, vec![1.0, 1.0, 0.0]);
        assert!(s.check(&spec()).is_ok());
        // The next window starts empty.
        assert!(o.take().is_none());
    }

    #[test]
    fn sampling_keeps_every_kth_prediction_across_batches() {
        let o = DriftObserver::sampling(3);
        o.set_spec(1, spec()).unwrap();
        let x = [1.0f32; 8 * 5];
        let z = [1.0f32, 0.0, 0.0].repeat(5);
        // Batches of 5, 5 and 1 (ids 1–11): ids 1, 4, 7 and 10 are kept.
        o.observe(&observation(1, &x, &z, 1));
        o.observe(&observation(1, &x, &z, 6));
        o.observe(&observation(1, &x[..8], &z[..3], 11));
        let (_, s) = o.take().unwrap();
        assert_eq!(s.predictions(), 4.0);
        // Off: nothing is recorded, and labels are refused with the reason.
        let off = DriftObserver::sampling(0);
        off.set_spec(1, spec()).unwrap();
        off.observe(&observation(1, &x, &z, 1));
        assert!(off.take().is_none());
        assert!(off.label(1, 0).unwrap_err().contains("off"));
    }

    #[test]
    fn late_labels_count_for_their_predictions() {
        let o = DriftObserver::sampling(2);
        o.set_spec(1, spec()).unwrap();
        let x = [1.0f32; 8 * 4];
        // Ids 1..=4 predict classes 0, 1, 2, 0; ids 1 and 3 are sampled.
        let z = [9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0, 9.0, 0.0, 0.0];
        o.observe(&observation(1, &x, &z, 1));
        o.label(1, 0).unwrap(); // correct
        o.label(3, 1).unwrap(); // wrong: predicted 2
        o.label(2, 1).unwrap(); // not sampled: ignored
        assert!(o.label(5, 0).unwrap_err().contains("unknown"));
        assert!(o.label(3, 7).unwrap_err().contains("not a class"));
        let (_, s) = o.take().unwrap();
        assert_eq!((s.labeled, s.correct), (2.0, 1.0));
        assert_eq!(s.labels, vec![1.0, 1.0, 0.0]);
        assert!(s.check(&spec()).is_ok());
    }
}
