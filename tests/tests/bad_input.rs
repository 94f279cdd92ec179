//! Bad input over the wire: what the coordinator answers, that it counts
//! each refusal by reason, and that it keeps serving afterwards.

use fleet_aggregation::codec::Codec;
use fleet_coordinator::cli::admin::AdminClient;
use fleet_e2e::{InProcess, code, connect, device_config, hello, metric, ok, scratch, small_task};
use fleet_models::ModelSpec;
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand, TaskState};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, ObjectRef, UpdateMeta,
    bytes_to_params,
};
use fleet_protocol::stream::recv;
use fleet_protocol::tls::{client_config, device_key_and_csr};
use fleet_protocol::{ErrorCode, MAX_FRAME};
use rand::SeedableRng;

#[tokio::test]
async fn the_coordinator_refuses_bad_requests_and_keeps_serving() {
    let dir = scratch("bad-input");
    let c = InProcess::start(&dir).await;
    let addr = c.addr;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let AdminResponse::Done {
        id: Some(task_id), ..
    } = ok(
        &mut admin,
        AdminRequest::CreateTask(Box::new(small_task("bad input", &spec))),
    )
    .await
    else {
        panic!("task not created")
    };
    ok(
        &mut admin,
        AdminRequest::SetTaskState {
            task: task_id,
            command: TaskCommand::Start,
        },
    )
    .await;
    let mut devices = Vec::new();
    for k in 0..5 {
        let (_, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
        devices.push(device_config(&state));
    }
    let device = |k: usize| devices[k - 1].clone();

    // A certificate from the right CA for a device that never enrolled.
    let ca = c.home.ca().unwrap();
    let (key, csr) = device_key_and_csr().unwrap();
    let stranger = client_config(ca.cert(), ca.issue_device(&csr, 999, 1).unwrap(), key).unwrap();
    let s = connect(addr, stranger).await;
    let reason = s.conn.closed().await.to_string();
    assert!(reason.contains("unknown or revoked"), "{reason}");

    // A device certificate cannot administer: the request is not understood
    // as one, and nothing happens.
    let as_admin = AdminClient::connect_with(addr, "localhost", device(1)).await;
    assert!(as_admin.is_err(), "a device passed as an admin");

    // Anything before Hello, and an incompatible version.
    let mut p = connect(addr, device(1)).await;
    let checkin = AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib: 64,
            eligible: true,
        },
    };
    assert_eq!(code(p.call(&checkin).await), Some(ErrorCode::Malformed));
    assert_eq!(
        code(p.call(&hello(0)).await),
        Some(ErrorCode::IncompatibleVersion)
    );

    // An admin certificate speaks the admin protocol: round messages are not
    // understood on its connection.
    let (home_cert, home_key) = c.home.admin_identity().unwrap();
    let mut as_device = connect(addr, client_config(ca.cert(), home_cert, home_key).unwrap()).await;
    let reply = as_device
        .call(&hello(fleet_protocol::PROTOCOL_VERSION))
        .await;
    assert!(
        !matches!(reply, Some(CoordinatorMessage::HelloAck { .. })),
        "{reply:?}"
    );

    // A device gets a plan, then its bad uploads are refused one by one.
    let mut p = connect(addr, device(2)).await;
    assert!(matches!(
        p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck {
            version: fleet_protocol::PROTOCOL_VERSION
        })
    ));
    let Some(CoordinatorMessage::Plan(plan)) = p.call(&checkin).await else {
        panic!("expected a plan")
    };
    let d = spec.layout().total;
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let upload = |values: &[f32], round: u64, fingerprint| {
        let bytes = Codec::F32.encode(values, &mut rng.clone()).unwrap();
        let meta = UpdateMeta {
            task: task_id,
            round,
            fingerprint,
            object: ObjectRef {
                id: ObjectId::of(&bytes),
                size: bytes.len() as u64,
            },
            examples: Some(10),
            train_loss: Some(1.0),
        };
        (meta, bytes)
    };
    let fp = spec.layout().fingerprint();
    let (meta, _) = upload(&vec![0.0; d], 7, fp);
    assert_eq!(
        code(p.call(&AgentMessage::BeginUpload(meta)).await),
        Some(ErrorCode::NoSuchRound)
    );
    let other = ModelSpec::fashion_2nn().layout().fingerprint();
    let (meta, _) = upload(&vec![0.0; d], plan.round, other);
    assert_eq!(
        code(p.call(&AgentMessage::BeginUpload(meta)).await),
        Some(ErrorCode::UpdateRejected)
    );
    // A NaN in the update.
    let mut nan = vec![0.01f32; d];
    nan[3] = f32::NAN;
    let (meta, bytes) = upload(&nan, plan.round, fp);
    assert!(matches!(
        p.call(&AgentMessage::BeginUpload(meta.clone())).await,
        Some(CoordinatorMessage::UploadProgress { received: 0, .. })
    ));
    let chunk = AgentMessage::UploadChunk {
        object: meta.object.id,
        offset: 0,
        data: bytes,
    };
    assert_eq!(code(p.call(&chunk).await), Some(ErrorCode::UpdateRejected));
    // Bytes that do not match the announced hash.
    let (meta, mut bytes) = upload(&vec![0.01; d], plan.round, fp);
    assert!(matches!(
        p.call(&AgentMessage::BeginUpload(meta.clone())).await,
        Some(CoordinatorMessage::UploadProgress { .. })
    ));
    bytes[100] ^= 1;
    let chunk = AgentMessage::UploadChunk {
        object: meta.object.id,
        offset: 0,
        data: bytes,
    };
    assert_eq!(code(p.call(&chunk).await), Some(ErrorCode::HashMismatch));
    // A chunk for an update never announced.
    let stray = AgentMessage::UploadChunk {
        object: ObjectId::of(b"x"),
        offset: 0,
        data: vec![1],
    };
    assert_eq!(code(p.call(&stray).await), Some(ErrorCode::Malformed));
    // A good update is accepted; the same device reporting again is a replay.
    let (meta, bytes) = upload(&vec![0.01; d], plan.round, fp);
    p.call(&AgentMessage::BeginUpload(meta.clone())).await;
    let chunk = AgentMessage::UploadChunk {
        object: meta.object.id,
        offset: 0,
        data: bytes.clone(),
    };
    assert!(matches!(
        p.call(&chunk).await,
        Some(CoordinatorMessage::UploadAccepted { .. })
    ));
    let (meta2, bytes2) = upload(&vec![0.02; d], plan.round, fp);
    p.call(&AgentMessage::BeginUpload(meta2.clone())).await;
    let again = AgentMessage::UploadChunk {
        object: meta2.object.id,
        offset: 0,
        data: bytes2,
    };
    assert_eq!(
        code(p.call(&again).await),
        Some(ErrorCode::Replayed),
        "a second report from the same device is a replay"
    );

    // A malformed frame ends that connection only.
    let mut bad = connect(addr, device(3)).await;
    bad.tx
        .write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    // It is told why, then the stream ends.
    let reply = recv::<CoordinatorMessage>(&mut bad.rx, MAX_FRAME).await;
    assert!(
        matches!(&reply, Ok(Some(CoordinatorMessage::Error(e))) if e.code == ErrorCode::Malformed),
        "{reply:?}"
    );
    assert!(
        !matches!(
            recv::<CoordinatorMessage>(&mut bad.rx, MAX_FRAME).await,
            Ok(Some(_))
        ),
        "the stream went on after a malformed frame"
    );
    // An oversized frame header, likewise.
    let mut big = connect(addr, device(4)).await;
    big.tx.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let reply = recv::<CoordinatorMessage>(&mut big.rx, MAX_FRAME).await;
    assert!(
        matches!(&reply, Ok(Some(CoordinatorMessage::Error(e))) if e.code == ErrorCode::TooLarge),
        "{reply:?}"
    );

    // The coordinator still serves: a second device completes the round and the task.
    let mut q = connect(addr, device(5)).await;
    q.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    let Some(CoordinatorMessage::Plan(plan)) = q.call(&checkin).await else {
        panic!("expected a plan")
    };
    let (meta, bytes) = upload(&vec![0.03; d], plan.round, fp);
    q.call(&AgentMessage::BeginUpload(meta.clone())).await;
    let chunk = AgentMessage::UploadChunk {
        object: meta.object.id,
        offset: 0,
        data: bytes,
    };
    assert!(matches!(
        q.call(&chunk).await,
        Some(CoordinatorMessage::UploadAccepted { .. })
    ));
    // The task finished with the two good updates and nothing else.
    let AdminResponse::Rounds(rounds) =
        ok(&mut admin, AdminRequest::ListRounds { task: task_id }).await
    else {
        panic!()
    };
    assert_eq!(rounds.len(), 1, "{rounds:?}");
    assert_eq!(rounds[0].outcome, "closed");
    assert_eq!(rounds[0].participants.len(), 2);
    let AdminResponse::Tasks(tasks) = ok(&mut admin, AdminRequest::ListTasks).await else {
        panic!()
    };
    assert_eq!(tasks[0].state, TaskState::Finished);
    // FedAvg of 0.01 and 0.03 with equal weights moved every parameter by 0.02.
    let bytes = std::fs::read(c.home.path("objects").join(&tasks[0].model)).unwrap();
    let global = bytes_to_params(&bytes).unwrap();
    let initial = spec.init_params(1);
    assert!(
        global
            .iter()
            .zip(&initial)
            .all(|(g, i)| (g - i - 0.02).abs() < 1e-6)
    );
    // Every refusal was counted under its reason.
    let text = c.coordinator.metrics_text().await;
    for (reason, n) in [
        ("non_finite", 1),
        ("hash_mismatch", 1),
        ("unannounced", 1),
        ("replayed", 1),
        ("malformed", 2),
        ("too_large", 1),
        ("unknown_device", 1),
    ] {
        assert_eq!(
            metric(
                &text,
                &format!("fleet_rejected_total{{reason=\"{reason}\"}}")
            ),
            n,
            "{reason}:\n{text}"
        );
    }
    assert_eq!(metric(&text, "fleet_updates_accepted_total"), 2);
    assert_eq!(metric(&text, "fleet_rounds_closed_total"), 1);
}

#[tokio::test]
async fn a_revoked_device_is_dropped_and_refused_from_then_on() {
    let dir = scratch("revoke");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (id, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let mut p = connect(c.addr, device_config(&state)).await;
    assert!(matches!(
        p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    ));
    let AdminResponse::Devices(list) = ok(&mut admin, AdminRequest::ListDevices).await else {
        panic!()
    };
    assert!(list.iter().any(|d| d.id == id && d.connected), "{list:?}");
    ok(&mut admin, AdminRequest::RevokeDevice { device: id }).await;
    // The live connection is closed with the revocation code …
    let reason = p.conn.closed().await;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == 2u32.into()),
        "{reason}"
    );
    // … and a new handshake with the same certificate is refused.
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(device_config(&state));
    let conn = ep.connect(c.addr, "localhost").unwrap().await;
    let refused = match conn {
        Err(e) => e.to_string(),
        Ok(conn) => conn.closed().await.to_string(),
    };
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");
    // A token works once.
    let AdminResponse::Token { token, .. } = ok(
        &mut admin,
        AdminRequest::CreateToken {
            label: "x".into(),
            ttl_secs: 60,
        },
    )
    .await
    else {
        panic!()
    };
    let ca = c.home.ca_cert().unwrap();
    let first = fleet_edge_agent::enroll::enroll(
        &fleet_edge_agent::state::StateDir::at(dir.join("a1")),
        c.addr,
        "localhost",
        ca.clone(),
        &token,
        None,
    )
    .await;
    assert!(first.is_ok(), "{first:?}");
    let second = fleet_edge_agent::enroll::enroll(
        &fleet_edge_agent::state::StateDir::at(dir.join("a2")),
        c.addr,
        "localhost",
        ca,
        &token,
        None,
    )
    .await;
    assert!(second.unwrap_err().contains("already used"));
}

#[tokio::test]
async fn bad_admin_requests_are_refused_with_a_reason() {
    let dir = scratch("bad-admin");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let refused = async |admin: &mut AdminClient, req: AdminRequest| -> String {
        admin.call(&req).await.expect_err("must be refused")
    };
    let spec = ModelSpec::fashion_logreg();
    // An invalid task names the field.
    let mut bad = small_task("bad input", &spec);
    bad.population = 1;
    let e = refused(&mut admin, AdminRequest::CreateTask(Box::new(bad))).await;
    assert!(e.contains("population"), "{e}");
    let mut bad = small_task("bad input", &spec);
    bad.engine.min_reports = 0;
    let e = refused(&mut admin, AdminRequest::CreateTask(Box::new(bad))).await;
    assert!(e.contains("engine") && e.contains("min_reports"), "{e}");
    // Unknown things.
    let e = refused(&mut admin, AdminRequest::RevokeDevice { device: 77 }).await;
    assert!(e.contains("no device 77"), "{e}");
    let e = refused(
        &mut admin,
        AdminRequest::SetTaskState {
            task: 9,
            command: TaskCommand::Start,
        },
    )
    .await;
    assert!(e.contains("no task 9"), "{e}");
    let e = refused(&mut admin, AdminRequest::Deploy { model: "zz".into() }).await;
    assert!(e.contains("no model id starts with"), "{e}");
    let e = refused(&mut admin, AdminRequest::Rollback).await;
    assert!(e.contains("nothing to roll back"), "{e}");
    // A stopped task cannot start again; a second task cannot start beside a running one.
    ok(
        &mut admin,
        AdminRequest::CreateTask(Box::new(small_task("bad input", &spec))),
    )
    .await;
    ok(
        &mut admin,
        AdminRequest::CreateTask(Box::new(small_task("bad input", &spec))),
    )
    .await;
    let set = |task, command| AdminRequest::SetTaskState { task, command };
    ok(&mut admin, set(1, TaskCommand::Start)).await;
    let e = refused(&mut admin, set(2, TaskCommand::Start)).await;
    assert!(e.contains("task 1 is running"), "{e}");
    ok(&mut admin, set(1, TaskCommand::Stop)).await;
    let e = refused(&mut admin, set(1, TaskCommand::Start)).await;
    assert!(e.contains("Stopped"), "{e}");
    // An enrollment token that was never issued.
    let e = fleet_edge_agent::enroll::enroll(
        &fleet_edge_agent::state::StateDir::at(dir.join("agent")),
        c.addr,
        "localhost",
        c.home.ca_cert().unwrap(),
        "not-a-token",
        None,
    )
    .await
    .unwrap_err();
    assert!(e.contains("unknown enrollment token"), "{e}");
    // Nothing of the above was counted as a device or changed a task.
    let AdminResponse::Devices(devices) = ok(&mut admin, AdminRequest::ListDevices).await else {
        panic!()
    };
    assert!(devices.is_empty());
}
