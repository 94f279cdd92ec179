//! Int8 inference reads no byte past the end of its buffers.
//!
//! This test binary installs a guard-page allocator: while it is armed, every
//! allocation of a page or more is placed so that it ends (up to its
//! alignment) right before a page that is mapped with no access, and is never
//! reused once freed. A kernel that reads past the end of a buffer it was
//! handed then takes SIGSEGV on every run, instead of only when the heap
//! happens to put the buffer's end at an unmapped page. tract 0.23.9's AMX
//! int8 kernels did exactly that (`docs/tract-amx-overread.md`); on a CPU
//! without AMX the same test checks whichever kernels tract selects there.
//!
//! A failure shows as this binary dying with `signal: 11, SIGSEGV`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use fleet_edge_agent::inference::Model;
use fleet_models::ModelSpec;
use fleet_models::data::embedded;
use fleet_models::data::fashion::Split;
use fleet_models::export::{self, ExportInfo, QuantConfig};

const PAGE: usize = 4096;
/// Address space reserved (never committed) for guarded allocations.
const ARENA_BYTES: usize = 1 << 36;

struct GuardPages;

/// How many callers have armed the guard (tests run on several threads).
static ARMED: AtomicUsize = AtomicUsize::new(0);
static ARENA: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn arena() -> usize {
    let a = ARENA.load(Ordering::Acquire);
    if a != 0 {
        return a;
    }
    // SAFETY: an anonymous, inaccessible reservation; nothing aliases it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ARENA_BYTES,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "could not reserve the guard arena");
    match ARENA.compare_exchange(0, p as usize, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => p as usize,
        Err(other) => {
            // SAFETY: our own reservation, never handed out.
            unsafe { libc::munmap(p, ARENA_BYTES) };
            other
        }
    }
}

fn in_arena(ptr: usize) -> bool {
    let a = ARENA.load(Ordering::Acquire);
    a != 0 && ptr >= a && ptr < a + ARENA_BYTES
}

// SAFETY: guarded blocks are fresh, exclusively owned, readable and writable
// pages of at least `layout.size()` bytes at `layout.align()`; every other
// request goes to the system allocator, and `dealloc` tells the two apart by
// address.
unsafe impl GlobalAlloc for GuardPages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) == 0 || layout.size() < PAGE || layout.align() > PAGE {
            // SAFETY: forwarded unchanged.
            return unsafe { System.alloc(layout) };
        }
        let data = layout.size().div_ceil(PAGE) * PAGE;
        let base = arena();
        let offset = NEXT.fetch_add(data + PAGE, Ordering::Relaxed);
        if offset + data + PAGE > ARENA_BYTES {
            // SAFETY: forwarded unchanged.
            return unsafe { System.alloc(layout) };
        }
        let start = base + offset;
        // SAFETY: pages of our reservation, handed to nobody else; the
        // page after them stays PROT_NONE.
        let rc = unsafe {
            libc::mprotect(
                start as *mut libc::c_void,
                data,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return std::ptr::null_mut();
        }
        ((start + data - layout.size()) & !(layout.align() - 1)) as *mut u8
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let p = ptr as usize;
        if !in_arena(p) {
            // SAFETY: it came from the system allocator.
            return unsafe { System.dealloc(ptr, layout) };
        }
        let start = p & !(PAGE - 1);
        let end = (p + layout.size()).div_ceil(PAGE) * PAGE;
        // SAFETY: the block's own pages; they are never handed out again,
        // so a use after free faults too.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_NONE);
        }
    }
}

#[global_allocator]
static ALLOCATOR: GuardPages = GuardPages;

/// Runs `f` with guarded allocations.
fn armed<T>(f: impl FnOnce() -> T) -> T {
    ARMED.fetch_add(1, Ordering::SeqCst);
    let out = f();
    ARMED.fetch_sub(1, Ordering::SeqCst);
    out
}

const SELF_TEST: &str = "FLEET_GUARD_PAGES_SELF_TEST";

/// The harness itself: a read one byte past a guarded buffer must kill the
/// process with SIGSEGV (checked in a child process running this test).
#[test]
fn a_read_past_a_guarded_buffer_faults() {
    if std::env::var_os(SELF_TEST).is_some() {
        let v: Vec<u8> = armed(|| vec![7u8; 3 * PAGE + 100]);
        let past = v.as_ptr().wrapping_add(v.len() + 63);
        // SAFETY: deliberately not safe: this read must fault.
        let byte = unsafe { std::ptr::read_volatile(past) };
        println!("read {byte} past the end without a fault");
        std::process::exit(0);
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_read_past_a_guarded_buffer_faults",
            "--test-threads=1",
        ])
        .env(SELF_TEST, "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "the child should have died reading past its buffer: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Guarded buffers hold what is written to them, at the alignment asked for.
#[test]
fn guarded_buffers_are_usable() {
    armed(|| {
        for (size, align) in [(PAGE, 8), (PAGE + 1, 16), (10 * PAGE + 17, 64)] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero layout; freed with the same layout below.
            let p = unsafe { ALLOCATOR.alloc(layout) };
            assert!(!p.is_null());
            assert!(in_arena(p as usize), "{size} bytes were not guarded");
            assert_eq!(p as usize % align, 0);
            // SAFETY: `size` bytes owned by this block.
            unsafe {
                std::ptr::write_bytes(p, 0xA5, size);
                assert_eq!(*p.add(size - 1), 0xA5);
                ALLOCATOR.dealloc(p, layout);
            }
        }
    });
}

/// Both models, int8, batch sizes from 1 to 64, from four threads at once,
/// with every allocation of a page or more guarded: each answer equals the
/// unguarded one-thread answer, and no read strays past a buffer.
#[test]
fn int8_inference_reads_only_its_own_buffers() {
    const THREADS: usize = 4;
    let train = embedded::load(Split::Train).unwrap();
    let test = Arc::new(embedded::load(Split::Test).unwrap());
    // Every batch size for the 2NN; every ninth for the CNN, whose larger
    // batches are slow in a debug build (the over-read does not depend on
    // the batch size: every B buffer is guarded).
    let cases = [
        (ModelSpec::fashion_2nn(), (1..=64).collect::<Vec<usize>>()),
        (ModelSpec::fashion_cnn(), (1..=64).step_by(9).collect()),
    ];
    for (spec, batches) in cases {
        // Untrained weights are enough: this is about memory, not accuracy.
        let onnx = export::quantize(
            &spec,
            &spec.init_params(3),
            &ExportInfo::fashion_mnist(1),
            train.view(),
            &QuantConfig::default(),
        )
        .unwrap()
        .onnx;
        let model = Arc::new(Model::load(onnx.clone(), None).unwrap());
        let reference: Arc<Vec<(usize, Vec<f32>)>> = Arc::new(
            batches
                .iter()
                .map(|&n| {
                    let logits = model.predict(&test.features()[..n * 784]).unwrap().logits;
                    (n, logits)
                })
                .collect(),
        );
        armed(|| {
            // Loaded while armed: its packed weights are guarded too.
            let fresh = Arc::new(Model::load(onnx, None).unwrap());
            let workers: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (model, fresh, test, reference) = (
                        Arc::clone(&model),
                        Arc::clone(&fresh),
                        Arc::clone(&test),
                        Arc::clone(&reference),
                    );
                    std::thread::spawn(move || {
                        let k = reference.len();
                        for i in 0..k {
                            let (n, expected) = &reference[(i * (2 * t + 1) + 5 * t) % k];
                            // A copy, so that the input is guarded as well.
                            let x = test.features()[..n * 784].to_vec();
                            for m in [&model, &fresh] {
                                assert!(
                                    m.predict(&x).unwrap().logits == *expected,
                                    "thread {t}, batch {n}"
                                );
                            }
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().expect("a prediction thread panicked");
            }
        });
    }
}
