//! The devices' training data and the central test set.
//!
//! Labelled data sets (Fashion-MNIST) are loaded once and split across the
//! devices by a partitioner; each device holds a list of indices. Synthetic
//! data is generated when a device trains, from `(seed, device)` alone, and
//! dropped right after: an idle device holds nothing.

use fleet_models::data::embedded;
use fleet_models::data::fashion::{self, Split};
use fleet_models::data::partition::partition;
use fleet_models::data::synthetic::SyntheticConfig;
use fleet_models::{DataRef, Dataset};

use crate::fleet::{DataConfig, Fleet};

/// Where each device's examples come from.
#[derive(Debug)]
pub enum DeviceData {
    /// A loaded data set and the indices of each device's examples.
    Partitioned {
        /// The training set.
        train: Dataset,
        /// `devices[k]`: the examples of device `k`.
        devices: Vec<Vec<usize>>,
    },
    /// Generated on demand.
    Synthetic {
        /// The generator.
        cfg: SyntheticConfig,
        /// Training examples per device.
        examples: usize,
    },
}

impl DeviceData {
    /// Number of training examples of `device`, without generating them.
    pub fn examples(&self, device: u32) -> usize {
        match self {
            DeviceData::Partitioned { devices, .. } => devices[device as usize].len(),
            DeviceData::Synthetic { examples, .. } => *examples,
        }
    }

    /// Calls `f` with `device`'s training examples.
    pub fn with<R>(
        &self,
        device: u32,
        f: impl FnOnce(DataRef<'_>) -> Result<R, String>,
    ) -> Result<R, String> {
        match self {
            DeviceData::Partitioned { train, devices } => f(train
                .subset(&devices[device as usize])
                .map_err(|e| e.to_string())?),
            DeviceData::Synthetic { cfg, examples } => {
                let data = cfg
                    .device(u64::from(device), *examples)
                    .map_err(|e| e.to_string())?;
                f(data.view())
            }
        }
    }
}

/// Loads or sets up the data of `fleet`: the devices' data and the test set.
pub fn load(fleet: &Fleet) -> Result<(DeviceData, Dataset), String> {
    let labelled = |train: Dataset, test: Dataset, scheme| {
        let parts = partition(
            train.labels(),
            train.classes(),
            fleet.devices as usize,
            scheme,
            fleet.seed,
        )
        .map_err(|e| format!("data.partition: {e}"))?;
        Ok((
            DeviceData::Partitioned {
                train,
                devices: parts.clients,
            },
            test,
        ))
    };
    match fleet.data {
        DataConfig::FashionEmbedded { partition } => labelled(
            embedded::load(Split::Train).map_err(|e| e.to_string())?,
            embedded::load(Split::Test).map_err(|e| e.to_string())?,
            partition.scheme(),
        ),
        DataConfig::FashionFull { partition } => {
            let dir = fashion::default_dir();
            let hint = |e: fleet_models::Error| {
                format!(
                    "data.set = \"fashion-full\": {e} (install it with `apt-get install dataset-fashion-mnist`, \
                     point FASHION_MNIST_DIR at it, or use set = \"fashion-embedded\")"
                )
            };
            labelled(
                fashion::load(&dir, Split::Train).map_err(hint)?,
                fashion::load(&dir, Split::Test).map_err(hint)?,
                partition.scheme(),
            )
        }
        DataConfig::Synthetic {
            alpha,
            beta,
            examples,
            test_devices,
            test_examples,
        } => {
            let cfg = SyntheticConfig::new(alpha, beta, fleet.seed);
            let test = synthetic_test_set(
                &cfg,
                fleet.devices,
                examples as usize,
                test_devices,
                test_examples as usize,
            )?;
            Ok((
                DeviceData::Synthetic {
                    cfg,
                    examples: examples as usize,
                },
                test,
            ))
        }
    }
}

/// Held-out examples of `test_devices` devices spread evenly over the fleet:
/// the examples each device would generate after its training ones.
fn synthetic_test_set(
    cfg: &SyntheticConfig,
    devices: u32,
    train: usize,
    test_devices: u32,
    per_device: usize,
) -> Result<Dataset, String> {
    let n = test_devices.min(devices);
    let (mut features, mut labels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let device = (u64::from(i) * u64::from(devices) / u64::from(n)) as u32;
        let all = cfg
            .device(u64::from(device), train + per_device)
            .map_err(|e| format!("data: {e}"))?;
        let held: Vec<usize> = (train..train + per_device).collect();
        let part = all.select(&held).map_err(|e| e.to_string())?;
        features.extend_from_slice(part.features());
        labels.extend_from_slice(part.labels());
    }
    Dataset::new(
        features,
        labels,
        vec![cfg.features],
        cfg.classes,
        Vec::new(),
    )
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_devices_are_generated_on_demand_and_tests_are_held_out() {
        let fleet = Fleet::from_toml(
            "devices = 1000\nmodel = \"logreg\"\n[data]\nset = \"synthetic\"\nexamples = 30\ntest_devices = 10\ntest_examples = 5\n",
        )
        .unwrap();
        let (data, test) = load(&fleet).unwrap();
        assert_eq!(test.len(), 50);
        assert_eq!(data.examples(999), 30);
        let a = data.with(7, |d| Ok(d.dataset().clone())).unwrap();
        let b = data.with(7, |d| Ok(d.dataset().clone())).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 30);
        // Device 0 is a test device: its held-out examples follow its training ones.
        let cfg = SyntheticConfig::new(1.0, 1.0, fleet.seed);
        let longer = cfg.device(0, 35).unwrap();
        assert_eq!(&longer.features()[30 * 60..], &test.features()[..5 * 60]);
        assert_eq!(
            &longer.features()[..30 * 60],
            data.with(0, |d| Ok(d.dataset().features().to_vec()))
                .unwrap()
                .as_slice()
        );
    }
}
