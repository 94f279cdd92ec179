//! The CUDA backend agrees with the CPU reference on every kernel.
//!
//! Random inputs of several sizes: lengths that are not multiples of the
//! block (256), tile (16 × 32) or staging chunk (4 Mi values) sizes, odd and
//! even row counts, and columns full of ties. Agreement is `|gpu − cpu| ≤
//! 1e-5 · max(|cpu|, 1e-6)`: 1e-5 relative, with an absolute floor of 1e-11
//! near zero. Each test also checks that nothing fell back to the CPU
//! ([`Cuda::cpu_fallbacks`]), so that a failing kernel cannot pass by
//! comparing the CPU with itself. Without a usable GPU each test fails
//! saying what is missing, unless `FLEET_SKIP_GPU=1` explicitly allows
//! skipping them (see the README's test section).
#![cfg(feature = "cuda")]

use fleet_aggregation::{Compute, Cpu, Cuda, ServerOptimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The GPU under test; when dropped at the end of a passing test, asserts
/// that every computation ran on the GPU.
struct Gpu(Cuda);

impl std::ops::Deref for Gpu {
    type Target = Cuda;
    fn deref(&self) -> &Cuda {
        &self.0
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                self.0.cpu_fallbacks(),
                0,
                "computations fell back to the CPU (see the warnings above)"
            );
        }
    }
}

fn gpu() -> Option<Gpu> {
    match Cuda::new(0) {
        Ok(g) => {
            eprintln!("using {}", g.name());
            Some(Gpu(g))
        }
        Err(e) if std::env::var("FLEET_SKIP_GPU").as_deref() == Ok("1") => {
            eprintln!("SKIPPED (FLEET_SKIP_GPU=1): no usable GPU ({e})");
            None
        }
        Err(e) => panic!(
            "no usable GPU ({e}); these tests need an NVIDIA GPU with its driver and NVRTC \
             (bench/gpu-check.sh), or set FLEET_SKIP_GPU=1 to skip them"
        ),
    }
}

fn close(what: &str, gpu: f64, cpu: f64) {
    assert!(
        (gpu - cpu).abs() <= 1e-5 * cpu.abs().max(1e-6),
        "{what}: gpu {gpu} vs cpu {cpu}"
    );
}

fn agree32(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (j, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        close(&format!("{what}[{j}]"), f64::from(g), f64::from(c));
    }
}

fn agree64(what: &str, gpu: &[f64], cpu: &[f64]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (j, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        close(&format!("{what}[{j}]"), g, c);
    }
}

/// `n` rows of `d` values in [-1, 1); with `ties`, values on a grid of 0.25
/// so that columns repeat values.
fn rows(n: usize, d: usize, ties: bool, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..d)
                .map(|_| {
                    let v: f32 = rng.random_range(-1.0..1.0);
                    if ties { (v * 4.0).round() / 4.0 } else { v }
                })
                .collect()
        })
        .collect()
}

const LENGTHS: [usize; 4] = [1, 255, 1025, 100_003];

#[test]
fn weighted_sum_agrees() {
    let Some(g) = gpu() else { return };
    // The last length spans two staging chunks of unequal fill.
    for (k, d) in [1usize, 1000, 100_003, (4 << 20) + 3]
        .into_iter()
        .enumerate()
    {
        let xs = rows(5, d, false, 10 + k as u64);
        let mut a = g.weighted_sum(d);
        let mut b = Cpu.weighted_sum(d);
        for (i, x) in xs.iter().enumerate() {
            let w = 0.5 + i as f64 * 3.25;
            a.add(w, x);
            b.add(w, x);
        }
        let (a, b) = (a.finish().unwrap(), b.finish().unwrap());
        agree64(&format!("weighted sum d={d}"), &a, &b);
    }
}

#[test]
fn server_steps_agree() {
    let Some(g) = gpu() else { return };
    let steps = [
        ServerOptimizer::Sgd { lr: 0.7 },
        ServerOptimizer::Momentum {
            lr: 0.5,
            momentum: 0.9,
        },
        ServerOptimizer::Adagrad {
            lr: 0.1,
            beta1: 0.9,
            tau: 1e-3,
        },
        ServerOptimizer::Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
        ServerOptimizer::Yogi {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        },
    ];
    for step in steps {
        for (k, d) in LENGTHS.into_iter().enumerate() {
            let r = rows(5, d, false, 20 + k as u64);
            let (mut x1, mut m1) = (
                r[0].clone(),
                r[1].iter().map(|v| v * 0.1).collect::<Vec<f32>>(),
            );
            let mut v1: Vec<f32> = r[2].iter().map(|v| v * v).collect();
            // Yogi's tie: v equal to Δ² on every third coordinate.
            for j in (0..d).step_by(3) {
                v1[j] = r[3][j] * r[3][j];
            }
            let (mut x2, mut m2, mut v2): (Vec<f32>, Vec<f32>, Vec<f32>) =
                (x1.clone(), m1.clone(), v1.clone());
            for (t, delta) in [&r[3], &r[4], &r[3]].into_iter().enumerate() {
                g.server_step(&step, &mut x1, delta, &mut m1, &mut v1);
                Cpu.server_step(&step, &mut x2, delta, &mut m2, &mut v2);
                let what = format!("{step:?} d={d} step {t}");
                agree32(&format!("{what} x"), &x1, &x2);
                agree32(&format!("{what} m"), &m1, &m2);
                agree32(&format!("{what} v"), &v1, &v2);
            }
        }
    }
}

#[test]
fn medians_agree() {
    let Some(g) = gpu() else { return };
    for n in [1usize, 2, 5, 6, 33, 64] {
        for (k, d) in LENGTHS.into_iter().enumerate() {
            for ties in [false, true] {
                let r = rows(n, d, ties, 100 + (n * 10 + k) as u64);
                agree32(
                    &format!("median n={n} d={d} ties={ties}"),
                    &g.median(&r),
                    &Cpu.median(&r),
                );
            }
        }
    }
}

#[test]
fn trimmed_means_agree() {
    let Some(g) = gpu() else { return };
    for (n, trims) in [
        (3usize, &[0usize, 1][..]),
        (10, &[0, 1, 4]),
        (21, &[2, 5, 10]),
    ] {
        for (k, d) in LENGTHS.into_iter().enumerate() {
            for ties in [false, true] {
                let r = rows(n, d, ties, 200 + (n * 10 + k) as u64);
                for &trim in trims {
                    agree32(
                        &format!("trimmed mean n={n} trim={trim} d={d} ties={ties}"),
                        &g.trimmed_mean(&r, trim),
                        &Cpu.trimmed_mean(&r, trim),
                    );
                }
            }
        }
    }
}

#[test]
fn means_around_median_agree() {
    let Some(g) = gpu() else { return };
    for (n, keeps) in [
        (4usize, &[1usize, 2, 4][..]),
        (9, &[1, 3, 8, 9]),
        (20, &[12]),
    ] {
        for (k, d) in LENGTHS.into_iter().enumerate() {
            for ties in [false, true] {
                let r = rows(n, d, ties, 300 + (n * 10 + k) as u64);
                for &keep in keeps {
                    agree32(
                        &format!("mean around median n={n} keep={keep} d={d} ties={ties}"),
                        &g.mean_around_median(&r, keep),
                        &Cpu.mean_around_median(&r, keep),
                    );
                }
            }
        }
    }
}

#[test]
fn squared_distances_agree() {
    let Some(g) = gpu() else { return };
    for n in [2usize, 3, 17, 40] {
        for (k, d) in [1usize, 31, 33, 100_003].into_iter().enumerate() {
            let mut r = rows(n, d, false, 400 + (n * 10 + k) as u64);
            // Two identical rows (distance 0) and two very close ones.
            if n >= 3 {
                r[1] = r[0].clone();
                r[2] = r[0].iter().map(|v| v + 1e-4).collect();
            }
            let (a, b) = (g.squared_distances(&r), Cpu.squared_distances(&r));
            agree64(&format!("squared distances n={n} d={d}"), &a, &b);
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn more_rows_than_the_kernels_take_go_to_the_cpu() {
    let Some(g) = gpu() else { return };
    // As many rows as the kernels take: computed on the GPU, which agrees.
    let r = rows(fleet_aggregation::cuda::MAX_ROWS, 7, true, 500);
    agree32("median of 512 rows", &g.median(&r), &Cpu.median(&r));
    // One more: the CPU's own result, bit for bit, and not a GPU failure.
    let r = rows(fleet_aggregation::cuda::MAX_ROWS + 1, 7, true, 500);
    assert_eq!(g.median(&r), Cpu.median(&r), "median of 513 rows");
}
