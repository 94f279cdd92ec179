use fleet_aggregation::codec::Codec;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::message::{ObjectRef, params_to_bytes};
use fleet_protocol::{ErrorCode, WireError};

use super::*;

fn model_bytes() -> Vec<u8> {
    params_to_bytes(&(0..100_000).map(|i| i as f32 * 1e-3).collect::<Vec<_>>())
}

fn plan(model: &[u8]) -> Plan {
    Plan {
        task: 1,
        round: 4,
        model: ObjectRef {
            id: ObjectId::of(model),
            size: model.len() as u64,
        },
        spec: ModelSpec::fashion_logreg(),
        train: TrainConfig::default(),
        dp: None,
        codec: Codec::F32,
        report_within_ms: 1_000,
        secure: None,
    }
}

fn sent(out: &[Output]) -> Vec<&AgentMessage> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn trained(bytes: usize) -> Trained {
    Trained {
        task: 1,
        round: 4,
        fingerprint: ModelSpec::fashion_logreg().layout().fingerprint(),
        bytes: (0..bytes).map(|i| (i % 251) as u8).collect(),
        examples: 60,
        loss: 0.5,
    }
}

/// Connects and greets; returns the outputs after the hello was acknowledged.
fn up(m: &mut Machine) -> Vec<Output> {
    assert_eq!(m.start(), vec![Output::Connect]);
    let out = m.handle(Input::Connected);
    assert!(matches!(sent(&out)[..], [AgentMessage::Hello { .. }]));
    m.handle(Input::Message(CoordinatorMessage::HelloAck { version: 1 }))
}

#[test]
fn a_round_from_check_in_to_acceptance() {
    let mut m = Machine::new(Config::default(), None, None);
    let out = up(&mut m);
    assert!(matches!(sent(&out)[..], [AgentMessage::CheckIn { .. }]));

    let model = model_bytes();
    let p = plan(&model);
    let out = m.handle(Input::Message(CoordinatorMessage::Plan(p.clone())));
    assert!(matches!(
        sent(&out)[..],
        [AgentMessage::Fetch { offset: 0, .. }]
    ));
    let mut train = None;
    for (offset, data) in fleet_protocol::transfer::chunks(&model, 0) {
        let out = m.handle(Input::Message(CoordinatorMessage::Chunk {
            object: p.model.id,
            offset,
            total: model.len() as u64,
            data: data.to_vec(),
        }));
        train = out
            .into_iter()
            .find(|o| matches!(o, Output::Train { .. }))
            .or(train);
    }
    let Some(Output::Train { global, plan: got }) = train else {
        panic!("no training started")
    };
    assert_eq!(got, p);
    assert_eq!(global.len(), 100_000);

    let t = trained(300_000);
    let bytes = t.bytes.clone();
    let out = m.handle(Input::Trained(Ok(t)));
    assert!(matches!(out[0], Output::SavePending(_)));
    let object = match sent(&out)[..] {
        [AgentMessage::BeginUpload(meta)] => meta.object.id,
        ref other => panic!("{other:?}"),
    };
    // The coordinator asks for the bytes from 0, then from where it is.
    let mut offset = 0;
    while offset < bytes.len() as u64 {
        let out = m.handle(Input::Message(CoordinatorMessage::UploadProgress {
            object,
            received: offset,
        }));
        match sent(&out)[..] {
            [
                AgentMessage::UploadChunk {
                    offset: o, data, ..
                },
            ] => {
                assert_eq!(*o, offset);
                assert_eq!(
                    data[..],
                    bytes[offset as usize..offset as usize + data.len()]
                );
                offset += data.len() as u64;
            }
            ref other => panic!("{other:?}"),
        }
    }
    let out = m.handle(Input::Message(CoordinatorMessage::UploadAccepted {
        object,
    }));
    assert!(out.contains(&Output::Accepted { task: 1, round: 4 }));
    assert!(out.contains(&Output::ClearPending));
    assert!(matches!(sent(&out)[..], [AgentMessage::CheckIn { .. }]));
    assert!(!m.has_pending());
}

#[test]
fn an_interrupted_upload_resumes_from_what_arrived() {
    let mut m = Machine::new(Config::default(), None, None);
    up(&mut m);
    let out = m.handle(Input::Trained(Ok(trained(600_000))));
    let Output::SavePending(saved) = &out[0] else {
        panic!("{out:?}")
    };
    let saved = saved.clone();
    m.handle(Input::Disconnected);

    // A restarted agent: the pending update comes from disk.
    let mut m = Machine::new(Config::default(), None, Some(saved.clone()));
    let out = up(&mut m);
    let [AgentMessage::BeginUpload(meta)] = sent(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(meta, &saved.meta);
    let out = m.handle(Input::Message(CoordinatorMessage::UploadProgress {
        object: meta.object.id,
        received: CHUNK_SIZE as u64,
    }));
    let [AgentMessage::UploadChunk { offset, .. }] = sent(&out)[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*offset, CHUNK_SIZE as u64, "resumes, does not restart");
    assert!(
        out.iter().any(
            |o| matches!(o, Output::Log(l) if l.starts_with("resuming the upload at byte 262144"))
        ),
        "{out:?}"
    );
}

#[test]
fn a_refused_update_is_dropped_and_the_agent_checks_in_again() {
    let mut m = Machine::new(Config::default(), None, None);
    up(&mut m);
    let out = m.handle(Input::Trained(Ok(trained(1_000))));
    let [AgentMessage::BeginUpload(_)] = sent(&out)[..] else {
        panic!("{out:?}")
    };
    let out = m.handle(Input::Message(CoordinatorMessage::Error(WireError {
        code: ErrorCode::NoSuchRound,
        message: "round 4 of task 1 is not open".into(),
    })));
    assert!(out.contains(&Output::ClearPending));
    assert!(out.iter().any(|o| matches!(o, Output::Refused(_))));
    assert!(matches!(sent(&out)[..], [AgentMessage::CheckIn { .. }]));
    assert!(!m.has_pending());
}

#[test]
fn a_corrupt_model_download_is_refused() {
    let mut m = Machine::new(Config::default(), None, None);
    up(&mut m);
    let model = model_bytes();
    let p = plan(&model);
    m.handle(Input::Message(CoordinatorMessage::Plan(p.clone())));
    let mut bad = model.clone();
    bad[7] ^= 1;
    let mut last = Vec::new();
    for (offset, data) in fleet_protocol::transfer::chunks(&bad, 0) {
        last = m.handle(Input::Message(CoordinatorMessage::Chunk {
            object: p.model.id,
            offset,
            total: bad.len() as u64,
            data: data.to_vec(),
        }));
    }
    assert!(
        !last.iter().any(|o| matches!(o, Output::Train { .. })),
        "{last:?}"
    );
    assert!(last.iter().any(|o| matches!(o, Output::Refused(_))));
    assert!(matches!(sent(&last)[..], [AgentMessage::CheckIn { .. }]));
}

#[test]
fn a_cached_model_is_not_fetched_again() {
    let model = model_bytes();
    let mut m = Machine::new(
        Config::default(),
        Some((ObjectId::of(&model), model.clone())),
        None,
    );
    up(&mut m);
    let out = m.handle(Input::Message(CoordinatorMessage::Plan(plan(&model))));
    assert!(sent(&out).is_empty(), "{out:?}");
    assert!(matches!(out[..], [Output::Train { .. }]));
}

#[test]
fn backoff_grows_with_failures_within_its_cap_and_resets_on_success() {
    let cfg = Config {
        backoff_base_ms: 100,
        backoff_cap_ms: 5_000,
        ..Config::default()
    };
    let mut m = Machine::new(cfg, None, None);
    m.start();
    let mut waits = Vec::new();
    for _ in 0..40 {
        let out = m.handle(Input::Disconnected);
        let Some(Output::Wait(w)) = out.iter().find(|o| matches!(o, Output::Wait(_))) else {
            panic!("{out:?}")
        };
        waits.push(*w);
        assert_eq!(m.handle(Input::Timer), vec![Output::Connect]);
    }
    for (n, w) in waits.iter().enumerate() {
        assert!(*w <= (100u64 << n.min(20)).min(5_000), "wait {n}: {w}");
    }
    // Full jitter: late waits spread over the capped range, not all at the cap.
    let late = &waits[10..];
    assert!(late.iter().any(|&w| w > 2_500) && late.iter().any(|&w| w < 2_500));
    up(&mut m);
    let out = m.handle(Input::Disconnected);
    let Some(Output::Wait(w)) = out.iter().find(|o| matches!(o, Output::Wait(_))) else {
        panic!()
    };
    assert!(*w <= 100, "reset after a successful hello: {w}");
}

#[test]
fn an_incompatible_coordinator_stops_the_agent() {
    let mut m = Machine::new(Config::default(), None, None);
    m.start();
    m.handle(Input::Connected);
    let out = m.handle(Input::Message(CoordinatorMessage::Error(WireError {
        code: ErrorCode::IncompatibleVersion,
        message: "speaks 2..=3".into(),
    })));
    assert!(matches!(out[..], [Output::Stop(_)]));
}

#[test]
fn training_goes_on_while_the_link_is_down() {
    let model = model_bytes();
    let mut m = Machine::new(
        Config::default(),
        Some((ObjectId::of(&model), model.clone())),
        None,
    );
    up(&mut m);
    m.handle(Input::Message(CoordinatorMessage::Plan(plan(&model))));
    m.handle(Input::Disconnected);
    let out = m.handle(Input::Trained(Ok(trained(10))));
    assert!(
        matches!(out[..], [Output::SavePending(_)]),
        "kept, not sent: {out:?}"
    );
    m.handle(Input::Timer);
    m.handle(Input::Connected);
    let out = m.handle(Input::Message(CoordinatorMessage::HelloAck { version: 1 }));
    assert!(matches!(sent(&out)[..], [AgentMessage::BeginUpload(_)]));
}

/// Trains `p` from a fresh machine (model downloaded) and returns the
/// announcement of its update.
fn announced(p: Plan) -> UpdateMeta {
    let mut m = Machine::new(Config::default(), None, None);
    up(&mut m);
    let model = model_bytes();
    m.handle(Input::Message(CoordinatorMessage::Plan(p.clone())));
    for (offset, data) in fleet_protocol::transfer::chunks(&model, 0) {
        m.handle(Input::Message(CoordinatorMessage::Chunk {
            object: p.model.id,
            offset,
            total: model.len() as u64,
            data: data.to_vec(),
        }));
    }
    let out = m.handle(Input::Trained(Ok(trained(100))));
    match sent(&out)[..] {
        [AgentMessage::BeginUpload(meta)] => meta.clone(),
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn a_private_task_report_keeps_the_example_count_and_loss_on_the_device() {
    let model = model_bytes();
    let plain = announced(plan(&model));
    assert_eq!((plain.examples, plain.train_loss), (Some(60), Some(0.5)));
    let mut private = plan(&model);
    private.dp = Some(fleet_aggregation::privacy::DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: fleet_aggregation::privacy::NoisePlacement::Server,
        expected_cohort: 10,
        adaptive: None,
    });
    let meta = announced(private);
    assert_eq!((meta.examples, meta.train_loss), (None, None));
}
