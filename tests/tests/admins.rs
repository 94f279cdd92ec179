//! Administrators are identities: issued, listed and revoked on the
//! coordinator's host, each changing request recorded in the audit log.

use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::Home;
use fleet_coordinator::store::Store;
use fleet_e2e::{InProcess, binary, ok, run, scratch};
use fleet_protocol::admin::{AdminRequest, AdminResponse};

#[tokio::test]
async fn administrators_are_issued_revoked_and_audited() {
    let dir = scratch("admins");
    let c = InProcess::start(&dir).await;

    // The home's first administrator ("ops") was recorded at start.
    let store = Store::open(c.home.dir()).unwrap();
    let admins = store.admins().unwrap();
    assert_eq!(admins.len(), 1);
    assert_eq!(admins[0].name, "ops");

    // A second one, with a kit of its own.
    let kit = dir.join("alice");
    c.home.issue_admin("alice", 30, &kit).unwrap();
    assert!(
        c.home
            .issue_admin("alice", 30, &kit)
            .unwrap_err()
            .contains("already holds"),
        "credentials are never overwritten"
    );
    assert!(
        c.home
            .issue_admin("bad name\n", 30, &dir.join("x"))
            .is_err()
    );
    let mut alice = AdminClient::connect(&Home::at(&kit), Some(c.addr))
        .await
        .expect("alice connects");
    let AdminResponse::Token { .. } = ok(
        &mut alice,
        AdminRequest::CreateToken {
            label: "phone 7".into(),
            ttl_secs: 60,
        },
    )
    .await
    else {
        panic!("no token")
    };
    // A refused request is recorded with its error.
    let refused = alice
        .call(&AdminRequest::RevokeDevice { device: 999 })
        .await
        .unwrap_err();
    assert!(refused.contains("no device 999"), "{refused}");
    let log = store.audit_log(10).unwrap();
    let entries: Vec<(&str, &str)> = log
        .iter()
        .map(|r| (r.admin.as_str(), r.request.as_str()))
        .collect();
    assert_eq!(
        entries,
        [
            ("alice", "create token for \"phone 7\""),
            ("alice", "revoke device 999")
        ]
    );
    assert!(log[0].outcome.starts_with("ok"), "{:?}", log[0]);
    assert!(log[1].outcome.starts_with("error"), "{:?}", log[1]);
    drop(alice);

    // Revoked: the next connection is refused, the other administrator
    // still works.
    assert_eq!(store.revoke_admin("alice").unwrap(), 1);
    let refused = match AdminClient::connect(&Home::at(&kit), Some(c.addr)).await {
        Err(e) => e,
        Ok(mut client) => client
            .call(&AdminRequest::ListDevices)
            .await
            .map(|r| format!("answered {r:?}"))
            .unwrap_or_else(|e| e.to_string()),
    };
    assert!(refused.contains("revoked"), "{refused}");
    let mut ops = c.admin().await;
    ok(&mut ops, AdminRequest::ListDevices).await;
    let listed = store.admins().unwrap();
    assert!(
        listed
            .iter()
            .any(|a| a.name == "alice" && a.revoked_at.is_some())
    );

    // The same through the command line.
    let home = c.home.dir().to_str().unwrap();
    let coordinator = binary("coordinator");
    let table = run(&coordinator, &["admins", "list", "--dir", home]);
    let alice_row = table
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_else(|| panic!("{table}"));
    // Name, serial, issued (date and time), revoked (date and time; "-"
    // while active).
    assert_eq!(alice_row.split_whitespace().count(), 6, "{alice_row}");
    let log = run(&coordinator, &["audit", "--dir", home, "--json"]);
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    assert_eq!(log[0]["request"], "create token for \"phone 7\"");
    let bob = dir.join("bob");
    let out = run(
        &coordinator,
        &[
            "admins",
            "issue",
            "--name",
            "bob",
            "--out",
            bob.to_str().unwrap(),
            "--dir",
            home,
        ],
    );
    assert!(out.contains("administrator bob"), "{out}");
    AdminClient::connect(&Home::at(&bob), Some(c.addr))
        .await
        .expect("bob connects");
}
