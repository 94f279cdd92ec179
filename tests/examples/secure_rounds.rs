//! Round time over QUIC with and without secure aggregation, side by side
//! in one run: a coordinator process and `AGENTS` agent processes on
//! loopback (full Fashion-MNIST split Dirichlet(0.5), 2NN, one local
//! epoch, batch 32), the same task plain (FedAvg) and with SecAgg+ (no DP
//! noise, clip 5, the default degree and threshold), `ROUNDS` rounds each,
//! every device in every round. Prints, per task, the time between
//! consecutive round closes (the first round, which includes the first
//! model download and process warm-up, is left out).
//!
//! `cargo build --release --workspace --bins && cargo run --release -p fleet-e2e --example secure_rounds -- [AGENTS] [ROUNDS]`

use fleet_e2e::ProcessFleet;

/// The closed rounds' end times (ms), in round order.
fn ends(fleet: &ProcessFleet, task: u64) -> Vec<u64> {
    let rounds = fleet.admin_json(&["rounds", &task.to_string()]);
    rounds
        .as_array()
        .expect("a list of rounds")
        .iter()
        .filter(|r| r["outcome"] == "closed")
        .map(|r| r["ended_at"].as_u64().expect("a closed round's end"))
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let agents: usize = args.next().map_or(10, |a| a.parse().expect("AGENTS"));
    let rounds: u64 = args.next().map_or(6, |a| a.parse().expect("ROUNDS"));
    assert!(rounds >= 3, "at least 3 rounds");
    let mut fleet = ProcessFleet::new("secure-rounds", agents, "fashion-mnist");
    for k in 0..agents {
        fleet.start_agent(k, &[]);
    }
    let common = ["--batch", "32", "--lr", "0.05", "--report-deadline", "300"];
    let mut secure = common.to_vec();
    secure.extend(["--secure", "--secure-clip", "5"]);
    let mut rows = Vec::new();
    for (id, (name, extra)) in [("plain", common.to_vec()), ("secure", secure)]
        .into_iter()
        .enumerate()
    {
        let id = id as u64 + 1;
        let out = fleet.create_task(name, rounds, 1, &extra);
        assert!(out.contains(&format!("task {id} created")), "{out}");
        fleet.admin(&["tasks", "start", &id.to_string()]);
        fleet.wait_finished(id, 3600);
        let ends = ends(&fleet, id);
        assert_eq!(ends.len() as u64, rounds, "{name}: every round closed once");
        let gaps: Vec<f64> = ends
            .windows(2)
            .map(|w| (w[1] - w[0]) as f64 / 1000.0)
            .collect();
        let min = gaps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = gaps.iter().copied().fold(0.0, f64::max);
        rows.push((name, median(gaps.clone()), min, max, gaps));
    }
    println!(
        "| task ({agents} agent processes, rounds 2..{rounds}) | median round | fastest | slowest |"
    );
    println!("|---|---:|---:|---:|");
    for (name, med, min, max, _) in &rows {
        println!("| {name} | {med:.2} s | {min:.2} s | {max:.2} s |");
    }
    println!("secure / plain, median: {:.2}×", rows[1].1 / rows[0].1);
    for (name, _, _, _, gaps) in &rows {
        println!("{name}: {gaps:.2?}");
    }
}
