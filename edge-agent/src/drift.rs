//! Drift summaries on the device: an [`Observer`] for the [`Predictor`]
//! that folds every prediction into the open window's
//! [`fleet_aggregation::drift::Summary`].
//!
//! The spec (features and bins) comes from the coordinator with the model
//! version; until one is set the observer does nothing. The work per
//! prediction is the sketch's fixed cost (one pass over the input for mean
//! and standard deviation, `projections × taps` additions, one binary search
//! per feature, a softmax over the logits) under an uncontended mutex; no
//! allocation. With `sample_every = k` only every k-th prediction is
//! summarised (a deterministic stride, so the window's histograms are a
//! systematic sample of the traffic), which divides that cost by k;
//! `docs/benchmarks.md` measures both against inference itself.
//!
//!
//! [`upload`] is the agent's drift task (started by `edge-agent run` beside
//! the deployment checks): once per reporting window it opens a short
//! session of its own, sends the closed window's summary for the deployment
//! that served it, and asks for the current sketch (`GetDriftSpec`); the
//! sketch is applied only when it belongs to the deployment the device
//! serves, so a summary always describes one model version.
//!
//! [`Predictor`]: crate::inference::Predictor

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_aggregation::drift::private::privatize;
use fleet_aggregation::drift::{SketchSpec, Sketcher, Summary, SummaryBuilder, SummaryError};
use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_protocol::message::{AgentMessage, CoordinatorMessage, DriftReport};

use crate::deploy::{DeployError, Serving, ask, open_session, unexpected};
use crate::inference::{Observation, Observer};
use crate::state::StateDir;

fn log(line: impl AsRef<str>) {
    crate::run::log(format!("drift: {}", line.as_ref()));
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
    ) -> Result<Self, String> {
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(format!(
                "drift noise multiplier {noise_multiplier} must be a finite number > 0"
            ));
        }
        let ledger = match state.drift_ledger()? {
            Some(l) => l,
            None => PrivacyLedger::new(epsilon, delta).map_err(|e| format!("drift budget: {e}"))?,
        };
        Ok(Self {
            noise_multiplier,
            ledger,
            state: StateDir::at(state.dir()),
        })
    }

    /// Noises `summary` for release and records the release; refuses once
    /// the budget would be exceeded. Returns ε spent so far.
    pub fn release(&mut self, summary: &mut Summary, spec: &SketchSpec) -> Result<f64, String> {
        let z = self.noise_multiplier;
        self.ledger.check_round(1.0, z).map_err(|e| {
            format!("no more drift summaries: the privacy budget would be exceeded ({e})")
        })?;
        privatize(summary, spec, z).map_err(|e| e.to_string())?;
        // Spent before it leaves: saved first.
        self.ledger
            .record_round(1.0, z)
            .map_err(|e| e.to_string())?;
        self.state.save_drift_ledger(&self.ledger)?;
        Ok(self.ledger.spent().map_err(|e| e.to_string())?.epsilon)
    }
}

/// What the drift task configured last: the deployment and the model
/// version its sketch applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Configured {
    deployment: u64,
    model_version: u64,
}

/// The agent's drift task: runs until dropped (aborted). Until the device
/// serves the monitored deployment (or after a failure) it tries again every
/// `idle_secs` (the deployment check interval); then once per window.
pub async fn upload(
    endpoint: quinn::Endpoint,
    coordinator: SocketAddr,
    server_name: String,
    serving: Arc<Serving>,
    tags: Vec<String>,
    idle_secs: u64,
    mut privacy: Option<DriftPrivacy>,
) {
    let link = Link {
        endpoint,
        coordinator,
        server_name,
    };
    let mut configured: Option<(Configured, SketchSpec)> = None;
    loop {
        let wait = match session(
            &link,
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
                // The inner message: these are not deployment failures.
                let (DeployError::Link(why)
                | DeployError::Download(why)
                | DeployError::Artifact(why)
                | DeployError::Persist(why)) = e;
                log(format!("session failed, retried in {idle_secs} s: {why}"));
                idle_secs
            }
        };
        tokio::time::sleep(Duration::from_secs(wait.max(1))).await;
    }
}

/// Where the drift task's sessions go.
struct Link {
    endpoint: quinn::Endpoint,
    coordinator: SocketAddr,
    server_name: String,
}

/// One session: the closed window's summary, then the sketch for the next
/// one. Returns the seconds until the next session.
async fn session(
    link: &Link,
    serving: &Serving,
    tags: &[String],
    configured: &mut Option<(Configured, SketchSpec)>,
    idle_secs: u64,
    privacy: Option<&mut DriftPrivacy>,
) -> Result<u64, DeployError> {
    let (conn, mut tx, mut rx) =
        open_session(&link.endpoint, link.coordinator, &link.server_name).await?;
    let result = async {
        let mut due = None;
        if let Some((c, spec)) = configured.as_ref()
            && let Some((version, mut summary)) = serving.drift().take()
            && version == c.model_version
        {
            let released = match privacy {
                Some(p) => match p.release(&mut summary, spec) {
                    Ok(eps) => {
                        log(format!("summary noised for privacy; ε spent {eps:.3}"));
                        true
                    }
                    Err(e) => {
                        log(e);
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
            match ask(&mut tx, &mut rx, &AgentMessage::DriftReport(report)).await? {
                CoordinatorMessage::DriftAccepted { window } => {
                    log(format!("summary accepted into window {window}"))
                }
                CoordinatorMessage::Error(e) => log(format!("summary refused: {}", e.message)),
                other => return Err(unexpected("DriftReport", other)),
            }
        }
        let info = match ask(&mut tx, &mut rx, &AgentMessage::GetDriftSpec).await? {
            CoordinatorMessage::DriftSpec(info) => info,
            other => return Err(unexpected("GetDriftSpec", other)),
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
                        .map_err(|e| DeployError::Link(format!("unusable drift sketch: {e}")))?;
                    log(format!(
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
    conn.close(0u32.into(), b"done");
    result
}

/// Sampled predictions remembered for labels that arrive later.
pub const RECENT: usize = 1024;

/// The open window: its model version, summary, and the classes predicted
/// for the last [`RECENT`] sampled predictions (by id), for late labels.
#[derive(Debug)]
struct Window {
    version: u64,
    builder: SummaryBuilder,
    recent: Vec<(u64, u16)>,
}

/// Collects the drift summary of the predictions served.
#[derive(Debug)]
pub struct DriftObserver {
    window: Mutex<Option<Window>>,
    sample_every: u64,
}

impl Default for DriftObserver {
    fn default() -> Self {
        Self::sampling(1)
    }
}

impl DriftObserver {
    /// An observer of every prediction, without a spec (it records nothing yet).
    pub fn new() -> Self {
        Self::default()
    }

    /// An observer of every `every`-th prediction: those whose id `i` has
    /// `(i − 1) mod every = 0`. With 0 it observes nothing and costs nothing.
    pub fn sampling(every: u64) -> Self {
        Self {
            window: Mutex::new(None),
            sample_every: every,
        }
    }

    /// Starts summarising predictions of model `version` on `spec`'s bins,
    /// dropping any open window.
    pub fn set_spec(&self, version: u64, spec: SketchSpec) -> Result<(), SummaryError> {
        let builder = SummaryBuilder::new(Sketcher::new(spec)?);
        *self.window.lock().unwrap_or_else(|e| e.into_inner()) = Some(Window {
            version,
            builder,
            recent: vec![(0, 0); RECENT],
        });
        Ok(())
    }

    /// Closes the open window: the model version and its summary, if any
    /// prediction was recorded. A new window starts empty.
    pub fn take(&self) -> Option<(u64, Summary)> {
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard.as_mut()?;
        if w.builder.summary().predictions() == 0.0 {
            return None;
        }
        Some((w.version, w.builder.take()))
    }

    fn sampled(&self, id: u64) -> bool {
        self.sample_every > 0 && id.wrapping_sub(1).is_multiple_of(self.sample_every)
    }
}

impl Observer for DriftObserver {
    fn observe(&self, o: &Observation<'_>) {
        let k = self.sample_every;
        if k == 0 {
            return;
        }
        let rows = (o.inputs.len() / o.features.max(1)) as u64;
        // The first row of this batch that falls on the stride.
        let skip = (k - o.first_id.wrapping_sub(1) % k) % k;
        if skip >= rows {
            return;
        }
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = guard.as_mut()
            && w.version == o.version
            && w.builder.spec().dim as usize == o.features
            && usize::from(w.builder.spec().classes) == o.classes
        {
            for r in (skip as usize..rows as usize).step_by(k as usize) {
                let logits = &o.logits[r * o.classes..(r + 1) * o.classes];
                w.builder.observe(
                    &o.inputs[r * o.features..(r + 1) * o.features],
                    logits,
                    None,
                );
                let id = o.first_id + r as u64;
                let class = fleet_models::train::argmax(logits) as u16;
                w.recent[(id / k) as usize % RECENT] = (id, class);
            }
        }
    }

    /// Counts a late label into the open window. Labels of predictions that
    /// were not sampled are ignored; unknown, too old (more than [`RECENT`]
    /// sampled predictions ago, or from another window's model) or
    /// out-of-range ones are refused.
    fn label(&self, id: u64, label: usize) -> Result<(), String> {
        if self.sample_every == 0 {
            return Err("drift summaries are off on this device (--drift-sample-every 0)".into());
        }
        if !self.sampled(id) {
            return Ok(());
        }
        let mut guard = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let w = guard
            .as_mut()
            .ok_or("no drift window is open (the coordinator has sent no sketch yet)")?;
        let classes = usize::from(w.builder.spec().classes);
        let label = u8::try_from(label)
            .ok()
            .filter(|&l| usize::from(l) < classes)
            .ok_or_else(|| format!("label {label} is not a class index (0..{classes})"))?;
        let slot = w.recent[(id / self.sample_every) as usize % RECENT];
        if slot.0 != id {
            return Err(format!(
                "prediction {id} is unknown or older than the last {RECENT} summarised predictions"
            ));
        }
        w.builder.label(usize::from(slot.1), label);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_aggregation::drift::sketch::FitConfig;

    fn spec() -> SketchSpec {
        let inputs: Vec<Vec<f32>> = (0..50).map(|i| vec![i as f32; 8]).collect();
        let cfg = FitConfig {
            taps: 2,
            projections: 2,
            ..FitConfig::default()
        };
        SketchSpec::fit(8, 3, inputs.iter().map(Vec::as_slice), cfg).unwrap()
    }

    fn observation<'a>(
        version: u64,
        inputs: &'a [f32],
        logits: &'a [f32],
        first_id: u64,
    ) -> Observation<'a> {
        Observation {
            version,
            features: 8,
            inputs,
            classes: 3,
            logits,
            first_id,
        }
    }

    #[test]
    fn records_predictions_of_its_version_only() {
        let o = DriftObserver::new();
        let x = [1.0f32; 16];
        let z = [0.0, 5.0, 0.0, 9.0, 0.0, 0.0];
        // No spec yet: nothing.
        o.observe(&observation(3, &x, &z, 1));
        assert!(o.take().is_none());
        o.set_spec(3, spec()).unwrap();
        o.observe(&observation(3, &x, &z, 3));
        // Another version, or another shape: ignored.
        o.observe(&observation(4, &x, &z, 5));
        let (version, s) = o.take().unwrap();
        assert_eq!(version, 3);
        assert_eq!(s.predicted, vec![1.0, 1.0, 0.0]);
        assert!(s.check(&spec()).is_ok());
        // The next window starts empty.
        assert!(o.take().is_none());
    }

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
        assert!(refused.contains("budget"), "{refused}");
        assert!(!spent.is_empty() && spent.windows(2).all(|w| w[0] < w[1]));
        assert!(*spent.last().unwrap() <= 3.0);
        // The ledger was saved: a restarted agent does not start over.
        let mut again = DriftPrivacy::open(&state, 2.0, 3.0, 1e-5).unwrap();
        assert!(again.release(&mut sp.empty(), &sp).is_err());
        assert!(DriftPrivacy::open(&state, 0.0, 3.0, 1e-5).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sampling_keeps_every_kth_prediction_across_batches() {
        let o = DriftObserver::sampling(3);
        o.set_spec(1, spec()).unwrap();
        let x = [1.0f32; 8 * 5];
        let z = [1.0f32, 0.0, 0.0].repeat(5);
        // Batches of 5, 5 and 1 (ids 1–11): ids 1, 4, 7 and 10 are kept.
        o.observe(&observation(1, &x, &z, 1));
        o.observe(&observation(1, &x, &z, 6));
        o.observe(&observation(1, &x[..8], &z[..3], 11));
        let (_, s) = o.take().unwrap();
        assert_eq!(s.predictions(), 4.0);
        // Off: nothing is recorded, and labels are refused with the reason.
        let off = DriftObserver::sampling(0);
        off.set_spec(1, spec()).unwrap();
        off.observe(&observation(1, &x, &z, 1));
        assert!(off.take().is_none());
        assert!(off.label(1, 0).unwrap_err().contains("off"));
    }

    #[test]
    fn late_labels_count_for_their_predictions() {
        let o = DriftObserver::sampling(2);
        o.set_spec(1, spec()).unwrap();
        let x = [1.0f32; 8 * 4];
        // Ids 1..=4 predict classes 0, 1, 2, 0; ids 1 and 3 are sampled.
        let z = [9.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 9.0, 9.0, 0.0, 0.0];
        o.observe(&observation(1, &x, &z, 1));
        o.label(1, 0).unwrap(); // correct
        o.label(3, 1).unwrap(); // wrong: predicted 2
        o.label(2, 1).unwrap(); // not sampled: ignored
        assert!(o.label(5, 0).unwrap_err().contains("unknown"));
        assert!(o.label(3, 7).unwrap_err().contains("not a class"));
        let (_, s) = o.take().unwrap();
        assert_eq!((s.labeled, s.correct), (2.0, 1.0));
        assert_eq!(s.labels, vec![1.0, 1.0, 0.0]);
        assert!(s.check(&spec()).is_ok());
    }
}
