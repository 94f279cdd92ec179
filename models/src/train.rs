//! Local training and evaluation.
//!
//! [`train_local`] is what an agent (or a simulated device) runs in a round:
//! start from the global parameters, run `epochs` passes of mini-batch SGD
//! (momentum, weight decay and FedProx's proximal term optional) over its own
//! examples, and return the new parameters with the number of examples and
//! the mean training loss. Everything is deterministic in
//! [`TrainConfig::seed`]: the batch order comes from a seeded ChaCha8 stream
//! and the backend computes on one thread in a fixed order.
//!
//! The loss is the mean cross-entropy of the softmax of the logits. With
//! FedProx's `μ > 0` the optimised objective is
//! `loss + μ/2 · ‖w − w_global‖²` (Li et al., 2020); the reported loss is
//! the cross-entropy alone, so runs with and without μ compare directly.

use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::data::DataRef;
use crate::error::{Error, Result};
use crate::net::Network;
use crate::spec::ModelSpec;

/// Hyper-parameters of local training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: usize,
    /// Examples per mini-batch (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// SGD learning rate.
    pub learning_rate: f64,
    /// Heavy-ball momentum in `[0, 1)`; 0 disables it.
    pub momentum: f64,
    /// L2 weight decay added to the gradient; 0 disables it.
    pub weight_decay: f64,
    /// FedProx's proximal coefficient μ; 0 disables it.
    pub prox_mu: f64,
    /// Seed of the batch order.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.05,
            momentum: 0.0,
            weight_decay: 0.0,
            prox_mu: 0.0,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// Checks every field, naming the first invalid one.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: String| Err(Error::InvalidConfig { field, reason });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("{} must be a finite number > 0", self.learning_rate),
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} must be in [0, 1)", self.momentum));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "weight_decay",
                format!("{} must be a finite number >= 0", self.weight_decay),
            );
        }
        if !(self.prox_mu.is_finite() && self.prox_mu >= 0.0) {
            return bad(
                "prox_mu",
                format!("{} must be a finite number >= 0", self.prox_mu),
            );
        }
        Ok(())
    }
}

/// What local training returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutput {
    /// The trained parameters, in the spec's flat layout.
    pub params: Vec<f32>,
    /// Local examples (the weight of this update in FedAvg).
    pub examples: usize,
    /// Optimiser steps taken.
    pub steps: usize,
    /// Mean cross-entropy over every example seen in every epoch.
    pub mean_loss: f32,
}

impl TrainOutput {
    /// The update `params − global`.
    pub fn delta(&self, global: &[f32]) -> Vec<f32> {
        self.params.iter().zip(global).map(|(p, g)| p - g).collect()
    }
}

/// Loss and accuracy of a model on some data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean cross-entropy.
    pub loss: f32,
    /// Share of examples whose top logit is the label.
    pub accuracy: f32,
    /// Examples evaluated.
    pub examples: usize,
}

fn check_data(spec: &ModelSpec, data: &DataRef<'_>) -> Result<()> {
    let ds = data.dataset();
    if ds.dim() != spec.inputs() {
        return Err(Error::ShapeMismatch {
            model: spec.name(),
            expected: spec.inputs(),
            found: ds.dim(),
        });
    }
    if ds.classes() > spec.classes() {
        return Err(Error::InvalidConfig {
            field: "classes",
            reason: format!(
                "data set has {} classes but model {} predicts {}",
                ds.classes(),
                spec.name(),
                spec.classes()
            ),
        });
    }
    Ok(())
}

/// A mini-batch assembled on the host, reused across steps to avoid allocation.
struct Batch {
    x: Vec<f32>,
    onehot: Vec<f32>,
    labels: Vec<u8>,
}

impl Batch {
    fn new() -> Self {
        Self {
            x: Vec::new(),
            onehot: Vec::new(),
            labels: Vec::new(),
        }
    }

    fn fill(&mut self, data: &DataRef<'_>, order: impl Iterator<Item = usize>, classes: usize) {
        self.x.clear();
        self.onehot.clear();
        self.labels.clear();
        for i in order {
            let (x, y) = data.get(i);
            self.x.extend_from_slice(x);
            self.labels.push(y);
        }
        self.onehot.resize(self.labels.len() * classes, 0.0);
        for (r, &y) in self.labels.iter().enumerate() {
            self.onehot[r * classes + y as usize] = 1.0;
        }
    }

    fn tensors(&self, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let n = self.labels.len();
        let classes = self.onehot.len() / n;
        (
            Tensor::from_data(
                TensorData::new(self.x.clone(), [n, self.x.len() / n]),
                device,
            ),
            Tensor::from_data(TensorData::new(self.onehot.clone(), [n, classes]), device),
        )
    }
}

/// Mean cross-entropy of `logits` against one-hot `targets`.
fn cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    (log_softmax(logits, 1) * targets)
        .sum()
        .div_scalar(-(n as f64))
}

fn scalar(t: Tensor<1>) -> f32 {
    t.into_data().try_into_vec::<f32>().expect("f32 scalar")[0]
}

/// The order in which [`train_local`] visits the local examples, epoch by
/// epoch: each epoch shuffles the previous epoch's order with a ChaCha8
/// stream seeded by [`TrainConfig::seed`]. Public so that another trainer
/// can be fed exactly the same batches.
#[derive(Debug, Clone)]
pub struct EpochOrder {
    rng: ChaCha8Rng,
    order: Vec<usize>,
}

impl EpochOrder {
    /// The order of `examples` examples for training seed `seed`.
    pub fn new(seed: u64, examples: usize) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            order: (0..examples).collect(),
        }
    }

    /// The next epoch's order (indices into the local data).
    pub fn next_epoch(&mut self) -> &[usize] {
        self.order.shuffle(&mut self.rng);
        &self.order
    }
}

/// Trains `spec`, starting from `global`, on `data` with `cfg`, on `backend`.
pub fn train_local(
    spec: &ModelSpec,
    global: &[f32],
    data: DataRef<'_>,
    cfg: &TrainConfig,
    backend: Backend,
) -> Result<TrainOutput> {
    cfg.validate()?;
    check_data(spec, &data)?;
    if data.is_empty() {
        return Err(Error::InvalidConfig {
            field: "data",
            reason: "no local examples to train on".into(),
        });
    }
    let device = backend.autodiff_device();
    let mut model = Network::from_flat(spec, global, &device)?;
    let anchor = if cfg.prox_mu > 0.0 {
        Some(Network::from_flat(spec, global, &backend.device())?)
    } else {
        None
    };
    let mut sgd = SgdConfig::new();
    if cfg.momentum > 0.0 {
        sgd = sgd.with_momentum(Some(
            MomentumConfig::new()
                .with_momentum(cfg.momentum)
                .with_dampening(0.0),
        ));
    }
    if cfg.weight_decay > 0.0 {
        sgd = sgd.with_weight_decay(Some(WeightDecayConfig::new(cfg.weight_decay as f32)));
    }
    let mut optim = sgd.init();

    let mut order = EpochOrder::new(cfg.seed, data.len());
    let mut batch = Batch::new();
    let (mut loss_sum, mut seen, mut steps) = (0.0f64, 0usize, 0usize);
    for _ in 0..cfg.epochs {
        for chunk in order.next_epoch().chunks(cfg.batch_size) {
            batch.fill(&data, chunk.iter().copied(), spec.classes());
            let (x, y) = batch.tensors(&device);
            let loss = cross_entropy(model.forward(x), y);
            loss_sum += f64::from(scalar(loss.clone().detach())) * chunk.len() as f64;
            seen += chunk.len();
            let objective = match &anchor {
                Some(a) => loss + model.squared_distance(a).mul_scalar(cfg.prox_mu / 2.0),
                None => loss,
            };
            let grads = GradientsParams::from_grads(objective.backward(), &model);
            model = optim.step(cfg.learning_rate, model, grads);
            steps += 1;
        }
    }
    let params = model.to_flat();
    if let Some(index) = params.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "trained parameters (training diverged; lower the learning rate)",
            index,
        });
    }
    Ok(TrainOutput {
        params,
        examples: data.len(),
        steps,
        mean_loss: (loss_sum / seen as f64) as f32,
    })
}

/// Mean cross-entropy of `params` on `data` and its gradient in flat layout.
///
/// Used by gradient checks and by callers that need a raw gradient.
pub fn loss_and_gradient(
    spec: &ModelSpec,
    params: &[f32],
    data: DataRef<'_>,
    backend: Backend,
) -> Result<(f32, Vec<f32>)> {
    check_data(spec, &data)?;
    let device = backend.autodiff_device();
    let model = Network::from_flat(spec, params, &device)?;
    let mut batch = Batch::new();
    batch.fill(&data, 0..data.len(), spec.classes());
    let (x, y) = batch.tensors(&device);
    let loss = cross_entropy(model.forward(x), y);
    let value = scalar(loss.clone().detach());
    let mut grads = GradientsParams::from_grads(loss.backward(), &model);
    Ok((value, model.flat_gradient(&mut grads)))
}

/// Loss and accuracy of `params` on `data`, in batches of 1,000 spread over
/// rayon's threads. Each batch's loss and count are combined in batch
/// order, so the result does not depend on the number of threads.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[f32],
    data: DataRef<'_>,
    backend: Backend,
) -> Result<Evaluation> {
    check_data(spec, &data)?;
    let classes = spec.classes();
    let batches: Vec<std::ops::Range<usize>> = (0..data.len())
        .step_by(1000)
        .map(|start| start..(start + 1000).min(data.len()))
        .collect();
    let parts = batches
        .into_par_iter()
        .map(|range| {
            let device = backend.device();
            let model = Network::from_flat(spec, params, &device)?;
            let mut batch = Batch::new();
            let rows = range.len();
            batch.fill(&data, range, classes);
            let (x, y) = batch.tensors(&device);
            let logits = model.forward(x);
            let loss = f64::from(scalar(cross_entropy(logits.clone(), y))) * rows as f64;
            let values = logits
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 logits");
            let correct = values
                .chunks(classes)
                .zip(&batch.labels)
                .filter(|(row, label)| argmax(row) == **label as usize)
                .count();
            Ok((loss, correct))
        })
        .collect::<Result<Vec<(f64, usize)>>>()?;
    let (mut loss_sum, mut correct) = (0.0f64, 0usize);
    for (loss, c) in parts {
        loss_sum += loss;
        correct += c;
    }
    let n = data.len().max(1);
    Ok(Evaluation {
        loss: (loss_sum / n as f64) as f32,
        accuracy: correct as f32 / n as f32,
        examples: data.len(),
    })
}

/// The logits of `params` on every example of `data`, `[n, classes]` row-major,
/// computed in batches of 1,000.
pub fn logits(
    spec: &ModelSpec,
    params: &[f32],
    data: DataRef<'_>,
    backend: Backend,
) -> Result<Vec<f32>> {
    check_data(spec, &data)?;
    let device = backend.device();
    let model = Network::from_flat(spec, params, &device)?;
    let mut batch = Batch::new();
    let mut out = Vec::with_capacity(data.len() * spec.classes());
    let mut start = 0;
    while start < data.len() {
        let end = (start + 1000).min(data.len());
        batch.fill(&data, start..end, spec.classes());
        let (x, _) = batch.tensors(&device);
        out.extend(
            model
                .forward(x)
                .into_data()
                .try_into_vec::<f32>()
                .expect("f32 logits"),
        );
        start = end;
    }
    Ok(out)
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
