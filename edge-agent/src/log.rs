//! The agent's log lines: [`log!`] writes one through `tracing` at `info`,
//! with the calling module as its target (so `deploy`, `drift`, `serving`
//! and `run` lines name their service). The binary installs the subscriber
//! (`fleet_protocol::logging`, text or JSON lines); an embedder that
//! installs none, such as the simulator's network mode, hears nothing.

/// Logs one line (anything that is `AsRef<str>`) at `info`.
macro_rules! log {
    ($line:expr) => {
        tracing::info!("{}", AsRef::<str>::as_ref(&$line))
    };
}

pub(crate) use log;
