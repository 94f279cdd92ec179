//! The NVIDIA GPU backend of [`Compute`], through cudarc (feature `cuda`).
//!
//! Nothing CUDA is needed at build time: the driver library (`libcuda.so.1`)
//! and NVRTC (`libnvrtc.so.13` or `.12`) are opened by [`Cuda::new`], which
//! fails with a [`CudaError`] naming what is missing rather than panicking.
//! The kernels (`cuda/kernels.cu`) are compiled then with NVRTC into a cubin
//! for the device's own architecture (a cubin, not PTX, so that an NVRTC newer
//! than the driver still works), with fused multiply-add off so that results
//! round as the CPU reference does.
//!
//! - The weighted sum streams: each update is copied in chunks through two
//!   page-locked staging buffers; the copy of chunk k+1 (on a copy stream)
//!   overlaps the accumulate kernel of chunk k (on a work stream), ordered by
//!   cudarc's per-buffer events. GPU memory is one f64 accumulator and two
//!   chunks, whatever the number of updates.
//! - Median, trimmed mean and Bulyan's mean around the median run one thread
//!   per coordinate over the row-major matrix of updates (coalesced without a
//!   transpose), sorting the column in a per-thread array of at most
//!   `MAX_ROWS` values; more rows than that are left to the CPU.
//! - Squared distances are summed from the differences themselves in f64
//!   (tiled over pairs of rows and segments of coordinates), not from a Gram
//!   matrix: `|a|² + |b|² − 2a·b` cancels badly for close updates, and this
//!   needs no cuBLAS.
//!
//! A driver error during a one-shot kernel (robust rules, server step) is
//! reported on stderr and the call is recomputed on the CPU, host data being
//! written only after every copy back succeeded; a failed weighted sum is
//! reported by [`WeightedSum::finish`].

use std::ffi::{CStr, CString};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use cudarc::nvrtc::{self, Ptx};
use rayon::prelude::*;

use crate::compute::{Compute, Cpu, WeightedSum};
use crate::error::{Error, Result};
use crate::strategy::ServerOptimizer;

/// CUDA C source of the kernels.
const KERNELS: &str = include_str!("cuda/kernels.cu");

/// Most updates the per-coordinate kernels take (`MAX_ROWS` in the source).
pub const MAX_ROWS: usize = 512;

/// Target values per staging chunk of the weighted sum (16 MiB of f32).
const STAGING: usize = 4 << 20;

/// Threads per block of the element-wise and per-coordinate kernels.
const BLOCK: u32 = 256;

/// Why the CUDA backend could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No CUDA driver library.
    #[error(
        "the CUDA driver library (libcuda.so.1) was not found: install the NVIDIA driver or add its directory to LD_LIBRARY_PATH"
    )]
    NoDriver,
    /// No NVRTC library.
    #[error(
        "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found: install the CUDA runtime compiler or add its directory to LD_LIBRARY_PATH"
    )]
    NoNvrtc,
    /// A CUDA driver call failed (no device, out of memory, …).
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// The kernels did not compile.
    #[error("compiling the kernels with NVRTC for {arch}: {message}")]
    Compile {
        /// The target architecture, `sm_XY`.
        arch: String,
        /// NVRTC's error and log.
        message: String,
    },
    /// The CUDA library panicked (a missing symbol in an old driver, …).
    #[error("the CUDA library failed: {0}")]
    Panicked(String),
}

/// Compiled kernels of one context.
#[derive(Clone)]
struct Kernels {
    accumulate: CudaFunction,
    server_step: CudaFunction,
    median: CudaFunction,
    trimmed_mean: CudaFunction,
    mean_around_median: CudaFunction,
    pair_distances: CudaFunction,
}

/// The CUDA backend on one device.
pub struct Cuda {
    ordinal: usize,
    device: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    k: Kernels,
    /// Computations that failed on the GPU and were done on the CPU instead.
    fallbacks: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("ordinal", &self.ordinal)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Cuda {
    /// Opens device `ordinal` and compiles the kernels for it. Fails, without
    /// panicking, when the driver or NVRTC library is missing, when there is
    /// no such device, or when the kernels do not compile.
    pub fn new(ordinal: usize) -> Result<Cuda, CudaError> {
        // SAFETY: only tries to open the shared libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        // SAFETY: as above.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            return Err(CudaError::NoNvrtc);
        }
        // cudarc panics when a symbol is missing from the loaded library.
        std::panic::catch_unwind(|| Self::open(ordinal)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(CudaError::Panicked(msg))
        })
    }

    fn open(ordinal: usize) -> Result<Cuda, CudaError> {
        let ctx = CudaContext::new(ordinal)?;
        let device = ctx.name()?;
        let (major, minor) = ctx.compute_capability()?;
        let cubin = compile(&format!("sm_{major}{minor}"))?;
        let module = ctx.load_module(Ptx::from_binary(cubin))?;
        let k = Kernels {
            accumulate: module.load_function("accumulate")?,
            server_step: module.load_function("server_step")?,
            median: module.load_function("median")?,
            trimmed_mean: module.load_function("trimmed_mean")?,
            mean_around_median: module.load_function("mean_around_median")?,
            pair_distances: module.load_function("pair_distances")?,
        };
        let stream = ctx.new_stream()?;
        Ok(Cuda {
            ordinal,
            device,
            ctx,
            stream,
            k,
            fallbacks: Default::default(),
        })
    }

    /// How many computations failed on the GPU and were done on the CPU
    /// instead (each also logged): 0 on a healthy device. Rows the kernels
    /// do not take by design (more than [`MAX_ROWS`]) are not counted.
    pub fn cpu_fallbacks(&self) -> u64 {
        self.fallbacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The device's name, as the driver reports it.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// Measures the page-locked host-to-device copy rate in GB/s: `bytes`
    /// copied `repeats` times from one pinned buffer (the ceiling of the
    /// streaming weighted sum, for benchmarks).
    pub fn pinned_copy_rate(&self, bytes: usize, repeats: usize) -> Result<f64, CudaError> {
        let n = (bytes / 4).max(1);
        // SAFETY: filled before use.
        let mut host = unsafe { self.ctx.alloc_pinned::<f32>(n) }?;
        host.as_mut_slice()?.fill(1.0);
        // SAFETY: only written by the copies.
        let mut dev = unsafe { self.stream.alloc::<f32>(n) }?;
        self.stream.memcpy_htod(&host, &mut dev)?;
        self.stream.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..repeats {
            self.stream.memcpy_htod(&host, &mut dev)?;
        }
        self.stream.synchronize()?;
        Ok((n * 4 * repeats) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }

    /// The rows as one row-major device matrix.
    fn upload(&self, rows: &[Vec<f32>], d: usize) -> Result<CudaSlice<f32>, DriverError> {
        // SAFETY: every element is written by the copies below.
        let mut mat = unsafe { self.stream.alloc::<f32>(rows.len() * d) }?;
        for (i, r) in rows.iter().enumerate() {
            self.stream
                .memcpy_htod(&r[..d], &mut mat.slice_mut(i * d..(i + 1) * d))?;
        }
        Ok(mat)
    }

    /// Runs one per-coordinate kernel (`extra` is its int argument, if any).
    fn per_coordinate(
        &self,
        f: &CudaFunction,
        rows: &[Vec<f32>],
        extra: Option<i32>,
    ) -> Result<Vec<f32>, DriverError> {
        let d = rows[0].len();
        let x = self.upload(rows, d)?;
        // SAFETY: every element is written by the kernel.
        let mut out = unsafe { self.stream.alloc::<f32>(d) }?;
        let n = rows.len() as i32;
        let len = d as u64;
        let mut b = self.stream.launch_builder(f);
        b.arg(&x).arg(&n).arg(&len);
        if let Some(e) = extra.as_ref() {
            b.arg(e);
        }
        b.arg(&mut out);
        // SAFETY: the argument list matches the kernel's signature; the grid
        // strides over all `d` coordinates.
        unsafe { b.launch(grid(d)) }?;
        let host = self.stream.clone_dtoh(&out)?;
        self.stream.synchronize()?;
        Ok(host)
    }

    fn distances(&self, rows: &[Vec<f32>]) -> Result<Vec<f64>, DriverError> {
        let n = rows.len();
        let d = rows[0].len();
        let x = self.upload(rows, d)?;
        let mut out = self.stream.alloc_zeros::<f64>(n * n)?;
        let tiles = n.div_ceil(16);
        let pairs = tiles * (tiles + 1) / 2;
        // Enough blocks to fill a large GPU: split the coordinates into segments.
        let segs = 2048usize.div_ceil(pairs).clamp(1, d.div_ceil(32));
        let seg = d.div_ceil(segs).div_ceil(32) * 32;
        let segs = d.div_ceil(seg);
        let (nn, dd, ss) = (n as i32, d as u64, seg as u64);
        let cfg = LaunchConfig {
            grid_dim: (pairs as u32, segs as u32, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.k.pair_distances);
        b.arg(&x).arg(&nn).arg(&dd).arg(&ss).arg(&mut out);
        // SAFETY: arguments match the kernel; the grid covers every tile pair
        // and every segment of coordinates.
        unsafe { b.launch(cfg) }?;
        let mut host = self.stream.clone_dtoh(&out)?;
        self.stream.synchronize()?;
        for i in 0..n {
            for j in 0..i {
                host[i * n + j] = host[j * n + i];
            }
        }
        Ok(host)
    }

    fn step(
        &self,
        step: &ServerOptimizer,
        global: &mut [f32],
        delta: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) -> Result<(), DriverError> {
        let len = global.len();
        let (kind, lr, a, b, tau) = match *step {
            ServerOptimizer::Sgd { lr } => (0i32, lr, 0.0, 0.0, 0.0),
            ServerOptimizer::Momentum { lr, momentum } => (1, lr, momentum, 0.0, 0.0),
            ServerOptimizer::Adagrad { lr, beta1, tau } => (2, lr, beta1, 0.0, tau),
            ServerOptimizer::Adam {
                lr,
                beta1,
                beta2,
                tau,
            } => (3, lr, beta1, beta2, tau),
            ServerOptimizer::Yogi {
                lr,
                beta1,
                beta2,
                tau,
            } => (4, lr, beta1, beta2, tau),
        };
        let s = &self.stream;
        let mut x = s.clone_htod(&global[..])?;
        let dd = s.clone_htod(&delta[..len])?;
        // Sgd reads no state and Momentum no second moment: a placeholder then.
        let mut dm = if kind >= 1 {
            s.clone_htod(&m[..len])?
        } else {
            s.alloc_zeros::<f32>(1)?
        };
        let mut dv = if kind >= 2 {
            s.clone_htod(&v[..len])?
        } else {
            s.alloc_zeros::<f32>(1)?
        };
        let n = len as u64;
        let mut bld = s.launch_builder(&self.k.server_step);
        bld.arg(&kind).arg(&lr).arg(&a).arg(&b).arg(&tau);
        bld.arg(&mut x).arg(&dd).arg(&mut dm).arg(&mut dv).arg(&n);
        // SAFETY: arguments match the kernel; buffers hold `len` values where
        // the rule reads them.
        unsafe { bld.launch(grid(len)) }?;
        let new_x = s.clone_dtoh(&x)?;
        let new_m = if kind >= 1 {
            Some(s.clone_dtoh(&dm)?)
        } else {
            None
        };
        let new_v = if kind >= 2 {
            Some(s.clone_dtoh(&dv)?)
        } else {
            None
        };
        s.synchronize()?;
        global.copy_from_slice(&new_x);
        if let Some(new_m) = new_m {
            m[..len].copy_from_slice(&new_m);
        }
        if let Some(new_v) = new_v {
            v[..len].copy_from_slice(&new_v);
        }
        Ok(())
    }

    /// The GPU result, or the CPU's after reporting why the GPU failed.
    fn or_cpu<T>(&self, what: &str, r: Result<T, DriverError>, cpu: impl FnOnce() -> T) -> T {
        r.unwrap_or_else(|e| {
            self.fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "warning: {} failed on {} ({e}); computed on the CPU instead",
                what,
                self.name()
            );
            cpu()
        })
    }

    /// Whether the per-coordinate kernels take these rows.
    fn fits(rows: &[Vec<f32>]) -> bool {
        !rows.is_empty() && rows.len() <= MAX_ROWS && !rows[0].is_empty()
    }
}

/// Launch shape of the grid-stride kernels over `len` elements.
fn grid(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Compiles the kernels with NVRTC into a cubin for `arch` (`sm_XY`).
fn compile(arch: &str) -> Result<Vec<u8>, CudaError> {
    let fail = |message: String| CudaError::Compile {
        arch: arch.to_string(),
        message,
    };
    let src = CString::new(KERNELS).map_err(|e| fail(e.to_string()))?;
    let prog = nvrtc::result::create_program(&src, Some(c"fleet_kernels.cu"))
        .map_err(|e| fail(e.to_string()))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--fmad=false".to_string(),
    ];
    // SAFETY: `prog` is a live program; it is destroyed once below.
    let out = unsafe {
        match nvrtc::result::compile_program(prog, &opts) {
            Ok(()) => cubin(prog).map_err(|e| fail(e.to_string())),
            Err(e) => {
                let log = nvrtc::result::get_program_log(prog)
                    .map(|l| CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                Err(fail(format!("{e}: {log}")))
            }
        }
    };
    // SAFETY: created above, not used afterwards.
    let _ = unsafe { nvrtc::result::destroy_program(prog) };
    out
}

/// The compiled cubin of a program.
///
/// # Safety
/// `prog` must be a successfully compiled, live program.
unsafe fn cubin(prog: nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>, nvrtc::result::NvrtcError> {
    let mut size = 0usize;
    // SAFETY: per the caller's contract; `size` is a valid out pointer.
    unsafe { nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds the `size` bytes NVRTC reported.
    unsafe { nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result()?;
    Ok(buf)
}

/// The streaming weighted sum on the GPU.
struct GpuSum {
    copy: Arc<CudaStream>,
    work: Arc<CudaStream>,
    accumulate: CudaFunction,
    acc: CudaSlice<f64>,
    host: [PinnedHostSlice<f32>; 2],
    dev: [CudaSlice<f32>; 2],
    chunk: usize,
    next: usize,
    error: Option<String>,
}

impl GpuSum {
    fn new(gpu: &Cuda, len: usize) -> Result<GpuSum, DriverError> {
        let pieces = len.div_ceil(STAGING).max(1);
        // Equal chunks, so that the last one copies at most `pieces` spare values.
        let chunk = len.div_ceil(pieces).max(1);
        let copy = gpu.ctx.new_stream()?;
        let work = gpu.ctx.new_stream()?;
        let acc = work.alloc_zeros::<f64>(len.max(1))?;
        let pinned = || -> Result<PinnedHostSlice<f32>, DriverError> {
            // SAFETY: zero-filled before any use.
            let mut h = unsafe { gpu.ctx.alloc_pinned::<f32>(chunk) }?;
            h.as_mut_slice()?.fill(0.0);
            Ok(h)
        };
        let host = [pinned()?, pinned()?];
        let dev = [
            copy.alloc_zeros::<f32>(chunk)?,
            copy.alloc_zeros::<f32>(chunk)?,
        ];
        Ok(GpuSum {
            copy,
            work,
            accumulate: gpu.k.accumulate.clone(),
            acc,
            host,
            dev,
            chunk,
            next: 0,
            error: None,
        })
    }

    fn try_add(&mut self, weight: f64, x: &[f32]) -> Result<(), DriverError> {
        let len = x.len().min(self.acc.len());
        let mut off = 0;
        while off < len {
            let n = self.chunk.min(len - off);
            let s = self.next;
            self.next ^= 1;
            // Waits until the copy that last read this staging buffer is done.
            let staging = self.host[s].as_mut_slice()?;
            staging[..n]
                .par_chunks_mut(1 << 16)
                .zip(x[off..off + n].par_chunks(1 << 16))
                .for_each(|(a, b)| a.copy_from_slice(b));
            // Asynchronous; waits for the kernel that last read dev[s].
            self.copy.memcpy_htod(&self.host[s], &mut self.dev[s])?;
            let (o, nn) = (off as u64, n as u64);
            let mut b = self.work.launch_builder(&self.accumulate);
            b.arg(&mut self.acc)
                .arg(&self.dev[s])
                .arg(&weight)
                .arg(&o)
                .arg(&nn);
            // SAFETY: arguments match the kernel; `off + n ≤ acc.len()` and
            // `n ≤ dev[s].len()`. The launch waits for the copy into dev[s].
            unsafe { b.launch(grid(n)) }?;
            off += n;
        }
        Ok(())
    }
}

impl WeightedSum for GpuSum {
    fn add(&mut self, weight: f64, x: &[f32]) {
        if self.error.is_none()
            && let Err(e) = self.try_add(weight, x)
        {
            self.error = Some(e.to_string());
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<f64>> {
        if let Some(e) = self.error {
            return Err(Error::Compute(format!("CUDA weighted sum: {e}")));
        }
        let len = self.acc.len();
        let out = self
            .work
            .clone_dtoh(&self.acc)
            .and_then(|v| self.work.synchronize().map(|()| v))
            .map_err(|e| Error::Compute(format!("CUDA weighted sum: {e}")))?;
        debug_assert_eq!(out.len(), len);
        Ok(out)
    }
}

/// A weighted sum whose GPU buffers could not be set up: reports at `finish`.
struct FailedSum(String);

impl WeightedSum for FailedSum {
    fn add(&mut self, _weight: f64, _x: &[f32]) {}

    fn finish(self: Box<Self>) -> Result<Vec<f64>> {
        Err(Error::Compute(format!(
            "CUDA weighted sum could not start: {}",
            self.0
        )))
    }
}

/// The empty sum (length 0) needs no device buffers.
struct EmptySum;

impl WeightedSum for EmptySum {
    fn add(&mut self, _weight: f64, _x: &[f32]) {}

    fn finish(self: Box<Self>) -> Result<Vec<f64>> {
        Ok(Vec::new())
    }
}

impl Compute for Cuda {
    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.device)
    }

    fn weighted_sum(&self, len: usize) -> Box<dyn WeightedSum> {
        if len == 0 {
            return Box::new(EmptySum);
        }
        match GpuSum::new(self, len) {
            Ok(s) => Box::new(s),
            Err(e) => Box::new(FailedSum(e.to_string())),
        }
    }

    fn trimmed_mean(&self, rows: &[Vec<f32>], trim: usize) -> Vec<f32> {
        if !Self::fits(rows) || 2 * trim >= rows.len() {
            return Cpu.trimmed_mean(rows, trim);
        }
        let r = self.per_coordinate(&self.k.trimmed_mean, rows, Some(trim as i32));
        self.or_cpu("trimmed mean", r, || Cpu.trimmed_mean(rows, trim))
    }

    fn median(&self, rows: &[Vec<f32>]) -> Vec<f32> {
        if !Self::fits(rows) {
            return Cpu.median(rows);
        }
        let r = self.per_coordinate(&self.k.median, rows, None);
        self.or_cpu("median", r, || Cpu.median(rows))
    }

    fn mean_around_median(&self, rows: &[Vec<f32>], keep: usize) -> Vec<f32> {
        if !Self::fits(rows) || keep == 0 || keep > rows.len() {
            return Cpu.mean_around_median(rows, keep);
        }
        let r = self.per_coordinate(&self.k.mean_around_median, rows, Some(keep as i32));
        self.or_cpu("mean around the median", r, || {
            Cpu.mean_around_median(rows, keep)
        })
    }

    fn squared_distances(&self, rows: &[Vec<f32>]) -> Vec<f64> {
        if rows.len() < 2 || rows[0].is_empty() {
            return Cpu.squared_distances(rows);
        }
        let r = self.distances(rows);
        self.or_cpu("squared distances", r, || Cpu.squared_distances(rows))
    }

    fn server_step(
        &self,
        step: &ServerOptimizer,
        global: &mut [f32],
        delta: &[f32],
        m: &mut [f32],
        v: &mut [f32],
    ) {
        if global.is_empty() {
            return;
        }
        let r = self.step(step, global, delta, m, v);
        if let Err(e) = r {
            self.fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "warning: server step failed on {} ({e}); computed on the CPU instead",
                self.name()
            );
            Cpu.server_step(step, global, delta, m, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the environment explicitly says there is no GPU here
    /// (`FLEET_SKIP_GPU=1`; see the README's test section).
    fn no_gpu_expected() -> bool {
        std::env::var("FLEET_SKIP_GPU").as_deref() == Ok("1")
    }

    /// The kernel source compiles wherever NVRTC is installed (no GPU needed).
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to open the library.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            assert!(
                no_gpu_expected(),
                "{}; or set FLEET_SKIP_GPU=1 to skip the GPU tests",
                CudaError::NoNvrtc
            );
            eprintln!("SKIPPED (FLEET_SKIP_GPU=1): {}", CudaError::NoNvrtc);
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let cubin = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{arch}: not an ELF cubin");
        }
    }

    /// With a GPU the constructor opens device 0; where `FLEET_SKIP_GPU=1`
    /// says there is none, it returns an error that says what is missing
    /// instead of panicking. A device that does not exist is an error.
    #[test]
    fn new_opens_the_gpu_or_says_what_is_missing() {
        match Cuda::new(0) {
            Ok(gpu) => {
                assert!(gpu.name().starts_with("cuda:0 ("), "{}", gpu.name());
                assert_eq!(gpu.cpu_fallbacks(), 0);
            }
            Err(e) => {
                assert!(
                    no_gpu_expected(),
                    "no usable GPU: {e}; or set FLEET_SKIP_GPU=1 to skip the GPU tests"
                );
                let text = e.to_string();
                assert!(
                    text.contains("not found") || text.contains("CUDA driver"),
                    "an error that says what is missing: {text}"
                );
            }
        }
        assert!(Cuda::new(usize::MAX >> 1).is_err(), "no such device");
    }
}
