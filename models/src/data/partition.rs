//! Splitting a data set across clients.
//!
//! Three schemes, each deterministic in its seed and each assigning every
//! example to exactly one client:
//!
//! - [`Scheme::Iid`]: a uniform shuffle cut into near-equal parts.
//! - [`Scheme::Dirichlet`]: for each class, the share of each client is drawn
//!   from `Dir(α, …, α)` (Hsu, Qi and Brown, 2019). Small α gives clients few
//!   classes; large α approaches IID.
//! - [`Scheme::Shards`]: McMahan et al. (2017): sort by label, cut into
//!   `shards_per_client × clients` shards of equal size and deal each client
//!   `shards_per_client` of them at random, so that with 2 shards most clients
//!   see two labels.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheme {
    /// Uniformly at random.
    Iid,
    /// Label proportions per client drawn from a symmetric Dirichlet.
    Dirichlet {
        /// Concentration α > 0.
        alpha: f64,
    },
    /// Label-sorted shards.
    Shards {
        /// Shards dealt to each client (2 in McMahan et al.).
        shards_per_client: usize,
    },
}

impl std::str::FromStr for Scheme {
    type Err = String;

    /// Parses `iid`, `dirichlet:<alpha>` or `shards:<per client>`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "iid" => Ok(Scheme::Iid),
            "dirichlet" => arg
                .parse()
                .ok()
                .filter(|a: &f64| a.is_finite() && *a > 0.0)
                .map(|alpha| Scheme::Dirichlet { alpha })
                .ok_or_else(|| {
                    format!("dirichlet needs a concentration > 0, e.g. dirichlet:0.5 (got {s:?})")
                }),
            "shards" => arg
                .parse()
                .ok()
                .filter(|n: &usize| *n > 0)
                .map(|shards_per_client| Scheme::Shards { shards_per_client })
                .ok_or_else(|| {
                    format!("shards needs a count per client, e.g. shards:2 (got {s:?})")
                }),
            _ => Err(format!(
                "unknown partition {s:?}; expected iid, dirichlet:<alpha> or shards:<n>"
            )),
        }
    }
}

/// The examples of each client, as indices into the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// `clients[k]` lists the examples of client `k`, ascending.
    pub clients: Vec<Vec<usize>>,
}

/// Splits `labels.len()` examples across `clients` clients.
pub fn partition(
    labels: &[u8],
    classes: usize,
    clients: usize,
    scheme: Scheme,
    seed: u64,
) -> Result<Partition> {
    if clients == 0 {
        return Err(Error::InvalidConfig {
            field: "clients",
            reason: "need at least one client".into(),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut parts = match scheme {
        Scheme::Iid => {
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.shuffle(&mut rng);
            split_even(&idx, clients)
        }
        Scheme::Dirichlet { alpha } => {
            if !(alpha.is_finite() && alpha > 0.0) {
                return Err(Error::InvalidConfig {
                    field: "alpha",
                    reason: format!("Dirichlet concentration {alpha} must be a finite number > 0"),
                });
            }
            dirichlet(labels, classes, clients, alpha, &mut rng)
        }
        Scheme::Shards { shards_per_client } => {
            let shards = shards_per_client.saturating_mul(clients);
            if shards_per_client == 0 || shards > labels.len() {
                return Err(Error::InvalidConfig {
                    field: "shards_per_client",
                    reason: format!(
                        "{shards_per_client} shards for each of {clients} clients need between 1 and {} examples per shard",
                        labels.len()
                    ),
                });
            }
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            idx.sort_by_key(|&i| (labels[i], i));
            let mut shard_list = split_even(&idx, shards);
            shard_list.shuffle(&mut rng);
            shard_list
                .chunks(shards_per_client)
                .map(|c| c.concat())
                .collect()
        }
    };
    for p in &mut parts {
        p.sort_unstable();
    }
    Ok(Partition { clients: parts })
}

/// Cuts `idx` into `n` contiguous parts whose sizes differ by at most one.
fn split_even(idx: &[usize], n: usize) -> Vec<Vec<usize>> {
    let (base, extra) = (idx.len() / n, idx.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for k in 0..n {
        let len = base + usize::from(k < extra);
        out.push(idx[start..start + len].to_vec());
        start += len;
    }
    out
}

fn dirichlet(
    labels: &[u8],
    classes: usize,
    clients: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha was checked to be > 0");
    let mut out = vec![Vec::new(); clients];
    for c in 0..classes {
        let mut idx: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i] as usize == c)
            .collect();
        if idx.is_empty() {
            continue;
        }
        idx.shuffle(rng);
        let mut w: Vec<f64> = (0..clients).map(|_| gamma.sample(rng)).collect();
        let total: f64 = w.iter().sum();
        if !(total > 0.0 && total.is_finite()) {
            // Every draw underflowed (tiny α): the whole class goes to one client,
            // which is the limit the distribution tends to.
            w.iter_mut().for_each(|v| *v = 0.0);
            w[rng.random_range(0..clients)] = 1.0;
        }
        let total: f64 = w.iter().sum();
        // Cumulative cut points, so that rounding never loses or duplicates an example.
        let mut acc = 0.0;
        let mut start = 0;
        for (k, wk) in w.iter().enumerate() {
            acc += wk / total;
            let end = if k + 1 == clients {
                idx.len()
            } else {
                ((acc * idx.len() as f64).round() as usize).clamp(start, idx.len())
            };
            out[k].extend_from_slice(&idx[start..end]);
            start = end;
        }
    }
    out
}

impl Partition {
    /// Number of examples of each class held by each client.
    pub fn label_histograms(&self, labels: &[u8], classes: usize) -> Vec<Vec<usize>> {
        self.clients
            .iter()
            .map(|ix| {
                let mut h = vec![0; classes];
                for &i in ix {
                    h[labels[i] as usize] += 1;
                }
                h
            })
            .collect()
    }

    /// A plain-text table: one row per client with its example count, the
    /// number of classes it holds and its per-class counts.
    pub fn report(&self, labels: &[u8], classes: usize) -> String {
        use std::fmt::Write;
        let hist = self.label_histograms(labels, classes);
        let mut s = String::new();
        let _ = write!(s, "{:>7} {:>8} {:>7} |", "client", "examples", "classes");
        for c in 0..classes {
            let _ = write!(s, " {:>5}", format!("c{c}"));
        }
        s.push('\n');
        for (k, h) in hist.iter().enumerate() {
            let present = h.iter().filter(|&&v| v > 0).count();
            let _ = write!(s, "{k:>7} {:>8} {present:>7} |", self.clients[k].len());
            for v in h {
                let _ = write!(s, " {v:>5}");
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 7 + i / 3) % classes) as u8).collect()
    }

    fn assert_exact_cover(p: &Partition, n: usize) {
        let mut seen = vec![0u8; n];
        for c in &p.clients {
            for &i in c {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "every example exactly once");
    }

    #[test]
    fn every_scheme_covers_every_example_exactly_once() {
        let y = labels(1003, 10);
        for scheme in [
            Scheme::Iid,
            Scheme::Dirichlet { alpha: 0.5 },
            Scheme::Dirichlet { alpha: 1e-4 },
            Scheme::Dirichlet { alpha: 100.0 },
            Scheme::Shards {
                shards_per_client: 2,
            },
        ] {
            for clients in [1, 7, 100] {
                let p = partition(&y, 10, clients, scheme, 42).unwrap();
                assert_eq!(p.clients.len(), clients);
                assert_exact_cover(&p, y.len());
            }
        }
    }

    #[test]
    fn same_seed_same_partition_other_seed_other_partition() {
        let y = labels(500, 10);
        for scheme in [
            Scheme::Iid,
            Scheme::Dirichlet { alpha: 0.5 },
            Scheme::Shards {
                shards_per_client: 2,
            },
        ] {
            let a = partition(&y, 10, 20, scheme, 1).unwrap();
            assert_eq!(a, partition(&y, 10, 20, scheme, 1).unwrap());
            assert_ne!(a, partition(&y, 10, 20, scheme, 2).unwrap());
        }
    }

    #[test]
    fn iid_sizes_differ_by_at_most_one() {
        let p = partition(&labels(1003, 10), 10, 10, Scheme::Iid, 3).unwrap();
        let sizes: Vec<usize> = p.clients.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap(), 1);
    }

    #[test]
    fn shards_give_few_labels_and_small_alpha_is_skewed() {
        // 100 clients × 2 shards of 10 examples over 10 sorted classes of 200:
        // every shard is single-label, so each client holds at most 2 classes.
        let y: Vec<u8> = (0..2000).map(|i| (i % 10) as u8).collect();
        let p = partition(
            &y,
            10,
            100,
            Scheme::Shards {
                shards_per_client: 2,
            },
            9,
        )
        .unwrap();
        let h = p.label_histograms(&y, 10);
        assert!(
            h.iter()
                .all(|row| row.iter().filter(|&&v| v > 0).count() <= 2)
        );
        // Dirichlet: mean number of classes per client falls with α.
        let mean_classes = |alpha| {
            let p = partition(&y, 10, 20, Scheme::Dirichlet { alpha }, 5).unwrap();
            let h = p.label_histograms(&y, 10);
            h.iter()
                .map(|r| r.iter().filter(|&&v| v > 0).count())
                .sum::<usize>() as f64
                / 20.0
        };
        assert!(mean_classes(0.05) < 4.0, "{}", mean_classes(0.05));
        assert!(mean_classes(100.0) > 9.5, "{}", mean_classes(100.0));
        assert!(p.report(&y, 10).lines().count() == 101);
    }

    #[test]
    fn invalid_arguments_are_errors() {
        let y = labels(10, 2);
        assert!(partition(&y, 2, 0, Scheme::Iid, 0).is_err());
        assert!(partition(&y, 2, 3, Scheme::Dirichlet { alpha: 0.0 }, 0).is_err());
        assert!(partition(&y, 2, 3, Scheme::Dirichlet { alpha: f64::NAN }, 0).is_err());
        let e = partition(
            &y,
            2,
            6,
            Scheme::Shards {
                shards_per_client: 2,
            },
            0,
        )
        .unwrap_err();
        assert!(e.to_string().contains("shards_per_client"));
    }
}
