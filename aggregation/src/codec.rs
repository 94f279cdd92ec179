//! Update codecs: how a client's update is turned into bytes for the wire.
//!
//! | codec | bytes per value | error |
//! | --- | --- | --- |
//! | [`Codec::F32`] | 4 | none |
//! | [`Codec::F16`] | 2 | round-to-nearest half precision |
//! | [`Codec::Int8`] | 1 + 4/chunk | unbiased stochastic rounding to 255 levels per chunk |
//! | [`Codec::TopK`] | (4 + inner) · k/d, k = round(fraction·d) | the dropped coordinates, carried to the next round by [`ErrorFeedback`] |
//!
//! Int8 (as in QSGD-style schemes) scales each chunk of `chunk` values by
//! `s = max|x| / 127` and rounds `x/s` down or up at random with the
//! probabilities that make the result unbiased, so averaging many clients'
//! updates cancels the rounding error.
//!
//! Format (little-endian): `tag: u8, len: u32`, then per codec:
//! - F32: `len` × f32; F16: `len` × f16;
//! - Int8: `chunk: u32`, then per chunk `scale: f32` and its i8 values;
//! - TopK: `k: u32, inner tag: u8`, `k` ascending u32 indices, then the `k`
//!   values encoded with the inner codec (without its own header).
//!
//! [`decode`] checks every length, index and scale against the expected
//! model length before allocating, so hostile bytes give an error.

use half::f16;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A value codec, optionally sparsified.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    /// Raw f32.
    F32,
    /// IEEE half precision.
    F16,
    /// 8-bit stochastic rounding with one f32 scale per chunk.
    Int8 {
        /// Values per scale.
        chunk: u32,
    },
    /// Keep the `fraction` of coordinates with the largest magnitude.
    TopK {
        /// Share of coordinates kept, in `(0, 1]`.
        fraction: f32,
        /// Codec of the kept values.
        values: ValueCodec,
    },
}

/// The codecs by name, as fleet files and command lines write them
/// (`f32`, `f16`, `int8`, `topk`); [`CodecKind::codec`] gives the codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodecKind {
    /// Raw f32.
    F32,
    /// Half precision.
    F16,
    /// 8-bit stochastic rounding, one scale per [`Codec::INT8`] chunk.
    Int8,
    /// Top-k sparsification with f16 values.
    Topk,
}

impl CodecKind {
    /// Every kind, in order.
    pub const ALL: [CodecKind; 4] = [
        CodecKind::F32,
        CodecKind::F16,
        CodecKind::Int8,
        CodecKind::Topk,
    ];
    /// Every name, in the order of [`CodecKind::ALL`].
    pub const NAMES: [&'static str; 4] = ["f32", "f16", "int8", "topk"];

    /// The name as written.
    pub fn as_str(self) -> &'static str {
        match self {
            CodecKind::F32 => Self::NAMES[0],
            CodecKind::F16 => Self::NAMES[1],
            CodecKind::Int8 => Self::NAMES[2],
            CodecKind::Topk => Self::NAMES[3],
        }
    }

    /// The codec; `topk_fraction` is the share of coordinates `topk` keeps
    /// (checked by [`Codec::validate`]).
    pub fn codec(self, topk_fraction: f32) -> Codec {
        match self {
            CodecKind::F32 => Codec::F32,
            CodecKind::F16 => Codec::F16,
            CodecKind::Int8 => Codec::INT8,
            CodecKind::Topk => Codec::TopK {
                fraction: topk_fraction,
                values: ValueCodec::F16,
            },
        }
    }
}

impl std::fmt::Display for CodecKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CodecKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        fleet_models::spec::parse_name("codec", s, &Self::ALL, |k| k.as_str())
    }
}

/// A dense value codec (the inner codec of top-k).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueCodec {
    /// Raw f32.
    F32,
    /// Half precision.
    F16,
    /// Int8 with chunks of 256.
    Int8,
}

const TAG_F32: u8 = 1;
const TAG_F16: u8 = 2;
const TAG_INT8: u8 = 3;
const TAG_TOPK: u8 = 4;
const INNER_INT8_CHUNK: u32 = 256;

impl Codec {
    /// Int8 with 256 values per scale.
    pub const INT8: Codec = Codec::Int8 { chunk: 256 };

    /// Checks parameters.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Codec::Int8 { chunk: 0 } => Err(crate::error::config(
                "chunk",
                "int8 chunk must be at least 1",
            )),
            Codec::TopK { fraction, .. } if !(fraction > 0.0 && fraction <= 1.0) => {
                Err(crate::error::config(
                    "fraction",
                    format!("top-k fraction {fraction} must be in (0, 1]"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Encodes a dense update. Randomness drives int8's stochastic rounding only.
    pub fn encode(&self, x: &[f32], rng: &mut impl Rng) -> Result<Vec<u8>> {
        self.validate()?;
        let mut out = Vec::with_capacity(self.encoded_len_hint(x.len()));
        match *self {
            Codec::F32 => {
                header(&mut out, TAG_F32, x.len());
                put_values(&mut out, ValueCodec::F32, x, rng);
            }
            Codec::F16 => {
                header(&mut out, TAG_F16, x.len());
                put_values(&mut out, ValueCodec::F16, x, rng);
            }
            Codec::Int8 { chunk } => {
                header(&mut out, TAG_INT8, x.len());
                out.extend_from_slice(&chunk.to_le_bytes());
                put_int8(&mut out, x, chunk as usize, rng);
            }
            Codec::TopK { fraction, values } => {
                let idx = top_k_indices(x, fraction);
                header(&mut out, TAG_TOPK, x.len());
                out.extend_from_slice(&(idx.len() as u32).to_le_bytes());
                out.push(match values {
                    ValueCodec::F32 => TAG_F32,
                    ValueCodec::F16 => TAG_F16,
                    ValueCodec::Int8 => TAG_INT8,
                });
                for &i in &idx {
                    out.extend_from_slice(&(i as u32).to_le_bytes());
                }
                let kept: Vec<f32> = idx.iter().map(|&i| x[i]).collect();
                put_values(&mut out, values, &kept, rng);
            }
        }
        Ok(out)
    }

    fn encoded_len_hint(&self, d: usize) -> usize {
        5 + match *self {
            Codec::F32 => 4 * d,
            Codec::F16 => 2 * d,
            Codec::Int8 { chunk } => 4 + d + 4 * d.div_ceil(chunk.max(1) as usize),
            Codec::TopK { fraction, .. } => {
                9 * ((f64::from(fraction) * d as f64).round() as usize + 1)
            }
        }
    }
}

fn header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

fn put_values(out: &mut Vec<u8>, codec: ValueCodec, x: &[f32], rng: &mut impl Rng) {
    match codec {
        ValueCodec::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        ValueCodec::F16 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        ValueCodec::Int8 => put_int8(out, x, INNER_INT8_CHUNK as usize, rng),
    }
}

fn put_int8(out: &mut Vec<u8>, x: &[f32], chunk: usize, rng: &mut impl Rng) {
    for c in x.chunks(chunk) {
        let max = c.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let scale = if max > 0.0 && max.is_finite() {
            max / 127.0
        } else {
            0.0
        };
        out.extend_from_slice(&scale.to_le_bytes());
        for &v in c {
            let q = if scale > 0.0 {
                let t = v / scale;
                let lo = t.floor();
                // P(round up) = t − ⌊t⌋ makes E[q] = t.
                let up = rng.random::<f32>() < t - lo;
                (lo + f32::from(u8::from(up))).clamp(-127.0, 127.0)
            } else {
                0.0
            };
            out.push(q as i8 as u8);
        }
    }
}

/// Indices of the `round(fraction·d)` (at least one) largest-magnitude values,
/// ascending (ties by lower index).
fn top_k_indices(x: &[f32], fraction: f32) -> Vec<usize> {
    let k = ((f64::from(fraction) * x.len() as f64).round() as usize)
        .clamp(usize::from(!x.is_empty()), x.len());
    let mut idx: Vec<usize> = (0..x.len()).collect();
    if k < x.len() {
        idx.select_nth_unstable_by(k, |&a, &b| {
            x[b].abs().total_cmp(&x[a].abs()).then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                Error::Decode(format!(
                    "truncated: {what} needs {n} bytes at offset {}, {} left",
                    self.at,
                    self.b.len() - self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
}

fn get_values(r: &mut Reader<'_>, tag: u8, n: usize) -> Result<Vec<f32>> {
    match tag {
        TAG_F32 => Ok(r
            .take(4 * n, "f32 values")?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect()),
        TAG_F16 => Ok(r
            .take(2 * n, "f16 values")?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        TAG_INT8 => get_int8(r, n, INNER_INT8_CHUNK as usize),
        other => Err(Error::Decode(format!("unknown value codec tag {other}"))),
    }
}

fn get_int8(r: &mut Reader<'_>, n: usize, chunk: usize) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let m = left.min(chunk);
        let scale = f32::from_le_bytes(r.take(4, "int8 scale")?.try_into().expect("4 bytes"));
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(Error::Decode(format!(
                "int8 chunk scale {scale} is not a finite number >= 0"
            )));
        }
        let start = out.len();
        out.extend(
            r.take(m, "int8 values")?
                .iter()
                .map(|&b| f32::from(b as i8) * scale),
        );
        // A scale near f32::MAX overflows the values it multiplies (the
        // encoder's scale is at most f32::MAX / 127 and its values at most
        // 127 in size, so its products stay finite).
        if out[start..].iter().any(|v| !v.is_finite()) {
            return Err(Error::Decode(format!(
                "int8 chunk scale {scale} overflows its values"
            )));
        }
        left -= m;
    }
    Ok(out)
}

/// Decodes bytes made by [`Codec::encode`] into a dense vector of `expected_len` values.
pub fn decode(bytes: &[u8], expected_len: usize) -> Result<Vec<f32>> {
    let mut r = Reader { b: bytes, at: 0 };
    let tag = r.u8("codec tag")?;
    let len = r.u32("length")? as usize;
    if len != expected_len {
        return Err(Error::Decode(format!(
            "update has {len} values, the model has {expected_len}"
        )));
    }
    let out = match tag {
        TAG_F32 | TAG_F16 => get_values(&mut r, tag, len)?,
        TAG_INT8 => {
            let chunk = r.u32("int8 chunk")? as usize;
            if chunk == 0 {
                return Err(Error::Decode("int8 chunk size 0".into()));
            }
            get_int8(&mut r, len, chunk)?
        }
        TAG_TOPK => {
            let k = r.u32("top-k count")? as usize;
            if k > len {
                return Err(Error::Decode(format!("top-k keeps {k} of {len} values")));
            }
            let inner = r.u8("top-k value codec")?;
            let raw = r.take(4 * k, "top-k indices")?;
            let idx: Vec<usize> = raw
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .collect();
            if let Some(w) = idx.windows(2).find(|w| w[0] >= w[1]) {
                return Err(Error::Decode(format!(
                    "top-k indices not strictly ascending: {} then {}",
                    w[0], w[1]
                )));
            }
            if let Some(&bad) = idx.last().filter(|&&i| i >= len) {
                return Err(Error::Decode(format!(
                    "top-k index {bad} out of range for {len} values"
                )));
            }
            let vals = get_values(&mut r, inner, k)?;
            let mut out = vec![0.0f32; len];
            for (i, v) in idx.into_iter().zip(vals) {
                out[i] = v;
            }
            out
        }
        other => return Err(Error::Decode(format!("unknown codec tag {other}"))),
    };
    if r.at != bytes.len() {
        return Err(Error::Decode(format!(
            "{} trailing bytes",
            bytes.len() - r.at
        )));
    }
    Ok(out)
}

/// [`decode`] into `out`, reusing its allocation: a server decoding one
/// update after another touches no fresh memory for the common f32 codec.
/// On error `out` is left empty.
pub fn decode_into(bytes: &[u8], expected_len: usize, out: &mut Vec<f32>) -> Result<()> {
    let header = bytes.get(..5);
    let f32_body = header
        .filter(|h| h[0] == TAG_F32)
        .map(|h| u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize)
        .filter(|&len| len == expected_len && bytes.len() == 5 + 4 * len);
    if f32_body.is_some() {
        out.resize(expected_len, 0.0);
        if cfg!(target_endian = "little") {
            // The wire's little-endian f32 is the machine's: a copy, over
            // the cores for long vectors (as the passes that follow).
            let dst = bytemuck::cast_slice_mut::<f32, u8>(out);
            let step = 4 * crate::kernels::CHUNK;
            if expected_len < crate::kernels::PARALLEL_MIN {
                dst.copy_from_slice(&bytes[5..]);
            } else {
                use rayon::prelude::*;
                dst.par_chunks_mut(step)
                    .zip(bytes[5..].par_chunks(step))
                    .for_each(|(d, s)| d.copy_from_slice(s));
            }
        } else {
            for (o, b) in out.iter_mut().zip(bytes[5..].chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        return Ok(());
    }
    // Every other codec, and every malformed input (for its error).
    match decode(bytes, expected_len) {
        Ok(v) => {
            *out = v;
            Ok(())
        }
        Err(e) => {
            out.clear();
            Err(e)
        }
    }
}

/// Client-side error feedback for lossy codecs (Seide et al., 2014; Stich et
/// al., 2018): what a round's encoding dropped is added to the next round's
/// update, so nothing is lost for good.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
}

impl ErrorFeedback {
    /// Encodes `update + residual` and keeps the new residual.
    pub fn encode(&mut self, codec: &Codec, update: &[f32], rng: &mut impl Rng) -> Result<Vec<u8>> {
        if self.residual.len() != update.len() {
            self.residual = vec![0.0; update.len()];
        }
        let corrected: Vec<f32> = update
            .iter()
            .zip(&self.residual)
            .map(|(u, r)| u + r)
            .collect();
        let bytes = codec.encode(&corrected, rng)?;
        let sent = decode(&bytes, update.len())?;
        for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = c - s;
        }
        Ok(bytes)
    }

    /// The residual carried to the next round.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

#[cfg(test)]
mod kind_tests {
    use super::{Codec, CodecKind};

    #[test]
    fn codec_names_are_one_list_for_files_and_command_lines() {
        for (kind, name) in CodecKind::ALL.into_iter().zip(CodecKind::NAMES) {
            assert_eq!(kind.as_str(), name);
            assert_eq!(name.parse::<CodecKind>(), Ok(kind));
            assert!(kind.codec(0.1).validate().is_ok(), "{name}");
        }
        assert!("F32".parse::<CodecKind>().is_err());
        assert_eq!(CodecKind::Int8.codec(0.5), Codec::INT8);
        assert!(CodecKind::Topk.codec(0.0).validate().is_err());
    }
}
