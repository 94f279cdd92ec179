//! Drift monitoring as the coordinator runs it: following the deployment,
//! closing drift windows when due, and the retraining a window may call for.

use fleet_drift::Transition;
use fleet_protocol::admin::TaskState;
use fleet_protocol::message::bytes_to_params;
use tracing::info;

use super::App;
use crate::drift::Retrain;
use crate::runner::Runner;
use crate::store::{StoreError, unix_secs};

/// Ticks between two looks at the deployment (the driver ticks every 50 ms).
const FOLLOW_EVERY: u32 = 20;

impl App {
    /// Follows the deployment (every [`FOLLOW_EVERY`] ticks) and closes the
    /// drift window when due: logs flag changes, updates the metrics and
    /// carries out retraining.
    pub(super) fn watch_drift(&mut self, now: u64) -> Result<(), StoreError> {
        if self.follow_in == 0 {
            self.follow_in = FOLLOW_EVERY;
            let deployed = match self.store.deployment()? {
                Some((version, model)) => {
                    let task = self.store.model_row(&model)?.map_or(0, |r| r.task);
                    self.store.task(task)?.map(|row| (version, row.spec.model))
                }
                None => None,
            };
            if let Some(line) = self
                .watch
                .follow(deployed.as_ref().map(|(v, spec)| (*v, spec)), now)
            {
                info!("{line}");
            }
        }
        self.follow_in -= 1;
        let Some(report) = self.watch.tick(now, unix_secs()) else {
            return Ok(());
        };
        let retrain = report.retrain.clone();
        for e in &report.events {
            let transition = match e.transition {
                Transition::Raised => "raised",
                Transition::Cleared => "cleared",
            };
            info!(
                "drift window {}: {} {} {transition} (score {:.3})",
                e.window,
                e.scope,
                e.signal.name(),
                e.score
            );
        }
        self.metrics.drift_window(report);
        if let Some(r) = retrain {
            let line = self.retrain_after_drift(&r, now)?;
            info!("drift: {line}");
        }
        Ok(())
    }

    /// The retraining policy's action: a new task like the deployed model's,
    /// of `r.rounds` rounds, starting from the deployed model, started at
    /// once unless another task is running. Its name records why.
    fn retrain_after_drift(&mut self, r: &Retrain, now: u64) -> Result<String, StoreError> {
        let Some((_, model)) = self.store.deployment()? else {
            return Ok("no deployed model to retrain".into());
        };
        let task = self.store.model_row(&model)?.map_or(0, |r| r.task);
        let Some(row) = self.store.task(task)? else {
            return Ok("the deployed model has no task to retrain from".into());
        };
        if let Some(running) = self.runner.as_ref().map(Runner::id) {
            return Ok(format!(
                "retraining not started: task {running} is running ({})",
                r.reason
            ));
        }
        let mut spec = row.spec.clone();
        spec.name = format!("{} · retrain: {}", row.spec.name, r.reason);
        spec.engine.rounds = r.rounds;
        let global = bytes_to_params(&self.store.get_object(&model)?).unwrap_or_default();
        match Runner::create_from(&mut self.store, &spec, &global) {
            Ok(task) => {
                self.store.set_task_state(task, TaskState::Running, None)?;
                let row = self.store.task(task)?.expect("just created");
                self.runner = Some(Runner::load(&mut self.store, &row, now)?);
                Ok(format!("started task {task}: {}", spec.name))
            }
            Err(e) => Ok(format!("retraining not started: {e}")),
        }
    }
}
