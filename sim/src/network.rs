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
//!
//! [`replay`] checks that directly: each closed round is recomputed in
//! memory from the network run's previous model with the devices the
//! coordinator aggregated, each training exactly as its agent did (same
//! seed, same `plan_update`, same codec), through the coordinator's own
//! task core, and the result is compared with the model the coordinator
//! stored.

use std::path::Path;
use std::time::Duration;

use fleet_aggregation::codec::decode;
use fleet_aggregation::{Compute, report_weight};
use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::{Home, Settings};
use fleet_coordinator::server::Coordinator;
use fleet_coordinator::task::{Effect, Resume, TaskCore};
use fleet_edge_agent::run::RunConfig;
use fleet_edge_agent::state::StateDir;
use fleet_edge_agent::work::{ClientUpdate, plan_update};
use fleet_models::data::fashion::{self, Split};
use fleet_models::data::{device, embedded};
use fleet_models::{Backend, Dataset, evaluate};
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand, TaskState};
use fleet_protocol::message::bytes_to_params;
use fleet_protocol::task::TaskSpec;
use rayon::prelude::*;

use crate::agent::ModelObject;
use crate::data::DeviceData;
use crate::fleet::{DataConfig, Fleet};

/// Most devices the mode runs (one QUIC connection and trainer thread each).
pub const MAX_DEVICES: u32 = 1_000;

/// A finished network run.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRun {
    /// The task's initial model, as the coordinator stored it.
    pub initial: Vec<f32>,
    /// The closed rounds, in order.
    pub rounds: Vec<NetworkRound>,
    /// `ids[k]`: the coordinator's id of simulated device `k`.
    pub ids: Vec<u64>,
}

/// One closed round of a network run.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRound {
    /// Round number.
    pub round: u64,
    /// Devices whose updates were aggregated (simulated device numbers, ascending).
    pub devices: Vec<u32>,
    /// The round's model, as the coordinator stored it.
    pub model: Vec<f32>,
    /// Test accuracy of the round's model.
    pub accuracy: f32,
    /// Test loss of the round's model.
    pub loss: f32,
    /// ε after the round, when private.
    pub epsilon: Option<f64>,
}

/// One round recomputed in memory by [`replay`].
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// Round number.
    pub round: u64,
    /// Largest absolute difference between a parameter of the replayed
    /// model and the coordinator's.
    pub max_abs_diff: f32,
    /// Test accuracy of the replayed model.
    pub accuracy: f32,
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
) -> Result<NetworkRun, String> {
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
            // Room for every agent's connections (a training link and its
            // short deployment and drift sessions) whatever the fleet's size.
            limits: {
                let d = fleet_coordinator::limits::Limits::default();
                let max_connections = d.max_connections.max(4 * devices.len() + 128);
                fleet_coordinator::limits::Limits {
                    max_connections,
                    retry_above: max_connections / 2,
                    ..d
                }
            },
            // The comparison reads every round's model afterwards.
            keep_models: None,
            store: None,
        },
        "fleet-sim",
    )?;
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
        let mut ids = Vec::new();
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
            let id = fleet_edge_agent::enroll::enroll(
                &state,
                addr,
                "localhost",
                home.ca_cert()?,
                &token,
                Some(dir.join(format!("data/device-{k}"))),
            )
            .await?;
            states.push(state);
            ids.push(id);
        }
        let spec = TaskSpec {
            name: "fleet-sim network mode".into(),
            ..fleet.task_spec()
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
        let listed = match result {
            Ok(()) => {
                let rounds = call(&mut admin, AdminRequest::ListRounds { task }).await;
                let models = call(&mut admin, AdminRequest::ListModels { task: Some(task) }).await;
                rounds.and_then(|r| models.map(|m| (r, m)))
            }
            Err(e) => Err(e),
        };
        endpoint.close(0u32.into(), b"simulation over");
        match listed? {
            (AdminResponse::Rounds(rounds), AdminResponse::Models(models)) => {
                let initial = models
                    .into_iter()
                    .find(|m| m.round == 0)
                    .ok_or("the task has no initial model")?;
                Ok((rounds, initial.id, ids))
            }
            _ => Err("no round or model list".to_string()),
        }
    })?;
    let (closed, initial, ids) = closed;
    let load = |id: &str| -> Result<Vec<f32>, String> {
        let bytes = std::fs::read(home.path("objects").join(id)).map_err(|e| e.to_string())?;
        bytes_to_params(&bytes).ok_or_else(|| format!("model object {id} is not f32 values"))
    };
    let spec = fleet.model_spec();
    let mut rounds = Vec::new();
    for r in closed.into_iter().filter(|r| r.outcome == "closed") {
        let model = load(r.model.as_deref().ok_or("a closed round without a model")?)?;
        let e =
            evaluate(&spec, &model, test.view(), Backend::DEFAULT).map_err(|e| e.to_string())?;
        let mut devices = r
            .participants
            .iter()
            .map(|p| {
                ids.iter()
                    .position(|id| id == p)
                    .map(|k| k as u32)
                    .ok_or_else(|| format!("round {}: unknown device {p}", r.round))
            })
            .collect::<Result<Vec<u32>, String>>()?;
        devices.sort_unstable();
        rounds.push(NetworkRound {
            round: r.round,
            devices,
            model,
            accuracy: e.accuracy,
            loss: e.loss,
            epsilon: r.epsilon,
        });
    }
    Ok(NetworkRun {
        initial: load(&initial)?,
        rounds,
        ids,
    })
}

/// Recomputes every closed round of `run` in memory (see the module
/// documentation). Private tasks cannot be replayed: their noise comes from
/// a secure source and is not recorded.
pub fn replay(
    fleet: &Fleet,
    data: &DeviceData,
    test: &Dataset,
    compute: &dyn Compute,
    run: &NetworkRun,
) -> Result<Vec<Replayed>, String> {
    if fleet.dp().is_some() {
        return Err("a private task's noise cannot be replayed".into());
    }
    let spec = fleet.task_spec();
    let rounds: Vec<ClosedRound<'_>> = run
        .rounds
        .iter()
        .map(|r| ClosedRound {
            round: r.round,
            devices: r.devices.iter().map(|&k| run.ids[k as usize]).collect(),
            model: &r.model,
        })
        .collect();
    let index = |id: u64| run.ids.iter().position(|&i| i == id).map(|k| k as u32);
    replay_rounds(&spec, &run.initial, &rounds, compute, |id, plan, global| {
        let k = index(id).ok_or_else(|| format!("unknown device {id}"))?;
        data.with(k, |d| plan_update(plan, id, global, d, |_| {}))
    })?
    .into_iter()
    .map(|(round, max_abs_diff, model)| {
        let e = evaluate(&spec.model, &model, test.view(), Backend::DEFAULT)
            .map_err(|e| e.to_string())?;
        Ok(Replayed {
            round,
            max_abs_diff,
            accuracy: e.accuracy,
        })
    })
    .collect()
}

/// A closed round as a coordinator recorded it: its devices (ids) and the
/// model it produced.
#[derive(Debug, Clone)]
pub struct ClosedRound<'a> {
    /// Round number.
    pub round: u64,
    /// The devices whose updates it aggregated.
    pub devices: Vec<u64>,
    /// The model it produced.
    pub model: &'a [f32],
}

/// Recomputes closed `rounds` of a task defined by `spec` from its
/// `initial` model, each device's update made by `update` (the device id,
/// the plan the coordinator sent, the round's global model), and returns
/// each round's number, the largest absolute difference between the
/// replayed and the recorded model, and the replayed model.
///
/// Each round is recomputed by the coordinator's own task core, as the
/// coordinator would after a restart with the round's updates stored:
/// [`TaskCore::resume`] from the previous recorded model and the server
/// optimiser's state, with the devices' updates, then ticks past the
/// selection timeout and the report deadline, which close it.
pub fn replay_rounds(
    spec: &TaskSpec,
    initial: &[f32],
    rounds: &[ClosedRound<'_>],
    compute: &dyn Compute,
    update: impl Fn(u64, &fleet_protocol::message::Plan, &[f32]) -> Result<ClientUpdate, String> + Sync,
) -> Result<Vec<(u64, f32, Vec<f32>)>, String> {
    let total = spec.model.layout().total;
    let mut server = spec.strategy.server(total).map_err(|e| e.to_string())?;
    let mut previous = initial;
    // The relative bound's basis, carried from round to round as the
    // coordinator keeps it with the task.
    let mut basis = None;
    // Centred clipping's history, carried likewise.
    let mut history = None;
    let mut out = Vec::with_capacity(rounds.len());
    for r in rounds {
        // The plan the coordinator sent (the time left plays no part in training).
        let plan = spec.plan(1, r.round, ModelObject::of(previous).object, 0);
        let updates = r
            .devices
            .par_iter()
            .map(|&id| {
                let u = update(id, &plan, previous)?;
                let values = decode(&u.bytes, total).map_err(|e| e.to_string())?;
                let weight = report_weight(false, u.examples as u64);
                Ok((id, weight, values))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let selected: Vec<u64> = updates.iter().map(|u| u.0).collect();
        let (mut core, refused) = TaskCore::resume(
            spec.clone(),
            previous.to_vec(),
            compute,
            Resume {
                round: r.round,
                closed: r.round - 1,
                selected: &selected,
                server,
                ledger: None,
                closed_rounds: &[],
                clip_norm: None,
                basis,
                history: history.take(),
                state: TaskState::Running,
            },
            &updates,
            0,
        )?;
        if let Some((device, why)) = refused.first() {
            return Err(format!(
                "round {}: the update of device {device} was refused: {why}",
                r.round
            ));
        }
        // Selection times out (reporting starts, or, with the target met,
        // the round closes); at the report deadline it closes at the latest.
        let first = spec.engine.selection_timeout_ms;
        let mut effects = core.tick(first);
        effects.extend(core.tick(first + spec.engine.report_deadline_ms));
        let closed = effects
            .into_iter()
            .find_map(|e| match e {
                Effect::Closed(c) => Some(c),
                _ => None,
            })
            .ok_or_else(|| format!("round {}: the replay did not close", r.round))?;
        if let Some(note) = closed.note {
            return Err(format!("round {}: {note}", r.round));
        }
        basis = closed.basis;
        history = core.history().cloned();
        let model = core.global().to_vec();
        let max_abs_diff = model
            .iter()
            .zip(r.model)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        out.push((r.round, max_abs_diff, model));
        let (m, v) = core.server_state();
        server = spec.strategy.server(total).map_err(|e| e.to_string())?;
        server
            .restore(m.to_vec(), v.to_vec())
            .map_err(|e| e.to_string())?;
        previous = r.model;
    }
    Ok(out)
}
