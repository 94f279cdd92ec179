//! Inputs from files, for people: what `edge-agent predict <input>` reads.
//!
//! [`read_input`] accepts, by content:
//!
//! - an IDX image file (`*-images-idx3-ubyte`, gzip or not), as the
//!   Fashion-MNIST files: every image is one example of 8-bit pixels;
//! - raw 8-bit pixels, exactly `features` bytes (one image);
//! - raw little-endian float32 normalised features, a whole number of
//!   examples (`4 × features × n` bytes).
//!
//! [`describe`] turns predictions into one line per example.

use std::path::Path;

use fleet_models::data::idx::{maybe_gunzip, parse_idx};

use super::error::{InferenceError, Result};
use super::model::{Model, Predictions};

/// Normalised features read from a file, `[n, features]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// The values.
    pub values: Vec<f32>,
    /// Examples.
    pub examples: usize,
    /// How the file was read (`IDX images`, `raw pixels`, `raw float32`).
    pub kind: &'static str,
}

fn input_error(path: &Path, reason: String) -> InferenceError {
    InferenceError::Input {
        path: path.display().to_string(),
        reason,
    }
}

/// Reads `path` as input for `model`, keeping at most `limit` examples.
pub fn read_input(model: &Model, path: &Path, limit: usize) -> Result<Input> {
    let features = model.features();
    let bytes = std::fs::read(path).map_err(|e| input_error(path, e.to_string()))?;
    let name = path.display().to_string();
    let raw = maybe_gunzip(&name, &bytes).map_err(|e| input_error(path, e.to_string()))?;
    let is_idx = raw.len() >= 4 && raw[0] == 0 && raw[1] == 0 && raw[2] == 0x08;
    let (values, kind) = if is_idx {
        let idx = parse_idx(&name, &raw).map_err(|e| input_error(path, e.to_string()))?;
        let per: usize = idx.dims.iter().skip(1).product();
        if idx.dims.len() < 2 || per != features {
            return Err(input_error(
                path,
                format!(
                    "IDX array of shape {:?} does not hold examples of {features} values",
                    idx.dims
                ),
            ));
        }
        let n = idx.dims[0].min(limit);
        (model.normalize_pixels(&idx.data[..n * per])?, "IDX images")
    } else if raw.len() == features {
        (model.normalize_pixels(&raw)?, "raw pixels")
    } else if raw.len().is_multiple_of(4 * features) && !raw.is_empty() {
        let n = (raw.len() / (4 * features)).min(limit);
        let v = raw[..n * 4 * features]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (v, "raw float32")
    } else {
        return Err(input_error(
            path,
            format!(
                "{} bytes: expected an IDX image file, {features} raw pixel bytes, or a multiple \
                 of {} bytes of little-endian float32 features",
                raw.len(),
                4 * features
            ),
        ));
    };
    let examples = values.len() / features;
    model.check_input(&values)?;
    Ok(Input {
        values,
        examples,
        kind,
    })
}

/// One line per example: index, label, class and softmax probability.
pub fn describe(model: &Model, p: &Predictions) -> Vec<String> {
    (0..p.len())
        .map(|i| {
            let row = p.row(i);
            let class = fleet_models::train::argmax(row);
            let max = row[class];
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            format!(
                "{i}: {} (class {class}, p = {:.3})",
                model.meta().labels.get(class).map_or("?", String::as_str),
                1.0 / sum
            )
        })
        .collect()
}
