//! What an idle device costs, measured: the simulator's live heap at its
//! peak, counted by this test binary's global allocator, grows by about 16
//! bytes (one check-in queue entry) per device added to the fleet
//! (ARCHITECTURE.md: "An idle device costs one check-in queue entry").
//! A binary of its own, so that no other test allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use fleet_aggregation::Cpu;
use fleet_sim::fleet::Fleet;

/// The system allocator, counting live bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak live heap bytes above the starting level during a whole run of a
/// fleet of `devices` (synthetic data, generated only for devices that train).
fn peak_of_run(devices: u32) -> (usize, fleet_sim::driver::Outcome) {
    let fleet = Fleet::from_toml(&format!(
        "seed = 11\ndevices = {devices}\nmodel = \"logreg\"\n\
         [data]\nset = \"synthetic\"\nexamples = 40\n\
         [task]\nrounds = 3\ntarget = 10\nepochs = 1\nlr = 0.05\n"
    ))
    .unwrap();
    let (data, test) = fleet_sim::data::load(&fleet).unwrap();
    // One thread: the same work, in the same order, whatever the fleet size.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = pool
        .install(|| fleet_sim::driver::run(&fleet, &data, &test, &Cpu, |_| {}))
        .unwrap();
    (PEAK.load(Ordering::Relaxed) - base, out)
}

#[test]
fn an_idle_device_costs_one_sixteen_byte_queue_entry() {
    let (small, n_small) = (100_000u32, peak_of_run(100_000));
    let (large, n_large) = (300_000u32, peak_of_run(300_000));
    let per_device = (n_large.0 as f64 - n_small.0 as f64) / f64::from(large - small);
    eprintln!(
        "peak heap: {} bytes for {small} devices, {} for {large}: {per_device:.2} bytes per device",
        n_small.0, n_large.0
    );
    assert_eq!(n_small.1.logs.len(), 3);
    assert_eq!(n_large.1.logs.len(), 3);
    assert!(
        (15.0..=18.0).contains(&per_device),
        "an idle device should cost one 16-byte queue entry; measured {per_device:.2} bytes"
    );
    // The run's report says what was measured.
    assert!(
        (per_device - n_large.1.stats.bytes_per_idle_device as f64).abs() <= 2.0,
        "reported {} bytes per idle device, measured {per_device:.2}",
        n_large.1.stats.bytes_per_idle_device
    );
}
