//! Frames on QUIC streams: the thin async edge around [`crate::frame`].
//!
//! [`send`] writes one framed message; [`recv`] reads one, refusing a frame
//! whose header announces more than `max` bytes before reading its payload.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::frame::{decode, encode};

/// Errors of stream I/O.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer closed the stream before a whole frame arrived.
    #[error("stream closed")]
    Closed,
    /// Reading failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// Writing failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The frame was refused.
    #[error(transparent)]
    Frame(#[from] Error),
}

/// Writes one message.
pub async fn send<T: Serialize>(
    stream: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    stream.write_all(&encode(msg)).await?;
    Ok(())
}

/// Reads one message; `Ok(None)` when the peer finished the stream cleanly between frames.
pub async fn recv<T: DeserializeOwned>(
    stream: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    let mut header = [0u8; 4];
    match stream.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(StreamError::Closed),
        Err(e) => return Err(e.into()),
    }
    let size = u32::from_le_bytes(header) as usize;
    if size > max {
        return Err(Error::FrameTooLarge { size, max }.into());
    }
    let mut payload = vec![0u8; size];
    stream.read_exact(&mut payload).await?;
    Ok(Some(decode(&payload)?))
}
