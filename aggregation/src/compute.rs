//! Compute backends: the element-wise and per-coordinate kernels that
//! aggregation rules and server optimisers are made of.
//!
//! [`Compute`] is implemented by [`Cpu`] (rayon over chunks of coordinates,
//! plain loops the compiler vectorises) and, with the `cuda` feature and a
//! GPU present, by the CUDA backend. [`select`] picks one at run time and
//! says which. Every kernel has a direct, obviously-correct reference in the
//! tests; backends must agree with it within 1e-5 relative.

use rayon::prelude::*;

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
        self.0
            .par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(acc, x)| {
                for (a, &v) in acc.iter_mut().zip(x) {
                    *a += weight * f64::from(v);
                }
            });
    }

    fn finish(self: Box<Self>) -> crate::Result<Vec<f64>> {
        Ok(self.0)
    }
}

/// Applies `f` to each coordinate's column of values, in parallel chunks.
fn per_coordinate(rows: &[Vec<f32>], f: impl Fn(&mut [f32]) -> f32 + Sync) -> Vec<f32> {
    let len = rows.first().map_or(0, Vec::len);
    let mut out = vec![0.0f32; len];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut col = vec![0.0f32; rows.len()];
            for (k, o) in chunk.iter_mut().enumerate() {
                let j = c * CHUNK + k;
                for (slot, r) in col.iter_mut().zip(rows) {
                    *slot = r[j];
                }
                *o = f(&mut col);
            }
        });
    out
}

fn sort(col: &mut [f32]) {
    col.sort_unstable_by(f32::total_cmp);
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

impl Compute for Cpu {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn weighted_sum(&self, len: usize) -> Box<dyn WeightedSum> {
        Box::new(CpuSum(vec![0.0; len]))
    }

    fn trimmed_mean(&self, rows: &[Vec<f32>], trim: usize) -> Vec<f32> {
        per_coordinate(rows, |col| {
            sort(col);
            mean(&col[trim..col.len() - trim])
        })
    }

    fn median(&self, rows: &[Vec<f32>]) -> Vec<f32> {
        per_coordinate(rows, |col| {
            sort(col);
            median_sorted(col)
        })
    }

    fn mean_around_median(&self, rows: &[Vec<f32>], keep: usize) -> Vec<f32> {
        per_coordinate(rows, |col| {
            sort(col);
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
        })
    }

    fn squared_distances(&self, rows: &[Vec<f32>]) -> Vec<f64> {
        let n = rows.len();
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .collect();
        let d: Vec<f64> = pairs
            .par_iter()
            .map(|&(i, j)| {
                rows[i]
                    .iter()
                    .zip(&rows[j])
                    .map(|(&a, &b)| {
                        let t = f64::from(a) - f64::from(b);
                        t * t
                    })
                    .sum()
            })
            .collect();
        let mut out = vec![0.0; n * n];
        for (&(i, j), &v) in pairs.iter().zip(&d) {
            out[i * n + j] = v;
            out[j * n + i] = v;
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
