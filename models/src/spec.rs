//! Model specifications and their flat parameter layout.
//!
//! A [`ModelSpec`] names an architecture and its shape; it is what a task, a
//! plan sent to an agent and an exported artifact carry. From it follow:
//!
//! - [`ModelSpec::layers`]: the layer list that both the network and the
//!   layout are built from (the one place the architecture is written down);
//! - [`ModelSpec::layout`]: the flat parameter layout, with a
//!   [`LayoutFingerprint`] that updates from different agents are checked
//!   against before they are added together;
//! - [`ModelSpec::init_params`]: deterministic initial parameters.
//!
//! # Flat layout
//!
//! Parameters are concatenated layer by layer, in forward order, each layer's
//! weight before its bias, each tensor row-major:
//!
//! | tensor | name | shape |
//! | --- | --- | --- |
//! | convolution `i` weight | `conv{i}.weight` | `[out_channels, in_channels, k, k]` |
//! | convolution `i` bias | `conv{i}.bias` | `[out_channels]` |
//! | dense layer `i` weight | `dense{i}.weight` | `[inputs, outputs]` (so `y = x·W + b`) |
//! | dense layer `i` bias | `dense{i}.bias` | `[outputs]` |
//!
//! Note that dense weights are stored input-major, the transpose of
//! PyTorch's `nn.Linear.weight`. The fingerprint is the SHA-256 of the list
//! of names and shapes, so any change of architecture, shape or order gives
//! another fingerprint.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// An architecture and its shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSpec {
    /// Multinomial logistic regression: one dense layer.
    LogReg {
        /// Features per example.
        inputs: usize,
        /// Classes.
        classes: usize,
    },
    /// A multilayer perceptron with ReLU; McMahan et al.'s "2NN" is
    /// `hidden = [200, 200]` on 784 inputs.
    Mlp {
        /// Features per example.
        inputs: usize,
        /// Width of each hidden layer.
        hidden: Vec<usize>,
        /// Classes.
        classes: usize,
    },
    /// The CNN of McMahan et al. (2017): two 5×5 convolutions of 32 and 64
    /// channels ("same" padding), each followed by ReLU and 2×2 max-pooling,
    /// then a 512-unit dense layer with ReLU and the output layer.
    Cnn {
        /// Input channels.
        channels: usize,
        /// Input height (a multiple of 4).
        height: usize,
        /// Input width (a multiple of 4).
        width: usize,
        /// Classes.
        classes: usize,
    },
}

/// One layer with parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerSpec {
    /// A square convolution with "same" padding, followed by ReLU and 2×2 max-pooling.
    Conv {
        /// Input channels.
        inputs: usize,
        /// Output channels.
        outputs: usize,
        /// Kernel side.
        kernel: usize,
    },
    /// A dense layer; ReLU follows all but the last.
    Dense {
        /// Inputs.
        inputs: usize,
        /// Outputs.
        outputs: usize,
    },
}

impl LayerSpec {
    /// Fan-in, used for initialisation.
    pub fn fan_in(&self) -> usize {
        match *self {
            LayerSpec::Conv { inputs, kernel, .. } => inputs * kernel * kernel,
            LayerSpec::Dense { inputs, .. } => inputs,
        }
    }

    /// Shapes of the weight and of the bias.
    pub fn shapes(&self) -> (Vec<usize>, Vec<usize>) {
        match *self {
            LayerSpec::Conv {
                inputs,
                outputs,
                kernel,
            } => (vec![outputs, inputs, kernel, kernel], vec![outputs]),
            LayerSpec::Dense { inputs, outputs } => (vec![inputs, outputs], vec![outputs]),
        }
    }
}

/// Kernel side of the CNN's convolutions.
pub const CNN_KERNEL: usize = 5;
/// Channels of the CNN's two convolutions.
pub const CNN_CHANNELS: [usize; 2] = [32, 64];
/// Width of the CNN's dense hidden layer.
pub const CNN_HIDDEN: usize = 512;

/// The architectures by name, as fleet files and command lines write them
/// (`logreg`, `2nn`, `cnn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Multinomial logistic regression.
    Logreg,
    /// McMahan et al.'s 2NN: two hidden layers of 200 with ReLU.
    #[serde(rename = "2nn")]
    TwoNn,
    /// McMahan et al.'s CNN on 1×28×28 images.
    Cnn,
}

impl ModelKind {
    /// Every kind, in order.
    pub const ALL: [ModelKind; 3] = [ModelKind::Logreg, ModelKind::TwoNn, ModelKind::Cnn];
    /// Every name, in the order of [`ModelKind::ALL`].
    pub const NAMES: [&'static str; 3] = ["logreg", "2nn", "cnn"];

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Logreg => Self::NAMES[0],
            ModelKind::TwoNn => Self::NAMES[1],
            ModelKind::Cnn => Self::NAMES[2],
        }
    }

    /// The architecture for `inputs` features and `classes` classes. The
    /// CNN takes 1×28×28 images whatever `inputs` is; a data set of
    /// another shape must be refused before (see [`ModelSpec::image_shape`]).
    pub fn spec(self, inputs: usize, classes: usize) -> ModelSpec {
        match self {
            ModelKind::Logreg => ModelSpec::LogReg { inputs, classes },
            ModelKind::TwoNn => ModelSpec::Mlp {
                inputs,
                hidden: vec![200, 200],
                classes,
            },
            ModelKind::Cnn => ModelSpec::Cnn {
                channels: 1,
                height: 28,
                width: 28,
                classes,
            },
        }
    }

    /// The architecture for Fashion-MNIST (784 inputs, 10 classes).
    pub fn fashion(self) -> ModelSpec {
        self.spec(784, 10)
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_name("model", s, &Self::ALL, |k| k.as_str())
    }
}

/// The one of `all` whose `name` is `s`, or an error naming the `what`
/// and listing every name: how every named choice of fleet files and
/// command lines (models, codecs, strategies) is parsed.
pub fn parse_name<T: Copy>(
    what: &str,
    s: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> std::result::Result<T, String> {
    all.iter().copied().find(|&k| name(k) == s).ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|&k| name(k)).collect();
        format!("unknown {what} {s:?}; expected one of {}", names.join(", "))
    })
}

impl ModelSpec {
    /// Logistic regression on 28×28 images, 10 classes.
    pub fn fashion_logreg() -> Self {
        ModelSpec::LogReg {
            inputs: 784,
            classes: 10,
        }
    }

    /// McMahan et al.'s 2NN (784-200-200-10).
    pub fn fashion_2nn() -> Self {
        ModelSpec::Mlp {
            inputs: 784,
            hidden: vec![200, 200],
            classes: 10,
        }
    }

    /// McMahan et al.'s CNN on 1×28×28 images, 10 classes.
    pub fn fashion_cnn() -> Self {
        ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        }
    }

    /// A short name for tables and file names: `logreg`, `2nn`, `mlp-…`, `cnn`.
    pub fn name(&self) -> String {
        match self {
            ModelSpec::LogReg { .. } => "logreg".into(),
            ModelSpec::Mlp { hidden, .. } if hidden == &[200, 200] => "2nn".into(),
            ModelSpec::Mlp { hidden, .. } => {
                let h: Vec<String> = hidden.iter().map(ToString::to_string).collect();
                format!("mlp-{}", h.join("-"))
            }
            ModelSpec::Cnn { .. } => "cnn".into(),
        }
    }

    /// Features per example the model reads.
    pub fn inputs(&self) -> usize {
        match *self {
            ModelSpec::LogReg { inputs, .. } | ModelSpec::Mlp { inputs, .. } => inputs,
            ModelSpec::Cnn {
                channels,
                height,
                width,
                ..
            } => channels * height * width,
        }
    }

    /// `[channels, height, width]` of the image a convolutional model reads
    /// its flat input as (row-major, channel first); `None` for models that
    /// read a plain feature vector.
    pub fn image_shape(&self) -> Option<[usize; 3]> {
        match *self {
            ModelSpec::Cnn {
                channels,
                height,
                width,
                ..
            } => Some([channels, height, width]),
            ModelSpec::LogReg { .. } | ModelSpec::Mlp { .. } => None,
        }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        match *self {
            ModelSpec::LogReg { classes, .. }
            | ModelSpec::Mlp { classes, .. }
            | ModelSpec::Cnn { classes, .. } => classes,
        }
    }

    /// Checks that every size is usable.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidConfig {
                field: "model",
                reason,
            })
        };
        if self.inputs() == 0 || self.classes() < 2 {
            return bad(format!("{self:?}: need at least one input and two classes"));
        }
        match self {
            ModelSpec::Mlp { hidden, .. } if hidden.contains(&0) => {
                bad(format!("{self:?}: hidden widths must be > 0"))
            }
            ModelSpec::Cnn { height, width, .. } if height % 4 != 0 || width % 4 != 0 => {
                bad(format!(
                    "{self:?}: the CNN pools twice by 2, so height and width must be multiples of 4"
                ))
            }
            _ => Ok(()),
        }
    }

    /// The layers with parameters, in forward order.
    pub fn layers(&self) -> Vec<LayerSpec> {
        match self {
            ModelSpec::LogReg { inputs, classes } => vec![LayerSpec::Dense {
                inputs: *inputs,
                outputs: *classes,
            }],
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => {
                let widths: Vec<usize> = std::iter::once(*inputs)
                    .chain(hidden.iter().copied())
                    .chain([*classes])
                    .collect();
                widths
                    .windows(2)
                    .map(|w| LayerSpec::Dense {
                        inputs: w[0],
                        outputs: w[1],
                    })
                    .collect()
            }
            ModelSpec::Cnn {
                channels,
                height,
                width,
                classes,
            } => {
                let flat = CNN_CHANNELS[1] * (height / 4) * (width / 4);
                vec![
                    LayerSpec::Conv {
                        inputs: *channels,
                        outputs: CNN_CHANNELS[0],
                        kernel: CNN_KERNEL,
                    },
                    LayerSpec::Conv {
                        inputs: CNN_CHANNELS[0],
                        outputs: CNN_CHANNELS[1],
                        kernel: CNN_KERNEL,
                    },
                    LayerSpec::Dense {
                        inputs: flat,
                        outputs: CNN_HIDDEN,
                    },
                    LayerSpec::Dense {
                        inputs: CNN_HIDDEN,
                        outputs: *classes,
                    },
                ]
            }
        }
    }

    /// Values one example's forward pass holds (its input, every layer's
    /// output, and for the CNN each convolution's output before pooling).
    pub fn activations_per_example(&self) -> u64 {
        let n = |v: usize| v as u64;
        match self {
            ModelSpec::LogReg { inputs, classes } => n(*inputs) + n(*classes),
            ModelSpec::Mlp {
                inputs,
                hidden,
                classes,
            } => n(*inputs) + hidden.iter().map(|&h| n(h)).sum::<u64>() + n(*classes),
            ModelSpec::Cnn {
                channels,
                height,
                width,
                classes,
            } => {
                let px = n(*height) * n(*width);
                n(*channels) * px
                    + 32 * px
                    + 32 * px / 4
                    + 64 * px / 4
                    + 64 * px / 16
                    + 512
                    + n(*classes)
            }
        }
    }

    /// A generous estimate of the memory (bytes) local training of this
    /// model takes with batches of `batch`: the parameters five times over
    /// (the global model, the local weights, their gradients, the
    /// optimiser's momentum and the update) and one batch's activations
    /// three times over (values, gradients and the backend's temporaries),
    /// in f32. The coordinator does not send a plan to a device that says
    /// it has less (`Capabilities::memory_mib`).
    pub fn training_memory_bytes(&self, batch: usize) -> u64 {
        let params = self.layout().total as u64;
        let activations = self.activations_per_example().saturating_mul(batch as u64);
        params
            .saturating_mul(5 * 4)
            .saturating_add(activations.saturating_mul(3 * 4))
    }

    /// The flat parameter layout.
    pub fn layout(&self) -> ParamLayout {
        let mut entries = Vec::new();
        let mut offset = 0;
        let (mut conv, mut dense) = (0, 0);
        for layer in self.layers() {
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
            let (w, b) = layer.shapes();
            for (suffix, shape) in [("weight", w), ("bias", b)] {
                let len = shape.iter().product();
                entries.push(ParamEntry {
                    name: format!("{prefix}.{suffix}"),
                    shape,
                    offset,
                    len,
                });
                offset += len;
            }
        }
        ParamLayout {
            entries,
            total: offset,
        }
    }

    /// Initial parameters, deterministic in `seed`: every weight and bias of a
    /// layer with fan-in `f` is drawn from `U(-1/√f, 1/√f)`, PyTorch's default
    /// for `nn.Linear` and `nn.Conv2d`.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(self.layout().total);
        for layer in self.layers() {
            let bound = 1.0 / (layer.fan_in() as f32).sqrt();
            let (w, b) = layer.shapes();
            let n = w.iter().product::<usize>() + b.iter().product::<usize>();
            out.extend((0..n).map(|_| rng.random_range(-bound..bound)));
        }
        out
    }
}

/// Where one tensor lives in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamEntry {
    /// Dotted name, e.g. `dense0.weight`.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// First index in the flat vector.
    pub offset: usize,
    /// Number of values.
    pub len: usize,
}

/// The layout of a model's flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    /// Tensors in order.
    pub entries: Vec<ParamEntry>,
    /// Total number of values.
    pub total: usize,
}

/// SHA-256 of a layout's names and shapes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayoutFingerprint(pub [u8; 32]);

impl fmt::Display for LayoutFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for LayoutFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LayoutFingerprint({self})")
    }
}

impl ParamLayout {
    /// The fingerprint: SHA-256 over `fleet-layout-v1` and one `name:d0xd1x…`
    /// line per tensor.
    pub fn fingerprint(&self) -> LayoutFingerprint {
        let mut h = Sha256::new();
        h.update(b"fleet-layout-v1\n");
        for e in &self.entries {
            let dims: Vec<String> = e.shape.iter().map(ToString::to_string).collect();
            h.update(format!("{}:{}\n", e.name, dims.join("x")).as_bytes());
        }
        LayoutFingerprint(h.finalize().into())
    }

    /// Checks a flat vector against this layout: length and finiteness.
    pub fn check(&self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.total {
            return Err(Error::FlatLength {
                expected: self.total,
                found: flat.len(),
                fingerprint: self.fingerprint().to_string(),
            });
        }
        if let Some(index) = flat.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "flat parameters",
                index,
            });
        }
        Ok(())
    }

    /// Checks that a vector announced with `fingerprint` fits this layout.
    pub fn check_tagged(&self, fingerprint: &LayoutFingerprint, flat: &[f32]) -> Result<()> {
        let ours = self.fingerprint();
        if &ours != fingerprint {
            return Err(Error::LayoutMismatch {
                expected: ours.to_string(),
                found: fingerprint.to_string(),
            });
        }
        self.check(flat)
    }

    /// The slice of `flat` holding entry `name`.
    pub fn slice<'a>(&self, flat: &'a [f32], name: &str) -> Option<&'a [f32]> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| &flat[e.offset..e.offset + e.len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_memory_counts_parameters_and_a_batch_of_activations() {
        // 2NN: 199,210 parameters; 784 + 200 + 200 + 10 activations.
        let m = ModelSpec::fashion_2nn();
        assert_eq!(m.activations_per_example(), 1194);
        assert_eq!(m.training_memory_bytes(32), 199_210 * 20 + 32 * 1194 * 12);
        // The CNN on 28×28: 784 + 32·784 + 32·196 + 64·196 + 64·49 + 512 + 10.
        let cnn = ModelSpec::Cnn {
            channels: 1,
            height: 28,
            width: 28,
            classes: 10,
        };
        assert_eq!(
            cnn.activations_per_example(),
            784 + 32 * 784 + 32 * 196 + 64 * 196 + 64 * 49 + 512 + 10
        );
        assert!(cnn.training_memory_bytes(usize::MAX) == u64::MAX);
    }

    #[test]
    fn model_names_are_one_list_for_files_and_command_lines() {
        for (kind, name) in ModelKind::ALL.into_iter().zip(ModelKind::NAMES) {
            assert_eq!(kind.as_str(), name);
            assert_eq!(name.parse::<ModelKind>(), Ok(kind));
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("{name:?}"));
        }
        assert!("2NN".parse::<ModelKind>().is_err());
        assert_eq!(ModelKind::TwoNn.fashion(), ModelSpec::fashion_2nn());
        assert_eq!(ModelKind::Logreg.fashion(), ModelSpec::fashion_logreg());
        assert_eq!(ModelKind::Cnn.fashion(), ModelSpec::fashion_cnn());
    }

    #[test]
    fn parameter_counts_match_the_papers() {
        // McMahan et al. report 199,210 parameters for the 2NN and 1,663,370 for the CNN.
        assert_eq!(ModelSpec::fashion_2nn().layout().total, 199_210);
        assert_eq!(ModelSpec::fashion_cnn().layout().total, 1_663_370);
        assert_eq!(ModelSpec::fashion_logreg().layout().total, 7_850);
    }

    #[test]
    fn layout_is_contiguous_and_named() {
        let l = ModelSpec::fashion_cnn().layout();
        let names: Vec<&str> = l.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv0.weight",
                "conv0.bias",
                "conv1.weight",
                "conv1.bias",
                "dense0.weight",
                "dense0.bias",
                "dense1.weight",
                "dense1.bias"
            ]
        );
        let mut next = 0;
        for e in &l.entries {
            assert_eq!(e.offset, next);
            next += e.len;
        }
        assert_eq!(next, l.total);
        assert_eq!(l.entries[4].shape, vec![3136, 512]);
    }

    #[test]
    fn fingerprints_separate_architectures() {
        let a = ModelSpec::fashion_2nn().layout().fingerprint();
        assert_eq!(a, ModelSpec::fashion_2nn().layout().fingerprint());
        let b = ModelSpec::Mlp {
            inputs: 784,
            hidden: vec![200, 201],
            classes: 10,
        }
        .layout()
        .fingerprint();
        assert_ne!(a, b);
        assert_ne!(a, ModelSpec::fashion_cnn().layout().fingerprint());
    }

    #[test]
    fn checks_reject_wrong_vectors() {
        let l = ModelSpec::fashion_logreg().layout();
        let good = ModelSpec::fashion_logreg().init_params(1);
        l.check(&good).unwrap();
        assert!(matches!(
            l.check(&good[1..]),
            Err(Error::FlatLength {
                expected: 7850,
                found: 7849,
                ..
            })
        ));
        let mut nan = good.clone();
        nan[17] = f32::NAN;
        assert!(matches!(
            l.check(&nan),
            Err(Error::NonFinite { index: 17, .. })
        ));
        let other = ModelSpec::fashion_2nn().layout().fingerprint();
        assert!(matches!(
            l.check_tagged(&other, &good),
            Err(Error::LayoutMismatch { .. })
        ));
        l.check_tagged(&l.fingerprint(), &good).unwrap();
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let s = ModelSpec::fashion_2nn();
        let a = s.init_params(3);
        assert_eq!(a, s.init_params(3));
        assert_ne!(a, s.init_params(4));
        let bound = 1.0 / 784f32.sqrt();
        assert!(a[..784 * 200].iter().all(|v| v.abs() <= bound));
    }

    #[test]
    fn invalid_specs_are_rejected() {
        assert!(
            ModelSpec::Cnn {
                channels: 1,
                height: 30,
                width: 28,
                classes: 10
            }
            .validate()
            .is_err()
        );
        assert!(
            ModelSpec::Mlp {
                inputs: 4,
                hidden: vec![0],
                classes: 2
            }
            .validate()
            .is_err()
        );
        assert!(
            ModelSpec::LogReg {
                inputs: 4,
                classes: 1
            }
            .validate()
            .is_err()
        );
        ModelSpec::fashion_cnn().validate().unwrap();
    }

    #[test]
    fn spec_round_trips_through_json() {
        let s = ModelSpec::fashion_2nn();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(
            j,
            r#"{"mlp":{"inputs":784,"hidden":[200,200],"classes":10}}"#
        );
        assert_eq!(serde_json::from_str::<ModelSpec>(&j).unwrap(), s);
    }
}
