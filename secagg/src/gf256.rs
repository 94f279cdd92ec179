//! Arithmetic in GF(2^8) with the AES polynomial `x^8 + x^4 + x^3 + x + 1`.
//!
//! The field Shamir sharing works in ([`crate::shamir`]). Multiplication is
//! computed bit by bit with masks rather than with log/exp tables, so its
//! time does not depend on the secret bytes it multiplies.

/// Product of `a` and `b` in GF(2^8).
pub fn mul(a: u8, b: u8) -> u8 {
    let mut a = a;
    let mut b = b;
    let mut p = 0u8;
    for _ in 0..8 {
        // Add `a` when the low bit of `b` is set, without a branch.
        p ^= a & (b & 1).wrapping_neg();
        // Multiply `a` by x, reducing by the polynomial when it overflows.
        let carry = (a >> 7).wrapping_neg();
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Multiplicative inverse of a non-zero `a` (`a^254`); `inv(0)` is 0.
pub fn inv(a: u8) -> u8 {
    // a^254 = a^(2+4+8+16+32+64+128).
    let mut result = 1u8;
    let mut square = a;
    for _ in 0..7 {
        square = mul(square, square);
        result = mul(result, square);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS-197 §4.2: {57}·{83} = {c1} and {57}·{13} = {fe}.
    #[test]
    fn products_match_fips_197() {
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        assert_eq!(mul(0x57, 0x02), 0xae);
        assert_eq!(mul(0x57, 0x04), 0x47);
    }

    /// FIPS-197 §5.1.1: the S-box input {53} has inverse {ca}.
    #[test]
    fn inverse_matches_fips_197() {
        assert_eq!(inv(0x53), 0xca);
        assert_eq!(mul(0x53, 0xca), 1);
    }

    #[test]
    fn every_non_zero_element_has_an_inverse() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "a = {a:#04x}");
        }
        assert_eq!(inv(0), 0);
    }

    #[test]
    fn multiplication_is_commutative_and_distributes_over_xor() {
        for a in 0..=255u8 {
            for b in (0..=255u8).step_by(7) {
                assert_eq!(mul(a, b), mul(b, a));
                let c = a.wrapping_mul(31) ^ b;
                assert_eq!(mul(a, b ^ c), mul(a, b) ^ mul(a, c));
            }
        }
    }
}
