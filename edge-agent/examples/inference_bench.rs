//! On-device inference benchmark: tract float vs tract int8 vs onnxruntime.
//!
//! Trains the 2NN and the CNN for one epoch (SGD, lr 0.05, batch 32, no
//! momentum, as the centralised example) on the full Fashion-MNIST
//! training set (or reuses the parameters saved by an earlier run in
//! `--work DIR`), exports the float and int8 artifacts, then prints:
//!
//! 1. artifact sizes;
//! 2. accuracy of tract float and tract int8 on the 10,000 test images, and
//!    the agreement of onnxruntime with tract on the same files;
//! 3. latency (p50, p99 per call) and throughput at batch 1 and 64, one
//!    thread, for tract float, tract int8 and onnxruntime on the same files;
//! 4. the operators of tract's optimised int8 plans (which kernels run).
//!
//! ```sh
//! FLEET_PYTHON=bench/.venv/bin/python \
//!   cargo run --release -p fleet-edge-agent --example inference_bench -- [--work DIR] [--seconds 2]
//! ```
//!
//! Without a python that has onnxruntime, the onnxruntime columns are left out.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fleet_edge_agent::inference::Model;
use fleet_models::data::fashion::{self, Split};
use fleet_models::export::{self, Artifact, ExportInfo, QuantConfig, Variant};
use fleet_models::{Backend, Dataset, ModelSpec, TrainConfig, train_local};
use indicatif::{ProgressBar, ProgressStyle};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn write_f32(path: &Path, values: &[f32]) -> Res<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes)?;
    Ok(())
}

fn read_f32(path: &Path) -> Res<Vec<f32>> {
    Ok(std::fs::read(path)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Trained parameters, cached in `work`.
fn trained(spec: &ModelSpec, train: &Dataset, work: &Path) -> Res<Vec<f32>> {
    let path = work.join(format!("{}-params.f32", spec.name()));
    if let Ok(p) = read_f32(&path)
        && spec.layout().check(&p).is_ok()
    {
        println!(
            "reusing trained {} parameters from {}",
            spec.name(),
            path.display()
        );
        return Ok(p);
    }
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template(
        "{spinner} training {msg} for 1 epoch on 60,000 images [{elapsed_precise}]",
    )?);
    bar.set_message(spec.name());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        learning_rate: 0.05,
        momentum: 0.0,
        seed: 1,
        ..TrainConfig::default()
    };
    let out = train_local(
        spec,
        &spec.init_params(1),
        train.view(),
        &cfg,
        Backend::DEFAULT,
    )?;
    bar.finish_and_clear();
    write_f32(&path, &out.params)?;
    Ok(out.params)
}

struct Timing {
    p50_ms: f64,
    p99_ms: f64,
    per_s: f64,
}

fn time_tract(model: &Model, x: &[f32], seconds: f64) -> Res<Timing> {
    for _ in 0..20 {
        model.predict(x)?;
    }
    let batch = x.len() / model.features();
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds || times.len() < 50 {
        let t = Instant::now();
        model.predict(x)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let total: f64 = times.iter().sum();
    Ok(Timing {
        p50_ms: times[times.len() / 2] * 1e3,
        p99_ms: times[(times.len() * 99 / 100).min(times.len() - 1)] * 1e3,
        per_s: (batch * times.len()) as f64 / total,
    })
}

fn python() -> String {
    std::env::var("FLEET_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/onnx_reference.py")
}

/// onnxruntime timings of one file, or `None` when it is not installed.
fn time_ort(model: &Path, input: &Path, seconds: f64) -> Res<Option<(String, Vec<Timing>)>> {
    let out = Command::new(python())
        .arg(script())
        .args([
            "bench",
            "--json",
            "--features",
            "784",
            "--batch",
            "1",
            "64",
            "--seconds",
        ])
        .arg(seconds.to_string())
        .arg("--model")
        .arg(model)
        .arg("--input")
        .arg(input)
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) if o.status.code() == Some(3) => return Ok(None),
        Ok(o) => {
            return Err(format!(
                "onnxruntime bench failed: {}",
                String::from_utf8_lossy(&o.stderr)
            )
            .into());
        }
        Err(_) => return Ok(None),
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rows = v["rows"]
        .as_array()
        .ok_or("bad onnxruntime output")?
        .iter()
        .map(|r| Timing {
            p50_ms: r["p50_ms"].as_f64().unwrap_or(f64::NAN),
            p99_ms: r["p99_ms"].as_f64().unwrap_or(f64::NAN),
            per_s: r["examples_per_s"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    Ok(Some((
        v["onnxruntime"].as_str().unwrap_or("?").to_string(),
        rows,
    )))
}

/// onnxruntime logits for the whole test set, or `None` when not installed.
fn ort_logits(dir: &Path, file: &str) -> Res<Option<Vec<f32>>> {
    let cases = serde_json::json!([{
        "model": file, "input": "test.in.f32", "output": format!("{file}.ort.f32"), "features": 784
    }]);
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&cases)?)?;
    let out = Command::new(python())
        .arg(script())
        .arg("run")
        .arg("--cases")
        .arg(&cases_path)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(Some(read_f32(&dir.join(format!("{file}.ort.f32")))?)),
        Ok(o) if o.status.code() == Some(3) => Ok(None),
        Ok(o) => Err(format!(
            "onnxruntime run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        )
        .into()),
        Err(_) => Ok(None),
    }
}

fn accuracy(logits: &[f32], labels: &[u8]) -> f64 {
    let hits = logits
        .chunks_exact(10)
        .zip(labels)
        .filter(|(row, l)| fleet_models::train::argmax(row) == usize::from(**l))
        .count();
    hits as f64 / labels.len() as f64
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let work =
        PathBuf::from(arg(&args, "--work").unwrap_or_else(|| "target/inference-bench".into()));
    let seconds: f64 = arg(&args, "--seconds")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(2.0);
    std::fs::create_dir_all(&work)?;
    let dir = fashion::default_dir();
    let train = fashion::load(&dir, Split::Train)?;
    let test = fashion::load(&dir, Split::Test)?;
    write_f32(&work.join("test.in.f32"), test.features())?;
    write_f32(&work.join("batch64.in.f32"), &test.features()[..64 * 784])?;

    let mut sizes = Vec::new();
    let mut acc_rows = Vec::new();
    let mut speed_rows = Vec::new();
    let mut plans = Vec::new();
    let mut profiles = Vec::new();
    let mut ort_version = None;
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let params = trained(&spec, &train, &work)?;
        let info = ExportInfo::fashion_mnist(1);
        let t = Instant::now();
        let float = export::export_float(&spec, &params, &info)?;
        let quant = export::quantize(&spec, &params, &info, train.view(), &QuantConfig::default())?;
        let export_s = t.elapsed().as_secs_f64();
        sizes.push((spec.name(), float.onnx.len(), quant.onnx.len(), export_s));
        let mut float_acc = 0.0;
        for artifact in [&float, &quant] {
            let file = artifact.file_name();
            artifact.write(&work.join(&file))?;
            let loaded = Artifact::read(&work.join(&file))?;
            let model = Model::from_artifact(loaded)?;
            let logits = model.predict(test.features())?.logits;
            let acc = accuracy(&logits, test.labels());
            if artifact.meta.variant == Variant::Float {
                float_acc = acc;
            }
            let ort = ort_logits(&work, &file)?;
            let (diff, agree) = match &ort {
                Some(o) => {
                    let diff = logits
                        .iter()
                        .zip(o)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    let agree = logits
                        .chunks_exact(10)
                        .zip(o.chunks_exact(10))
                        .filter(|(a, b)| {
                            fleet_models::train::argmax(a) == fleet_models::train::argmax(b)
                        })
                        .count() as f64
                        / test.len() as f64;
                    (format!("{diff:.2e}"), format!("{:.2}%", 100.0 * agree))
                }
                None => ("n/a".into(), "n/a".into()),
            };
            acc_rows.push(format!(
                "| {} | {} | {:.2}% | {:+.2} | {} | {} |",
                spec.name(),
                artifact.meta.variant,
                100.0 * acc,
                100.0 * (acc - float_acc),
                diff,
                agree
            ));
            let x64 = &test.features()[..64 * 784];
            let mut timings = Vec::new();
            for batch in [1usize, 64] {
                timings.push((batch, time_tract(&model, &x64[..batch * 784], seconds)?));
            }
            for (batch, t) in &timings {
                speed_rows.push(format!(
                    "| {} | {batch} | tract {} | {:.3} | {:.3} | {:.0} |",
                    spec.name(),
                    artifact.meta.variant,
                    t.p50_ms,
                    t.p99_ms,
                    t.per_s
                ));
            }
            if let Some((version, ort)) =
                time_ort(&work.join(&file), &work.join("batch64.in.f32"), seconds)?
            {
                ort_version = Some(version.clone());
                for (batch, t) in [1usize, 64].iter().zip(&ort) {
                    speed_rows.push(format!(
                        "| {} | {batch} | onnxruntime {version} {} | {:.3} | {:.3} | {:.0} |",
                        spec.name(),
                        artifact.meta.variant,
                        t.p50_ms,
                        t.p99_ms,
                        t.per_s
                    ));
                }
            }
            if artifact.meta.variant == Variant::Int8 {
                plans.push((spec.name(), model.plan_ops()));
            }
            for batch in [1usize, 64] {
                let runs = if batch == 1 { 2000 } else { 100 };
                let nodes = model.profile(&x64[..batch * 784], runs)?;
                let total: f64 = nodes.iter().map(|(_, d)| d.as_secs_f64()).sum();
                let mut by_op: Vec<(String, f64)> = Vec::new();
                for (op, d) in nodes {
                    match by_op.iter_mut().find(|(o, _)| *o == op) {
                        Some((_, t)) => *t += d.as_secs_f64(),
                        None => by_op.push((op, d.as_secs_f64())),
                    }
                }
                by_op.sort_by(|a, b| b.1.total_cmp(&a.1));
                let top: Vec<String> = by_op
                    .iter()
                    .take(6)
                    .map(|(op, t)| format!("{op} {:.0}%", 100.0 * t / total))
                    .collect();
                profiles.push(format!(
                    "| {} | {} | {batch} | {:.3} | {} |",
                    spec.name(),
                    artifact.meta.variant,
                    1e3 * total / runs as f64,
                    top.join(", ")
                ));
            }
        }
    }
    println!("\nArtifact sizes (bytes):\n");
    println!("| model | float | int8 | float/int8 | export+quantize (s) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, f, q, s) in sizes {
        println!(
            "| {name} | {f} | {q} | {:.2}× | {s:.2} |",
            f as f64 / q as f64
        );
    }
    println!(
        "\nAccuracy on the 10,000 Fashion-MNIST test images (tract), and onnxruntime on the same file:\n"
    );
    println!(
        "| model | variant | accuracy | vs float (points) | max abs(tract − ort) logit | argmax agreement with ort |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in acc_rows {
        println!("{r}");
    }
    println!(
        "\nLatency and throughput, one thread, same files{}:\n",
        ort_version
            .map(|v| format!(" (onnxruntime {v})"))
            .unwrap_or_else(|| " (onnxruntime not found)".into())
    );
    println!("| model | batch | runtime | p50 (ms) | p99 (ms) | examples/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in speed_rows {
        println!("{r}");
    }
    println!("\nWhere tract's time goes (sum of per-node times of one run, by operator):\n");
    println!("| model | variant | batch | ms per run | largest shares |");
    println!("| --- | --- | --- | --- | --- |");
    for r in profiles {
        println!("{r}");
    }
    for (name, ops) in plans {
        println!("\ntract's optimised int8 plan for {name}:");
        for op in ops {
            println!("  {op}");
        }
    }
    Ok(())
}
