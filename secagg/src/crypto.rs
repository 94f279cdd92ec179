//! The cryptographic building blocks of one round: X25519 key agreement,
//! HKDF-SHA256 key derivation bound to the round, ChaCha20-Poly1305 for
//! shares in transit, and the ChaCha20 stream that expands a 32-byte seed
//! into a mask.
//!
//! Every derived key is bound to the round's [`crate::Context`] digest and
//! to the ordered pair of devices, so a key or a mask from one round, task
//! or pair is useless in another.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use crate::DeviceId;

/// An X25519 key pair.
pub struct KeyPair {
    secret: StaticSecret,
    /// The public key, as advertised.
    pub public: [u8; 32],
}

impl KeyPair {
    /// A fresh key pair from `rng`.
    pub fn generate(rng: &mut impl RngCore) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        let kp = Self::from_secret(bytes);
        bytes.zeroize();
        kp
    }

    /// The key pair of a secret (a reconstructed one, on the server).
    pub fn from_secret(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret).to_bytes();
        Self { secret, public }
    }

    /// The secret's bytes (to be shared).
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The shared secret with `peer`, or `None` when the peer's key is of
    /// low order (the result would be all zeros and known to everyone).
    pub fn agree(&self, peer: &[u8; 32]) -> Option<[u8; 32]> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(*peer));
        shared.was_contributory().then(|| shared.to_bytes())
    }
}

/// What a derived key is for.
#[derive(Clone, Copy)]
pub enum Purpose {
    /// The pairwise mask seed of two devices.
    Mask,
    /// The key that encrypts shares between two devices.
    Shares,
}

/// HKDF-SHA256 of a shared secret into a 32-byte key for `purpose`,
/// bound to the round's digest and to the unordered pair `{a, b}`.
pub fn derive(
    shared: &[u8; 32],
    digest: &[u8; 32],
    purpose: Purpose,
    a: DeviceId,
    b: DeviceId,
) -> [u8; 32] {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let label: &[u8] = match purpose {
        Purpose::Mask => b"fleet-secagg pairwise mask",
        Purpose::Shares => b"fleet-secagg share encryption",
    };
    let mut info = Vec::with_capacity(label.len() + 16);
    info.extend_from_slice(label);
    info.extend_from_slice(&lo.to_le_bytes());
    info.extend_from_slice(&hi.to_le_bytes());
    let hk = Hkdf::<Sha256>::new(Some(digest), shared);
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The nonce of the one message `from` sends to `to` under their shared key.
fn nonce(from: DeviceId, to: DeviceId) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = u8::from(from < to);
    *Nonce::from_slice(&n)
}

/// The associated data of a share ciphertext: the round and both ends.
fn associated(digest: &[u8; 32], from: DeviceId, to: DeviceId) -> [u8; 48] {
    let mut ad = [0u8; 48];
    ad[..32].copy_from_slice(digest);
    ad[32..40].copy_from_slice(&from.to_le_bytes());
    ad[40..].copy_from_slice(&to.to_le_bytes());
    ad
}

/// Encrypts `plaintext` from `from` to `to` under `key`.
pub fn seal(
    key: &[u8; 32],
    digest: &[u8; 32],
    from: DeviceId,
    to: DeviceId,
    plaintext: &[u8],
) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let ad = associated(digest, from, to);
    cipher
        .encrypt(
            &nonce(from, to),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .expect("ChaCha20-Poly1305 encrypts any short message")
}

/// Decrypts a ciphertext `from` sent `to`; `None` if it was not made with
/// `key` for this round and these two devices, or was altered.
pub fn open(
    key: &[u8; 32],
    digest: &[u8; 32],
    from: DeviceId,
    to: DeviceId,
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(Key::from_slice(key));
    let ad = associated(digest, from, to);
    cipher
        .decrypt(
            &nonce(from, to),
            Payload {
                msg: ciphertext,
                aad: &ad,
            },
        )
        .ok()
}

/// One mask to apply to a vector: the seed its stream expands from, and
/// whether it is added or subtracted. The seed is wiped on drop.
pub struct Mask {
    /// The 32-byte seed of the ChaCha20 stream.
    pub seed: [u8; 32],
    /// Added (`true`) or subtracted, modulo 2^32.
    pub add: bool,
}

impl Drop for Mask {
    fn drop(&mut self) {
        self.seed.zeroize();
    }
}

/// Words of a vector that every mask is applied to before the next piece,
/// so the piece stays in cache across masks (a multiple of ChaCha's 16-word
/// block, so each piece starts on a block).
const PIECE: usize = 1 << 13;

/// Adds (`add = true`) or subtracts the mask expanded from `seed` to
/// `values`, modulo 2^32.
pub fn apply_mask(seed: &[u8; 32], values: &mut [u32], add: bool) {
    apply_masks(&[Mask { seed: *seed, add }], values);
}

/// Applies every mask in `masks` to `values`, modulo 2^32: the same result
/// as applying them one after the other with [`apply_mask`]. The vector is
/// cut into as many parts as the machine has cores (a part is at least
/// one piece of [`PIECE`] words); each part seeks every stream to its own
/// offset, so no keystream is expanded twice.
pub fn apply_masks(masks: &[Mask], values: &mut [u32]) {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(values.len().div_ceil(PIECE))
        .max(1);
    if threads == 1 || masks.is_empty() {
        apply_part(masks, values, 0);
        return;
    }
    let per = values.len().div_ceil(threads).next_multiple_of(PIECE);
    std::thread::scope(|scope| {
        for (i, part) in values.chunks_mut(per).enumerate() {
            scope.spawn(move || apply_part(masks, part, i * per));
        }
    });
}

/// Applies `masks` to `values`, which start at word `offset` of the whole
/// vector (a multiple of 16).
fn apply_part(masks: &[Mask], values: &mut [u32], offset: usize) {
    let mut block = [0u32; 64];
    for (j, piece) in values.chunks_mut(PIECE).enumerate() {
        let at = offset + j * PIECE;
        for mask in masks {
            let mut rng = ChaCha20Rng::from_seed(mask.seed);
            rng.set_word_pos(at as u128);
            for chunk in piece.chunks_mut(block.len()) {
                let block = &mut block[..chunk.len()];
                rng.fill(block);
                if mask.add {
                    for (v, m) in chunk.iter_mut().zip(block.iter()) {
                        *v = v.wrapping_add(*m);
                    }
                } else {
                    for (v, m) in chunk.iter_mut().zip(block.iter()) {
                        *v = v.wrapping_sub(*m);
                    }
                }
            }
        }
    }
    block.zeroize();
}

use rand::Rng as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_derive_the_same_keys_and_masks_cancel() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = KeyPair::generate(&mut rng);
        let b = KeyPair::generate(&mut rng);
        let digest = [7u8; 32];
        let sa = a.agree(&b.public).unwrap();
        let sb = b.agree(&a.public).unwrap();
        assert_eq!(sa, sb);
        let ka = derive(&sa, &digest, Purpose::Mask, 3, 9);
        let kb = derive(&sb, &digest, Purpose::Mask, 9, 3);
        assert_eq!(ka, kb);
        assert_ne!(ka, derive(&sa, &digest, Purpose::Shares, 3, 9));
        assert_ne!(ka, derive(&sa, &[8u8; 32], Purpose::Mask, 3, 9));
        let mut v = vec![5u32; 1000];
        apply_mask(&ka, &mut v, true);
        assert!(v.iter().filter(|&&x| x == 5).count() < 5);
        apply_mask(&kb, &mut v, false);
        assert_eq!(v, vec![5u32; 1000]);
    }

    /// The mask stream expanded one word at a time from the start, the
    /// reference the pieced and threaded expansion must match.
    fn reference(masks: &[([u8; 32], bool)], values: &mut [u32]) {
        use rand::RngCore as _;
        for (seed, add) in masks {
            let mut rng = ChaCha20Rng::from_seed(*seed);
            for v in values.iter_mut() {
                let m = rng.next_u32();
                *v = if *add {
                    v.wrapping_add(m)
                } else {
                    v.wrapping_sub(m)
                };
            }
        }
    }

    #[test]
    fn many_masks_at_once_equal_one_after_the_other() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        // Lengths around the piece and block boundaries, and one long
        // enough to be cut over every core.
        for len in [
            0,
            1,
            15,
            17,
            63,
            65,
            PIECE - 1,
            PIECE,
            PIECE + 5,
            5 * PIECE + 33,
        ] {
            let plain: Vec<([u8; 32], bool)> = (0..5)
                .map(|i| {
                    let mut seed = [0u8; 32];
                    rng.fill_bytes(&mut seed);
                    (seed, i % 2 == 0)
                })
                .collect();
            let start: Vec<u32> = (0..len).map(|_| rng.next_u32()).collect();
            let mut want = start.clone();
            reference(&plain, &mut want);
            let masks: Vec<Mask> = plain
                .iter()
                .map(|&(seed, add)| Mask { seed, add })
                .collect();
            let mut got = start.clone();
            apply_masks(&masks, &mut got);
            assert_eq!(got, want, "length {len}");
            let mut one_by_one = start.clone();
            for &(seed, add) in &plain {
                apply_mask(&seed, &mut one_by_one, add);
            }
            assert_eq!(one_by_one, want, "length {len}");
            if len > 0 {
                assert_ne!(got, start, "length {len}");
            }
        }
    }

    #[test]
    fn a_ciphertext_opens_only_for_its_round_and_ends() {
        let key = [1u8; 32];
        let digest = [2u8; 32];
        let c = seal(&key, &digest, 1, 2, b"share");
        assert_eq!(open(&key, &digest, 1, 2, &c).unwrap(), b"share");
        assert!(open(&key, &digest, 2, 1, &c).is_none());
        assert!(open(&key, &[3u8; 32], 1, 2, &c).is_none());
        assert!(open(&[9u8; 32], &digest, 1, 2, &c).is_none());
        let mut bad = c.clone();
        bad[0] ^= 1;
        assert!(open(&key, &digest, 1, 2, &bad).is_none());
    }

    #[test]
    fn a_low_order_peer_key_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let a = KeyPair::generate(&mut rng);
        assert!(a.agree(&[0u8; 32]).is_none());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(a.agree(&one).is_none());
    }

    #[test]
    fn a_reconstructed_secret_gives_the_same_public_key() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let a = KeyPair::generate(&mut rng);
        let again = KeyPair::from_secret(a.secret_bytes());
        assert_eq!(a.public, again.public);
    }
}
