//! Administrators' requests: tokens, devices and revocation, tasks, models,
//! deployments, budgets and the drift view.

use fleet_aggregation::privacy::accountant::ledger::PrivacyLedger;
use fleet_protocol::admin::{
    AdminRequest, AdminResponse, BudgetInfo, TaskCommand, TaskInfo, TaskState,
};
use fleet_protocol::message::ObjectId;
use fleet_protocol::{ErrorCode, WireError, close};
use rand::RngCore;
use tracing::info;

use super::{App, Effect, io};
use crate::runner::Runner;
use crate::store::{StoreError, unix_secs};

/// What a changing request does, for the log; `None` for listings.
pub fn describe(req: &AdminRequest) -> Option<String> {
    Some(match req {
        AdminRequest::CreateTask(spec) => format!("create task {:?}", spec.name),
        AdminRequest::CreateToken { label, .. } => format!("create token for {label:?}"),
        AdminRequest::RevokeDevice { device } => format!("revoke device {device}"),
        AdminRequest::SetTaskState { task, command } => format!("{command:?} task {task}"),
        AdminRequest::Deploy { model } => format!("deploy {model}"),
        AdminRequest::Rollback => "roll back".into(),
        _ => return None,
    })
}

fn admin_error(code: ErrorCode, message: impl Into<String>) -> AdminResponse {
    AdminResponse::Error(WireError {
        code,
        message: message.into(),
    })
}

fn done(message: impl Into<String>, id: Option<u64>) -> AdminResponse {
    AdminResponse::Done {
        message: message.into(),
        id,
    }
}

impl App {
    /// Whether an administrator's certificate (`serial`) may connect: it
    /// is recorded and not revoked (a storage failure refuses it).
    pub fn admin_allowed(&mut self, serial: &[u8]) -> bool {
        self.store.admin_allowed(serial).unwrap_or_else(|e| {
            tracing::warn!("administrator check failed: {e}");
            false
        })
    }

    /// Appends administrator `admin`'s changing request (`request`, as
    /// [`describe`] gives it) and its outcome to the audit log, after it
    /// was carried out. A failure to write it is logged as an error.
    pub fn audit(&mut self, admin: &str, request: &str, reply: &AdminResponse) {
        let outcome = match reply {
            AdminResponse::Error(e) => format!("error: {}", e.message),
            AdminResponse::Done { message, .. } => format!("ok: {message}"),
            _ => "ok".to_string(),
        };
        if let Err(e) = self.store.audit(admin, request, &outcome) {
            tracing::error!("audit log not written ({admin}: {request}): {e}");
        }
    }

    /// Carries out a greeted administrator's request at `now` (the driver's
    /// clock). A storage failure answers `Internal` and suspends the
    /// running task (see [`App::task_storage_failed`]).
    pub fn administer(&mut self, req: AdminRequest, now: u64) -> AdminResponse {
        self.administer_or_fail(req, now)
            .unwrap_or_else(|e| AdminResponse::Error(self.task_storage_failed("administering", &e)))
    }

    fn administer_or_fail(
        &mut self,
        req: AdminRequest,
        now: u64,
    ) -> Result<AdminResponse, StoreError> {
        Ok(match req {
            AdminRequest::Hello { .. } => {
                admin_error(ErrorCode::Malformed, "Hello is sent once, first")
            }
            AdminRequest::CreateToken { label, ttl_secs } => {
                let mut raw = [0u8; 24];
                rand::rng().fill_bytes(&mut raw);
                let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                let expires_at = unix_secs().saturating_add(ttl_secs);
                self.store.create_token(&token, &label, expires_at)?;
                AdminResponse::Token { token, expires_at }
            }
            AdminRequest::Drift => AdminResponse::Drift(self.watch.info()),
            AdminRequest::ListDevices => {
                let connected = |id| self.connected.contains_key(&id);
                AdminResponse::Devices(self.store.devices(connected)?)
            }
            AdminRequest::RevokeDevice { device } => self.revoke(device, now)?,
            AdminRequest::CreateTask(spec) => match Runner::create(&mut self.store, &spec) {
                Ok(id) => {
                    if let Some(task) = self.store.task(id)? {
                        self.queue_build(task.model);
                    }
                    done(
                        format!(
                            "task {id} created (paused); start it with `coordinator tasks start {id}`"
                        ),
                        Some(id),
                    )
                }
                Err(e) => admin_error(ErrorCode::Malformed, e),
            },
            AdminRequest::SetTaskState { task, command } => {
                self.set_task_state(task, command, now)?
            }
            AdminRequest::ListTasks => AdminResponse::Tasks(
                self.store
                    .tasks()?
                    .into_iter()
                    .map(|t| TaskInfo {
                        id: t.id,
                        spec: t.spec,
                        state: t.state,
                        rounds_closed: t.closed,
                        model: t.model.to_string(),
                        note: t.note,
                    })
                    .collect(),
            ),
            AdminRequest::ListRounds { task } => AdminResponse::Rounds(self.store.rounds(task)?),
            AdminRequest::ListModels { task } => AdminResponse::Models(self.store.models(task)?),
            AdminRequest::Deploy { model } => self.deploy(&model)?,
            AdminRequest::Rollback => match self.store.previous_deployment()? {
                None => admin_error(ErrorCode::NoSuchRound, "nothing to roll back to"),
                Some(prev) => {
                    let version = self.store.deploy(&prev)?;
                    self.queue_build(prev);
                    done(
                        format!(
                            "rolled back to model {} (version {version})",
                            &prev.to_string()[..12]
                        ),
                        Some(version),
                    )
                }
            },
            AdminRequest::Budget { task } => self.budget(task)?,
        })
    }

    /// Revokes `device`: its serials (two during a renewal) join the TLS
    /// deny-list, its live connections are closed (by the driver) and it
    /// drops out of the open round.
    fn revoke(&mut self, device: u64, now: u64) -> Result<AdminResponse, StoreError> {
        let Some(serials) = self.store.revoke(device)? else {
            return Ok(admin_error(
                ErrorCode::UnknownDevice,
                format!("no device {device}"),
            ));
        };
        for serial in serials {
            self.revoked.revoke(serial);
        }
        let live = self.connected.remove(&device).unwrap_or(0);
        self.metrics.connected_devices = self.connected.len() as u64;
        self.effects.push(Effect::Disconnect {
            device,
            code: close::REVOKED,
            reason: "device revoked",
        });
        if let Some(runner) = self.runner.as_mut() {
            let mut outcomes = Vec::new();
            runner.drop_out(
                io(&mut self.store, &mut self.metrics, now, &mut outcomes),
                device,
            )?;
            self.finish_outcomes(outcomes);
        }
        info!(
            device,
            "device {device} revoked, {live} connection(s) closed"
        );
        Ok(done(
            format!("device {device} revoked; {live} live connection(s) closed"),
            Some(device),
        ))
    }

    fn deploy(&mut self, prefix: &str) -> Result<AdminResponse, StoreError> {
        let prefix = prefix.to_lowercase();
        let matches: Vec<_> = self
            .store
            .models(None)?
            .into_iter()
            .filter(|m| !prefix.is_empty() && m.id.starts_with(&prefix))
            .collect();
        Ok(match matches.as_slice() {
            [m] => {
                let id = ObjectId::from_hex(&m.id)
                    .ok_or_else(|| StoreError::Corrupt(format!("model id {:?}", m.id)))?;
                let version = self.store.deploy(&id)?;
                self.queue_build(id);
                done(
                    format!("model {} deployed as version {version}", &m.id[..12]),
                    Some(version),
                )
            }
            [] => admin_error(
                ErrorCode::NoSuchRound,
                format!("no model id starts with {prefix:?}; see `coordinator models list`"),
            ),
            _ => admin_error(
                ErrorCode::Malformed,
                format!(
                    "{} models start with {prefix:?}; give more digits",
                    matches.len()
                ),
            ),
        })
    }

    fn budget(&mut self, task: u64) -> Result<AdminResponse, StoreError> {
        let Some(row) = self.store.task(task)? else {
            return Ok(admin_error(
                ErrorCode::NoSuchRound,
                format!("no task {task}"),
            ));
        };
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("ledger: {e}"));
        let ledger: Option<PrivacyLedger> = match &row.ledger {
            Some(json) => Some(serde_json::from_str(json).map_err(|e| corrupt(&e))?),
            None => None,
        };
        let spent = match &ledger {
            Some(l) => Some(l.spent().map_err(|e| corrupt(&e))?),
            None => None,
        };
        Ok(AdminResponse::Budget(BudgetInfo {
            task,
            private: row.spec.dp.is_some(),
            budget: row.spec.budget,
            spent,
            delta: ledger.as_ref().map(|l| l.budget().delta),
            rounds: ledger.as_ref().map_or(0, |l| l.rounds()),
        }))
    }

    fn set_task_state(
        &mut self,
        task: u64,
        command: TaskCommand,
        now: u64,
    ) -> Result<AdminResponse, StoreError> {
        let Some(row) = self.store.task(task)? else {
            return Ok(admin_error(
                ErrorCode::NoSuchRound,
                format!("no task {task}"),
            ));
        };
        // Replicas share the store: the running task may run on another.
        let running = match self.replica {
            Some(_) => self.store.running_task()?,
            None => self.runner.as_ref().map(Runner::id),
        };
        let ended = matches!(row.state, TaskState::Finished | TaskState::Stopped);
        Ok(match command {
            TaskCommand::Start if ended => admin_error(
                ErrorCode::NoSuchRound,
                format!("task {task} is {:?}; create a new task", row.state),
            ),
            TaskCommand::Start if running == Some(task) => {
                done(format!("task {task} is already running"), Some(task))
            }
            TaskCommand::Start => {
                if let Some(other) = running {
                    return Ok(admin_error(
                        ErrorCode::Malformed,
                        format!("task {other} is running; pause or stop it first"),
                    ));
                }
                let before = row.state;
                self.store.set_task_state(task, TaskState::Running, None)?;
                if self.replica.is_some() {
                    // Run here if the lease is free; else by its holder.
                    self.take_running_task(now)?;
                    return Ok(done(
                        format!("task {task} running from round {}", row.round),
                        Some(task),
                    ));
                }
                let row = self.store.task(task)?.expect("just updated");
                match Runner::load(&mut self.store, &row, now) {
                    Ok(r) => self.runner = Some(r),
                    // Stopped with the reason: it could never run, and a
                    // running task that cannot be loaded would fail the
                    // coordinator's next start.
                    Err(StoreError::Corrupt(why)) => {
                        let note = format!("could not be started: {why}");
                        self.store
                            .set_task_state(task, TaskState::Stopped, Some(&note))?;
                        return Ok(admin_error(
                            ErrorCode::Malformed,
                            format!("task {task} {note}; it is stopped: create a new task"),
                        ));
                    }
                    Err(e) => {
                        self.store
                            .set_task_state(task, before, row.note.as_deref())?;
                        return Err(e);
                    }
                }
                done(
                    format!("task {task} running from round {}", row.round),
                    Some(task),
                )
            }
            TaskCommand::Pause | TaskCommand::Stop if ended => admin_error(
                ErrorCode::NoSuchRound,
                format!("task {task} is {:?}", row.state),
            ),
            TaskCommand::Pause | TaskCommand::Stop => {
                let state = if command == TaskCommand::Pause {
                    TaskState::Paused
                } else {
                    TaskState::Stopped
                };
                self.store.set_task_state(task, state, None)?;
                if self.runner.as_ref().map(Runner::id) == Some(task) {
                    self.give_up_task();
                }
                done(format!("task {task} {state:?}"), Some(task))
            }
        })
    }
}
