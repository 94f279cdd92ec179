//! Int8 inference speed by matrix kernel, side by side in one run: the
//! kernels tract selects on this CPU, and the same plans with AMX taken out
//! of tract's instruction-set view (`TRACT_CPU_ISA=-amx-int8`, tract's own
//! knob), each in a child process of this binary (tract probes the CPU once
//! per process).
//!
//! Both models (2NN and CNN) are quantized with their initial parameters
//! (seed 1; the speed of an int8 plan does not depend on the weights'
//! values) and calibrated on the embedded training images. Each row: the
//! kernels the plan selected, then whole `Model::predict` calls at batch 1
//! and 64 on one thread (20 warm-up calls, then calls for `--seconds`).
//!
//! `--kernels-only` prints the kernels each int8 plan selects and times
//! nothing, in this process (for emulated CPUs: `dist/aarch64.sh` runs it
//! under `qemu-aarch64 -cpu max`, whose timings would mean nothing).
//!
//! ```sh
//! cargo run --release -p fleet-edge-agent --example int8_kernels -- [--seconds 2] [--kernels-only]
//! ```

use std::process::Command;
use std::time::Instant;

use fleet_edge_agent::inference::Model;
use fleet_models::ModelSpec;
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::export::{self, ExportInfo, QuantConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const CHILD: &str = "FLEET_INT8_KERNELS_CHILD";

/// `spec`'s int8 artifact (initial parameters, seed 1, calibrated on
/// `train`), loaded into tract.
fn int8_model(spec: &ModelSpec, train: &fleet_models::Dataset) -> Res<Model> {
    let artifact = export::quantize(
        spec,
        &spec.init_params(1),
        &ExportInfo::fashion_mnist(1),
        train.view(),
        &QuantConfig::default(),
    )?;
    Ok(Model::load(artifact.onnx, None)?)
}

fn measure(seconds: f64) -> Res<()> {
    let train = embedded::load(Split::Train)?;
    let test = embedded::load(Split::Test)?;
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let model = int8_model(&spec, &train)?;
        let kernels = model.kernels().join(" ");
        for batch in [1usize, 64] {
            let x = &test.features()[..batch * 784];
            for _ in 0..20 {
                model.predict(x)?;
            }
            let mut times = Vec::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < seconds || times.len() < 50 {
                let t = Instant::now();
                model.predict(x)?;
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let p50 = times[times.len() / 2] * 1e3;
            let per_s = (batch * times.len()) as f64 / times.iter().sum::<f64>();
            println!("{}\t{batch}\t{kernels}\t{p50:.4}\t{per_s:.0}", spec.name());
        }
    }
    Ok(())
}

/// The kernels of each model's int8 plan, one line per model; no timing.
fn kernels_only() -> Res<()> {
    let train = embedded::load(Split::Train)?;
    println!(
        "int8 plans on {} ({})",
        std::env::consts::ARCH,
        std::env::var("TRACT_CPU_ISA").map_or("tract's view of this CPU".into(), |v| format!(
            "TRACT_CPU_ISA={v}"
        ))
    );
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let model = int8_model(&spec, &train)?;
        println!("{}: {}", spec.name(), model.kernels().join(" "));
    }
    Ok(())
}

fn cpu_has_amx_int8() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|f| f == "amx_int8"))
        .unwrap_or(false)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds: f64 = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2.0);
    if args.iter().any(|a| a == "--kernels-only") {
        return kernels_only();
    }
    if std::env::var_os(CHILD).is_some() {
        return measure(seconds);
    }
    let model_name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "CPU: {model_name}; AMX-INT8: {}",
        if cpu_has_amx_int8() { "yes" } else { "no" }
    );
    let mut configs = vec![("tract's choice", None)];
    if cpu_has_amx_int8() {
        configs.push(("AMX taken out", Some("-amx-int8")));
    }
    println!("\n| model | batch | configuration | kernels | p50 (ms) | examples/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (label, isa) in configs {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["--seconds", &seconds.to_string()])
            .env(CHILD, "1");
        if let Some(isa) = isa {
            cmd.env("TRACT_CPU_ISA", isa);
        }
        let out = cmd.output()?;
        if !out.status.success() {
            return Err(format!(
                "the measurement of {label} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        for line in String::from_utf8(out.stdout)?.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            if let [model, batch, kernels, p50, per_s] = f[..] {
                println!("| {model} | {batch} | {label} | {kernels} | {p50} | {per_s} |");
            }
        }
    }
    Ok(())
}
