//! A storage failure while the coordinator serves: the request that hit it
//! is answered with an error, the process keeps serving, and once the
//! storage works again the task resumes from what was committed, losing
//! nothing that was acknowledged.

use fleet_e2e::{
    InProcess, checkin, code, connect, create_small_task, device_config, hello, ok, scratch, upload,
};
use fleet_models::ModelSpec;
use fleet_protocol::ErrorCode;
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand, TaskState};
use fleet_protocol::message::CoordinatorMessage;

#[tokio::test]
async fn a_storage_failure_mid_round_is_answered_and_loses_nothing() {
    let dir = scratch("storage-failure");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let d = spec.layout().total;
    let task = create_small_task(&mut admin, "storage", &spec).await;
    let start = AdminRequest::SetTaskState {
        task,
        command: TaskCommand::Start,
    };
    ok(&mut admin, start.clone()).await;
    let mut peers = Vec::new();
    for k in 0..2 {
        let (_, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
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
    }
    let reply = upload(&mut peers[0], &spec, task, 1, &vec![0.01; d]).await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::UploadAccepted { .. })),
        "{reply:?}"
    );

    // The object store becomes unwritable: the second report meets the
    // target, and closing the round cannot write the new model.
    let objects = c.home.dir().join("objects");
    let away = dir.join("objects.away");
    std::fs::rename(&objects, &away).unwrap();
    std::fs::write(&objects, b"not a directory").unwrap();
    let reply = upload(&mut peers[1], &spec, task, 1, &vec![0.03; d]).await;
    assert_eq!(code(reply), Some(ErrorCode::Internal));

    // Still serving: the task is suspended in memory, devices are told to
    // come back, administrators are answered.
    let reply = peers[1].call(&checkin()).await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::ComeBackLater { .. })),
        "{reply:?}"
    );
    let AdminResponse::Tasks(tasks) = ok(&mut admin, AdminRequest::ListTasks).await else {
        panic!("expected the task list")
    };
    let info = tasks.iter().find(|t| t.id == task).unwrap();
    assert_eq!(info.state, TaskState::Running, "the store keeps it running");

    // Storage repaired, the task is started again: it resumes from the
    // store, where both acknowledged-or-stored updates are, and closes.
    std::fs::remove_file(&objects).unwrap();
    std::fs::rename(&away, &objects).unwrap();
    ok(&mut admin, start).await;
    let mut rounds = Vec::new();
    // Up to 60 s: generous for a loaded machine; the loop ends as soon as it closes.
    for _ in 0..1200 {
        let AdminResponse::Rounds(r) = ok(&mut admin, AdminRequest::ListRounds { task }).await
        else {
            panic!("expected rounds")
        };
        if !r.is_empty() {
            rounds = r;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(rounds.len(), 1, "round 1 closed once");
    assert_eq!(rounds[0].outcome, "closed");
    assert_eq!(rounds[0].participants.len(), 2, "{:?}", rounds[0]);
}
