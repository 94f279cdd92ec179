//! Pausing a task keeps the open round's accepted updates: after the task
//! is started again the round goes on from them, and closes with them.

use fleet_e2e::{
    InProcess, checkin, connect, create_small_task, device_config, hello, ok, scratch, update,
    upload,
};
use fleet_models::ModelSpec;
use fleet_protocol::admin::{AdminRequest, AdminResponse, RoundInfo, TaskCommand, TaskState};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage};

/// Devices whose updates the store holds for the open `round` of `task`.
fn stored_updates(c: &InProcess, task: u64, round: u64) -> Vec<u64> {
    let db = rusqlite::Connection::open(c.home.dir().join("coordinator.db")).unwrap();
    let mut q = db
        .prepare("SELECT device FROM updates WHERE task = ?1 AND round = ?2 ORDER BY device")
        .unwrap();
    q.query_map((task, round), |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The rounds of `task` that ended.
async fn rounds(
    admin: &mut fleet_coordinator::cli::admin::AdminClient,
    task: u64,
) -> Vec<RoundInfo> {
    match ok(admin, AdminRequest::ListRounds { task }).await {
        AdminResponse::Rounds(r) => r,
        other => panic!("expected rounds: {other:?}"),
    }
}

#[tokio::test]
async fn pausing_keeps_the_open_rounds_accepted_updates() {
    let dir = scratch("pause");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let d = spec.layout().total;
    // Two reports wanted from two devices, one round.
    let task = create_small_task(&mut admin, "pause", &spec).await;
    let command = |command| AdminRequest::SetTaskState { task, command };
    ok(&mut admin, command(TaskCommand::Start)).await;
    let mut peers = Vec::new();
    let mut ids = Vec::new();
    for k in 0..2 {
        let (id, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
        let mut p = connect(c.addr, device_config(&state)).await;
        assert!(matches!(
            p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
            Some(CoordinatorMessage::HelloAck { .. })
        ));
        let Some(CoordinatorMessage::Plan(plan)) = p.call(&checkin()).await else {
            panic!("device {k}: expected a plan")
        };
        assert_eq!(plan.round, 1);
        peers.push(p);
        ids.push(id);
    }
    let reply = upload(&mut peers[0], &spec, task, 1, &vec![0.01; d]).await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::UploadAccepted { .. })),
        "{reply:?}"
    );

    // Paused: the accepted update stays in the store, no round closed.
    ok(&mut admin, command(TaskCommand::Pause)).await;
    let AdminResponse::Tasks(tasks) = ok(&mut admin, AdminRequest::ListTasks).await else {
        panic!("expected the task list")
    };
    let info = tasks.iter().find(|t| t.id == task).unwrap();
    assert_eq!(info.state, TaskState::Paused);
    assert_eq!(stored_updates(&c, task, 1), [ids[0]]);
    assert!(rounds(&mut admin, task).await.is_empty());

    // Started again: round 1 goes on. Device 0's update is known: announced
    // again, it is acknowledged at once (not counted twice); device 1's
    // completes the round, which closes with both.
    ok(&mut admin, command(TaskCommand::Start)).await;
    let (meta, _) = update(&spec, task, 1, &vec![0.01; d]);
    let again = peers[0].call(&AgentMessage::BeginUpload(meta)).await;
    assert!(
        matches!(again, Some(CoordinatorMessage::UploadAccepted { .. })),
        "{again:?}"
    );
    let reply = upload(&mut peers[1], &spec, task, 1, &vec![0.03; d]).await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::UploadAccepted { .. })),
        "{reply:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let closed: Vec<RoundInfo> = loop {
        let r = rounds(&mut admin, task).await;
        if !r.is_empty() {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "round 1 did not close within 60 s of the second report"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].outcome, "closed");
    let mut participants = closed[0].participants.clone();
    participants.sort_unstable();
    assert_eq!(
        participants, ids,
        "the update accepted before the pause counts"
    );
}
