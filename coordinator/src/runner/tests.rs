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
