//! Aggregation, codec and noise costs, printed as markdown tables.
//!
//! ```sh
//! cargo run --release -p fleet-aggregation --example agg_bench
//! ```
//!
//! Built with the `cuda` feature and run where a GPU answers, it also prints
//! the GPU beside the CPU: FedAvg's rate from host memory against the pinned
//! host-to-device copy rate, and the robust rules on `--gpu-updates` updates
//! of `--gpu-params` parameters:
//!
//! ```sh
//! cargo run --release -p fleet-aggregation --features cuda --example agg_bench -- --gpu-only --gpu-params 4000000
//! ```

use std::time::Instant;

use clap::Parser;

use fleet_aggregation::codec::{Codec, ValueCodec, decode, decode_into};
use fleet_aggregation::privacy::noise::add_gaussian_on_grid;
use fleet_aggregation::{Admission, Compute, Cpu, Rule, StrategyConfig, Update};
use fleet_models::ModelSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
#[cfg(feature = "cuda")]
use rayon::prelude::*;

/// Aggregation, codec and noise costs, printed as markdown tables; with the
/// `cuda` feature and a GPU, the GPU beside the CPU.
#[derive(Parser)]
struct Args {
    /// Parameters per update in the GPU comparison (25 M is the reference
    /// size; 64 such updates take 6.4 GB of host and GPU memory).
    #[arg(long, default_value_t = 25_000_000)]
    gpu_params: usize,
    /// Updates in the GPU comparison of the robust rules.
    #[arg(long, default_value_t = 64)]
    gpu_updates: usize,
    /// Prints only the GPU comparison.
    #[arg(long)]
    gpu_only: bool,
    /// Prints only the streaming FedAvg table.
    #[arg(long)]
    streaming_only: bool,
    /// Prints only the robust rules' kernels at NumPy's shapes
    /// (bench/numpy_rules.py times the same in NumPy).
    #[arg(long)]
    robust_only: bool,
    /// Updates streamed per row of the streaming FedAvg table.
    #[arg(long, default_value_t = 400)]
    stream_updates: usize,
}

fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..d).map(|_| rng.random_range(-0.01f32..0.01)).collect())
        .collect()
}

/// `n` rows of `d` values, generated in parallel (one seed per row).
#[cfg(feature = "cuda")]
fn rows_par(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    (0..n)
        .into_par_iter()
        .map(|i| rows(1, d, seed * 1000 + i as u64).remove(0))
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if args.streaming_only {
        return streaming_table(&args);
    }
    if args.robust_only {
        return robust_table();
    }
    if !args.gpu_only {
        streaming_table(&args)?;
        robust_table()?;
        cpu_tables()?;
    }
    gpu_tables(&args)
}

#[cfg(not(feature = "cuda"))]
fn gpu_tables(_: &Args) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "\nGPU columns skipped: built without the cuda feature (--features fleet-aggregation/cuda)"
    );
    Ok(())
}

/// Seconds `f` takes.
#[cfg(feature = "cuda")]
fn time<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed().as_secs_f64(), out)
}

#[cfg(feature = "cuda")]
fn gpu_tables(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    use fleet_aggregation::Cuda;
    let gpu = match Cuda::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("\nGPU columns skipped: no usable GPU ({e})");
            return Ok(());
        }
    };
    let (p, n) = (args.gpu_params, args.gpu_updates);
    println!("\nGPU {} beside CPU {}\n", gpu.name(), Cpu.name());

    // FedAvg: a stream of updates from host memory (four distinct vectors).
    let pool = rows_par(4, p, 7);
    let updates = 16;
    let fedavg = |c: &dyn Compute| -> Result<f64, fleet_aggregation::Error> {
        let mut s = c.weighted_sum(p);
        let (secs, r) = time(|| {
            for i in 0..updates {
                s.add(1.0 + i as f64, &pool[i % pool.len()]);
            }
            s.finish()
        });
        r?;
        Ok((updates * p * 4) as f64 / secs / 1e9)
    };
    fedavg(&gpu)?; // warm-up: first allocations of pinned memory
    let gpu_rate = fedavg(&gpu)?;
    let cpu_rate = fedavg(&Cpu)?;
    let copy = gpu.pinned_copy_rate(64 << 20, 32)?;
    println!("| FedAvg, {updates} updates × {p} parameters | GB/s of updates |");
    println!("| --- | --- |");
    println!("| CPU weighted sum | {cpu_rate:.1} |");
    println!("| GPU weighted sum from host memory | {gpu_rate:.1} |");
    println!("| pinned host-to-device copy (64 MiB) | {copy:.1} |");
    println!(
        "| GPU weighted sum / pinned copy | {:.0}% |",
        100.0 * gpu_rate / copy
    );
    drop(pool);

    let data = rows_par(n, p, 8);
    let trim = n / 10;
    println!(
        "\n| rule ({n} updates × {p} parameters, host in, host out) | CPU s | GPU s | speed-up |"
    );
    println!("| --- | --- | --- | --- |");
    let row = |name: &str, cpu: f64, gpu: f64| {
        println!("| {name} | {cpu:.3} | {gpu:.3} | {:.1}× |", cpu / gpu);
    };
    let (c, a) = time(|| Cpu.median(&data));
    let (g, b) = time(|| gpu.median(&data));
    assert_eq!(a.len(), b.len());
    row("median", c, g);
    let (c, _) = time(|| Cpu.trimmed_mean(&data, trim));
    let (g, _) = time(|| gpu.trimmed_mean(&data, trim));
    row(&format!("trimmed mean (trim {trim} per side)"), c, g);
    let (c, _) = time(|| Cpu.squared_distances(&data));
    let (g, _) = time(|| gpu.squared_distances(&data));
    row("Krum: pairwise squared distances", c, g);
    Ok(())
}

/// Streaming FedAvg as the coordinator runs it, in steady state (the
/// default strategy: relative bound and centred clipping, with the previous
/// round's basis and history): each update arrives f32-encoded, is decoded,
/// checked and added. Beside it, on the same bytes: the kernels alone, a
/// memcpy of the update bytes and a plain one-thread f64 axpy.
fn streaming_table(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let compute = Cpu;
    println!("streaming FedAvg, {}\n", compute.name());
    println!("| model | parameters | what | updates | ms per update | GB/s of update bytes |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let layout = spec.layout();
        let d = layout.total;
        let adm = Admission {
            fingerprint: layout.fingerprint(),
            len: d,
            max_norm: None,
        };
        let pool = rows(20, d, 7);
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let weights: Vec<f64> = (0..pool.len())
            .map(|_| rng.random_range(100.0..700.0))
            .collect();
        let encoded: Vec<Vec<u8>> = pool
            .iter()
            .map(|x| Codec::F32.encode(x, &mut rng))
            .collect::<Result<_, _>>()?;
        let cfg = StrategyConfig::fedavg();
        // A first round gives the basis and history of the timed ones.
        let mut first = cfg.aggregator(adm, &compute)?;
        for (x, &w) in pool.iter().zip(&weights) {
            first.add(&Update {
                fingerprint: adm.fingerprint,
                values: x,
                weight: w,
            })?;
        }
        let first = first.finish()?;
        let n = args.stream_updates;
        let bytes = (n * 4 * d) as f64;
        let row = |what: &str, secs: f64| {
            println!(
                "| {} | {d} | {what} | {n} | {:.3} | {:.2} |",
                spec.name(),
                secs * 1e3 / n as f64,
                bytes / secs / 1e9
            );
        };
        let t = Instant::now();
        let mut agg = cfg
            .aggregator(adm, &compute)?
            .with_basis(first.basis)
            .with_history(first.history.clone());
        let mut values = Vec::new();
        for i in 0..n {
            let k = i % pool.len();
            decode_into(&encoded[k], d, &mut values)?;
            let u = Update {
                fingerprint: adm.fingerprint,
                values: &values,
                weight: weights[k],
            };
            let checked = agg.check(&u)?;
            agg.add_checked(checked)?;
        }
        agg.finish()?;
        row(
            "decode, check, add (as the coordinator)",
            t.elapsed().as_secs_f64(),
        );
        let t = Instant::now();
        let mut agg = cfg
            .aggregator(adm, &compute)?
            .with_basis(first.basis)
            .with_history(first.history.clone());
        for i in 0..n {
            let k = i % pool.len();
            agg.add(&Update {
                fingerprint: adm.fingerprint,
                values: &pool[k],
                weight: weights[k],
            })?;
        }
        agg.finish()?;
        row("add, already decoded", t.elapsed().as_secs_f64());
        let t = Instant::now();
        for i in 0..n {
            decode_into(&encoded[i % pool.len()], d, &mut values)?;
            std::hint::black_box(&mut values);
        }
        row(
            "decode alone (into a reused buffer)",
            t.elapsed().as_secs_f64(),
        );
        let mut sum = compute.weighted_sum(d);
        let t = Instant::now();
        for i in 0..n {
            let k = i % pool.len();
            sum.add(weights[k], &pool[k]);
        }
        std::hint::black_box(sum.finish()?);
        row(
            "running sum alone (kernels::par_axpy)",
            t.elapsed().as_secs_f64(),
        );
        let mut copy = vec![0u8; 4 * d];
        let t = Instant::now();
        for i in 0..n {
            let k = i % pool.len();
            copy.copy_from_slice(&encoded[k][5..]);
            std::hint::black_box(&mut copy);
        }
        row(
            "baseline: memcpy of the update bytes",
            t.elapsed().as_secs_f64(),
        );
        let mut acc = vec![0.0f64; d];
        let t = Instant::now();
        for i in 0..n {
            let k = i % pool.len();
            let w = weights[k];
            for (a, &v) in acc.iter_mut().zip(&pool[k]) {
                *a += w * f64::from(v);
            }
            std::hint::black_box(&mut acc);
        }
        row(
            "baseline: one-thread f64 axpy loop",
            t.elapsed().as_secs_f64(),
        );
    }
    println!();
    Ok(())
}

/// The robust rules' kernels alone (the rows already buffered), at the
/// shapes `bench/numpy_rules.py` times NumPy at: 64 updates of 1,000,000
/// values and 20 CNN updates. Median of three runs each.
fn robust_table() -> Result<(), Box<dyn std::error::Error>> {
    println!("robust rules, kernels only, {}\n", Cpu.name());
    println!("| updates × values | rule | ms (median of 3) |");
    println!("| --- | --- | --- |");
    for (n, d) in [
        (64usize, 1_000_000usize),
        (20, ModelSpec::fashion_cnn().layout().total),
    ] {
        let data: Vec<Vec<f32>> = (0..n)
            .map(|i| rows(1, d, 100 + i as u64).remove(0))
            .collect();
        let trim = (0.1 * n as f64).floor() as usize;
        let median3 = |f: &dyn Fn()| {
            let mut t: Vec<f64> = (0..3)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[1]
        };
        let ms = median3(&|| {
            std::hint::black_box(Cpu.median(&data));
        });
        println!("| {n} × {d} | coordinate-wise median | {ms:.1} |");
        let ms = median3(&|| {
            std::hint::black_box(Cpu.trimmed_mean(&data, trim));
        });
        println!("| {n} × {d} | trimmed mean (β = 0.1, {trim} per side) | {ms:.1} |");
        let ms = median3(&|| {
            std::hint::black_box(Cpu.squared_distances(&data));
        });
        println!("| {n} × {d} | pairwise squared distances (Krum) | {ms:.1} |");
    }
    println!();
    Ok(())
}

fn cpu_tables() -> Result<(), Box<dyn std::error::Error>> {
    let compute = Cpu;
    println!("compute: {}\n", compute.name());
    println!("| model | parameters | rule | updates | ms per round | ms per update |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let layout = spec.layout();
        let adm = Admission {
            fingerprint: layout.fingerprint(),
            len: layout.total,
            max_norm: None,
        };
        for (rule, n) in [
            (Rule::Mean, 100),
            (Rule::Median, 20),
            (Rule::TrimmedMean { beta: 0.1 }, 20),
            (Rule::Krum { f: 2 }, 20),
            (Rule::Bulyan { f: 2 }, 20),
        ] {
            let data = rows(n.min(20), layout.total, 1);
            let cfg = StrategyConfig::fedavg().with_rule(rule);
            let t = Instant::now();
            let mut agg = cfg.aggregator(adm, &compute)?;
            for i in 0..n {
                agg.add(&Update {
                    fingerprint: adm.fingerprint,
                    values: &data[i % data.len()],
                    weight: 10.0,
                })?;
            }
            agg.finish()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!(
                "| {} | {} | {rule:?} | {n} | {ms:.1} | {:.2} |",
                spec.name(),
                layout.total,
                ms / n as f64
            );
        }
    }

    println!(
        "\n| codec | bytes (2NN update) | vs f32 | encode ms | decode ms | relative L2 error |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let d = ModelSpec::fashion_2nn().layout().total;
    let x = rows(1, d, 2).remove(0);
    let norm = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for codec in [
        Codec::F32,
        Codec::F16,
        Codec::INT8,
        Codec::TopK {
            fraction: 0.1,
            values: ValueCodec::F32,
        },
        Codec::TopK {
            fraction: 0.1,
            values: ValueCodec::Int8,
        },
    ] {
        let t = Instant::now();
        let b = codec.encode(&x, &mut rng)?;
        let enc = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let y = decode(&b, d)?;
        let dec = t.elapsed().as_secs_f64() * 1e3;
        let err = x
            .iter()
            .zip(&y)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>()
            .sqrt()
            / norm;
        println!(
            "| {codec:?} | {} | {:.3} | {enc:.2} | {dec:.2} | {err:.2e} |",
            b.len(),
            b.len() as f64 / (4.0 * d as f64)
        );
    }

    println!("\n| noise | values | seconds | seconds per million values |");
    println!("| --- | --- | --- | --- |");
    let (grid_k, _) = fleet_aggregation::privacy::discrete::grid_for(0.01);
    for (k, n) in [
        (None, 10_000usize),
        (None, 100_000),
        (Some(grid_k), 100_000),
    ] {
        let mut v = vec![0.0f32; n];
        let t = Instant::now();
        add_gaussian_on_grid(&mut v, 0.01, k)?;
        let s = t.elapsed().as_secs_f64();
        let grid = k.map_or("2^-149 (default)".to_string(), |k| format!("2^{k}"));
        println!(
            "| opendp Gaussian, σ = 0.01, grid {grid} | {n} | {s:.3} | {:.2} |",
            s * 1e6 / n as f64
        );
    }
    let mut fast = fleet_aggregation::privacy::discrete::FastGaussian::from_os();
    for n in [199_210usize, 1_663_370] {
        let mut v = vec![0.0f32; n];
        let t = Instant::now();
        fast.add(&mut v, 0.01)?;
        let s = t.elapsed().as_secs_f64();
        println!(
            "| fast discrete Gaussian, σ = 0.01, grid 2^{grid_k} | {n} | {s:.3} | {:.2} |",
            s * 1e6 / n as f64
        );
    }
    Ok(())
}
