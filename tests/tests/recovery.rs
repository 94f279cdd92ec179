//! Crashes: the coordinator killed with SIGKILL in the middle of rounds
//! restarts, resumes its task and counts every accepted update exactly
//! once; an agent killed in the middle of an upload resumes it where it
//! stopped.

use fleet_e2e::{ProcessFleet, wait_for};
use rand::{Rng, SeedableRng};

fn closed_lines(fleet: &ProcessFleet) -> usize {
    std::fs::read_to_string(fleet.dir.join("coordinator.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" closed with "))
        .count()
}

fn status(fleet: &ProcessFleet, k: usize) -> serde_json::Value {
    let path = fleet.dir.join(format!("agent-{k}")).join("status.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or("{}".into())).unwrap()
}

#[test]
fn killed_coordinator_and_agent_resume_without_losing_or_repeating_updates() {
    let mut fleet = ProcessFleet::new("recovery", 5, "embedded");
    // Slow uploads (the 2NN's f32 update is 797 KB: about 2.7 s each) so
    // that kills land while updates are in flight.
    for k in 0..5 {
        fleet.start_agent(k, &["--upload-limit", "300000"]);
    }
    let deadlines = ["--report-deadline", "300", "--selection-timeout", "120"];
    fleet.create_task("crash", 4, 2, &deadlines);
    fleet.admin(&["tasks", "start", "1"]);

    // Kill the coordinator twice, at random moments after rounds 1 and 2 closed.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for closed in 1..=2 {
        wait_for(300, "a round to close", || {
            (closed_lines(&fleet) >= closed).then_some(())
        });
        let delay = rng.random_range(500..4_000);
        std::thread::sleep(std::time::Duration::from_millis(delay));
        eprintln!("SIGKILL to the coordinator {delay} ms after round {closed} closed");
        fleet.coordinator.as_mut().unwrap().kill();
        fleet.start_coordinator();
    }
    fleet.wait_finished(1, 600);

    let rounds = fleet.admin_json(&["rounds", "1"]);
    let rounds = rounds.as_array().unwrap();
    let closed = fleet.closed_rounds(1);
    assert_eq!(
        closed.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        [1, 2, 3, 4],
        "each round closed exactly once: {rounds:?}"
    );
    for (round, p) in &closed {
        assert_eq!(
            p,
            &[1, 2, 3, 4, 5],
            "round {round}: every device counted once"
        );
    }
    // No acknowledged update was lost: every update an agent saw accepted is
    // one of the aggregated ones (or of an abandoned attempt, if any).
    let acked: u64 = (0..5)
        .map(|k| status(&fleet, k)["accepted"].as_u64().unwrap())
        .sum();
    let aggregated: usize = rounds
        .iter()
        .map(|r| r["participants"].as_array().unwrap().len())
        .sum();
    assert_eq!(acked as usize, aggregated, "{rounds:?}");
    let log = std::fs::read_to_string(fleet.dir.join("coordinator.log")).unwrap();
    assert_eq!(log.matches("resuming task 1").count(), 2, "{log}");

    // An agent killed in the middle of its upload resumes it.
    fleet.create_task("agent-crash", 1, 2, &deadlines);
    let agent_log = fleet.dir.join("agent-0.log");
    let before = std::fs::read_to_string(&agent_log).unwrap().len();
    fleet.admin(&["tasks", "start", "2"]);
    wait_for(120, "agent 0 to train for task 2", || {
        let text = std::fs::read_to_string(&agent_log).unwrap();
        text[before..]
            .contains("training for task 2 round 1")
            .then_some(())
    });
    // Training takes well under a second; the upload takes about 2.7 s.
    std::thread::sleep(std::time::Duration::from_millis(1_800));
    fleet.agents[0].as_mut().unwrap().kill();
    let pending = fleet.dir.join("agent-0").join("pending.bin");
    assert!(
        pending.is_file(),
        "the killed agent left its update on disk"
    );
    fleet.start_agent(0, &["--upload-limit", "300000"]);
    fleet.wait_finished(2, 300);
    let text = std::fs::read_to_string(&agent_log).unwrap();
    let tail = &text[before..];
    let resumed = tail
        .lines()
        .find_map(|l| l.split("resuming the upload at byte ").nth(1))
        .unwrap_or_else(|| panic!("no resumed upload in the agent's log:\n{tail}"));
    let from: u64 = resumed.split_whitespace().next().unwrap().parse().unwrap();
    assert!(from > 0, "{resumed}");
    assert!(
        tail.contains("update for task 2 round 1 accepted"),
        "{tail}"
    );
    assert!(!pending.exists(), "the settled update is forgotten");
}
