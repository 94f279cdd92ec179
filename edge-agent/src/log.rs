//! The agent's log lines on stderr, `[edge-agent <seconds>s] <line>`,
//! silenced by [`set_quiet`] for embedders that run many agents in one
//! process (the simulator's network mode).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static QUIET: AtomicBool = AtomicBool::new(false);

/// Silences the agent's log lines.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Writes one log line (unless silenced).
pub(crate) fn log(line: impl AsRef<str>) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    static START: OnceLock<Instant> = OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[edge-agent {t:9.3}s] {}", line.as_ref());
}
