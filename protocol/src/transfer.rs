//! Chunked, resumable transfer of objects named by their SHA-256.
//!
//! The sender cuts an object into chunks of at most [`CHUNK_SIZE`] bytes
//! ([`chunks`]). The receiver's [`Assembler`] accepts chunks in order,
//! ignores a resent chunk it already holds (after checking that it is the
//! same), reports how much it holds so an interrupted transfer resumes from
//! there, and verifies size and hash when the last byte arrives.

use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::message::{ObjectId, ObjectRef};

/// Largest chunk sent in one message: 256 KiB.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// `(offset, bytes)` of each chunk of `data` from `start`.
pub fn chunks(data: &[u8], start: u64) -> impl Iterator<Item = (u64, &[u8])> {
    let start = (start as usize).min(data.len());
    data[start..]
        .chunks(CHUNK_SIZE)
        .enumerate()
        .map(move |(i, c)| ((start + i * CHUNK_SIZE) as u64, c))
}

/// Receives one object.
#[derive(Debug, Clone)]
pub struct Assembler {
    target: ObjectRef,
    data: Vec<u8>,
}

impl Assembler {
    /// Starts receiving `target`, refusing objects larger than `max_size`.
    pub fn new(target: ObjectRef, max_size: u64) -> Result<Self, Error> {
        if target.size > max_size {
            return Err(Error::Chunk(format!(
                "object of {} bytes exceeds the limit of {max_size}",
                target.size
            )));
        }
        Ok(Self {
            target,
            data: Vec::new(),
        })
    }

    /// Resumes with bytes already held (e.g. from disk after a restart).
    pub fn resume(target: ObjectRef, max_size: u64, held: Vec<u8>) -> Result<Self, Error> {
        let mut a = Self::new(target, max_size)?;
        if held.len() as u64 > target.size {
            return Err(Error::Chunk("held bytes exceed the object size".into()));
        }
        a.data = held;
        Ok(a)
    }

    /// Bytes held; the sender resumes from here.
    pub fn received(&self) -> u64 {
        self.data.len() as u64
    }

    /// The object being received.
    pub fn target(&self) -> ObjectRef {
        self.target
    }

    /// Bytes held so far.
    pub fn held(&self) -> &[u8] {
        &self.data
    }

    /// Whether every byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.received() == self.target.size
    }

    /// Accepts a chunk at `offset`.
    pub fn accept(&mut self, offset: u64, bytes: &[u8]) -> Result<(), Error> {
        let end = offset
            .checked_add(bytes.len() as u64)
            .filter(|&e| e <= self.target.size)
            .ok_or_else(|| {
                Error::Chunk(format!(
                    "chunk [{offset}, +{}) runs past the object size {}",
                    bytes.len(),
                    self.target.size
                ))
            })?;
        let have = self.received();
        if offset > have {
            return Err(Error::Chunk(format!(
                "gap: chunk starts at {offset}, only {have} bytes held"
            )));
        }
        let overlap = (have - offset).min(bytes.len() as u64) as usize;
        if self.data[offset as usize..offset as usize + overlap] != bytes[..overlap] {
            return Err(Error::Chunk(format!(
                "resent bytes at {offset} differ from those held"
            )));
        }
        if end > have {
            self.data.extend_from_slice(&bytes[overlap..]);
        }
        Ok(())
    }

    /// The verified object, once complete.
    pub fn finish(self) -> Result<Vec<u8>, Error> {
        if !self.is_complete() {
            return Err(Error::Chunk(format!(
                "incomplete: {} of {} bytes",
                self.received(),
                self.target.size
            )));
        }
        let found = ObjectId(Sha256::digest(&self.data).into());
        if found != self.target.id {
            return Err(Error::HashMismatch {
                expected: self.target.id.to_string(),
                found: found.to_string(),
            });
        }
        Ok(self.data)
    }
}
