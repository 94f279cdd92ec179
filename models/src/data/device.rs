//! The on-device data format: a directory holding one device's examples as
//! two IDX files, the format Fashion-MNIST itself ships in.
//!
//! ```text
//! <data dir>/
//!   images.idx   unsigned bytes, dimensions [count, rows, cols]  (gzip allowed)
//!   labels.idx   unsigned bytes, dimensions [count], values < 10 (gzip allowed)
//! ```
//!
//! Pixels are raw 0–255 intensities; the agent normalises them exactly as
//! training on the full data set does ([`super::fashion::NORM`]).
//! [`write_partition`] turns a partition of a data set into one such
//! directory per device.

use std::path::{Path, PathBuf};

use super::Dataset;
use super::fashion::from_idx;
use super::idx::{IdxArray, read_idx_file};
use super::partition::Partition;
use crate::error::{Error, Result};

/// File of the images.
pub const IMAGES: &str = "images.idx";
/// File of the labels.
pub const LABELS: &str = "labels.idx";

/// Encodes an array of unsigned bytes as IDX.
pub fn encode_idx(array: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, array.dims.len() as u8];
    for d in &array.dims {
        out.extend((*d as u32).to_be_bytes());
    }
    out.extend(&array.data);
    out
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads a device's data directory.
pub fn load(dir: &Path) -> Result<Dataset> {
    for f in [IMAGES, LABELS] {
        if !dir.join(f).is_file() {
            return Err(Error::InvalidConfig {
                field: "data directory",
                reason: format!(
                    "{} has no {f}; a device's data is images.idx and labels.idx \
                     (make them with `edge-agent data split`)",
                    dir.display()
                ),
            });
        }
    }
    from_idx(
        &read_idx_file(&dir.join(IMAGES))?,
        &read_idx_file(&dir.join(LABELS))?,
        &dir.display().to_string(),
    )
}

/// Writes the examples `indices` of (`images`, `labels`) as a data directory.
pub fn write(dir: &Path, images: &IdxArray, labels: &IdxArray, indices: &[usize]) -> Result<()> {
    let per = images.dims.iter().skip(1).product::<usize>();
    let count = images.dims.first().copied().unwrap_or(0);
    if images.dims.len() != 3 || labels.dims != [count] {
        return Err(Error::InvalidConfig {
            field: "images",
            reason: format!(
                "need images [count, rows, cols] and labels [count], got {:?} and {:?}",
                images.dims, labels.dims
            ),
        });
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= count) {
        return Err(Error::InvalidConfig {
            field: "indices",
            reason: format!("example {bad} is out of range (the data set has {count})"),
        });
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut pixels = Vec::with_capacity(indices.len() * per);
    for &i in indices {
        pixels.extend_from_slice(&images.data[i * per..(i + 1) * per]);
    }
    let img = IdxArray {
        dims: vec![indices.len(), images.dims[1], images.dims[2]],
        data: pixels,
    };
    let lab = IdxArray {
        dims: vec![indices.len()],
        data: indices.iter().map(|&i| labels.data[i]).collect(),
    };
    let path = dir.join(IMAGES);
    std::fs::write(&path, encode_idx(&img)).map_err(io(&path))?;
    let path = dir.join(LABELS);
    std::fs::write(&path, encode_idx(&lab)).map_err(io(&path))?;
    Ok(())
}

/// Writes one data directory per client of `partition`, `out/device-<k>`;
/// returns their paths.
pub fn write_partition(
    out: &Path,
    images: &IdxArray,
    labels: &IdxArray,
    partition: &Partition,
) -> Result<Vec<PathBuf>> {
    partition
        .clients
        .iter()
        .enumerate()
        .map(|(k, indices)| {
            let dir = out.join(format!("device-{k}"));
            write(&dir, images, labels, indices)?;
            Ok(dir)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::embedded;
    use crate::data::fashion::Split;

    #[test]
    fn a_written_directory_loads_back_the_same_examples() {
        let (images, labels) = embedded::raw(Split::Test).unwrap();
        let full = embedded::load(Split::Test).unwrap();
        let dir = std::env::temp_dir().join(format!("fleet-device-data-{}", std::process::id()));
        let picks = [3usize, 10, 999];
        write(&dir, &images, &labels, &picks).unwrap();
        let back = load(&dir).unwrap();
        assert_eq!(back.len(), 3);
        for (j, &i) in picks.iter().enumerate() {
            assert_eq!(back.example(j), full.example(i));
            assert_eq!(back.labels()[j], full.labels()[i]);
        }
        std::fs::write(dir.join(LABELS), [0u8, 0, 8, 1, 0, 0, 0, 9, 1]).unwrap();
        let err = load(&dir).unwrap_err().to_string();
        assert!(err.contains("truncated") || err.contains("images"), "{err}");
        let err = write(&dir, &images, &labels, &[5000])
            .unwrap_err()
            .to_string();
        assert!(err.contains("out of range"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
