//! Models, data and local training for the fleet learning runtime.
//!
//! This crate holds every numerical fact about models that the rest of the
//! workspace relies on:
//!
//! - [`spec`]: what a model is ([`ModelSpec`]) and the flat layout of its
//!   parameters ([`ParamLayout`], [`LayoutFingerprint`]);
//! - [`net`]: the burn networks built from a spec and a flat vector;
//! - [`train`]: deterministic local training (SGD with momentum, weight decay
//!   and FedProx) and evaluation;
//! - [`data`]: real data sets (Fashion-MNIST, an embedded subset of it, the
//!   FedProx Synthetic(α, β) generator) and federated partitioners;
//! - [`backend`]: the single choice of burn CPU backend;
//! - [`export`]: inference artifacts — float and int8 ONNX files with
//!   metadata, post-training quantization with calibration data.
//!
//! Parameters cross crate boundaries only as `Vec<f32>` in a spec's flat
//! layout, so that aggregation, codecs and the wire protocol never depend on
//! burn.

pub mod backend;
pub mod data;
pub mod error;
pub mod export;
pub mod net;
pub mod spec;
pub mod train;

pub use backend::Backend;
pub use data::{DataRef, Dataset};
pub use error::{Error, Result};
pub use spec::{LayoutFingerprint, ModelKind, ModelSpec, ParamLayout};
pub use train::{EpochOrder, Evaluation, TrainConfig, TrainOutput, evaluate, logits, train_local};
