//! Errors of the aggregation crate.
//!
//! [`Rejection`] is why one update was refused at `add` time; the aggregate
//! so far is untouched when it is returned, so callers can count the reason
//! and carry on. [`Error`] covers configuration and finishing.

use fleet_models::LayoutFingerprint;

/// Why an update was refused. The aggregator's state is unchanged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// The update was computed for another parameter layout.
    #[error("update has layout {found}, this round aggregates layout {expected}")]
    Layout {
        /// Layout of the round.
        expected: LayoutFingerprint,
        /// Layout of the update.
        found: LayoutFingerprint,
    },
    /// The update has the wrong number of values.
    #[error("update has {found} values, the layout has {expected}")]
    Length {
        /// Values the layout has.
        expected: usize,
        /// Values received.
        found: usize,
    },
    /// A value is NaN or infinite.
    #[error("update value {index} is {value} (NaN and infinities are refused)")]
    NonFinite {
        /// Position of the first such value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// The update's L2 norm exceeds the configured bound.
    #[error("update L2 norm {norm:.4} exceeds the bound {bound:.4}")]
    NormTooLarge {
        /// The update's norm.
        norm: f64,
        /// The bound.
        bound: f64,
    },
    /// The weight is not a finite positive number.
    #[error("update weight {0} must be a finite number > 0")]
    Weight(f64),
    /// A buffering rule is full.
    #[error("the rule buffers at most {capacity} updates and is full")]
    BufferFull {
        /// The configured capacity.
        capacity: usize,
    },
}

impl Rejection {
    /// A short stable label, for metrics (`rejected_updates{reason=…}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Layout { .. } => "layout",
            Rejection::Length { .. } => "length",
            Rejection::NonFinite { .. } => "non_finite",
            Rejection::NormTooLarge { .. } => "norm",
            Rejection::Weight(_) => "weight",
            Rejection::BufferFull { .. } => "buffer_full",
        }
    }
}

/// Configuration and finishing errors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid {field}: {reason}")]
    Config {
        /// The field.
        field: &'static str,
        /// Why, with the allowed values.
        reason: String,
    },
    /// Too few updates for the rule.
    #[error("{rule} needs at least {needed} updates, got {got}")]
    TooFew {
        /// The rule.
        rule: &'static str,
        /// Updates required.
        needed: usize,
        /// Updates accepted.
        got: usize,
    },
    /// Encoded bytes could not be decoded.
    #[error("cannot decode update: {0}")]
    Decode(String),
    /// The compute backend failed (a GPU driver error); the aggregate is lost.
    #[error("compute backend: {0}")]
    Compute(String),
    /// A differential-privacy parameter or computation failed.
    #[error("differential privacy: {0}")]
    Privacy(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Error {
    Error::Config {
        field,
        reason: reason.into(),
    }
}
