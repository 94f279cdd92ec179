//! Shamir's `t`-of-`n` secret sharing of 32-byte secrets over GF(2^8).
//!
//! Each byte of the secret is the constant term of its own random
//! polynomial of degree `t − 1`; share `x` (1 ≤ x ≤ 255) holds every
//! polynomial's value at `x`. Any `t` shares give the secret back by
//! Lagrange interpolation at 0; fewer give no information about it (every
//! secret is equally consistent with them). Reconstruction from more than
//! `t` shares checks that the extra shares lie on the same polynomials, so
//! a corrupted share is detected rather than silently producing a wrong
//! secret.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::gf256::{inv, mul};

/// Length of a shared secret in bytes.
pub const SECRET_LEN: usize = 32;

/// One share: the evaluation point `x` and the polynomials' values there.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// Evaluation point, `1..=255`.
    pub x: u8,
    /// The value of each byte's polynomial at `x`.
    pub y: [u8; SECRET_LEN],
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The value is secret material.
        write!(f, "Share {{ x: {} }}", self.x)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.y.zeroize();
    }
}

/// Why shares could not be made or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShamirError {
    /// `t` must be at least 1 and at most `n`, and `n` at most 255.
    #[error("cannot split into {n} shares with threshold {t}: need 1 <= t <= n <= 255")]
    Parameters {
        /// Threshold asked for.
        t: usize,
        /// Number of shares asked for.
        n: usize,
    },
    /// Fewer distinct shares than the threshold.
    #[error("{got} distinct shares, {needed} needed")]
    TooFew {
        /// Distinct shares given.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// An evaluation point of 0 (which would be the secret itself).
    #[error("a share at x = 0")]
    ZeroPoint,
    /// Two shares at one point with different values, or a share off the
    /// polynomials the others define.
    #[error("the shares are inconsistent (a share was corrupted)")]
    Inconsistent,
}

/// Splits `secret` into `n` shares at `x = 1..=n`, any `t` of which
/// reconstruct it.
pub fn split(
    secret: &[u8; SECRET_LEN],
    t: usize,
    n: usize,
    rng: &mut impl RngCore,
) -> Result<Vec<Share>, ShamirError> {
    if t == 0 || t > n || n > 255 {
        return Err(ShamirError::Parameters { t, n });
    }
    // coefficients[k][i]: coefficient of x^(k+1) of byte i's polynomial.
    let mut coefficients = vec![[0u8; SECRET_LEN]; t - 1];
    for c in &mut coefficients {
        rng.fill_bytes(c);
    }
    let shares = (1..=n as u8)
        .map(|x| {
            let mut y = [0u8; SECRET_LEN];
            for (i, yi) in y.iter_mut().enumerate() {
                // Horner: ((c_{t-1} x + c_{t-2}) x + … + c_1) x + s.
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = mul(acc, x) ^ c[i];
                }
                *yi = mul(acc, x) ^ secret[i];
            }
            Share { x, y }
        })
        .collect();
    for c in &mut coefficients {
        c.zeroize();
    }
    Ok(shares)
}

/// Lagrange basis coefficients at `at` for the points `xs`.
fn basis(xs: &[u8], at: u8) -> Vec<u8> {
    xs.iter()
        .enumerate()
        .map(|(j, &xj)| {
            let mut num = 1u8;
            let mut den = 1u8;
            for (m, &xm) in xs.iter().enumerate() {
                if m != j {
                    num = mul(num, at ^ xm);
                    den = mul(den, xj ^ xm);
                }
            }
            mul(num, inv(den))
        })
        .collect()
}

/// Interpolates the polynomials through `shares` at `at`.
fn interpolate(shares: &[&Share], at: u8) -> [u8; SECRET_LEN] {
    let xs: Vec<u8> = shares.iter().map(|s| s.x).collect();
    let l = basis(&xs, at);
    let mut out = [0u8; SECRET_LEN];
    for (share, &lj) in shares.iter().zip(&l) {
        for (o, &y) in out.iter_mut().zip(&share.y) {
            *o ^= mul(lj, y);
        }
    }
    out
}

/// Reconstructs the secret from at least `t` shares; with more, checks
/// that every share agrees.
pub fn combine(shares: &[Share], t: usize) -> Result<[u8; SECRET_LEN], ShamirError> {
    if t == 0 {
        return Err(ShamirError::Parameters { t, n: shares.len() });
    }
    let mut distinct: Vec<&Share> = Vec::with_capacity(shares.len());
    for s in shares {
        if s.x == 0 {
            return Err(ShamirError::ZeroPoint);
        }
        match distinct.iter().find(|d| d.x == s.x) {
            Some(d) if d.y != s.y => return Err(ShamirError::Inconsistent),
            Some(_) => {}
            None => distinct.push(s),
        }
    }
    if distinct.len() < t {
        return Err(ShamirError::TooFew {
            got: distinct.len(),
            needed: t,
        });
    }
    let (base, extra) = distinct.split_at(t);
    for s in extra {
        if interpolate(base, s.x) != s.y {
            return Err(ShamirError::Inconsistent);
        }
    }
    Ok(interpolate(base, 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// A hand-computed vector: secret byte 0x53 with the line
    /// f(x) = 0x53 + 0xca·x gives f(1) = 0x99, f(2) = 0x53 ^ mul(0xca, 2)
    /// = 0x53 ^ 0x8f = 0xdc (0xca·2 = 0x194 reduced by 0x11b).
    #[test]
    fn a_known_line() {
        let mut rng = FixedRng(vec![0xca; SECRET_LEN]);
        let secret = [0x53; SECRET_LEN];
        let shares = split(&secret, 2, 3, &mut rng).unwrap();
        assert_eq!(shares[0].y[0], 0x99);
        assert_eq!(shares[1].y[0], 0xdc);
        assert_eq!(combine(&shares[1..], 2).unwrap(), secret);
    }

    /// An RNG that returns fixed bytes (for the known vector).
    struct FixedRng(Vec<u8>);
    impl RngCore for FixedRng {
        fn next_u32(&mut self) -> u32 {
            unimplemented!()
        }
        fn next_u64(&mut self) -> u64 {
            unimplemented!()
        }
        fn fill_bytes(&mut self, dst: &mut [u8]) {
            dst.copy_from_slice(&self.0[..dst.len()]);
        }
    }

    /// Property: for random secrets, thresholds and share counts, every
    /// random subset of at least `t` shares gives the secret back, and
    /// fewer is an error.
    #[test]
    fn any_t_shares_reconstruct() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for _ in 0..300 {
            let n = rng.random_range(1..=40usize);
            let t = rng.random_range(1..=n);
            let mut secret = [0u8; SECRET_LEN];
            rng.fill_bytes(&mut secret);
            let shares = split(&secret, t, n, &mut rng).unwrap();
            let mut idx: Vec<usize> = (0..n).collect();
            rand::seq::SliceRandom::shuffle(idx.as_mut_slice(), &mut rng);
            let k = rng.random_range(t..=n);
            let subset: Vec<Share> = idx[..k].iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(combine(&subset, t).unwrap(), secret, "t={t} n={n} k={k}");
            if t > 1 {
                let fewer: Vec<Share> = idx[..t - 1].iter().map(|&i| shares[i].clone()).collect();
                assert!(matches!(
                    combine(&fewer, t),
                    Err(ShamirError::TooFew { .. })
                ));
            }
        }
    }

    /// Property: `t − 1` shares are consistent with every secret: for any
    /// other secret there is a polynomial through them, so they reveal
    /// nothing. Checked by completing the `t − 1` shares with the candidate
    /// secret as the point at 0 and finding a valid `t`-share set.
    #[test]
    fn fewer_than_t_shares_fit_any_secret() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        for _ in 0..50 {
            let t = rng.random_range(2..=8usize);
            let n = t + 3;
            let mut secret = [0u8; SECRET_LEN];
            rng.fill_bytes(&mut secret);
            let shares = split(&secret, t, n, &mut rng).unwrap();
            let mut other = [0u8; SECRET_LEN];
            rng.fill_bytes(&mut other);
            // Through the first t−1 shares and (0, other) passes one
            // polynomial of degree t−1; its value at x = t is a share that,
            // with the first t−1, reconstructs `other`.
            let mut points: Vec<&Share> = shares[..t - 1].iter().collect();
            let zero = Share { x: 0, y: other };
            points.push(&zero);
            let forged = Share {
                x: t as u8,
                y: interpolate(&points, t as u8),
            };
            let mut set: Vec<Share> = shares[..t - 1].to_vec();
            set.push(forged);
            assert_eq!(combine(&set, t).unwrap(), other);
        }
    }

    #[test]
    fn a_corrupted_share_is_detected_when_extra_shares_exist() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let secret = [42u8; SECRET_LEN];
        let mut shares = split(&secret, 3, 5, &mut rng).unwrap();
        shares[4].y[7] ^= 1;
        assert_eq!(combine(&shares, 3), Err(ShamirError::Inconsistent));
        // Two shares at one point that differ.
        let mut dup = shares[..3].to_vec();
        let mut bad = shares[0].clone();
        bad.y[0] ^= 1;
        dup.push(bad);
        assert_eq!(combine(&dup, 3), Err(ShamirError::Inconsistent));
    }

    #[test]
    fn bad_parameters_are_errors() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let s = [0u8; SECRET_LEN];
        assert!(split(&s, 0, 3, &mut rng).is_err());
        assert!(split(&s, 4, 3, &mut rng).is_err());
        assert!(split(&s, 2, 256, &mut rng).is_err());
        let shares = split(&s, 2, 3, &mut rng).unwrap();
        let zero = Share {
            x: 0,
            y: [0; SECRET_LEN],
        };
        assert_eq!(
            combine(&[zero, shares[0].clone()], 2),
            Err(ShamirError::ZeroPoint)
        );
    }
}
