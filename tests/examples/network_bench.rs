//! Network and memory figures of the coordinator and the agent, in one run:
//!
//! 1. A 10 MB model sent to 100 agents on loopback by the coordinator
//!    (plan, then chunked fetch over the protocol) against quinn's own bulk
//!    throughput: the same bytes on plain QUIC streams, same TLS, same
//!    machine, one after the other.
//! 2. Coordinator memory (a separate `coordinator serve` process) with 1,000
//!    connected idle agents.
//! 3. Agent memory (a separate `edge-agent run` process) idle and after
//!    training the 2NN, and the stripped size of its binary.
//!
//! `cargo build --release --workspace --bins && cargo run --release -p fleet-e2e --example network_bench`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_e2e::{InProcess, ProcessFleet, binary, device_config, scratch};
use fleet_edge_agent::state::StateDir;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::MAX_FRAME;
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand};
use fleet_protocol::message::{AgentMessage, Capabilities, CoordinatorMessage};
use fleet_protocol::stream::{recv, send};
use fleet_protocol::task::{EngineConfig, TaskSpec};
use fleet_protocol::tls::{RevocationList, client_config, device_key_and_csr, server_config};

const AGENTS: usize = 100;

fn rss_kib(pid: u32, field: &str) -> u64 {
    fleet_e2e::proc_status_kib(pid, field)
}

fn hello() -> AgentMessage {
    AgentMessage::Hello {
        version: fleet_protocol::PROTOCOL_VERSION,
        min_version: fleet_protocol::MIN_SUPPORTED_VERSION,
        software: "bench".into(),
    }
}

fn check_in() -> AgentMessage {
    AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib: 64,
            eligible: true,
        },
    }
}

async fn call(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
    m: &AgentMessage,
) -> CoordinatorMessage {
    send(tx, m).await.unwrap();
    recv(rx, MAX_FRAME).await.unwrap().unwrap()
}

/// One agent: hello, check in, fetch the whole model; returns bytes received.
async fn fetch_model(endpoint: quinn::Endpoint, cfg: quinn::ClientConfig, addr: SocketAddr) -> u64 {
    let conn = endpoint
        .connect_with(cfg, addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    call(&mut tx, &mut rx, &hello()).await;
    let CoordinatorMessage::Plan(plan) = call(&mut tx, &mut rx, &check_in()).await else {
        panic!("no plan")
    };
    send(
        &mut tx,
        &AgentMessage::Fetch {
            object: plan.model.id,
            offset: 0,
        },
    )
    .await
    .unwrap();
    let mut got = 0;
    while got < plan.model.size {
        match recv::<CoordinatorMessage>(&mut rx, MAX_FRAME)
            .await
            .unwrap()
            .unwrap()
        {
            CoordinatorMessage::Chunk { data, .. } => got += data.len() as u64,
            other => panic!("{other:?}"),
        }
    }
    conn.close(0u32.into(), b"done");
    got
}

async fn model_fanout() -> (f64, u64, usize) {
    let dir = scratch("bench-fanout");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    // An MLP of 2,528,110 parameters: 10.1 MB as f32.
    let spec = ModelSpec::Mlp {
        inputs: 784,
        hidden: vec![3180],
        classes: 10,
    };
    let size = spec.layout().total * 4;
    let task = TaskSpec {
        name: "fanout".into(),
        model: spec,
        train: TrainConfig::default(),
        strategy: StrategyConfig::fedavg(),
        codec: Codec::F32,
        dp: None,
        budget: None,
        population: AGENTS as u64,
        engine: EngineConfig {
            target: AGENTS,
            over_selection: 1.0,
            min_reports: 1,
            rounds: 1,
            selection_timeout_ms: 600_000,
            report_deadline_ms: 600_000,
            ..EngineConfig::default()
        },
        seed: 1,
        variant: Default::default(),
        max_examples: fleet_protocol::task::DEFAULT_MAX_EXAMPLES,
        secure_aggregation: None,
    };
    let AdminResponse::Done { id: Some(id), .. } = admin
        .call(&AdminRequest::CreateTask(Box::new(task)))
        .await
        .unwrap()
    else {
        panic!()
    };
    admin
        .call(&AdminRequest::SetTaskState {
            task: id,
            command: TaskCommand::Start,
        })
        .await
        .unwrap();
    let mut cfgs = Vec::new();
    for k in 0..AGENTS {
        let (_, state) = c.enroll(&mut admin, &dir.join(format!("a{k}"))).await;
        cfgs.push(device_config(&state));
    }
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let start = Instant::now();
    let tasks: Vec<_> = cfgs
        .into_iter()
        .map(|cfg| tokio::spawn(fetch_model(endpoint.clone(), cfg, c.addr)))
        .collect();
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    (start.elapsed().as_secs_f64(), bytes, size)
}

/// The same bytes on plain QUIC: one unidirectional stream per connection.
async fn quinn_bulk(size: usize) -> (f64, u64) {
    let ca = fleet_protocol::tls::CertificateAuthority::create("bench").unwrap();
    let (cert, key) = ca.issue_server(&["localhost".into()], 1).unwrap();
    let server = quinn::Endpoint::server(
        server_config(ca.cert(), cert, key, Arc::new(RevocationList::default())).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let payload = Arc::new(vec![7u8; size]);
    let srv = server.clone();
    tokio::spawn(async move {
        while let Some(inc) = srv.accept().await {
            let payload = payload.clone();
            tokio::spawn(async move {
                let conn = inc.await.unwrap();
                let mut s = conn.open_uni().await.unwrap();
                s.write_all(&payload).await.unwrap();
                s.finish().unwrap();
                conn.closed().await;
            });
        }
    });
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cfgs = Vec::new();
    for k in 0..AGENTS {
        let (key, csr) = device_key_and_csr().unwrap();
        cfgs.push(
            client_config(ca.cert(), ca.issue_device(&csr, k as u64, 1).unwrap(), key).unwrap(),
        );
    }
    let start = Instant::now();
    let tasks: Vec<_> = cfgs
        .into_iter()
        .map(|cfg| {
            let ep = endpoint.clone();
            tokio::spawn(async move {
                let conn = ep
                    .connect_with(cfg, addr, "localhost")
                    .unwrap()
                    .await
                    .unwrap();
                let mut s = conn.accept_uni().await.unwrap();
                let data = s.read_to_end(usize::MAX).await.unwrap();
                conn.close(0u32.into(), b"done");
                data.len() as u64
            })
        })
        .collect();
    let mut bytes = 0;
    for t in tasks {
        bytes += t.await.unwrap();
    }
    (start.elapsed().as_secs_f64(), bytes)
}

async fn idle_connections(n: usize) -> (u64, u64) {
    let fleet = ProcessFleet::new("bench-idle", 1, "embedded");
    let pid = fleet.coordinator.as_ref().unwrap().child.id();
    let home = fleet_coordinator::home::Home::at(&fleet.home);
    let addr: SocketAddr = fleet.addr.parse().unwrap();
    let mut admin = fleet_coordinator::cli::admin::AdminClient::connect(&home, Some(addr))
        .await
        .unwrap();
    let mut cfgs = Vec::new();
    for k in 0..n {
        let AdminResponse::Token { token, .. } = admin
            .call(&AdminRequest::CreateToken {
                label: "idle".into(),
                ttl_secs: 600,
            })
            .await
            .unwrap()
        else {
            panic!()
        };
        let state = StateDir::at(fleet.dir.join(format!("idle-{k}")));
        fleet_edge_agent::enroll::enroll(
            &state,
            addr,
            "localhost",
            home.ca_cert().unwrap(),
            &token,
            None,
        )
        .await
        .unwrap();
        cfgs.push(device_config(&state));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = rss_kib(pid, "VmRSS:");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut held = Vec::new();
    for cfg in cfgs {
        let conn = endpoint
            .connect_with(cfg, addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        call(&mut tx, &mut rx, &hello()).await;
        // No task runs: every agent is told to come back later, and idles.
        let reply = call(&mut tx, &mut rx, &check_in()).await;
        assert!(
            matches!(reply, CoordinatorMessage::ComeBackLater { .. }),
            "{reply:?}"
        );
        held.push((conn, tx, rx));
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = fleet.admin(&["devices", "list", "--json"]);
    let connected = text.matches("\"connected\": true").count();
    assert_eq!(connected, n, "all idle agents connected");
    let after = rss_kib(pid, "VmRSS:");
    drop(held);
    (before, after)
}

fn agent_memory() -> (u64, u64, u64) {
    let mut fleet = ProcessFleet::new("bench-agent", 1, "embedded");
    fleet.start_agent(0, &[]);
    let pid = fleet.agents[0].as_ref().unwrap().child.id();
    std::thread::sleep(Duration::from_secs(4));
    let idle = rss_kib(pid, "VmRSS:");
    fleet.admin(&[
        "tasks",
        "create",
        "--name",
        "rss",
        "--rounds",
        "1",
        "--target",
        "1",
        "--over-selection",
        "1",
        "--population",
        "1",
        "--epochs",
        "1",
    ]);
    fleet.admin(&["tasks", "start", "1"]);
    fleet.wait_finished(1, 600);
    let peak = rss_kib(pid, "VmHWM:");
    let examples = std::fs::read_to_string(fleet.dir.join("agent-0.log"))
        .unwrap()
        .lines()
        .find_map(|l| l.split(" with ").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    (idle, peak, examples)
}

fn stripped_size(name: &str) -> u64 {
    let copy = std::env::temp_dir().join(format!("{name}-stripped"));
    std::fs::copy(binary(name), &copy).unwrap();
    let ok = std::process::Command::new("strip")
        .arg(&copy)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "strip failed (binutils installed?)");
    std::fs::metadata(&copy).unwrap().len()
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (t_fleet, b_fleet, size) = rt.block_on(model_fanout());
    let (t_quinn, b_quinn) = rt.block_on(quinn_bulk(size));
    println!(
        "## Model fan-out: {:.1} MB to {AGENTS} agents on loopback (one process, one core-bound runtime)\n",
        size as f64 / 1e6
    );
    println!("| path | wall time (s) | bytes received | throughput (MB/s) |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| coordinator: plan + chunked fetch | {t_fleet:.2} | {b_fleet} | {:.0} |",
        b_fleet as f64 / 1e6 / t_fleet
    );
    println!(
        "| plain quinn stream, same TLS | {t_quinn:.2} | {b_quinn} | {:.0} |",
        b_quinn as f64 / 1e6 / t_quinn
    );
    println!("\nratio coordinator / quinn: {:.2}×\n", t_fleet / t_quinn);

    let n = 1_000;
    let (before, after) = rt.block_on(idle_connections(n));
    println!("## Coordinator memory with {n} connected idle agents\n");
    println!("| | RSS (MiB) |");
    println!("| --- | ---: |");
    println!("| no agents connected | {:.1} |", before as f64 / 1024.0);
    println!(
        "| {n} agents connected, idle | {:.1} |",
        after as f64 / 1024.0
    );
    println!(
        "\nper connected agent: {:.1} KiB\n",
        (after.saturating_sub(before)) as f64 / n as f64
    );

    let (idle, peak, examples) = agent_memory();
    println!("## Agent memory (edge-agent run, 2NN, {examples} local examples)\n");
    println!("| | MiB |");
    println!("| --- | ---: |");
    println!("| RSS idle, connected | {:.1} |", idle as f64 / 1024.0);
    println!(
        "| peak RSS after one round of training | {:.1} |",
        peak as f64 / 1024.0
    );
    println!(
        "\nstripped edge-agent binary: {:.1} MB",
        stripped_size("edge-agent") as f64 / 1e6
    );
    println!(
        "stripped coordinator binary: {:.1} MB",
        stripped_size("coordinator") as f64 / 1e6
    );
}
