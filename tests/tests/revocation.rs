//! A running agent whose device is revoked stops, with a message saying so,
//! instead of reconnecting forever.

use fleet_e2e::{ProcessFleet, wait_for};

#[test]
fn a_revoked_agent_stops_and_says_why() {
    let mut fleet = ProcessFleet::new("revoked-agent", 1, "embedded");
    fleet.start_agent(0, &[]);
    wait_for(120, "agent 0 to connect to the coordinator", || {
        let devices = fleet.admin_json(&["devices", "list"]);
        (devices[0]["connected"] == true).then_some(())
    });
    let out = fleet.admin(&["devices", "revoke", "1"]);
    assert!(out.contains("revoked"), "{out}");

    let agent = fleet.agents[0].as_mut().unwrap();
    let status = wait_for(120, "the revoked agent to exit", || {
        agent.child.try_wait().expect("agent status")
    });
    let log = agent.output();
    assert!(!status.success(), "the agent exited with success:\n{log}");
    // The message on its standard error, and in the status file for `edge-agent status`.
    let why = "this device was revoked by the coordinator's administrator";
    assert!(log.contains(&format!("error: {why}")), "{log}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fleet.dir.join("agent-0").join("status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["last_error"], why, "{state}");
}
