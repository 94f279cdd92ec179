//! Aggregation, codec and noise costs, printed as markdown tables.
//!
//! ```sh
//! cargo run --release -p fleet-aggregation --example agg_bench
//! ```

use std::time::Instant;

use fleet_aggregation::codec::{Codec, ValueCodec, decode};
use fleet_aggregation::privacy::noise::add_gaussian_on_grid;
use fleet_aggregation::{Admission, Compute, Cpu, Rule, StrategyConfig, Update};
use fleet_models::ModelSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rows(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..d).map(|_| rng.random_range(-0.01f32..0.01)).collect())
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
