//! The one error type of the crate.
//!
//! Every fallible entry point returns [`Error`]; each variant carries enough
//! context (file, field, expected and found values) for a person to act on it
//! without reading the code.

use std::path::PathBuf;

/// Errors raised while loading data, converting parameters or training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while reading a file.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A directory expected to hold Fashion-MNIST does not.
    #[error(
        "Fashion-MNIST not found in {dir} (missing {file}); install the Debian package \
         `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or pass the directory \
         that holds the four *-ubyte.gz files"
    )]
    DatasetMissing {
        /// The directory searched.
        dir: PathBuf,
        /// The first file not found there.
        file: String,
    },
    /// An IDX file is malformed (bad magic, truncated, inconsistent sizes).
    #[error("malformed IDX data in {source_name}: {reason}")]
    Idx {
        /// The file or buffer name.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A label is outside `0..classes`.
    #[error("label {label} at example {index} is out of range: expected 0..{classes}")]
    LabelOutOfRange {
        /// Position of the offending example.
        index: usize,
        /// The label found.
        label: u32,
        /// The number of classes.
        classes: usize,
    },
    /// A flat parameter vector has the wrong length for the layout.
    #[error("flat parameter vector has {found} values, but layout {fingerprint} needs {expected}")]
    FlatLength {
        /// Values the layout requires.
        expected: usize,
        /// Values received.
        found: usize,
        /// Fingerprint of the expected layout (hex).
        fingerprint: String,
    },
    /// A flat parameter vector was built for another layout.
    #[error("parameter layout mismatch: expected fingerprint {expected}, found {found}")]
    LayoutMismatch {
        /// Fingerprint of the expected layout (hex).
        expected: String,
        /// Fingerprint received (hex).
        found: String,
    },
    /// Examples do not have the shape the model expects.
    #[error(
        "shape mismatch: model {model} expects {expected} features per example, data has {found}"
    )]
    ShapeMismatch {
        /// The model description.
        model: String,
        /// Features the model expects.
        expected: usize,
        /// Features in the data.
        found: usize,
    },
    /// A configuration value is invalid.
    #[error("invalid {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid, with the allowed values.
        reason: String,
    },
    /// A value that must be finite is NaN or infinite.
    #[error("non-finite value in {what} at position {index}")]
    NonFinite {
        /// What held the value.
        what: &'static str,
        /// Its position.
        index: usize,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
