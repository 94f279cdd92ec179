//! Secure aggregation over the wire, with an in-process coordinator and
//! devices speaking the protocol themselves (`fleet_secagg::Device`, keys
//! signed with their enrolled certificates): a round to its close, and
//! what the coordinator refuses — advertisements it cannot verify, masked
//! input nobody waits for, oversized chunks, uploads in a secure task.

use std::collections::BTreeMap;

use fleet_e2e::{
    InProcess, Peer, code, connect, device_config, hello, metric, ok, scratch, small_task,
};
use fleet_models::ModelSpec;
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand};
use fleet_protocol::message::{AgentMessage, Capabilities, CoordinatorMessage, SecurePlan};
use fleet_protocol::secure::{CaAuthenticator, CertSigner};
use fleet_protocol::task::SecureAggregation;
use fleet_protocol::tls::{CertificateAuthority, device_key_and_csr};
use fleet_protocol::transfer::CHUNK_SIZE;
use fleet_protocol::{ErrorCode, PROTOCOL_VERSION};
use fleet_secagg::{Device, DeviceMessage, ServerMessage};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

async fn secure(p: &mut Peer, round: u64, message: Option<DeviceMessage>) -> CoordinatorMessage {
    p.call(&AgentMessage::Secure {
        task: 1,
        round,
        message,
    })
    .await
    .expect("an answer")
}

#[tokio::test]
async fn a_secure_round_over_quic_and_what_the_coordinator_refuses() {
    let dir = scratch("secure-bad-input");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let model = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    let mut spec = small_task("secure", &model);
    spec.population = 3;
    spec.engine.target = 3;
    spec.engine.min_reports = 3;
    spec.secure_aggregation = Some(SecureAggregation {
        threshold: 2,
        degree: 2,
        stage_timeout_ms: 30_000,
        clip_norm: Some(1.0),
    });
    let AdminResponse::Done { id: Some(1), .. } =
        ok(&mut admin, AdminRequest::CreateTask(Box::new(spec))).await
    else {
        panic!("task not created")
    };
    ok(
        &mut admin,
        AdminRequest::SetTaskState {
            task: 1,
            command: TaskCommand::Start,
        },
    )
    .await;
    let mut peers = BTreeMap::new();
    let mut signers = BTreeMap::new();
    for k in 0..3 {
        let (id, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
        let (cert, key, ca) = state.credentials().unwrap();
        signers.insert(id, (CertSigner::new(&cert, &key).unwrap(), ca));
        let mut p = connect(c.addr, device_config(&state)).await;
        assert!(matches!(
            p.call(&hello(PROTOCOL_VERSION)).await,
            Some(CoordinatorMessage::HelloAck { .. })
        ));
        peers.insert(id, p);
    }
    let ids: Vec<u64> = peers.keys().copied().collect();
    let mut plan: Option<SecurePlan> = None;
    for p in peers.values_mut() {
        let reply = p
            .call(&AgentMessage::CheckIn {
                capabilities: Capabilities {
                    memory_mib: 256,
                    eligible: true,
                },
            })
            .await;
        let Some(CoordinatorMessage::Plan(pl)) = reply else {
            panic!("{reply:?}")
        };
        plan = Some(*pl.secure.expect("a secure plan"));
    }
    let plan = plan.unwrap();
    let round = plan.context.round;
    let (a, b, d3) = (ids[0], ids[1], ids[2]);

    // A plain upload has no place in a secure task.
    let reply = peers
        .get_mut(&a)
        .unwrap()
        .call(&AgentMessage::BeginUpload(
            fleet_protocol::message::UpdateMeta {
                task: 1,
                round,
                fingerprint: model.layout().fingerprint(),
                object: fleet_protocol::message::ObjectRef {
                    id: fleet_protocol::message::ObjectId::of(b"x"),
                    size: 1,
                },
                examples: Some(1),
                train_loss: None,
            },
        ))
        .await;
    assert_eq!(code(reply), Some(ErrorCode::UpdateRejected));

    // Device a's keys signed with device b's certificate key, then with a
    // certificate of another CA for a's id: both refused before they
    // enter the round.
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (_, forged) = Device::new(a, plan.context, &signers[&b].0, &mut rng).unwrap();
    let reply = secure(peers.get_mut(&a).unwrap(), round, Some(forged)).await;
    assert!(
        matches!(&reply, CoordinatorMessage::Error(e) if e.code == ErrorCode::UpdateRejected
            && e.message.contains("advertisement refused")),
        "{reply:?}"
    );
    let other = CertificateAuthority::create("another fleet").unwrap();
    let (key, csr) = device_key_and_csr().unwrap();
    let stranger = CertSigner::new(&other.issue_device(&csr, a, 1).unwrap(), &key).unwrap();
    let (_, strange) = Device::new(a, plan.context, &stranger, &mut rng).unwrap();
    let reply = secure(peers.get_mut(&a).unwrap(), round, Some(strange)).await;
    assert_eq!(code(Some(reply)), Some(ErrorCode::UpdateRejected));
    // Masked input nobody waits for, and an oversized chunk.
    let chunk = |offset: u64, data: Vec<u8>| AgentMessage::SecureChunk {
        task: 1,
        round,
        offset,
        data,
    };
    let p = peers.get_mut(&a).unwrap();
    assert_eq!(
        code(p.call(&chunk(0, vec![0; 64])).await),
        Some(ErrorCode::NoSuchRound)
    );
    assert_eq!(
        code(p.call(&chunk(0, vec![0; CHUNK_SIZE + 1])).await),
        Some(ErrorCode::TooLarge)
    );
    // A poll before advertising.
    assert_eq!(
        code(Some(secure(p, round, None).await)),
        Some(ErrorCode::NoSuchRound)
    );

    // The round itself: every device's update is the same vector.
    let update: Vec<f32> = (0..model.layout().total)
        .map(|i| ((i % 7) as f32 - 3.0) * 1e-3)
        .collect();
    let mut devices = BTreeMap::new();
    let mut inbox = BTreeMap::new();
    let mut held = None;
    for &d in &ids {
        if d == d3 {
            // Device a polls while the round still waits for d3's report:
            // the coordinator holds the poll, and answers it with the
            // neighbours as soon as d3's advertisement starts the exchange.
            let mut pa = peers.remove(&a).unwrap();
            held = Some(tokio::spawn(async move {
                let reply = secure(&mut pa, round, None).await;
                (pa, reply)
            }));
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut rng = ChaCha20Rng::seed_from_u64(d);
        let input = plan.quantiser.encode(&update, &mut rng).unwrap();
        let (dev, ad) = Device::new(d, plan.context, &signers[&d].0, &mut rng).unwrap();
        match secure(peers.get_mut(&d).unwrap(), round, Some(ad)).await {
            CoordinatorMessage::Secure {
                message: Some(m), ..
            } => {
                inbox.insert(d, m);
            }
            CoordinatorMessage::Secure { message: None, .. } => {}
            other => panic!("device {d}: {other:?}"),
        }
        let auth = CaAuthenticator::new(signers[&d].1.clone()).unwrap();
        devices.insert(d, (dev, rng, Some(input), auth));
    }
    let (pa, reply) = held.unwrap().await.unwrap();
    peers.insert(a, pa);
    let CoordinatorMessage::Secure {
        message: Some(m @ ServerMessage::Neighbours(_)),
        ..
    } = reply
    else {
        panic!("the held poll was answered without the neighbours: {reply:?}")
    };
    inbox.insert(a, m);
    let mut revealed = 0;
    for _ in 0..50 {
        for &d in &ids {
            let p = peers.get_mut(&d).unwrap();
            let message = match inbox.remove(&d) {
                Some(m) => m,
                None => match secure(p, round, None).await {
                    CoordinatorMessage::Secure {
                        message: Some(m), ..
                    } => m,
                    CoordinatorMessage::Secure { message: None, .. } => continue,
                    other => {
                        assert!(revealed == 3, "device {d}: {other:?}");
                        continue;
                    }
                },
            };
            let (dev, rng, input, auth) = devices.get_mut(&d).unwrap();
            let answer = match message {
                ServerMessage::Neighbours(ads) => dev.share(&ads, auth, rng),
                ServerMessage::Shares(s) => dev.mask(&s, input.take().unwrap()),
                ServerMessage::Unmask { survivors, dropped } => dev.reveal(&survivors, &dropped),
            }
            .unwrap();
            let reply = match answer {
                DeviceMessage::Masked(words) => {
                    let bytes: Vec<u8> = words.0.iter().flat_map(|w| w.to_le_bytes()).collect();
                    let mut reply = None;
                    for (i, part) in bytes.chunks(CHUNK_SIZE / 8).enumerate() {
                        let offset = (i * CHUNK_SIZE / 8) as u64;
                        reply = p.call(&chunk(offset, part.to_vec())).await;
                    }
                    reply.unwrap()
                }
                m => {
                    revealed += usize::from(matches!(m, DeviceMessage::Reveal(_)));
                    secure(p, round, Some(m)).await
                }
            };
            match reply {
                CoordinatorMessage::Secure { message, .. } => {
                    if let Some(m) = message {
                        inbox.insert(d, m);
                    }
                }
                other => panic!("device {d}: {other:?}"),
            }
        }
        if revealed == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(revealed, 3);
    let AdminResponse::Rounds(rounds) = ok(&mut admin, AdminRequest::ListRounds { task: 1 }).await
    else {
        panic!("no rounds")
    };
    assert_eq!(rounds[0].outcome, "closed", "{rounds:?}");
    assert_eq!(rounds[0].participants, ids);
    // The exchange is over: device 3's next poll is refused.
    assert_eq!(
        code(Some(secure(peers.get_mut(&d3).unwrap(), round, None).await)),
        Some(ErrorCode::NoSuchRound)
    );
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(&text, "fleet_rejected_total{reason=\"advertisement\"}"),
        2
    );
    assert_eq!(metric(&text, "fleet_updates_accepted_total"), 3);
}
