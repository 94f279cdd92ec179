//! Serving with hot-swap and rollback, and the observation hook.
//!
//! A [`Predictor`] holds the current [`Model`] and the previous one behind a
//! lock that is held only to clone or replace an `Arc`, never while a model
//! runs. A request takes the current model at its start and finishes on it
//! even if a swap happens meanwhile, so a swap drops no request; the old
//! version is freed when its last request ends and it is no longer kept for
//! rollback. A new artifact is loaded and trial-run *before* the swap, so a
//! bad artifact leaves the current model serving.
//!
//! Every successful prediction is passed to the predictor's [`Observer`]
//! (drift statistics, for instance). The observer is a type parameter: with
//! the default [`NoObserver`] the call is an empty inline function and
//! compiles to nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::error::{InferenceError, Result};
use super::model::{Model, Predictions};

/// What an observer sees of one prediction.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Version of the model that answered.
    pub version: u64,
    /// Features per example.
    pub features: usize,
    /// The normalised inputs, `[batch, features]`.
    pub inputs: &'a [f32],
    /// Classes per example.
    pub classes: usize,
    /// The logits, `[batch, classes]`.
    pub logits: &'a [f32],
    /// Id of the first row's prediction; row `r` has id `first_id + r`.
    pub first_id: u64,
}

/// Receives every successful prediction. Called on the request's thread,
/// after the model ran; keep it short (e.g. update running statistics).
pub trait Observer: Send + Sync + 'static {
    /// Records one prediction.
    fn observe(&self, observation: &Observation<'_>);

    /// The true label of prediction `id` became known. Observers that do
    /// not track labels refuse it.
    fn label(&self, id: u64, label: usize) -> Result<(), String> {
        let _ = (id, label);
        Err("this predictor does not record labels".into())
    }
}

/// The observer that does nothing, at no cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl Observer for NoObserver {
    #[inline(always)]
    fn observe(&self, _: &Observation<'_>) {}
}

/// A shared observer (the agent keeps a handle to read what it collected).
impl<O: Observer> Observer for Arc<O> {
    #[inline(always)]
    fn observe(&self, observation: &Observation<'_>) {
        (**self).observe(observation)
    }

    fn label(&self, id: u64, label: usize) -> Result<(), String> {
        (**self).label(id, label)
    }
}

/// An observer from a closure.
#[derive(Debug, Clone, Copy, Default)]
pub struct FnObserver<F>(pub F);

impl<F: Fn(&Observation<'_>) + Send + Sync + 'static> Observer for FnObserver<F> {
    fn observe(&self, observation: &Observation<'_>) {
        (self.0)(observation)
    }
}

#[derive(Debug)]
struct Slots {
    current: Arc<Model>,
    previous: Option<Arc<Model>>,
}

/// Serves predictions from the current model; see the module docs.
#[derive(Debug)]
pub struct Predictor<O: Observer = NoObserver> {
    slots: RwLock<Slots>,
    observer: O,
    /// Id of the next prediction.
    next_id: AtomicU64,
}

/// Versions before and after a swap or rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swap {
    /// Version that served before.
    pub from: u64,
    /// Version that serves now.
    pub to: u64,
}

impl Predictor<NoObserver> {
    /// A predictor serving `model`, without observer.
    pub fn new(model: Model) -> Self {
        Self::with_observer(model, NoObserver)
    }
}

impl<O: Observer> Predictor<O> {
    /// A predictor serving `model` that reports every prediction to `observer`.
    pub fn with_observer(model: Model, observer: O) -> Self {
        Self {
            slots: RwLock::new(Slots {
                current: Arc::new(model),
                previous: None,
            }),
            observer,
            next_id: AtomicU64::new(1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Slots> {
        // A panic while holding the lock cannot leave `Slots` half-written
        // (every write is one assignment), so poisoning is ignored.
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Slots> {
        self.slots.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The model serving now.
    pub fn current(&self) -> Arc<Model> {
        Arc::clone(&self.read().current)
    }

    /// Versions of the current and of the kept previous model.
    pub fn versions(&self) -> (u64, Option<u64>) {
        let s = self.read();
        (
            s.current.version(),
            s.previous.as_ref().map(|m| m.version()),
        )
    }

    /// The observer.
    pub fn observer(&self) -> &O {
        &self.observer
    }

    /// Logits for a batch of normalised inputs, from the current model.
    pub fn predict(&self, inputs: &[f32]) -> Result<Predictions> {
        self.answer(inputs).map(|(_, p)| p)
    }

    /// Logits for 8-bit pixels, normalised as the current model's metadata says.
    pub fn predict_pixels(&self, pixels: &[u8]) -> Result<Predictions> {
        self.answer_pixels(pixels).map(|(_, p)| p)
    }

    /// Like [`Predictor::predict`], also returning the model that answered
    /// (for its labels: a swap may happen right after the call).
    pub fn answer(&self, inputs: &[f32]) -> Result<(Arc<Model>, Predictions)> {
        let model = self.current();
        let mut p = model.predict(inputs)?;
        self.observe(&model, inputs, &mut p);
        Ok((model, p))
    }

    /// Like [`Predictor::predict_pixels`], also returning the model that answered.
    pub fn answer_pixels(&self, pixels: &[u8]) -> Result<(Arc<Model>, Predictions)> {
        let model = self.current();
        let x = model.normalize_pixels(pixels)?;
        let mut p = model.predict(&x)?;
        self.observe(&model, &x, &mut p);
        Ok((model, p))
    }

    #[inline(always)]
    fn observe(&self, model: &Model, inputs: &[f32], p: &mut Predictions) {
        p.first_id = self.next_id.fetch_add(p.len() as u64, Ordering::Relaxed);
        self.observer.observe(&Observation {
            version: p.version,
            features: model.features(),
            inputs,
            classes: p.classes,
            logits: &p.logits,
            first_id: p.first_id,
        });
    }

    /// The true label of prediction `id` (from [`Predictions::first_id`])
    /// became known: tells the observer.
    pub fn label(&self, id: u64, label: usize) -> std::result::Result<(), String> {
        self.observer.label(id, label)
    }

    /// Makes `model` current; the current one becomes the previous.
    pub fn swap(&self, model: Model) -> Swap {
        let new = Arc::new(model);
        let mut s = self.write();
        let old = std::mem::replace(&mut s.current, new);
        let swap = Swap {
            from: old.version(),
            to: s.current.version(),
        };
        s.previous = Some(old);
        swap
    }

    /// Loads an artifact (checked against `expected_sha256`) and swaps to it.
    /// On any error the current model keeps serving and nothing changes.
    pub fn swap_bytes(&self, bytes: Vec<u8>, expected_sha256: Option<&str>) -> Result<Swap> {
        let model = Model::load(bytes, expected_sha256)?;
        Ok(self.swap(model))
    }

    /// Makes the previous model current again (and the current one previous).
    pub fn rollback(&self) -> Result<Swap> {
        let mut s = self.write();
        let previous = s.previous.take().ok_or(InferenceError::NoPrevious)?;
        let old = std::mem::replace(&mut s.current, previous);
        let swap = Swap {
            from: old.version(),
            to: s.current.version(),
        };
        s.previous = Some(old);
        Ok(swap)
    }
}
