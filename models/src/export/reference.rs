//! A plain-Rust forward pass of the networks, for calibration.
//!
//! Post-training quantization needs the activations *inside* the network
//! (the input of every layer), which burn's [`crate::net::Network::forward`]
//! does not expose. This module computes them directly from the flat
//! parameters, with the same conventions as `net.rs`: dense weights
//! `[inputs, outputs]`, convolutions `[out, in, k, k]` with "same" padding,
//! ReLU then 2×2 max-pooling after each convolution, NCHW flattening. Tests
//! check its logits against burn's.

use crate::spec::{LayerSpec, ModelSpec};

/// Output of [`forward`]: the input of every layer, and the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// `layer_inputs[i]` is what layer `i` of [`ModelSpec::layers`] reads
    /// (`[n, …]`, row-major): the model input for layer 0, else the previous
    /// layer's output after ReLU (and pooling, for convolutions).
    pub layer_inputs: Vec<Vec<f32>>,
    /// `[n, classes]` logits.
    pub logits: Vec<f32>,
}

fn dense(x: &[f32], n: usize, w: &[f32], b: &[f32], inputs: usize, outputs: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * outputs);
    for row in x.chunks_exact(inputs).take(n) {
        let mut acc = b.to_vec();
        for (k, &xv) in row.iter().enumerate() {
            if xv != 0.0 {
                let wr = &w[k * outputs..(k + 1) * outputs];
                for (a, &wv) in acc.iter_mut().zip(wr) {
                    *a += xv * wv;
                }
            }
        }
        out.extend(acc);
    }
    out
}

/// "Same" convolution, then ReLU and 2×2 max-pooling.
#[allow(clippy::too_many_arguments)]
fn conv_relu_pool(
    x: &[f32],
    n: usize,
    (c, h, wd): (usize, usize, usize),
    w: &[f32],
    b: &[f32],
    o: usize,
    k: usize,
) -> Vec<f32> {
    let pad = k / 2;
    let mut y = vec![0f32; o * h * wd];
    let mut out = Vec::with_capacity(n * o * (h / 2) * (wd / 2));
    for img in x.chunks_exact(c * h * wd).take(n) {
        for oc in 0..o {
            let plane = &mut y[oc * h * wd..(oc + 1) * h * wd];
            plane.fill(b[oc]);
            for ic in 0..c {
                let src = &img[ic * h * wd..(ic + 1) * h * wd];
                for ky in 0..k {
                    for kx in 0..k {
                        let wv = w[((oc * c + ic) * k + ky) * k + kx];
                        for yy in 0..h {
                            let sy = yy + ky;
                            if sy < pad || sy - pad >= h {
                                continue;
                            }
                            let srow = &src[(sy - pad) * wd..(sy - pad + 1) * wd];
                            let drow = &mut plane[yy * wd..(yy + 1) * wd];
                            // x index = xx + kx - pad, kept in [0, wd).
                            let lo = pad.saturating_sub(kx);
                            let hi = (wd + pad).saturating_sub(kx).min(wd);
                            for xx in lo..hi {
                                drow[xx] += wv * srow[xx + kx - pad];
                            }
                        }
                    }
                }
            }
        }
        for oc in 0..o {
            let plane = &y[oc * h * wd..(oc + 1) * h * wd];
            for py in 0..h / 2 {
                for px in 0..wd / 2 {
                    let at = |yy: usize, xx: usize| plane[yy * wd + xx];
                    let m = at(2 * py, 2 * px)
                        .max(at(2 * py, 2 * px + 1))
                        .max(at(2 * py + 1, 2 * px))
                        .max(at(2 * py + 1, 2 * px + 1));
                    out.push(m.max(0.0));
                }
            }
        }
    }
    out
}

/// Runs `spec` with flat parameters `params` on `n` examples `x` (`[n, inputs]`).
///
/// The caller has checked `params` against the layout and `x.len() == n * inputs`.
pub fn forward(spec: &ModelSpec, params: &[f32], x: &[f32], n: usize) -> Trace {
    let layers = spec.layers();
    let mut at = 0;
    let mut take = |len: usize| {
        let s = &params[at..at + len];
        at += len;
        s
    };
    let mut shape = spec.image_shape().map_or((0, 0, 0), |[c, h, w]| (c, h, w));
    let mut cur = x[..n * spec.inputs()].to_vec();
    let mut layer_inputs = Vec::with_capacity(layers.len());
    let last = layers.len() - 1;
    for (i, layer) in layers.iter().enumerate() {
        layer_inputs.push(cur.clone());
        cur = match *layer {
            LayerSpec::Conv {
                inputs,
                outputs,
                kernel,
            } => {
                let w = take(outputs * inputs * kernel * kernel);
                let b = take(outputs);
                let y = conv_relu_pool(&cur, n, shape, w, b, outputs, kernel);
                shape = (outputs, shape.1 / 2, shape.2 / 2);
                y
            }
            LayerSpec::Dense { inputs, outputs } => {
                let w = take(inputs * outputs);
                let b = take(outputs);
                let mut y = dense(&cur, n, w, b, inputs, outputs);
                if i < last {
                    y.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                y
            }
        };
    }
    Trace {
        layer_inputs,
        logits: cur,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convolution_matches_a_hand_computed_case() {
        // One 4×4 input channel of ones, one 3×3 kernel of ones, bias 0:
        // "same" padding gives 4 at corners, 6 on edges, 9 inside; pooling
        // takes the max of each 2×2 block: 9 everywhere.
        let y = conv_relu_pool(&[1.0; 16], 1, (1, 4, 4), &[1.0; 9], &[0.0], 1, 3);
        assert_eq!(y, [9.0; 4]);
        // A single centre-weighted kernel (identity) with negative bias:
        // ReLU clips it.
        let mut k = [0.0; 9];
        k[4] = 1.0;
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let y = conv_relu_pool(&x, 1, (1, 4, 4), &k, &[-6.0], 1, 3);
        assert_eq!(y, [0.0, 1.0, 7.0, 9.0]);
    }
}
