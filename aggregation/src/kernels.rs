//! Vector kernels of the aggregation hot path: sums of squares and dot
//! products in f64, the f64 running sum `acc += w·x`, squared distances.
//!
//! Each kernel has one definition, written over fixed blocks of [`LANES`]
//! values whose partial sums are combined in a fixed order, so that the
//! compiler vectorises it without reassociating anything. That definition
//! is compiled three times, for baseline x86-64, with AVX2 and with
//! AVX-512, and the widest the CPU has is picked at run time. No fused
//! multiply-add is used, so every path rounds exactly as the others do:
//! results never depend on the CPU, only on the values.
//!
//! The `par_*` forms split long vectors into [`CHUNK`]-sized pieces that
//! rayon spreads over the cores, and combine the pieces' partial sums in
//! chunk order: the result does not depend on the number of threads.

use rayon::prelude::*;

/// Values per block of independent partial sums.
pub const LANES: usize = 16;

/// Coordinates per parallel task.
pub const CHUNK: usize = 32 * 1024;

/// Vectors shorter than this are not split across threads: waking a
/// thread costs more than the pass (a 2NN update, 199,210 values, is
/// summed in about 30 µs on one core; handing half of it to another thread
/// and waiting for it costs tens of µs more). The split point does not
/// change any result: pieces are combined in the same order either way.
pub const PARALLEL_MIN: usize = 1 << 20;

/// Sums `LANES` partial sums in a fixed pairwise order.
#[inline(always)]
fn combine(mut p: [f64; LANES]) -> f64 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            p[i] += p[i + width];
        }
        width /= 2;
    }
    p[0]
}

#[inline(always)]
fn sum_squares_body(x: &[f32]) -> f64 {
    let mut p = [0.0f64; LANES];
    let blocks = x.chunks_exact(LANES);
    let tail = blocks.remainder();
    for b in blocks {
        for i in 0..LANES {
            let v = f64::from(b[i]);
            p[i] += v * v;
        }
    }
    for (i, &v) in tail.iter().enumerate() {
        let v = f64::from(v);
        p[i] += v * v;
    }
    combine(p)
}

/// `Σ term(xᵢ, yᵢ)` over the shorter length, lane `i mod 16` for position
/// `i`: the portable form of every two-vector reduction.
#[inline(always)]
fn pair_body(x: &[f32], y: &[f32], term: impl Fn(f64, f64) -> f64) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut p = [0.0f64; LANES];
    let xb = x.chunks_exact(LANES);
    let yb = y.chunks_exact(LANES);
    let (xt, yt) = (xb.remainder(), yb.remainder());
    for (a, b) in xb.zip(yb) {
        for i in 0..LANES {
            p[i] += term(f64::from(a[i]), f64::from(b[i]));
        }
    }
    for i in 0..xt.len() {
        p[i] += term(f64::from(xt[i]), f64::from(yt[i]));
    }
    combine(p)
}

#[inline(always)]
fn dot_body(x: &[f32], y: &[f32]) -> f64 {
    pair_body(x, y, |a, b| a * b)
}

#[inline(always)]
fn sq_dist_body(x: &[f32], s: f64, y: &[f32]) -> f64 {
    pair_body(x, y, |a, b| (s * a - b) * (s * a - b))
}

#[inline(always)]
fn axpy_body(acc: &mut [f64], w: f64, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * f64::from(v);
    }
}

/// Defines `$name` calling `$body` compiled for the widest vector unit the
/// CPU has (AVX-512, AVX2, or baseline).
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident;) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// Explicit AVX2 and AVX-512 forms of the reductions: the compiler does not
/// vectorise a sum into an array of lanes well on its own. Lane `i` of the
/// 16 holds the values at positions `≡ i (mod 16)` exactly as the portable
/// bodies do, with a multiply then an add (no fused multiply-add), so
/// every path gives the same bits.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// `Σ (s·xᵢ − yᵢ)²` (with `y`), `Σ xᵢ·yᵢ` (`DOT`), or `Σ xᵢ²`, the
    /// first `blocks` blocks of 16, with AVX-512.
    #[target_feature(enable = "avx512f")]
    pub(super) fn reduce_avx512<const KIND: u8>(x: &[f32], s: f64, y: &[f32]) -> [f64; LANES] {
        let blocks = x.len() / LANES;
        assert!(KIND == 0 || y.len() >= blocks * LANES);
        let (mut a0, mut a1) = (_mm512_setzero_pd(), _mm512_setzero_pd());
        let sv = _mm512_set1_pd(s);
        for k in 0..blocks {
            // SAFETY: block k lies within x (and y, asserted above).
            unsafe {
                let px = x.as_ptr().add(k * LANES);
                let x0 = _mm512_cvtps_pd(_mm256_loadu_ps(px));
                let x1 = _mm512_cvtps_pd(_mm256_loadu_ps(px.add(8)));
                let (t0, t1) = match KIND {
                    0 => (_mm512_mul_pd(x0, x0), _mm512_mul_pd(x1, x1)),
                    1 => {
                        let py = y.as_ptr().add(k * LANES);
                        let y0 = _mm512_cvtps_pd(_mm256_loadu_ps(py));
                        let y1 = _mm512_cvtps_pd(_mm256_loadu_ps(py.add(8)));
                        (_mm512_mul_pd(x0, y0), _mm512_mul_pd(x1, y1))
                    }
                    _ => {
                        let py = y.as_ptr().add(k * LANES);
                        let y0 = _mm512_cvtps_pd(_mm256_loadu_ps(py));
                        let y1 = _mm512_cvtps_pd(_mm256_loadu_ps(py.add(8)));
                        let d0 = _mm512_sub_pd(_mm512_mul_pd(sv, x0), y0);
                        let d1 = _mm512_sub_pd(_mm512_mul_pd(sv, x1), y1);
                        (_mm512_mul_pd(d0, d0), _mm512_mul_pd(d1, d1))
                    }
                };
                a0 = _mm512_add_pd(a0, t0);
                a1 = _mm512_add_pd(a1, t1);
            }
        }
        let mut p = [0.0f64; LANES];
        // SAFETY: p holds 16 f64.
        unsafe {
            _mm512_storeu_pd(p.as_mut_ptr(), a0);
            _mm512_storeu_pd(p.as_mut_ptr().add(8), a1);
        }
        p
    }

    /// [`reduce_avx512`] with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) fn reduce_avx2<const KIND: u8>(x: &[f32], s: f64, y: &[f32]) -> [f64; LANES] {
        let blocks = x.len() / LANES;
        assert!(KIND == 0 || y.len() >= blocks * LANES);
        let mut a = [_mm256_setzero_pd(); 4];
        let sv = _mm256_set1_pd(s);
        for k in 0..blocks {
            for (q, acc) in a.iter_mut().enumerate() {
                // SAFETY: quarter q of block k lies within x (and y).
                unsafe {
                    let off = k * LANES + 4 * q;
                    let xv = _mm256_cvtps_pd(_mm_loadu_ps(x.as_ptr().add(off)));
                    let t = match KIND {
                        0 => _mm256_mul_pd(xv, xv),
                        1 => _mm256_mul_pd(xv, _mm256_cvtps_pd(_mm_loadu_ps(y.as_ptr().add(off)))),
                        _ => {
                            let yv = _mm256_cvtps_pd(_mm_loadu_ps(y.as_ptr().add(off)));
                            let d = _mm256_sub_pd(_mm256_mul_pd(sv, xv), yv);
                            _mm256_mul_pd(d, d)
                        }
                    };
                    *acc = _mm256_add_pd(*acc, t);
                }
            }
        }
        let mut p = [0.0f64; LANES];
        for (q, acc) in a.iter().enumerate() {
            // SAFETY: p has room for 4 f64 at 4q.
            unsafe { _mm256_storeu_pd(p.as_mut_ptr().add(4 * q), *acc) };
        }
        p
    }

    /// `gram_block_body` with AVX-512: a tile's 16 pairs in 16 registers
    /// of 8 lanes, lane `l` summing the products at positions `≡ l (mod 8)`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn gram_block_avx512(buf: &[f64], m: usize, b: usize, out: &mut [f64]) {
        const T: usize = super::TILE;
        assert!(
            m.is_multiple_of(T) && b.is_multiple_of(8) && buf.len() >= m * b && out.len() >= m * m
        );
        for i0 in (0..m).step_by(T) {
            for j0 in (i0..m).step_by(T) {
                let mut acc = [[_mm512_setzero_pd(); T]; T];
                for k in (0..b).step_by(8) {
                    // SAFETY: rows i0..i0+T and j0..j0+T, values k..k+8, lie within buf (asserted).
                    unsafe {
                        let a: [__m512d; T] = std::array::from_fn(|d| {
                            _mm512_loadu_pd(buf.as_ptr().add((i0 + d) * b + k))
                        });
                        let c: [__m512d; T] = std::array::from_fn(|d| {
                            _mm512_loadu_pd(buf.as_ptr().add((j0 + d) * b + k))
                        });
                        for di in 0..T {
                            for dj in 0..T {
                                acc[di][dj] =
                                    _mm512_add_pd(acc[di][dj], _mm512_mul_pd(a[di], c[dj]));
                            }
                        }
                    }
                }
                for di in 0..T {
                    for dj in 0..T {
                        let mut p = [0.0f64; 8];
                        // SAFETY: p holds 8 f64.
                        unsafe { _mm512_storeu_pd(p.as_mut_ptr(), acc[di][dj]) };
                        let s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
                        out[(i0 + di) * m + j0 + dj] += s;
                    }
                }
            }
        }
    }

    /// The blocks of 16 with the widest unit the CPU has, or `None`.
    #[inline]
    pub(super) fn reduce<const KIND: u8>(x: &[f32], s: f64, y: &[f32]) -> Option<[f64; LANES]> {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return Some(unsafe { reduce_avx512::<KIND>(x, s, y) });
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return Some(unsafe { reduce_avx2::<KIND>(x, s, y) });
        }
        None
    }
}

/// `Σ (xᵢ − yᵢ)²` in f64 over the shorter length.
pub fn squared_distance(x: &[f32], y: &[f32]) -> f64 {
    scaled_squared_distance(x, 1.0, y)
}

/// Finishes a reduction whose full blocks are in `p`: adds the tail as the
/// portable body does and combines the lanes.
fn finish_tail(mut p: [f64; LANES], tail: impl Iterator<Item = f64>) -> f64 {
    for (i, t) in tail.enumerate() {
        p[i] += t;
    }
    combine(p)
}

/// `Σ xᵢ²` in f64 (infinite or NaN when a value is).
pub fn sum_squares(x: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = x86::reduce::<0>(x, 1.0, &[]) {
        let tail = &x[x.len() / LANES * LANES..];
        return finish_tail(p, tail.iter().map(|&v| f64::from(v) * f64::from(v)));
    }
    sum_squares_body(x)
}

/// `Σ xᵢ·yᵢ` in f64 over the shorter length.
pub fn dot(x: &[f32], y: &[f32]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = x86::reduce::<1>(x, 1.0, y) {
        let at = n / LANES * LANES;
        let tail = x[at..].iter().zip(&y[at..]);
        return finish_tail(p, tail.map(|(&a, &b)| f64::from(a) * f64::from(b)));
    }
    dot_body(x, y)
}

/// `Σ (s·xᵢ − yᵢ)²` in f64 over the shorter length.
pub fn scaled_squared_distance(x: &[f32], s: f64, y: &[f32]) -> f64 {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    #[cfg(target_arch = "x86_64")]
    if let Some(p) = x86::reduce::<2>(x, s, y) {
        let at = n / LANES * LANES;
        let tail = x[at..].iter().zip(&y[at..]);
        return finish_tail(
            p,
            tail.map(|(&a, &b)| {
                let d = s * f64::from(a) - f64::from(b);
                d * d
            }),
        );
    }
    sq_dist_body(x, s, y)
}

dispatched! {
    /// `accᵢ += w·xᵢ` over the shorter length.
    fn axpy(acc: &mut [f64], w: f64, x: &[f32]) -> () = axpy_body;
}

/// A sorting network for `n` values: Batcher's odd–even merge sort for the
/// next power of two, less the comparators that touch a position `≥ n`
/// (those positions hold `+∞` in the padded network, so such a comparator
/// changes nothing). Each pair `(a, b)`, `a < b`, puts the smaller value at `a`.
#[derive(Debug, Clone)]
pub struct Network {
    n: usize,
    pairs: Vec<(u16, u16)>,
}

impl Network {
    /// The network for `n ≤ 65,536` values.
    pub fn new(n: usize) -> Self {
        assert!(n <= 1 << 16, "sorting networks of at most 65,536 values");
        let size = n.next_power_of_two();
        let mut pairs = Vec::new();
        let mut p = 1;
        while p < size {
            let mut k = p;
            while k >= 1 {
                let mut j = k % p;
                while j + k < size {
                    for i in 0..k.min(size - j - k) {
                        let (a, b) = (i + j, i + j + k);
                        if a / (2 * p) == b / (2 * p) && b < n {
                            pairs.push((a as u16, b as u16));
                        }
                    }
                    j += 2 * k;
                }
                k /= 2;
            }
            p *= 2;
        }
        Self { n, pairs }
    }

    /// Values it sorts.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether it sorts nothing.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Comparators.
    pub fn comparators(&self) -> usize {
        self.pairs.len()
    }
}

#[inline(always)]
fn sort_lanes_body(v: &mut [[f32; LANES]], net: &Network) {
    for &(a, b) in &net.pairs {
        let (a, b) = (usize::from(a), usize::from(b));
        let (x, y) = (v[a], v[b]);
        let mut lo = [0.0f32; LANES];
        let mut hi = [0.0f32; LANES];
        for l in 0..LANES {
            // One of each: the column keeps its values, whatever their order.
            let less = x[l] < y[l];
            lo[l] = if less { x[l] } else { y[l] };
            hi[l] = if less { y[l] } else { x[l] };
        }
        v[a] = lo;
        v[b] = hi;
    }
}

dispatched! {
    /// Sorts each of the [`LANES`] columns of `v` (`net.len()` rows)
    /// ascending, all columns at once: a column is one coordinate of
    /// `net.len()` updates. Values must not be NaN (a NaN column comes out
    /// in some order, not sorted).
    fn sort_lanes(v: &mut [[f32; LANES]], net: &Network) -> () = sort_lanes_body;
}

/// Rows of a Gram tile, and columns.
const TILE: usize = 4;
/// Coordinates per Gram block: `TILE`-padded rows × `GRAM_BLOCK` f64 stay in L2.
const GRAM_BLOCK: usize = 512;

/// `out[i·m + j] += Σₖ buf[i·b + k]·buf[j·b + k]` for `i ≤ j` over the
/// `m` rows (a multiple of [`TILE`]) of `b` values (a multiple of 8) in
/// `buf`, in tiles of `TILE × TILE` rows, each pair's products summed in 8
/// lanes then combined in a fixed order.
#[inline(always)]
fn gram_block_body(buf: &[f64], m: usize, b: usize, out: &mut [f64]) {
    for i0 in (0..m).step_by(TILE) {
        for j0 in (i0..m).step_by(TILE) {
            let mut acc = [[[0.0f64; 8]; TILE]; TILE];
            for k in (0..b).step_by(8) {
                let a: [&[f64]; TILE] = std::array::from_fn(|d| &buf[(i0 + d) * b + k..][..8]);
                let c: [&[f64]; TILE] = std::array::from_fn(|d| &buf[(j0 + d) * b + k..][..8]);
                for di in 0..TILE {
                    for dj in 0..TILE {
                        for l in 0..8 {
                            acc[di][dj][l] += a[di][l] * c[dj][l];
                        }
                    }
                }
            }
            for di in 0..TILE {
                for dj in 0..TILE {
                    let p = acc[di][dj];
                    let s = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
                    out[(i0 + di) * m + j0 + dj] += s;
                }
            }
        }
    }
}

/// One block of [`gram`]'s products (see `gram_block_body`), with AVX-512
/// where the CPU has it (the same operations in the same order).
fn gram_block(buf: &[f64], m: usize, b: usize, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { x86::gram_block_avx512(buf, m, b, out) };
    }
    gram_block_body(buf, m, b, out)
}

/// The Gram matrix `G[i][j] = Σₖ rowsᵢₖ·rowsⱼₖ` of equal-length rows, in
/// f64, `n × n` row-major (symmetric). Each product of two f32 is exact in
/// f64; the sums run over blocks of [`GRAM_BLOCK`] coordinates, in tiles
/// that keep both rows' values in registers, blocks spread over the cores
/// in fixed groups whose sums are added in order: the result does not
/// depend on the number of threads or the vector unit.
pub fn gram(rows: &[&[f32]]) -> Vec<f64> {
    let n = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let m = n.div_ceil(TILE) * TILE;
    let blocks = len.div_ceil(GRAM_BLOCK);
    // Fixed groups of blocks: enough for two cores and more, few partial matrices.
    let group = blocks.div_ceil(16).max(1);
    let partial = |g: usize| {
        let mut out = vec![0.0f64; m * m];
        let mut buf = vec![0.0f64; m * GRAM_BLOCK];
        for blk in g * group..((g + 1) * group).min(blocks) {
            let start = blk * GRAM_BLOCK;
            let end = (start + GRAM_BLOCK).min(len);
            let b = (end - start).div_ceil(8) * 8;
            for (i, r) in rows.iter().enumerate() {
                let dst = &mut buf[i * b..(i + 1) * b];
                for (d, &v) in dst.iter_mut().zip(&r[start..end]) {
                    *d = f64::from(v);
                }
                dst[end - start..].fill(0.0);
            }
            buf[n * b..m * b].fill(0.0);
            gram_block(&buf[..m * b], m, b, &mut out);
        }
        out
    };
    let groups = blocks.div_ceil(group);
    let parts: Vec<Vec<f64>> = if n * len < PARALLEL_MIN {
        (0..groups).map(partial).collect()
    } else {
        (0..groups).into_par_iter().map(partial).collect()
    };
    let mut g = vec![0.0f64; n * n];
    for p in &parts {
        for i in 0..n {
            for j in i..n {
                g[i * n + j] += p[i * m + j];
            }
        }
    }
    for i in 0..n {
        for j in 0..i {
            g[i * n + j] = g[j * n + i];
        }
    }
    g
}

/// Sums `f` over [`CHUNK`]-sized pieces of `0..len` in parallel, combining
/// the pieces in order.
fn par_sum(len: usize, f: impl Fn(std::ops::Range<usize>) -> f64 + Sync, serial: bool) -> f64 {
    if len <= CHUNK {
        return f(0..len);
    }
    let piece = |c: usize| f(c * CHUNK..((c + 1) * CHUNK).min(len));
    let parts: Vec<f64> = if serial || len < PARALLEL_MIN {
        (0..len.div_ceil(CHUNK)).map(piece).collect()
    } else {
        (0..len.div_ceil(CHUNK))
            .into_par_iter()
            .map(piece)
            .collect()
    };
    parts.iter().sum()
}

/// [`sum_squares`] over the cores, piece by piece.
pub fn par_sum_squares(x: &[f32]) -> f64 {
    par_sum(x.len(), |r| sum_squares(&x[r]), false)
}

/// [`par_sum_squares`]'s result, to the bit, computed on the calling
/// thread only: for callers that must not start a thread pool (the edge
/// agent clipping its update), whose result the server recomputes.
pub fn chunked_sum_squares(x: &[f32]) -> f64 {
    par_sum(x.len(), |r| sum_squares(&x[r]), true)
}

/// `(Σ xᵢ², Σ xᵢ·rᵢ)` over the cores, in one pass over `x` and `r`
/// (which must have `x`'s length).
pub fn par_sum_squares_dot(x: &[f32], r: &[f32]) -> (f64, f64) {
    assert_eq!(x.len(), r.len(), "vectors of one length");
    if x.len() <= CHUNK {
        return (sum_squares(x), dot(x, r));
    }
    let piece = |(x, r): (&[f32], &[f32])| (sum_squares(x), dot(x, r));
    let parts: Vec<(f64, f64)> = if x.len() < PARALLEL_MIN {
        x.chunks(CHUNK).zip(r.chunks(CHUNK)).map(piece).collect()
    } else {
        x.par_chunks(CHUNK)
            .zip(r.par_chunks(CHUNK))
            .map(piece)
            .collect()
    };
    parts
        .iter()
        .fold((0.0, 0.0), |(s, d), &(a, b)| (s + a, d + b))
}

/// [`scaled_squared_distance`] over the cores.
pub fn par_scaled_squared_distance(x: &[f32], s: f64, y: &[f32]) -> f64 {
    let n = x.len().min(y.len());
    par_sum(
        n,
        |r| scaled_squared_distance(&x[r.clone()], s, &y[r]),
        false,
    )
}

/// [`axpy`] over the cores.
pub fn par_axpy(acc: &mut [f64], w: f64, x: &[f32]) {
    if acc.len() < PARALLEL_MIN {
        return axpy(acc, w, x);
    }
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(a, x)| axpy(a, w, x));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn vector(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Every length around the block and chunk sizes, against sequential
    /// f64 references (the lanes reorder the sum: equal within rounding).
    #[test]
    fn kernels_match_sequential_references() {
        for n in [
            0,
            1,
            15,
            16,
            17,
            33,
            1000,
            CHUNK - 1,
            CHUNK,
            CHUNK + 17,
            3 * CHUNK + 5,
        ] {
            let x = vector(n, 1);
            let y = vector(n, 2);
            let ss: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            let d: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let dist: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
            assert!(close(sum_squares(&x), ss), "n = {n}");
            assert!(close(par_sum_squares(&x), ss), "n = {n}");
            assert!(close(dot(&x, &y), d), "n = {n}");
            let (s2, d2) = par_sum_squares_dot(&x, &y);
            assert!(close(s2, ss) && close(d2, d), "n = {n}");
            assert!(close(squared_distance(&x, &y), dist), "n = {n}");
            assert!(
                close(par_scaled_squared_distance(&x, 1.0, &y), dist),
                "n = {n}"
            );
            let scaled: f64 = x
                .iter()
                .zip(&y)
                .map(|(&a, &b)| (0.75 * f64::from(a) - f64::from(b)).powi(2))
                .sum();
            assert!(
                close(par_scaled_squared_distance(&x, 0.75, &y), scaled),
                "n = {n}"
            );
            let mut acc: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
            par_axpy(&mut acc, 0.5, &x);
            for i in 0..n {
                assert_eq!(acc[i], f64::from(y[i]) + 0.5 * f64::from(x[i]));
            }
        }
    }

    /// The dispatched path rounds exactly as the baseline body: the same
    /// bits whatever vector unit ran it.
    #[test]
    fn dispatched_paths_agree_with_the_baseline_to_the_bit() {
        let x = vector(10_007, 3);
        let y = vector(10_007, 4);
        assert_eq!(sum_squares(&x).to_bits(), sum_squares_body(&x).to_bits());
        assert_eq!(dot(&x, &y).to_bits(), dot_body(&x, &y).to_bits());
        assert_eq!(
            squared_distance(&x, &y).to_bits(),
            sq_dist_body(&x, 1.0, &y).to_bits()
        );
        // Each vector unit this CPU has, explicitly: sums of squares, dot
        // products and scaled distances.
        #[cfg(target_arch = "x86_64")]
        {
            type Reduce = unsafe fn(&[f32], f64, &[f32]) -> [f64; LANES];
            let at = x.len() / LANES * LANES;
            let tail = |kind: usize| {
                x[at..].iter().zip(&y[at..]).map(move |(&a, &b)| {
                    let (a, b) = (f64::from(a), f64::from(b));
                    match kind {
                        0 => a * a,
                        1 => a * b,
                        _ => (0.3 * a - b) * (0.3 * a - b),
                    }
                })
            };
            let want = [
                sum_squares_body(&x),
                dot_body(&x, &y),
                sq_dist_body(&x, 0.3, &y),
            ];
            let mut units: Vec<(&str, [Reduce; 3])> = Vec::new();
            if std::arch::is_x86_feature_detected!("avx2") {
                units.push((
                    "avx2",
                    [
                        x86::reduce_avx2::<0>,
                        x86::reduce_avx2::<1>,
                        x86::reduce_avx2::<2>,
                    ],
                ));
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                units.push((
                    "avx512f",
                    [
                        x86::reduce_avx512::<0>,
                        x86::reduce_avx512::<1>,
                        x86::reduce_avx512::<2>,
                    ],
                ));
            }
            for (unit, reduce) in units {
                for (kind, f) in reduce.iter().enumerate() {
                    // SAFETY: the CPU has this unit (detected above).
                    let p = unsafe { f(&x, 0.3, &y) };
                    let got = finish_tail(p, tail(kind));
                    assert_eq!(got.to_bits(), want[kind].to_bits(), "{unit}, kind {kind}");
                }
            }
        }
        assert_eq!(
            scaled_squared_distance(&x, 0.3, &y).to_bits(),
            sq_dist_body(&x, 0.3, &y).to_bits()
        );
        // The parallel forms do not depend on the number of threads.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let big = vector(5 * CHUNK + 3, 5);
        let serial = one.install(|| par_sum_squares(&big));
        assert_eq!(serial.to_bits(), par_sum_squares(&big).to_bits());
        // Long enough to split over the cores: the calling-thread form
        // gives the same bits.
        let long = vector(PARALLEL_MIN + 5, 6);
        assert_eq!(
            chunked_sum_squares(&long).to_bits(),
            par_sum_squares(&long).to_bits()
        );
    }

    /// The network sorts every column for every count up to 70 (and a
    /// larger one), ties and signed zeros included, keeping each column's values.
    #[test]
    fn sorting_networks_sort_every_column() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for n in (0..=70).chain([100, 129]) {
            let net = Network::new(n);
            for _ in 0..3 {
                let mut v: Vec<[f32; LANES]> = (0..n)
                    .map(|_| {
                        std::array::from_fn(|_| match rng.random_range(0..4) {
                            0 => 0.0,
                            1 => -0.0,
                            2 => f32::from(rng.random_range(-3i8..3)),
                            _ => rng.random_range(-1.0f32..1.0),
                        })
                    })
                    .collect();
                let mut want: Vec<Vec<f32>> = (0..LANES)
                    .map(|l| v.iter().map(|r| r[l]).collect())
                    .collect();
                for c in &mut want {
                    c.sort_by(f32::total_cmp);
                }
                sort_lanes(&mut v, &net);
                for (l, want) in want.iter().enumerate() {
                    let got: Vec<f32> = v.iter().map(|r| r[l]).collect();
                    // Equal as numbers (−0 and +0 may trade places).
                    assert_eq!(&got, want, "n = {n}, column {l}");
                    let mut bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                    let mut want_bits: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                    bits.sort_unstable();
                    want_bits.sort_unstable();
                    assert_eq!(bits, want_bits, "n = {n}: the column keeps its values");
                }
            }
        }
    }

    /// The Gram matrix against direct f64 dot products, for counts that do
    /// and do not fill a tile and lengths that end mid-block.
    #[test]
    fn gram_matches_direct_dot_products() {
        for (n, len) in [
            (1, 7),
            (3, 100),
            (4, 513),
            (9, 2 * GRAM_BLOCK + 5),
            (21, 40_000),
        ] {
            let rows: Vec<Vec<f32>> = (0..n).map(|i| vector(len, 20 + i as u64)).collect();
            let refs: Vec<&[f32]> = rows.iter().map(|r| r.as_slice()).collect();
            let g = gram(&refs);
            for i in 0..n {
                for j in 0..n {
                    let want: f64 = rows[i]
                        .iter()
                        .zip(&rows[j])
                        .map(|(&a, &b)| f64::from(a) * f64::from(b))
                        .sum();
                    let got = g[i * n + j];
                    assert!(
                        (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "n {n} len {len} ({i}, {j})"
                    );
                }
            }
            // The vector path gives the portable body's bits.
            let m = n.div_ceil(TILE) * TILE;
            let b = len.min(GRAM_BLOCK).div_ceil(8) * 8;
            let mut buf = vec![0.0f64; m * b];
            for (i, r) in rows.iter().enumerate() {
                for (d, &v) in buf[i * b..].iter_mut().zip(&r[..len.min(GRAM_BLOCK)]) {
                    *d = f64::from(v);
                }
            }
            let (mut fast, mut portable) = (vec![0.0; m * m], vec![0.0; m * m]);
            gram_block(&buf, m, b, &mut fast);
            gram_block_body(&buf, m, b, &mut portable);
            assert!(
                fast.iter()
                    .zip(&portable)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
            // Bit-for-bit the same on one thread.
            let one = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let serial = one.install(|| gram(&refs));
            assert!(
                serial
                    .iter()
                    .zip(&g)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
    }

    #[test]
    fn non_finite_values_show_in_the_sums() {
        let mut x = vector(100, 6);
        x[37] = f32::NAN;
        assert!(sum_squares(&x).is_nan());
        x[37] = f32::INFINITY;
        assert!(sum_squares(&x).is_infinite());
    }
}
