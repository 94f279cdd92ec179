//! The embedded default data set: 5,000 training and 1,000 test images of
//! Fashion-MNIST (500 and 100 per class), compiled into the binary.
//!
//! Source, selection rule, checksums and licence are in
//! `models/data/fashion-mnist-subset/README.md`. The bytes are the original
//! gzip IDX files, decoded by the same reader as the full data set.

use super::Dataset;
use super::fashion::{Split, from_idx};
use super::idx::{IdxArray, maybe_gunzip, parse_idx};
use crate::error::Result;

const TRAIN_IMAGES: &[u8] =
    include_bytes!("../../data/fashion-mnist-subset/train-images-idx3-ubyte.gz");
const TRAIN_LABELS: &[u8] =
    include_bytes!("../../data/fashion-mnist-subset/train-labels-idx1-ubyte.gz");
const TEST_IMAGES: &[u8] =
    include_bytes!("../../data/fashion-mnist-subset/test-images-idx3-ubyte.gz");
const TEST_LABELS: &[u8] =
    include_bytes!("../../data/fashion-mnist-subset/test-labels-idx1-ubyte.gz");

/// Name of this data set in fleet files and reports.
pub const NAME: &str = "fashion-mnist-subset";

/// Decodes one split of the embedded subset.
pub fn load(split: Split) -> Result<Dataset> {
    let (images, labels) = raw(split)?;
    from_idx(&images, &labels, name(split))
}

fn name(split: Split) -> &'static str {
    match split {
        Split::Train => "embedded train",
        Split::Test => "embedded test",
    }
}

/// The raw IDX arrays (images, labels) of one split.
pub fn raw(split: Split) -> Result<(IdxArray, IdxArray)> {
    let (images, labels) = match split {
        Split::Train => (TRAIN_IMAGES, TRAIN_LABELS),
        Split::Test => (TEST_IMAGES, TEST_LABELS),
    };
    let name = name(split);
    Ok((
        parse_idx(name, &maybe_gunzip(name, images)?)?,
        parse_idx(name, &maybe_gunzip(name, labels)?)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_subset_is_stratified_and_well_formed() {
        let train = load(Split::Train).unwrap();
        let test = load(Split::Test).unwrap();
        assert_eq!(train.len(), 5000);
        assert_eq!(test.len(), 1000);
        assert_eq!(train.shape(), &[1, 28, 28]);
        assert_eq!(train.label_histogram(), vec![500; 10]);
        assert_eq!(test.label_histogram(), vec![100; 10]);
        // Real images, normalised with the full training set's statistics:
        // the subset's mean and spread are close to 0 and 1.
        let n = train.features().len() as f32;
        let mean = train.features().iter().sum::<f32>() / n;
        let var = train
            .features()
            .iter()
            .map(|v| (v - mean).powi(2))
            .sum::<f32>()
            / n;
        assert!(
            mean.abs() < 0.1 && (var.sqrt() - 1.0).abs() < 0.1,
            "mean {mean}, std {}",
            var.sqrt()
        );
    }
}
