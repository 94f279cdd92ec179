//! One loaded model: an artifact checked, parsed by tract and optimised once.
//!
//! [`Model::load`] verifies the SHA-256 (when given) and the metadata
//! (`fleet_models::export`), has tract parse the ONNX graph, optimises it for
//! a free batch size, and runs it once on a zero example to prove that the
//! plan works and returns `[1, classes]` finite logits. A model that passes
//! is immutable and shared (`Arc`) by every request that uses it.
//!
//! Running a plan needs a tract session state (one slot per node). States
//! are kept in a small pool and reused, so a request allocates no session.

use std::path::Path;
use std::sync::{Arc, Mutex};

use fleet_models::export::{Artifact, ArtifactMeta};
use tract_onnx::prelude::*;

use super::error::{InferenceError, Result};

/// A model ready to serve.
#[derive(Debug)]
pub struct Model {
    meta: ArtifactMeta,
    sha256: String,
    bytes: usize,
    plan: Arc<TypedRunnableModel>,
    /// Idle session states, reused by later runs.
    states: Mutex<Vec<TypedSimpleState>>,
}

/// Idle session states kept per model (one per concurrent request is enough).
const STATE_POOL: usize = 8;

/// Logits of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// Version of the model that produced them.
    pub version: u64,
    /// Classes per example.
    pub classes: usize,
    /// `[batch, classes]` logits, row-major.
    pub logits: Vec<f32>,
    /// Id of the first example's prediction (the rest follow in order); set
    /// by the [`super::Predictor`] that served it, 0 from a bare [`Model`].
    pub first_id: u64,
}

impl Predictions {
    /// Examples in the batch.
    pub fn len(&self) -> usize {
        self.logits.len() / self.classes.max(1)
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.logits.is_empty()
    }

    /// The logits of example `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    /// The predicted class of every example (first index on ties).
    pub fn classes(&self) -> Vec<usize> {
        self.logits
            .chunks_exact(self.classes)
            .map(fleet_models::train::argmax)
            .collect()
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn plan_error(e: impl std::fmt::Display) -> InferenceError {
    InferenceError::Plan {
        reason: format!("{e:#}"),
    }
}

impl Model {
    /// Loads ONNX bytes, checking them against `expected_sha256` (hex) when given.
    pub fn load(bytes: Vec<u8>, expected_sha256: Option<&str>) -> Result<Self> {
        Self::from_artifact(Artifact::from_bytes(bytes, expected_sha256)?)
    }

    /// Loads an artifact file, checked against its manifest when there is one.
    pub fn load_file(path: &Path) -> Result<Self> {
        Self::from_artifact(Artifact::read(path)?)
    }

    /// Plans an artifact already read and verified. A hostile or broken
    /// ONNX file is an error, never a panic: tract's parser and optimiser
    /// are run under `catch_unwind` (they panic on some malformed graphs,
    /// `docs/fuzzing.md`), and the plan must run a batch of two zero
    /// examples to finite logits of the right shape before it is used.
    pub fn from_artifact(artifact: Artifact) -> Result<Self> {
        let sha256 = artifact.sha256();
        let bytes = artifact.onnx.len();
        let onnx = artifact.onnx.as_slice();
        let planned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            tract_onnx::onnx()
                .model_for_read(&mut &onnx[..])
                .map_err(plan_error)?
                .into_optimized()
                .map_err(plan_error)?
                .into_runnable()
                .map_err(plan_error)
        }));
        let plan = planned.map_err(|panic| {
            plan_error(format!(
                "the ONNX graph could not be planned: {}",
                panic_message(panic.as_ref())
            ))
        })??;
        let model = Self {
            meta: artifact.meta,
            sha256,
            bytes,
            plan,
            states: Mutex::new(Vec::new()),
        };
        // Prove the plan end to end, on more than one example, before
        // anyone relies on it.
        let trial = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.run(&vec![0.0; 2 * model.features()], 2)
        }))
        .map_err(|panic| {
            plan_error(format!(
                "trial run failed: {}",
                panic_message(panic.as_ref())
            ))
        })?;
        let probe = trial.map_err(|e| plan_error(format!("trial run failed: {e}")))?;
        if let Some(i) = probe.iter().position(|v| !v.is_finite()) {
            return Err(plan_error(format!(
                "trial run on zero examples gave a non-finite logit at {i}"
            )));
        }
        Ok(model)
    }

    /// The artifact's metadata.
    pub fn meta(&self) -> &ArtifactMeta {
        &self.meta
    }

    /// Global model version.
    pub fn version(&self) -> u64 {
        self.meta.version
    }

    /// Hex SHA-256 of the artifact.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Size of the ONNX file in bytes.
    pub fn artifact_bytes(&self) -> usize {
        self.bytes
    }

    /// Features per example.
    pub fn features(&self) -> usize {
        self.meta.spec.inputs()
    }

    /// Classes per example.
    pub fn classes(&self) -> usize {
        self.meta.spec.classes()
    }

    /// Checks a batch: a whole number (≥ 1) of examples, every value finite.
    pub fn check_input(&self, inputs: &[f32]) -> Result<usize> {
        let features = self.features();
        if inputs.is_empty() || !inputs.len().is_multiple_of(features) {
            return Err(InferenceError::Shape {
                features,
                found: inputs.len(),
            });
        }
        if let Some(i) = inputs.iter().position(|v| !v.is_finite()) {
            return Err(InferenceError::NonFinite {
                example: i / features,
                feature: i % features,
                value: inputs[i],
            });
        }
        Ok(inputs.len() / features)
    }

    /// Logits for a batch of normalised inputs (`[batch, features]`, row-major).
    pub fn predict(&self, inputs: &[f32]) -> Result<Predictions> {
        let n = self.check_input(inputs)?;
        Ok(Predictions {
            version: self.version(),
            classes: self.classes(),
            logits: self.run(inputs, n)?,
            first_id: 0,
        })
    }

    /// Normalises 8-bit pixels with the artifact's normalisation.
    pub fn normalize_pixels(&self, pixels: &[u8]) -> Result<Vec<f32>> {
        let norm = self
            .meta
            .normalization
            .ok_or(InferenceError::NoNormalization)?;
        Ok(norm.apply(pixels))
    }

    fn run(&self, inputs: &[f32], n: usize) -> Result<Vec<f32>> {
        let run_error = |e: TractError| InferenceError::Run {
            reason: format!("{e:#}"),
        };
        let x = Tensor::from_shape(&[n, self.features()], inputs).map_err(run_error)?;
        let idle = self.states.lock().map(|mut v| v.pop()).unwrap_or(None);
        let mut state = match idle {
            Some(s) => s,
            None => self.plan.spawn().map_err(run_error)?,
        };
        // A state whose run failed is dropped rather than reused.
        let out = state.run(tvec![x.into()]).map_err(run_error)?;
        if let Ok(mut v) = self.states.lock()
            && v.len() < STATE_POOL
        {
            v.push(state);
        }
        let first = out.first().ok_or_else(|| InferenceError::Run {
            reason: "the plan returned no output".into(),
        })?;
        let logits = first
            .try_as_plain_ram()
            .map_err(run_error)?
            .as_slice::<f32>()
            .map_err(run_error)?
            .to_vec();
        if logits.len() != n * self.classes() {
            return Err(InferenceError::Run {
                reason: format!(
                    "the plan returned {} logits for {n} examples of {} classes",
                    logits.len(),
                    self.classes()
                ),
            });
        }
        Ok(logits)
    }

    /// Runs the plan `runs` times on `inputs` and returns, for each node in
    /// execution order, its operator name and total time: where a
    /// prediction's time goes (benchmark diagnostics).
    pub fn profile(
        &self,
        inputs: &[f32],
        runs: usize,
    ) -> Result<Vec<(String, std::time::Duration)>> {
        let n = self.check_input(inputs)?;
        let run_error = |e: TractError| InferenceError::Run {
            reason: format!("{e:#}"),
        };
        let model = self.plan.model();
        let mut times = vec![std::time::Duration::ZERO; model.nodes().len()];
        let mut state = self.plan.spawn().map_err(run_error)?;
        for _ in 0..runs {
            let x = Tensor::from_shape(&[n, self.features()], inputs).map_err(run_error)?;
            state
                .run_plan_with_eval(tvec![x.into()], |ctx, op_state, node, input| {
                    let t = std::time::Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input);
                    times[node.id] += t.elapsed();
                    r
                })
                .map_err(run_error)?;
        }
        let order = model.eval_order().map_err(run_error)?;
        Ok(order
            .into_iter()
            .map(|id| (model.nodes()[id].op().name().to_string(), times[id]))
            .collect())
    }

    /// The matrix-multiplication kernels the optimised plan selected,
    /// tract's names (e.g. `avx512vnni_mmm_i32_8x8`), each once, in plan
    /// order. Which ones tract picks depends on the CPU it runs on: the
    /// agent logs them with every model it starts serving.
    pub fn kernels(&self) -> Vec<String> {
        use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;
        use tract_onnx::tract_core::tract_linalg::mmm::MatMatMul;
        let model = self.plan.model();
        let mut names: Vec<String> = Vec::new();
        for id in model.eval_order().unwrap_or_default() {
            if let Some(op) = model.nodes()[id].op_as::<OptMatMul>() {
                for k in &op.mmm {
                    let name = MatMatMul::name(&**k).to_string();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names
    }

    /// The operators of the optimised plan, `name: details` per node, in
    /// execution order — what actually runs (e.g. which matrix kernels).
    pub fn plan_ops(&self) -> Vec<String> {
        let model = self.plan.model();
        model
            .eval_order()
            .unwrap_or_default()
            .into_iter()
            .map(|id| {
                let node = &model.nodes()[id];
                let info = node.op().info().unwrap_or_default().join("; ");
                if info.is_empty() {
                    node.op().name().to_string()
                } else {
                    format!("{}: {info}", node.op().name())
                }
            })
            .collect()
    }
}
