//! What an operator sees of an artifact file: `models inspect`.
//!
//! [`inspect`] reads any ONNX file, reports its size, SHA-256, operators and
//! weight storage, and, for a fleet artifact, its metadata and whether its
//! manifest agrees. Problems with the file are reported in the result
//! (`problems`) rather than stopping the report, so an operator sees
//! everything that is wrong at once; only an unreadable file is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;

use super::{
    ArtifactMeta, ExportError, Manifest, Result, manifest_path, proto, read_meta, sha256_hex,
};

/// The report on one file.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub path: String,
    /// Size in bytes.
    pub bytes: usize,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Producer and ONNX versions.
    pub producer: String,
    /// ONNX IR version.
    pub ir_version: i64,
    /// Default-domain opset.
    pub opset: i64,
    /// Operators and how many nodes use each, in first-use order.
    pub ops: Vec<(String, usize)>,
    /// Initializer bytes per element type.
    pub weight_bytes: BTreeMap<String, usize>,
    /// The fleet metadata, when present and valid.
    pub meta: Option<ArtifactMeta>,
    /// Whether a manifest was found next to the file.
    pub manifest: bool,
    /// Everything found wrong (empty for a sound artifact).
    pub problems: Vec<String>,
}

/// Inspects the ONNX file at `path`.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let bytes = std::fs::read(path).map_err(|source| ExportError::Io {
        path: path.into(),
        source,
    })?;
    let decoded = proto::decode(&bytes)?;
    let sha256 = sha256_hex(&bytes);
    let mut problems = Vec::new();
    let meta = match read_meta(&decoded) {
        Ok(m) => Some(m),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let mp = manifest_path(path);
    let manifest = match std::fs::read(&mp) {
        Ok(raw) => {
            match serde_json::from_slice::<Manifest>(&raw) {
                Ok(m) => {
                    if m.sha256 != sha256 {
                        problems.push(format!(
                            "manifest says SHA-256 {}, the file has {sha256}: damaged or replaced",
                            m.sha256
                        ));
                    }
                    if m.bytes as usize != bytes.len() {
                        problems.push(format!(
                            "manifest says {} bytes, the file has {}",
                            m.bytes,
                            bytes.len()
                        ));
                    }
                    if meta.as_ref().is_some_and(|meta| *meta != m.meta) {
                        problems.push("manifest metadata differs from the file's".into());
                    }
                }
                Err(e) => problems.push(format!("manifest {} unreadable: {e}", mp.display())),
            }
            true
        }
        Err(_) => false,
    };
    let mut ops: Vec<(String, usize)> = Vec::new();
    for op in &decoded.ops {
        match ops.iter_mut().find(|(o, _)| o == op) {
            Some((_, n)) => *n += 1,
            None => ops.push((op.clone(), 1)),
        }
    }
    let mut weight_bytes = BTreeMap::new();
    for t in &decoded.initializers {
        *weight_bytes.entry(t.data_type.clone()).or_insert(0) += t.bytes;
    }
    Ok(Inspection {
        path: path.display().to_string(),
        bytes: bytes.len(),
        sha256,
        producer: decoded.producer,
        ir_version: decoded.ir_version,
        opset: decoded.opset,
        ops,
        weight_bytes,
        meta,
        manifest,
        problems,
    })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file        {}", self.path)?;
        writeln!(f, "size        {} bytes", self.bytes)?;
        writeln!(f, "sha256      {}", self.sha256)?;
        writeln!(
            f,
            "onnx        IR {}, opset {}, producer {}",
            self.ir_version, self.opset, self.producer
        )?;
        if let Some(m) = &self.meta {
            writeln!(f, "model       {} {:?}", m.spec.name(), m.spec)?;
            writeln!(f, "variant     {}", m.variant)?;
            writeln!(f, "version     {}", m.version)?;
            writeln!(f, "layout      {}", m.fingerprint)?;
            writeln!(
                f,
                "input       {} {:?} (float)",
                m.input_name, m.input_shape
            )?;
            writeln!(f, "output      {} (logits)", m.output_name)?;
            match m.normalization {
                Some(n) => writeln!(f, "normalise   (pixel/255 - {}) / {}", n.mean, n.std)?,
                None => writeln!(f, "normalise   none (inputs are used as given)")?,
            }
            writeln!(f, "labels      {}", m.labels.join(", "))?;
            if let Some(q) = &m.quantization {
                writeln!(
                    f,
                    "quantized   {:?} over {} examples; activation scale/zero point per layer: {}",
                    q.calibration,
                    q.examples,
                    q.activations
                        .iter()
                        .map(|a| format!("{:.5}/{}", a.scale, a.zero_point))
                        .collect::<Vec<_>>()
                        .join(", ")
                )?;
            }
        }
        let ops: Vec<String> = self.ops.iter().map(|(o, n)| format!("{o}×{n}")).collect();
        writeln!(f, "operators   {}", ops.join(", "))?;
        let w: Vec<String> = self
            .weight_bytes
            .iter()
            .map(|(t, b)| format!("{t}: {b} bytes"))
            .collect();
        writeln!(f, "weights     {}", w.join(", "))?;
        writeln!(
            f,
            "manifest    {}",
            if self.manifest { "present" } else { "absent" }
        )?;
        if self.problems.is_empty() {
            write!(f, "status      ok")
        } else {
            write!(f, "status      {} problem(s):", self.problems.len())?;
            for p in &self.problems {
                write!(f, "\n  - {p}")?;
            }
            Ok(())
        }
    }
}
