//! Identity keys for simulated fleets: Ed25519 key pairs derived from a
//! fleet seed and a device number, and an [`Authenticator`] that knows
//! every device's public key (the role a certificate authority plays for
//! real devices).

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use crate::{Authenticator, DeviceId, Signer};

/// The identity key of one simulated device.
pub struct SimSigner {
    key: Ed25519KeyPair,
}

fn seed_of(fleet_seed: u64, device: DeviceId) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fleet-secagg simulated identity");
    h.update(fleet_seed.to_le_bytes());
    h.update(device.to_le_bytes());
    h.finalize().into()
}

impl SimSigner {
    /// The identity key of `device` in the fleet of `fleet_seed`.
    pub fn new(fleet_seed: u64, device: DeviceId) -> Self {
        let key = Ed25519KeyPair::from_seed_unchecked(&seed_of(fleet_seed, device))
            .expect("32 bytes is an Ed25519 seed");
        Self { key }
    }
}

impl Signer for SimSigner {
    fn credential(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).as_ref().to_vec()
    }
}

/// Knows the identity key of every device of a simulated fleet.
pub struct SimPki {
    fleet_seed: u64,
}

impl SimPki {
    /// The authority of the fleet of `fleet_seed`.
    pub fn new(fleet_seed: u64) -> Self {
        Self { fleet_seed }
    }
}

impl Authenticator for SimPki {
    fn verify(
        &self,
        device: DeviceId,
        credential: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        let expected = SimSigner::new(self.fleet_seed, device).credential();
        if credential != expected.as_slice() {
            return Err(format!("the credential is not device {device}'s"));
        }
        UnparsedPublicKey::new(&ED25519, credential)
            .verify(message, signature)
            .map_err(|_| format!("bad signature for device {device}"))
    }
}
