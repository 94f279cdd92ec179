//! Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) from its IDX files.
//!
//! The Debian package `dataset-fashion-mnist` installs the four gzip files in
//! [`DEFAULT_DIR`]; any directory holding the same file names works too.
//! Images become `[1, 28, 28]` examples normalised with [`NORM`].

use std::path::{Path, PathBuf};

use super::idx::{IdxArray, read_idx_file};
use super::{Dataset, PixelNorm};
use crate::error::{Error, Result};

/// Where the Debian package `dataset-fashion-mnist` puts the files.
pub const DEFAULT_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten classes, in label order.
pub const LABEL_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Normalisation of Fashion-MNIST inputs: mean and standard deviation of
/// `pixel / 255` over the 60,000 training images (0.2860 and 0.3530).
pub const NORM: PixelNorm = PixelNorm {
    mean: 0.2860,
    std: 0.3530,
};

/// Which half of the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// 60,000 training examples.
    Train,
    /// 10,000 test examples.
    Test,
}

impl Split {
    fn files(self) -> (&'static str, &'static str) {
        match self {
            Split::Train => ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
            Split::Test => ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        }
    }
}

/// The directory to read from: `FASHION_MNIST_DIR` when set, else [`DEFAULT_DIR`].
pub fn default_dir() -> PathBuf {
    std::env::var_os("FASHION_MNIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// Whether the files of both splits are present in `dir`.
pub fn available(dir: &Path) -> bool {
    [Split::Train, Split::Test].iter().all(|s| {
        let (i, l) = s.files();
        dir.join(i).is_file() && dir.join(l).is_file()
    })
}

/// Loads one split from `dir`.
pub fn load(dir: &Path, split: Split) -> Result<Dataset> {
    let (images, labels) = split.files();
    for f in [images, labels] {
        if !dir.join(f).is_file() {
            return Err(Error::DatasetMissing {
                dir: dir.to_path_buf(),
                file: f.to_string(),
            });
        }
    }
    from_idx(
        &read_idx_file(&dir.join(images))?,
        &read_idx_file(&dir.join(labels))?,
        images,
    )
}

/// The raw IDX arrays (images, labels) of one split in `dir`.
pub fn raw(dir: &Path, split: Split) -> Result<(IdxArray, IdxArray)> {
    let (images, labels) = split.files();
    Ok((
        read_idx_file(&dir.join(images))?,
        read_idx_file(&dir.join(labels))?,
    ))
}

/// Builds a data set from decoded image and label arrays, checking that they fit together.
pub fn from_idx(images: &IdxArray, labels: &IdxArray, name: &str) -> Result<Dataset> {
    let bad = |reason: String| Error::Idx {
        source_name: name.to_string(),
        reason,
    };
    if images.dims.len() != 3 {
        return Err(bad(format!(
            "image file must have 3 dimensions [count, rows, cols], found {:?}",
            images.dims
        )));
    }
    if labels.dims.len() != 1 {
        return Err(bad(format!(
            "label file must have 1 dimension [count], found {:?}",
            labels.dims
        )));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(bad(format!(
            "{} images but {} labels",
            images.dims[0], labels.dims[0]
        )));
    }
    Dataset::new(
        NORM.apply(&images.data),
        labels.data.clone(),
        vec![1, images.dims[1], images.dims[2]],
        LABEL_NAMES.len(),
        LABEL_NAMES.iter().map(|s| s.to_string()).collect(),
    )
}
