//! Inference artifacts: trained parameters as standard ONNX files.
//!
//! An [`Artifact`] is the bytes of one ONNX model plus its [`ArtifactMeta`]:
//!
//! - [`export_float`]: the float network (`Gemm`, `Conv`, `Relu`, `MaxPool`);
//! - [`quantize`]: post-training static quantization with calibration data
//!   into the QOperator form (`QuantizeLinear`, `QLinearConv`,
//!   `MatMulInteger`; see [`graph`]), int8 weights per output channel,
//!   uint8 activations per tensor (see [`quant`]).
//!
//! The metadata (model spec, layout fingerprint, version, input shape and
//! normalisation, label names, quantization parameters) is stored inside the
//! ONNX file as the `metadata_props` entry [`META_KEY`] (JSON), so any ONNX
//! tool shows it and the file is self-describing. The SHA-256 of the file
//! cannot be inside it: [`Artifact::write`] puts it in a manifest next to
//! the file (`<file>.json`, a [`Manifest`]), and a loader compares it with
//! the hash it was given (the object id a coordinator ships it under).
//!
//! [`inspect::inspect`] reports on any file for operators.
//!
//! Both graphs take `input` `[N, features]` (float, normalised like the
//! training data) and return `logits` `[N, classes]`; the batch is free.

pub mod graph;
pub mod inspect;
pub mod proto;
pub mod quant;
pub mod reference;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{DataRef, PixelNorm};
use crate::spec::ModelSpec;
pub use quant::{ActQuant, Calibration};

/// Version of the artifact format (the metadata schema and graph conventions).
pub const ARTIFACT_FORMAT: u32 = 1;
/// `metadata_props` key holding the JSON [`ArtifactMeta`].
pub const META_KEY: &str = "fleet.artifact";

/// Errors of export, quantization and artifact reading.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The spec or the parameters are unusable.
    #[error(transparent)]
    Model(#[from] crate::Error),
    /// Calibration data does not fit the model or is empty.
    #[error("calibration data: {reason}")]
    Calibration {
        /// What is wrong.
        reason: String,
    },
    /// The bytes are not a readable ONNX model.
    #[error(
        "not a readable ONNX model ({reason}); the file is damaged or truncated, fetch it again"
    )]
    Malformed {
        /// Where decoding failed.
        reason: String,
    },
    /// The ONNX model carries no fleet metadata.
    #[error(
        "ONNX model has no `{META_KEY}` metadata entry: it was not exported by fleet-models \
         (use `models export` or `models quantize`)"
    )]
    NoMetadata,
    /// The metadata entry is unreadable or inconsistent.
    #[error("artifact metadata: {reason}")]
    Metadata {
        /// What is wrong.
        reason: String,
    },
    /// The file's SHA-256 is not the expected one.
    #[error(
        "artifact SHA-256 mismatch: expected {expected}, file has {found}; the file is damaged \
         or not the announced version, fetch it again"
    )]
    HashMismatch {
        /// Expected hash (hex).
        expected: String,
        /// Hash of the bytes (hex).
        found: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Result alias of this module.
pub type Result<T, E = ExportError> = std::result::Result<T, E>;

/// Float or quantized.
///
/// The default, [`Variant::Int8`], is what agents receive unless a task
/// says otherwise: a quarter of the size at the same accuracy
/// (`docs/benchmarks.md`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// 32-bit float weights and activations.
    Float,
    /// Int8 weights, uint8 activations, integer kernels.
    #[default]
    Int8,
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Variant::Float => "float",
            Variant::Int8 => "int8",
        })
    }
}

/// How an int8 artifact was quantized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantInfo {
    /// Activation range rule.
    pub calibration: Calibration,
    /// Calibration examples used.
    pub examples: usize,
    /// Quantization of each layer's input, in layer order.
    pub activations: Vec<ActQuant>,
}

/// What every artifact says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// [`ARTIFACT_FORMAT`] at export time.
    pub format: u32,
    /// The architecture.
    pub spec: ModelSpec,
    /// Full hex SHA-256 fingerprint of the spec's flat parameter layout.
    pub fingerprint: String,
    /// Version of the global model the parameters come from.
    pub version: u64,
    /// Float or int8.
    pub variant: Variant,
    /// Name of the graph input.
    pub input_name: String,
    /// Input shape; `-1` marks the free batch dimension.
    pub input_shape: Vec<i64>,
    /// Name of the graph output (logits).
    pub output_name: String,
    /// Normalisation applied to 8-bit pixels before they enter the model,
    /// when inputs are images.
    pub normalization: Option<PixelNorm>,
    /// Class names, in label order.
    pub labels: Vec<String>,
    /// Quantization parameters of an int8 artifact.
    pub quantization: Option<QuantInfo>,
}

/// What the exporter is told besides spec and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportInfo {
    /// Global model version.
    pub version: u64,
    /// Class names in label order (empty: `class0`, `class1`, …).
    pub labels: Vec<String>,
    /// Pixel normalisation the model expects, for image models.
    pub normalization: Option<PixelNorm>,
}

impl ExportInfo {
    /// Fashion-MNIST's labels and normalisation.
    pub fn fashion_mnist(version: u64) -> Self {
        Self {
            version,
            labels: crate::data::fashion::LABEL_NAMES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            normalization: Some(crate::data::fashion::NORM),
        }
    }
}

/// Quantization settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantConfig {
    /// Activation range rule.
    pub calibration: Calibration,
    /// At most this many calibration examples are used (the first ones).
    pub max_examples: usize,
}

impl Default for QuantConfig {
    /// Min/max over 500 examples (chosen by the accuracy measurements in
    /// `docs/benchmarks.md`).
    fn default() -> Self {
        Self {
            calibration: Calibration::MinMax,
            max_examples: 500,
        }
    }
}

/// An ONNX model and its metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// What the model is.
    pub meta: ArtifactMeta,
    /// The ONNX `ModelProto` bytes (metadata included).
    pub onnx: Vec<u8>,
}

/// The record written next to an artifact file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// File name of the ONNX model (same directory).
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Its metadata (also inside the file).
    pub meta: ArtifactMeta,
}

/// Hex encoding.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn check_params(spec: &ModelSpec, params: &[f32]) -> Result<()> {
    spec.validate()?;
    spec.layout().check(params)?;
    Ok(())
}

fn base_meta(spec: &ModelSpec, info: &ExportInfo, variant: Variant) -> Result<ArtifactMeta> {
    let labels = if info.labels.is_empty() {
        (0..spec.classes()).map(|c| format!("class{c}")).collect()
    } else {
        info.labels.clone()
    };
    if labels.len() != spec.classes() {
        return Err(ExportError::Metadata {
            reason: format!(
                "{} label names given for a model of {} classes",
                labels.len(),
                spec.classes()
            ),
        });
    }
    Ok(ArtifactMeta {
        format: ARTIFACT_FORMAT,
        spec: spec.clone(),
        fingerprint: hex(&spec.layout().fingerprint().0),
        version: info.version,
        variant,
        input_name: graph::INPUT.into(),
        input_shape: vec![-1, spec.inputs() as i64],
        output_name: graph::OUTPUT.into(),
        normalization: info.normalization,
        labels,
        quantization: None,
    })
}

fn seal(mut model: proto::Model, meta: ArtifactMeta) -> Artifact {
    model.model_version = meta.version as i64;
    model.doc_string = format!(
        "{} ({}) version {}, exported by fleet-models",
        meta.spec.name(),
        meta.variant,
        meta.version
    );
    model.metadata = vec![(
        META_KEY.into(),
        serde_json::to_string(&meta).expect("metadata serialises"),
    )];
    Artifact {
        onnx: model.encode(),
        meta,
    }
}

/// Exports the float network of `spec` with parameters `params`.
pub fn export_float(spec: &ModelSpec, params: &[f32], info: &ExportInfo) -> Result<Artifact> {
    check_params(spec, params)?;
    let meta = base_meta(spec, info, Variant::Float)?;
    Ok(seal(graph::float_graph(spec, params), meta))
}

/// Quantizes `spec` with parameters `params` to int8, calibrating activation
/// ranges on (at most `cfg.max_examples` of) `calibration`.
pub fn quantize(
    spec: &ModelSpec,
    params: &[f32],
    info: &ExportInfo,
    calibration: DataRef<'_>,
    cfg: &QuantConfig,
) -> Result<Artifact> {
    check_params(spec, params)?;
    if let Calibration::Percentile { percentile } = cfg.calibration
        && !(percentile > 50.0 && percentile <= 100.0)
    {
        return Err(ExportError::Calibration {
            reason: format!("percentile {percentile} must be in (50, 100]"),
        });
    }
    let n = calibration.len().min(cfg.max_examples);
    if n == 0 {
        return Err(ExportError::Calibration {
            reason: "no examples (give at least one; a few hundred training examples is usual)"
                .into(),
        });
    }
    let dim = calibration.dataset().dim();
    if dim != spec.inputs() {
        return Err(ExportError::Calibration {
            reason: format!(
                "examples have {dim} features, model {} expects {}",
                spec.name(),
                spec.inputs()
            ),
        });
    }
    let mut x = Vec::with_capacity(n * dim);
    for i in 0..n {
        x.extend_from_slice(calibration.get(i).0);
    }
    if let Some(index) = x.iter().position(|v| !v.is_finite()) {
        return Err(ExportError::Calibration {
            reason: format!(
                "non-finite feature {} of example {}",
                index % dim,
                index / dim
            ),
        });
    }
    let trace = reference::forward(spec, params, &x, n);
    let activations: Vec<ActQuant> = trace
        .layer_inputs
        .iter()
        .map(|values| {
            let (lo, hi) = cfg.calibration.range(values);
            ActQuant::from_range(lo, hi)
        })
        .collect();
    let mut meta = base_meta(spec, info, Variant::Int8)?;
    meta.quantization = Some(QuantInfo {
        calibration: cfg.calibration,
        examples: n,
        activations: activations.clone(),
    });
    Ok(seal(graph::int8_graph(spec, params, &activations), meta))
}

/// Both artifacts of one global model version.
#[derive(Debug, Clone, PartialEq)]
pub struct Variants {
    /// The float artifact.
    pub float: Artifact,
    /// The int8 artifact.
    pub int8: Artifact,
}

impl Variants {
    /// The artifact of `variant`.
    pub fn get(&self, variant: Variant) -> &Artifact {
        match variant {
            Variant::Float => &self.float,
            Variant::Int8 => &self.int8,
        }
    }
}

/// Builds the float and the int8 artifact of one global model version, as
/// a coordinator does for each new version before shipping the variant a
/// task asks for ([`Variant::default`] otherwise).
pub fn build_variants(
    spec: &ModelSpec,
    params: &[f32],
    info: &ExportInfo,
    calibration: DataRef<'_>,
    cfg: &QuantConfig,
) -> Result<Variants> {
    Ok(Variants {
        float: export_float(spec, params, info)?,
        int8: quantize(spec, params, info, calibration, cfg)?,
    })
}

impl Artifact {
    /// Reads an artifact from ONNX bytes, taking the metadata from inside.
    ///
    /// With `expected_sha256` (hex) the bytes must hash to it.
    pub fn from_bytes(onnx: Vec<u8>, expected_sha256: Option<&str>) -> Result<Self> {
        if let Some(expected) = expected_sha256 {
            let found = sha256_hex(&onnx);
            if !found.eq_ignore_ascii_case(expected.trim()) {
                return Err(ExportError::HashMismatch {
                    expected: expected.trim().to_ascii_lowercase(),
                    found,
                });
            }
        }
        let decoded = proto::decode(&onnx)?;
        let meta = read_meta(&decoded)?;
        Ok(Self { meta, onnx })
    }

    /// Hex SHA-256 of the ONNX bytes.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.onnx)
    }

    /// A conventional file name: `<model>-v<version>-<variant>.onnx`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-v{}-{}.onnx",
            self.meta.spec.name(),
            self.meta.version,
            self.meta.variant
        )
    }

    /// The manifest of this artifact under file name `file`.
    pub fn manifest(&self, file: &str) -> Manifest {
        Manifest {
            file: file.into(),
            bytes: self.onnx.len() as u64,
            sha256: self.sha256(),
            meta: self.meta.clone(),
        }
    }

    /// Writes the ONNX file to `path` and its manifest to `path` + `.json`;
    /// returns the manifest path.
    pub fn write(&self, path: &Path) -> Result<PathBuf> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| ExportError::Io { path: p, source }
        };
        std::fs::write(path, &self.onnx).map_err(io(path))?;
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let manifest_path = manifest_path(path);
        let json =
            serde_json::to_string_pretty(&self.manifest(&file)).expect("manifest serialises");
        std::fs::write(&manifest_path, json + "\n").map_err(io(&manifest_path))?;
        Ok(manifest_path)
    }

    /// Reads the ONNX file at `path`, checking it against its manifest
    /// (`path` + `.json`) when that exists: size, SHA-256 and metadata.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ExportError::Io {
            path: path.into(),
            source,
        })?;
        let mp = manifest_path(path);
        let manifest =
            match std::fs::read(&mp) {
                Ok(m) => Some(serde_json::from_slice::<Manifest>(&m).map_err(|e| {
                    ExportError::Metadata {
                        reason: format!("manifest {}: {e}", mp.display()),
                    }
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(source) => return Err(ExportError::Io { path: mp, source }),
            };
        let artifact = Self::from_bytes(bytes, manifest.as_ref().map(|m| m.sha256.as_str()))?;
        if let Some(m) = manifest
            && m.meta != artifact.meta
        {
            return Err(ExportError::Metadata {
                reason: format!(
                    "manifest {} describes another model than the file holds",
                    mp.display()
                ),
            });
        }
        Ok(artifact)
    }
}

/// The manifest path of an artifact file: the file name + `.json`.
pub fn manifest_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".json");
    PathBuf::from(s)
}

/// The metadata of a decoded ONNX model, checked for consistency.
pub fn read_meta(decoded: &proto::Decoded) -> Result<ArtifactMeta> {
    let json = decoded
        .metadata
        .iter()
        .find(|(k, _)| k == META_KEY)
        .map(|(_, v)| v)
        .ok_or(ExportError::NoMetadata)?;
    let meta: ArtifactMeta = serde_json::from_str(json).map_err(|e| ExportError::Metadata {
        reason: format!("`{META_KEY}` is not valid artifact metadata: {e}"),
    })?;
    let bad = |reason: String| Err(ExportError::Metadata { reason });
    if meta.format != ARTIFACT_FORMAT {
        return bad(format!(
            "format {} is not supported (this build reads format {ARTIFACT_FORMAT}); \
             export the model again",
            meta.format
        ));
    }
    meta.spec.validate()?;
    let fp = hex(&meta.spec.layout().fingerprint().0);
    if meta.fingerprint != fp {
        return bad(format!(
            "fingerprint {} does not match the spec's layout {fp}",
            meta.fingerprint
        ));
    }
    if meta.input_shape != [-1, meta.spec.inputs() as i64]
        || meta.labels.len() != meta.spec.classes()
    {
        return bad(format!(
            "input shape {:?} or {} labels do not fit the spec {:?}",
            meta.input_shape,
            meta.labels.len(),
            meta.spec
        ));
    }
    if (meta.variant == Variant::Int8) != meta.quantization.is_some() {
        return bad(format!(
            "variant {} but quantization parameters {}",
            meta.variant,
            if meta.quantization.is_some() {
                "present"
            } else {
                "absent"
            }
        ));
    }
    if !decoded.inputs.contains(&meta.input_name) || !decoded.outputs.contains(&meta.output_name) {
        return bad(format!(
            "graph inputs {:?} / outputs {:?} do not include `{}` / `{}`",
            decoded.inputs, decoded.outputs, meta.input_name, meta.output_name
        ));
    }
    Ok(meta)
}
