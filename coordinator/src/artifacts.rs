//! Inference artifacts of model versions: what the coordinator builds for
//! every global model and ships to agents.
//!
//! For each model version (a task's initial model, each closed round's
//! model, and any model an operator deploys) the coordinator builds both
//! ONNX artifacts with `fleet_models::export::build_variants`: the float one
//! and the int8 one, calibrated on a fixed slice of the embedded
//! Fashion-MNIST training set (its first [`QuantConfig::default`] examples,
//! exactly what `coordinator models quantize` does by default). Both are
//! stored as content-addressed objects next to the model and recorded in
//! the store's `artifacts` table; an agent receives the variant its task
//! chose (`TaskSpec::variant`, int8 by default).
//!
//! Building is CPU work: the server runs [`build`] on tokio's blocking pool,
//! never on the runtime's thread, and only after the round's close has
//! committed. A model whose artifacts are missing (a crash between close
//! and build, a store from before artifacts existed) gets them on the next
//! start or when it is asked for.
//!
//! A variant that cannot be built (int8 of a model whose inputs are not
//! 28×28 images: there is no calibration data for it) is recorded with the
//! reason, so it is not retried at every start and the agent is told why.

use std::sync::OnceLock;

use fleet_models::ModelSpec;
use fleet_models::data::{Dataset, embedded, fashion};
use fleet_models::export::{self, Artifact, ExportInfo, QuantConfig, Variant};

/// What the exporter is told besides spec and parameters: Fashion-MNIST's
/// labels and normalisation for 784-feature, 10-class models, generic class
/// names otherwise.
pub fn export_info(spec: &ModelSpec, version: u64) -> ExportInfo {
    if spec.inputs() == 784 && spec.classes() == 10 {
        ExportInfo::fashion_mnist(version)
    } else {
        ExportInfo {
            version,
            labels: vec![],
            normalization: None,
        }
    }
}

/// The embedded Fashion-MNIST training subset, decoded once per process.
pub fn embedded_train() -> Result<&'static Dataset, String> {
    static DATA: OnceLock<Result<Dataset, String>> = OnceLock::new();
    DATA.get_or_init(|| embedded::load(fashion::Split::Train).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Both artifacts of one model version; a variant that could not be built
/// carries the reason.
#[derive(Debug)]
pub struct Built {
    /// The float artifact.
    pub float: Result<Artifact, String>,
    /// The int8 artifact.
    pub int8: Result<Artifact, String>,
}

impl Built {
    /// The two results, labelled.
    pub fn variants(&self) -> [(Variant, &Result<Artifact, String>); 2] {
        [(Variant::Float, &self.float), (Variant::Int8, &self.int8)]
    }
}

/// Builds the float and int8 artifacts of `params` (model version
/// `version`, architecture `spec`). CPU-bound: call it off the async
/// runtime.
pub fn build(spec: &ModelSpec, params: &[f32], version: u64) -> Built {
    let info = export_info(spec, version);
    let calibration = match embedded_train() {
        Ok(data) if data.dim() == spec.inputs() => Ok(data),
        Ok(data) => Err(format!(
            "no calibration data for the int8 artifact: the coordinator calibrates on \
             Fashion-MNIST images of {} features, model {} reads {}; set the task's variant \
             to float",
            data.dim(),
            spec.name(),
            spec.inputs()
        )),
        Err(e) => Err(format!("calibration data: {e}")),
    };
    let calibration = match calibration {
        Ok(c) => c,
        Err(reason) => {
            return Built {
                float: export::export_float(spec, params, &info).map_err(|e| e.to_string()),
                int8: Err(reason),
            };
        }
    };
    match export::build_variants(
        spec,
        params,
        &info,
        calibration.view(),
        &QuantConfig::default(),
    ) {
        Ok(v) => Built {
            float: Ok(v.float),
            int8: Ok(v.int8),
        },
        // Quantization failed: the float artifact may still be fine.
        Err(e) => Built {
            float: export::export_float(spec, params, &info).map_err(|e| e.to_string()),
            int8: Err(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_variants_of_a_fashion_model_and_the_reason_when_int8_cannot_be_built() {
        let spec = ModelSpec::fashion_2nn();
        let built = build(&spec, &spec.init_params(4), 3);
        let float = built.float.as_ref().unwrap();
        let int8 = built.int8.as_ref().unwrap();
        assert_eq!(
            (float.meta.variant, int8.meta.variant),
            (Variant::Float, Variant::Int8)
        );
        assert_eq!((float.meta.version, int8.meta.version), (3, 3));
        assert_eq!(int8.meta.quantization.as_ref().unwrap().examples, 500);
        assert!(float.onnx.len() > 3 * int8.onnx.len());
        // Same inputs, same bytes: artifacts are content-addressed.
        assert_eq!(
            build(&spec, &spec.init_params(4), 3).int8.unwrap().onnx,
            int8.onnx
        );

        let synthetic = ModelSpec::LogReg {
            inputs: 60,
            classes: 10,
        };
        let built = build(&synthetic, &synthetic.init_params(1), 1);
        assert_eq!(built.float.unwrap().meta.labels[0], "class0");
        let e = built.int8.unwrap_err();
        assert!(
            e.contains("reads 60") && e.contains("variant to float"),
            "{e}"
        );
    }
}
