//! Fixtures shared by the crate's unit tests: scratch directories and a
//! small task.

use std::path::{Path, PathBuf};

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::task::{EngineConfig, TaskSpec};

/// A fresh directory under the system's temporary one, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory whose name starts with `fleet-{name}`.
    pub fn new(name: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fleet-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A FedAvg task of logistic regression on 4 inputs and 2 classes (10
/// parameters), 3 rounds, no pace jitter, updates' norm bounded by 1 and
/// no relative bound (so that tests compute means by hand; the relative
/// bound's tests set one): `target` reports wanted from `cohort` selected
/// devices, `min_reports` needed.
pub fn small_spec(target: usize, cohort: usize, min_reports: usize) -> TaskSpec {
    TaskSpec {
        name: "test".into(),
        model: ModelSpec::LogReg {
            inputs: 4,
            classes: 2,
        },
        train: TrainConfig::default(),
        strategy: StrategyConfig {
            max_norm: Some(1.0),
            bound: None,
            centred: None,
            ..StrategyConfig::fedavg()
        },
        codec: Codec::F32,
        dp: None,
        budget: None,
        population: 100,
        engine: EngineConfig {
            target,
            over_selection: cohort as f64 / target as f64,
            min_reports,
            rounds: 3,
            pace_jitter_ms: 0,
            ..EngineConfig::default()
        },
        seed: 1,
        variant: Default::default(),
        max_examples: fleet_protocol::task::DEFAULT_MAX_EXAMPLES,
        secure_aggregation: None,
    }
}
