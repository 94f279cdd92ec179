//! The store against real files in a temporary directory: objects,
//! enrollment, tasks, the open round, deployments, artifacts, and reopening.

use fleet_aggregation::StrategyConfig;
use fleet_aggregation::codec::Codec;
use fleet_models::{ModelSpec, TrainConfig};
use fleet_protocol::task::EngineConfig;

use super::*;

/// A scratch directory holding a store: SQLite in the directory, or
/// PostgreSQL in a fresh schema (the directory then stays empty).
struct TempDir(crate::testing::TempDir, Option<String>);

impl TempDir {
    /// An SQLite store.
    fn new(name: &str) -> Self {
        Self(crate::testing::TempDir::new(&format!("store-{name}")), None)
    }

    /// A PostgreSQL store, when a server is named ([`scratch::schema`]).
    fn postgres(name: &str) -> Option<Self> {
        let url = scratch::schema(name)?;
        Some(Self(
            crate::testing::TempDir::new(&format!("store-pg-{name}")),
            Some(url),
        ))
    }

    fn open(&self) -> Store {
        match &self.1 {
            Some(url) => Store::connect(url).unwrap(),
            None => Store::open(self.0.path()).unwrap(),
        }
    }

    fn object_file(&self, id: &ObjectId) -> PathBuf {
        self.0.path().join("objects").join(id.to_string())
    }
}

/// Runs `test` on a fresh SQLite store and, when a PostgreSQL server is
/// named, on a fresh PostgreSQL one: every behaviour the coordinator relies
/// on holds on both engines.
fn on_both(name: &str, test: impl Fn(&TempDir)) {
    test(&TempDir::new(name));
    if let Some(pg) = TempDir::postgres(name) {
        test(&pg);
    }
}

/// The SQLite connection under a store (SQLite-only checks).
fn sqlite(store: &Store) -> std::cell::RefMut<'_, rusqlite::Connection> {
    std::cell::RefMut::map(store.db(), |db| match db {
        Db::Sqlite(c) => c,
        Db::Postgres { .. } => panic!("an SQLite check on a PostgreSQL store"),
    })
}

fn spec(name: &str) -> TaskSpec {
    TaskSpec {
        name: name.into(),
        model: ModelSpec::LogReg {
            inputs: 4,
            classes: 2,
        },
        train: TrainConfig::default(),
        strategy: StrategyConfig::fedavg(),
        codec: Codec::F32,
        dp: None,
        budget: None,
        population: 100,
        engine: EngineConfig::default(),
        seed: 7,
        variant: Variant::Float,
        max_examples: fleet_protocol::task::DEFAULT_MAX_EXAMPLES,
        secure_aggregation: None,
    }
}

/// Signs nothing: the certificate and serial just name the device.
fn issue(id: u64) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    Ok((format!("cert-{id}").into_bytes(), vec![0xAA, id as u8]))
}

/// An `issue` that must not be reached.
/// A requested key that no stored certificate certifies.
fn no_key(_: &[u8]) -> bool {
    false
}

/// Device id and certificate of an enrollment.
fn pair(e: Enrollment) -> (u64, Vec<u8>) {
    (e.device, e.certificate)
}

fn never_issue(_: u64) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    panic!("issue called for a token that should be refused")
}

fn update(device: u64, bytes: &[u8]) -> StoredUpdate {
    StoredUpdate {
        device,
        weight: 2.5 * device as f64,
        examples: Some(10 * device),
        train_loss: Some(0.125 * device as f32),
        bytes: bytes.to_vec(),
    }
}

/// What the store says of device `id` presenting the certificate `issue`
/// made for it.
fn status(store: &Store, id: u64) -> DeviceStatus {
    store.device_status(id, &[0xAA, id as u8]).unwrap()
}

fn devices_of(updates: &[StoredUpdate]) -> Vec<u64> {
    updates.iter().map(|u| u.device).collect()
}

fn object_ref(bytes: &[u8]) -> ObjectRef {
    ObjectRef {
        id: ObjectId::of(bytes),
        size: bytes.len() as u64,
    }
}

// ----- opening -----

#[test]
fn open_creates_the_database_and_object_directory_in_wal_mode() {
    let dir = TempDir::new("open");
    let store = dir.open();
    assert!(dir.0.path().join("coordinator.db").is_file());
    assert!(dir.0.path().join("objects").is_dir());
    let mode: String = sqlite(&store)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert!(store.tasks().unwrap().is_empty());
    assert_eq!(store.deployment().unwrap(), None);
    drop(store);
    // Opening again over an existing schema works.
    let store = dir.open();
    assert!(store.tasks().unwrap().is_empty());
}

// ----- objects -----

#[test]
fn objects_round_trip_under_their_sha256() {
    let dir = TempDir::new("objects");
    let store = dir.open();
    let bytes = b"hello, fleet".to_vec();
    let id = store.put_object(&bytes).unwrap();
    // SHA-256("hello, fleet"), computed independently of ObjectId::of.
    assert_eq!(
        id.to_string(),
        "a725107ce9c269fc8915937ae690f2e74ba42ce043fcb6675a02c08908441bde"
    );
    assert_eq!(id, ObjectId::of(&bytes));
    assert_eq!(std::fs::read(dir.object_file(&id)).unwrap(), bytes);
    assert_eq!(store.get_object(&id).unwrap(), bytes);

    // The same bytes again: the same id, one file, nothing left over.
    assert_eq!(store.put_object(&bytes).unwrap(), id);
    let names: Vec<String> = std::fs::read_dir(dir.0.path().join("objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![id.to_string()]);
    assert_eq!(store.get_object(&id).unwrap(), bytes);

    // The detached object directory writes to the same place.
    let other = store.object_sink().put(b"other").unwrap();
    assert_eq!(other, ObjectId::of(b"other"));
    assert_eq!(store.get_object(&other).unwrap(), b"other");

    // The empty object is an object too.
    let empty = store.put_object(&[]).unwrap();
    assert_eq!(
        empty.to_string(),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(store.get_object(&empty).unwrap(), Vec::<u8>::new());
}

#[test]
fn a_missing_object_is_a_not_found_error() {
    on_both("missing", |dir| {
        let store = dir.open();
        let err = store
            .get_object(&ObjectId::of(b"never written"))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Io(e) if e.kind() == std::io::ErrorKind::NotFound),
            "{err:?}"
        );
    });
}

#[test]
fn a_damaged_object_fails_its_hash_until_written_again() {
    let dir = TempDir::new("damaged");
    let store = dir.open();
    let bytes = vec![1u8, 2, 3, 4, 5, 6, 7, 8];
    let id = store.put_object(&bytes).unwrap();
    // Flip one byte on disk.
    let mut damaged = bytes.clone();
    damaged[3] ^= 0xFF;
    std::fs::write(dir.object_file(&id), &damaged).unwrap();
    let err = store.get_object(&id).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if *m == format!("object {id} fails its hash")),
        "{err:?}"
    );
    // A truncated file is caught the same way.
    std::fs::write(dir.object_file(&id), &bytes[..4]).unwrap();
    assert!(matches!(store.get_object(&id), Err(StoreError::Corrupt(_))));

    // Writing it again repairs it: a present file is kept only if it
    // still hashes to its name.
    assert_eq!(store.put_object(&bytes).unwrap(), id);
    assert_eq!(store.get_object(&id).unwrap(), bytes);
    // Removed, then written again, it is back too.
    store.remove_object(&id).unwrap();
    assert!(!dir.object_file(&id).exists());
    assert_eq!(store.put_object(&bytes).unwrap(), id);
    assert_eq!(store.get_object(&id).unwrap(), bytes);
}

#[test]
fn remove_object_deletes_the_file_and_ignores_a_missing_one() {
    let dir = TempDir::new("remove");
    let store = dir.open();
    let id = store.put_object(b"doomed").unwrap();
    let kept = store.put_object(b"kept").unwrap();
    store.remove_object(&id).unwrap();
    assert!(!dir.object_file(&id).exists());
    assert!(matches!(
        store.get_object(&id),
        Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
    ));
    // Removing it again, or something never written, is fine.
    store.remove_object(&id).unwrap();
    store.remove_object(&ObjectId([9; 32])).unwrap();
    assert_eq!(store.get_object(&kept).unwrap(), b"kept");
}

// ----- tokens and enrollment -----

#[test]
fn a_valid_token_enrolls_one_device_once() {
    on_both("enroll", |dir| {
        let mut store = dir.open();
        let later = unix_secs() + 3600;
        store.create_token("tok-a", "phone a", later).unwrap();
        store.create_token("tok-b", "phone b", later).unwrap();

        // Only the token's hash is kept.
        let stored: Vec<Vec<u8>> = store
            .db()
            .query("SELECT hash FROM tokens ORDER BY label", args![])
            .unwrap()
            .iter()
            .map(|r| r.blob(0).unwrap())
            .collect();
        assert_eq!(
            stored,
            vec![
                ObjectId::of(b"tok-a").0.to_vec(),
                ObjectId::of(b"tok-b").0.to_vec()
            ]
        );

        let (id, cert) = pair(store.enroll("tok-a", no_key, issue).unwrap().unwrap());
        assert_eq!(id, 1);
        assert_eq!(cert, b"cert-1");
        let (id2, cert2) = pair(store.enroll("tok-b", no_key, issue).unwrap().unwrap());
        assert_eq!(id2, 2);
        assert_eq!(cert2, b"cert-2");

        let devices = store.devices(|d| d == 2).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(
            (
                devices[0].id,
                devices[0].label.as_str(),
                devices[0].connected
            ),
            (1, "phone a", false)
        );
        assert_eq!(
            (
                devices[1].id,
                devices[1].label.as_str(),
                devices[1].connected
            ),
            (2, "phone b", true)
        );
        assert_eq!(devices[0].revoked_at, None);
        assert_eq!(devices[0].last_seen, None);
        // Each id admits only the serial issued for it (`issue` above).
        assert_eq!(status(&store, 1), DeviceStatus::Active);
        assert_eq!(status(&store, 2), DeviceStatus::Active);
        assert_eq!(
            store.device_status(2, &[0xAA, 1]).unwrap(),
            DeviceStatus::OtherCertificate
        );
        assert_eq!(status(&store, 3), DeviceStatus::Unknown);

        // A used token is refused, and no device is added.
        assert_eq!(
            store.enroll("tok-a", no_key, never_issue).unwrap(),
            Err("enrollment token already used".to_string())
        );
        assert_eq!(store.devices(|_| false).unwrap().len(), 2);

        // Unless the request is for the key certified then (the first answer
        // was lost): the same device and certificate again, no new device.
        let again = store
            .enroll("tok-a", |cert| cert == b"cert-1", never_issue)
            .unwrap()
            .unwrap();
        assert_eq!(
            again,
            Enrollment {
                device: 1,
                certificate: b"cert-1".to_vec(),
                again: true
            }
        );
        assert_eq!(store.devices(|_| false).unwrap().len(), 2);
        // Not once the device is revoked.
        store.revoke(1).unwrap();
        assert_eq!(
            store.enroll("tok-a", |_| true, never_issue).unwrap(),
            Err("enrollment token already used".to_string())
        );
    });
}

/// A renewal issuing `cert` with serial `[0xBB, n]`.
fn renewal(n: u8) -> impl FnOnce() -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    move || Ok((format!("renewed-{n}").into_bytes(), vec![0xBB, n]))
}

#[test]
fn a_renewal_keeps_the_previous_certificate_until_the_new_one_is_used() {
    on_both("renew", |dir| {
        let mut store = dir.open();
        store.create_token("t", "phone", unix_secs() + 60).unwrap();
        pair(store.enroll("t", no_key, issue).unwrap().unwrap());
        let first = [0xAA, 1];
        let status = |store: &Store, serial: &[u8]| store.device_status(1, serial).unwrap();

        // Renewed on the current certificate: both pass, the new one first
        // used settles it.
        let cert = store.renew(1, &first, renewal(1)).unwrap().unwrap();
        assert_eq!(cert, b"renewed-1");
        assert_eq!(status(&store, &first), DeviceStatus::Previous);
        assert_eq!(status(&store, &[0xBB, 1]), DeviceStatus::Renewed);

        // Its answer lost: asked again on the previous certificate, the unused
        // one is replaced and the previous one kept.
        store.renew(1, &first, renewal(2)).unwrap().unwrap();
        assert_eq!(status(&store, &[0xBB, 1]), DeviceStatus::OtherCertificate);
        assert_eq!(status(&store, &first), DeviceStatus::Previous);
        assert_eq!(status(&store, &[0xBB, 2]), DeviceStatus::Renewed);
        store.settle_renewal(1).unwrap();
        assert_eq!(status(&store, &[0xBB, 2]), DeviceStatus::Active);
        assert_eq!(status(&store, &first), DeviceStatus::OtherCertificate);

        // Neither a stranger's certificate nor a settled previous one may ask.
        for serial in [&first[..], &[0xCC, 9][..]] {
            assert_eq!(
                store.renew(1, serial, renewal(3)).unwrap(),
                Err("this is not the certificate issued for this device".into())
            );
        }
        assert_eq!(
            store.renew(7, &first, renewal(3)).unwrap(),
            Err("unknown device".into())
        );
        // A failed signature changes nothing.
        let refused = store
            .renew(1, &[0xBB, 2], || {
                Err::<(Vec<u8>, Vec<u8>), _>("no".to_string())
            })
            .unwrap();
        assert_eq!(refused, Err("cannot sign the request: no".into()));
        assert_eq!(status(&store, &[0xBB, 2]), DeviceStatus::Active);

        // Revoked during a renewal: both serials are denied, no renewal.
        store.renew(1, &[0xBB, 2], renewal(4)).unwrap().unwrap();
        let mut denied = store.revoke(1).unwrap().unwrap();
        denied.sort();
        assert_eq!(denied, vec![vec![0xBB, 2], vec![0xBB, 4]]);
        let mut listed = store.revoked_serials().unwrap();
        listed.sort();
        assert_eq!(listed, denied);
        assert_eq!(status(&store, &[0xBB, 4]), DeviceStatus::Revoked);
        assert_eq!(
            store.renew(1, &[0xBB, 4], renewal(5)).unwrap(),
            Err("this device is revoked".into())
        );
    });
}

#[test]
fn a_used_token_is_not_redeemed_again_once_expired() {
    on_both("again-expired", |dir| {
        let mut store = dir.open();
        store.create_token("t", "phone", unix_secs() + 60).unwrap();
        pair(store.enroll("t", no_key, issue).unwrap().unwrap());
        store
            .db()
            .execute("UPDATE tokens SET expires_at = ?1", args![unix_secs() - 1])
            .unwrap();
        assert_eq!(
            store.enroll("t", |_| true, never_issue).unwrap(),
            Err("enrollment token expired".to_string())
        );
    });
}

#[test]
fn unknown_and_expired_tokens_are_refused_without_a_device() {
    on_both("refused", |dir| {
        let mut store = dir.open();
        store
            .create_token("old", "stale", unix_secs() - 10)
            .unwrap();
        assert_eq!(
            store.enroll("old", no_key, never_issue).unwrap(),
            Err("enrollment token expired".to_string())
        );
        assert_eq!(
            store
                .enroll("nobody-made-this", no_key, never_issue)
                .unwrap(),
            Err("unknown enrollment token".to_string())
        );
        assert!(store.devices(|_| false).unwrap().is_empty());
        // The same token cannot be created twice (its hash is the key).
        assert!(matches!(
            store.create_token("old", "again", unix_secs() + 60),
            Err(StoreError::Db(_) | StoreError::Postgres(_))
        ));
    });
}

#[test]
fn a_failed_signature_rolls_the_enrollment_back_and_keeps_the_token() {
    on_both("sign-fails", |dir| {
        let mut store = dir.open();
        store
            .create_token("tok", "tablet", unix_secs() + 60)
            .unwrap();
        let mut asked = None;
        let res = store
            .enroll(
                "tok",
                no_key,
                |id| -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
                    asked = Some(id);
                    Err("bad csr".into())
                },
            )
            .unwrap();
        assert_eq!(asked, Some(1));
        assert_eq!(res, Err("cannot sign the request: bad csr".to_string()));
        assert!(store.devices(|_| false).unwrap().is_empty());
        assert_eq!(store.device_status(1, &[]).unwrap(), DeviceStatus::Unknown);
        // The token still works. (PostgreSQL's sequences do not roll
        // back: the id may be the next one there.)
        let (id, cert) = pair(store.enroll("tok", no_key, issue).unwrap().unwrap());
        assert_eq!(cert, format!("cert-{id}").into_bytes());
        assert!(id == 1 || (dir.1.is_some() && id == 2), "device {id}");
        assert_eq!(store.devices(|_| false).unwrap().len(), 1);
    });
}

#[test]
fn revoke_marks_a_device_and_lists_its_serial() {
    on_both("revoke", |dir| {
        let mut store = dir.open();
        for t in ["a", "b", "c"] {
            store.create_token(t, t, unix_secs() + 60).unwrap();
            pair(store.enroll(t, no_key, issue).unwrap().unwrap());
        }
        assert!(store.revoked_serials().unwrap().is_empty());
        assert_eq!(store.revoke(2).unwrap(), Some(vec![vec![0xAA, 2]]));
        assert_eq!(status(&store, 1), DeviceStatus::Active);
        assert_eq!(status(&store, 2), DeviceStatus::Revoked);
        assert_eq!(status(&store, 3), DeviceStatus::Active);
        assert_eq!(store.revoked_serials().unwrap(), vec![vec![0xAA, 2]]);
        let revoked_at = store.devices(|_| false).unwrap()[1].revoked_at;
        assert!(revoked_at.is_some_and(|t| t.abs_diff(unix_secs()) <= 5));

        // Revoking again returns the serial and lists it once.
        assert_eq!(store.revoke(2).unwrap(), Some(vec![vec![0xAA, 2]]));
        assert_eq!(store.revoked_serials().unwrap(), vec![vec![0xAA, 2]]);
        assert_eq!(store.devices(|_| false).unwrap()[1].revoked_at, revoked_at);

        // An unknown device: nothing to revoke, not active.
        assert_eq!(store.revoke(42).unwrap(), None);
        assert_eq!(status(&store, 42), DeviceStatus::Unknown);

        assert_eq!(store.revoke(3).unwrap(), Some(vec![vec![0xAA, 3]]));
        let mut serials = store.revoked_serials().unwrap();
        serials.sort();
        assert_eq!(serials, vec![vec![0xAA, 2], vec![0xAA, 3]]);
    });
}

#[test]
fn touch_device_records_last_seen() {
    on_both("touch", |dir| {
        let mut store = dir.open();
        store.create_token("t", "watch", unix_secs() + 60).unwrap();
        let (id, _) = pair(store.enroll("t", no_key, issue).unwrap().unwrap());
        assert_eq!(store.devices(|_| false).unwrap()[0].last_seen, None);
        store.touch_device(id).unwrap();
        let seen = store.devices(|_| false).unwrap()[0].last_seen;
        assert!(
            seen.is_some_and(|t| t.abs_diff(unix_secs()) <= 5),
            "{seen:?}"
        );
    });
}

// ----- tasks -----

#[test]
fn tasks_are_created_paused_listed_and_updated() {
    on_both("tasks", |dir| {
        let mut store = dir.open();
        let model_a = vec![0u8; 40];
        let model_b = vec![1u8; 24];
        let a = store.create_task(&spec("a"), &model_a).unwrap();
        let b = store.create_task(&spec("b"), &model_b).unwrap();
        assert_eq!((a, b), (1, 2));

        let row = store.task(a).unwrap().unwrap();
        assert_eq!(row.id, a);
        assert_eq!(row.spec, spec("a"));
        assert_eq!(row.state, TaskState::Paused);
        assert_eq!((row.round, row.closed), (1, 0));
        assert_eq!(row.model, ObjectId::of(&model_a));
        assert_eq!(row.server_state, None);
        assert_eq!(row.ledger, None);
        assert_eq!(row.note, None);
        // The initial model is written as an object and recorded as round 0.
        assert_eq!(store.get_object(&row.model).unwrap(), model_a);
        assert_eq!(
            store.model_row(&row.model).unwrap(),
            Some(ModelRow {
                task: a,
                round: 0,
                size: 40
            })
        );
        assert_eq!(store.task(3).unwrap().map(|r| r.id), None);

        let all = store.tasks().unwrap();
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), vec![a, b]);
        assert_eq!(all[1].spec.name, "b");
        assert_eq!(all[1].model, ObjectId::of(&model_b));

        store.set_task_state(a, TaskState::Running, None).unwrap();
        assert_eq!(store.task(a).unwrap().unwrap().state, TaskState::Running);
        store
            .set_task_state(a, TaskState::Stopped, Some("out of budget"))
            .unwrap();
        let row = store.task(a).unwrap().unwrap();
        assert_eq!(row.state, TaskState::Stopped);
        assert_eq!(row.note.as_deref(), Some("out of budget"));
        // The other task is untouched.
        let other = store.task(b).unwrap().unwrap();
        assert_eq!((other.state, other.note), (TaskState::Paused, None));
        // A new state without a note clears the old note.
        store.set_task_state(a, TaskState::Running, None).unwrap();
        let row = store.task(a).unwrap().unwrap();
        assert_eq!((row.state, row.note), (TaskState::Running, None));
        store.set_task_state(b, TaskState::Finished, None).unwrap();

        // Reopened: the same rows.
        drop(store);
        let store = dir.open();
        let all = store.tasks().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].spec, spec("a"));
        assert_eq!(all[0].state, TaskState::Running);
        assert_eq!(all[0].model, ObjectId::of(&model_a));
        assert_eq!(all[1].spec, spec("b"));
        assert_eq!(all[1].state, TaskState::Finished);
        assert_eq!((all[1].round, all[1].closed), (1, 0));
    });
}

// ----- the open round -----

#[test]
fn selections_are_kept_once_per_device_and_round() {
    on_both("select", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("s"), &[0; 8]).unwrap();
        for d in [5, 1, 3, 1] {
            store.select(t, 1, d).unwrap();
        }
        store.select(t, 2, 9).unwrap();
        assert_eq!(store.selected(t, 1).unwrap(), vec![1, 3, 5]);
        assert_eq!(store.selected(t, 2).unwrap(), vec![9]);
        assert!(store.selected(t, 3).unwrap().is_empty());
        assert!(store.selected(t + 1, 1).unwrap().is_empty());
    });
}

#[test]
fn an_update_is_accepted_once_and_replays_are_refused() {
    on_both("accept", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("u"), &[0; 8]).unwrap();
        let first = update(7, b"first report");
        assert!(store.accept_update(t, 1, &first).unwrap());
        // The same device, round and task again (even other bytes): a replay.
        assert!(!store.accept_update(t, 1, &first).unwrap());
        assert!(!store.accept_update(t, 1, &update(7, b"second")).unwrap());
        // Another round or task is a new update.
        assert!(store.accept_update(t, 2, &update(7, b"round two")).unwrap());
        assert!(
            store
                .accept_update(t + 1, 1, &update(7, b"task two"))
                .unwrap()
        );

        assert_eq!(
            store.accepted_object(t, 1, 7).unwrap(),
            Some(ObjectId::of(b"first report"))
        );
        assert_eq!(
            store.accepted_object(t, 2, 7).unwrap(),
            Some(ObjectId::of(b"round two"))
        );
        assert_eq!(store.accepted_object(t, 1, 8).unwrap(), None);
        assert_eq!(store.accepted_object(t, 3, 7).unwrap(), None);

        let stored = store.updates(t, 1).unwrap();
        assert_eq!(stored.len(), 1);
        let u = &stored[0];
        assert_eq!(u.device, 7);
        assert_eq!(u.weight, 17.5);
        assert_eq!(u.examples, Some(70));
        assert_eq!(u.train_loss, Some(0.875));
        assert_eq!(u.bytes, b"first report");
        // Updates live in the database, not the object directory.
        assert!(!dir.object_file(&ObjectId::of(b"first report")).exists());
    });
}

#[test]
fn updates_come_back_in_acceptance_order() {
    on_both("order", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("o"), &[0; 8]).unwrap();
        for d in [9, 3, 5, 1] {
            assert!(
                store
                    .accept_update(t, 1, &update(d, &[d as u8; 3]))
                    .unwrap()
            );
        }
        let stored = store.updates(t, 1).unwrap();
        assert_eq!(devices_of(&stored), vec![9, 3, 5, 1]);
        assert_eq!(stored[1].bytes, vec![3, 3, 3]);
        assert!(store.updates(t, 2).unwrap().is_empty());
    });
}

#[test]
fn close_round_records_the_round_and_moves_the_task_on() {
    on_both("close", |dir| {
        let mut store = dir.open();
        let initial = vec![0u8; 16];
        let t = store.create_task(&spec("c"), &initial).unwrap();
        let other = store.create_task(&spec("other"), &[1; 8]).unwrap();
        store.set_task_state(t, TaskState::Running, None).unwrap();
        for d in [3, 9, 4] {
            store.select(t, 1, d).unwrap();
        }
        store.accept_update(t, 1, &update(9, b"nine")).unwrap();
        store.accept_update(t, 1, &update(3, b"three")).unwrap();
        // Rows of other rounds and tasks stay.
        store.select(t, 2, 4).unwrap();
        store.accept_update(t, 2, &update(4, b"early")).unwrap();
        store.select(other, 1, 3).unwrap();
        store.accept_update(other, 1, &update(3, b"other")).unwrap();

        let model = vec![2u8; 16];
        let id = store.put_object(&model).unwrap();
        let before = unix_millis();
        store
            .close_round(&ClosedRound {
                task: t,
                round: 1,
                model: id,
                model_size: 16,
                closed: 1,
                server_state: vec![1, 2, 3, 4],
                ledger: Some("{\"rounds\":1}".into()),
                clip_norm: None,
                basis: None,
                history: None,
                epsilon: Some(0.5),
                participants: &[9, 3],
                state: TaskState::Running,
                note: None,
                applied: true,
            })
            .unwrap();
        let after = unix_millis();

        assert!(store.updates(t, 1).unwrap().is_empty());
        assert!(store.selected(t, 1).unwrap().is_empty());
        assert_eq!(store.accepted_object(t, 1, 9).unwrap(), None);
        assert_eq!(devices_of(&store.updates(t, 2).unwrap()), vec![4]);
        assert_eq!(store.selected(t, 2).unwrap(), vec![4]);
        assert_eq!(devices_of(&store.updates(other, 1).unwrap()), vec![3]);
        assert_eq!(store.selected(other, 1).unwrap(), vec![3]);

        let row = store.task(t).unwrap().unwrap();
        assert_eq!((row.round, row.closed), (2, 1));
        assert_eq!(row.model, id);
        assert_eq!(row.server_state, Some(vec![1, 2, 3, 4]));
        assert_eq!(row.ledger.as_deref(), Some("{\"rounds\":1}"));
        assert_eq!(row.state, TaskState::Running);
        assert_eq!(row.note, None);
        let untouched = store.task(other).unwrap().unwrap();
        assert_eq!((untouched.round, untouched.closed), (1, 0));

        assert_eq!(
            store.model_row(&id).unwrap(),
            Some(ModelRow {
                task: t,
                round: 1,
                size: 16
            })
        );
        let rounds = store.rounds(t).unwrap();
        assert_eq!(rounds.len(), 1);
        let ended = rounds[0].ended_at.unwrap();
        assert!(
            (before..=after).contains(&ended),
            "{before} {ended} {after}"
        );
        assert_eq!(
            rounds[0],
            RoundInfo {
                task: t,
                round: 1,
                outcome: "closed".into(),
                ended_at: Some(ended),
                participants: vec![9, 3],
                model: Some(id.to_string()),
                epsilon: Some(0.5),
            }
        );
        assert!(store.rounds(other).unwrap().is_empty());

        // The last round: the task finishes with a note.
        let last = store.put_object(&[3u8; 16]).unwrap();
        store
            .close_round(&ClosedRound {
                task: t,
                round: 2,
                model: last,
                model_size: 16,
                closed: 2,
                server_state: vec![5],
                ledger: None,
                clip_norm: Some(0.75),
                basis: Some(fleet_aggregation::Basis {
                    norm: 0.25,
                    weight: 640.0,
                }),
                history: Some(&fleet_aggregation::History {
                    reference: vec![0.5, -1.25, 3.0e-7],
                    radius: 0.125,
                }),
                epsilon: None,
                participants: &[4],
                state: TaskState::Stopped,
                note: Some("over the budget"),
                applied: false,
            })
            .unwrap();
        let row = store.task(t).unwrap().unwrap();
        assert_eq!((row.round, row.closed, row.model), (3, 2, last));
        assert_eq!(row.state, TaskState::Stopped);
        assert_eq!(row.note.as_deref(), Some("over the budget"));
        assert_eq!((row.server_state, row.ledger), (Some(vec![5]), None));
        assert_eq!(row.clip_norm, Some(0.75));
        assert_eq!(
            row.basis,
            Some(fleet_aggregation::Basis {
                norm: 0.25,
                weight: 640.0
            })
        );
        // The history comes back bit for bit.
        let history = row.history.expect("a stored history");
        assert_eq!(history.reference, vec![0.5, -1.25, 3.0e-7]);
        assert_eq!(history.radius, 0.125);
        let rounds = store.rounds(t).unwrap();
        assert_eq!(
            rounds
                .iter()
                .map(|r| (
                    r.round,
                    r.outcome.as_str(),
                    r.participants.clone(),
                    r.epsilon
                ))
                .collect::<Vec<_>>(),
            vec![
                (1, "closed", vec![9, 3], Some(0.5)),
                (2, "discarded: over the budget", vec![4], None)
            ]
        );
        assert!(store.updates(t, 2).unwrap().is_empty());
    });
}

#[test]
fn abandon_round_records_the_attempt_and_keeps_the_round_number() {
    on_both("abandon", |dir| {
        let mut store = dir.open();
        let initial = vec![0u8; 8];
        let t = store.create_task(&spec("a"), &initial).unwrap();
        for d in [2, 4, 6] {
            store.select(t, 1, d).unwrap();
        }
        store.accept_update(t, 1, &update(4, b"four")).unwrap();
        store.accept_update(t, 1, &update(2, b"two")).unwrap();
        store.abandon_round(t, 1, "deadline passed").unwrap();

        assert!(store.updates(t, 1).unwrap().is_empty());
        assert!(store.selected(t, 1).unwrap().is_empty());
        let row = store.task(t).unwrap().unwrap();
        assert_eq!((row.round, row.closed), (1, 0));
        assert_eq!(row.model, ObjectId::of(&initial));
        let rounds = store.rounds(t).unwrap();
        assert_eq!(rounds.len(), 1);
        assert_eq!(
            rounds[0],
            RoundInfo {
                task: t,
                round: 1,
                outcome: "abandoned: deadline passed".into(),
                ended_at: rounds[0].ended_at,
                participants: vec![4, 2],
                model: None,
                epsilon: None,
            }
        );
        assert!(rounds[0].ended_at.is_some());

        // The same round can be abandoned again (a new attempt, no updates),
        // and then closed: three attempts of round 1, in order.
        store.abandon_round(t, 1, "quorum").unwrap();
        store.accept_update(t, 1, &update(6, b"six")).unwrap();
        let id = store.put_object(b"model").unwrap();
        store
            .close_round(&ClosedRound {
                task: t,
                round: 1,
                model: id,
                model_size: 5,
                closed: 1,
                server_state: Vec::new(),
                ledger: None,
                clip_norm: None,
                basis: None,
                history: None,
                epsilon: None,
                participants: &[6],
                state: TaskState::Running,
                note: None,
                applied: true,
            })
            .unwrap();
        let attempts: Vec<i64> = store
            .db()
            .query(
                "SELECT attempt FROM rounds WHERE task = ?1 AND round = 1 ORDER BY attempt",
                args![t],
            )
            .unwrap()
            .iter()
            .map(|r| r.int(0).unwrap())
            .collect();
        assert_eq!(attempts, vec![1, 2, 3]);
        let rounds = store.rounds(t).unwrap();
        assert_eq!(
            rounds
                .iter()
                .map(|r| (r.round, r.outcome.as_str(), r.participants.clone()))
                .collect::<Vec<_>>(),
            vec![
                (1, "abandoned: deadline passed", vec![4, 2]),
                (1, "abandoned: quorum", vec![]),
                (1, "closed", vec![6]),
            ]
        );
        assert_eq!(store.task(t).unwrap().unwrap().round, 2);
    });
}

#[test]
fn quarantine_moves_one_update_aside() {
    on_both("quarantine", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("q"), &[0; 8]).unwrap();
        for d in [1, 2, 3] {
            store.accept_update(t, 1, &update(d, &[d as u8])).unwrap();
        }
        store.quarantine_update(t, 1, 2, "norm too large").unwrap();
        assert_eq!(devices_of(&store.updates(t, 1).unwrap()), vec![1, 3]);
        assert_eq!(store.accepted_object(t, 1, 2).unwrap(), None);
        assert_eq!(
            store.quarantined(t).unwrap(),
            vec![(1, 2, "norm too large".to_string())]
        );
        // The quarantined row keeps what was stored.
        let row = store
            .db()
            .query_one(
                "SELECT object, weight, examples, bytes FROM quarantine WHERE task = ?1",
                args![t],
            )
            .unwrap();
        let (object, weight, examples, bytes) = (
            row.blob(0).unwrap(),
            row.real(1).unwrap(),
            row.int(2).unwrap(),
            row.blob(3).unwrap(),
        );
        assert_eq!(object, ObjectId::of(&[2]).0.to_vec());
        assert_eq!((weight, examples, bytes), (5.0, 20, vec![2]));

        // Nothing to move: nothing happens.
        store.quarantine_update(t, 1, 42, "absent").unwrap();
        store.quarantine_update(t, 2, 1, "other round").unwrap();
        assert_eq!(store.quarantined(t).unwrap().len(), 1);
        assert_eq!(devices_of(&store.updates(t, 1).unwrap()), vec![1, 3]);

        store.quarantine_update(t, 1, 3, "undecodable").unwrap();
        assert_eq!(
            store.quarantined(t).unwrap(),
            vec![
                (1, 2, "norm too large".to_string()),
                (1, 3, "undecodable".to_string())
            ]
        );
        assert_eq!(devices_of(&store.updates(t, 1).unwrap()), vec![1]);
        assert!(store.quarantined(t + 1).unwrap().is_empty());
    });
}

// ----- deployments and artifacts -----

#[test]
fn deployments_are_versioned_and_remember_the_previous_model() {
    on_both("deploy", |dir| {
        let store = dir.open();
        let a = ObjectId::of(b"model a");
        let b = ObjectId::of(b"model b");
        assert_eq!(store.deployment().unwrap(), None);
        assert_eq!(store.previous_deployment().unwrap(), None);

        assert_eq!(store.deploy(&a).unwrap(), 1);
        assert_eq!(store.deployment().unwrap(), Some((1, a)));
        assert_eq!(store.previous_deployment().unwrap(), None);

        assert_eq!(store.deploy(&b).unwrap(), 2);
        assert_eq!(store.deployment().unwrap(), Some((2, b)));
        assert_eq!(store.previous_deployment().unwrap(), Some(a));

        // A rollback is a new deployment of the earlier model.
        assert_eq!(store.deploy(&a).unwrap(), 3);
        assert_eq!(store.deployment().unwrap(), Some((3, a)));
        assert_eq!(store.previous_deployment().unwrap(), Some(b));
    });
}

#[test]
fn artifacts_are_recorded_replaced_and_forgotten() {
    on_both("artifacts", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("art"), &[0u8; 12]).unwrap();
        let m0 = store.task(t).unwrap().unwrap().model;
        let m1 = store.put_object(&[1u8; 12]).unwrap();
        store
            .close_round(&ClosedRound {
                task: t,
                round: 1,
                model: m1,
                model_size: 12,
                closed: 1,
                server_state: Vec::new(),
                ledger: None,
                clip_norm: None,
                basis: None,
                history: None,
                epsilon: None,
                participants: &[],
                state: TaskState::Running,
                note: None,
                applied: true,
            })
            .unwrap();
        // Newest first (same second: the higher round first).
        assert_eq!(store.models_without_artifacts().unwrap(), vec![m1, m0]);
        assert!(store.artifacts(&m0).unwrap().is_empty());

        let int8 = store.put_object(b"onnx int8").unwrap();
        store
            .put_artifacts(
                &m0,
                &[
                    (Variant::Int8, Ok(object_ref(b"onnx int8"))),
                    (Variant::Float, Err("export failed: op".into())),
                ],
            )
            .unwrap();
        // Float first; an error row is a recorded artifact.
        assert_eq!(
            store.artifacts(&m0).unwrap(),
            vec![
                ArtifactRow {
                    variant: Variant::Float,
                    built: Err("export failed: op".into()),
                },
                ArtifactRow {
                    variant: Variant::Int8,
                    built: Ok(ObjectRef { id: int8, size: 9 }),
                },
            ]
        );
        assert_eq!(store.models_without_artifacts().unwrap(), vec![m1]);
        assert_eq!(store.artifact_model(&int8).unwrap(), Some(m0));
        assert_eq!(store.artifact_model(&m0).unwrap(), None);
        assert_eq!(store.artifact_model(&ObjectId::of(b"nope")).unwrap(), None);

        // One variant of m1: still lacking the other.
        let f1 = store.put_object(b"onnx float m1").unwrap();
        store
            .put_artifacts(&m1, &[(Variant::Float, Ok(object_ref(b"onnx float m1")))])
            .unwrap();
        assert_eq!(store.models_without_artifacts().unwrap(), vec![m1]);
        assert_eq!(store.artifact_model(&f1).unwrap(), Some(m1));

        // A variant recorded again replaces the earlier row.
        let float = store.put_object(b"onnx float").unwrap();
        store
            .put_artifacts(&m0, &[(Variant::Float, Ok(object_ref(b"onnx float")))])
            .unwrap();
        assert_eq!(
            store.artifacts(&m0).unwrap(),
            vec![
                ArtifactRow {
                    variant: Variant::Float,
                    built: Ok(ObjectRef {
                        id: float,
                        size: 10
                    }),
                },
                ArtifactRow {
                    variant: Variant::Int8,
                    built: Ok(ObjectRef { id: int8, size: 9 }),
                },
            ]
        );

        // models() shows the deployment and the artifacts.
        store.deploy(&m0).unwrap();
        let models = store.models(Some(t)).unwrap();
        assert_eq!(
            models
                .iter()
                .map(|m| (m.id.clone(), m.round, m.deployed, m.artifacts.len()))
                .collect::<Vec<_>>(),
            vec![(m1.to_string(), 1, false, 1), (m0.to_string(), 0, true, 2)]
        );
        assert_eq!(models[1].artifacts[0].variant, "float");
        assert_eq!(models[1].artifacts[1].id, Some(int8.to_string()));
        assert_eq!(models[1].artifacts[1].size, Some(9));
        assert!(store.models(Some(t + 1)).unwrap().is_empty());

        // Forgotten: the model lacks artifacts again; the objects stay.
        store.forget_artifacts(&m0).unwrap();
        assert!(store.artifacts(&m0).unwrap().is_empty());
        assert_eq!(store.artifact_model(&int8).unwrap(), None);
        assert_eq!(store.models_without_artifacts().unwrap(), vec![m1, m0]);
        assert_eq!(store.artifacts(&m1).unwrap().len(), 1);
        assert_eq!(store.get_object(&int8).unwrap(), b"onnx int8");
    });
}

// ----- durability -----

#[test]
fn everything_written_survives_a_reopen() {
    on_both("reopen", |dir| {
        let (t, m0, m1, blob, serial) = {
            let mut store = dir.open();
            store
                .create_token("used", "dev", unix_secs() + 600)
                .unwrap();
            store
                .create_token("spare", "dev2", unix_secs() + 600)
                .unwrap();
            let (dev, _) = pair(store.enroll("used", no_key, issue).unwrap().unwrap());
            store
                .create_token("rev", "dev3", unix_secs() + 600)
                .unwrap();
            let (rev, _) = pair(store.enroll("rev", no_key, issue).unwrap().unwrap());
            let serial = store.revoke(rev).unwrap().unwrap().remove(0);

            let t = store.create_task(&spec("durable"), &[0u8; 8]).unwrap();
            store.set_task_state(t, TaskState::Running, None).unwrap();
            let m0 = store.task(t).unwrap().unwrap().model;
            // Round 1 closes, round 2 is abandoned, round 2 is open again.
            store.accept_update(t, 1, &update(dev, b"r1")).unwrap();
            let m1 = store.put_object(&[7u8; 8]).unwrap();
            store
                .close_round(&ClosedRound {
                    task: t,
                    round: 1,
                    model: m1,
                    model_size: 8,
                    closed: 1,
                    server_state: vec![9, 9],
                    ledger: Some("[]".into()),
                    clip_norm: None,
                    basis: None,
                    history: None,
                    epsilon: Some(1.25),
                    participants: &[dev],
                    state: TaskState::Running,
                    note: None,
                    applied: true,
                })
                .unwrap();
            store.abandon_round(t, 2, "deadline").unwrap();
            store.select(t, 2, dev).unwrap();
            store.select(t, 2, 5).unwrap();
            store.accept_update(t, 2, &update(5, b"five")).unwrap();
            store.accept_update(t, 2, &update(dev, b"dev")).unwrap();
            store.accept_update(t, 2, &update(6, b"six")).unwrap();
            store.quarantine_update(t, 2, 6, "bad").unwrap();
            store.deploy(&m0).unwrap();
            store.deploy(&m1).unwrap();
            store
                .put_artifacts(
                    &m1,
                    &[
                        (Variant::Float, Ok(object_ref(b"f"))),
                        (Variant::Int8, Err("no".into())),
                    ],
                )
                .unwrap();
            let blob = store.put_object(b"a blob").unwrap();
            (t, m0, m1, blob, serial)
        };

        let mut store = dir.open();
        // Devices and tokens.
        assert_eq!(status(&store, 1), DeviceStatus::Active);
        assert_eq!(status(&store, 2), DeviceStatus::Revoked);
        assert_eq!(store.revoked_serials().unwrap(), vec![serial]);
        assert_eq!(
            store.enroll("used", no_key, never_issue).unwrap(),
            Err("enrollment token already used".to_string())
        );
        assert_eq!(
            pair(store.enroll("spare", no_key, issue).unwrap().unwrap()).0,
            3
        );
        // The task and its history.
        let row = store.task(t).unwrap().unwrap();
        assert_eq!(row.spec, spec("durable"));
        assert_eq!(row.state, TaskState::Running);
        assert_eq!((row.round, row.closed, row.model), (2, 1, m1));
        assert_eq!(row.server_state, Some(vec![9, 9]));
        assert_eq!(row.ledger.as_deref(), Some("[]"));
        let rounds = store.rounds(t).unwrap();
        assert_eq!(
            rounds
                .iter()
                .map(|r| (
                    r.round,
                    r.outcome.as_str(),
                    r.participants.clone(),
                    r.epsilon
                ))
                .collect::<Vec<_>>(),
            vec![
                (1, "closed", vec![1], Some(1.25)),
                (2, "abandoned: deadline", vec![], None),
            ]
        );
        // The open round.
        assert_eq!(store.selected(t, 2).unwrap(), vec![1, 5]);
        let open = store.updates(t, 2).unwrap();
        assert_eq!(devices_of(&open), vec![5, 1]);
        assert_eq!(open[0].bytes, b"five");
        assert!(!store.accept_update(t, 2, &update(5, b"five")).unwrap());
        assert_eq!(
            store.quarantined(t).unwrap(),
            vec![(2, 6, "bad".to_string())]
        );
        // Models, deployments, artifacts and objects.
        assert_eq!(store.deployment().unwrap(), Some((2, m1)));
        assert_eq!(store.previous_deployment().unwrap(), Some(m0));
        assert_eq!(
            store.model_row(&m1).unwrap(),
            Some(ModelRow {
                task: t,
                round: 1,
                size: 8
            })
        );
        assert_eq!(store.artifacts(&m1).unwrap().len(), 2);
        assert_eq!(
            store.artifacts(&m1).unwrap()[1].built,
            Err("no".to_string())
        );
        assert_eq!(store.models_without_artifacts().unwrap(), vec![m0]);
        assert_eq!(store.get_object(&m0).unwrap(), vec![0u8; 8]);
        assert_eq!(store.get_object(&m1).unwrap(), vec![7u8; 8]);
        assert_eq!(store.get_object(&blob).unwrap(), b"a blob");
    });
}

/// The schema of the first coordinator release (`user_version` 0), where a
/// report's example count and loss were NOT NULL.
const SCHEMA_V0_UPDATES: &str = "
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device INTEGER NOT NULL,
    object BLOB NOT NULL,
    weight REAL NOT NULL,
    examples INTEGER NOT NULL,
    train_loss REAL NOT NULL,
    bytes BLOB NOT NULL,
    UNIQUE (task, round, device)
);
CREATE TABLE quarantine (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device INTEGER NOT NULL,
    object BLOB NOT NULL,
    weight REAL NOT NULL,
    examples INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
INSERT INTO updates (task, round, device, object, weight, examples, train_loss, bytes)
    VALUES (1, 2, 3, x'00', 1.5, 40, 0.25, x'0102');
INSERT INTO quarantine (task, round, device, object, weight, examples, bytes, reason, at)
    VALUES (1, 1, 4, x'00', 1.0, 8, x'03', 'bad', 5);
";

#[test]
fn a_database_of_the_first_schema_is_migrated_keeping_its_rows() {
    let dir = TempDir::new("migrate");
    {
        let db = rusqlite::Connection::open(dir.0.path().join("coordinator.db")).unwrap();
        db.execute_batch(SCHEMA_V0_UPDATES).unwrap();
    }
    let store = dir.open();
    let kept = store.updates(1, 2).unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        (kept[0].device, kept[0].examples, kept[0].train_loss),
        (3, Some(40), Some(0.25))
    );
    assert_eq!(store.quarantined(1).unwrap(), vec![(1, 4, "bad".into())]);
    // A private task's report, with neither count nor loss, now fits.
    let private = StoredUpdate {
        examples: None,
        train_loss: None,
        ..update(5, b"private")
    };
    assert!(store.accept_update(1, 2, &private).unwrap());
    let back = store.updates(1, 2).unwrap();
    assert_eq!((back[1].examples, back[1].train_loss), (None, None));
    // A replay is still refused: the rebuilt table kept its constraint.
    assert!(!store.accept_update(1, 2, &private).unwrap());
    let version: i64 = sqlite(&store)
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    drop(store);
    // Opening again changes nothing.
    assert_eq!(dir.open().updates(1, 2).unwrap().len(), 2);
}

#[test]
fn a_database_from_a_newer_coordinator_is_refused_and_commits_are_durable() {
    let dir = TempDir::new("newer");
    let store = dir.open();
    // Each commit reaches the disk before it returns (power cuts too).
    let sync: i64 = sqlite(&store)
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    sqlite(&store)
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(store);
    let Err(e) = Store::open(dir.0.path()) else {
        panic!("a newer schema was opened")
    };
    assert!(e.to_string().contains("newer than this coordinator"), "{e}");
}

#[test]
fn old_model_versions_are_pruned_but_deployed_and_current_ones_kept() {
    on_both("prune", |dir| {
        let mut store = dir.open();
        let t = store.create_task(&spec("prune"), &[0u8; 12]).unwrap();
        let m0 = store.task(t).unwrap().unwrap().model;
        let mut models = vec![m0];
        for round in 1..=6u64 {
            let m = store.put_object(&[round as u8; 12]).unwrap();
            models.push(m);
            store
                .close_round(&ClosedRound {
                    task: t,
                    round,
                    model: m,
                    model_size: 12,
                    closed: round,
                    server_state: Vec::new(),
                    ledger: None,
                    clip_norm: None,
                    basis: None,
                    history: None,
                    epsilon: None,
                    participants: &[],
                    state: TaskState::Running,
                    note: None,
                    applied: true,
                })
                .unwrap();
        }
        // Round 1's model is deployed; round 2's has an artifact.
        store.deploy(&models[1]).unwrap();
        let onnx = store.put_object(b"onnx of round 2").unwrap();
        store
            .put_artifacts(
                &models[2],
                &[(Variant::Int8, Ok(ObjectRef { id: onnx, size: 15 }))],
            )
            .unwrap();
        let path = |id: &ObjectId| dir.0.path().join("objects").join(id.to_string());
        let held = |store: &Store, id: &ObjectId| store.get_object(id).is_ok();

        // Keep 2 besides the current (round 6) and the deployed (round 1):
        // rounds 5 and 4 stay, rounds 3, 2 and 0 go with round 2's artifact.
        let mut gone = store.prune_models(t, 2).unwrap();
        gone.sort_unstable();
        let mut expected = vec![models[0], models[2], models[3]];
        expected.sort_unstable();
        assert_eq!(gone, expected);
        let kept: Vec<u64> = store
            .models(Some(t))
            .unwrap()
            .iter()
            .map(|m| m.round)
            .collect();
        let mut kept_sorted = kept.clone();
        kept_sorted.sort_unstable();
        assert_eq!(kept_sorted, vec![1, 4, 5, 6]);
        for (round, m) in models.iter().enumerate() {
            let expected = [1, 4, 5, 6].contains(&round);
            assert_eq!(held(&store, m), expected, "round {round}");
        }
        assert!(!held(&store, &onnx));
        assert!(store.artifacts(&models[2]).unwrap().is_empty());
        // Nothing more to prune.
        assert!(store.prune_models(t, 2).unwrap().is_empty());

        if dir.1.is_some() {
            // PostgreSQL's sweep: a_damaged_postgres_object_fails_its_hash….
            return;
        }
        // A file no row names (a crash before its commit) is swept; one that
        // is not an object's is left alone.
        let orphan = store.put_object(b"written, never committed").unwrap();
        std::fs::write(dir.0.path().join("objects").join("notes.txt"), b"x").unwrap();
        assert_eq!(store.sweep_objects().unwrap(), 1);
        assert!(!path(&orphan).exists());
        assert!(path(&models[6]).exists());
        assert!(dir.0.path().join("objects").join("notes.txt").exists());
    });
}

// ----- PostgreSQL objects -----

#[test]
fn a_damaged_postgres_object_fails_its_hash_until_written_again() {
    let Some(dir) = TempDir::postgres("pg-damaged") else {
        return;
    };
    let store = dir.open();
    let bytes = vec![1u8, 2, 3, 4, 5, 6, 7, 8];
    let id = store.put_object(&bytes).unwrap();
    assert_eq!(store.object_stamp(&id).unwrap().0, 8);
    store
        .db()
        .execute(
            "UPDATE objects SET bytes = ?1 WHERE id = ?2",
            args![&[1u8, 2, 3][..], &id.0[..]],
        )
        .unwrap();
    assert!(matches!(store.get_object(&id), Err(StoreError::Corrupt(_))));
    // Written again (by the detached sink too), it is repaired.
    assert_eq!(store.object_sink().put(&bytes).unwrap(), id);
    assert_eq!(store.get_object(&id).unwrap(), bytes);
    store.remove_object(&id).unwrap();
    assert!(matches!(
        store.get_object(&id),
        Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound
    ));
    // An unnamed object younger than the sweep age is spared (another
    // replica may be about to commit the rows naming it); an old one goes.
    let young = store.put_object(b"young").unwrap();
    let old = store.put_object(b"old").unwrap();
    store
        .db()
        .execute(
            "UPDATE objects SET created_at = 0 WHERE id = ?1",
            args![&old.0[..]],
        )
        .unwrap();
    assert_eq!(store.sweep_objects().unwrap(), 1);
    assert!(store.get_object(&young).is_ok());
    assert!(store.get_object(&old).is_err());
}

#[test]
fn a_postgres_schema_from_a_newer_coordinator_is_refused() {
    let Some(dir) = TempDir::postgres("pg-newer") else {
        return;
    };
    let store = dir.open();
    store
        .db()
        .execute(
            "UPDATE schema_version SET version = ?1",
            args![SCHEMA_VERSION + 1],
        )
        .unwrap();
    drop(store);
    let Err(e) = Store::connect(dir.1.as_ref().unwrap()) else {
        panic!("a newer schema was opened")
    };
    assert!(e.to_string().contains("newer than this coordinator"), "{e}");
}

// ----- leases and fencing -----

#[test]
fn a_lease_is_held_by_one_owner_until_it_lapses_or_is_released() {
    on_both("leases", |dir| {
        let a = dir.open();
        let b = dir.open();
        let t = 7;
        let la = a.acquire_lease(t, "a", 1_000, 500).unwrap().unwrap();
        assert_eq!(
            (la.owner.as_str(), la.epoch, la.expires_at),
            ("a", 1, 1_500)
        );
        // Held: nobody else, not even the holder, takes it again.
        assert_eq!(b.acquire_lease(t, "b", 1_200, 500).unwrap(), None);
        assert_eq!(a.acquire_lease(t, "a", 1_200, 500).unwrap(), None);
        // Renewed by its holder, it outlives the first expiry.
        let la = a.renew_lease(&la, 1_400, 500).unwrap().unwrap();
        assert_eq!(la.expires_at, 1_900);
        assert_eq!(b.acquire_lease(t, "b", 1_600, 500).unwrap(), None);
        // Lapsed: taken by another, with the next epoch; the old holder
        // can no longer renew it.
        let lb = b.acquire_lease(t, "b", 1_900, 500).unwrap().unwrap();
        assert_eq!((lb.owner.as_str(), lb.epoch), ("b", 2));
        assert_eq!(a.renew_lease(&la, 1_950, 500).unwrap(), None);
        // Released: free at once.
        b.release_lease(&lb).unwrap();
        let la2 = a.acquire_lease(t, "a", 2_000, 500).unwrap().unwrap();
        assert_eq!(la2.epoch, 3);
        // A stale release changes nothing.
        b.release_lease(&lb).unwrap();
        assert_eq!(b.acquire_lease(t, "b", 2_100, 500).unwrap(), None);
        // Leases of other tasks are independent.
        assert!(b.acquire_lease(8, "b", 2_100, 500).unwrap().is_some());
        assert_eq!(
            a.leases()
                .unwrap()
                .iter()
                .map(|l| (l.task, l.owner.as_str(), l.epoch))
                .collect::<Vec<_>>(),
            vec![(7, "a", 3), (8, "b", 1)]
        );
    });
}

#[test]
fn a_fenced_store_writes_nothing_once_its_lease_is_taken() {
    on_both("fencing", |dir| {
        let mut a = dir.open();
        let mut b = dir.open();
        let t = a.create_task(&spec("fenced"), &[0; 8]).unwrap();
        let now = unix_millis();
        let la = a.acquire_lease(t, "a", now, 1).unwrap().unwrap();
        a.fence(Some(la.clone()));
        a.select(t, 1, 1).unwrap();
        assert!(a.accept_update(t, 1, &update(1, b"one")).unwrap());
        // The lease lapses and b takes it; a's every round write is refused
        // and changes nothing.
        let lb = b.acquire_lease(t, "b", now + 2, 60_000).unwrap().unwrap();
        b.fence(Some(lb));
        let fenced = |r: Result<()>| {
            assert!(
                matches!(&r, Err(StoreError::Fenced { task, why }) if *task == t && why.contains("b holds epoch 2")),
                "{r:?}"
            )
        };
        fenced(a.select(t, 1, 2));
        fenced(a.accept_update(t, 1, &update(2, b"two")).map(drop));
        fenced(a.quarantine_update(t, 1, 1, "x"));
        fenced(a.abandon_round(t, 1, "x"));
        let model = a.put_object(b"model-2").unwrap();
        fenced(a.close_round(&ClosedRound {
            task: t,
            round: 1,
            model,
            model_size: 7,
            closed: 1,
            server_state: vec![],
            ledger: None,
            clip_norm: None,
            basis: None,
            history: None,
            epsilon: None,
            participants: &[1],
            state: TaskState::Running,
            note: None,
            applied: true,
        }));
        // A lease of another task fences nothing of this one in.
        let mut c = dir.open();
        let lc = c.acquire_lease(t + 1, "c", now, 60_000).unwrap().unwrap();
        c.fence(Some(lc));
        assert!(matches!(c.select(t, 1, 3), Err(StoreError::Fenced { .. })));
        assert_eq!(b.selected(t, 1).unwrap(), vec![1]);
        assert_eq!(devices_of(&b.updates(t, 1).unwrap()), vec![1]);
        assert!(b.rounds(t).unwrap().is_empty());
        assert_eq!(b.task(t).unwrap().unwrap().round, 1);
        // The new owner writes.
        b.select(t, 1, 2).unwrap();
        assert!(b.accept_update(t, 1, &update(2, b"two")).unwrap());
        assert_eq!(devices_of(&b.updates(t, 1).unwrap()), vec![1, 2]);
        // An unfenced store (a single coordinator) is not checked.
        a.fence(None);
        a.select(t, 1, 4).unwrap();
    });
}

/// Two stores race for one lease from two threads, again and again, each
/// writing while it believes it holds it (a lease of 3 ms lapses under its
/// holder's feet). Writes commit in the order of the lease row's lock, so
/// the epochs of the stored updates, in acceptance order, never go back:
/// no holder writes after another has taken the lease. Without the fence
/// check, a stale holder's writes land after its successor's.
#[test]
fn racing_replicas_never_both_write_as_owner() {
    let race = |dir: &TempDir| {
        let t = dir.open().create_task(&spec("race"), &[0; 8]).unwrap();
        let refused = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for (name, first) in [("a", 1_000u64), ("b", 2_000)] {
                let refused = &refused;
                s.spawn(move || {
                    let mut store = dir.open();
                    let mut device = first;
                    let until = std::time::Instant::now() + std::time::Duration::from_millis(400);
                    while std::time::Instant::now() < until {
                        let Some(lease) = store.acquire_lease(t, name, unix_millis(), 3).unwrap()
                        else {
                            std::thread::yield_now();
                            continue;
                        };
                        store.fence(Some(lease.clone()));
                        for _ in 0..4 {
                            // Slow enough that leases lapse mid-sequence.
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            device += 1;
                            let mut u = update(device, &device.to_le_bytes());
                            u.weight = lease.epoch as f64;
                            match store.accept_update(t, 1, &u) {
                                Ok(stored) => assert!(stored),
                                Err(StoreError::Fenced { .. }) => {
                                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                    break;
                                }
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                });
            }
        });
        let stored = dir.open().updates(t, 1).unwrap();
        assert!(stored.len() >= 8, "{} writes", stored.len());
        let epochs: Vec<u64> = stored.iter().map(|u| u.weight as u64).collect();
        assert!(
            epochs.windows(2).all(|w| w[0] <= w[1]),
            "a write of an older epoch after a newer one: {epochs:?}"
        );
        eprintln!(
            "{} writes over {} epochs, {} refused by the fence",
            stored.len(),
            epochs.last().unwrap(),
            refused.load(std::sync::atomic::Ordering::Relaxed)
        );
    };
    on_both("race", race);
}

// ----- relayed requests -----

/// A request relayed to a task's owner comes back to the replica that
/// relayed it, once, as the owner answered it; old ones expire. On
/// PostgreSQL each write is announced to the listening replicas.
#[test]
fn relayed_requests_reach_the_owner_and_answers_their_replica() {
    on_both("relay", |dir| {
        let owner = dir.open();
        let relay = dir.open();
        owner.listen_relays().unwrap();
        relay.listen_relays().unwrap();
        let postgres = dir.1.is_some();
        // Announcements are read without waiting: allow them a moment.
        let announced = |store: &Store| {
            (0..100).any(|_| {
                let seen = store.relay_notified().unwrap();
                if !seen {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                seen
            })
        };
        let a = relay.relay_request(7, 41, "r1", b"check in").unwrap();
        let b = relay.relay_request(7, 42, "r2", b"upload").unwrap();
        relay.relay_request(8, 43, "r1", b"other task").unwrap();
        assert_eq!(announced(&owner), postgres);
        let asked = owner.relayed_requests(7, 10).unwrap();
        assert_eq!(
            asked
                .iter()
                .map(|r| (r.id, r.device, r.replica.as_str(), r.message.as_slice()))
                .collect::<Vec<_>>(),
            vec![
                (a, 41, "r1", &b"check in"[..]),
                (b, 42, "r2", &b"upload"[..])
            ]
        );
        assert_eq!(owner.relayed_requests(7, 1).unwrap().len(), 1);
        owner.relay_reply(a, "r1", b"plan").unwrap();
        owner.relay_reply(b, "r2", b"").unwrap();
        assert_eq!(announced(&relay), postgres);
        // Answered requests are gone; each answer goes to its replica, once.
        assert!(owner.relayed_requests(7, 10).unwrap().is_empty());
        assert_eq!(
            relay.take_relay_replies("r1").unwrap(),
            vec![(a, b"plan".to_vec())]
        );
        assert!(relay.take_relay_replies("r1").unwrap().is_empty());
        assert_eq!(
            relay.take_relay_replies("r2").unwrap(),
            vec![(b, Vec::new())]
        );
        // Old rows expire: the other task's request.
        assert_eq!(owner.expire_relays(unix_millis() + 1).unwrap(), 1);
        assert!(owner.relayed_requests(8, 10).unwrap().is_empty());
    });
}

/// The running task and a task's model, read alone (replicas ask every
/// second), agree with the full rows.
#[test]
fn the_running_task_and_a_tasks_model_are_read_alone() {
    on_both("running", |dir| {
        let mut store = dir.open();
        assert_eq!(store.running_task().unwrap(), None);
        let a = store.create_task(&spec("a"), &[1; 8]).unwrap();
        let b = store.create_task(&spec("b"), &[2; 8]).unwrap();
        assert_eq!(store.running_task().unwrap(), None);
        store.set_task_state(b, TaskState::Running, None).unwrap();
        assert_eq!(store.running_task().unwrap(), Some(b));
        store.set_task_state(b, TaskState::Paused, None).unwrap();
        store.set_task_state(a, TaskState::Running, None).unwrap();
        assert_eq!(store.running_task().unwrap(), Some(a));
        assert_eq!(
            store.task_model(b).unwrap(),
            Some(store.task(b).unwrap().unwrap().model)
        );
        assert_eq!(store.task_model(b + 1).unwrap(), None);
    });
}
