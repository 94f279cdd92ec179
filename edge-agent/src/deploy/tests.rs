//! `verify`'s verdicts: which refusals are fetched again and which are not.

use fleet_models::ModelSpec;
use fleet_models::export::{self, ExportInfo, Variant};

use super::*;

fn deployment(bytes: &[u8], announced: &[u8], spec: &ModelSpec) -> Deployment {
    Deployment {
        version: 1,
        model: ObjectRef {
            id: ObjectId::of(b"model"),
            size: 5,
        },
        spec: spec.clone(),
        artifact: DeployedArtifact {
            object: ObjectRef {
                id: ObjectId::of(announced),
                size: bytes.len() as u64,
            },
            variant: Variant::Float,
            model_version: 1,
        },
    }
}

#[test]
fn damaged_bytes_are_fetched_again_and_a_bad_artifact_is_not() {
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let good = export::export_float(&spec, &spec.init_params(1), &ExportInfo::fashion_mnist(1))
        .unwrap()
        .onnx;
    assert!(verify(&deployment(&good, &good, &spec), good.clone()).is_ok());

    // One byte changed on the way: not the announced object.
    let mut damaged = good.clone();
    damaged[100] ^= 1;
    let e = verify(&deployment(&damaged, &good, &spec), damaged).unwrap_err();
    assert!(matches!(e, DeployError::Download(_)), "{e}");

    // The announced object itself, but not an artifact tract can use.
    let junk = vec![7u8; 64];
    let e = verify(&deployment(&junk, &junk, &spec), junk).unwrap_err();
    assert!(matches!(e, DeployError::Artifact(_)), "{e}");

    // Intact, but another model than announced.
    let other = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let mut d = deployment(&good, &good, &other);
    d.artifact.model_version = 2;
    let e = verify(&d, good).unwrap_err();
    assert!(matches!(e, DeployError::Artifact(_)), "{e}");
}
