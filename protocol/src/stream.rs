//! Frames on QUIC streams: the thin async edge around [`crate::frame`].
//!
//! [`send`] writes one framed message; [`recv`] reads one, refusing a frame
//! whose header announces more than `max` bytes before reading its payload.
//! The payload's buffer grows as its bytes arrive ([`Payload`]): a peer that
//! announces a large frame and sends nothing costs the reader nothing, and
//! one that sends part of it costs what it sent.

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

/// The payload of one frame being received: sans-IO. Its buffer never holds
/// more than twice the bytes that arrived (plus the last piece) and never
/// more than the announced size, so the announcement alone reserves nothing.
#[derive(Debug)]
pub struct Payload {
    buf: Vec<u8>,
    size: usize,
}

impl Payload {
    /// A payload announced as `size` bytes (already checked against the limit).
    pub fn new(size: usize) -> Self {
        Self {
            buf: Vec::new(),
            size,
        }
    }

    /// Bytes still missing.
    pub fn missing(&self) -> usize {
        self.size - self.buf.len()
    }

    /// Whether every announced byte arrived.
    pub fn is_complete(&self) -> bool {
        self.buf.len() == self.size
    }

    /// Bytes reserved for the payload so far.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Appends bytes that arrived; at most [`Payload::missing`] of them are taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let take = bytes.len().min(self.missing());
        let needed = self.buf.len() + take;
        if needed > self.buf.capacity() {
            // Doubling keeps appends amortised; the announced size caps it.
            let target = needed.max(2 * self.buf.capacity()).min(self.size);
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(&bytes[..take]);
        take
    }

    /// The whole payload.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
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
    let mut payload = Payload::new(size);
    while !payload.is_complete() {
        // quinn hands over the bytes it already buffers (bounded by the
        // stream's receive window); nothing is reserved ahead of them.
        match stream.read_chunk(payload.missing(), true).await {
            Ok(Some(chunk)) => {
                payload.push(&chunk.bytes);
            }
            Ok(None) => return Err(StreamError::Closed),
            Err(e) => return Err(quinn::ReadExactError::ReadError(e).into()),
        }
    }
    Ok(Some(decode(payload.bytes())?))
}

#[cfg(test)]
mod tests {
    use super::Payload;

    #[test]
    fn an_announced_frame_reserves_nothing_before_its_bytes() {
        let mut p = Payload::new(16 << 20);
        assert_eq!(p.capacity(), 0, "the announcement alone allocated");
        p.push(&[7; 1000]);
        assert!(p.capacity() < 4096, "{} bytes for 1000", p.capacity());
        // Growth stays within twice what arrived.
        for _ in 0..100 {
            p.push(&[7; 1000]);
        }
        assert!(p.capacity() <= 2 * 101_000, "{}", p.capacity());
        assert_eq!(p.missing(), (16 << 20) - 101_000);
    }

    #[test]
    fn a_payload_never_exceeds_its_announced_size() {
        let mut p = Payload::new(10);
        assert_eq!(p.push(&[1; 6]), 6);
        assert_eq!(p.push(&[2; 6]), 4, "only the missing bytes are taken");
        assert!(p.is_complete());
        assert_eq!(p.bytes(), &[1, 1, 1, 1, 1, 1, 2, 2, 2, 2]);
        assert!(p.capacity() <= 10, "{}", p.capacity());
    }
}
