//! The one place that chooses burn's compute backend.
//!
//! burn 0.22 has no backend type parameter: tensors carry their backend in
//! their [`Device`]. Every tensor this crate creates is created on
//! [`Backend::device`], so the choice below is the crate's single switch.
//!
//! Two pure-Rust CPU backends are compiled in: `flex`, burn's current CPU
//! backend, and `ndarray`, deprecated in 0.22 and removed in 0.23 (only with
//! this crate's feature `ndarray`, on by default; the agent leaves it out). The
//! training benchmark (`cargo run --release -p fleet-models --example
//! train_bench`) measures both side by side; [`Backend::DEFAULT`] is the one
//! it found faster (see ARCHITECTURE.md and docs/benchmarks.md). The variable
//! `FLEET_BACKEND=flex|ndarray` overrides it at run time.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

use crate::error::Error;

/// A burn CPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// burn's `flex` backend.
    Flex,
    /// burn's deprecated `ndarray` backend.
    #[cfg(feature = "ndarray")]
    NdArray,
}

impl Backend {
    /// The backend used unless `FLEET_BACKEND` says otherwise.
    pub const DEFAULT: Backend = Backend::Flex;

    /// Every compiled-in backend.
    #[cfg(feature = "ndarray")]
    pub const ALL: &[Backend] = &[Backend::Flex, Backend::NdArray];
    /// Every compiled-in backend.
    #[cfg(not(feature = "ndarray"))]
    pub const ALL: &[Backend] = &[Backend::Flex];

    /// `FLEET_BACKEND` when set to a known name, else [`Backend::DEFAULT`].
    pub fn from_env() -> Backend {
        std::env::var("FLEET_BACKEND")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(Backend::DEFAULT)
    }

    /// A plain (inference) device of this backend.
    pub fn device(self) -> Device {
        match self {
            Backend::Flex => Device::flex(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            // measured against flex on purpose; see the module docs
            Backend::NdArray => Device::ndarray(),
        }
    }

    /// The same device with automatic differentiation, for training.
    pub fn autodiff_device(self) -> Device {
        self.device().autodiff()
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Flex => "flex",
            #[cfg(feature = "ndarray")]
            Backend::NdArray => "ndarray",
        })
    }
}

impl FromStr for Backend {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "flex" => Ok(Backend::Flex),
            #[cfg(feature = "ndarray")]
            "ndarray" => Ok(Backend::NdArray),
            other => Err(Error::InvalidConfig {
                field: "backend",
                reason: format!(
                    "unknown backend {other:?}; expected one of: {}",
                    Backend::ALL
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }
}
