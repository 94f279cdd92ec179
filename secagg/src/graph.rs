//! The neighbourhood graph of SecAgg+ (Bell et al., CCS 2020): devices on a
//! ring in a random order, each joined to the `k/2` devices on either side,
//! a `k`-regular graph (a Harary graph with its vertices shuffled).
//!
//! A device exchanges masks and shares only with its neighbours, so its
//! work grows with `k = O(log n)` rather than with the cohort `n`.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha20Rng;

use crate::DeviceId;

/// The neighbours of every device of `devices` (sorted, without repeats)
/// in a graph of degree `degree` (rounded up to even), shuffled by `seed`.
/// With `devices.len() − 1 <= degree` the graph is complete.
pub fn neighbours(
    devices: &[DeviceId],
    degree: usize,
    seed: u64,
) -> BTreeMap<DeviceId, Vec<DeviceId>> {
    let n = devices.len();
    let mut ring = devices.to_vec();
    ring.sort_unstable();
    ring.dedup();
    ring.shuffle(&mut ChaCha20Rng::seed_from_u64(seed));
    let half = degree.div_ceil(2);
    let mut out = BTreeMap::new();
    for (i, &d) in ring.iter().enumerate() {
        let mut list: Vec<DeviceId> = if 2 * half + 1 >= n {
            ring.iter().copied().filter(|&o| o != d).collect()
        } else {
            (1..=half)
                .flat_map(|j| [ring[(i + j) % n], ring[(i + n - j) % n]])
                .collect()
        };
        list.sort_unstable();
        out.insert(d, list);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_graph_is_regular_and_symmetric() {
        for n in [1usize, 2, 5, 11, 100, 1000] {
            let devices: Vec<DeviceId> = (0..n as u64).map(|i| i * 3 + 1).collect();
            for degree in [2usize, 4, 7, 20] {
                let g = neighbours(&devices, degree, 42);
                assert_eq!(g.len(), n);
                let expect = (degree.div_ceil(2) * 2).min(n - 1);
                for (d, list) in &g {
                    assert_eq!(list.len(), expect, "n={n} degree={degree}");
                    assert!(!list.contains(d));
                    for o in list {
                        assert!(g[o].contains(d), "{d} -> {o} is not symmetric");
                    }
                }
            }
        }
    }

    #[test]
    fn the_seed_shuffles_the_ring() {
        let devices: Vec<DeviceId> = (0..50).collect();
        assert_ne!(neighbours(&devices, 4, 1), neighbours(&devices, 4, 2));
        assert_eq!(neighbours(&devices, 4, 1), neighbours(&devices, 4, 1));
    }
}
