//! The error type of on-device inference.

use fleet_models::export::ExportError;

/// Why an artifact could not be loaded or a prediction could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The artifact is damaged, truncated, has the wrong SHA-256 or
    /// unusable metadata.
    #[error("artifact rejected: {0}")]
    Artifact(#[from] ExportError),
    /// tract could not build a plan from the ONNX graph.
    #[error("artifact rejected: the ONNX graph cannot be planned ({reason})")]
    Plan {
        /// tract's explanation.
        reason: String,
    },
    /// The input does not have the model's shape.
    #[error(
        "input has {found} values, which is not a whole number (≥ 1) of examples of {features} \
         features; send [batch, {features}] values"
    )]
    Shape {
        /// Features per example the model reads.
        features: usize,
        /// Values received.
        found: usize,
    },
    /// An input value is NaN or infinite.
    #[error("input value {feature} of example {example} is {value}; inputs must be finite")]
    NonFinite {
        /// Example index in the batch.
        example: usize,
        /// Feature index in the example.
        feature: usize,
        /// The value found.
        value: f32,
    },
    /// Pixels were given to a model without image normalisation.
    #[error("model has no pixel normalisation in its metadata; send normalised `inputs` instead")]
    NoNormalization,
    /// tract failed while running the plan.
    #[error("inference failed: {reason}")]
    Run {
        /// tract's explanation.
        reason: String,
    },
    /// An input file cannot be read as examples for the model.
    #[error("input {path}: {reason}")]
    Input {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Rollback was asked for but no previous version is kept.
    #[error("no previous model version to roll back to")]
    NoPrevious,
}

/// Result alias of this module.
pub type Result<T, E = InferenceError> = std::result::Result<T, E>;
