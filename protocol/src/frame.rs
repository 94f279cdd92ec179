//! Length-delimited frames: a little-endian `u32` payload length, then the
//! postcard encoding of one message.
//!
//! [`FrameDecoder`] is sans-IO: feed it whatever bytes arrived, take out
//! whole messages. A frame announcing more than the decoder's maximum is
//! refused as soon as its 4-byte header is seen, before any buffering, and a
//! payload that is not a valid message is an error, never a panic.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// Default maximum payload of one frame: 1 MiB (chunks are at most
/// [`crate::transfer::CHUNK_SIZE`], well below it).
pub const MAX_FRAME: usize = 1 << 20;

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let payload =
        postcard::to_stdvec(msg).expect("in-memory serialisation of plain data cannot fail");
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Decodes one message from a payload (without its length header).
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    let (msg, rest) =
        postcard::take_from_bytes::<T>(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(Error::Malformed(format!(
            "{} bytes after the message",
            rest.len()
        )));
    }
    Ok(msg)
}

/// Reassembles frames from a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads above `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends received bytes. Fails at once when a header announces an oversized frame.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.buf.extend_from_slice(bytes);
        self.check_header()
    }

    fn check_header(&self) -> Result<(), Error> {
        if self.buf.len() >= 4 {
            let size = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if size > self.max {
                return Err(Error::FrameTooLarge {
                    size,
                    max: self.max,
                });
            }
        }
        Ok(())
    }

    /// The next whole message, if one has arrived.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        self.check_header()?;
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let size = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if self.buf.len() < 4 + size {
            return Ok(None);
        }
        let msg = decode(&self.buf[4..4 + size]);
        self.buf.drain(..4 + size);
        msg.map(Some)
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}
