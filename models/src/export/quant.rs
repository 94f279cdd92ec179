//! Post-training static quantization arithmetic.
//!
//! - Weights: int8, symmetric, one scale per output channel
//!   (`scale = max|w| / 127`, values in `[-127, 127]`, zero point 0).
//! - Activations: uint8, one scale and zero point per tensor, from the range
//!   observed on calibration data ([`Calibration`]). The range always
//!   contains 0 so that 0 is exact; after a ReLU the range is `[0, max]` and
//!   the zero point is 0, so saturating quantization performs the ReLU.
//! - Biases of quantized convolutions: int32 in units of
//!   `input_scale × weight_scale[channel]`, as `QLinearConv` requires.

use serde::{Deserialize, Serialize};

/// How activation ranges are taken from calibration data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum Calibration {
    /// The observed minimum and maximum.
    MinMax,
    /// The `percentile`-th and `(100 − percentile)`-th percentiles, which
    /// ignores rare outliers (e.g. 99.99).
    Percentile {
        /// In `(50, 100]`.
        percentile: f64,
    },
}

impl Calibration {
    /// The `(low, high)` range of `values` under this rule, widened to contain 0.
    pub fn range(&self, values: &[f32]) -> (f32, f32) {
        if values.is_empty() {
            return (0.0, 0.0);
        }
        let (lo, hi) = match *self {
            Calibration::MinMax => values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                }),
            Calibration::Percentile { percentile } => {
                let mut v = values.to_vec();
                let last = v.len() - 1;
                let rank = |p: f64| ((p / 100.0) * last as f64).round() as usize;
                let hi_at = rank(percentile).min(last);
                let lo_at = rank(100.0 - percentile).min(last);
                let hi = *v.select_nth_unstable_by(hi_at, f32::total_cmp).1;
                let lo = *v.select_nth_unstable_by(lo_at, f32::total_cmp).1;
                (lo, hi)
            }
        };
        (lo.min(0.0), hi.max(0.0))
    }
}

/// Per-tensor uint8 quantization of an activation: `x ≈ (q − zero_point) × scale`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ActQuant {
    /// Step between two levels.
    pub scale: f32,
    /// The level that stands for 0.
    pub zero_point: u8,
}

impl ActQuant {
    /// The parameters covering `[lo, hi]` (which must contain 0).
    pub fn from_range(lo: f32, hi: f32) -> Self {
        let span = hi - lo;
        if !(span.is_finite() && span > f32::EPSILON) {
            return Self {
                scale: 1.0,
                zero_point: 0,
            };
        }
        let scale = span / 255.0;
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        Self { scale, zero_point }
    }

    /// Quantizes one value as ONNX `QuantizeLinear` does (round half to even, saturate).
    pub fn quantize(&self, x: f32) -> u8 {
        ((x / self.scale).round_ties_even() + f32::from(self.zero_point)).clamp(0.0, 255.0) as u8
    }
}

/// Int8 weights with one scale per output channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelQuant {
    /// Quantized values, in the layout of the float weights.
    pub values: Vec<i8>,
    /// One scale per output channel.
    pub scales: Vec<f32>,
}

/// Quantizes `w` symmetrically per output channel; `channel(i)` names the
/// channel of element `i`.
pub fn quantize_weights(
    w: &[f32],
    channels: usize,
    channel: impl Fn(usize) -> usize,
) -> ChannelQuant {
    let mut max = vec![0f32; channels];
    for (i, &v) in w.iter().enumerate() {
        let c = channel(i);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|&m| if m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let values = w
        .iter()
        .enumerate()
        .map(|(i, &v)| (v / scales[channel(i)]).round().clamp(-127.0, 127.0) as i8)
        .collect();
    ChannelQuant { values, scales }
}

/// The int32 bias of a quantized convolution: `round(b / (x_scale × w_scale[c]))`.
pub fn quantize_bias(bias: &[f32], x_scale: f32, w_scales: &[f32]) -> Vec<i32> {
    bias.iter()
        .zip(w_scales)
        .map(|(&b, &s)| {
            (f64::from(b) / (f64::from(x_scale) * f64::from(s)))
                .round()
                .clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_ranges_contain_zero_and_round_trip() {
        let q = ActQuant::from_range(-0.81, 2.03);
        assert!(q.zero_point > 0);
        for x in [-0.81f32, -0.3, 0.0, 0.7, 2.03] {
            let back = (f32::from(q.quantize(x)) - f32::from(q.zero_point)) * q.scale;
            assert!((back - x).abs() <= q.scale / 2.0 + 1e-6, "{x} -> {back}");
        }
        assert_eq!(q.quantize(0.0), q.zero_point);
        // Post-ReLU ranges: zero point 0, negatives saturate to 0 (the ReLU).
        let r = ActQuant::from_range(0.0, 5.0);
        assert_eq!(r.zero_point, 0);
        assert_eq!(r.quantize(-3.0), 0);
        assert_eq!(r.quantize(100.0), 255);
        // A constant-zero tensor still gets a usable scale.
        assert_eq!(ActQuant::from_range(0.0, 0.0).scale, 1.0);
    }

    #[test]
    fn percentiles_ignore_outliers_and_minmax_does_not() {
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0).collect();
        v.push(1000.0);
        assert_eq!(Calibration::MinMax.range(&v), (0.0, 1000.0));
        let (lo, hi) = Calibration::Percentile { percentile: 99.9 }.range(&v);
        assert_eq!(lo, 0.0);
        assert!((0.99..1.0).contains(&hi), "{hi}");
    }

    #[test]
    fn weights_are_symmetric_per_channel() {
        // Two output columns of a [3, 2] dense weight (channel = i % 2).
        let w = [0.3, -4.0, -1.0, 3.0, 0.25, 1.0];
        let q = quantize_weights(&w, 2, |i| i % 2);
        assert_eq!(q.scales, [1.0 / 127.0, 4.0 / 127.0]);
        assert_eq!(q.values, [38, -127, -127, 95, 32, 32]);
        // An all-zero channel keeps a non-zero scale.
        let z = quantize_weights(&[0.0, 0.0], 1, |_| 0);
        assert_eq!(z.scales, [1.0]);
        assert_eq!(quantize_bias(&[0.5, -0.25], 0.5, &[0.01, 0.1]), [100, -5]);
    }
}
