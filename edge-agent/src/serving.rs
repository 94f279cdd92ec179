//! The deployed model as apps see it: the [`Serving`] slot holding the
//! [`Predictor`] (empty until a model is installed, then hot-swapped), its
//! [`DriftObserver`] summarising what is served, and the Unix socket that
//! serves it ([`serve_socket`]).
//!
//! Nothing here talks to the coordinator: the services install models into
//! the slot and take the drift summaries out.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::inference::{Model, Predictor, endpoint};
use crate::log::log;
use tracing::Instrument;

pub mod observer;

pub use observer::DriftObserver;

/// The predictor apps are served from, empty until a model is installed.
/// Every prediction also feeds its drift summary ([`DriftObserver`]).
#[derive(Debug, Default)]
pub struct Serving {
    predictor: OnceLock<Arc<Predictor<Arc<DriftObserver>>>>,
    drift: Arc<DriftObserver>,
    /// The coordinator's deployment number of the serving model (0: none).
    deployment: AtomicU64,
}

impl Serving {
    /// An empty slot, summarising every prediction for drift monitoring.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty slot, summarising one prediction in `every` (0: none).
    pub fn with_drift_sampling(every: u64) -> Arc<Self> {
        Arc::new(Self {
            drift: Arc::new(DriftObserver::sampling(every)),
            ..Self::default()
        })
    }

    /// The predictor, once a model is installed.
    pub fn predictor(&self) -> Option<Arc<Predictor<Arc<DriftObserver>>>> {
        self.predictor.get().cloned()
    }

    /// The drift summary of what was served.
    pub fn drift(&self) -> &Arc<DriftObserver> {
        &self.drift
    }

    /// The deployment number of the serving model, once one is installed.
    pub fn deployment(&self) -> Option<u64> {
        Some(self.deployment.load(Ordering::Acquire)).filter(|&d| d > 0)
    }

    /// Serves `model`: the first one creates the predictor, later ones are
    /// hot-swapped in. Returns the version that served before, if any.
    pub fn install(&self, model: Model) -> Option<u64> {
        log!(format!(
            "model version {} ({} {}) runs tract kernels: {}",
            model.version(),
            model.meta().spec.name(),
            model.meta().variant,
            model.kernels().join(", ")
        ));
        let mut slot = Some(model);
        let predictor = self.predictor.get_or_init(|| {
            Arc::new(Predictor::with_observer(
                slot.take().expect("taken only once"),
                self.drift.clone(),
            ))
        });
        slot.map(|m| predictor.swap(m).from)
    }

    /// Records which deployment the installed model came with.
    pub(crate) fn set_deployment(&self, deployment: u64) {
        self.deployment.store(deployment, Ordering::Release);
    }
}

/// Serves predictions from `serving` on a Unix socket at `path` (replacing
/// a stale socket file) until the task is aborted; `no_model` until a model
/// is installed.
pub fn serve_socket(
    path: &Path,
    serving: Arc<Serving>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    // Owner only; the endpoint also checks each peer's user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    log!(format!("serving predictions on {}", path.display()));
    Ok(tokio::spawn(
        async move {
            let current = move || serving.predictor();
            if let Err(e) = endpoint::serve_current(listener, current, std::future::pending()).await
            {
                log!(format!("prediction socket failed: {e}"));
            }
        }
        .in_current_span(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[tokio::test]
    async fn the_prediction_socket_is_the_owners_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fleet-socket-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("predict.sock");
        let task = serve_socket(&path, Serving::new()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
