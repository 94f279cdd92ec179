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
        secure_input: None,
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

mod secure {
    //! The device's side of secure aggregation, against the protocol's
    //! real server (`fleet_secagg::Server`) in this process.

    use std::collections::BTreeMap;

    use fleet_protocol::message::SecurePlan;
    use fleet_secagg::pki::{SimPki, SimSigner};
    use fleet_secagg::quantise::Quantiser;
    use fleet_secagg::{Context, Output as ServerOutput, Params, Server, ServerMessage};

    use super::*;

    const FLEET: u64 = 5;

    /// A plan for 100,000 parameters: the masked input (131,072 words) takes
    /// two chunks.
    fn secure_plan(model: &[u8], devices: u32) -> Plan {
        let quantiser = Quantiser::plan(100_000, 1.0, 0.0, 2, devices as usize, 7).unwrap();
        let mut p = plan(model);
        p.secure = Some(Box::new(SecurePlan {
            context: Context {
                task: 1,
                round: 4,
                attempt: 0,
                params: Params {
                    threshold: 2,
                    degree: 2,
                    min_survivors: 2,
                    length: quantiser.padded,
                },
            },
            quantiser,
            stage_timeout_ms: 10_000,
        }));
        p
    }

    fn identity(device: u64) -> SecureIdentity {
        SecureIdentity::new(
            Box::new(SimSigner::new(FLEET, device)),
            Box::new(SimPki::new(FLEET)),
            [device as u8; 32],
        )
    }

    fn input(device: u64, len: u32) -> Vec<u32> {
        (0..len)
            .map(|i| (device as u32).wrapping_mul(1_000_003) ^ i)
            .collect()
    }

    /// A machine of `device` holding the model, trained for `p`: returns
    /// it and the message it sends first (its advertisement).
    fn trained_machine(device: u64, model: &[u8], p: &Plan) -> (Machine, AgentMessage) {
        let cfg = Config {
            device,
            ..Config::default()
        };
        let mut m = Machine::new(cfg, Some((p.model.id, model.to_vec())), None);
        m.set_secure_identity(identity(device));
        up(&mut m);
        let out = m.handle(Input::Message(CoordinatorMessage::Plan(p.clone())));
        assert!(
            out.iter().any(|o| matches!(o, Output::Train { .. })),
            "{out:?}"
        );
        let len = p.secure.as_ref().unwrap().context.params.length;
        let mut t = trained(100);
        t.secure_input = Some(input(device, len));
        let out = m.handle(Input::Trained(Ok(t)));
        assert!(
            !out.iter().any(|o| matches!(o, Output::SavePending(_))),
            "a secure round's input is never stored for upload"
        );
        match &sent(&out)[..] {
            [
                ad @ AgentMessage::Secure {
                    task: 1,
                    round: 4,
                    message: Some(fleet_secagg::DeviceMessage::Advertise(_)),
                },
            ] => {
                let ad = (*ad).clone();
                (m, ad)
            }
            other => panic!("expected an advertisement, got {other:?}"),
        }
    }

    /// The coordinator's side: the protocol's server, an outbox, and the
    /// masked inputs being reassembled.
    struct Coordinator {
        server: Server,
        outbox: BTreeMap<u64, ServerMessage>,
        masked: BTreeMap<u64, Vec<u8>>,
        finished: Option<(Vec<u32>, Vec<u64>)>,
    }

    impl Coordinator {
        fn take(&mut self, outputs: Vec<ServerOutput>) {
            for o in outputs {
                match o {
                    ServerOutput::Send(d, m) => {
                        self.outbox.insert(d, m);
                    }
                    ServerOutput::Finished { sum, survivors } => {
                        self.finished = Some((sum, survivors));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }

        /// Answers one request of `device` as the runner does.
        fn answer(&mut self, device: u64, msg: AgentMessage) -> CoordinatorMessage {
            match msg {
                AgentMessage::Secure { message, .. } => {
                    if let Some(m) = message {
                        let out = self.server.receive(device, m, 0);
                        self.take(out);
                    }
                }
                AgentMessage::SecureChunk { offset, data, .. } => {
                    let held = self.masked.entry(device).or_default();
                    if offset == 0 {
                        held.clear();
                    }
                    assert_eq!(held.len() as u64, offset);
                    assert!(data.len() <= CHUNK_SIZE);
                    held.extend_from_slice(&data);
                    let length = self.server.context().params.length as usize;
                    if held.len() == 4 * length {
                        let words = held
                            .chunks_exact(4)
                            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                            .collect();
                        let out = self.server.receive(
                            device,
                            fleet_secagg::DeviceMessage::Masked(fleet_secagg::message::Words(
                                words,
                            )),
                            0,
                        );
                        self.take(out);
                    }
                }
                other => panic!("{other:?}"),
            }
            CoordinatorMessage::Secure {
                message: self.outbox.remove(&device),
                after_ms: 200,
            }
        }
    }

    #[test]
    fn machines_run_a_secure_round_to_the_exact_sum() {
        let model = model_bytes();
        let p = secure_plan(&model, 3);
        let context = p.secure.as_ref().unwrap().context;
        let length = context.params.length;
        let mut machines = BTreeMap::new();
        let mut next = BTreeMap::new();
        for d in 1..=3u64 {
            let (m, ad) = trained_machine(d, &model, &p);
            machines.insert(d, m);
            next.insert(d, ad);
        }
        let mut c = Coordinator {
            server: Server::new(context, 1..=3, 0, 10_000, 11).unwrap(),
            outbox: BTreeMap::new(),
            masked: BTreeMap::new(),
            finished: None,
        };
        let mut accepted = Vec::new();
        let mut chunks = 0;
        for _ in 0..100 {
            if next.is_empty() {
                break;
            }
            for (d, msg) in std::mem::take(&mut next) {
                chunks += usize::from(matches!(msg, AgentMessage::SecureChunk { .. }));
                let reply = c.answer(d, msg);
                let m = machines.get_mut(&d).unwrap();
                let mut out = m.handle(Input::Message(reply));
                if let Some(Output::Wait(ms)) = out.last() {
                    assert_eq!(*ms, 200, "polls after the coordinator's interval");
                    out = m.handle(Input::Timer);
                }
                for o in out {
                    match o {
                        Output::Send(AgentMessage::CheckIn { .. }) => {}
                        Output::Send(msg) => {
                            assert!(next.insert(d, msg).is_none(), "one request at a time");
                        }
                        Output::Accepted { task, round } => accepted.push((d, task, round)),
                        Output::Log(_) => {}
                        other => panic!("device {d}: {other:?}"),
                    }
                }
            }
        }
        assert_eq!(accepted, [(1, 1, 4), (2, 1, 4), (3, 1, 4)]);
        assert_eq!(chunks, 6, "two chunks per masked input");
        let (sum, survivors) = c.finished.expect("the round finished");
        assert_eq!(survivors, [1, 2, 3]);
        let inputs: Vec<Vec<u32>> = (1..=3).map(|d| input(d, length)).collect();
        let expected: Vec<u32> = (0..length as usize)
            .map(|i| inputs.iter().map(|v| v[i]).fold(0u32, u32::wrapping_add))
            .collect();
        assert!(sum == expected, "the unmasked sum is the sum of the inputs");
    }

    #[test]
    fn a_masked_input_starts_over_after_a_lost_link_and_a_refusal_ends_the_exchange() {
        let model = model_bytes();
        let p = secure_plan(&model, 3);
        let context = p.secure.as_ref().unwrap().context;
        let (mut m, ad) = trained_machine(1, &model, &p);
        let AgentMessage::Secure {
            message: Some(ad), ..
        } = ad
        else {
            unreachable!()
        };
        // Bring device 1 to the masked-input stage with two real neighbours.
        let mut server = Server::new(context, 1..=3, 0, 10_000, 11).unwrap();
        let mut others = BTreeMap::new();
        let mut outputs = Vec::new();
        for d in 2..=3 {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(d);
            let (dev, ad) =
                fleet_secagg::Device::new(d, context, &SimSigner::new(FLEET, d), &mut rng).unwrap();
            others.insert(d, (dev, rng));
            outputs.extend(server.receive(d, ad, 0));
        }
        outputs.extend(server.receive(1, ad, 0));
        let (outputs, to_one) = step(outputs, &mut server, &mut others, context);
        assert!(matches!(to_one, Some(ServerMessage::Neighbours(_))));
        let out = m.handle(Input::Message(CoordinatorMessage::Secure {
            message: to_one,
            after_ms: 0,
        }));
        let Some(AgentMessage::Secure {
            message: Some(shares),
            ..
        }) = sent(&out).first().map(|m| (*m).clone())
        else {
            panic!("{out:?}")
        };
        let mut outputs = outputs;
        outputs.extend(server.receive(1, shares, 0));
        let (_, to_one) = step(outputs, &mut server, &mut others, context);
        assert!(matches!(to_one, Some(ServerMessage::Shares(_))));
        let out = m.handle(Input::Message(CoordinatorMessage::Secure {
            message: to_one,
            after_ms: 0,
        }));
        assert!(matches!(
            sent(&out)[..],
            [AgentMessage::SecureChunk { offset: 0, .. }]
        ));
        let out = m.handle(Input::Message(CoordinatorMessage::Secure {
            message: None,
            after_ms: 0,
        }));
        assert!(matches!(
            sent(&out)[..],
            [AgentMessage::SecureChunk { offset, .. }] if *offset == CHUNK_SIZE as u64
        ));

        // The link drops: the exchange is kept, and the input starts over.
        m.handle(Input::Disconnected);
        assert_eq!(m.handle(Input::Timer), vec![Output::Connect]);
        m.handle(Input::Connected);
        let out = m.handle(Input::Message(CoordinatorMessage::HelloAck { version: 6 }));
        assert!(
            matches!(
                sent(&out)[..],
                [AgentMessage::SecureChunk { offset: 0, .. }]
            ),
            "{out:?}"
        );

        // The coordinator refuses it: the device leaves the round and asks
        // for work again.
        let out = m.handle(Input::Message(CoordinatorMessage::Error(WireError {
            code: ErrorCode::UpdateRejected,
            message: "secure aggregation: dropped at the deadline".into(),
        })));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Refused(w) if w.contains("dropped")))
        );
        assert!(matches!(sent(&out)[..], [AgentMessage::CheckIn { .. }]));
    }

    type Others = BTreeMap<u64, (fleet_secagg::Device, rand_chacha::ChaCha20Rng)>;

    /// Devices other than 1 answer the server's messages; returns the
    /// server's next outputs and its message to device 1, if any.
    fn step(
        outputs: Vec<ServerOutput>,
        server: &mut Server,
        others: &mut Others,
        context: Context,
    ) -> (Vec<ServerOutput>, Option<ServerMessage>) {
        let mut next = Vec::new();
        let mut to_one = None;
        for o in outputs {
            let ServerOutput::Send(d, msg) = o else {
                panic!("{o:?}")
            };
            if d == 1 {
                to_one = Some(msg);
                continue;
            }
            let (dev, rng) = others.get_mut(&d).unwrap();
            let answer = match msg {
                ServerMessage::Neighbours(ads) => dev.share(&ads, &SimPki::new(FLEET), rng),
                ServerMessage::Shares(s) => dev.mask(&s, vec![0; context.params.length as usize]),
                ServerMessage::Unmask { survivors, dropped } => dev.reveal(&survivors, &dropped),
            }
            .unwrap();
            next.extend(server.receive(d, answer, 0));
        }
        (next, to_one)
    }

    #[test]
    fn a_forged_neighbour_ends_the_exchange_on_the_device() {
        let model = model_bytes();
        let p = secure_plan(&model, 3);
        let context = p.secure.as_ref().unwrap().context;
        let (mut m, _) = trained_machine(1, &model, &p);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        // Device 2's keys, signed by device 3's identity key.
        let (_, ad) =
            fleet_secagg::Device::new(2, context, &SimSigner::new(FLEET, 3), &mut rng).unwrap();
        let fleet_secagg::DeviceMessage::Advertise(mut forged) = ad else {
            unreachable!()
        };
        forged.device = 2;
        let (_, ad3) =
            fleet_secagg::Device::new(3, context, &SimSigner::new(FLEET, 3), &mut rng).unwrap();
        let fleet_secagg::DeviceMessage::Advertise(ad3) = ad3 else {
            unreachable!()
        };
        let out = m.handle(Input::Message(CoordinatorMessage::Secure {
            message: Some(ServerMessage::Neighbours(vec![forged, ad3])),
            after_ms: 0,
        }));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Refused(w) if w.contains("not signed"))),
            "{out:?}"
        );
        assert!(matches!(sent(&out)[..], [AgentMessage::CheckIn { .. }]));
    }

    #[test]
    fn a_secure_plan_without_a_certificate_key_is_refused_before_training() {
        let model = model_bytes();
        let p = secure_plan(&model, 3);
        let mut m = Machine::new(Config::default(), Some((p.model.id, model.clone())), None);
        up(&mut m);
        let out = m.handle(Input::Message(CoordinatorMessage::Plan(p)));
        assert!(!out.iter().any(|o| matches!(o, Output::Train { .. })));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::Refused(w) if w.contains("certificate key"))),
            "{out:?}"
        );
    }
}
