//! How the agent runs: [`RunConfig`], read from `config.json` in the state
//! directory ([`load`], written by `edge-agent install`) and overridden by
//! the command line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::eligibility::Rules;
use crate::state::StateDir;

/// How the agent runs (`config.json` in the state directory, overridden by flags).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Directory of local training data (images.idx, labels.idx).
    pub data: Option<PathBuf>,
    /// Eligibility rules checked before each check-in.
    pub eligibility: Rules,
    /// Upload bandwidth limit in bytes per second (metered links); none by default.
    pub upload_bytes_per_sec: Option<u64>,
    /// Memory the agent may use for training (MiB), told to the coordinator.
    pub memory_mib: u32,
    /// Exit after this many accepted updates (for tests and one-shot runs).
    pub max_rounds: Option<u64>,
    /// Seconds between checks for a newly deployed model (0: never check).
    pub deployment_check_secs: u64,
    /// Unix socket on which to serve predictions from the deployed model.
    pub socket: Option<PathBuf>,
    /// Cohort tags sent with drift summaries (region, hardware class, group).
    pub drift_tags: Vec<String>,
    /// Summarise one served prediction in this many for drift monitoring
    /// (1: every prediction; 0: no drift summaries).
    pub drift_sample_every: u64,
    /// Gaussian noise on drift summaries (noise multiplier; none: no noise).
    pub drift_noise_multiplier: Option<f64>,
    /// ε budget of the noised drift summaries (no more are sent once spent).
    pub drift_epsilon: f64,
    /// δ of that budget.
    pub drift_delta: f64,
    /// More addresses of the same coordinator (replicas sharing its
    /// store), tried in turn after the enrolled one when a connection
    /// cannot be made or is lost.
    pub replicas: Vec<std::net::SocketAddr>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data: None,
            eligibility: Rules::default(),
            upload_bytes_per_sec: None,
            memory_mib: 256,
            max_rounds: None,
            deployment_check_secs: 300,
            socket: None,
            drift_tags: Vec::new(),
            drift_sample_every: 1,
            drift_noise_multiplier: None,
            drift_epsilon: 10.0,
            drift_delta: 1e-5,
            replicas: Vec::new(),
        }
    }
}

/// Reads `config.json` from the state directory (defaults when absent).
pub fn load(state: &StateDir) -> Result<RunConfig, String> {
    let path = state.dir().join("config.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RunConfig::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
