//! Errors: those a peer is told about ([`WireError`]), and local decoding errors.

use serde::{Deserialize, Serialize};

/// Why a request was refused, as sent to the peer.
///
/// Encoded by its position: only append new codes at the end, and a new
/// code is still a wire change (an older peer cannot decode it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The peer speaks an incompatible protocol version.
    IncompatibleVersion,
    /// A frame or message could not be decoded.
    Malformed,
    /// A frame exceeded the maximum size.
    TooLarge,
    /// The device is not enrolled.
    UnknownDevice,
    /// The device's certificate has been revoked.
    Revoked,
    /// The message repeats one already processed.
    Replayed,
    /// The referenced round or task is not open.
    NoSuchRound,
    /// The update was refused by aggregation (the message says why).
    UpdateRejected,
    /// A transferred object does not match its announced hash or size.
    HashMismatch,
    /// The coordinator failed internally; try again later.
    Internal,
}

/// A typed error sent back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct WireError {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// A sentence for people.
    pub message: String,
}

/// Local errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A frame announced more bytes than allowed.
    #[error("frame of {size} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// Announced size.
        size: usize,
        /// Allowed size.
        max: usize,
    },
    /// A frame's payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A chunk does not fit the object being transferred.
    #[error("bad chunk: {0}")]
    Chunk(String),
    /// The assembled object's hash differs from the announced one.
    #[error("SHA-256 mismatch: expected {expected}, got {found}")]
    HashMismatch {
        /// Announced hash (hex).
        expected: String,
        /// Computed hash (hex).
        found: String,
    },
    /// The peer's protocol version is not supported.
    #[error("{0}")]
    Version(String),
}

impl Error {
    /// The code to send to the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::FrameTooLarge { .. } => ErrorCode::TooLarge,
            Error::Malformed(_) | Error::Chunk(_) => ErrorCode::Malformed,
            Error::HashMismatch { .. } => ErrorCode::HashMismatch,
            Error::Version(_) => ErrorCode::IncompatibleVersion,
        }
    }

    /// The error as sent to the peer.
    pub fn to_wire(&self) -> WireError {
        WireError {
            code: self.code(),
            message: self.to_string(),
        }
    }
}
