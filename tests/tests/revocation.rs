//! A running agent whose device is revoked stops, with a message saying so,
//! instead of reconnecting forever; a certificate the coordinator's current
//! database did not issue for its id is refused the same way.

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
    // Stopped for good: the status its systemd unit does not restart.
    assert_eq!(status.code(), Some(3), "the agent's exit status:\n{log}");
    // The message on its standard error, and in the status file for `edge-agent status`.
    let why = "the coordinator no longer accepts this device: it was revoked, or this \
               certificate is not the one the coordinator issued for it (enroll again)";
    assert!(log.contains(&format!("error: {why}")), "{log}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fleet.dir.join("agent-0").join("status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["last_error"], why, "{state}");
}

/// A coordinator database restored from a backup issues again the device
/// ids enrolled after the backup. The certificate of such an id's earlier
/// holder must not authenticate as the device that holds it now: identity
/// is the certificate issued for the id, not the id.
#[test]
fn after_a_backup_restore_an_old_certificate_does_not_pass_for_a_new_device() {
    let mut fleet = ProcessFleet::new("restored-backup", 1, "embedded");
    let data = fleet.dir.join("data").join("device-0");
    let db_files = ["coordinator.db", "coordinator.db-wal", "coordinator.db-shm"];
    let backup = fleet.dir.join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    // A cold backup with device 1 only.
    fleet.coordinator.as_mut().unwrap().kill();
    for f in db_files {
        let from = fleet.home.join(f);
        if from.exists() {
            std::fs::copy(&from, backup.join(f)).unwrap();
        }
    }
    fleet.start_coordinator();
    // Device 2 enrolls after the backup...
    let old = fleet.enroll_agent(&data);
    // ...and the backup is restored over the newer database.
    fleet.coordinator.as_mut().unwrap().kill();
    for f in db_files {
        let _ = std::fs::remove_file(fleet.home.join(f));
        if backup.join(f).exists() {
            std::fs::copy(backup.join(f), fleet.home.join(f)).unwrap();
        }
    }
    fleet.start_coordinator();
    let devices = fleet.admin_json(&["devices", "list"]);
    assert_eq!(devices.as_array().unwrap().len(), 1, "{devices}");
    // A new device gets id 2 again.
    let new = fleet.enroll_agent(&data);
    let devices = fleet.admin_json(&["devices", "list"]);
    assert_eq!(devices[1]["id"], 2, "{devices}");

    // The certificate issued for the first id 2 is refused, and its agent
    // stops saying why.
    fleet.start_agent(old, &[]);
    let agent = fleet.agents[old].as_mut().unwrap();
    let status = wait_for(120, "the agent with the stale certificate to exit", || {
        agent.child.try_wait().expect("agent status")
    });
    let log = agent.output();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("no longer accepts this device"), "{log}");
    // The device that holds id 2 now connects.
    fleet.start_agent(new, &[]);
    wait_for(120, "the new device 2 to connect", || {
        let devices = fleet.admin_json(&["devices", "list"]);
        (devices[1]["connected"] == true).then_some(())
    });
}
