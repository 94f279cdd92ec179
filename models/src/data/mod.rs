//! Data sets, as federated learning needs them.
//!
//! A [`Dataset`] is a dense block of `f32` features with one `u8` label per
//! example. Clients never copy it: a partition hands each client a list of
//! indices, and training reads through a [`DataRef`] (a data set plus an
//! optional index list).
//!
//! Sources:
//! - [`fashion`]: the real Fashion-MNIST from IDX files ([`idx`]).
//! - [`embedded`]: a fixed, stratified subset of Fashion-MNIST compiled into
//!   the binary, so that the default run needs no download.
//! - [`synthetic`]: the Synthetic(α, β) generator of the FedProx paper.
//!
//! [`partition`] splits a data set across clients; [`device`] is the
//! on-device data format an agent trains from.

pub mod device;
pub mod embedded;
pub mod fashion;
pub mod idx;
pub mod partition;
pub mod synthetic;

use crate::error::{Error, Result};

/// Examples with their labels, stored row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u8>,
    /// Shape of one example, e.g. `[1, 28, 28]` for an image or `[60]` for a vector.
    shape: Vec<usize>,
    classes: usize,
    /// Human-readable class names, `classes` of them.
    label_names: Vec<String>,
}

impl Dataset {
    /// Builds a data set, checking that sizes agree and labels are in range.
    pub fn new(
        features: Vec<f32>,
        labels: Vec<u8>,
        shape: Vec<usize>,
        classes: usize,
        label_names: Vec<String>,
    ) -> Result<Self> {
        let dim: usize = shape.iter().product();
        if dim == 0 {
            return Err(Error::InvalidConfig {
                field: "shape",
                reason: format!("example shape {shape:?} has no features"),
            });
        }
        if classes == 0 || classes > 256 {
            return Err(Error::InvalidConfig {
                field: "classes",
                reason: format!("{classes} classes; expected 1..=256"),
            });
        }
        if features.len() != labels.len() * dim {
            return Err(Error::ShapeMismatch {
                model: format!(
                    "dataset of {} labels with example shape {shape:?}",
                    labels.len()
                ),
                expected: labels.len() * dim,
                found: features.len(),
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, l)| **l as usize >= classes)
        {
            return Err(Error::LabelOutOfRange {
                index,
                label: label as u32,
                classes,
            });
        }
        if let Some(index) = features.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "dataset features",
                index,
            });
        }
        let label_names = if label_names.len() == classes {
            label_names
        } else {
            (0..classes).map(|c| c.to_string()).collect()
        };
        Ok(Self {
            features,
            labels,
            shape,
            classes,
            label_names,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the data set holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per example.
    pub fn dim(&self) -> usize {
        self.shape.iter().product()
    }

    /// Shape of one example.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Class names.
    pub fn label_names(&self) -> &[String] {
        &self.label_names
    }

    /// All labels.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// All features, row-major.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// The features of example `i`.
    pub fn example(&self, i: usize) -> &[f32] {
        let d = self.dim();
        &self.features[i * d..(i + 1) * d]
    }

    /// A view of the whole data set.
    pub fn view(&self) -> DataRef<'_> {
        DataRef {
            data: self,
            indices: None,
        }
    }

    /// A view of the examples at `indices` (which must be in range).
    pub fn subset<'a>(&'a self, indices: &'a [usize]) -> Result<DataRef<'a>> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(Error::InvalidConfig {
                field: "indices",
                reason: format!(
                    "index {bad} out of range for a data set of {} examples",
                    self.len()
                ),
            });
        }
        Ok(DataRef {
            data: self,
            indices: Some(indices),
        })
    }

    /// A new data set holding the examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset> {
        let view = self.subset(indices)?;
        let mut features = Vec::with_capacity(indices.len() * self.dim());
        let mut labels = Vec::with_capacity(indices.len());
        for i in 0..view.len() {
            let (x, y) = view.get(i);
            features.extend_from_slice(x);
            labels.push(y);
        }
        Dataset::new(
            features,
            labels,
            self.shape.clone(),
            self.classes,
            self.label_names.clone(),
        )
    }

    /// Count of examples per class.
    pub fn label_histogram(&self) -> Vec<usize> {
        self.view().label_histogram()
    }
}

/// A borrowed view of a data set: all of it, or the examples at some indices.
#[derive(Debug, Clone, Copy)]
pub struct DataRef<'a> {
    data: &'a Dataset,
    indices: Option<&'a [usize]>,
}

impl<'a> DataRef<'a> {
    /// Number of examples in the view.
    pub fn len(&self) -> usize {
        self.indices.map_or(self.data.len(), <[usize]>::len)
    }

    /// Whether the view is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The underlying data set.
    pub fn dataset(&self) -> &'a Dataset {
        self.data
    }

    /// Features and label of the `i`-th example of the view.
    pub fn get(&self, i: usize) -> (&'a [f32], u8) {
        let j = self.indices.map_or(i, |ix| ix[i]);
        (self.data.example(j), self.data.labels[j])
    }

    /// Count of examples per class in the view.
    pub fn label_histogram(&self) -> Vec<usize> {
        let mut h = vec![0; self.data.classes];
        for i in 0..self.len() {
            h[self.get(i).1 as usize] += 1;
        }
        h
    }
}

/// Input normalisation of 8-bit images: `x = (pixel / 255 − mean) / std`.
///
/// Exported models record it so that inference applies the same transform.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PixelNorm {
    /// Mean of `pixel / 255` over the training set.
    pub mean: f32,
    /// Standard deviation of `pixel / 255` over the training set.
    pub std: f32,
}

impl PixelNorm {
    /// Applies the transform to raw pixels.
    pub fn apply(&self, pixels: &[u8]) -> Vec<f32> {
        let (scale, shift) = (1.0 / (255.0 * self.std), self.mean / self.std);
        pixels
            .iter()
            .map(|&p| f32::from(p) * scale - shift)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_inconsistent_inputs() {
        assert!(matches!(
            Dataset::new(vec![0.0; 5], vec![0, 1], vec![3], 2, vec![]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            Dataset::new(vec![0.0; 6], vec![0, 2], vec![3], 2, vec![]),
            Err(Error::LabelOutOfRange {
                index: 1,
                label: 2,
                classes: 2
            })
        ));
        assert!(matches!(
            Dataset::new(vec![0.0, f32::NAN, 0.0], vec![0], vec![3], 2, vec![]),
            Err(Error::NonFinite { index: 1, .. })
        ));
        let ds = Dataset::new(vec![0.0; 6], vec![0, 1], vec![3], 2, vec![]).unwrap();
        assert!(ds.subset(&[0, 2]).is_err());
        assert_eq!(ds.subset(&[1, 1]).unwrap().label_histogram(), vec![0, 2]);
    }
}
