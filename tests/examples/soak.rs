//! Load and soak of a coordinator process: `--agents` in-process agents
//! (the agent's own `run`, one trainer thread each, one current-thread
//! runtime as in the simulator's network mode) enrolled with a separate
//! `coordinator serve` process and training in every round of a task whose
//! cohort is 99% of the fleet (90% must report), for `--minutes`. Every `--every` seconds it
//! records the coordinator's RSS and open file descriptors, this process's
//! RSS (the agents) and the rounds closed, and at the end prints the table,
//! writes it as CSV (`--csv`) and plots it (the same path with
//! `.memory.svg` and `.rounds.svg` in place of `.csv`).
//!
//! ```sh
//! cargo build --release --workspace --bins --examples
//! cargo run --release -p fleet-e2e --example soak -- --agents 1000 --minutes 30
//! cargo run --release -p fleet-e2e --example soak -- --replot soak.csv   # plots only
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::Home;
use fleet_e2e::{Proc, binary, free_udp_port, run, scratch};
use fleet_edge_agent::run::RunConfig;
use fleet_edge_agent::state::StateDir;
use fleet_protocol::admin::{AdminRequest, AdminResponse};

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `--name value` from the command line, or `default`.
fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} {v}: a number")))
        .unwrap_or(default)
}

/// One sample.
struct Sample {
    minute: f64,
    coordinator_rss_mib: f64,
    coordinator_fds: usize,
    agents_rss_mib: f64,
    rounds: u64,
    round_secs: Option<f64>,
}

/// Rounds of `task` closed so far (a new admin session each time, so that
/// an idle one never times out between samples).
async fn closed_rounds(home: &Home, server: std::net::SocketAddr, task: u64) -> u64 {
    let mut admin = AdminClient::connect(home, Some(server)).await.unwrap();
    match admin.call(&AdminRequest::ListRounds { task }).await {
        Ok(AdminResponse::Rounds(rounds)) => {
            rounds.iter().filter(|r| r.outcome == "closed").count() as u64
        }
        other => panic!("rounds: {other:?}"),
    }
}

/// The samples of a CSV written by [`write_csv`].
fn read_csv(path: &Path) -> Vec<Sample> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            Sample {
                minute: f[0].parse().unwrap(),
                coordinator_rss_mib: f[1].parse().unwrap(),
                coordinator_fds: f[2].parse().unwrap(),
                agents_rss_mib: f[3].parse().unwrap(),
                rounds: f[4].parse().unwrap(),
                round_secs: f[5].parse().ok(),
            }
        })
        .collect()
}

fn main() {
    // `--replot CSV`: only draw the plots of an earlier run's CSV.
    if let Some(csv) = std::env::args().skip_while(|a| a != "--replot").nth(1) {
        write_plots(Path::new(&csv), &read_csv(Path::new(&csv)));
        return;
    }
    let agents = arg("--agents", 1000) as usize;
    let minutes = arg("--minutes", 30);
    let every = arg("--every", 60);
    let csv = std::env::args()
        .skip_while(|a| a != "--csv")
        .nth(1)
        .unwrap_or_else(|| "soak.csv".into());
    let dir = scratch("soak");
    let home = dir.join("home");
    let home_s = home.to_str().unwrap().to_string();
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let c = binary("coordinator");
    fleet_e2e::init_home(&home, &addr, &["--metrics", "none"]);
    // Room for every agent's three sessions.
    let mut settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(home.join("coordinator.json")).unwrap())
            .unwrap();
    let cap = 4 * agents + 128;
    settings["limits"] = serde_json::json!({
        "max_connections": cap,
        "retry_above": cap,
    });
    std::fs::write(home.join("coordinator.json"), settings.to_string()).unwrap();
    let log = dir.join("coordinator.log");
    let mut coordinator = Proc::spawn(&c, &["serve", "--dir", &home_s], &log);
    let pid = coordinator.child.id();
    fleet_e2e::wait_listening(&home);
    let data = dir.join("data");
    fleet_e2e::split_data(&data, agents, "embedded", &[]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let samples = local.block_on(&rt, async {
        let h = Home::at(&home);
        let server: std::net::SocketAddr = addr.parse().unwrap();
        let mut admin = AdminClient::connect(&h, Some(server)).await.unwrap();
        let started = Instant::now();
        let mut states = Vec::new();
        for k in 0..agents {
            let AdminResponse::Token { token, .. } = admin
                .call(&AdminRequest::CreateToken {
                    label: format!("device-{k}"),
                    ttl_secs: 3600,
                })
                .await
                .unwrap()
            else {
                panic!("no token")
            };
            let state = StateDir::at(dir.join(format!("agent-{k}")));
            fleet_edge_agent::enroll::enroll(
                &state,
                server,
                "localhost",
                h.ca_cert().unwrap(),
                &token,
                Some(data.join(format!("device-{k}"))),
            )
            .await
            .unwrap();
            states.push(state);
        }
        eprintln!("{agents} agents enrolled in {:.1?}", started.elapsed());
        let n = agents.to_string();
        // A cohort of 99% of the fleet, of which 90% must report: every
        // round trains on nearly every agent at once, and a round does not
        // wait for its slowest tenth.
        let target = (agents * 9 / 10).max(1).to_string();
        run(
            &c,
            &[
                "tasks",
                "create",
                "--dir",
                &home_s,
                "--name",
                "soak",
                "--model",
                "logreg",
                "--rounds",
                "1000000",
                "--target",
                &target,
                "--population",
                &n,
                "--over-selection",
                "1.1",
                "--epochs",
                "1",
                "--retry-secs",
                "1",
                "--selection-window",
                "0",
                "--report-deadline",
                "120",
                "--selection-timeout",
                "120",
            ],
        );
        run(&c, &["tasks", "start", "1", "--dir", &home_s]);
        for (k, state) in states.into_iter().enumerate() {
            let cfg = RunConfig {
                eligibility: fleet_edge_agent::eligibility::Rules {
                    require_ac_power: false,
                    require_unmetered: false,
                    ..Default::default()
                },
                ..RunConfig::default()
            };
            tokio::task::spawn_local(async move {
                // Devices do not all start in the same millisecond: 10 ms
                // apart, the fleet is up in 10 s.
                tokio::time::sleep(Duration::from_millis(10 * k as u64)).await;
                if let Err(e) = fleet_edge_agent::run::run(&state, cfg).await {
                    eprintln!("agent stopped: {e}");
                }
            });
        }
        let me = std::process::id();
        let start = Instant::now();
        let end = start + Duration::from_secs(minutes * 60);
        let mut samples: Vec<Sample> = Vec::new();
        let mut last_rounds = (0u64, start);
        loop {
            let rounds = closed_rounds(&h, server, 1).await;
            let now = Instant::now();
            let round_secs = (rounds > last_rounds.0)
                .then(|| (now - last_rounds.1).as_secs_f64() / (rounds - last_rounds.0) as f64);
            last_rounds = (rounds, now);
            let s = Sample {
                minute: start.elapsed().as_secs_f64() / 60.0,
                coordinator_rss_mib: fleet_e2e::proc_status_kib(pid, "VmRSS:") as f64 / 1024.0,
                coordinator_fds: fds(pid),
                agents_rss_mib: fleet_e2e::proc_status_kib(me, "VmRSS:") as f64 / 1024.0,
                rounds,
                round_secs,
            };
            eprintln!(
                "min {:5.1}  coordinator {:7.1} MiB {:5} fds  agents {:7.1} MiB  rounds {:5}  {}",
                s.minute,
                s.coordinator_rss_mib,
                s.coordinator_fds,
                s.agents_rss_mib,
                s.rounds,
                s.round_secs
                    .map_or("-".into(), |r| format!("{r:.1} s/round"))
            );
            samples.push(s);
            if now >= end {
                break samples;
            }
            tokio::time::sleep(Duration::from_secs(every)).await;
        }
    });
    coordinator.kill();
    write_csv(Path::new(&csv), &samples);
    write_plots(Path::new(&csv), &samples);
    println!(
        "| minute | coordinator RSS (MiB) | coordinator fds | agents' process RSS (MiB) | rounds closed | s per round since last sample |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for s in &samples {
        println!(
            "| {:.1} | {:.1} | {} | {:.1} | {} | {} |",
            s.minute,
            s.coordinator_rss_mib,
            s.coordinator_fds,
            s.agents_rss_mib,
            s.rounds,
            s.round_secs.map_or("–".into(), |r| format!("{r:.1}"))
        );
    }
    let peak = samples
        .iter()
        .map(|s| s.coordinator_rss_mib)
        .fold(0.0, f64::max);
    println!(
        "coordinator peak RSS {peak:.1} MiB; {} agents; CSV in {csv}",
        agents
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_csv(path: &Path, samples: &[Sample]) {
    let mut text = String::from(
        "minute,coordinator_rss_mib,coordinator_fds,agents_rss_mib,rounds,round_secs\n",
    );
    for s in samples {
        text += &format!(
            "{:.2},{:.1},{},{:.1},{},{}\n",
            s.minute,
            s.coordinator_rss_mib,
            s.coordinator_fds,
            s.agents_rss_mib,
            s.rounds,
            s.round_secs.map_or(String::new(), |r| format!("{r:.2}"))
        );
    }
    std::fs::write(path, text).unwrap();
}

/// Memory, descriptors and round times against time, as SVG next to the CSV.
fn write_plots(csv: &Path, samples: &[Sample]) {
    use fleet_sim::report::{Series, line_chart};
    let series = |name: &str, y: &dyn Fn(&Sample) -> Option<f64>| Series {
        name: name.into(),
        points: samples
            .iter()
            .filter_map(|s| Some((s.minute, y(s)?)))
            .collect(),
    };
    let memory = line_chart(
        "Resident memory during the soak",
        "minutes",
        "MiB",
        &[
            series("coordinator process", &|s| Some(s.coordinator_rss_mib)),
            series("agents' process", &|s| Some(s.agents_rss_mib)),
        ],
        true,
    )
    .unwrap();
    let rounds = line_chart(
        "Coordinator descriptors and round time during the soak",
        "minutes",
        "count / seconds",
        &[
            series("coordinator open fds", &|s| Some(s.coordinator_fds as f64)),
            series("seconds per round", &|s| s.round_secs),
        ],
        true,
    )
    .unwrap();
    std::fs::write(csv.with_extension("memory.svg"), memory).unwrap();
    std::fs::write(csv.with_extension("rounds.svg"), rounds).unwrap();
}
