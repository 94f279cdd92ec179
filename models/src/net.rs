//! The networks, as burn modules built from a [`ModelSpec`] and a flat vector.
//!
//! A [`Network`] is a stack of convolutions (each with ReLU and 2×2
//! max-pooling) followed by a stack of dense layers (ReLU between them).
//! Logistic regression, the 2NN and the CNN are all instances, so one type,
//! one forward pass and one flat conversion serve every architecture.
//! Parameters enter and leave only through flat vectors in the layout of
//! [`ModelSpec::layout`].

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::Result;
use crate::spec::{LayerSpec, ModelSpec};

/// A network of the family described in the module docs.
#[derive(Module, Debug)]
pub struct Network {
    convs: Vec<Conv2d>,
    dense: Vec<Linear>,
    pool: MaxPool2d,
    /// `[channels, height, width]` of the input when there are convolutions.
    image: [usize; 3],
}

fn tensor<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn param<const D: usize>(values: &[f32], shape: [usize; D], device: &Device) -> Param<Tensor<D>> {
    Param::from_tensor(tensor(values, shape, device))
}

fn values<const D: usize>(p: &Param<Tensor<D>>) -> Vec<f32> {
    p.val()
        .into_data()
        .try_into_vec::<f32>()
        .expect("parameters are f32 tensors")
}

impl Network {
    /// Builds the network of `spec` holding the parameters `flat` on `device`.
    ///
    /// `flat` is checked against the layout (length, finiteness) first.
    pub fn from_flat(spec: &ModelSpec, flat: &[f32], device: &Device) -> Result<Self> {
        spec.validate()?;
        let layout = spec.layout();
        layout.check(flat)?;
        let mut convs = Vec::new();
        let mut dense = Vec::new();
        let mut at = 0;
        let mut take = |n: usize| {
            let s = &flat[at..at + n];
            at += n;
            s
        };
        for layer in spec.layers() {
            match layer {
                LayerSpec::Conv {
                    inputs,
                    outputs,
                    kernel,
                } => convs.push(Conv2d {
                    weight: param(
                        take(outputs * inputs * kernel * kernel),
                        [outputs, inputs, kernel, kernel],
                        device,
                    ),
                    bias: Some(param(take(outputs), [outputs], device)),
                    stride: [1, 1],
                    kernel_size: [kernel, kernel],
                    dilation: [1, 1],
                    groups: 1,
                    padding: PaddingConfig2d::Explicit(
                        kernel / 2,
                        kernel / 2,
                        kernel / 2,
                        kernel / 2,
                    ),
                }),
                LayerSpec::Dense { inputs, outputs } => dense.push(Linear {
                    weight: param(take(inputs * outputs), [inputs, outputs], device),
                    bias: Some(param(take(outputs), [outputs], device)),
                }),
            }
        }
        let image = spec.image_shape().unwrap_or([0, 0, 0]);
        Ok(Self {
            convs,
            dense,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            image,
        })
    }

    /// The parameters as one flat vector, in layout order.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut out = Vec::new();
        for c in &self.convs {
            out.extend(values(&c.weight));
            out.extend(values(
                c.bias.as_ref().expect("layers are built with a bias"),
            ));
        }
        for d in &self.dense {
            out.extend(values(&d.weight));
            out.extend(values(
                d.bias.as_ref().expect("layers are built with a bias"),
            ));
        }
        out
    }

    /// Logits `[n, classes]` for a batch `[n, inputs]`.
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [n, _] = x.dims();
        let mut x = x;
        if !self.convs.is_empty() {
            let [c, h, w] = self.image;
            let mut img: Tensor<4> = x.reshape([n, c, h, w]);
            for conv in &self.convs {
                img = self.pool.forward(relu(conv.forward(img)));
            }
            let [_, c, h, w] = img.dims();
            x = img.reshape([n, c * h * w]);
        }
        let last = self.dense.len() - 1;
        for (i, layer) in self.dense.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                x = relu(x);
            }
        }
        x
    }

    /// The gradient of every parameter in `grads`, in flat layout order
    /// (zeros for a parameter the loss does not depend on).
    pub fn flat_gradient(&self, grads: &mut GradientsParams) -> Vec<f32> {
        fn take<const D: usize>(
            p: &Param<Tensor<D>>,
            grads: &mut GradientsParams,
            out: &mut Vec<f32>,
        ) {
            match grads.remove::<D>(p.id) {
                Some(g) => out.extend(g.into_data().try_into_vec::<f32>().expect("f32 gradient")),
                None => out.extend(std::iter::repeat_n(0.0, p.shape().num_elements())),
            }
        }
        let mut out = Vec::new();
        for c in &self.convs {
            take(&c.weight, grads, &mut out);
            take(
                c.bias.as_ref().expect("layers are built with a bias"),
                grads,
                &mut out,
            );
        }
        for d in &self.dense {
            take(&d.weight, grads, &mut out);
            take(
                d.bias.as_ref().expect("layers are built with a bias"),
                grads,
                &mut out,
            );
        }
        out
    }

    /// Squared L2 distance between this network's parameters and `other`'s,
    /// as a scalar tensor that carries gradients (FedProx's proximal term).
    pub fn squared_distance(&self, other: &Network) -> Tensor<1> {
        fn sq<const D: usize>(a: &Param<Tensor<D>>, b: &Param<Tensor<D>>) -> Tensor<1> {
            (a.val() - b.val()).powf_scalar(2.0).sum()
        }
        let mut terms = Vec::new();
        for (a, b) in self.convs.iter().zip(&other.convs) {
            terms.push(sq(&a.weight, &b.weight));
            terms.push(sq(a.bias.as_ref().unwrap(), b.bias.as_ref().unwrap()));
        }
        for (a, b) in self.dense.iter().zip(&other.dense) {
            terms.push(sq(&a.weight, &b.weight));
            terms.push(sq(a.bias.as_ref().unwrap(), b.bias.as_ref().unwrap()));
        }
        Tensor::cat(terms, 0).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;

    #[test]
    fn flat_round_trip_is_exact_for_every_architecture_and_backend() {
        for &backend in Backend::ALL {
            let device = backend.device();
            for spec in [
                ModelSpec::fashion_logreg(),
                ModelSpec::fashion_2nn(),
                ModelSpec::fashion_cnn(),
            ] {
                let flat = spec.init_params(11);
                let net = Network::from_flat(&spec, &flat, &device).unwrap();
                let back = net.to_flat();
                assert_eq!(back.len(), flat.len());
                assert!(
                    back.iter()
                        .zip(&flat)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} on {backend}",
                    spec.name()
                );
            }
        }
    }

    #[test]
    fn wrong_flat_vectors_are_errors_not_panics() {
        let spec = ModelSpec::fashion_2nn();
        let device = Backend::DEFAULT.device();
        let flat = spec.init_params(1);
        assert!(Network::from_flat(&spec, &flat[..100], &device).is_err());
        let mut long = flat.clone();
        long.push(0.0);
        assert!(Network::from_flat(&spec, &long, &device).is_err());
        let mut inf = flat;
        inf[5] = f32::INFINITY;
        assert!(Network::from_flat(&spec, &inf, &device).is_err());
    }

    #[test]
    fn forward_matches_a_direct_computation() {
        // A 3-2-2 MLP by hand.
        let spec = ModelSpec::Mlp {
            inputs: 3,
            hidden: vec![2],
            classes: 2,
        };
        let flat: Vec<f32> = vec![
            0.1, -0.2, 0.3, 0.4, -0.5, 0.6, // dense0.weight [3, 2]
            0.01, -0.02, // dense0.bias
            1.0, -1.0, 0.5, 2.0, // dense1.weight [2, 2]
            0.1, 0.2, // dense1.bias
        ];
        let device = Backend::DEFAULT.device();
        let net = Network::from_flat(&spec, &flat, &device).unwrap();
        let x = [1.0f32, 2.0, -1.0];
        let out = net
            .forward(tensor(&x, [1, 3], &device))
            .into_data()
            .try_into_vec::<f32>()
            .unwrap();
        let h: Vec<f32> = (0..2)
            .map(|j| (flat[6 + j] + (0..3).map(|i| x[i] * flat[i * 2 + j]).sum::<f32>()).max(0.0))
            .collect();
        let y: Vec<f32> = (0..2)
            .map(|j| flat[12 + j] + (0..2).map(|i| h[i] * flat[8 + i * 2 + j]).sum::<f32>())
            .collect();
        for (a, b) in out.iter().zip(&y) {
            assert!((a - b).abs() < 1e-6, "{out:?} vs {y:?}");
        }
    }
}
