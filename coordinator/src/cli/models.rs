//! `coordinator models …`: build and inspect inference artifacts.
//!
//! - `models export`: the float ONNX artifact of a model object;
//! - `models quantize`: the int8 artifact, calibrated on training data;
//! - `models inspect`: what an artifact file holds and whether it is sound.
//!
//! A model object is the coordinator's format for parameters: the flat
//! vector in the spec's layout as little-endian `f32` (`params_to_bytes`).
//! Every artifact is written with its manifest (`<file>.json`, holding the
//! SHA-256). The work is done by `fleet_models::export`; this module parses
//! arguments, reads files and prints.

use std::path::{Path, PathBuf};

use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand, ValueEnum};
use fleet_aggregation::codec::CodecKind;
use fleet_models::data::{DataRef, Dataset, fashion};
use fleet_models::export::{
    self, Artifact, Calibration, ExportInfo, QuantConfig, inspect::inspect,
};
use fleet_models::{ModelKind, ModelSpec};

/// Artifact commands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Export a model object as a float ONNX artifact.
    ///
    /// Example: coordinator models export --model 2nn --params global-v12.bin --version 12 --out 2nn-v12-float.onnx
    Export(ExportArgs),
    /// Quantize a model object to an int8 ONNX artifact (post-training static quantization).
    ///
    /// Example: coordinator models quantize --model cnn --params global-v12.bin --version 12 --calibration-data fashion-mnist --out cnn-v12-int8.onnx
    Quantize(QuantizeArgs),
    /// Show an artifact's metadata, hash, operators and problems.
    ///
    /// Example: coordinator models inspect 2nn-v12-int8.onnx
    Inspect(InspectArgs),
}

/// Parses a model name, listing the names in `--help` and errors.
pub fn model_kind() -> impl clap::builder::TypedValueParser<Value = ModelKind> {
    clap::builder::PossibleValuesParser::new(ModelKind::NAMES)
        .map(|name| name.parse::<ModelKind>().expect("a listed name"))
}

/// Parses a codec name, listing the names in `--help` and errors.
pub fn codec_kind() -> impl clap::builder::TypedValueParser<Value = CodecKind> {
    clap::builder::PossibleValuesParser::new(CodecKind::NAMES)
        .map(|name| name.parse::<CodecKind>().expect("a listed name"))
}

/// What both export commands need.
#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Architecture of the parameters: logreg, 2nn or cnn.
    #[arg(long, value_parser = model_kind())]
    pub model: ModelKind,
    /// Model object: the flat parameters as little-endian f32.
    #[arg(long)]
    pub params: PathBuf,
    /// Global model version the parameters are.
    #[arg(long)]
    pub version: u64,
    /// Output ONNX file (the manifest goes to the same path + `.json`).
    #[arg(long)]
    pub out: PathBuf,
}

/// Arguments of `models export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Model, parameters, version and output.
    #[command(flatten)]
    pub source: SourceArgs,
}

/// Calibration data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CalibrationData {
    /// The embedded 5,000-image training subset of Fashion-MNIST.
    Embedded,
    /// The full Fashion-MNIST training set (`FASHION_MNIST_DIR` or the Debian package's directory).
    FashionMnist,
}

/// Activation range rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RangeRule {
    /// Observed minimum and maximum.
    Minmax,
    /// Percentiles (see --percentile).
    Percentile,
}

/// Arguments of `models quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Model, parameters, version and output.
    #[command(flatten)]
    pub source: SourceArgs,
    /// Training data to calibrate activation ranges on.
    #[arg(long, value_enum, default_value_t = CalibrationData::Embedded)]
    pub calibration_data: CalibrationData,
    /// Calibration examples (the first ones of the data set).
    #[arg(long, default_value_t = 500)]
    pub calibration_examples: usize,
    /// How activation ranges are taken.
    #[arg(long, value_enum, default_value_t = RangeRule::Minmax)]
    pub range: RangeRule,
    /// Percentile for `--range percentile`, in (50, 100].
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
}

/// Arguments of `models inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX file.
    pub path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Reads a model object for `spec`, naming the problem if it does not fit.
pub fn read_params(path: &Path, spec: &ModelSpec) -> Result<Vec<f32>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let params = fleet_protocol::message::bytes_to_params(&bytes).ok_or_else(|| {
        format!(
            "{}: {} bytes is not a whole number of f32 values; expected a model object",
            path.display(),
            bytes.len()
        )
    })?;
    spec.layout()
        .check(&params)
        .map_err(|e| format!("{}: {e} (is --model right?)", path.display()))?;
    Ok(params)
}

fn info_for(spec: &ModelSpec, version: u64) -> ExportInfo {
    crate::artifacts::export_info(spec, version)
}

/// The calibration set: the embedded subset is the one the coordinator
/// also uses for the artifacts it builds itself (`crate::artifacts`).
fn calibration_set(which: CalibrationData) -> Result<std::borrow::Cow<'static, Dataset>, String> {
    match which {
        CalibrationData::Embedded => {
            crate::artifacts::embedded_train().map(std::borrow::Cow::Borrowed)
        }
        CalibrationData::FashionMnist => {
            fashion::load(&fashion::default_dir(), fashion::Split::Train)
                .map(std::borrow::Cow::Owned)
                .map_err(|e| e.to_string())
        }
    }
}

fn write(artifact: &Artifact, out: &Path) -> Result<String, String> {
    let manifest = artifact.write(out).map_err(|e| e.to_string())?;
    Ok(format!(
        "wrote {} ({} bytes, sha256 {}) and {}",
        out.display(),
        artifact.onnx.len(),
        artifact.sha256(),
        manifest.display()
    ))
}

/// `models export`: returns the line to print.
pub fn export_float(args: &ExportArgs) -> Result<String, String> {
    let s = &args.source;
    let spec = s.model.fashion();
    let params = read_params(&s.params, &spec)?;
    let a = export::export_float(&spec, &params, &info_for(&spec, s.version))
        .map_err(|e| e.to_string())?;
    write(&a, &s.out)
}

/// `models quantize`: returns the line to print.
pub fn quantize(args: &QuantizeArgs) -> Result<String, String> {
    let s = &args.source;
    let spec = s.model.fashion();
    let params = read_params(&s.params, &spec)?;
    let data = calibration_set(args.calibration_data)?;
    let calibration = match args.range {
        RangeRule::Minmax => Calibration::MinMax,
        RangeRule::Percentile => Calibration::Percentile {
            percentile: args.percentile,
        },
    };
    let cfg = QuantConfig {
        calibration,
        max_examples: args.calibration_examples,
    };
    eprintln!(
        "calibrating on {} training examples ({:?})…",
        data.len().min(cfg.max_examples),
        args.calibration_data
    );
    let view: DataRef<'_> = data.view();
    let a = export::quantize(&spec, &params, &info_for(&spec, s.version), view, &cfg)
        .map_err(|e| e.to_string())?;
    write(&a, &s.out)
}

/// `models inspect`: returns the report to print; an error when the file
/// is unreadable or the report lists problems.
pub fn inspect_file(args: &InspectArgs) -> Result<String, String> {
    let report = inspect(&args.path).map_err(|e| e.to_string())?;
    let text = if args.json {
        serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
    } else {
        report.to_string()
    };
    if report.problems.is_empty() {
        Ok(text)
    } else {
        Err(text)
    }
}

/// Runs a `models` command; the error's text is printed by `main`.
pub fn run(cmd: ModelsCommand) -> Result<(), String> {
    let out = match cmd {
        ModelsCommand::Export(a) => export_float(&a)?,
        ModelsCommand::Quantize(a) => quantize(&a)?,
        ModelsCommand::Inspect(a) => inspect_file(&a)?,
    };
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("fleet-cli-models-{}-{name}", std::process::id()))
    }

    #[test]
    fn export_quantize_and_inspect_a_model_object() {
        let spec = ModelSpec::fashion_2nn();
        let params = tmp("params.bin");
        std::fs::write(
            &params,
            fleet_protocol::message::params_to_bytes(&spec.init_params(3)),
        )
        .unwrap();
        let float = tmp("float.onnx");
        let source = |out: &PathBuf| SourceArgs {
            model: ModelKind::TwoNn,
            params: params.clone(),
            version: 8,
            out: out.clone(),
        };
        let line = export_float(&ExportArgs {
            source: source(&float),
        })
        .unwrap();
        assert!(line.contains("sha256"), "{line}");
        let int8 = tmp("int8.onnx");
        quantize(&QuantizeArgs {
            source: source(&int8),
            calibration_data: CalibrationData::Embedded,
            calibration_examples: 50,
            range: RangeRule::Percentile,
            percentile: 99.9,
        })
        .unwrap();
        let report = inspect_file(&InspectArgs {
            path: int8.clone(),
            json: false,
        })
        .unwrap();
        assert!(
            report.contains("variant     int8") && report.contains("version     8"),
            "{report}"
        );
        let json = inspect_file(&InspectArgs {
            path: float.clone(),
            json: true,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["meta"]["variant"], "float");
        assert!(
            std::fs::metadata(&float).unwrap().len() > 3 * std::fs::metadata(&int8).unwrap().len()
        );

        // A model object of another architecture is refused with a hint.
        let e = export_float(&ExportArgs {
            source: SourceArgs {
                model: ModelKind::Cnn,
                ..source(&float)
            },
        })
        .unwrap_err();
        assert!(e.contains("--model"), "{e}");
        // A damaged artifact: inspect reports the problem and fails.
        let mut bytes = std::fs::read(&int8).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&int8, bytes).unwrap();
        let e = inspect_file(&InspectArgs {
            path: int8.clone(),
            json: false,
        })
        .unwrap_err();
        assert!(e.contains("SHA-256"), "{e}");
        for p in [
            params,
            float.clone(),
            export::manifest_path(&float),
            int8.clone(),
            export::manifest_path(&int8),
        ] {
            let _ = std::fs::remove_file(p);
        }
    }
}
