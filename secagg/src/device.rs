//! A device's side of one SecAgg+ round, sans IO.
//!
//! [`Device::new`] draws the round's keys and returns the signed
//! advertisement (stage 1); each later server message is answered by one
//! method, in order: [`Device::share`] (stage 2), [`Device::mask`]
//! (stage 3), [`Device::reveal`] (stage 4). A message out of order, out of
//! bounds or inconsistent with what came before is refused with a
//! [`DeviceError`] and the round is over for this device: it never answers
//! a second unmasking request and never reveals both shares of one
//! neighbour.

use std::collections::{BTreeMap, BTreeSet};

use rand::RngCore;
use zeroize::Zeroize;

use crate::crypto::{self, KeyPair, Purpose};
use crate::message::{
    Advertisement, CIPHERTEXT_LEN, Context, DeviceMessage, EncryptedShare, Reveal,
};
use crate::shamir::{self, SECRET_LEN, Share};
use crate::{Authenticator, DeviceId, Signer};

/// Why a device refused a server message (the round is over for it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The message does not belong to the device's current stage.
    #[error("a {got} message in stage {stage}")]
    OutOfOrder {
        /// The device's stage.
        stage: &'static str,
        /// What came.
        got: &'static str,
    },
    /// A neighbour's advertisement failed its signature check.
    #[error("the advertisement of device {0} is not signed by that device")]
    Forged(DeviceId),
    /// Too few neighbours (or survivors) to reach the threshold.
    #[error("{got} neighbours, the threshold is {threshold}")]
    TooFewNeighbours {
        /// How many there are.
        got: usize,
        /// The threshold.
        threshold: usize,
    },
    /// A list with more entries than the degree allows, repeats, the device
    /// itself, or a device it never exchanged keys with.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The server asked for both shares of one neighbour.
    #[error("asked for both shares of device {0}")]
    BothShares(DeviceId),
    /// The input has the wrong length.
    #[error("the input has {got} values, the round needs {expected}")]
    Length {
        /// Values given.
        got: usize,
        /// The round's length.
        expected: usize,
    },
}

enum Stage {
    Advertised,
    Shared,
    Masked,
    Done,
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Advertised => "advertise",
            Stage::Shared => "share",
            Stage::Masked => "masked_input",
            Stage::Done => "done",
        }
    }
}

/// A neighbour's keys.
struct Neighbour {
    cipher_key: [u8; 32],
    mask_key: [u8; 32],
}

/// One device in one round.
pub struct Device {
    me: DeviceId,
    context: Context,
    digest: [u8; 32],
    cipher: KeyPair,
    mask: KeyPair,
    self_seed: [u8; SECRET_LEN],
    stage: Stage,
    neighbours: BTreeMap<DeviceId, Neighbour>,
    /// Shares received from neighbours that shared: (self-mask, mask key).
    held: BTreeMap<DeviceId, (Share, Share)>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.self_seed.zeroize();
    }
}

impl Device {
    /// Draws the round's keys and self-mask seed; returns the device and
    /// its advertisement (stage 1).
    pub fn new(
        me: DeviceId,
        context: Context,
        signer: &dyn Signer,
        rng: &mut impl RngCore,
    ) -> Result<(Self, DeviceMessage), DeviceError> {
        context.params.validate().map_err(DeviceError::Invalid)?;
        let digest = context.digest();
        let cipher = KeyPair::generate(rng);
        let mask = KeyPair::generate(rng);
        let mut self_seed = [0u8; SECRET_LEN];
        rng.fill_bytes(&mut self_seed);
        let signed = Advertisement::signed_bytes(&digest, me, &cipher.public, &mask.public);
        let ad = Advertisement {
            device: me,
            cipher_key: cipher.public,
            mask_key: mask.public,
            credential: signer.credential(),
            signature: signer.sign(&signed),
        };
        Ok((
            Self {
                me,
                context,
                digest,
                cipher,
                mask,
                self_seed,
                stage: Stage::Advertised,
                neighbours: BTreeMap::new(),
                held: BTreeMap::new(),
            },
            DeviceMessage::Advertise(ad),
        ))
    }

    /// The device.
    pub fn id(&self) -> DeviceId {
        self.me
    }

    fn expect(&self, stage: &'static str, got: &'static str) -> Result<(), DeviceError> {
        if self.stage.name() == stage {
            Ok(())
        } else {
            Err(DeviceError::OutOfOrder {
                stage: self.stage.name(),
                got,
            })
        }
    }

    fn threshold(&self) -> usize {
        usize::from(self.context.params.threshold)
    }

    /// Stage 2: checks the neighbours' advertisements and encrypts to each
    /// one share of the self-mask seed and one of the mask key.
    pub fn share(
        &mut self,
        neighbours: &[Advertisement],
        auth: &dyn Authenticator,
        rng: &mut impl RngCore,
    ) -> Result<DeviceMessage, DeviceError> {
        self.expect("advertise", "neighbours")?;
        self.stage = Stage::Done;
        let degree = usize::from(self.context.params.degree).div_ceil(2) * 2;
        if neighbours.len() > degree {
            return Err(DeviceError::Invalid(format!(
                "{} neighbours, the degree is {degree}",
                neighbours.len()
            )));
        }
        if neighbours.len() < self.threshold() {
            return Err(DeviceError::TooFewNeighbours {
                got: neighbours.len(),
                threshold: self.threshold(),
            });
        }
        let mut seen = BTreeSet::new();
        for ad in neighbours {
            if ad.device == self.me || !seen.insert(ad.device) {
                return Err(DeviceError::Invalid(format!(
                    "device {} listed twice or as its own neighbour",
                    ad.device
                )));
            }
            if !ad.sizes_ok() {
                return Err(DeviceError::Invalid(format!(
                    "the advertisement of device {} is oversized",
                    ad.device
                )));
            }
            if ad.verify(&self.digest, auth).is_err() {
                return Err(DeviceError::Forged(ad.device));
            }
        }
        let n = neighbours.len();
        let t = self.threshold();
        let seeds = shamir::split(&self.self_seed, t, n, rng)
            .map_err(|e| DeviceError::Invalid(e.to_string()))?;
        let mut key = self.mask.secret_bytes();
        let keys = shamir::split(&key, t, n, rng);
        key.zeroize();
        let keys = keys.map_err(|e| DeviceError::Invalid(e.to_string()))?;
        let mut out = Vec::with_capacity(n);
        // Neighbours in the order given; share i goes to neighbour i.
        for ((ad, s), k) in neighbours.iter().zip(&seeds).zip(&keys) {
            let shared = self.cipher.agree(&ad.cipher_key).ok_or_else(|| {
                DeviceError::Invalid(format!("device {} has a low-order key", ad.device))
            })?;
            let mut enc_key =
                crypto::derive(&shared, &self.digest, Purpose::Shares, self.me, ad.device);
            let mut plain = [0u8; 2 * (1 + SECRET_LEN)];
            plain[0] = s.x;
            plain[1..1 + SECRET_LEN].copy_from_slice(&s.y);
            plain[1 + SECRET_LEN] = k.x;
            plain[2 + SECRET_LEN..].copy_from_slice(&k.y);
            let ciphertext = crypto::seal(&enc_key, &self.digest, self.me, ad.device, &plain);
            plain.zeroize();
            enc_key.zeroize();
            out.push(EncryptedShare {
                from: self.me,
                to: ad.device,
                ciphertext,
            });
            self.neighbours.insert(
                ad.device,
                Neighbour {
                    cipher_key: ad.cipher_key,
                    mask_key: ad.mask_key,
                },
            );
        }
        self.stage = Stage::Shared;
        Ok(DeviceMessage::Shares(out))
    }

    /// Stage 3: opens the shares its neighbours sent, and masks `input`
    /// (already quantised, modulo 2^32) with its self mask and a pairwise
    /// mask for every neighbour that shared.
    pub fn mask(
        &mut self,
        shares: &[EncryptedShare],
        mut input: Vec<u32>,
    ) -> Result<DeviceMessage, DeviceError> {
        self.expect("share", "shares")?;
        self.stage = Stage::Done;
        let expected = self.context.params.length as usize;
        if input.len() != expected {
            return Err(DeviceError::Length {
                got: input.len(),
                expected,
            });
        }
        if shares.len() > self.neighbours.len() {
            return Err(DeviceError::Invalid(format!(
                "{} shares from {} neighbours",
                shares.len(),
                self.neighbours.len()
            )));
        }
        for s in shares {
            let Some(nb) = self.neighbours.get(&s.from) else {
                return Err(DeviceError::Invalid(format!(
                    "a share from device {}, not a neighbour",
                    s.from
                )));
            };
            if s.to != self.me || self.held.contains_key(&s.from) {
                return Err(DeviceError::Invalid(format!(
                    "a share from device {} addressed to {} or repeated",
                    s.from, s.to
                )));
            }
            if s.ciphertext.len() != CIPHERTEXT_LEN {
                return Err(DeviceError::Invalid(format!(
                    "a share of {} bytes from device {}",
                    s.ciphertext.len(),
                    s.from
                )));
            }
            let shared = self.cipher.agree(&nb.cipher_key).ok_or_else(|| {
                DeviceError::Invalid(format!("device {} has a low-order key", s.from))
            })?;
            let mut key = crypto::derive(&shared, &self.digest, Purpose::Shares, s.from, self.me);
            let plain = crypto::open(&key, &self.digest, s.from, self.me, &s.ciphertext);
            key.zeroize();
            let Some(mut plain) = plain else {
                return Err(DeviceError::Invalid(format!(
                    "the share from device {} does not decrypt",
                    s.from
                )));
            };
            let mut seed = Share {
                x: plain[0],
                y: [0; SECRET_LEN],
            };
            seed.y.copy_from_slice(&plain[1..1 + SECRET_LEN]);
            let mut mkey = Share {
                x: plain[1 + SECRET_LEN],
                y: [0; SECRET_LEN],
            };
            mkey.y.copy_from_slice(&plain[2 + SECRET_LEN..]);
            plain.zeroize();
            self.held.insert(s.from, (seed, mkey));
        }
        if self.held.len() < self.threshold() {
            return Err(DeviceError::TooFewNeighbours {
                got: self.held.len(),
                threshold: self.threshold(),
            });
        }
        let mut masks = Vec::with_capacity(self.held.len() + 1);
        masks.push(crypto::Mask {
            seed: self.self_seed,
            add: true,
        });
        for &v in self.held.keys() {
            let nb = &self.neighbours[&v];
            let shared = self
                .mask
                .agree(&nb.mask_key)
                .ok_or_else(|| DeviceError::Invalid(format!("device {v} has a low-order key")))?;
            masks.push(crypto::Mask {
                seed: crypto::derive(&shared, &self.digest, Purpose::Mask, self.me, v),
                add: self.me < v,
            });
        }
        crypto::apply_masks(&masks, &mut input);
        drop(masks);
        self.stage = Stage::Masked;
        Ok(DeviceMessage::Masked(crate::message::Words(input)))
    }

    /// Stage 4: reveals self-mask shares of the survivors and mask-key
    /// shares of the dropped, refusing a request that names one neighbour
    /// in both lists, names a device it holds no shares of, or comes a
    /// second time.
    pub fn reveal(
        &mut self,
        survivors: &[DeviceId],
        dropped: &[DeviceId],
    ) -> Result<DeviceMessage, DeviceError> {
        self.expect("masked_input", "unmask")?;
        self.stage = Stage::Done;
        let survivors_set: BTreeSet<DeviceId> = survivors.iter().copied().collect();
        let dropped_set: BTreeSet<DeviceId> = dropped.iter().copied().collect();
        if survivors_set.len() != survivors.len() || dropped_set.len() != dropped.len() {
            return Err(DeviceError::Invalid("a device listed twice".into()));
        }
        if let Some(&both) = survivors_set.intersection(&dropped_set).next() {
            return Err(DeviceError::BothShares(both));
        }
        for d in survivors_set.iter().chain(&dropped_set) {
            if !self.held.contains_key(d) {
                return Err(DeviceError::Invalid(format!(
                    "device {d} did not share with this device"
                )));
            }
        }
        // This device is a survivor too.
        if survivors_set.len() + 1 < self.threshold() {
            return Err(DeviceError::TooFewNeighbours {
                got: survivors_set.len() + 1,
                threshold: self.threshold(),
            });
        }
        let mut reveal = Reveal::default();
        for d in &survivors_set {
            reveal.self_masks.push((*d, self.held[d].0.clone()));
        }
        for d in &dropped_set {
            reveal.mask_keys.push((*d, self.held[d].1.clone()));
        }
        self.held.clear();
        Ok(DeviceMessage::Reveal(reveal))
    }
}
