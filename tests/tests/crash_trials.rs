//! Crash trials: the coordinator killed with SIGKILL at seeded random
//! moments while devices train and an administrator enrolls, revokes and
//! deploys, and sometimes an agent killed at the same moment (in the middle
//! of a download, a training or an upload). After every kill:
//!
//! - the coordinator starts again and answers;
//! - every acknowledged enrollment is there, with the certificate the
//!   agent saved; every acknowledged revocation and deployment is there;
//! - no round counts a device twice, and no device has two stored updates
//!   for one round.
//!
//! At the end the task, left alone, closes two more rounds; then (agents
//! and coordinator stopped) no device has more acknowledged updates than
//! the store aggregated or holds for it (none lost).
//!
//! `FLEET_CRASH_TRIALS` sets the number of kills (10 by default, 100 for the
//! figures in `docs/security.md`), `FLEET_CRASH_SEED` the seed (1).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_e2e::{ProcessFleet, binary, wait_for};
use fleet_edge_agent::state::StateDir;
use fleet_protocol::tls::role_of;
use rand::{Rng, SeedableRng};

/// What the administrator was doing when the coordinator was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Nothing,
    Enroll,
    Revoke,
    Deploy,
}

/// What the coordinator acknowledged before a kill, to be found after it.
#[derive(Default)]
struct Acknowledged {
    /// Device id and certificate serial of each enrollment an agent saved.
    enrolled: Vec<(u64, Vec<u8>)>,
    revoked: Vec<u64>,
    deployed: Vec<u64>,
}

fn db(fleet: &ProcessFleet) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        fleet.home.join("coordinator.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
}

/// Where the administrator's commands go (the fleet's home and address).
struct Target {
    home: PathBuf,
    addr: String,
}

/// Runs `coordinator args…`; its stdout if it succeeded.
fn admin_try(fleet: &Target, args: &[String]) -> Option<String> {
    let out = std::process::Command::new(binary("coordinator"))
        .args(args)
        .args(["--dir", fleet.home.to_str().unwrap()])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Enrolls a device whose state is `state` (not run); its id and
/// certificate serial if the enrollment was acknowledged and saved.
fn enroll(fleet: &Target, state: &Path, data: &Path) -> Option<(u64, Vec<u8>)> {
    let token = admin_try(fleet, &["token".into(), "create".into()])?;
    let ok = std::process::Command::new(binary("edge-agent"))
        .args(["enroll", "--state", state.to_str().unwrap()])
        .args(["--coordinator", &fleet.addr, "--server-name", "localhost"])
        .args(["--ca", fleet.home.join("ca.crt").to_str().unwrap()])
        .args(["--token", token.trim(), "--data", data.to_str().unwrap()])
        .output()
        .ok()?
        .status
        .success();
    if !ok {
        return None;
    }
    let dir = StateDir::at(state);
    let (cert, ..) = dir.credentials().ok()?;
    let (_, serial) = role_of(&cert).ok()?;
    Some((dir.identity().ok()?.device, serial))
}

/// With the coordinator stopped: the devices holding an update for the
/// open round of task 1 that the store does not have (uploads in flight).
fn uploads_in_flight(fleet: &ProcessFleet) -> usize {
    let db = db(fleet);
    let open: u64 = db
        .query_row("SELECT round FROM tasks WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    (0..fleet.agents.len())
        .filter(|k| {
            let state = StateDir::at(fleet.dir.join(format!("agent-{k}")));
            let (Ok(Some(p)), Ok(identity)) = (state.pending(), state.identity()) else {
                return false;
            };
            let stored: u64 = db
                .query_row(
                    "SELECT COUNT(*) FROM updates WHERE task = 1 AND round = ?1 AND device = ?2",
                    (p.meta.round, identity.device),
                    |r| r.get(0),
                )
                .unwrap();
            p.meta.task == 1 && p.meta.round == open && stored == 0
        })
        .count()
}

/// The invariants that hold after any crash (see the module docs).
fn check(fleet: &ProcessFleet, acked: &Acknowledged, trial: usize) {
    let db = db(fleet);
    for (device, serial) in &acked.enrolled {
        let (current, previous): (Vec<u8>, Option<Vec<u8>>) = db
            .query_row(
                "SELECT serial, previous_serial FROM devices WHERE id = ?1",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("trial {trial}: enrolled device {device} lost: {e}"));
        assert!(
            &current == serial || previous.as_ref() == Some(serial),
            "trial {trial}: device {device} no longer holds the certificate it was given"
        );
    }
    for device in &acked.revoked {
        let revoked: bool = db
            .query_row(
                "SELECT revoked_at IS NOT NULL FROM devices WHERE id = ?1",
                [device],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            revoked,
            "trial {trial}: the revocation of device {device} was undone"
        );
    }
    for version in &acked.deployed {
        let found: u64 = db
            .query_row(
                "SELECT COUNT(*) FROM deployments WHERE version = ?1",
                [version],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(found, 1, "trial {trial}: deployment {version} lost");
    }
    let mut st = db
        .prepare("SELECT round, attempt, participants FROM rounds WHERE task = 1")
        .unwrap();
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, u64>(0)?,
                r.get::<_, u64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (round, attempt, participants) = row.unwrap();
        let mut p: Vec<u64> = serde_json::from_str(&participants).unwrap();
        let n = p.len();
        p.sort_unstable();
        p.dedup();
        assert_eq!(
            p.len(),
            n,
            "trial {trial}: round {round}.{attempt} counts a device twice"
        );
    }
    let doubled: u64 = db
        .query_row(
            "SELECT COUNT(*) FROM (SELECT 1 FROM updates GROUP BY task, round, device \
             HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        doubled, 0,
        "trial {trial}: a device has two updates for one round"
    );
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v}: a number")))
        .unwrap_or(default)
}

#[test]
fn the_coordinator_killed_at_random_moments_loses_nothing_it_acknowledged() {
    let trials = env("FLEET_CRASH_TRIALS", 10) as usize;
    let seed = env("FLEET_CRASH_SEED", 1);
    let devices = 4;
    let mut fleet = ProcessFleet::new("crash-trials", devices, "embedded");
    let agent_args = ["--upload-limit", "1000000"];
    for k in 0..devices {
        fleet.start_agent(k, &agent_args);
    }
    // Enough rounds to last every trial; two reports of four devices close
    // a round, so rounds go on closing while agents are killed.
    fleet.create_task_for(
        "crash-trials",
        10_000,
        2,
        1,
        &["--report-deadline", "120", "--selection-timeout", "120"],
    );
    fleet.admin(&["tasks", "start", "1"]);
    wait_for(300, "the first round to close", || {
        (!fleet.closed_rounds(1).is_empty()).then_some(())
    });

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut acked = Acknowledged::default();
    let mut spare: Vec<u64> = Vec::new();
    let data = fleet.dir.join("data").join("device-0");
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    let started = Instant::now();
    for trial in 0..trials {
        let action = match rng.random_range(0..4) {
            0 => Action::Nothing,
            1 => Action::Enroll,
            2 if !spare.is_empty() => Action::Revoke,
            2 => Action::Enroll,
            _ => Action::Deploy,
        };
        let latest = fleet
            .closed_round_models(1)
            .last()
            .map(|(_, model, _)| model.clone());
        // Half the kills soon after the action starts (inside it, often), half
        // anywhere in the next three seconds.
        let delay = Duration::from_millis(if rng.random_bool(0.5) {
            rng.random_range(0..300)
        } else {
            rng.random_range(0..3_000)
        });
        let kill_agent = rng.random_bool(0.3).then(|| rng.random_range(0..devices));
        let state = fleet.dir.join(format!("spare-{trial}"));
        let target = Target {
            home: fleet.home.clone(),
            addr: fleet.addr.clone(),
        };
        let fleet_ref = &target;
        let outcome = std::thread::scope(|s| {
            let work = s.spawn(|| match action {
                Action::Nothing => None,
                Action::Enroll => {
                    enroll(fleet_ref, &state, &data).map(|e| (Action::Enroll, e.0, Some(e.1)))
                }
                Action::Revoke => {
                    let device = *spare.last().unwrap();
                    admin_try(
                        fleet_ref,
                        &["devices".into(), "revoke".into(), device.to_string()],
                    )
                    .map(|_| (Action::Revoke, device, None))
                }
                Action::Deploy => {
                    let model = latest.clone()?;
                    let out = admin_try(
                        fleet_ref,
                        &["models".into(), "deploy".into(), model[..12].to_string()],
                    )?;
                    let version = out
                        .split("deployed as version ")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse()
                        .ok()?;
                    Some((Action::Deploy, version, None))
                }
            });
            std::thread::sleep(delay);
            fleet.coordinator.as_mut().unwrap().kill();
            if let Some(k) = kill_agent {
                fleet.agents[k].as_mut().unwrap().kill();
            }
            work.join().unwrap()
        });
        *counts
            .entry(match action {
                Action::Nothing => "nothing",
                Action::Enroll => "enroll",
                Action::Revoke => "revoke",
                Action::Deploy => "deploy",
            })
            .or_default() += 1;
        if kill_agent.is_some() {
            *counts.entry("agent killed").or_default() += 1;
        }
        match outcome {
            Some((Action::Enroll, device, Some(serial))) => {
                acked.enrolled.push((device, serial));
                spare.push(device);
            }
            Some((Action::Revoke, device, _)) => {
                spare.retain(|&d| d != device);
                acked.revoked.push(device);
            }
            Some((Action::Deploy, version, _)) => acked.deployed.push(version),
            _ if action == Action::Nothing => {}
            _ => *counts.entry("cut short").or_default() += 1,
        }
        if uploads_in_flight(&fleet) > 0 {
            *counts.entry("upload in flight").or_default() += 1;
        }
        fleet.start_coordinator();
        if let Some(k) = kill_agent {
            fleet.start_agent(k, &agent_args);
        }
        check(&fleet, &acked, trial);
    }
    let closed = fleet.closed_rounds(1).len();
    eprintln!(
        "{trials} kills (seed {seed}) in {:.0?}: {counts:?}; {} enrollments, {} revocations, \
         {} deployments acknowledged; {closed} rounds closed",
        started.elapsed(),
        acked.enrolled.len(),
        acked.revoked.len(),
        acked.deployed.len()
    );

    // Left alone, the task goes on: two more rounds close.
    wait_for(300, "two more rounds to close after the last kill", || {
        (fleet.closed_rounds(1).len() >= closed + 2).then_some(())
    });

    // Stopped everywhere: no acknowledged update was lost.
    for k in 0..devices {
        fleet.agents[k].as_mut().unwrap().kill();
    }
    fleet.coordinator.as_mut().unwrap().kill();
    let db = db(&fleet);
    for k in 0..devices {
        let state = StateDir::at(fleet.dir.join(format!("agent-{k}")));
        let device = state.identity().unwrap().device;
        let accepted = state.status().unwrap().accepted;
        let counted: u64 = db
            .query_row(
                "SELECT COUNT(*) FROM rounds r, json_each(r.participants) p \
                 WHERE r.task = 1 AND p.value = ?1",
                [device],
                |r| r.get(0),
            )
            .unwrap();
        let held: u64 = db
            .query_row(
                "SELECT COUNT(*) FROM updates WHERE task = 1 AND device = ?1",
                [device],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            accepted <= counted + held,
            "device {device}: {accepted} updates acknowledged, {counted} aggregated and {held} held"
        );
    }
}
