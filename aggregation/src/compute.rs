//! Compute backends: the element-wise and per-coordinate kernels that
//! aggregation rules and server optimisers are made of.
//!
//! [`Compute`] is implemented by [`Cpu`] (rayon over chunks of coordinates,
//! plain loops the compiler vectorises) and, with the `cuda` feature and a
//! GPU present, by the CUDA backend. [`select`] picks one at run time and
//! says which. Every kernel has a direct, obviously-correct reference in the
//! tests; backends must agree with it within 1e-5 relative.

use rayon::prelude::*;

use crate::kernels::{self, LANES};
use crate::strategy::ServerOptimizer;

/// Coordinates handled by one parallel task.
const CHUNK: usize = 16 * 1024;

/// A running weighted sum `Σ wᵢ·xᵢ` of vectors of one length.
pub trait WeightedSum: Send {
    /// Adds `weight · x`.
    fn add(&mut self, weight: f64, x: &[f32]);
    /// The sum, in f64, or why the backend could not compute it
    /// ([`Error::Compute`](crate::Error::Compute); the CPU never fails).
    fn finish(self: Box<Self>) -> crate::Result<Vec<f64>>;
}

/// The kernels aggregation needs.
pub trait Compute: Send + Sync + std::fmt::Debug {
    /// A short name for logs: `cpu` or `cuda:<device>`.
    fn name(&self) -> String;
    /// A zeroed running sum of vectors of length `len`.
    fn weighted_sum(&self, len: usize) -> Box<dyn WeightedSum>;
    /// Per coordinate, the mean of the values left after dropping the `trim`
    /// smallest and `trim` largest (`2·trim < rows.len()`).
    fn trimmed_mean(&self, rows: &[Vec<f32>], trim: usize) -> Vec<f32>;
    /// Per coordinate, the median (the mean of the two middle values for an even count).
    fn median(&self, rows: &[Vec<f32>]) -> Vec<f32>;
    /// Per coordinate, the mean of the `keep` values closest to the median (Bulyan's last step).
    fn mean_around_median(&self, rows: &[Vec<f32>], keep: usize) -> Vec<f32>;
    /// The `n × n` matrix of squared L2 distances between rows, row-major.
    fn squared_distances(&self, rows: &[Vec<f32>]) -> Vec<f64>;
    /// One server-optimiser step, element-wise over `global`, `delta` and the state.
    fn server_step(
        &self,
        step: &ServerOptimizer,
        global: &mut [f32],
        delta: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    );
}

impl ServerOptimizer {
    /// Applies the rule to one coordinate `x` with round delta `d` and state
    /// `m`, `v`. The single definition every backend follows:
    ///
    /// | optimiser | rule |
    /// | --- | --- |
    /// | Sgd | `x ← x + η·Δ` |
    /// | Momentum | `m ← β·m + Δ;  x ← x + η·m` |
    /// | Adagrad | `m ← β₁m + (1−β₁)Δ;  v ← v + Δ²;  x ← x + η·m/(√v + τ)` |
    /// | Adam | `m ← β₁m + (1−β₁)Δ;  v ← β₂v + (1−β₂)Δ²;  x ← x + η·m/(√v + τ)` |
    /// | Yogi | `m ← β₁m + (1−β₁)Δ;  v ← v − (1−β₂)Δ²·sign(v − Δ²);  x ← x + η·m/(√v + τ)` |
    #[inline]
    pub fn apply(&self, x: &mut f32, d: f32, m: &mut f32, v: &mut f32) {
        match *self {
            ServerOptimizer::Sgd { lr } => *x += lr * d,
            ServerOptimizer::Momentum { lr, momentum } => {
                *m = momentum * *m + d;
                *x += lr * *m;
            }
            ServerOptimizer::Adagrad { lr, beta1, tau } => {
                *m = beta1 * *m + (1.0 - beta1) * d;
                *v += d * d;
                *x += lr * *m / (v.sqrt() + tau);
            }
            ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                *m = beta1 * *m + (1.0 - beta1) * d;
                *v = beta2 * *v + (1.0 - beta2) * d * d;
                *x += lr * *m / (v.sqrt() + tau);
            }
            ServerOptimizer::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => {
                *m = beta1 * *m + (1.0 - beta1) * d;
                let d2 = d * d;
                *v -= (1.0 - beta2) * d2 * (*v - d2).signum() * f32::from(*v != d2);
                *x += lr * *m / (v.sqrt() + tau);
            }
        }
    }
}

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

struct CpuSum(Vec<f64>);

impl WeightedSum for CpuSum {
    fn add(&mut self, weight: f64, x: &[f32]) {
        crate::kernels::par_axpy(&mut self.0, weight, x);
    }

    fn finish(self: Box<Self>) -> crate::Result<Vec<f64>> {
        Ok(self.0)
    }
}

/// Sorts each coordinate's column of values and hands `f` the sorted block
/// of [`LANES`] coordinates (`block[k][l]`: the `k`-th smallest value of
/// coordinate `l`) and the outputs of the block's coordinates (fewer than
/// [`LANES`] at the end). Columns are sorted [`LANES`] at a time by a
/// sorting network ([`kernels::sort_lanes`]), in parallel chunks.
fn per_sorted_block(rows: &[Vec<f32>], f: impl Fn(&[[f32; LANES]], &mut [f32]) + Sync) -> Vec<f32> {
    let len = rows.first().map_or(0, Vec::len);
    let net = kernels::Network::new(rows.len());
    let mut out = vec![0.0f32; len];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut block = vec![[0.0f32; LANES]; rows.len()];
            for (b, o) in chunk.chunks_mut(LANES).enumerate() {
                let j = c * CHUNK + b * LANES;
                for (slot, r) in block.iter_mut().zip(rows) {
                    slot[..o.len()].copy_from_slice(&r[j..j + o.len()]);
                }
                kernels::sort_lanes(&mut block, &net);
                f(&block, o);
            }
        });
    out
}

fn median_sorted(col: &[f32]) -> f32 {
    let n = col.len();
    if n % 2 == 1 {
        col[n / 2]
    } else {
        ((f64::from(col[n / 2 - 1]) + f64::from(col[n / 2])) / 2.0) as f32
    }
}

fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64) as f32
}

/// The mean of the `keep` values of a sorted column closest to its median.
fn mean_around_sorted(col: &[f32], keep: usize) -> f32 {
    let med = median_sorted(col);
    // The `keep` values closest to the median form a contiguous window of the
    // sorted column; slide it to the position of least total distance.
    let mut best = 0;
    let mut best_cost = f64::INFINITY;
    for s in 0..=col.len() - keep {
        let cost: f64 = col[s..s + keep]
            .iter()
            .map(|&v| (f64::from(v) - f64::from(med)).abs())
            .sum();
        if cost < best_cost {
            best_cost = cost;
            best = s;
        }
    }
    mean(&col[best..best + keep])
}

impl Compute for Cpu {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn weighted_sum(&self, len: usize) -> Box<dyn WeightedSum> {
        Box::new(CpuSum(vec![0.0; len]))
    }

    fn trimmed_mean(&self, rows: &[Vec<f32>], trim: usize) -> Vec<f32> {
        let kept = rows.len() - 2 * trim;
        per_sorted_block(rows, |block, out| {
            // In ascending order, as a sorted column's mean adds them.
            let mut sums = [0.0f64; LANES];
            for r in &block[trim..trim + kept] {
                for l in 0..LANES {
                    sums[l] += f64::from(r[l]);
                }
            }
            for (o, s) in out.iter_mut().zip(sums) {
                *o = (s / kept as f64) as f32;
            }
        })
    }

    fn median(&self, rows: &[Vec<f32>]) -> Vec<f32> {
        per_sorted_block(rows, |block, out| {
            let mut col = Vec::with_capacity(block.len());
            for (l, o) in out.iter_mut().enumerate() {
                col.clear();
                col.extend(block.iter().map(|r| r[l]));
                *o = median_sorted(&col);
            }
        })
    }

    fn mean_around_median(&self, rows: &[Vec<f32>], keep: usize) -> Vec<f32> {
        per_sorted_block(rows, |block, out| {
            let mut col = Vec::with_capacity(block.len());
            for (l, o) in out.iter_mut().enumerate() {
                col.clear();
                col.extend(block.iter().map(|r| r[l]));
                *o = mean_around_sorted(&col, keep);
            }
        })
    }

    fn squared_distances(&self, rows: &[Vec<f32>]) -> Vec<f64> {
        // ‖a − b‖² = ‖a‖² + ‖b‖² − 2a·b from the Gram matrix: one pass
        // over the rows in cache-sized blocks instead of one per pair. Each
        // product is exact in f64; the difference loses about 1e-16·‖a‖²
        // in absolute terms, which matters only for updates whose distance
        // is below 1e-8 of their squared norms (ranked as equal then).
        let n = rows.len();
        let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
        let g = kernels::gram(&refs);
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    out[i * n + j] = (g[i * n + i] + g[j * n + j] - 2.0 * g[i * n + j]).max(0.0);
                }
            }
        }
        out
    }

    fn server_step(
        &self,
        step: &ServerOptimizer,
        global: &mut [f32],
        delta: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        global
            .par_chunks_mut(CHUNK)
            .zip(delta.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((x, d), m), v)| {
                for i in 0..x.len() {
                    step.apply(&mut x[i], d[i], &mut m[i], &mut v[i]);
                }
            });
    }
}

/// The backend to use: CUDA when compiled in and a GPU answers, else the CPU.
/// The returned string says which was chosen and why.
pub fn select() -> (Box<dyn Compute>, String) {
    #[cfg(feature = "cuda")]
    match crate::cuda::Cuda::new(0) {
        Ok(gpu) => {
            let name = gpu.name();
            return (Box::new(gpu), format!("aggregation backend: {name}"));
        }
        Err(e) => {
            return (
                Box::new(Cpu),
                format!("aggregation backend: {} (no usable GPU: {e})", Cpu.name()),
            );
        }
    }
    #[allow(unreachable_code)]
    (
        Box::new(Cpu),
        format!(
            "aggregation backend: {} (built without the cuda feature)",
            Cpu.name()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Each coordinate's column, sorted: the obviously-correct reference.
    fn sorted_columns(rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
        (0..rows[0].len())
            .map(|j| {
                let mut col: Vec<f32> = rows.iter().map(|r| r[j]).collect();
                col.sort_by(f32::total_cmp);
                col
            })
            .collect()
    }

    fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                (0..d)
                    .map(|_| match rng.random_range(0..5) {
                        // Ties and signed zeros as well as spread values.
                        0 => 0.0,
                        1 => -0.0,
                        2 => f32::from(rng.random_range(-2i8..2)) * 0.5,
                        _ => rng.random_range(-1.0f32..1.0),
                    })
                    .collect()
            })
            .collect()
    }

    /// The sorting-network rules equal the sort-per-coordinate definitions
    /// to the bit (sums run over the sorted values in the same order), for
    /// odd and even counts and lengths that end mid-block and mid-chunk.
    #[test]
    fn robust_rules_equal_their_sorted_definitions() {
        for (n, d) in [
            (1, 5),
            (2, 17),
            (3, 100),
            (7, 33),
            (20, CHUNK + 21),
            (21, 40),
            (64, 300),
        ] {
            let rows = rows(n, d, n as u64);
            let cols = sorted_columns(&rows);
            let median: Vec<f32> = cols.iter().map(|c| median_sorted(c)).collect();
            // ±0 may trade places within a column: compare numbers, then bits where nonzero.
            let same = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got, want, "{what}, n = {n}, d = {d}");
                for (g, w) in got.iter().zip(want) {
                    if *w != 0.0 {
                        assert_eq!(g.to_bits(), w.to_bits(), "{what}, n = {n}");
                    }
                }
            };
            same(&Cpu.median(&rows), &median, "median");
            for trim in 0..n.div_ceil(2) {
                let want: Vec<f32> = cols.iter().map(|c| mean(&c[trim..n - trim])).collect();
                same(&Cpu.trimmed_mean(&rows, trim), &want, "trimmed mean");
            }
            for keep in 1..=n {
                let want: Vec<f32> = cols.iter().map(|c| mean_around_sorted(c, keep)).collect();
                same(
                    &Cpu.mean_around_median(&rows, keep),
                    &want,
                    "mean around median",
                );
            }
        }
    }
}
