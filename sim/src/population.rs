//! The simulated devices and what they are like, without storing them.
//!
//! A device is a number. Its profile, its time zone and whether it is
//! Byzantine are hashed from `(seed, device)` when needed, so a registered
//! device that is not in a round costs no memory here at all; the only
//! per-device state of the simulation is its next check-in in the event
//! queue ([`crate::driver`]).

use crate::fleet::{ByzantineConfig, Fleet, Profile};

/// SplitMix64: a well-mixed 64-bit hash.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A uniform number in `[0, 1)` hashed from `(seed, device, salt)`.
pub fn unit(seed: u64, device: u32, salt: u64) -> f64 {
    let h = mix(mix(seed ^ salt.wrapping_mul(0xd6e8_feb8_6659_fd93)) ^ u64::from(device));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

const SALT_PROFILE: u64 = 1;
const SALT_TIMEZONE: u64 = 2;
const SALT_BYZANTINE: u64 = 3;

/// The registered devices of a fleet.
#[derive(Debug, Clone)]
pub struct Population {
    seed: u64,
    devices: u32,
    profiles: Vec<Profile>,
    /// Cumulative, normalised profile weights.
    cumulative: Vec<f64>,
    byzantine: Option<ByzantineConfig>,
}

impl Population {
    /// The population of `fleet` (assumed validated).
    pub fn new(fleet: &Fleet) -> Self {
        let total: f64 = fleet.profiles.iter().map(|p| p.weight).sum();
        let mut acc = 0.0;
        let cumulative = fleet
            .profiles
            .iter()
            .map(|p| {
                acc += p.weight / total;
                acc
            })
            .collect();
        Self {
            seed: fleet.seed,
            devices: fleet.devices,
            profiles: fleet.profiles.clone(),
            cumulative,
            byzantine: fleet.scenarios.byzantine,
        }
    }

    /// Registered devices.
    pub fn len(&self) -> u32 {
        self.devices
    }

    /// Whether the fleet is empty (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.devices == 0
    }

    /// The profiles.
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }

    /// Index of `device`'s profile.
    pub fn profile_index(&self, device: u32) -> usize {
        let u = unit(self.seed, device, SALT_PROFILE);
        self.cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.profiles.len() - 1)
    }

    /// `device`'s profile.
    pub fn profile(&self, device: u32) -> &Profile {
        &self.profiles[self.profile_index(device)]
    }

    /// Probability that `device` is available at virtual time `ms`.
    pub fn availability(&self, device: u32, ms: u64) -> f64 {
        let p = self.profile(device);
        if p.day_night_swing == 0.0 {
            return p.availability.clamp(0.0, 1.0);
        }
        let offset = unit(self.seed, device, SALT_TIMEZONE) * p.timezone_spread_hours;
        let hour = (ms as f64 / 3_600_000.0 + offset).rem_euclid(24.0);
        let phase = 2.0 * std::f64::consts::PI * (hour - p.peak_hour) / 24.0;
        (p.availability + p.day_night_swing * phase.cos()).clamp(0.0, 1.0)
    }

    /// The attack `device` mounts, if it is Byzantine.
    pub fn attack(&self, device: u32) -> Option<ByzantineConfig> {
        let b = self.byzantine?;
        (unit(self.seed, device, SALT_BYZANTINE) < b.fraction).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Fleet, Scenarios};

    #[test]
    fn profiles_follow_their_weights() {
        let fleet = Fleet {
            devices: 100_000,
            ..Fleet::default()
        };
        let pop = Population::new(&fleet);
        let phones = (0..100_000).filter(|&d| pop.profile_index(d) == 0).count();
        // Weights 0.7 / 0.3.
        assert!((68_500..71_500).contains(&phones), "{phones}");
    }

    #[test]
    fn availability_swings_with_the_hour() {
        let fleet = Fleet {
            profiles: vec![Profile {
                availability: 0.5,
                day_night_swing: 0.4,
                peak_hour: 2.0,
                timezone_spread_hours: 0.0,
                ..Profile::default()
            }],
            ..Fleet::default()
        };
        let pop = Population::new(&fleet);
        let at = |h: f64| pop.availability(7, (h * 3_600_000.0) as u64);
        assert!((at(2.0) - 0.9).abs() < 1e-9);
        assert!((at(14.0) - 0.1).abs() < 1e-9);
        assert!((at(26.0) - 0.9).abs() < 1e-9);
    }

    #[test]
    fn byzantine_share_matches_the_fraction() {
        let fleet = Fleet {
            scenarios: Scenarios {
                byzantine: Some(ByzantineConfig {
                    fraction: 0.2,
                    ..ByzantineConfig::default()
                }),
                drift: None,
            },
            ..Fleet::default()
        };
        let pop = Population::new(&fleet);
        let n = (0..50_000).filter(|&d| pop.attack(d).is_some()).count();
        assert!((9_500..10_500).contains(&n), "{n}");
        assert!(Population::new(&Fleet::default()).attack(3).is_none());
    }
}
