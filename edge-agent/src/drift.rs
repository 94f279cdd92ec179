//! The drift reporting service of `edge-agent run`: once per reporting
//! window ([`report`]) a short session of its own sends the closed window's
//! summary (with the device's cohort tags) for the deployment that served
//! it, and asks for the current sketch (`GetDriftSpec`); the sketch is
//! applied only when it belongs to the deployment the device serves, so a
//! summary always describes one model version. With [`DriftPrivacy`] each
//! summary is noised and accounted first, and none is sent past the budget.
//!
//! The summaries themselves are collected while serving, by
//! [`crate::serving::DriftObserver`].

use std::sync::Arc;
use std::time::Duration;

use fleet_aggregation::privacy::accountant::AccountantError;
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_drift::private::privatize;
use fleet_drift::{SketchSpec, Summary, SummaryError};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, DriftReport};

use crate::log::log;
use crate::serving::Serving;
pub use crate::serving::observer::{DriftObserver, RECENT};
use crate::session::{Coordinator, SessionError};
use crate::state::StateDir;

/// Why a noised summary was not released, or the ledger not opened.
#[derive(Debug, thiserror::Error)]
pub enum PrivacyError {
    /// The noise multiplier is not a positive number.
    #[error("drift noise multiplier {0} must be a finite number > 0")]
    Multiplier(f64),
    /// The budget is not a valid (ε, δ).
    #[error("drift budget: {0}")]
    Budget(#[source] AccountantError),
    /// The next summary would exceed the budget: no more are sent.
    #[error("no more drift summaries: the privacy budget would be exceeded ({0})")]
    Spent(#[source] AccountantError),
    /// Accounting failed.
    #[error(transparent)]
    Accountant(#[from] AccountantError),
    /// Noising failed.
    #[error(transparent)]
    Noise(#[from] fleet_aggregation::Error),
    /// The ledger could not be read or saved in the state directory.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// Differential privacy for the summaries this device sends: Gaussian noise
/// with `noise_multiplier` per window, each window accounted as one
/// Gaussian release in a ledger kept in the state directory, and no more
/// summaries once the next would exceed the budget.
#[derive(Debug)]
pub struct DriftPrivacy {
    noise_multiplier: f64,
    ledger: PrivacyLedger,
    state: StateDir,
}

impl DriftPrivacy {
    /// Resumes the saved ledger of `state`, or starts one with budget
    /// `(epsilon, delta)`.
    pub fn open(
        state: &StateDir,
        noise_multiplier: f64,
        epsilon: f64,
        delta: f64,
    ) -> Result<Self, PrivacyError> {
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(PrivacyError::Multiplier(noise_multiplier));
        }
        let ledger = match state.drift_ledger().map_err(PrivacyError::State)? {
            Some(l) => l,
            None => PrivacyLedger::new(epsilon, delta).map_err(PrivacyError::Budget)?,
        };
        Ok(Self {
            noise_multiplier,
            ledger,
            state: StateDir::at(state.dir()),
        })
    }

    /// Noises `summary` for release and records the release; refuses once
    /// the budget would be exceeded. Returns ε spent so far.
    pub fn release(
        &mut self,
        summary: &mut Summary,
        spec: &SketchSpec,
    ) -> Result<f64, PrivacyError> {
        let z = self.noise_multiplier;
        self.ledger
            .check_round(1.0, z)
            .map_err(PrivacyError::Spent)?;
        privatize(summary, spec, z)?;
        // Spent before it leaves: saved first.
        self.ledger.record_round(1.0, z)?;
        self.state
            .save_drift_ledger(&self.ledger)
            .map_err(PrivacyError::State)?;
        Ok(self.ledger.spent()?.epsilon)
    }
}

/// Why a drift session failed; the next is tried after the idle interval.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    /// The session with the coordinator failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The coordinator's sketch cannot summarise anything.
    #[error("unusable drift sketch: {0}")]
    Sketch(#[source] SummaryError),
}

/// What the drift task configured last: the deployment and the model
/// version its sketch applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Configured {
    deployment: u64,
    model_version: u64,
}

/// The drift service: runs until dropped (aborted). Until the device
/// serves the monitored deployment (or after a failure) it tries again every
/// `idle_secs` (the deployment check interval); then once per window.
pub async fn report(
    coordinator: Coordinator,
    serving: Arc<Serving>,
    tags: Vec<String>,
    idle_secs: u64,
    mut privacy: Option<DriftPrivacy>,
) {
    let mut configured: Option<(Configured, SketchSpec)> = None;
    loop {
        let wait = match session(
            &coordinator,
            &serving,
            &tags,
            &mut configured,
            idle_secs,
            privacy.as_mut(),
        )
        .await
        {
            Ok(secs) => secs,
            Err(e) => {
                log!(format!("session failed, retried in {idle_secs} s: {e}"));
                idle_secs
            }
        };
        tokio::time::sleep(Duration::from_secs(wait.max(1))).await;
    }
}

/// One session: the closed window's summary, then the sketch for the next
/// one. Returns the seconds until the next session.
async fn session(
    coordinator: &Coordinator,
    serving: &Serving,
    tags: &[String],
    configured: &mut Option<(Configured, SketchSpec)>,
    idle_secs: u64,
    privacy: Option<&mut DriftPrivacy>,
) -> Result<u64, DriftError> {
    let mut session = coordinator.open().await?;
    let result = async {
        let mut due = None;
        if let Some((c, spec)) = configured.as_ref()
            && let Some((version, mut summary)) = serving.drift().take()
            && version == c.model_version
        {
            let released = match privacy {
                Some(p) => match p.release(&mut summary, spec) {
                    Ok(eps) => {
                        log!(format!("summary noised for privacy; ε spent {eps:.3}"));
                        true
                    }
                    Err(e) => {
                        log!(e.to_string());
                        false
                    }
                },
                None => true,
            };
            if released {
                due = Some((c.deployment, summary));
            }
        }
        if let Some((deployment, summary)) = due {
            let report = DriftReport {
                deployment,
                tags: tags.to_vec(),
                summary,
            };
            match session.call(&AgentMessage::DriftReport(report)).await? {
                CoordinatorMessage::DriftAccepted { window } => {
                    log!(format!("summary accepted into window {window}"))
                }
                CoordinatorMessage::Error(e) => log!(format!("summary refused: {}", e.message)),
                other => return Err(SessionError::unexpected("DriftReport", other).into()),
            }
        }
        let info = match session.call(&AgentMessage::GetDriftSpec).await? {
            CoordinatorMessage::DriftSpec(info) => info,
            other => return Err(SessionError::unexpected("GetDriftSpec", other).into()),
        };
        let Some(info) = info else {
            *configured = None;
            return Ok(idle_secs);
        };
        let serving_now = serving.deployment();
        let model_version = serving.predictor().map(|p| p.current().version());
        match (serving_now, model_version) {
            (Some(d), Some(v)) if d == info.deployment => {
                let want = Configured {
                    deployment: d,
                    model_version: v,
                };
                if configured.as_ref().map(|c| c.0) != Some(want) {
                    serving
                        .drift()
                        .set_spec(v, info.spec.clone())
                        .map_err(DriftError::Sketch)?;
                    log!(format!(
                        "summarising deployment {d} (model version {v}) in windows of {} s",
                        info.window_secs
                    ));
                    *configured = Some((want, info.spec));
                }
                Ok(info.window_secs)
            }
            // The sketch is for a deployment this device does not serve (yet).
            _ => Ok(info.window_secs.min(idle_secs)),
        }
    }
    .await;
    session.close(fleet_protocol::close::DONE, b"done");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::observer::tests::spec;

    #[test]
    fn noised_summaries_stop_when_the_budget_is_spent_across_restarts() {
        let dir = std::env::temp_dir().join(format!("fleet-drift-privacy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::at(&dir);
        let sp = spec();
        let mut p = DriftPrivacy::open(&state, 2.0, 3.0, 1e-5).unwrap();
        let mut spent = Vec::new();
        let refused = loop {
            let mut s = sp.empty();
            s.predicted[0] = 100.0;
            match p.release(&mut s, &sp) {
                Ok(eps) => {
                    assert!(s.check(&sp).is_ok());
                    spent.push(eps);
                }
                Err(e) => break e,
            }
            assert!(spent.len() < 1000, "the budget never ran out");
        };
        assert!(matches!(refused, PrivacyError::Spent(_)), "{refused}");
        assert!(refused.to_string().contains("budget"), "{refused}");
        assert!(!spent.is_empty() && spent.windows(2).all(|w| w[0] < w[1]));
        assert!(*spent.last().unwrap() <= 3.0);
        // The ledger was saved: a restarted agent does not start over.
        let mut again = DriftPrivacy::open(&state, 2.0, 3.0, 1e-5).unwrap();
        assert!(again.release(&mut sp.empty(), &sp).is_err());
        assert!(DriftPrivacy::open(&state, 0.0, 3.0, 1e-5).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
