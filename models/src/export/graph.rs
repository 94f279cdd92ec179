//! ONNX graphs of the float and int8 networks.
//!
//! Every graph reads `input` (`[N, features]`, float, normalised as the
//! training data) and writes `logits` (`[N, classes]`, float).
//!
//! Float: `Reshape → (Conv → Relu → MaxPool)* → Flatten` for the CNN, then
//! `Gemm (→ Relu)` per dense layer.
//!
//! Int8 (QOperator form, integer kernels for every layer with weights):
//!
//! ```text
//! input ─ [Reshape] ─ QuantizeLinear ─┬─ QLinearConv ─ MaxPool ─ … ─ Flatten ─┐  (CNN)
//!                                     └────────────────────────────────────────┤  (MLP)
//!   per dense layer: MatMulInteger ─ Cast ─ Mul(x_scale·w_scale) ─ Add(bias) ─ QuantizeLinear
//!   last dense layer: … ─ Add(bias) ─ logits
//! ```
//!
//! ReLU is never a node in the int8 graph: each ReLU output is quantized with
//! zero point 0, so saturation at level 0 is the ReLU. `QLinearConv` has an
//! int32 bias input; `QLinearMatMul` has none, so dense layers use
//! `MatMulInteger` (uint8 × int8 → int32) and apply scale and bias in float
//! on the `[N, outputs]` result. Dense layers with more than
//! [`MAX_BLOCK_WEIGHTS`] weights are split into column blocks (see there).

use super::proto::{Attr, DataType, Dim, Model, Node, Tensor, ValueInfo};
use super::quant::{ActQuant, quantize_bias, quantize_weights};
use crate::spec::{LayerSpec, ModelSpec};

/// Name of the graph input.
pub const INPUT: &str = "input";
/// Name of the graph output.
pub const OUTPUT: &str = "logits";
/// Name of the batch dimension.
pub const BATCH: &str = "N";

#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    inits: Vec<Tensor>,
}

impl Builder {
    fn node(
        &mut self,
        op_type: &'static str,
        name: &str,
        inputs: &[&str],
        attrs: Vec<Attr>,
    ) -> String {
        let out = format!("{name}.out");
        self.nodes.push(Node {
            op_type,
            name: name.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.clone()],
            attrs,
        });
        out
    }

    /// Renames the output of the last node.
    fn rename_last(&mut self, to: &str) {
        if let Some(n) = self.nodes.last_mut() {
            n.outputs = vec![to.into()];
        }
    }

    fn init(&mut self, t: Tensor) -> String {
        let name = t.name.clone();
        self.inits.push(t);
        name
    }

    fn finish(self, spec: &ModelSpec) -> (Vec<Node>, Vec<Tensor>, Vec<ValueInfo>, Vec<ValueInfo>) {
        let io = |name: &str, width: usize| ValueInfo {
            name: name.into(),
            data_type: DataType::Float,
            dims: vec![Dim::Symbol(BATCH), Dim::Fixed(width)],
        };
        (
            self.nodes,
            self.inits,
            vec![io(INPUT, spec.inputs())],
            vec![io(OUTPUT, spec.classes())],
        )
    }

    /// `Reshape` of the flat input to NCHW, for the CNN; the input otherwise.
    fn image_input(&mut self, spec: &ModelSpec) -> String {
        match spec.image_shape() {
            Some([channels, height, width]) => {
                let shape = self.init(Tensor::i64(
                    "image_shape",
                    &[4],
                    &[-1, channels as i64, height as i64, width as i64],
                ));
                self.node("Reshape", "to_image", &[INPUT, &shape], vec![])
            }
            None => INPUT.into(),
        }
    }
}

fn conv_attrs(kernel: usize) -> Vec<Attr> {
    let p = (kernel / 2) as i64;
    vec![
        Attr::Ints("kernel_shape", vec![kernel as i64, kernel as i64]),
        Attr::Ints("pads", vec![p, p, p, p]),
        Attr::Ints("strides", vec![1, 1]),
    ]
}

fn pool_attrs() -> Vec<Attr> {
    vec![
        Attr::Ints("kernel_shape", vec![2, 2]),
        Attr::Ints("strides", vec![2, 2]),
    ]
}

/// Walks the layers with their flat parameter slices and prefixes.
fn layers_with_params<'a>(
    spec: &ModelSpec,
    params: &'a [f32],
) -> Vec<(String, LayerSpec, &'a [f32], &'a [f32])> {
    let layout = spec.layout();
    let (mut conv, mut dense) = (0, 0);
    spec.layers()
        .into_iter()
        .map(|layer| {
            let prefix = match layer {
                LayerSpec::Conv { .. } => {
                    conv += 1;
                    format!("conv{}", conv - 1)
                }
                LayerSpec::Dense { .. } => {
                    dense += 1;
                    format!("dense{}", dense - 1)
                }
            };
            let w = layout
                .slice(params, &format!("{prefix}.weight"))
                .expect("layout names every layer's weight");
            let b = layout
                .slice(params, &format!("{prefix}.bias"))
                .expect("layout names every layer's bias");
            (prefix, layer, w, b)
        })
        .collect()
}

/// The float graph. `params` has been checked against the layout.
pub fn float_graph(spec: &ModelSpec, params: &[f32]) -> Model {
    let mut g = Builder::default();
    let mut x = g.image_input(spec);
    let layers = layers_with_params(spec, params);
    let last = layers.len() - 1;
    let mut flattened = !matches!(spec, ModelSpec::Cnn { .. });
    for (i, (prefix, layer, w, b)) in layers.into_iter().enumerate() {
        let (ws, bs) = layer.shapes();
        let wn = g.init(Tensor::f32(&format!("{prefix}.weight"), &ws, w));
        let bn = g.init(Tensor::f32(&format!("{prefix}.bias"), &bs, b));
        match layer {
            LayerSpec::Conv { kernel, .. } => {
                let y = g.node("Conv", &prefix, &[&x, &wn, &bn], conv_attrs(kernel));
                let y = g.node("Relu", &format!("{prefix}.relu"), &[&y], vec![]);
                x = g.node("MaxPool", &format!("{prefix}.pool"), &[&y], pool_attrs());
            }
            LayerSpec::Dense { .. } => {
                if !flattened {
                    x = g.node("Flatten", "flatten", &[&x], vec![Attr::Int("axis", 1)]);
                    flattened = true;
                }
                x = g.node("Gemm", &prefix, &[&x, &wn, &bn], vec![]);
                if i < last {
                    x = g.node("Relu", &format!("{prefix}.relu"), &[&x], vec![]);
                }
            }
        }
    }
    g.rename_last(OUTPUT);
    model(spec, g)
}

/// The int8 graph. `acts[i]` quantizes the input of layer `i`.
pub fn int8_graph(spec: &ModelSpec, params: &[f32], acts: &[ActQuant]) -> Model {
    let mut g = Builder::default();
    let x = g.image_input(spec);
    let scalar_f = |g: &mut Builder, name: String, v: f32| g.init(Tensor::f32(&name, &[], &[v]));
    let scalar_u8 = |g: &mut Builder, name: String, v: u8| g.init(Tensor::u8(&name, &[], &[v]));
    let s0 = scalar_f(&mut g, "act0.scale".into(), acts[0].scale);
    let z0 = scalar_u8(&mut g, "act0.zero_point".into(), acts[0].zero_point);
    let mut q = g.node("QuantizeLinear", "quantize_input", &[&x, &s0, &z0], vec![]);
    let layers = layers_with_params(spec, params);
    let last = layers.len() - 1;
    let mut flattened = !matches!(spec, ModelSpec::Cnn { .. });
    for (i, (prefix, layer, w, b)) in layers.into_iter().enumerate() {
        let (ws, _) = layer.shapes();
        let (xs, xz) = (format!("act{i}.scale"), format!("act{i}.zero_point"));
        match layer {
            LayerSpec::Conv {
                inputs,
                outputs,
                kernel,
            } => {
                let per = inputs * kernel * kernel;
                let wq = quantize_weights(w, outputs, |j| j / per);
                let bq = quantize_bias(b, acts[i].scale, &wq.scales);
                let wn = g.init(Tensor::i8(&format!("{prefix}.weight_q"), &ws, &wq.values));
                let wsn = g.init(Tensor::f32(
                    &format!("{prefix}.weight_scale"),
                    &[outputs],
                    &wq.scales,
                ));
                let wzn = g.init(Tensor::i8(
                    &format!("{prefix}.weight_zero_point"),
                    &[],
                    &[0],
                ));
                let bn = g.init(Tensor::i32(&format!("{prefix}.bias_q"), &[outputs], &bq));
                let ys = scalar_f(&mut g, format!("act{}.scale", i + 1), acts[i + 1].scale);
                let yz = scalar_u8(
                    &mut g,
                    format!("act{}.zero_point", i + 1),
                    acts[i + 1].zero_point,
                );
                let y = g.node(
                    "QLinearConv",
                    &prefix,
                    &[&q, &xs, &xz, &wn, &wsn, &wzn, &ys, &yz, &bn],
                    conv_attrs(kernel),
                );
                q = g.node("MaxPool", &format!("{prefix}.pool"), &[&y], pool_attrs());
            }
            LayerSpec::Dense { inputs: _, outputs } => {
                if !flattened {
                    q = g.node("Flatten", "flatten", &[&q], vec![Attr::Int("axis", 1)]);
                    flattened = true;
                }
                let wq = quantize_weights(w, outputs, |j| j % outputs);
                let mult: Vec<f32> = wq.scales.iter().map(|s| s * acts[i].scale).collect();
                let mn = g.init(Tensor::f32(
                    &format!("{prefix}.output_scale"),
                    &[outputs],
                    &mult,
                ));
                let bn = g.init(Tensor::f32(&format!("{prefix}.bias"), &[outputs], b));
                let acc = dense_products(&mut g, &prefix, &q, &xz, &wq.values, ws[0], outputs);
                let accf = g.node(
                    "Cast",
                    &format!("{prefix}.cast"),
                    &[&acc],
                    vec![Attr::Int("to", DataType::Float as i64)],
                );
                let y = g.node("Mul", &format!("{prefix}.rescale"), &[&accf, &mn], vec![]);
                let y = g.node("Add", &format!("{prefix}.add_bias"), &[&y, &bn], vec![]);
                if i < last {
                    let ys = scalar_f(&mut g, format!("act{}.scale", i + 1), acts[i + 1].scale);
                    let yz = scalar_u8(
                        &mut g,
                        format!("act{}.zero_point", i + 1),
                        acts[i + 1].zero_point,
                    );
                    q = g.node(
                        "QuantizeLinear",
                        &format!("{prefix}.quantize"),
                        &[&y, &ys, &yz],
                        vec![],
                    );
                }
            }
        }
    }
    g.rename_last(OUTPUT);
    model(spec, g)
}

/// Largest int8 weight block of one `MatMulInteger`, in elements.
///
/// tract folds constant subgraphs only while their results stay within
/// 4 MiB (`CONST_FOLD_MEM_BUDGET`); the zero-point correction of an int8
/// product sums the weights as int32, 4 bytes per weight. A larger block
/// (the CNN's 3136×512 dense layer) leaves that sum to be recomputed on
/// every run, which measured 80% of a batch-1 prediction. Wider layers are
/// therefore split into column blocks whose int32 form fits the budget,
/// and their results concatenated; the arithmetic is unchanged.
pub const MAX_BLOCK_WEIGHTS: usize = (4 << 20) / 4;

/// `MatMulInteger` of the uint8 activations `q` (zero point `xz`) with the
/// int8 weights `[inputs, outputs]`, split into column blocks of at most
/// [`MAX_BLOCK_WEIGHTS`]; returns the int32 `[N, outputs]` result.
fn dense_products(
    g: &mut Builder,
    prefix: &str,
    q: &str,
    xz: &str,
    weights: &[i8],
    inputs: usize,
    outputs: usize,
) -> String {
    let blocks = (inputs * outputs).div_ceil(MAX_BLOCK_WEIGHTS).max(1);
    if blocks == 1 {
        let wn = g.init(Tensor::i8(
            &format!("{prefix}.weight_q"),
            &[inputs, outputs],
            weights,
        ));
        return g.node("MatMulInteger", prefix, &[q, &wn, xz], vec![]);
    }
    let width = outputs.div_ceil(blocks);
    let mut parts = Vec::new();
    for (b, start) in (0..outputs).step_by(width).enumerate() {
        let end = (start + width).min(outputs);
        let block: Vec<i8> = (0..inputs)
            .flat_map(|r| {
                weights[r * outputs + start..r * outputs + end]
                    .iter()
                    .copied()
            })
            .collect();
        let wn = g.init(Tensor::i8(
            &format!("{prefix}.weight_q.{b}"),
            &[inputs, end - start],
            &block,
        ));
        parts.push(g.node(
            "MatMulInteger",
            &format!("{prefix}.{b}"),
            &[q, &wn, xz],
            vec![],
        ));
    }
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    g.node(
        "Concat",
        &format!("{prefix}.concat"),
        &parts,
        vec![Attr::Int("axis", 1)],
    )
}

fn model(spec: &ModelSpec, g: Builder) -> Model {
    let (nodes, initializers, inputs, outputs) = g.finish(spec);
    Model {
        graph_name: spec.name(),
        nodes,
        initializers,
        inputs,
        outputs,
        metadata: vec![],
        model_version: 0,
        doc_string: String::new(),
    }
}
