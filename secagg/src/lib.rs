//! Secure aggregation: SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova,
//! CCS 2020) with distributed discrete noise, sans IO.
//!
//! The server learns the sum of the surviving devices' inputs and nothing
//! else about any one input. Each device masks its quantised update with a
//! pairwise mask for each neighbour on a random `k`-regular graph
//! ([`graph`]) and with a self mask, and gives each neighbour Shamir shares
//! ([`shamir`]) of its self-mask seed and of its mask key. Pairwise masks
//! cancel in the sum; the survivors' self masks and the masks left by
//! devices that dropped out are removed from shares the survivors reveal,
//! never both shares of one device.
//!
//! - [`device::Device`] is a device's side, [`server::Server`] the
//!   server's; both are plain state machines, so the simulator and the QUIC
//!   path run the same protocol.
//! - [`message`] holds what they send each other and the round's
//!   [`Context`], to which every key, mask and ciphertext is bound.
//! - [`crypto`]: X25519, HKDF-SHA256, ChaCha20-Poly1305, ChaCha20 masks.
//! - [`quantise`]: clipping, a random rotation, scaling, conditional
//!   randomised rounding and each device's share of Skellam noise, into
//!   integers modulo 2^32, and the decoding of their sum.
//! - [`pki`]: identity keys for simulated fleets (Ed25519 from a seed).
//!
//! Identity: advertisements are signed with the device's identity key
//! ([`Signer`]) and checked by the other devices ([`Authenticator`]), so a
//! server that substitutes keys is caught.

pub mod crypto;
pub mod device;
pub mod gf256;
pub mod graph;
pub mod message;
pub mod pki;
pub mod quantise;
pub mod server;
pub mod shamir;

pub use device::{Device, DeviceError};
pub use message::{Context, DeviceMessage, Params, ServerMessage};
pub use server::{Output, Refusal, Server, Stage};

/// A device as the protocol names it.
pub type DeviceId = u64;

/// Signs with a device's identity key.
pub trait Signer {
    /// What proves the identity key belongs to the device (a certificate).
    fn credential(&self) -> Vec<u8>;
    /// A signature of `message`.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
}

/// Checks that a signature was made by a device's identity key.
pub trait Authenticator {
    /// `Ok` when `credential` proves the identity key of `device` and
    /// `signature` is that key's signature of `message`.
    fn verify(
        &self,
        device: DeviceId,
        credential: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String>;
}
