//! Export to ONNX: graph structure, metadata, artifact files and their
//! checks, quantization, and the calibration forward pass against burn.

use burn::tensor::{Tensor, TensorData};
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::export::{
    self, Artifact, Calibration, ExportError, ExportInfo, QuantConfig, Variant, proto, reference,
};
use fleet_models::net::Network;
use fleet_models::{Backend, ModelSpec};

fn test_images(n: usize) -> Vec<f32> {
    let ds = embedded::load(Split::Test).unwrap();
    ds.features()[..n * ds.dim()].to_vec()
}

fn burn_logits(spec: &ModelSpec, params: &[f32], x: &[f32], n: usize) -> Vec<f32> {
    let device = Backend::DEFAULT.device();
    let net = Network::from_flat(spec, params, &device).unwrap();
    let input: Tensor<2> =
        Tensor::from_data(TensorData::new(x.to_vec(), [n, spec.inputs()]), &device);
    net.forward(input)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

#[test]
fn calibration_forward_pass_matches_burn_on_real_images() {
    let n = 64;
    let x = test_images(n);
    for spec in [
        ModelSpec::fashion_logreg(),
        ModelSpec::fashion_2nn(),
        ModelSpec::fashion_cnn(),
    ] {
        let params = spec.init_params(5);
        let ours = reference::forward(&spec, &params, &x, n);
        let theirs = burn_logits(&spec, &params, &x, n);
        assert_eq!(ours.logits.len(), theirs.len());
        let worst = ours
            .logits
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "{}: max |difference| {worst}", spec.name());
        assert_eq!(ours.layer_inputs.len(), spec.layers().len());
        // Every layer input after the first follows a ReLU.
        for li in &ours.layer_inputs[1..] {
            assert!(li.iter().all(|&v| v >= 0.0));
        }
    }
}

#[test]
fn float_export_has_the_expected_graph_and_metadata() {
    let spec = ModelSpec::fashion_cnn();
    let params = spec.init_params(1);
    let a = export::export_float(&spec, &params, &ExportInfo::fashion_mnist(12)).unwrap();
    let d = proto::decode(&a.onnx).unwrap();
    assert_eq!(
        d.ops,
        [
            "Reshape", "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm",
            "Relu", "Gemm"
        ]
    );
    assert_eq!(d.opset, proto::OPSET);
    assert_eq!(d.model_version, 12);
    assert_eq!(d.inputs, ["input"]);
    assert_eq!(d.outputs, ["logits"]);
    // All parameters are stored, as float32.
    let float_bytes: usize = d
        .initializers
        .iter()
        .filter(|t| t.data_type == "float")
        .map(|t| t.bytes)
        .sum();
    assert_eq!(float_bytes, 4 * spec.layout().total);
    let meta = export::read_meta(&d).unwrap();
    assert_eq!(meta, a.meta);
    assert_eq!(meta.variant, Variant::Float);
    assert_eq!(meta.version, 12);
    assert_eq!(meta.input_shape, [-1, 784]);
    assert_eq!(meta.labels[9], "Ankle boot");
    assert_eq!(meta.fingerprint.len(), 64);
    assert!(meta.normalization.is_some());

    let mlp = ModelSpec::fashion_2nn();
    let a = export::export_float(&mlp, &mlp.init_params(1), &ExportInfo::fashion_mnist(1)).unwrap();
    assert_eq!(
        proto::decode(&a.onnx).unwrap().ops,
        ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    );
}

fn calibration() -> fleet_models::Dataset {
    embedded::load(Split::Train).unwrap()
}

#[test]
fn int8_export_uses_integer_operators_and_is_four_times_smaller() {
    let train = calibration();
    for spec in [ModelSpec::fashion_2nn(), ModelSpec::fashion_cnn()] {
        let params = spec.init_params(2);
        let info = ExportInfo::fashion_mnist(3);
        let float = export::export_float(&spec, &params, &info).unwrap();
        let cfg = QuantConfig {
            max_examples: 64,
            ..QuantConfig::default()
        };
        let q = export::quantize(&spec, &params, &info, train.view(), &cfg).unwrap();
        let d = proto::decode(&q.onnx).unwrap();
        assert!(
            d.ops
                .iter()
                .all(|op| !["Gemm", "Conv", "MatMul"].contains(&op.as_str())),
            "{:?}",
            d.ops
        );
        let dense_layers = spec
            .layers()
            .iter()
            .filter(|l| matches!(l, fleet_models::spec::LayerSpec::Dense { .. }))
            .count();
        // One product per dense layer, or per column block of a wide one.
        let products: usize = spec
            .layers()
            .iter()
            .map(|l| match *l {
                fleet_models::spec::LayerSpec::Dense { inputs, outputs } => {
                    (inputs * outputs).div_ceil(export::graph::MAX_BLOCK_WEIGHTS)
                }
                _ => 0,
            })
            .sum();
        assert!(products >= dense_layers);
        assert_eq!(
            d.ops.iter().filter(|o| *o == "MatMulInteger").count(),
            products
        );
        if matches!(spec, ModelSpec::Cnn { .. }) {
            assert_eq!(d.ops.iter().filter(|o| *o == "QLinearConv").count(), 2);
        }
        assert!(
            !d.ops.iter().any(|o| o == "Relu"),
            "ReLU is done by saturation: {:?}",
            d.ops
        );
        let int8_bytes: usize = d
            .initializers
            .iter()
            .filter(|t| t.data_type == "int8")
            .map(|t| t.bytes)
            .sum();
        let weights: usize = spec
            .layout()
            .entries
            .iter()
            .filter(|e| e.name.ends_with("weight"))
            .map(|e| e.len)
            .sum();
        let convs = spec.layers().len() - dense_layers;
        // One byte per weight, plus each convolution's scalar weight zero point.
        assert_eq!(int8_bytes, weights + convs);
        let ratio = float.onnx.len() as f64 / q.onnx.len() as f64;
        assert!(ratio >= 3.5, "{}: float/int8 size {ratio:.2}", spec.name());
        let meta = q.meta.quantization.as_ref().unwrap();
        assert_eq!(meta.examples, 64);
        assert_eq!(meta.activations.len(), spec.layers().len());
        // Inputs of layers after the first follow a ReLU: zero point 0.
        assert!(meta.activations[1..].iter().all(|a| a.zero_point == 0));
        assert!(
            meta.activations[0].zero_point > 0,
            "normalised pixels are signed"
        );
    }
}

#[test]
fn calibration_errors_name_the_problem() {
    let spec = ModelSpec::fashion_2nn();
    let params = spec.init_params(2);
    let info = ExportInfo::fashion_mnist(1);
    let train = calibration();
    let empty = train.select(&[]).unwrap();
    let e =
        export::quantize(&spec, &params, &info, empty.view(), &QuantConfig::default()).unwrap_err();
    assert!(matches!(e, ExportError::Calibration { .. }), "{e}");
    let bad = QuantConfig {
        calibration: Calibration::Percentile { percentile: 30.0 },
        max_examples: 10,
    };
    let e = export::quantize(&spec, &params, &info, train.view(), &bad).unwrap_err();
    assert!(e.to_string().contains("percentile"), "{e}");
    let logreg = ModelSpec::LogReg {
        inputs: 10,
        classes: 2,
    };
    let e = export::quantize(
        &logreg,
        &logreg.init_params(1),
        &ExportInfo {
            version: 1,
            labels: vec![],
            normalization: None,
        },
        train.view(),
        &QuantConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("784 features"), "{e}");
    // Parameters that do not fit the layout.
    let e = export::export_float(&spec, &params[1..], &info).unwrap_err();
    assert!(matches!(e, ExportError::Model(_)), "{e}");
    // Label count must match the classes.
    let e = export::export_float(
        &spec,
        &params,
        &ExportInfo {
            version: 1,
            labels: vec!["a".into()],
            normalization: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::Metadata { .. }), "{e}");
}

#[test]
fn artifact_files_are_checked_against_their_manifest() {
    let dir = std::env::temp_dir().join(format!("fleet-export-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = ModelSpec::fashion_logreg();
    let a =
        export::export_float(&spec, &spec.init_params(4), &ExportInfo::fashion_mnist(9)).unwrap();
    let path = dir.join(a.file_name());
    assert_eq!(a.file_name(), "logreg-v9-float.onnx");
    let manifest = a.write(&path).unwrap();
    let back = Artifact::read(&path).unwrap();
    assert_eq!(back, a);
    let m: export::Manifest = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.sha256, a.sha256());
    assert_eq!(m.bytes as usize, a.onnx.len());

    // A changed weight byte still parses as ONNX; only the hash catches it.
    let mut corrupt = a.onnx.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x55;
    assert!(proto::decode(&corrupt).is_ok());
    std::fs::write(&path, &corrupt).unwrap();
    let e = Artifact::read(&path).unwrap_err();
    assert!(matches!(e, ExportError::HashMismatch { .. }), "{e}");
    assert!(e.to_string().contains("fetch it again"), "{e}");

    // Truncation without a manifest: a decoding error, not a panic.
    std::fs::remove_file(&manifest).unwrap();
    std::fs::write(&path, &a.onnx[..a.onnx.len() / 3]).unwrap();
    let e = Artifact::read(&path).unwrap_err();
    assert!(matches!(e, ExportError::Malformed { .. }), "{e}");

    // An explicit expected hash.
    let e = Artifact::from_bytes(a.onnx.clone(), Some(&"0".repeat(64))).unwrap_err();
    assert!(matches!(e, ExportError::HashMismatch { .. }));
    Artifact::from_bytes(a.onnx.clone(), Some(&a.sha256().to_uppercase())).unwrap();

    // A valid ONNX model that fleet did not export.
    let mut foreign = proto::decode(&a.onnx).unwrap();
    foreign.metadata.clear();
    let e = export::read_meta(&foreign).unwrap_err();
    assert!(matches!(e, ExportError::NoMetadata), "{e}");

    // Metadata that contradicts itself.
    let mut meta = a.meta.clone();
    meta.fingerprint = "00".repeat(32);
    let mut decoded = proto::decode(&a.onnx).unwrap();
    decoded.metadata = vec![(
        export::META_KEY.into(),
        serde_json::to_string(&meta).unwrap(),
    )];
    let e = export::read_meta(&decoded).unwrap_err();
    assert!(e.to_string().contains("fingerprint"), "{e}");

    let e = Artifact::read(&dir.join("missing.onnx")).unwrap_err();
    assert!(matches!(e, ExportError::Io { .. }), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn inspection_reports_metadata_and_every_problem() {
    let dir = std::env::temp_dir().join(format!("fleet-inspect-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = ModelSpec::fashion_2nn();
    let q = export::quantize(
        &spec,
        &spec.init_params(1),
        &ExportInfo::fashion_mnist(5),
        calibration().view(),
        &QuantConfig {
            max_examples: 32,
            ..QuantConfig::default()
        },
    )
    .unwrap();
    let path = dir.join(q.file_name());
    q.write(&path).unwrap();
    let r = export::inspect::inspect(&path).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert!(r.manifest);
    assert_eq!(r.sha256, q.sha256());
    assert_eq!(r.meta.as_ref().unwrap().variant, Variant::Int8);
    assert!(
        r.ops.contains(&("MatMulInteger".to_string(), 3)),
        "{:?}",
        r.ops
    );
    let text = r.to_string();
    assert!(
        text.contains("status      ok") && text.contains("int8"),
        "{text}"
    );

    // Replace the file behind the manifest's back.
    let other =
        export::export_float(&spec, &spec.init_params(1), &ExportInfo::fashion_mnist(5)).unwrap();
    std::fs::write(&path, &other.onnx).unwrap();
    let r = export::inspect::inspect(&path).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains("SHA-256")),
        "{:?}",
        r.problems
    );
    assert!(
        r.problems.iter().any(|p| p.contains("metadata differs")),
        "{:?}",
        r.problems
    );
    std::fs::write(&path, b"junk").unwrap();
    assert!(export::inspect::inspect(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn both_variants_of_a_version_describe_the_same_model() {
    let spec = ModelSpec::fashion_2nn();
    let v = export::build_variants(
        &spec,
        &spec.init_params(6),
        &ExportInfo::fashion_mnist(21),
        calibration().view(),
        &QuantConfig {
            max_examples: 16,
            ..QuantConfig::default()
        },
    )
    .unwrap();
    assert_eq!(Variant::default(), Variant::Int8);
    assert_eq!(v.get(Variant::default()).meta.variant, Variant::Int8);
    assert_eq!(v.get(Variant::Float).meta.variant, Variant::Float);
    for a in [&v.float, &v.int8] {
        assert_eq!(a.meta.version, 21);
        assert_eq!(a.meta.spec, spec);
        assert_eq!(a.meta.fingerprint, v.float.meta.fingerprint);
    }
    assert_ne!(v.float.sha256(), v.int8.sha256());
    // A bad calibration set fails the whole build, not just one half.
    let empty = calibration().select(&[]).unwrap();
    assert!(
        export::build_variants(
            &spec,
            &spec.init_params(6),
            &ExportInfo::fashion_mnist(21),
            empty.view(),
            &QuantConfig::default()
        )
        .is_err()
    );
}
