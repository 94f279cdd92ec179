//! What a round's devices and its server send each other, by stage.
//!
//! These are the payloads; `fleet-protocol` carries them in its own
//! messages. Every length in them is bounded by the round's [`Params`]
//! and checked by the receiver ([`crate::device`], [`crate::server`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DeviceId;
use crate::shamir::Share;

/// Largest credential (a device certificate, DER) an advertisement carries.
pub const MAX_CREDENTIAL_LEN: usize = 4096;
/// Largest signature an advertisement carries.
pub const MAX_SIGNATURE_LEN: usize = 256;
/// Length of a share ciphertext: two shares (33 bytes each) and the tag.
pub const CIPHERTEXT_LEN: usize = 2 * (1 + crate::shamir::SECRET_LEN) + 16;
/// Most neighbours a device may have (shares are points of GF(2^8)).
pub const MAX_DEGREE: usize = 254;

/// The settings every participant of a round agrees on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    /// Shares needed to reconstruct a device's secrets, out of its
    /// neighbours (`2..=degree`).
    pub threshold: u16,
    /// Neighbours of each device (rounded up to even; `<= 254`).
    pub degree: u16,
    /// Fewest masked inputs the round may finish with; below it the round
    /// is abandoned. The noise of each device is calibrated to it.
    pub min_survivors: u32,
    /// Length of every masked vector (the quantiser's padded length).
    pub length: u32,
}

impl Params {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<(), String> {
        let degree = usize::from(self.degree);
        if !(2..=MAX_DEGREE).contains(&degree) {
            return Err(format!(
                "secure aggregation: degree {degree} is outside 2..={MAX_DEGREE}"
            ));
        }
        if self.threshold < 2 || self.threshold > self.degree {
            return Err(format!(
                "secure aggregation: threshold {} is outside 2..={degree} (the degree)",
                self.threshold
            ));
        }
        if self.min_survivors < 2 {
            return Err("secure aggregation: a round needs at least 2 survivors".into());
        }
        if self.length == 0 {
            return Err("secure aggregation: vectors must not be empty".into());
        }
        Ok(())
    }
}

/// One round of one task: what every key, mask and ciphertext is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The task.
    pub task: u64,
    /// The round.
    pub round: u64,
    /// The attempt at the round (a retried round runs a fresh protocol).
    pub attempt: u32,
    /// The round's settings.
    pub params: Params,
}

impl Context {
    /// SHA-256 of everything in the context.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fleet-secagg v1");
        h.update(self.task.to_le_bytes());
        h.update(self.round.to_le_bytes());
        h.update(self.attempt.to_le_bytes());
        h.update(self.params.threshold.to_le_bytes());
        h.update(self.params.degree.to_le_bytes());
        h.update(self.params.min_survivors.to_le_bytes());
        h.update(self.params.length.to_le_bytes());
        h.finalize().into()
    }
}

/// A device's public keys for one round, signed with its identity key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// The device.
    pub device: DeviceId,
    /// X25519 key for encrypting shares to this device.
    pub cipher_key: [u8; 32],
    /// X25519 key for pairwise masks.
    pub mask_key: [u8; 32],
    /// What proves the identity key (a certificate), checked by the
    /// [`crate::Authenticator`].
    pub credential: Vec<u8>,
    /// The identity key's signature of [`Advertisement::signed_bytes`].
    pub signature: Vec<u8>,
}

impl Advertisement {
    /// The bytes the signature covers: the round's digest, the device and
    /// both keys.
    pub fn signed_bytes(
        digest: &[u8; 32],
        device: DeviceId,
        cipher_key: &[u8; 32],
        mask_key: &[u8; 32],
    ) -> Vec<u8> {
        let mut m = Vec::with_capacity(22 + 32 + 8 + 64);
        m.extend_from_slice(b"fleet-secagg advertise");
        m.extend_from_slice(digest);
        m.extend_from_slice(&device.to_le_bytes());
        m.extend_from_slice(cipher_key);
        m.extend_from_slice(mask_key);
        m
    }

    /// Checks with `auth` that the advertisement is signed by its device's
    /// identity key for the round of `digest`.
    pub fn verify(&self, digest: &[u8; 32], auth: &dyn crate::Authenticator) -> Result<(), String> {
        let signed = Self::signed_bytes(digest, self.device, &self.cipher_key, &self.mask_key);
        auth.verify(self.device, &self.credential, &signed, &self.signature)
    }

    /// Whether the lengths are within bounds.
    pub fn sizes_ok(&self) -> bool {
        self.credential.len() <= MAX_CREDENTIAL_LEN && self.signature.len() <= MAX_SIGNATURE_LEN
    }
}

/// Shares of one device's secrets, encrypted to one neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    /// The device whose secrets these are.
    pub from: DeviceId,
    /// The neighbour that can open it.
    pub to: DeviceId,
    /// ChaCha20-Poly1305 of both shares ([`CIPHERTEXT_LEN`] bytes).
    pub ciphertext: Vec<u8>,
}

/// A survivor's answer to the unmasking request: shares of its neighbours'
/// secrets, never both for one neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Reveal {
    /// Shares of the self-mask seeds of neighbours that sent masked input.
    pub self_masks: Vec<(DeviceId, Share)>,
    /// Shares of the mask keys of neighbours that dropped out after
    /// sharing.
    pub mask_keys: Vec<(DeviceId, Share)>,
}

/// A vector of 32-bit words, on the wire as little-endian bytes (4 bytes a
/// word, where postcard's variable-length integers would take up to 5 for
/// the uniformly random words of a masked input).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Words(pub Vec<u32>);

impl Serialize for Words {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(4 * self.0.len());
        for w in &self.0 {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        s.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for Words {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Words;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes, a multiple of 4")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Words, E> {
                if !v.len().is_multiple_of(4) {
                    return Err(E::custom("a length that is not a multiple of 4"));
                }
                Ok(Words(
                    v.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                ))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Words, E> {
                self.visit_bytes(&v)
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// From the server to one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMessage {
    /// Stage 2: the advertisements of the device's neighbours.
    Neighbours(Vec<Advertisement>),
    /// Stage 3: the shares the device's neighbours encrypted to it.
    Shares(Vec<EncryptedShare>),
    /// Stage 4: which neighbours sent masked input and which dropped out.
    Unmask {
        /// Neighbours whose masked input arrived (reveal their self-mask
        /// shares).
        survivors: Vec<DeviceId>,
        /// Neighbours that shared but sent no masked input (reveal their
        /// mask-key shares).
        dropped: Vec<DeviceId>,
    },
}

/// From one device to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceMessage {
    /// Stage 1.
    Advertise(Advertisement),
    /// Stage 2: one ciphertext per neighbour.
    Shares(Vec<EncryptedShare>),
    /// Stage 3: the masked, quantised input.
    Masked(Words),
    /// Stage 4.
    Reveal(Reveal),
}

impl DeviceMessage {
    /// The stage's name, for logs and metrics.
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Advertise(_) => "advertise",
            Self::Shares(_) => "share",
            Self::Masked(_) => "masked_input",
            Self::Reveal(_) => "unmask",
        }
    }
}
