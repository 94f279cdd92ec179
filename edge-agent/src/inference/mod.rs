//! On-device inference: serve predictions from an exported artifact.
//!
//! - [`model`]: a [`Model`] is an artifact (`fleet_models::export`) whose
//!   SHA-256 and metadata were checked, parsed by tract, optimised once
//!   into a plan for any batch size, and trial-run; [`Model::predict`] runs
//!   a batch after checking its shape and finiteness.
//! - [`predictor`]: a [`Predictor`] serves the current model, hot-swaps to
//!   a new version without dropping requests, keeps the previous version for
//!   [`Predictor::rollback`], and feeds every prediction to an [`Observer`]
//!   (free when it is [`NoObserver`]).
//! - [`endpoint`]: the local Unix-socket endpoint for apps on the device,
//!   length-prefixed JSON (schema in the module and in `docs/inference.md`).
//! - [`input`]: examples from files (IDX images, raw pixels, raw float32)
//!   and readable answers, for `edge-agent predict <input>`.
//!
//! Errors are [`InferenceError`]s that say what was wrong and what to do;
//! a failed load or swap changes nothing.

pub mod endpoint;
mod error;
pub mod input;
pub mod model;
pub mod predictor;

#[cfg(test)]
mod tests;

pub use error::{InferenceError, Result};
pub use model::{Model, Predictions};
pub use predictor::{FnObserver, NoObserver, Observation, Observer, Predictor, Swap};
