//! Coordinator replicas sharing one PostgreSQL store, as separate processes
//! with agent processes spread over them: a task to completion through
//! every replica; the task's owner killed with SIGKILL at seeded random
//! points of its rounds; a replica that does not own the task killed, its
//! agents failing over; PostgreSQL itself restarted mid-round.
//!
//! Every test needs a PostgreSQL server (`FLEET_POSTGRES`, which
//! `.ci/postgres` starts; CI sets `FLEET_REQUIRE_POSTGRES=1`, so that none
//! is skipped there).

use std::collections::BTreeSet;

use fleet_e2e::replicas::ReplicaFleet;
use fleet_e2e::{task_args, wait_for};
use rand::{Rng, SeedableRng};

/// Creates a task through the fleet's admin client; its id.
fn create(fleet: &ReplicaFleet, rounds: u64, target: usize, extra: &[&str]) -> u64 {
    let args = task_args("replicated", rounds, fleet.agents.len(), target, 1, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = fleet.admin(&args);
    let id = out
        .split_whitespace()
        .find_map(|w| w.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no task id in {out:?}"));
    fleet.admin(&["tasks", "start", &id.to_string()]);
    id
}

/// The device ids of every enrolled agent.
fn device_ids(fleet: &ReplicaFleet) -> BTreeSet<u64> {
    fleet
        .admin_json(&["devices", "list"])
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_u64().expect("id"))
        .collect()
}

/// Every closed round counted every device exactly once, rounds 1..=n.
fn assert_every_device_once(fleet: &ReplicaFleet, task: u64, rounds: u64) {
    let all = device_ids(fleet);
    let closed = fleet.closed_rounds(task);
    assert_eq!(
        closed.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=rounds).collect::<Vec<_>>(),
        "{}",
        fleet.logs()
    );
    for (round, _, participants) in &closed {
        let set = counted_once(*round, participants);
        assert_eq!(set, all, "round {round}: not every device");
    }
}

/// The devices a round counted, each of which it counted once.
fn counted_once(round: u64, participants: &[u64]) -> BTreeSet<u64> {
    let set: BTreeSet<u64> = participants.iter().copied().collect();
    assert_eq!(
        set.len(),
        participants.len(),
        "round {round}: counted twice"
    );
    set
}

/// Accepted updates of `task`'s open round in the store.
fn stored_updates(fleet: &ReplicaFleet, task: u64) -> (u64, i64) {
    let mut db = fleet.db();
    let round: i64 = db
        .query_one("SELECT round FROM tasks WHERE id = $1", &[&(task as i64)])
        .unwrap()
        .get(0);
    let n: i64 = db
        .query_one(
            "SELECT COUNT(*) FROM updates WHERE task = $1 AND round = $2",
            &[&(task as i64), &round],
        )
        .unwrap()
        .get(0);
    (round as u64, n)
}

/// The `fleet_relayed_requests_total` of replica `i`.
fn relayed(fleet: &ReplicaFleet, i: usize) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&fleet.metrics[i]).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with("fleet_relayed_requests_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no relayed count in {text}"))
}

/// Three replicas, thirty agents enrolled round-robin through them: every
/// round of the task counts every device once, whichever replica it talks
/// to; the replicas that do not run the task relayed their devices'
/// requests; the final model is the one the in-memory replay of the same
/// rounds computes.
#[test]
fn three_replicas_and_thirty_agents_run_a_task_to_completion() {
    let Some(url) = fleet_coordinator::store::scratch::schema("replicas-30") else {
        return;
    };
    let mut fleet = ReplicaFleet::new("replicas-30", url, 3, &[], 30, "embedded");
    let task = create(&fleet, 3, 30, &[]);
    for k in 0..30 {
        fleet.start_agent(k, &["--max-rounds", "3"]);
    }
    fleet.wait_finished(task, 900);
    assert_every_device_once(&fleet, task, 3);
    // Finished: its lease was given up.
    assert_eq!(fleet.owner(task), None);
    let relays: Vec<u64> = (0..3).map(|i| relayed(&fleet, i)).collect();
    eprintln!("relayed requests per replica: {relays:?}");
    assert!(
        relays.iter().filter(|&&n| n > 0).count() >= 2,
        "two replicas that do not run the task relay: {relays:?}"
    );
    fleet_e2e::replicas::assert_replayed(&fleet, task);
}

/// The owner of the task is killed with SIGKILL twice, each time when a
/// seeded random number of the open round's updates are stored: another
/// replica takes the lease and the task goes on; every round still counts
/// every device exactly once (no acknowledged update lost, none counted
/// twice) and the privacy ledger charges exactly the closed rounds.
#[test]
fn killing_the_owner_mid_round_loses_and_doubles_nothing() {
    let Some(url) = fleet_coordinator::store::scratch::schema("replicas-kill-owner") else {
        return;
    };
    let devices = 9;
    let rounds = 4;
    let mut fleet = ReplicaFleet::new("replicas-kill-owner", url, 3, &[], devices, "embedded");
    let task = create(
        &fleet,
        rounds,
        devices,
        &[
            "--dp-noise",
            "0.8",
            "--dp-clip",
            "1.0",
            "--budget-epsilon",
            "1000",
            "--budget-delta",
            "1e-5",
        ],
    );
    for k in 0..devices {
        fleet.start_agent(k, &["--max-rounds", &rounds.to_string()]);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let mut kills = Vec::new();
    for round in [1u64, 3] {
        let want = rng.random_range(1..devices as i64);
        wait_for(300, "updates of the round to be stored", || {
            let (open, n) = stored_updates(&fleet, task);
            (open > round || (open == round && n >= want)).then_some(())
        });
        let owner = wait_for(30, "an owner", || fleet.owner(task));
        let (open, n) = stored_updates(&fleet, task);
        fleet.kill_replica(owner);
        kills.push((owner, open, n));
        eprintln!("killed the owner r{owner} in round {open} with {n} updates stored");
        let next = wait_for(60, "another replica to take the lease", || {
            fleet.owner(task).filter(|&o| o != owner)
        });
        eprintln!("r{next} took the task over");
        fleet.start_replica(owner, "serve");
    }
    fleet.wait_finished(task, 900);
    assert_every_device_once(&fleet, task, rounds);
    let budget = fleet.admin_json(&["budget", &task.to_string()]);
    assert_eq!(budget["rounds"], rounds, "{budget}");
    assert_eq!(kills.len(), 2);
}

/// A replica that does not run the task is killed mid-round: its agents
/// connect to another replica (their `--replica` addresses) and the task
/// finishes with every device in every round.
#[test]
fn killing_a_replica_that_does_not_own_the_task_fails_its_agents_over() {
    let Some(url) = fleet_coordinator::store::scratch::schema("replicas-kill-other") else {
        return;
    };
    let devices = 9;
    let mut fleet = ReplicaFleet::new("replicas-kill-other", url, 3, &[], devices, "embedded");
    let task = create(&fleet, 3, devices, &[]);
    for k in 0..devices {
        fleet.start_agent(k, &["--max-rounds", "3"]);
    }
    wait_for(300, "updates of round 1", || {
        let (open, n) = stored_updates(&fleet, task);
        (open > 1 || n >= 2).then_some(())
    });
    let owner = wait_for(30, "an owner", || fleet.owner(task));
    let victim = (owner + 1) % 3;
    fleet.kill_replica(victim);
    eprintln!("killed r{victim} (r{owner} owns the task)");
    fleet.wait_finished(task, 900);
    assert_every_device_once(&fleet, task, 3);
    let moved = (0..devices)
        .filter(|&k| fleet.home_replica[k] == victim)
        .filter(|&k| {
            std::fs::read_to_string(fleet.dir.join(format!("agent-{k}.log")))
                .unwrap_or_default()
                .contains("next: the replica at")
        })
        .count();
    assert!(
        moved > 0,
        "no agent of r{victim} failed over\n{}",
        fleet.logs()
    );
}

/// A PostgreSQL cluster of this test's own (`.ci/postgres`), so that
/// restarting it disturbs no other test: its URL and its directory.
fn own_cluster() -> Option<(String, std::path::PathBuf)> {
    let required = std::env::var("FLEET_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    if std::env::var("FLEET_POSTGRES").is_err() && !required {
        eprintln!("skipping: set FLEET_POSTGRES (see `.ci/postgres`) to run it");
        return None;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/postgres");
    let out = std::process::Command::new(&script)
        .output()
        .expect("cannot run .ci/postgres");
    assert!(
        out.status.success(),
        ".ci/postgres failed (it runs as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let host = url
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .expect("a socket directory in the URL")
        .replace("%2F", "/");
    Some((url, std::path::PathBuf::from(host)))
}

/// `pg_ctl` of Debian's newest installed server, run as `postgres`.
fn pg_ctl(dir: &std::path::Path, args: &[&str]) {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin/pg_ctl")))
        .filter(|p| p.exists())
        .max()
        .expect("pg_ctl");
    let status = std::process::Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .arg("-D")
        .arg(dir.join("data"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("runuser");
    assert!(status.success(), "pg_ctl {args:?} failed");
}

/// PostgreSQL crashes and restarts in the middle of a round (`pg_ctl
/// restart -m immediate`: no checkpoint, as at a power cut): the replicas
/// reconnect, the task resumes from what was committed, and every update
/// acknowledged before the crash is counted in its round.
#[test]
fn a_postgres_restart_mid_round_loses_nothing_acknowledged() {
    let Some((url, cluster)) = own_cluster() else {
        return;
    };
    let devices = 6;
    let mut fleet = ReplicaFleet::new("replicas-pg-restart", url, 2, &[], devices, "embedded");
    let task = create(
        &fleet,
        3,
        devices,
        &["--min-reports", "4", "--report-deadline", "60"],
    );
    for k in 0..devices {
        fleet.start_agent(k, &["--max-rounds", "3"]);
    }
    wait_for(300, "updates of round 2", || {
        let (open, n) = stored_updates(&fleet, task);
        (open > 2 || (open == 2 && n >= 2)).then_some(())
    });
    // What was acknowledged: stored, since a reply follows the commit.
    let acknowledged: Vec<(u64, u64)> = fleet
        .db()
        .query(
            "SELECT round, device FROM updates WHERE task = $1",
            &[&(task as i64)],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
        .collect();
    pg_ctl(&cluster, &["-m", "immediate", "-w", "restart"]);
    eprintln!(
        "PostgreSQL restarted with {} updates of the open round stored",
        acknowledged.len()
    );
    fleet.wait_finished(task, 600);
    let closed = fleet.closed_rounds(task);
    assert_eq!(closed.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
    for (round, device) in &acknowledged {
        let (_, _, participants) = closed.iter().find(|r| r.0 == *round).unwrap();
        assert!(
            participants.contains(device),
            "round {round}: device {device}'s acknowledged update was lost\n{}",
            fleet.logs()
        );
    }
    for (round, _, participants) in &closed {
        counted_once(*round, participants);
    }
    pg_ctl(&cluster, &["-m", "fast", "stop"]);
}
