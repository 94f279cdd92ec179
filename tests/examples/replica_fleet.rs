//! Many connected devices across coordinator replicas on PostgreSQL: `N`
//! devices (in-process QUIC sessions, one connection and UDP socket each,
//! mutual TLS) spread round-robin over `R` replica processes, all connected
//! at once for `SECS` seconds, with a FedAvg 2NN task whose rounds select
//! `COHORT` devices (over-selection 1, all must report). A selected device
//! uploads an f32 update at once; every other device checks in when it was
//! told to come back. Prints the rounds closed, the median round time, and
//! each replica's resident memory with everything connected (VmRSS) and at
//! its peak (VmHWM).
//!
//! `cargo build --release --bins -p fleet-coordinator -p fleet-edge-agent &&
//!  FLEET_POSTGRES="$(.ci/postgres)" cargo run --release -p fleet-e2e --example replica_fleet -- [N] [R] [COHORT] [SECS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::Home;
use fleet_e2e::replicas::ReplicaFleet;
use fleet_e2e::{connect, device_config, hello, proc_status_kib, task_args, upload};
use fleet_edge_agent::state::StateDir;
use fleet_models::ModelKind;
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, Capabilities, CoordinatorMessage};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map_or(default, |a| a.parse().expect("a number"))
}

fn main() {
    let devices = arg(1, 10_000) as usize;
    let replicas = arg(2, 3) as usize;
    let cohort = arg(3, 500) as usize;
    let secs = arg(4, 120);
    let url = fleet_coordinator::store::scratch::schema("replica-fleet")
        .expect("set FLEET_POSTGRES (`.ci/postgres` starts a server)");
    let mut fleet = ReplicaFleet::start("replica-fleet", Some(url), replicas, &[]);
    // Room for every device's connection (the default cap is 1,024 a replica)
    // and for enrollments from one address.
    for i in 0..replicas {
        fleet.kill_replica(i);
    }
    let settings_path = fleet.home.join("coordinator.json");
    let mut settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings_path).unwrap()).unwrap();
    settings["limits"]["max_connections"] = (devices / replicas + 1_000).into();
    settings["limits"]["retry_above"] = (devices / replicas + 1_000).into();
    // Every device enrolls from 127.0.0.1, 32 at a time.
    settings["limits"]["anonymous_per_address"] = 64.into();
    std::fs::write(&settings_path, settings.to_string()).unwrap();
    for i in 0..replicas {
        fleet.start_replica(i, "serve");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let home = Home::at(&fleet.home);
    let started = Instant::now();
    let states: Vec<(usize, StateDir)> = rt.block_on(async {
        let ca = home.ca_cert().unwrap();
        let mut admin = AdminClient::connect(&home, Some(fleet.addrs[0].parse().unwrap()))
            .await
            .unwrap();
        let mut tokens = Vec::with_capacity(devices);
        for k in 0..devices {
            let AdminResponse::Token { token, .. } = admin
                .call(&AdminRequest::CreateToken {
                    label: format!("d{k}"),
                    ttl_secs: 3600,
                })
                .await
                .unwrap()
            else {
                panic!("no token")
            };
            tokens.push(token);
        }
        let mut jobs = tokio::task::JoinSet::new();
        let mut states = Vec::with_capacity(devices);
        for (k, token) in tokens.into_iter().enumerate() {
            let via = k % replicas;
            let addr = fleet.addrs[via].parse().unwrap();
            let dir = StateDir::at(fleet.dir.join(format!("device-{k}")));
            let ca = ca.clone();
            jobs.spawn(async move {
                fleet_edge_agent::enroll::enroll(&dir, addr, "localhost", ca, &token, None)
                    .await
                    .expect("enrollment");
                (via, dir)
            });
            if jobs.len() >= 32 {
                states.push(jobs.join_next().await.unwrap().unwrap());
            }
        }
        while let Some(s) = jobs.join_next().await {
            states.push(s.unwrap());
        }
        states
    });
    eprintln!("{devices} devices enrolled in {:.0?}", started.elapsed());
    let args = task_args(
        "fleet",
        100_000,
        devices,
        cohort,
        10,
        &["--report-deadline", "120", "--selection-timeout", "60"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fleet.admin(&args);
    let spec = ModelKind::TwoNn.spec(784, 10);
    let values: Arc<Vec<f32>> = Arc::new(
        (0..spec.layout().total)
            .map(|i| ((i % 97) as f32 - 48.0) * 1e-4)
            .collect(),
    );
    let connected = Arc::new(AtomicU64::new(0));
    let uploads = Arc::new(AtomicU64::new(0));
    let rss = rt.block_on(async {
        let until = Instant::now() + Duration::from_secs(secs) + Duration::from_secs(60);
        let mut jobs = tokio::task::JoinSet::new();
        for (k, (via, state)) in states.into_iter().enumerate() {
            let addr = fleet.addrs[via].parse().unwrap();
            let (connected, uploads, values, spec) = (
                connected.clone(),
                uploads.clone(),
                values.clone(),
                spec.clone(),
            );
            jobs.spawn(async move {
                let mut p = connect(addr, device_config(&state)).await;
                p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
                connected.fetch_add(1, Ordering::Relaxed);
                while Instant::now() < until {
                    let reply = p
                        .call(&AgentMessage::CheckIn {
                            capabilities: Capabilities {
                                memory_mib: 4096,
                                eligible: true,
                            },
                        })
                        .await;
                    let wait = match reply {
                        Some(CoordinatorMessage::Plan(plan)) => {
                            // Updates are objects named by their hash: each its own.
                            let mut mine = values.to_vec();
                            mine[0] += (k as f32 + plan.round as f32 * 0.5) * 1e-7;
                            upload(&mut p, &spec, plan.task, plan.round, &mine).await;
                            uploads.fetch_add(1, Ordering::Relaxed);
                            1_000
                        }
                        Some(CoordinatorMessage::ComeBackLater { after_ms }) => after_ms,
                        Some(_) => 5_000,
                        None => break,
                    };
                    tokio::time::sleep(Duration::from_millis(wait.clamp(100, 30_000))).await;
                }
                p
            });
        }
        // Everyone connected: start the task, then hold for `secs`.
        let wait = Instant::now();
        while connected.load(Ordering::Relaxed) < devices as u64
            && wait.elapsed() < Duration::from_secs(600)
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        eprintln!(
            "{} devices connected in {:.0?}",
            connected.load(Ordering::Relaxed),
            wait.elapsed()
        );
        let home_dir = fleet.home.clone();
        let addr = fleet.addrs[0].clone();
        tokio::task::spawn_blocking(move || {
            fleet_e2e::run(
                &fleet_e2e::binary("coordinator"),
                &[
                    "tasks",
                    "start",
                    "1",
                    "--dir",
                    home_dir.to_str().unwrap(),
                    "--coordinator",
                    &addr,
                ],
            )
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let rss: Vec<(f64, f64)> = fleet
            .replicas
            .iter()
            .flatten()
            .map(|p| {
                (
                    proc_status_kib(p.child.id(), "VmRSS:") as f64 / 1024.0,
                    proc_status_kib(p.child.id(), "VmHWM:") as f64 / 1024.0,
                )
            })
            .collect();
        jobs.abort_all();
        rss
    });
    let rounds = fleet.closed_rounds(1);
    let ends: Vec<u64> = fleet
        .admin_json(&["rounds", "1"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "closed")
        .map(|r| r["ended_at"].as_u64().unwrap())
        .collect();
    let mut gaps: Vec<f64> = ends
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps.get(gaps.len() / 2).copied();
    println!(
        "{devices} devices connected across {replicas} replicas, rounds of {cohort}, {secs} s: \
         {} rounds closed ({} updates uploaded), median round {}",
        rounds.len(),
        uploads.load(Ordering::Relaxed),
        median.map_or("–".into(), |m| format!("{m:.1} s"))
    );
    println!("| replica | RSS, all connected | peak RSS |");
    println!("|---|---:|---:|");
    for (i, (now, peak)) in rss.iter().enumerate() {
        println!("| r{i} | {now:.0} MiB | {peak:.0} MiB |");
    }
}
