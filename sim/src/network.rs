//! Real-network mode: the same fleet file run by a real coordinator and one
//! real agent per device, speaking QUIC with mutual TLS on loopback.
//!
//! The coordinator is `fleet_coordinator::server::Coordinator` with its own
//! home directory (CA, SQLite state) in the run directory; each device is
//! enrolled with a one-time token and runs `fleet_edge_agent::run::run` on
//! its own share of the data, written in the on-device format. Devices
//! share one current-thread runtime and each has its own trainer thread, as
//! on a real device. Time is real: profiles (speeds, bandwidths,
//! availability, dropouts) and Byzantine scenarios are not emulated, so
//! the mode is meant for a few hundred honest devices, to check that the
//! network path learns as the in-memory simulation does.

use std::path::Path;
use std::time::Duration;

use fleet_aggregation::privacy::accountant::ledger::PrivacyBudget;
use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::{Home, Settings};
use fleet_coordinator::server::Coordinator;
use fleet_edge_agent::run::RunConfig;
use fleet_edge_agent::state::StateDir;
use fleet_models::data::fashion::{self, Split};
use fleet_models::data::{device, embedded};
use fleet_models::{Backend, Dataset, evaluate};
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand, TaskState};
use fleet_protocol::message::bytes_to_params;
use fleet_protocol::task::TaskSpec;

use crate::data::DeviceData;
use crate::fleet::{DataConfig, Fleet};

/// Most devices the mode runs (one QUIC connection and trainer thread each).
pub const MAX_DEVICES: u32 = 1_000;

/// One closed round of a network run.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRound {
    /// Round number.
    pub round: u64,
    /// Devices whose updates were aggregated.
    pub participants: usize,
    /// Test accuracy of the round's model.
    pub accuracy: f32,
    /// Test loss of the round's model.
    pub loss: f32,
    /// ε after the round, when private.
    pub epsilon: Option<f64>,
}

async fn call(admin: &mut AdminClient, req: AdminRequest) -> Result<AdminResponse, String> {
    admin.call(&req).await
}

/// Runs `fleet` over real QUIC in `dir`; `progress(closed, total)` is called
/// as rounds close. `data` and `test` are the in-memory mode's, so both
/// modes train on the same shares.
pub fn run(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    dir: &Path,
    progress: impl Fn(u64, u64),
) -> Result<Vec<NetworkRound>, String> {
    let DeviceData::Partitioned { devices, .. } = data else {
        return Err("the network mode needs a labelled data set (data.set = \"fashion-embedded\" or \"fashion-full\")".into());
    };
    if fleet.devices > MAX_DEVICES {
        return Err(format!(
            "the network mode runs at most {MAX_DEVICES} devices (one connection and trainer thread each); this fleet has {}",
            fleet.devices
        ));
    }
    if fleet.scenarios.byzantine.is_some_and(|b| b.fraction > 0.0) {
        return Err("the network mode runs honest devices only; remove scenarios.byzantine".into());
    }
    let (images, labels) = match fleet.data {
        DataConfig::FashionEmbedded { .. } => embedded::raw(Split::Train),
        _ => fashion::raw(&fashion::default_dir(), Split::Train),
    }
    .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(dir);
    for (k, indices) in devices.iter().enumerate() {
        device::write(
            &dir.join(format!("data/device-{k}")),
            &images,
            &labels,
            indices,
        )
        .map_err(|e| e.to_string())?;
    }
    let home = Home::at(dir.join("coordinator"));
    home.init(
        &Settings {
            listen: "127.0.0.1:0".parse().expect("literal"),
            server_names: vec!["localhost".into()],
            metrics: None,
            drift: Default::default(),
        },
        "fleet-sim",
    )?;
    fleet_coordinator::server::set_quiet(true);
    fleet_edge_agent::run::set_quiet(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let closed = local.block_on(&rt, async {
        let coordinator = std::sync::Arc::new(Coordinator::open(&home)?);
        let endpoint = quinn::Endpoint::server(
            coordinator.server_config(),
            "127.0.0.1:0".parse().expect("literal"),
        )
        .map_err(|e| e.to_string())?;
        let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
        tokio::task::spawn_local(coordinator.clone().serve(endpoint.clone(), None));
        let mut admin = AdminClient::connect(&home, Some(addr)).await?;
        let mut states = Vec::new();
        for k in 0..devices.len() {
            let AdminResponse::Token { token, .. } = call(
                &mut admin,
                AdminRequest::CreateToken {
                    label: format!("device-{k}"),
                    ttl_secs: 3600,
                },
            )
            .await?
            else {
                return Err("no enrollment token".to_string());
            };
            let state = StateDir::at(dir.join(format!("agent-{k}")));
            fleet_edge_agent::enroll::enroll(
                &state,
                addr,
                "localhost",
                home.ca_cert()?,
                &token,
                Some(dir.join(format!("data/device-{k}"))),
            )
            .await?;
            states.push(state);
        }
        let spec = TaskSpec {
            name: "fleet-sim network mode".into(),
            model: fleet.model_spec(),
            train: fleet.train_config(),
            strategy: fleet.strategy(),
            codec: fleet.codec(),
            dp: fleet.dp(),
            budget: fleet.task.dp.and_then(|d| {
                d.budget.map(|epsilon| PrivacyBudget {
                    epsilon,
                    delta: d.delta,
                })
            }),
            population: u64::from(fleet.devices),
            engine: fleet.engine_config(),
            seed: fleet.seed,
            variant: Default::default(),
        };
        let AdminResponse::Done { id: Some(task), .. } =
            call(&mut admin, AdminRequest::CreateTask(Box::new(spec))).await?
        else {
            return Err("the coordinator created no task".to_string());
        };
        let agents: Vec<_> = states
            .into_iter()
            .map(|state| {
                let cfg = RunConfig {
                    eligibility: fleet_edge_agent::eligibility::Rules {
                        require_ac_power: false,
                        require_unmetered: false,
                        ..Default::default()
                    },
                    ..RunConfig::default()
                };
                tokio::task::spawn_local(
                    async move { fleet_edge_agent::run::run(&state, cfg).await },
                )
            })
            .collect();
        call(
            &mut admin,
            AdminRequest::SetTaskState {
                task,
                command: TaskCommand::Start,
            },
        )
        .await?;
        let total = fleet.task.rounds;
        let result = loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let AdminResponse::Tasks(tasks) = call(&mut admin, AdminRequest::ListTasks).await?
            else {
                break Err("no task list".to_string());
            };
            let Some(t) = tasks.into_iter().find(|t| t.id == task) else {
                break Err("the task disappeared".to_string());
            };
            progress(t.rounds_closed, total);
            match t.state {
                TaskState::Finished => break Ok(()),
                TaskState::Stopped => {
                    break Err(format!("the task stopped: {}", t.note.unwrap_or_default()));
                }
                _ => {}
            }
        };
        for a in agents {
            a.abort();
        }
        let rounds = match result {
            Ok(()) => call(&mut admin, AdminRequest::ListRounds { task }).await,
            Err(e) => Err(e),
        };
        endpoint.close(0u32.into(), b"simulation over");
        match rounds? {
            AdminResponse::Rounds(rounds) => Ok(rounds),
            _ => Err("no round list".to_string()),
        }
    })?;
    let spec = fleet.model_spec();
    let mut out = Vec::new();
    for r in closed.into_iter().filter(|r| r.outcome == "closed") {
        let id = r.model.as_deref().ok_or("a closed round without a model")?;
        let bytes = std::fs::read(home.path("objects").join(id)).map_err(|e| e.to_string())?;
        let params = bytes_to_params(&bytes).ok_or("a model object that is not f32 values")?;
        let e =
            evaluate(&spec, &params, test.view(), Backend::DEFAULT).map_err(|e| e.to_string())?;
        out.push(NetworkRound {
            round: r.round,
            participants: r.participants.len(),
            accuracy: e.accuracy,
            loss: e.loss,
            epsilon: r.epsilon,
        });
    }
    Ok(out)
}
