//! Rounds over an impaired network: agents reach the coordinator through a
//! UDP relay that drops 5% of the datagrams each way and delays them by
//! 100 ms ± 20 ms (so they also arrive out of order), and duplicates a few;
//! midway the relay moves every flow to a new port (NAT rebinding). The
//! task still finishes, with both devices in every round.

use std::sync::atomic::Ordering;

use fleet_e2e::relay::{Impairment, Relay};
use fleet_e2e::{ProcessFleet, wait_for};

#[test]
fn rounds_complete_at_five_percent_loss_and_100_ms_delay_across_a_rebinding() {
    // Two agents enrolled directly, kept idle: their data directories are
    // reused by the two that go through the relay.
    let mut fleet = ProcessFleet::new("impaired", 2, "embedded");
    let relay = Relay::start(
        fleet.addr.parse().unwrap(),
        Impairment {
            loss: 0.05,
            delay_ms: 100,
            jitter_ms: 20,
            duplicate: 0.01,
            bytes_per_sec: None,
        },
        11,
    );
    let direct = std::mem::replace(&mut fleet.addr, relay.addr.to_string());
    let data = fleet.dir.join("data");
    let a = fleet.enroll_agent(&data.join("device-0"));
    let b = fleet.enroll_agent(&data.join("device-1"));
    fleet.addr = direct;
    let out = fleet.admin(&[
        "tasks",
        "create",
        "--name",
        "impaired",
        "--model",
        "logreg",
        "--rounds",
        "2",
        "--target",
        "2",
        "--population",
        "2",
        "--over-selection",
        "1",
        "--epochs",
        "1",
        "--retry-secs",
        "1",
        "--selection-window",
        "0",
    ]);
    assert!(out.contains("task 1"), "{out}");
    fleet.admin(&["tasks", "start", "1"]);
    fleet.start_agent(a, &[]);
    fleet.start_agent(b, &[]);
    // Rebind every flow once the first round has closed.
    wait_for(300, "the first impaired round to close", || {
        (!fleet.closed_rounds(1).is_empty()).then_some(())
    });
    relay.rebind();
    fleet.wait_finished(1, 600);
    let rounds = fleet.closed_rounds(1);
    assert_eq!(
        rounds,
        vec![(1, vec![3, 4]), (2, vec![3, 4])],
        "the relayed devices (3 and 4) took part in every round"
    );
    let dropped = relay.counts.dropped.load(Ordering::Relaxed);
    let received = relay.counts.received.load(Ordering::Relaxed);
    assert!(
        dropped > 0 && received > 100,
        "the relay carried the rounds and dropped some: {dropped} of {received}"
    );
    eprintln!("relay: {received} datagrams, {dropped} dropped");
}
