//! The runner against a real SQLite store: uploads, refusals, closes, and
//! restarts in between.

use fleet_aggregation::codec::Codec;
use fleet_protocol::message::ObjectRef;
use fleet_protocol::task::TaskSpec;
use rand::SeedableRng;

use super::*;
use crate::testing::{TempDir, small_spec};

/// Target 2 from a cohort of 3, both needed.
fn spec() -> TaskSpec {
    small_spec(2, 3, 2)
}

struct Fixture {
    _dir: TempDir,
    store: Store,
    metrics: Metrics,
    log: Vec<Outcome>,
    task: u64,
}

impl Fixture {
    fn new(name: &str) -> Self {
        Self::with(name, &spec())
    }

    /// A store in a fresh directory holding task `s`, running.
    fn with(name: &str, s: &TaskSpec) -> Self {
        let dir = TempDir::new(name);
        let mut store = Store::open(dir.path()).unwrap();
        let task = Runner::create(&mut store, s).unwrap();
        store
            .set_task_state(task, TaskState::Running, None)
            .unwrap();
        Self {
            _dir: dir,
            store,
            metrics: Metrics::default(),
            log: Vec::new(),
            task,
        }
    }

    fn load(&mut self) -> Runner {
        let row = self.store.task(self.task).unwrap().unwrap();
        Runner::load(&mut self.store, &row, 0).unwrap()
    }

    fn io(&mut self) -> Io<'_> {
        Io {
            store: &mut self.store,
            metrics: &mut self.metrics,
            now: 0,
            log: &mut self.log,
        }
    }

    /// Announces and sends `values` as `device`'s update for `round`.
    fn upload(
        &mut self,
        r: &mut Runner,
        device: u64,
        round: u64,
        values: &[f32],
    ) -> CoordinatorMessage {
        let bytes = Codec::F32
            .encode(values, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
            .unwrap();
        let object = ObjectRef {
            id: ObjectId::of(&bytes),
            size: bytes.len() as u64,
        };
        let meta = UpdateMeta {
            task: self.task,
            round,
            fingerprint: spec().model.layout().fingerprint(),
            object,
            examples: r.core().spec().dp.is_none().then_some(10),
            train_loss: r.core().spec().dp.is_none().then_some(0.5),
        };
        let progress = r
            .begin_upload(&self.store, &mut self.metrics, device, meta)
            .unwrap();
        if !matches!(progress, CoordinatorMessage::UploadProgress { .. }) {
            return progress;
        }
        r.upload_chunk(self.io(), device, object.id, 0, &bytes)
            .unwrap()
    }
}

fn is_error(m: &CoordinatorMessage, code: ErrorCode) -> bool {
    matches!(m, CoordinatorMessage::Error(e) if e.code == code)
}

/// An update the strategy's norm bound refuses used to be accepted by the
/// engine and committed to the store before the aggregator refused it: with
/// the target met by it, the round's close was lost, and on restart the
/// stored update failed the load. Now it is refused before anything
/// changes (the device gives up on it: it counts as dropping out), and the
/// round, the store and a restart all agree.
#[test]
fn a_refused_update_loses_no_close_and_survives_a_restart() {
    let mut f = Fixture::new("lost-close");
    let mut r = f.load();
    // Target 2 from a cohort of 3.
    for device in [1, 2, 3] {
        let reply = r.check_in(f.io(), device).unwrap();
        assert!(matches!(reply, CoordinatorMessage::Plan(_)), "{reply:?}");
    }
    let reply = f.upload(&mut r, 1, 1, &[0.1; 10]);
    assert!(
        matches!(reply, CoordinatorMessage::UploadAccepted { .. }),
        "{reply:?}"
    );
    // Device 2's update is over the norm bound: refused, nothing stored.
    let reply = f.upload(&mut r, 2, 1, &[0.9; 10]);
    assert!(is_error(&reply, ErrorCode::UpdateRejected), "{reply:?}");
    assert_eq!(f.metrics.rejected.get("norm"), Some(&1));
    assert_eq!(f.store.updates(f.task, 1).unwrap().len(), 1);
    assert_eq!(r.round(), 1);

    // Restart mid-round: the stored update loads, the round goes on.
    drop(r);
    let mut r = f.load();
    assert_eq!(r.round(), 1);
    assert_eq!(r.core().participants(), &[1]);
    // Device 1's update is acknowledged again, not counted twice.
    let reply = f.upload(&mut r, 1, 1, &[0.1; 10]);
    assert!(
        matches!(reply, CoordinatorMessage::UploadAccepted { .. }),
        "{reply:?}"
    );
    let reply = f.upload(&mut r, 3, 1, &[0.3; 10]);
    assert!(
        matches!(reply, CoordinatorMessage::UploadAccepted { .. }),
        "{reply:?}"
    );
    assert_eq!(r.round(), 2, "the second report closes round 1");
    assert!(
        f.log.iter().any(|o| matches!(
            o,
            Outcome::Closed {
                round: 1,
                reports: 2,
                ..
            }
        )),
        "{:?}",
        f.log
    );
    let rounds = f.store.rounds(f.task).unwrap();
    assert_eq!(rounds.len(), 1);
    assert!(f.store.updates(f.task, 1).unwrap().is_empty());

    // Restart after the close: round 2, the new model, nothing pending.
    let (model, _) = r.model();
    drop(r);
    let r = f.load();
    assert_eq!(r.round(), 2);
    assert_eq!(r.model().0, model);
    // FedAvg, equal weights, server learning rate 1: the initial model
    // plus the mean of the two accepted deltas (0.1 and 0.3).
    let initial = spec().model.init_params(spec().seed);
    let global = bytes_to_params(&model).unwrap();
    for (v, v0) in global.iter().zip(&initial) {
        assert!((v - v0 - 0.2).abs() < 1e-6, "{v} - {v0}");
    }
}

/// A stored update the aggregator refuses at load (written under other
/// bounds, or damaged) is moved aside and logged; the task still starts.
#[test]
fn a_stored_update_that_cannot_be_aggregated_is_quarantined_at_load() {
    let mut f = Fixture::new("quarantine");
    let mut r = f.load();
    for device in [1, 2, 3] {
        r.check_in(f.io(), device).unwrap();
    }
    f.upload(&mut r, 1, 1, &[0.1; 10]);
    drop(r);
    let bad = Codec::F32
        .encode(&[5.0; 10], &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    let undecodable = vec![1u8, 2, 3];
    for (device, bytes) in [(2, bad), (3, undecodable)] {
        f.store
            .accept_update(
                f.task,
                1,
                &StoredUpdate {
                    device,
                    weight: 10.0,
                    examples: Some(10),
                    train_loss: Some(0.1),
                    bytes,
                },
            )
            .unwrap();
    }
    let r = f.load();
    assert_eq!(r.core().participants(), &[1]);
    let q = f.store.quarantined(f.task).unwrap();
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(
        q.iter()
            .any(|(round, d, why)| *round == 1 && *d == 2 && why.contains("norm"))
    );
    assert!(q.iter().any(|(round, d, _)| *round == 1 && *d == 3));
    let stored: Vec<u64> = f
        .store
        .updates(f.task, 1)
        .unwrap()
        .iter()
        .map(|u| u.device)
        .collect();
    assert_eq!(stored, vec![1]);
}

/// A private task with a budget: the coordinator runs the rounds the budget
/// allows and stops the task, with the reason, before the round that would
/// exceed it, in the store too; nothing beyond the budget is spent.
#[test]
fn a_task_stops_before_the_round_that_would_exceed_its_budget() {
    use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
    let mut s = spec();
    s.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: NoisePlacement::Client,
        expected_cohort: 2,
        adaptive: None,
    });
    // ε after 2 and 3 rounds at this sampling rate and noise: a budget
    // between them allows exactly two rounds.
    let (q, z, delta) = (s.accounting_sampling_rate(), 1.0, 1e-5);
    let mut probe = PrivacyLedger::new(f64::MAX, delta).unwrap();
    probe.record_round(q, z).unwrap();
    probe.record_round(q, z).unwrap();
    let two = probe.spent().unwrap().epsilon;
    probe.record_round(q, z).unwrap();
    let three = probe.spent().unwrap().epsilon;
    assert!(two < three, "{two} {three}");
    let budget = (two + three) / 2.0;
    s.budget = Some(
        fleet_aggregation::privacy::accountant::ledger::PrivacyBudget {
            epsilon: budget,
            delta,
        },
    );
    s.engine.rounds = 5;

    let mut f = Fixture::with("budget-stop", &s);
    let mut r = f.load();
    for round in 1..=2u64 {
        for device in [1, 2, 3] {
            let reply = r.check_in(f.io(), device).unwrap();
            assert!(
                matches!(&reply, CoordinatorMessage::Plan(p) if p.round == round),
                "round {round}, device {device}: {reply:?}"
            );
        }
        for device in [1, 2] {
            let reply = f.upload(&mut r, device, round, &[0.1; 10]);
            assert!(
                matches!(reply, CoordinatorMessage::UploadAccepted { .. }),
                "round {round}, device {device}: {reply:?}"
            );
        }
    }
    // Two rounds closed, then the task ended as stopped, saying why.
    let closed: Vec<u64> = f
        .log
        .iter()
        .filter_map(|o| match o {
            Outcome::Closed { round, .. } => Some(*round),
            _ => None,
        })
        .collect();
    assert_eq!(closed, [1, 2], "{:?}", f.log);
    let note = f
        .log
        .iter()
        .find_map(|o| match o {
            Outcome::Ended(TaskState::Stopped, note) => Some(note.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the task did not stop: {:?}", f.log))
        .expect("a reason");
    assert!(note.contains("stopped before round 3"), "{note}");
    let row = f.store.task(f.task).unwrap().unwrap();
    assert_eq!(row.state, TaskState::Stopped);
    assert_eq!(row.closed, 2);
    // Spent: two rounds' worth, within the budget.
    let ledger: PrivacyLedger = serde_json::from_str(row.ledger.as_deref().unwrap()).unwrap();
    let spent = ledger.spent().unwrap().epsilon;
    assert!((spent - two).abs() <= 1e-9 * two, "{spent} vs {two}");
    assert!(spent <= budget);
    // The core agrees; the server drops a runner whose task ended, and at a
    // restart resumes only the tasks the store says are running.
    assert_eq!(r.core().state(), TaskState::Stopped);
}

/// A device that was not selected in the open round is refused when it
/// announces an update, before any buffer is reserved for it.
#[test]
fn an_unselected_device_cannot_begin_an_upload() {
    let mut f = Fixture::new("unselected-upload");
    let mut r = f.load();
    for device in [1, 2, 3] {
        let reply = r.check_in(f.io(), device).unwrap();
        assert!(matches!(reply, CoordinatorMessage::Plan(_)), "{reply:?}");
    }
    let meta = UpdateMeta {
        task: f.task,
        round: 1,
        fingerprint: spec().model.layout().fingerprint(),
        object: ObjectRef {
            id: ObjectId::of(b"an update"),
            // As large as any encoding of this model may be.
            size: 8 * spec().model.layout().total as u64,
        },
        examples: Some(10),
        train_loss: Some(0.5),
    };
    let reply = r
        .begin_upload(&f.store, &mut f.metrics, 42, meta.clone())
        .unwrap();
    assert!(is_error(&reply, ErrorCode::NoSuchRound), "{reply:?}");
    assert!(r.uploads.is_empty(), "an upload was registered");
    assert_eq!(f.metrics.rejected.get("not_selected"), Some(&1));
    // A selected device may.
    let reply = r.begin_upload(&f.store, &mut f.metrics, 1, meta).unwrap();
    assert!(
        matches!(
            reply,
            CoordinatorMessage::UploadProgress { received: 0, .. }
        ),
        "{reply:?}"
    );
    assert_eq!(r.uploads.len(), 1);
}

/// A private task's reports keep the device's example count and loss to
/// the device: an announcement carrying them is refused before any upload
/// buffer is reserved, and what is stored has neither. A task without DP
/// needs the count (the report's weight), between 1 and its cap.
#[test]
fn private_reports_carry_no_example_count_or_loss() {
    use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
    let meta = |task, examples: Option<u64>, train_loss: Option<f32>| UpdateMeta {
        task,
        round: 1,
        fingerprint: spec().model.layout().fingerprint(),
        object: ObjectRef {
            id: ObjectId::of(b"an update"),
            size: 8 * spec().model.layout().total as u64,
        },
        examples,
        train_loss,
    };
    // Without DP: the count is required.
    let mut f = Fixture::new("meta-plain");
    let mut r = f.load();
    r.check_in(f.io(), 1).unwrap();
    let reply = r
        .begin_upload(&f.store, &mut f.metrics, 1, meta(f.task, None, Some(0.5)))
        .unwrap();
    assert!(is_error(&reply, ErrorCode::UpdateRejected), "{reply:?}");
    assert!(r.uploads.is_empty());
    // A weight a device chooses is capped: u64::MAX examples would make its
    // update the whole mean.
    let max = spec().max_examples;
    for (n, why) in [
        (u64::MAX, "more than the task's max_examples"),
        (max + 1, "more than the task's max_examples"),
        (0, "at least one example"),
    ] {
        let reply = r
            .begin_upload(
                &f.store,
                &mut f.metrics,
                1,
                meta(f.task, Some(n), Some(0.5)),
            )
            .unwrap();
        let CoordinatorMessage::Error(e) = &reply else {
            panic!("{n} examples accepted: {reply:?}")
        };
        assert_eq!(e.code, ErrorCode::UpdateRejected);
        assert!(e.message.contains(why), "{n}: {}", e.message);
    }
    assert!(r.uploads.is_empty());
    let reply = r
        .begin_upload(
            &f.store,
            &mut f.metrics,
            1,
            meta(f.task, Some(max), Some(0.5)),
        )
        .unwrap();
    assert!(
        matches!(reply, CoordinatorMessage::UploadProgress { .. }),
        "{reply:?}"
    );

    let mut s = spec();
    s.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: NoisePlacement::Server,
        expected_cohort: 2,
        adaptive: None,
    });
    let mut f = Fixture::with("meta-private", &s);
    let mut r = f.load();
    for device in [1, 2, 3] {
        r.check_in(f.io(), device).unwrap();
    }
    for (examples, loss) in [(Some(10), None), (None, Some(0.5)), (Some(10), Some(0.5))] {
        let reply = r
            .begin_upload(&f.store, &mut f.metrics, 1, meta(f.task, examples, loss))
            .unwrap();
        let CoordinatorMessage::Error(e) = &reply else {
            panic!("{examples:?} {loss:?} accepted: {reply:?}")
        };
        assert_eq!(e.code, ErrorCode::UpdateRejected);
        assert!(e.message.contains("must not carry"), "{}", e.message);
    }
    assert!(r.uploads.is_empty());
    assert_eq!(f.metrics.rejected.get("meta"), Some(&3));
    // Without them it goes through, and the store keeps neither.
    let reply = f.upload(&mut r, 1, 1, &[0.1; 10]);
    assert!(
        matches!(reply, CoordinatorMessage::UploadAccepted { .. }),
        "{reply:?}"
    );
    let stored = f.store.updates(f.task, 1).unwrap();
    assert_eq!((stored[0].examples, stored[0].train_loss), (None, None));
}

/// Centred clipping's history (the last round's delta and radius) is
/// stored with the round's close: a coordinator restarted after it resumes
/// the next round with the same history, not with none.
#[test]
fn centred_clipping_resumes_with_the_stored_history() {
    let mut s = spec();
    s.strategy.max_norm = None;
    s.strategy.bound = Some(fleet_aggregation::RelativeBound {
        warmup: 1,
        ..fleet_aggregation::RelativeBound::DEFAULT
    });
    s.strategy.centred = Some(fleet_aggregation::CentredClip::DEFAULT);
    let mut f = Fixture::with("centred-history", &s);
    let mut r = f.load();
    assert!(r.core().history().is_none(), "no history before a close");
    for device in [1, 2, 3] {
        r.check_in(f.io(), device).unwrap();
    }
    f.upload(&mut r, 1, 1, &[0.1; 10]);
    f.upload(&mut r, 2, 1, &[0.3; 10]);
    assert_eq!(r.round(), 2);
    let before = r
        .core()
        .history()
        .cloned()
        .expect("a history after a close");
    assert!(before.radius > 0.0, "{before:?}");
    drop(r);
    let r = f.load();
    assert_eq!(r.core().history(), Some(&before));
}

mod secure {
    //! A secure round through the runner: advertisements as reports, the
    //! outbox and polls, the masked input in chunks, and the bounds on
    //! what a device may send.

    use fleet_protocol::task::SecureAggregation;
    use fleet_secagg::pki::{SimPki, SimSigner};
    use fleet_secagg::{Device, DeviceMessage, ServerMessage};
    use rand_chacha::ChaCha20Rng;

    use super::*;

    /// Three devices, all needed, threshold 2 of 2 neighbours.
    fn secure_spec() -> TaskSpec {
        TaskSpec {
            secure_aggregation: Some(SecureAggregation {
                threshold: 2,
                degree: 2,
                stage_timeout_ms: 10_000,
                clip_norm: Some(1.0),
            }),
            ..small_spec(3, 3, 3)
        }
    }

    fn secure(
        f: &mut Fixture,
        r: &mut Runner,
        device: u64,
        message: Option<DeviceMessage>,
    ) -> CoordinatorMessage {
        let (task, round) = (f.task, r.round());
        r.secure(f.io(), device, task, round, message).unwrap()
    }

    fn chunk(
        f: &mut Fixture,
        r: &mut Runner,
        device: u64,
        offset: u64,
        data: &[u8],
    ) -> CoordinatorMessage {
        let (task, round) = (f.task, r.round());
        r.secure_chunk(f.io(), device, task, round, offset, data)
            .unwrap()
    }

    fn code_of(reply: &CoordinatorMessage) -> Option<ErrorCode> {
        match reply {
            CoordinatorMessage::Error(e) => Some(e.code),
            _ => None,
        }
    }

    #[test]
    fn a_secure_round_closes_with_the_mean_of_the_hidden_updates() {
        let mut f = Fixture::with("runner-secure", &secure_spec());
        let mut r = f.load();
        let before = r.core().global().to_vec();
        let mut plans = Vec::new();
        for d in 1..=3 {
            let reply = r.check_in(f.io(), d).unwrap();
            let CoordinatorMessage::Plan(p) = reply else {
                panic!("{reply:?}")
            };
            plans.push(*p.secure.expect("a secure plan"));
        }
        let plan = plans[0];
        let length = plan.context.params.length as usize;

        // A plain upload is refused in a secure task.
        let reply = f.upload(&mut r, 1, 1, &[0.1; 10]);
        assert_eq!(
            code_of(&reply),
            Some(ErrorCode::UpdateRejected),
            "{reply:?}"
        );
        // A poll before advertising: not in the exchange.
        let reply = secure(&mut f, &mut r, 1, None);
        assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");

        // Every device's update is the same small vector.
        let update: Vec<f32> = (0..10).map(|i| 0.02 * i as f32 - 0.09).collect();
        let mut devices = std::collections::BTreeMap::new();
        let mut inbox = std::collections::BTreeMap::new();
        for d in 1..=3u64 {
            let mut rng = ChaCha20Rng::seed_from_u64(d);
            let input = plan.quantiser.encode(&update, &mut rng).unwrap();
            let (dev, ad) = Device::new(d, plan.context, &SimSigner::new(9, d), &mut rng).unwrap();
            let reply = secure(&mut f, &mut r, d, Some(ad));
            let CoordinatorMessage::Secure { message, after_ms } = reply else {
                panic!("{reply:?}")
            };
            if d < 3 {
                assert_eq!(
                    (message.is_none(), after_ms),
                    (true, SECURE_POLL_REPORTING_MS)
                );
            } else {
                // The last report closes the reporting: its answer carries
                // the neighbours at once.
                assert!(matches!(message, Some(ServerMessage::Neighbours(_))));
                inbox.insert(d, message.unwrap());
            }
            devices.insert(d, (dev, rng, Some(input)));
        }
        assert_eq!(f.metrics.updates_accepted, 3);
        // A second advertisement is refused (a replay).
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (_, again) = Device::new(1, plan.context, &SimSigner::new(9, 1), &mut rng).unwrap();
        let reply = secure(&mut f, &mut r, 1, Some(again));
        assert!(code_of(&reply).is_some(), "{reply:?}");

        for _ in 0..20 {
            for d in 1..=3u64 {
                let message = match inbox.remove(&d) {
                    Some(m) => m,
                    None => match secure(&mut f, &mut r, d, None) {
                        CoordinatorMessage::Secure {
                            message: Some(m), ..
                        } => m,
                        CoordinatorMessage::Secure { message: None, .. } => continue,
                        other => panic!("device {d}: {other:?}"),
                    },
                };
                let (dev, rng, input) = devices.get_mut(&d).unwrap();
                let answer = match message {
                    ServerMessage::Neighbours(ads) => dev.share(&ads, &SimPki::new(9), rng),
                    ServerMessage::Shares(s) => dev.mask(&s, input.take().unwrap()),
                    ServerMessage::Unmask { survivors, dropped } => {
                        dev.reveal(&survivors, &dropped)
                    }
                }
                .unwrap();
                let reply = match answer {
                    DeviceMessage::Masked(words) => {
                        let bytes: Vec<u8> = words.0.iter().flat_map(|w| w.to_le_bytes()).collect();
                        assert_eq!(bytes.len(), 4 * length);
                        // A masked input must go in chunks, in order.
                        let whole = secure(&mut f, &mut r, d, Some(DeviceMessage::Masked(words)));
                        assert_eq!(code_of(&whole), Some(ErrorCode::Malformed));
                        let refused = chunk(&mut f, &mut r, d, 8, &bytes[8..16]);
                        assert_eq!(code_of(&refused), Some(ErrorCode::Malformed));
                        let first = chunk(&mut f, &mut r, d, 0, &bytes[..8]);
                        assert!(matches!(first, CoordinatorMessage::Secure { .. }));
                        // More than the input holds.
                        let over = chunk(&mut f, &mut r, d, 8, &vec![0; 4 * length]);
                        assert_eq!(code_of(&over), Some(ErrorCode::Malformed));
                        // The input starts over, whole this time.
                        chunk(&mut f, &mut r, d, 0, &bytes)
                    }
                    m => secure(&mut f, &mut r, d, Some(m)),
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
            if r.round() == 2 {
                break;
            }
        }
        assert_eq!(r.round(), 2, "the round closed: {:?}", f.log);
        assert!(
            matches!(
                f.log.last(),
                Some(Outcome::Closed {
                    round: 1,
                    reports: 3,
                    ..
                })
            ),
            "{:?}",
            f.log
        );
        for ((after, before), u) in r.core().global().iter().zip(&before).zip(&update) {
            assert!(
                (after - before - u).abs() < 1e-3,
                "moved by {}, the mean update is {u}",
                after - before
            );
        }
        let rounds = f.store.rounds(f.task).unwrap();
        assert_eq!(rounds[0].participants, [1, 2, 3]);
        // The exchange is over: a poll is refused.
        let reply = secure(&mut f, &mut r, 1, None);
        assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");
    }

    #[test]
    fn a_restart_mid_exchange_refuses_its_devices_and_the_round_runs_again() {
        let mut f = Fixture::with("runner-secure-restart", &secure_spec());
        let mut r = f.load();
        let mut plan = None;
        for d in 1..=3 {
            let CoordinatorMessage::Plan(p) = r.check_in(f.io(), d).unwrap() else {
                panic!("no plan")
            };
            plan = p.secure.map(|s| *s);
        }
        let plan = plan.unwrap();
        // All three advertise (fresh keys from `seed`): the exchange starts.
        let advertise_all = |f: &mut Fixture, r: &mut Runner, seed: u64| {
            for d in 1..=3 {
                let mut rng = ChaCha20Rng::seed_from_u64(seed + d);
                let (_, ad) =
                    Device::new(d, plan.context, &SimSigner::new(9, d), &mut rng).unwrap();
                let reply = secure(f, r, d, Some(ad));
                assert!(
                    matches!(reply, CoordinatorMessage::Secure { .. }),
                    "{reply:?}"
                );
            }
            assert_eq!(
                r.core().secure_stage(),
                Some(fleet_secagg::server::Stage::Share)
            );
        };
        advertise_all(&mut f, &mut r, 0);

        // The coordinator restarts: the exchange was in memory only.
        drop(r);
        let mut r = f.load();
        assert_eq!(r.round(), 1, "the round is still open");
        assert_eq!(r.core().secure_stage(), None);
        for d in 1..=3 {
            let reply = secure(&mut f, &mut r, d, None);
            assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");
        }
        // Nothing was stored for the advertisements: the devices report
        // again and the round's exchange starts over.
        advertise_all(&mut f, &mut r, 10);
        assert!(f.store.updates(f.task, 1).unwrap().is_empty());
    }

    #[test]
    fn chunks_are_bounded_and_only_awaited_devices_may_send_them() {
        let mut f = Fixture::with("runner-secure-chunks", &secure_spec());
        let mut r = f.load();
        let reply = r.check_in(f.io(), 1).unwrap();
        assert!(matches!(reply, CoordinatorMessage::Plan(_)));
        // Nobody is at the masked-input stage: no buffer is reserved.
        let reply = chunk(&mut f, &mut r, 1, 0, &[0; 64]);
        assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");
        assert!(r.secure.masked.is_empty());
        // An oversized chunk is refused before anything else.
        let reply = chunk(&mut f, &mut r, 1, 0, &vec![0; CHUNK_SIZE + 1]);
        assert_eq!(code_of(&reply), Some(ErrorCode::TooLarge), "{reply:?}");
        // Another task, another round.
        let round = r.round();
        let reply = r.secure_chunk(f.io(), 1, 99, round, 0, &[0; 4]).unwrap();
        assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");
        let task = f.task;
        let reply = r.secure(f.io(), 1, task, round + 5, None).unwrap();
        assert_eq!(code_of(&reply), Some(ErrorCode::NoSuchRound), "{reply:?}");
    }
}
