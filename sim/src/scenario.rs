//! Scenarios: what happens to a share of the devices.
//!
//! Update-side scenarios (Byzantine devices) act on a device's delta after
//! local training and before privacy and encoding, as a compromised device
//! would. Data-side scenarios (covariate drift from a given round, to come)
//! belong where a device's examples are produced, `DeviceData::with`, keyed
//! by device and round in the same way; which devices are affected is hashed
//! from the seed by [`crate::population::Population`].

use crate::fleet::Attack;

/// Applies a Byzantine `attack` of factor `scale` to `delta`.
pub fn corrupt_update(attack: Attack, scale: f32, delta: &mut [f32]) {
    let factor = match attack {
        Attack::SignFlip => -scale,
        Attack::Scaled => scale,
    };
    for v in delta {
        *v *= factor;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attacks_flip_or_scale() {
        let mut d = vec![1.0, -2.0];
        corrupt_update(Attack::SignFlip, 3.0, &mut d);
        assert_eq!(d, vec![-3.0, 6.0]);
        corrupt_update(Attack::Scaled, 0.5, &mut d);
        assert_eq!(d, vec![-1.5, 3.0]);
    }
}
