//! Drift statistics: what a model sees and predicts, summarised on fixed bins,
//! and how far a summary is from a reference.
//!
//! The pieces, from the device to the verdict:
//!
//! - [`sketch`]: a [`SketchSpec`] fixes, for one model version, which
//!   features of an input are summarised (mean, standard deviation and a few
//!   sparse random projections) and the bin edges of each, fitted as
//!   quantiles of training data. A [`SummaryBuilder`] turns inputs, logits
//!   and (when known) labels into a [`Summary`]: per-feature histograms, the
//!   predicted-class and confidence histograms, the label histogram and
//!   accuracy counts. Summaries of the same spec merge by adding counts, so
//!   device windows become cohort and fleet windows without the inputs.
//! - [`stats`]: population stability index, Jensen–Shannon distance and the
//!   Kolmogorov–Smirnov statistic of two histograms on the same bins.
//! - [`score`]: a window's [`Scores`] against a [`Reference`] (covariate,
//!   label and confidence shift, accuracy drop).
//! - [`private`]: Gaussian noise on summaries (differential privacy per
//!   prediction), accounted like training rounds.
//! - [`detector`]: thresholds with hysteresis, so that a flag is raised only
//!   after a signal stays high and cleared only after it stays low.
//!
//! Everything here is a pure function of its inputs; nothing does I/O.

pub mod detector;
pub mod private;
pub mod score;
pub mod sketch;
pub mod stats;

pub use detector::{Flag, Hysteresis, Transition};
pub use score::{Reference, Scores, Signal};
pub use sketch::{FitConfig, SketchSpec, Sketcher, Summary, SummaryBuilder, SummaryError};
