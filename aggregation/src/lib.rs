//! Aggregation of model updates for the fleet learning runtime.
//!
//! A library without I/O, used by the coordinator and the simulator:
//!
//! - [`bound`] and [`centred`]: limits relative to the fleet's typical
//!   report, and centred clipping around the previous round's direction.
//! - [`check`]: admission of an update (layout, length, finiteness, norm).
//! - [`strategy`]: the streaming weighted mean and robust rules, and the
//!   server optimisers (FedAvg, FedAvgM, FedAdagrad, FedAdam, FedYogi).
//! - [`compute`]: the kernels behind them, on the CPU or an NVIDIA GPU
//!   (`cuda` module, feature `cuda`).
//! - [`kernels`]: the vectorised sums, dot products and running sums of
//!   the hot path, identical to the bit on every CPU.
//! - [`codec`]: f32, f16, int8 and top-k encodings of updates.
//! - [`privacy`]: clipping, Gaussian noise (opendp), adaptive clipping and
//!   the privacy accountant.
//!
//! Updates are flat `f32` vectors in a `fleet_models::ParamLayout`.

pub mod bound;
pub mod centred;
pub mod check;
pub mod codec;
pub mod compute;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod kernels;
pub mod privacy;
pub mod strategy;

pub use bound::{Basis, Limits, RelativeBound};
pub use centred::{CentredClip, History};
pub use check::{Admission, Update, report_weight};
pub use codec::{Codec, ErrorFeedback};
pub use compute::{Compute, Cpu, select};
#[cfg(feature = "cuda")]
pub use cuda::{Cuda, CudaError};
pub use error::{Error, Rejection, Result};
pub use strategy::{
    Aggregate, Aggregator, Checked, Rule, Server, ServerOptimizer, StrategyConfig, StrategyName,
};
