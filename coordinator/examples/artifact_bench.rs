//! How long the coordinator takes to build a model version's inference
//! artifacts (`fleet_coordinator::artifacts::build`: float and int8), side
//! by side with its two parts alone: the float export and the int8
//! quantization (500 calibration examples of the embedded training set).
//!
//! ```sh
//! cargo run --release -p fleet-coordinator --example artifact_bench -- [--runs 20]
//! ```
//!
//! Parameters are each architecture's initial parameters (seed 1): the work
//! (graph building, a calibration forward pass, encoding) does not depend
//! on their values. The first `build` call also decodes the embedded data
//! set once per process; it is reported separately.

use std::time::Instant;

use fleet_coordinator::artifacts::{build, embedded_train, export_info};
use fleet_models::ModelSpec;
use fleet_models::export::{self, QuantConfig};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(runs: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    (median(ms), min)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--runs takes a number"))
        .unwrap_or(20);
    let t = Instant::now();
    let data = embedded_train().expect("embedded data");
    println!(
        "decoding the embedded training set (once per process): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    println!();
    println!("| model | work | median (ms) | min (ms) | bytes |");
    println!("| --- | --- | --- | --- | --- |");
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let params = spec.init_params(1);
        let info = export_info(&spec, 1);
        let cfg = QuantConfig::default();
        let built = build(&spec, &params, 1);
        let float_bytes = built.float.as_ref().expect("float").onnx.len();
        let int8_bytes = built.int8.as_ref().expect("int8").onnx.len();
        let (m, lo) = time(runs, || {
            export::export_float(&spec, &params, &info).expect("float");
        });
        println!(
            "| {} | float export alone | {m:.2} | {lo:.2} | {float_bytes} |",
            spec.name()
        );
        let (m, lo) = time(runs, || {
            export::quantize(&spec, &params, &info, data.view(), &cfg).expect("int8");
        });
        println!(
            "| {} | int8 quantization alone | {m:.2} | {lo:.2} | {int8_bytes} |",
            spec.name()
        );
        let (m, lo) = time(runs, || {
            let b = build(&spec, &params, 1);
            assert!(b.float.is_ok() && b.int8.is_ok());
        });
        println!(
            "| {} | **both (`artifacts::build`)** | **{m:.2}** | {lo:.2} | {} |",
            spec.name(),
            float_bytes + int8_bytes
        );
    }
    println!();
    println!("{runs} runs each, one thread.");
}
