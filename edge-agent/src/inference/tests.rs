//! Tests of loading, predicting, hot-swap and the endpoint, on real
//! Fashion-MNIST images (the embedded subset) and briefly trained models.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use burn::tensor::{Tensor, TensorData};
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::export::{self, Artifact, ExportError, ExportInfo, QuantConfig};
use fleet_models::net::Network;
use fleet_models::{Backend, Dataset, ModelSpec, TrainConfig, train_local};

use super::endpoint::{self, Request};
use super::*;

fn train_set() -> &'static Dataset {
    static D: OnceLock<Dataset> = OnceLock::new();
    D.get_or_init(|| embedded::load(Split::Train).unwrap())
}

fn test_set() -> &'static Dataset {
    static D: OnceLock<Dataset> = OnceLock::new();
    D.get_or_init(|| embedded::load(Split::Test).unwrap())
}

/// Parameters trained for one epoch on (part of) the embedded training set.
fn trained(spec: &ModelSpec) -> Vec<f32> {
    static MLP: OnceLock<Vec<f32>> = OnceLock::new();
    static CNN: OnceLock<Vec<f32>> = OnceLock::new();
    let (cell, examples) = match spec {
        ModelSpec::Cnn { .. } => (&CNN, 1500),
        _ => (&MLP, 5000),
    };
    cell.get_or_init(|| {
        let idx: Vec<usize> = (0..examples).collect();
        let data = train_set().subset(&idx).unwrap();
        let cfg = TrainConfig {
            learning_rate: 0.05,
            momentum: 0.9,
            ..TrainConfig::default()
        };
        train_local(spec, &spec.init_params(7), data, &cfg, Backend::DEFAULT)
            .unwrap()
            .params
    })
    .clone()
}

fn float_artifact(spec: &ModelSpec, version: u64) -> Artifact {
    export::export_float(spec, &trained(spec), &ExportInfo::fashion_mnist(version)).unwrap()
}

fn int8_artifact(spec: &ModelSpec, version: u64) -> Artifact {
    export::quantize(
        spec,
        &trained(spec),
        &ExportInfo::fashion_mnist(version),
        train_set().view(),
        &QuantConfig::default(),
    )
    .unwrap()
}

fn images(n: usize) -> &'static [f32] {
    &test_set().features()[..n * 784]
}

fn burn_logits(spec: &ModelSpec, params: &[f32], x: &[f32]) -> Vec<f32> {
    let device = Backend::DEFAULT.device();
    let net = Network::from_flat(spec, params, &device).unwrap();
    let n = x.len() / spec.inputs();
    let input: Tensor<2> =
        Tensor::from_data(TensorData::new(x.to_vec(), [n, spec.inputs()]), &device);
    net.forward(input)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

/// Whether the CPU has AMX-INT8 and the kernel supports it (Linux lists
/// `amx_int8` in `/proc/cpuinfo` only then).
fn cpu_offers_amx_int8() -> bool {
    cfg!(all(target_arch = "x86_64", target_os = "linux"))
        && std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "amx_int8"))
            })
            .unwrap_or(false)
}

fn accuracy(classes: &[usize], labels: &[u8]) -> f64 {
    let hits = classes
        .iter()
        .zip(labels)
        .filter(|(c, l)| **c == usize::from(**l))
        .count();
    hits as f64 / classes.len() as f64
}

#[test]
fn tract_float_reproduces_burn_on_real_images() {
    for spec in [
        ModelSpec::fashion_logreg(),
        ModelSpec::fashion_2nn(),
        ModelSpec::fashion_cnn(),
    ] {
        let params = if matches!(spec, ModelSpec::LogReg { .. }) {
            spec.init_params(3)
        } else {
            trained(&spec)
        };
        let artifact = export::export_float(&spec, &params, &ExportInfo::fashion_mnist(1)).unwrap();
        let model = Model::load(artifact.onnx, None).unwrap();
        for n in [1, 200] {
            let x = images(n);
            let ours = model.predict(x).unwrap();
            let reference = burn_logits(&spec, &params, x);
            assert_eq!(ours.len(), n);
            let worst = ours
                .logits
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{} batch {n}: max |Δ| {worst}", spec.name());
        }
    }
}

#[test]
fn int8_keeps_the_float_accuracy_and_runs_integer_kernels() {
    let test = test_set();
    let x = test.features();
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let float = Model::load(float_artifact(&spec, 1).onnx, None).unwrap();
        let int8 = Model::load(int8_artifact(&spec, 1).onnx, None).unwrap();
        let f = float.predict(x).unwrap().classes();
        let q = int8.predict(x).unwrap().classes();
        let (fa, qa) = (accuracy(&f, test.labels()), accuracy(&q, test.labels()));
        let agree = f.iter().zip(&q).filter(|(a, b)| a == b).count() as f64 / f.len() as f64;
        assert!(
            fa > 0.6,
            "{}: float model barely trained ({fa})",
            spec.name()
        );
        assert!(
            (fa - qa).abs() <= 0.01,
            "{}: float {fa:.4} vs int8 {qa:.4}",
            spec.name()
        );
        assert!(
            agree >= 0.97,
            "{}: argmax agreement {agree:.4}",
            spec.name()
        );
        // The optimised plan multiplies 8-bit integers into 32-bit
        // accumulators: every matrix product packs int8 operands, one per
        // layer with weights.
        let ops = int8.plan_ops();
        let products: Vec<&String> = ops.iter().filter(|o| o.starts_with("OptMatMul:")).collect();
        assert!(
            products.len() >= spec.layers().len(),
            "{}:\n{}",
            spec.name(),
            ops.join("\n")
        );
        for p in products {
            assert!(
                p.contains("PackedI8") && p.contains("I32"),
                "{}: {p}",
                spec.name()
            );
        }
        // The kernels are integer ones, and they are the ones this CPU
        // class was tested with: tract picks its AMX int8 kernels wherever
        // the CPU and the OS offer AMX (patched in `patches/tract-linalg`,
        // exercised by the concurrency and guard-page tests), and never
        // elsewhere.
        let kernels = int8.kernels();
        assert!(!kernels.is_empty(), "{}: no kernel named", spec.name());
        for k in &kernels {
            assert!(k.contains("_mmm_i32_"), "{}: {k}", spec.name());
        }
        let amx = kernels.iter().any(|k| k.starts_with("avx512amx_"));
        assert_eq!(
            amx,
            cpu_offers_amx_int8(),
            "{}: kernels {kernels:?}",
            spec.name()
        );
        // Zero-point corrections depend only on constants and are folded
        // at load time, not recomputed per run.
        assert!(
            !ops.iter().any(|o| o.starts_with("Reduce")),
            "{}:\n{}",
            spec.name(),
            ops.join("\n")
        );
    }
}

#[test]
fn bad_artifacts_are_typed_errors() {
    let spec = ModelSpec::fashion_2nn();
    let a = float_artifact(&spec, 1);
    let e = Model::load(a.onnx[..a.onnx.len() / 2].to_vec(), None).unwrap_err();
    assert!(
        matches!(e, InferenceError::Artifact(ExportError::Malformed { .. })),
        "{e}"
    );
    let e = Model::load(a.onnx.clone(), Some(&"ab".repeat(32))).unwrap_err();
    assert!(
        matches!(
            e,
            InferenceError::Artifact(ExportError::HashMismatch { .. })
        ),
        "{e}"
    );
    // A flipped byte inside the weights parses; the announced hash rejects it.
    let mut corrupt = a.onnx.clone();
    let at = corrupt.len() / 2;
    corrupt[at] ^= 0xff;
    let e = Model::load(corrupt, Some(&a.sha256())).unwrap_err();
    assert!(
        matches!(
            e,
            InferenceError::Artifact(ExportError::HashMismatch { .. })
        ),
        "{e}"
    );
    let e = Model::load(b"garbage".to_vec(), None).unwrap_err();
    assert!(matches!(e, InferenceError::Artifact(_)), "{e}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model = Model::load(int8_artifact(&ModelSpec::fashion_2nn(), 1).onnx, None).unwrap();
    let e = model.predict(&images(1)[..783]).unwrap_err();
    assert!(
        matches!(
            e,
            InferenceError::Shape {
                features: 784,
                found: 783
            }
        ),
        "{e}"
    );
    assert!(matches!(
        model.predict(&[]),
        Err(InferenceError::Shape { found: 0, .. })
    ));
    let mut x = images(3).to_vec();
    x[784 + 10] = f32::NAN;
    let e = model.predict(&x).unwrap_err();
    assert!(
        matches!(
            e,
            InferenceError::NonFinite {
                example: 1,
                feature: 10,
                ..
            }
        ),
        "{e}"
    );
    x[784 + 10] = f32::INFINITY;
    assert!(matches!(
        model.predict(&x),
        Err(InferenceError::NonFinite { .. })
    ));
    // Pixels for a model without normalisation metadata.
    let spec = ModelSpec::LogReg {
        inputs: 4,
        classes: 2,
    };
    let info = ExportInfo {
        version: 1,
        labels: vec![],
        normalization: None,
    };
    let a = export::export_float(&spec, &spec.init_params(1), &info).unwrap();
    let p = Predictor::new(Model::load(a.onnx, None).unwrap());
    assert!(matches!(
        p.predict_pixels(&[1, 2, 3, 4]),
        Err(InferenceError::NoNormalization)
    ));
    assert_eq!(p.predict(&[0.5, 0.1, -0.3, 2.0]).unwrap().len(), 1);
}

#[test]
fn swap_keeps_serving_on_failure_and_rolls_back() {
    let spec = ModelSpec::fashion_2nn();
    let p = Predictor::new(Model::load(int8_artifact(&spec, 1).onnx, None).unwrap());
    let x = images(4);
    let before = p.predict(x).unwrap();
    assert_eq!(before.version, 1);
    let v2 = float_artifact(&spec, 2);
    // Truncated, corrupt and mis-hashed artifacts are refused; v1 keeps serving.
    assert!(p.swap_bytes(v2.onnx[..1000].to_vec(), None).is_err());
    assert!(
        p.swap_bytes(v2.onnx.clone(), Some(&"0".repeat(64)))
            .is_err()
    );
    assert!(p.swap_bytes(b"\x0a\x05hello".to_vec(), None).is_err());
    assert_eq!(p.versions(), (1, None));
    // The same answer (each prediction gets the next id).
    let again = p.predict(x).unwrap();
    assert_eq!(
        (&again.logits, again.version),
        (&before.logits, before.version)
    );
    assert_eq!(again.first_id, before.first_id + before.len() as u64);
    assert!(matches!(p.rollback(), Err(InferenceError::NoPrevious)));

    let s = p.swap_bytes(v2.onnx.clone(), Some(&v2.sha256())).unwrap();
    assert_eq!(s, Swap { from: 1, to: 2 });
    assert_eq!(p.versions(), (2, Some(1)));
    assert_eq!(p.predict(x).unwrap().version, 2);
    assert_eq!(p.rollback().unwrap(), Swap { from: 2, to: 1 });
    assert_eq!(p.versions(), (1, Some(2)));
    let back = p.predict(x).unwrap();
    assert_eq!(
        (&back.logits, back.version),
        (&before.logits, before.version)
    );
}

/// Int8 prediction from several threads at once, both models, every batch
/// size from 1 to 64: each answer must equal, bit for bit, the answer one
/// thread gets alone. On CPUs with AMX this runs tract's AMX int8 kernels.
/// Whether their former read past the end of a buffer faulted depended on
/// where the heap put the buffer, so it did not fault here on every run;
/// `tests/int8_guard_pages.rs` runs the same workload with a guard page
/// after every buffer, where it faults on every run
/// (`docs/tract-amx-overread.md`).
#[test]
fn int8_from_many_threads_matches_one_thread() {
    const THREADS: usize = 4;
    // Every batch size for the 2NN, six times over; every ninth for the
    // CNN, whose larger batches are slow in a debug build.
    let cases = [
        (
            ModelSpec::fashion_2nn(),
            6,
            (1..=64).collect::<Vec<usize>>(),
        ),
        (ModelSpec::fashion_cnn(), 1, (1..=64).step_by(9).collect()),
    ];
    for (spec, rounds, batches) in cases {
        // Untrained weights: agreement does not depend on accuracy.
        let artifact = export::quantize(
            &spec,
            &spec.init_params(5),
            &ExportInfo::fashion_mnist(1),
            train_set().view(),
            &QuantConfig::default(),
        )
        .unwrap();
        let model = Arc::new(Model::load(artifact.onnx, None).unwrap());
        let reference: Arc<Vec<(usize, Vec<f32>)>> = Arc::new(
            batches
                .iter()
                .map(|&n| (n, model.predict(images(n)).unwrap().logits))
                .collect(),
        );
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (model, reference) = (Arc::clone(&model), Arc::clone(&reference));
                std::thread::spawn(move || {
                    for round in 0..rounds {
                        // Each thread walks the batch sizes in its own order.
                        let k = reference.len();
                        for i in 0..k {
                            let (n, expected) = &reference[(i * (2 * t + 1) + round * 7) % k];
                            let got = model.predict(images(*n)).unwrap().logits;
                            assert!(
                                got == *expected,
                                "thread {t}, batch {n}: logits differ from one thread's"
                            );
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a prediction thread panicked");
        }
    }
}

/// Requests answered from three threads while the main thread swaps to v2
/// and rolls back to v1 ten times. Every answer comes whole from exactly one
/// model version (its logits are that version's, bit for bit: int8 v1 and
/// float v2 differ); a request that ran entirely between two swaps is
/// answered by the version current then; every request gets its own ids,
/// none skipped; and requests were answered by both versions around every
/// swap (the main thread waits for that before the next one).
#[test]
fn swaps_under_load_drop_no_request() {
    use std::sync::atomic::AtomicU64;
    const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
    let spec = ModelSpec::fashion_2nn();
    let v1 = Model::load(int8_artifact(&spec, 1).onnx, None).unwrap();
    let v2 = float_artifact(&spec, 2);
    let x = images(2);
    let want = [
        Vec::new(),
        v1.predict(x).unwrap().logits,
        Model::load(v2.onnx.clone(), None)
            .unwrap()
            .predict(x)
            .unwrap()
            .logits,
    ];
    assert_ne!(want[1], want[2], "the two versions must be told apart");
    let want = Arc::new(want);
    let p = Arc::new(Predictor::new(v1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Even: stable, serving v1 when phase/2 is even, v2 when odd; odd: a
    // swap or rollback in progress.
    let phase = Arc::new(AtomicU64::new(0));
    let answered = Arc::new([
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    ]);
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (p, stop, phase, answered, want) = (
                Arc::clone(&p),
                Arc::clone(&stop),
                Arc::clone(&phase),
                Arc::clone(&answered),
                Arc::clone(&want),
            );
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let before = phase.load(Ordering::SeqCst);
                    let r = p.predict(x).expect("every request is answered");
                    let after = phase.load(Ordering::SeqCst);
                    let v = r.version as usize;
                    assert!(v == 1 || v == 2, "version {v}");
                    assert!(
                        r.logits == want[v],
                        "an answer labelled version {v} is not that model's"
                    );
                    if before == after && before % 2 == 0 {
                        let current = if (before / 2) % 2 == 0 { 1 } else { 2 };
                        assert_eq!(v, current, "answered by a model no longer current");
                    }
                    ids.push((r.first_id, r.len() as u64));
                    answered[v].fetch_add(1, Ordering::SeqCst);
                }
                ids
            })
        })
        .collect();
    // Waits until `version` has answered more than `seen` requests.
    let served = |version: usize, seen: usize| {
        let t = std::time::Instant::now();
        while answered[version].load(Ordering::SeqCst) <= seen {
            assert!(
                t.elapsed() < DEADLINE,
                "no request answered by version {version} within {DEADLINE:?}"
            );
            std::thread::yield_now();
        }
    };
    served(1, 0);
    for _ in 0..10 {
        let seen = answered[2].load(Ordering::SeqCst);
        phase.fetch_add(1, Ordering::SeqCst);
        p.swap_bytes(v2.onnx.clone(), Some(&v2.sha256())).unwrap();
        phase.fetch_add(1, Ordering::SeqCst);
        served(2, seen);
        let seen = answered[1].load(Ordering::SeqCst);
        phase.fetch_add(1, Ordering::SeqCst);
        p.rollback().unwrap();
        phase.fetch_add(1, Ordering::SeqCst);
        served(1, seen);
    }
    stop.store(true, Ordering::SeqCst);
    let mut ids: Vec<(u64, u64)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("a worker's check failed"))
        .collect();
    // Ids: each request its own range, in a run with no gap from the first.
    ids.sort_unstable();
    for w in ids.windows(2) {
        assert_eq!(w[0].0 + w[0].1, w[1].0, "ids skipped or reused: {w:?}");
    }
    assert_eq!(
        ids.len(),
        answered
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .sum::<usize>()
    );
    assert_eq!(p.versions().0, 1);
}

#[test]
fn observer_sees_every_successful_prediction() {
    let examples = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&examples);
    let model = Model::load(int8_artifact(&ModelSpec::fashion_2nn(), 1).onnx, None).unwrap();
    let p = Predictor::with_observer(
        model,
        FnObserver(move |o: &Observation<'_>| {
            assert_eq!(o.inputs.len() / o.features, o.logits.len() / o.classes);
            counter.fetch_add(o.logits.len() / o.classes, Ordering::Relaxed);
        }),
    );
    p.predict(images(5)).unwrap();
    p.predict_pixels(&[0u8; 784 * 2]).unwrap();
    assert!(p.predict(&images(1)[..10]).is_err());
    assert_eq!(examples.load(Ordering::Relaxed), 7);
}

#[test]
fn endpoint_answers_the_documented_schema() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let spec = ModelSpec::fashion_2nn();
        let model = Model::load(int8_artifact(&spec, 4).onnx, None).unwrap();
        let direct = model.predict(images(2)).unwrap();
        let p = Arc::new(Predictor::new(model));
        let path = std::env::temp_dir().join(format!("fleet-infer-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(endpoint::serve(listener, Arc::clone(&p), async {
            let _ = stop_rx.await;
        }));
        let mut c = tokio::net::UnixStream::connect(&path).await.unwrap();

        let rows: Vec<Vec<f32>> = images(2).chunks(784).map(<[f32]>::to_vec).collect();
        let r = endpoint::call(&mut c, &Request::Predict { inputs: rows })
            .await
            .unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.version, Some(4));
        let preds = r.predictions.unwrap();
        assert_eq!(preds.len(), 2);
        assert_eq!(preds[0].logits, direct.row(0));
        assert_eq!(preds[1].class, direct.classes()[1]);
        assert_eq!(
            preds[1].label,
            fleet_models::data::fashion::LABEL_NAMES[preds[1].class]
        );

        let r = endpoint::call(
            &mut c,
            &Request::PredictPixels {
                pixels: vec![vec![0; 784]],
            },
        )
        .await
        .unwrap();
        assert!(r.ok && r.predictions.unwrap().len() == 1);

        let r = endpoint::call(&mut c, &Request::Info).await.unwrap();
        let info = r.info.unwrap();
        assert_eq!(
            (info.model.as_str(), info.variant.as_str(), info.features),
            ("2nn", "int8", 784)
        );

        // Wrong shape: a typed error, the connection stays usable.
        let r = endpoint::call(
            &mut c,
            &Request::Predict {
                inputs: vec![vec![0.0; 784], vec![0.0; 10]],
            },
        )
        .await
        .unwrap();
        assert!(!r.ok);
        assert_eq!(r.error.unwrap().kind, "shape");
        let r = endpoint::call(&mut c, &Request::Predict { inputs: vec![] })
            .await
            .unwrap();
        assert_eq!(r.error.unwrap().kind, "shape");

        // Not JSON of the schema.
        endpoint::write_frame(&mut c, b"{\"op\":\"fly\"}")
            .await
            .unwrap();
        let back: endpoint::Response =
            serde_json::from_slice(&endpoint::read_frame(&mut c).await.unwrap().unwrap()).unwrap();
        assert_eq!(back.error.unwrap().kind, "bad_request");
        let r = endpoint::call(&mut c, &Request::Info).await.unwrap();
        assert!(r.ok);

        // An oversized frame is refused and the connection closed.
        use tokio::io::AsyncWriteExt;
        c.write_all(&(endpoint::MAX_FRAME as u32 + 1).to_le_bytes())
            .await
            .unwrap();
        let back: endpoint::Response =
            serde_json::from_slice(&endpoint::read_frame(&mut c).await.unwrap().unwrap()).unwrap();
        assert_eq!(back.error.unwrap().kind, "too_large");
        assert!(endpoint::read_frame(&mut c).await.unwrap().is_none());

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    });
}

/// The Python interpreter with onnxruntime: `FLEET_PYTHON`, else `python3`.
/// A relative path is taken from the workspace root (tests run in the
/// crate's directory).
fn reference_python() -> String {
    match std::env::var("FLEET_PYTHON") {
        Ok(p) if p.contains('/') && std::path::Path::new(&p).is_relative() => {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(p)
                .to_string_lossy()
                .into_owned()
        }
        Ok(p) => p,
        Err(_) => "python3".into(),
    }
}

fn write_f32(path: &std::path::Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// The reference check cannot run: a failure naming what to install,
/// unless `FLEET_SKIP_ONNXRUNTIME=1` explicitly allows skipping it (CI never
/// sets it; see the README's test section).
fn missing_onnxruntime(why: &str) {
    if std::env::var("FLEET_SKIP_ONNXRUNTIME").as_deref() == Ok("1") {
        println!("SKIPPED onnxruntime reference check (FLEET_SKIP_ONNXRUNTIME=1): {why}");
        return;
    }
    panic!(
        "the onnxruntime reference check cannot run: {why}; or set FLEET_SKIP_ONNXRUNTIME=1 \
         to skip this one check"
    );
}

#[test]
fn onnxruntime_gives_the_same_outputs_as_tract() {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/onnx_reference.py");
    let dir = std::env::temp_dir().join(format!("fleet-ort-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let test = test_set();
    let x = test.features();
    write_f32(&dir.join("test.in.f32"), x);
    let mut cases = Vec::new();
    let mut tract_logits = Vec::new();
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        for artifact in [float_artifact(&spec, 1), int8_artifact(&spec, 1)] {
            let name = artifact.file_name();
            std::fs::write(dir.join(&name), &artifact.onnx).unwrap();
            let model = Model::load(artifact.onnx.clone(), Some(&artifact.sha256())).unwrap();
            tract_logits.push((
                name.clone(),
                artifact.meta.variant,
                model.predict(x).unwrap(),
            ));
            cases.push(serde_json::json!({
                "model": name,
                "input": "test.in.f32",
                "output": format!("{name}.ort.f32"),
                "features": 784,
            }));
        }
    }
    let cases_path = dir.join("cases.json");
    std::fs::write(&cases_path, serde_json::to_vec(&cases).unwrap()).unwrap();
    let python = reference_python();
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg("run")
        .arg("--cases")
        .arg(&cases_path)
        .output();
    let out = match out {
        Err(e) => {
            return missing_onnxruntime(&format!(
                "cannot run `{python}` ({e}); set FLEET_PYTHON to a python with \
                 `pip install onnxruntime numpy`"
            ));
        }
        Ok(o) if o.status.code() == Some(3) => {
            return missing_onnxruntime(&format!(
                "{} (interpreter `{python}`; set FLEET_PYTHON to a python with \
                 `pip install onnxruntime numpy`)",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(o) => o,
    };
    assert!(
        out.status.success(),
        "reference script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    for (name, variant, ours) in tract_logits {
        let bytes = std::fs::read(dir.join(format!("{name}.ort.f32"))).unwrap();
        let theirs: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(theirs.len(), ours.logits.len(), "{name}");
        let worst = ours
            .logits
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let theirs_classes: Vec<usize> = theirs
            .chunks_exact(10)
            .map(fleet_models::train::argmax)
            .collect();
        let agree = ours
            .classes()
            .iter()
            .zip(&theirs_classes)
            .filter(|(a, b)| a == b)
            .count() as f64
            / theirs_classes.len() as f64;
        println!("{name}: max |tract - onnxruntime| {worst:.2e}, argmax agreement {agree:.4}");
        match variant {
            export::Variant::Float => assert!(worst <= 1e-4, "{name}: {worst}"),
            export::Variant::Int8 => assert!(agree >= 0.995, "{name}: {agree}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn files_are_read_as_idx_images_raw_pixels_or_floats() {
    let model = Model::load(int8_artifact(&ModelSpec::fashion_2nn(), 1).onnx, None).unwrap();
    let idx = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/data/fashion-mnist-subset/test-images-idx3-ubyte.gz");
    let input = input::read_input(&model, &idx, 5).unwrap();
    assert_eq!((input.examples, input.kind), (5, "IDX images"));
    // Same normalisation as the data set loader.
    assert_eq!(input.values, images(5));
    let lines = input::describe(&model, &model.predict(&input.values).unwrap());
    assert_eq!(lines.len(), 5);
    assert!(
        lines[0].starts_with("0: ") && lines[0].contains("p = "),
        "{}",
        lines[0]
    );

    let dir = std::env::temp_dir().join(format!("fleet-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pixels = dir.join("one.raw");
    std::fs::write(&pixels, [7u8; 784]).unwrap();
    let one = input::read_input(&model, &pixels, 10).unwrap();
    assert_eq!((one.examples, one.kind), (1, "raw pixels"));
    let floats = dir.join("two.f32");
    write_f32(&floats, images(2));
    let two = input::read_input(&model, &floats, 10).unwrap();
    assert_eq!(
        (two.examples, two.kind, two.values.as_slice()),
        (2, "raw float32", images(2))
    );

    let odd = dir.join("odd.bin");
    std::fs::write(&odd, [0u8; 785]).unwrap();
    let e = input::read_input(&model, &odd, 10).unwrap_err();
    assert!(
        matches!(e, InferenceError::Input { .. }) && e.to_string().contains("785 bytes"),
        "{e}"
    );
    let mut nan = images(1).to_vec();
    nan[3] = f32::NAN;
    write_f32(&floats, &nan);
    assert!(matches!(
        input::read_input(&model, &floats, 10),
        Err(InferenceError::NonFinite { .. })
    ));
    let labels = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/data/fashion-mnist-subset/test-labels-idx1-ubyte.gz");
    let e = input::read_input(&model, &labels, 10).unwrap_err();
    assert!(e.to_string().contains("does not hold examples"), "{e}");
    assert!(matches!(
        input::read_input(&model, &dir.join("missing"), 1),
        Err(InferenceError::Input { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn late_labels_reach_the_drift_summary_through_the_endpoint() {
    use crate::drift::DriftObserver;
    use fleet_drift::SketchSpec;
    use fleet_drift::sketch::FitConfig;
    let spec = ModelSpec::fashion_2nn();
    let model = || Model::load(float_artifact(&spec, 1).onnx, None).unwrap();
    let train = train_set();
    let sketch = SketchSpec::fit(
        train.dim(),
        train.classes(),
        (0..200).map(|i| train.example(i)),
        FitConfig::default(),
    )
    .unwrap();
    let observer = Arc::new(DriftObserver::new());
    observer.set_spec(1, sketch).unwrap();
    let p = Predictor::with_observer(model(), observer.clone());
    let x = images(3);
    let rows: Vec<Vec<f32>> = x.chunks(784).map(<[f32]>::to_vec).collect();
    let r = endpoint::handle(&p, Request::Predict { inputs: rows });
    let predictions = r.predictions.unwrap();
    let ids: Vec<u64> = predictions.iter().map(|q| q.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    // The first prediction's own class as its label: correct; another class: wrong.
    let right = predictions[0].class;
    let wrong = (predictions[1].class + 1) % 10;
    for (id, label) in [(1, right), (2, wrong)] {
        let r = endpoint::handle(&p, Request::Label { id, label });
        assert!(r.ok, "{r:?}");
    }
    let r = endpoint::handle(&p, Request::Label { id: 99, label: 0 });
    assert_eq!(r.error.unwrap().kind, "label");
    let (_, summary) = observer.take().unwrap();
    assert_eq!(
        (summary.predictions(), summary.labeled, summary.correct),
        (3.0, 2.0, 1.0)
    );
    // A predictor without a drift observer refuses labels, saying why.
    let plain = Predictor::new(model());
    let r = endpoint::handle(&plain, Request::Label { id: 1, label: 0 });
    assert!(r.error.unwrap().message.contains("does not record labels"));
}
