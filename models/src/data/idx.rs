//! Reader for the IDX format of (Fashion-)MNIST, plain or gzip-compressed.
//!
//! An IDX file is a big-endian header — two zero bytes, a type code (`0x08`
//! for unsigned bytes), the number of dimensions — followed by one `u32` size
//! per dimension and the raw data. Only `u8` data is accepted, which is what
//! image and label files use. Every size is checked against the bytes present
//! before anything is allocated, so truncated or hostile files give an
//! [`Error::Idx`] rather than a panic or a huge allocation.

use std::io::Read;

use crate::error::{Error, Result};

/// A decoded IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension, outermost first.
    pub dims: Vec<usize>,
    /// Row-major data; its length is the product of `dims`.
    pub data: Vec<u8>,
}

/// Largest decompressed IDX payload accepted (1 GiB): far above any image
/// data set this runtime trains on, far below what would exhaust a device.
pub const MAX_IDX_BYTES: usize = 1 << 30;

fn idx_err(name: &str, reason: impl Into<String>) -> Error {
    Error::Idx {
        source_name: name.to_string(),
        reason: reason.into(),
    }
}

/// Decompresses `bytes` when they start with the gzip magic, else returns them as they are.
pub fn maybe_gunzip(name: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .take(MAX_IDX_BYTES as u64 + 1024)
            .read_to_end(&mut out)
            .map_err(|e| idx_err(name, format!("gzip stream is corrupt or truncated: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an IDX byte buffer (already decompressed).
pub fn parse_idx(name: &str, bytes: &[u8]) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(idx_err(
            name,
            format!(
                "file has {} bytes, shorter than the 4-byte magic",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(idx_err(
            name,
            format!(
                "bad magic {:02x}{:02x}{:02x}{:02x}: an IDX file starts with two zero bytes",
                bytes[0], bytes[1], bytes[2], bytes[3]
            ),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(idx_err(
            name,
            format!(
                "unsupported IDX data type 0x{:02x}: only unsigned bytes (0x08) are read",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(idx_err(name, "IDX header declares zero dimensions"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(idx_err(
            name,
            format!(
                "truncated header: {ndims} dimensions need {header} bytes, file has {}",
                bytes.len()
            ),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut total: usize = 1;
    for d in 0..ndims {
        let o = 4 + 4 * d;
        let size =
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize;
        total = total
            .checked_mul(size)
            .filter(|&t| t <= MAX_IDX_BYTES)
            .ok_or_else(|| idx_err(name, format!("declared size exceeds {MAX_IDX_BYTES} bytes")))?;
        dims.push(size);
    }
    let payload = &bytes[header..];
    if payload.len() != total {
        return Err(idx_err(
            name,
            format!(
                "header declares {dims:?} = {total} bytes of data, file holds {} (truncated or trailing data)",
                payload.len()
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: payload.to_vec(),
    })
}

/// Reads and parses an IDX file, decompressing it when it is gzip.
pub fn read_idx_file(path: &std::path::Path) -> Result<IdxArray> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.display().to_string();
    parse_idx(&name, &maybe_gunzip(&name, &bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_a_well_formed_file() {
        let a = parse_idx("t", &encode(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn rejects_bad_magic_type_and_truncation() {
        let good = encode(&[2, 3], &[1, 2, 3, 4, 5, 6]);
        let mut bad_magic = good.clone();
        bad_magic[0] = 0x50;
        let e = parse_idx("t", &bad_magic).unwrap_err().to_string();
        assert!(e.contains("bad magic"), "{e}");
        let mut bad_type = good.clone();
        bad_type[2] = 0x0d;
        let e = parse_idx("t", &bad_type).unwrap_err().to_string();
        assert!(e.contains("unsupported IDX data type 0x0d"), "{e}");
        let e = parse_idx("t", &good[..good.len() - 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = parse_idx("t", &good[..6]).unwrap_err().to_string();
        assert!(e.contains("truncated header"), "{e}");
        let e = parse_idx("t", &good[..2]).unwrap_err().to_string();
        assert!(e.contains("shorter"), "{e}");
    }

    #[test]
    fn rejects_huge_declared_sizes_without_allocating() {
        let e = parse_idx("t", &encode(&[u32::MAX, u32::MAX, 16], &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds"), "{e}");
    }

    #[test]
    fn corrupt_gzip_is_an_error() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&encode(&[4], &[9, 8, 7, 6])).unwrap();
        let gz = enc.finish().unwrap();
        let ok = parse_idx("t", &maybe_gunzip("t", &gz).unwrap()).unwrap();
        assert_eq!(ok.data, vec![9, 8, 7, 6]);
        let truncated = &gz[..gz.len() - 6];
        assert!(maybe_gunzip("t", truncated).is_err());
        let mut corrupt = gz.clone();
        let mid = corrupt.len() / 2;
        corrupt[mid] ^= 0xff;
        // Either the deflate stream or its CRC must catch the flip.
        let r = maybe_gunzip("t", &corrupt).and_then(|b| parse_idx("t", &b));
        assert!(r.is_err());
    }
}
