//! Check-ins and updates ingested per second through 1, 2 and 3
//! coordinator replicas sharing PostgreSQL, against the embedded SQLite
//! coordinator, side by side in one run on one machine; and the database
//! transactions a round costs.
//!
//! Each configuration gets `DEVICES` devices, enrolled through the real
//! protocol and spread round-robin over the replicas, each an in-process
//! QUIC session (one connection, mutual TLS) driven by this process. A
//! FedAvg 2NN task selects every device every round. Per configuration:
//!
//! - **updates**: each device checks in, gets the plan and uploads an f32
//!   update (the 2NN's 199,210 parameters, 797 KB); the rate is the round's
//!   `DEVICES` updates over the time from the first upload to the round's
//!   close (the last acknowledgement);
//! - **check-ins**: for `SECS` seconds every device checks in again and
//!   again, ignoring the time it is told to come back (a request answered
//!   by the round engine: "come back later" once selection is over); the
//!   rate is the answers per second;
//! - **transactions**: PostgreSQL's committed transactions
//!   (`pg_stat_database.xact_commit`, all clients of the database, the
//!   replicas' heartbeats and polls included) from the task's start to the
//!   round's close: selection, uploads and the close, per round and per
//!   device.
//!
//! Replica processes run the release `coordinator` binary:
//!
//! `cargo build --release --bins -p fleet-coordinator -p fleet-edge-agent &&
//!  FLEET_POSTGRES="$(.ci/postgres)" cargo run --release -p fleet-e2e --example replica_load -- [DEVICES] [SECS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::Home;
use fleet_e2e::replicas::ReplicaFleet;
use fleet_e2e::{Peer, connect, device_config, hello, proc_status_kib, task_args, upload};
use fleet_edge_agent::state::StateDir;
use fleet_models::ModelKind;
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, Capabilities, CoordinatorMessage};

struct Row {
    label: String,
    updates_per_s: f64,
    checkins_per_s: f64,
    /// Transactions from the start to the round's close, and the replicas'
    /// idle rate times that time.
    transactions: Option<(i64, f64)>,
    rss_mib: Vec<f64>,
}

fn check_in() -> AgentMessage {
    AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib: 4096,
            eligible: true,
        },
    }
}

/// Committed transactions of the store's database so far.
fn commits(fleet: &ReplicaFleet) -> Option<i64> {
    fleet.url.as_ref()?;
    let row = fleet
        .db()
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .ok()?;
    Some(row.get(0))
}

async fn enroll(fleet: &ReplicaFleet, devices: usize) -> Vec<(usize, StateDir)> {
    let home = Home::at(&fleet.home);
    let ca = home.ca_cert().expect("the CA certificate");
    let mut admin = AdminClient::connect(&home, Some(fleet.addrs[0].parse().unwrap()))
        .await
        .expect("admin");
    let mut out = Vec::with_capacity(devices);
    for k in 0..devices {
        let AdminResponse::Token { token, .. } = admin
            .call(&AdminRequest::CreateToken {
                label: format!("load-{k}"),
                ttl_secs: 600,
            })
            .await
            .expect("a token")
        else {
            panic!("no token");
        };
        let via = k % fleet.addrs.len();
        let dir = StateDir::at(fleet.dir.join(format!("device-{k}")));
        fleet_edge_agent::enroll::enroll(
            &dir,
            fleet.addrs[via].parse().unwrap(),
            "localhost",
            ca.clone(),
            &token,
            None,
        )
        .await
        .expect("enrollment");
        out.push((via, dir));
    }
    out
}

async fn session(fleet: &ReplicaFleet, via: usize, state: &StateDir) -> Peer {
    let mut p = connect(fleet.addrs[via].parse().unwrap(), device_config(state)).await;
    let greeted = p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    assert!(
        matches!(greeted, Some(CoordinatorMessage::HelloAck { .. })),
        "{greeted:?}"
    );
    p
}

fn measure(label: &str, fleet: &ReplicaFleet, devices: usize, secs: u64) -> Row {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let spec = ModelKind::TwoNn.spec(784, 10);
    let values: Arc<Vec<f32>> = Arc::new(
        (0..spec.layout().total)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
            .collect(),
    );
    let states = rt.block_on(enroll(fleet, devices));
    let args = task_args(
        "load",
        1000,
        devices,
        devices,
        1,
        &["--report-deadline", "600", "--selection-timeout", "600"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleet.admin(&args);
    fleet.admin(&["tasks", "start", "1"]);
    // The replicas' own transactions (heartbeats, relay polls, leases)
    // while nothing happens, to tell them from the round's.
    let idle = commits(fleet);
    std::thread::sleep(Duration::from_secs(2));
    let before = commits(fleet);
    let idle_per_s = idle.zip(before).map(|(a, b)| (b - a) as f64 / 2.0);
    let phase = Instant::now();
    let (updates_per_s, peers) = rt.block_on(async {
        let mut peers = Vec::with_capacity(devices);
        for (via, state) in &states {
            peers.push(session(fleet, *via, state).await);
        }
        // Updates: every device checks in, is selected and uploads.
        let mut plans = Vec::new();
        for p in &mut peers {
            match p.call(&check_in()).await {
                Some(CoordinatorMessage::Plan(plan)) => plans.push((plan.task, plan.round)),
                other => panic!("no plan: {other:?}"),
            }
        }
        let started = Instant::now();
        let mut jobs = tokio::task::JoinSet::new();
        for (k, (mut p, (task, round))) in peers.into_iter().zip(plans).enumerate() {
            // Updates are objects named by their hash: each device's its own.
            let mut values = values.to_vec();
            values[0] += k as f32 * 1e-6;
            let spec = spec.clone();
            jobs.spawn(async move {
                let reply = upload(&mut p, &spec, task, round, &values).await;
                assert!(
                    matches!(reply, Some(CoordinatorMessage::UploadAccepted { .. })),
                    "{reply:?}"
                );
                p
            });
        }
        let mut peers = Vec::with_capacity(devices);
        while let Some(p) = jobs.join_next().await {
            peers.push(p.unwrap());
        }
        (devices as f64 / started.elapsed().as_secs_f64(), peers)
    });
    // (Read outside the runtime: the PostgreSQL client blocks.)
    let transactions = before.zip(commits(fleet)).map(|(a, b)| {
        let polls = idle_per_s.unwrap_or(0.0) * phase.elapsed().as_secs_f64();
        (b - a, polls)
    });
    let checkins_per_s = rt.block_on(async {
        // Check-ins, for `secs` seconds.
        let answered = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(secs);
        let mut jobs = tokio::task::JoinSet::new();
        for mut p in peers {
            let answered = answered.clone();
            jobs.spawn(async move {
                while Instant::now() < until {
                    match p.call(&check_in()).await {
                        Some(_) => answered.fetch_add(1, Ordering::Relaxed),
                        None => break,
                    };
                }
            });
        }
        while jobs.join_next().await.is_some() {}
        answered.load(Ordering::Relaxed) as f64 / secs as f64
    });
    let rss_mib = fleet
        .replicas
        .iter()
        .flatten()
        .map(|p| proc_status_kib(p.child.id(), "VmHWM:") as f64 / 1024.0)
        .collect();
    Row {
        label: label.to_string(),
        updates_per_s,
        checkins_per_s,
        transactions,
        rss_mib,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let devices: usize = args.next().map_or(120, |a| a.parse().expect("DEVICES"));
    let secs: u64 = args.next().map_or(10, |a| a.parse().expect("SECS"));
    assert!(
        std::env::var("FLEET_POSTGRES").is_ok(),
        "set FLEET_POSTGRES (`.ci/postgres` starts a server)"
    );
    let mut rows = Vec::new();
    for (label, replicas) in [
        ("SQLite, 1 coordinator", 0),
        ("PostgreSQL, 1 replica", 1),
        ("PostgreSQL, 2 replicas", 2),
        ("PostgreSQL, 3 replicas", 3),
    ] {
        let name = format!("load-{replicas}");
        let fleet = match replicas {
            0 => ReplicaFleet::start(&name, None, 1, &[]),
            n => ReplicaFleet::start(
                &name,
                fleet_coordinator::store::scratch::schema(&name),
                n,
                &[],
            ),
        };
        let row = measure(label, &fleet, devices, secs);
        eprintln!(
            "{label}: {:.1} updates/s, {:.0} check-ins/s",
            row.updates_per_s, row.checkins_per_s
        );
        rows.push(row);
    }
    let base = (rows[0].updates_per_s, rows[0].checkins_per_s);
    println!(
        "| store ({devices} devices, 2NN f32 updates) | updates/s | × SQLite | check-ins/s | × SQLite | transactions per round | per device, net of idle polls | peak RSS per replica |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for r in &rows {
        let (tx, per) = match r.transactions {
            Some((t, polls)) => (
                format!("{t} ({polls:.0} idle polls)"),
                format!("{:.2}", (t as f64 - polls) / devices as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {:.1} | {:.2}× | {:.0} | {:.2}× | {tx} | {per} | {} |",
            r.label,
            r.updates_per_s,
            r.updates_per_s / base.0,
            r.checkins_per_s,
            r.checkins_per_s / base.1,
            r.rss_mib
                .iter()
                .map(|m| format!("{m:.0} MiB"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}
