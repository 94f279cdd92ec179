//! Bad input over the wire: what the coordinator answers, and that it keeps
//! serving afterwards.

use std::net::SocketAddr;
use std::sync::Arc;

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_coordinator::engine::EngineConfig;
use fleet_coordinator::server::{Coordinator, TaskConfig};
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, ObjectRef, UpdateMeta,
};
use fleet_protocol::stream::{recv, send};
use fleet_protocol::tls::{
    CertificateAuthority, RevocationList, client_config, device_key_and_csr, server_config,
};
use fleet_protocol::{ErrorCode, MAX_FRAME};
use rand::SeedableRng;

struct Peer {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
}

impl Peer {
    async fn call(&mut self, m: &AgentMessage) -> Option<CoordinatorMessage> {
        send(&mut self.tx, m).await.ok()?;
        recv(&mut self.rx, MAX_FRAME).await.ok().flatten()
    }
}

async fn connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Peer {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    let (tx, rx) = conn.open_bi().await.unwrap();
    Peer {
        _ep: ep,
        conn,
        tx,
        rx,
    }
}

fn code(m: Option<CoordinatorMessage>) -> Option<ErrorCode> {
    match m {
        Some(CoordinatorMessage::Error(e)) => Some(e.code),
        _ => None,
    }
}

fn hello(version: u16) -> AgentMessage {
    AgentMessage::Hello {
        version,
        min_version: version.min(1),
        software: "test".into(),
    }
}

#[tokio::test]
async fn the_coordinator_refuses_bad_requests_and_keeps_serving() {
    let ca = CertificateAuthority::create("bad-input CA").unwrap();
    let (scert, skey) = ca.issue_server(&["localhost".into()], 1).unwrap();
    let cfg = server_config(ca.cert(), scert, skey, Arc::new(RevocationList::default())).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let task = TaskConfig {
        id: 9,
        spec: spec.clone(),
        train: TrainConfig::default(),
        strategy: StrategyConfig::fedavg(),
        codec: Codec::F32,
        dp: None,
        engine: EngineConfig {
            target: 2,
            over_selection: 1.0,
            min_reports: 1,
            rounds: 1,
            ..EngineConfig::default()
        },
        seed: 1,
    };
    let coordinator = Arc::new(Coordinator::new(task).unwrap());
    let server = {
        let c = coordinator.clone();
        tokio::spawn(async move { c.serve(endpoint).await })
    };
    let device = |id| {
        let (key, csr) = device_key_and_csr().unwrap();
        client_config(ca.cert(), ca.issue_device(&csr, id, 1).unwrap(), key).unwrap()
    };

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

    // An admin certificate may not take part in rounds.
    let (acert, akey) = ca.issue_admin("ops", 1).unwrap();
    let mut admin = connect(addr, client_config(ca.cert(), acert, akey).unwrap()).await;
    assert!(admin.call(&hello(1)).await.is_none());
    let reason = admin.conn.closed().await.to_string();
    assert!(reason.contains("may not take part"), "{reason}");

    // A device gets a plan, then its bad uploads are refused one by one.
    let mut p = connect(addr, device(2)).await;
    assert!(matches!(
        p.call(&hello(1)).await,
        Some(CoordinatorMessage::HelloAck { version: 1 })
    ));
    let Some(CoordinatorMessage::Plan(plan)) = p.call(&checkin).await else {
        panic!("expected a plan")
    };
    let d = spec.layout().total;
    let rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let upload = |values: &[f32], round: u64, fingerprint| {
        let bytes = Codec::F32.encode(values, &mut rng.clone()).unwrap();
        let meta = UpdateMeta {
            task: 9,
            round,
            fingerprint,
            object: ObjectRef {
                id: ObjectId::of(&bytes),
                size: bytes.len() as u64,
            },
            examples: 10,
            train_loss: 1.0,
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
    let reply = recv::<CoordinatorMessage>(&mut bad.rx, MAX_FRAME).await;
    assert!(!matches!(reply, Ok(Some(_))), "{reply:?}");
    // An oversized frame header, likewise.
    let mut big = connect(addr, device(4)).await;
    big.tx.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    assert!(!matches!(
        recv::<CoordinatorMessage>(&mut big.rx, MAX_FRAME).await,
        Ok(Some(_))
    ));

    // The coordinator still serves: a second device completes the round and the task.
    let mut q = connect(addr, device(5)).await;
    q.call(&hello(1)).await;
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
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    let history = coordinator.history().await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].reports, 2);
    // FedAvg of 0.01 and 0.03 with equal weights moved every parameter by 0.02.
    let global = coordinator.global().await;
    let initial = spec.init_params(1);
    assert!(
        global
            .iter()
            .zip(&initial)
            .all(|(g, i)| (g - i - 0.02).abs() < 1e-6)
    );
}
