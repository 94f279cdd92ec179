//! The application without a network: enrollment, admission, revocation,
//! administration and fetching, called as the driver calls them.

use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand};
use fleet_protocol::message::{CoordinatorMessage, ObjectId};
use fleet_protocol::tls::{device_key_and_csr, role_of};
use fleet_protocol::{ErrorCode, close};

use super::{Admission, App, Effect, Fetchable};
use crate::home::{Home, Settings};
use crate::store::unix_secs;
use crate::testing::{TempDir, small_spec};

/// A home in `dir` with its state in `store` (a PostgreSQL URL) or SQLite.
fn home(dir: &TempDir, store: Option<String>) -> Home {
    let home = Home::at(dir.path().join("home"));
    home.init(
        &Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            server_names: vec!["localhost".into()],
            metrics: None,
            drift: Default::default(),
            limits: Default::default(),
            keep_models: Some(crate::store::KEEP_MODELS),
            store,
        },
        "admin",
    )
    .unwrap();
    home
}

fn app(dir: &TempDir) -> App {
    App::open(&home(dir, None)).unwrap()
}

/// Enrolls a device through the app with a real CSR; its id and serial.
fn enroll(app: &mut App) -> (u64, Vec<u8>) {
    app.store
        .create_token("token", "test", unix_secs() + 60)
        .unwrap();
    let (_, csr) = device_key_and_csr().unwrap();
    match app.enroll("token", &csr) {
        CoordinatorMessage::Enrolled {
            device,
            certificate,
        } => {
            let (_, serial) = role_of(&certificate.into()).unwrap();
            (device, serial)
        }
        other => panic!("not enrolled: {other:?}"),
    }
}

fn error_code(r: &AdminResponse) -> Option<ErrorCode> {
    match r {
        AdminResponse::Error(e) => Some(e.code),
        _ => None,
    }
}

#[test]
fn a_token_enrolls_once() {
    let dir = TempDir::new("app-enroll");
    let mut app = app(&dir);
    enroll(&mut app);
    let (_, csr) = device_key_and_csr().unwrap();
    match app.enroll("token", &csr) {
        CoordinatorMessage::Error(e) => assert_eq!(e.code, ErrorCode::UnknownDevice),
        other => panic!("a used token enrolled again: {other:?}"),
    }
    assert_eq!(app.metrics.enrollments, 1);
    assert_eq!(app.metrics.rejected.get("enrollment"), Some(&1));
}

#[test]
fn unknown_devices_are_refused_and_counted() {
    let dir = TempDir::new("app-unknown");
    let mut app = app(&dir);
    assert_eq!(app.connect(42, b"serial"), Admission::Refused);
    assert_eq!(app.metrics.rejected.get("unknown_device"), Some(&1));
    assert_eq!(app.metrics.connected_devices, 0);
}

#[test]
fn connections_are_counted_per_device() {
    let dir = TempDir::new("app-connections");
    let mut app = app(&dir);
    let (device, serial) = enroll(&mut app);
    assert_eq!(app.connect(device, &serial), Admission::Admitted);
    assert_eq!(app.connect(device, &serial), Admission::Admitted);
    assert_eq!(
        app.metrics.connected_devices, 1,
        "one device, two connections"
    );
    app.disconnect(device);
    assert_eq!(app.metrics.connected_devices, 1, "one connection is left");
    app.disconnect(device);
    assert_eq!(app.metrics.connected_devices, 0);
    // A connection that ends after its device was forgotten (revoked)
    // changes nothing.
    app.disconnect(device);
    assert_eq!(app.metrics.connected_devices, 0);
}

#[test]
fn revocation_denies_the_serial_and_asks_the_driver_to_disconnect() {
    let dir = TempDir::new("app-revoke");
    let mut app = app(&dir);
    let (device, serial) = enroll(&mut app);
    assert_eq!(app.connect(device, &serial), Admission::Admitted);
    assert_eq!(app.connect(device, &serial), Admission::Admitted);
    app.take_effects();

    let reply = app.administer(AdminRequest::RevokeDevice { device }, 0);
    match &reply {
        AdminResponse::Done { message, id } => {
            assert_eq!(*id, Some(device));
            assert!(message.contains("2 live connection(s) closed"), "{message}");
        }
        other => panic!("not revoked: {other:?}"),
    }
    assert!(app.revocations().is_revoked(&serial));
    assert_eq!(
        app.take_effects(),
        vec![Effect::Disconnect {
            device,
            code: close::REVOKED,
            reason: "device revoked",
        }]
    );
    assert_eq!(app.metrics.connected_devices, 0);
    assert_eq!(
        app.connect(device, &serial),
        Admission::Refused,
        "revoked for good"
    );

    let again = app.administer(AdminRequest::RevokeDevice { device: 999 }, 0);
    assert_eq!(error_code(&again), Some(ErrorCode::UnknownDevice));
}

#[test]
fn a_second_hello_is_refused_not_a_panic() {
    let dir = TempDir::new("app-hello");
    let mut app = app(&dir);
    let reply = app.administer(
        AdminRequest::Hello {
            version: 1,
            min_version: 1,
        },
        0,
    );
    assert_eq!(error_code(&reply), Some(ErrorCode::Malformed));
}

#[test]
fn a_created_task_queues_its_model_for_the_builder_once() {
    let dir = TempDir::new("app-create");
    let mut app = app(&dir);
    let reply = app.administer(AdminRequest::CreateTask(Box::new(small_spec(2, 2, 1))), 0);
    let AdminResponse::Done { id: Some(task), .. } = reply else {
        panic!("not created: {reply:?}");
    };
    assert_eq!(app.take_effects(), vec![Effect::WakeBuilder]);
    let model = app.store.task(task).unwrap().unwrap().model;
    assert_eq!(app.next_build(), Some(model));
    assert_eq!(app.next_build(), None);

    // Starting it makes its model fetchable; an unknown object is not.
    let started = app.administer(
        AdminRequest::SetTaskState {
            task,
            command: TaskCommand::Start,
        },
        0,
    );
    assert!(matches!(started, AdminResponse::Done { .. }), "{started:?}");
    assert!(matches!(app.fetch(&model), Fetchable::Bytes(_)));
    assert!(matches!(
        app.fetch(&ObjectId::of(b"something else")),
        Fetchable::Unknown
    ));
    let other = app.administer(
        AdminRequest::SetTaskState {
            task: task + 1,
            command: TaskCommand::Start,
        },
        0,
    );
    assert_eq!(error_code(&other), Some(ErrorCode::NoSuchRound));
}

#[test]
fn deploying_needs_a_unique_non_empty_prefix() {
    let dir = TempDir::new("app-deploy");
    let mut app = app(&dir);
    for model in ["", "ffff"] {
        let reply = app.administer(
            AdminRequest::Deploy {
                model: model.into(),
            },
            0,
        );
        assert_eq!(
            error_code(&reply),
            Some(ErrorCode::NoSuchRound),
            "{model:?}"
        );
    }
    let AdminResponse::Done { id: Some(task), .. } =
        app.administer(AdminRequest::CreateTask(Box::new(small_spec(2, 2, 1))), 0)
    else {
        panic!("not created");
    };
    let model = app.store.task(task).unwrap().unwrap().model.to_string();
    let reply = app.administer(
        AdminRequest::Deploy {
            model: model[..8].to_uppercase(),
        },
        0,
    );
    assert!(
        matches!(reply, AdminResponse::Done { id: Some(1), .. }),
        "{reply:?}"
    );
}

#[test]
fn an_over_long_token_is_refused_before_it_is_looked_up() {
    let dir = TempDir::new("app-long-token");
    let mut app = app(&dir);
    // A valid token, but longer than the bound: were it hashed and looked
    // up, it would enroll.
    let long = "t".repeat(crate::limits::MAX_TOKEN_LEN + 1);
    app.store
        .create_token(&long, "test", unix_secs() + 60)
        .unwrap();
    let (_, csr) = device_key_and_csr().unwrap();
    match app.enroll(&long, &csr) {
        CoordinatorMessage::Error(e) => {
            assert_eq!(e.code, ErrorCode::UnknownDevice);
            assert!(e.message.contains("longer than"), "{e}");
        }
        other => panic!("an over-long token enrolled: {other:?}"),
    }
    assert_eq!(app.metrics.enrollments, 0);
    // A signing request over its bound is refused before it is parsed.
    app.store
        .create_token("short", "test", unix_secs() + 60)
        .unwrap();
    let huge = vec![0u8; crate::limits::MAX_CSR_LEN + 1];
    let reply = app.enroll("short", &huge);
    assert!(
        matches!(&reply, CoordinatorMessage::Error(e) if e.code == ErrorCode::Malformed),
        "{reply:?}"
    );
    // The token is still usable with a proper request.
    assert!(matches!(
        app.enroll("short", &csr),
        CoordinatorMessage::Enrolled { .. }
    ));
}

#[test]
fn the_deployed_model_is_read_and_hashed_once_then_served_from_memory() {
    let dir = TempDir::new("app-fetch-cache");
    let mut app = app(&dir);
    let AdminResponse::Done { id: Some(task), .. } =
        app.administer(AdminRequest::CreateTask(Box::new(small_spec(2, 2, 1))), 0)
    else {
        panic!("not created");
    };
    let model = app.store.task(task).unwrap().unwrap().model;
    let reply = app.administer(
        AdminRequest::Deploy {
            model: model.to_string(),
        },
        0,
    );
    assert!(matches!(reply, AdminResponse::Done { .. }), "{reply:?}");
    for _ in 0..10 {
        assert!(matches!(app.fetch(&model), Fetchable::Bytes(_)));
    }
    assert_eq!(app.fetch_cache.reads, 1, "fetches re-read the object");
    // A file changed on disk is read again, and its damage noticed.
    let path = dir
        .path()
        .join("home")
        .join("objects")
        .join(model.to_string());
    std::fs::write(&path, b"damaged").unwrap();
    assert!(matches!(app.fetch(&model), Fetchable::Damaged(_)));
    assert_eq!(app.fetch_cache.reads, 1, "a damaged object is not cached");
}

/// A task stored by an older coordinator under rules since tightened (here
/// DP with the median) is stopped with the reason when the coordinator
/// starts, instead of running or failing every start; starting it by hand
/// is refused the same way.
#[test]
fn a_stored_task_that_breaks_todays_rules_is_stopped_not_resumed() {
    use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
    use fleet_aggregation::{Rule, StrategyConfig};
    use fleet_protocol::admin::TaskState;
    let dir = TempDir::new("app-stale-task");
    let mut spec = small_spec(2, 2, 1);
    spec.strategy = StrategyConfig::fedavg().with_rule(Rule::Median);
    spec.dp = Some(DpConfig {
        clip_norm: 1.0,
        noise_multiplier: 1.0,
        placement: NoisePlacement::Server,
        expected_cohort: 2,
        adaptive: None,
    });
    assert!(spec.validate().is_err());
    let (running, paused) = {
        let mut app = app(&dir);
        let global = spec.model.init_params(1);
        let bytes = fleet_protocol::message::params_to_bytes(&global);
        let running = app.store.create_task(&spec, &bytes).unwrap();
        let paused = app.store.create_task(&spec, &bytes).unwrap();
        app.store
            .set_task_state(running, TaskState::Running, None)
            .unwrap();
        (running, paused)
    };
    let home = Home::at(dir.path().join("home"));
    let mut app = App::open(&home).expect("the coordinator starts");
    assert!(app.runner.is_none());
    let row = app.store.task(running).unwrap().unwrap();
    assert_eq!(row.state, TaskState::Stopped);
    let note = row.note.unwrap();
    assert!(
        note.contains("no longer accepted") && note.contains("strategy.rule must be the mean"),
        "{note}"
    );
    // Started by hand: refused with the reason, stopped, nothing running.
    let reply = app.administer(
        AdminRequest::SetTaskState {
            task: paused,
            command: TaskCommand::Start,
        },
        0,
    );
    let AdminResponse::Error(e) = &reply else {
        panic!("{reply:?}")
    };
    assert!(e.message.contains("no longer accepted"), "{}", e.message);
    assert!(app.runner.is_none());
    let row = app.store.task(paused).unwrap().unwrap();
    assert_eq!(row.state, TaskState::Stopped);
    drop(app);
    // The next start is clean too.
    assert!(App::open(&home).unwrap().runner.is_none());
}

/// Identity is the certificate the coordinator issued for an id, not the id
/// alone: after a database is restored from a backup, an id issued since is
/// issued again, and the certificate of its earlier holder does not
/// authenticate as the new device.
#[test]
fn a_certificate_authenticates_only_the_device_it_was_issued_to() {
    let dir = TempDir::new("app-serial");
    let mut app = app(&dir);
    let (device, serial) = enroll(&mut app);
    let mut other = serial.clone();
    *other.last_mut().unwrap() ^= 1;
    assert_eq!(app.connect(device, &other), Admission::Refused);
    assert_eq!(app.metrics.rejected.get("other_certificate"), Some(&1));
    assert_eq!(app.metrics.connected_devices, 0);
    assert_eq!(app.connect(device, &serial), Admission::Admitted);
}

/// A home whose state is in a fresh PostgreSQL schema, when a server is
/// named (`crate::store::scratch`).
fn shared_home(dir: &TempDir, name: &str) -> Option<Home> {
    Some(home(dir, Some(crate::store::scratch::schema(name)?)))
}

fn check_in() -> fleet_protocol::message::AgentMessage {
    fleet_protocol::message::AgentMessage::CheckIn {
        capabilities: fleet_protocol::message::Capabilities {
            memory_mib: 4096,
            eligible: true,
        },
    }
}

/// Ticks `app` until its relayed request `id` is answered.
fn relayed_answer(owner: &mut App, app: &mut App, id: u64, now: u64) -> CoordinatorMessage {
    owner.tick(now);
    app.tick(now);
    assert!(
        app.take_effects().contains(&Effect::RelayReady(vec![id])),
        "the answer was announced"
    );
    match app.take_relay_reply(id) {
        Some(crate::app::RelayReply::Answer(m)) => *m,
        other => panic!("no answer: {other:?}"),
    }
}

/// Two replicas on one PostgreSQL store: the one that starts the task runs
/// it (holds its lease); the other relays its devices' requests to it
/// through the store and hands back the owner's answers; a revocation made
/// through one closes the device's connection on the other; when the owner
/// dies, the other takes the lease once it lapses and runs the task from
/// the store.
#[test]
fn replicas_relay_to_the_owner_and_take_over_when_it_dies() {
    let dir = TempDir::new("app-replicas");
    let Some(home) = shared_home(&dir, "app-replicas") else {
        return;
    };
    let mut a = App::open(&home.clone().with_replica(Some("a".into()))).unwrap();
    let mut b = App::open(&home.clone().with_replica(Some("b".into()))).unwrap();
    let reply = a.administer(AdminRequest::CreateTask(Box::new(small_spec(2, 2, 1))), 0);
    let AdminResponse::Done { id: Some(task), .. } = reply else {
        panic!("not created: {reply:?}");
    };
    let started = b.administer(
        AdminRequest::SetTaskState {
            task,
            command: TaskCommand::Start,
        },
        0,
    );
    assert!(matches!(started, AdminResponse::Done { .. }), "{started:?}");
    // Started through b, which took the lease; a sees it run elsewhere.
    assert_eq!(
        b.replica().unwrap().lease().map(|l| (l.task, l.epoch)),
        Some((task, 1))
    );
    a.tick(0);
    assert!(a.runner.is_none() && a.replica().unwrap().lease().is_none());
    let (device, serial) = enroll(&mut a);
    assert_eq!(a.connect(device, &serial), Admission::Admitted);

    // a's device checks in: relayed to b, which selects it.
    let crate::app::TaskAnswer::Relayed(id) = a.task_request(device, check_in(), 10) else {
        panic!("answered by a replica that does not run the task");
    };
    match relayed_answer(&mut b, &mut a, id, 10) {
        CoordinatorMessage::Plan(plan) => assert_eq!((plan.task, plan.round), (task, 1)),
        other => panic!("no plan: {other:?}"),
    }
    assert_eq!(a.metrics.relayed_out, 1);
    assert_eq!(b.metrics.relayed_in, 1);
    assert_eq!(b.store.selected(task, 1).unwrap(), vec![device]);

    // Revoked through b: a closes the device's connection and refuses it.
    let revoked = b.administer(AdminRequest::RevokeDevice { device }, 20);
    assert!(matches!(revoked, AdminResponse::Done { .. }), "{revoked:?}");
    a.take_effects();
    a.tick(2_000);
    assert!(a.take_effects().contains(&Effect::Disconnect {
        device,
        code: close::REVOKED,
        reason: "device revoked",
    }));
    assert!(a.revocations().is_revoked(&serial));

    // b dies (dropped without giving its lease up): a takes the task over
    // once the lease lapses, from what b committed.
    drop(b);
    let expires = a.store.leases().unwrap()[0].expires_at;
    if crate::store::unix_millis() + 1_000 < expires {
        // (Checked only with time to spare: on a loaded machine the test
        // may already be past the lease.)
        a.tick(4_000);
        assert!(a.runner.is_none(), "taken while b's lease was still valid");
    }
    std::thread::sleep(std::time::Duration::from_millis(
        crate::app::LEASE_TTL_MS + 200,
    ));
    a.tick(6_000);
    let lease = a
        .replica()
        .unwrap()
        .lease()
        .cloned()
        .expect("a took the lease");
    assert_eq!(
        (lease.task, lease.owner.as_str(), lease.epoch),
        (task, "a", 2)
    );
    assert_eq!(a.runner.as_ref().map(|r| r.id()), Some(task));
    // Paused (through a new replica c): a gives the task and its lease up.
    let mut c = App::open(&home.clone().with_replica(Some("c".into()))).unwrap();
    let paused = c.administer(
        AdminRequest::SetTaskState {
            task,
            command: TaskCommand::Pause,
        },
        7_000,
    );
    assert!(matches!(paused, AdminResponse::Done { .. }), "{paused:?}");
    a.tick(8_000);
    assert!(a.runner.is_none() && a.replica().unwrap().lease().is_none());
    assert!(c.store.leases().unwrap()[0].expires_at <= crate::store::unix_millis());
}

/// While a replica of the aggregator role is alive, a serving replica that
/// holds the task hands it over (releasing the lease, so the aggregator
/// takes it at its next check) and does not take it back; once the
/// aggregator is gone for `ALIVE_MS`, a serving replica runs the task again.
#[test]
fn an_aggregator_replica_is_preferred_as_the_owner() {
    let dir = TempDir::new("app-aggregator");
    let Some(home) = shared_home(&dir, "app-aggregator") else {
        return;
    };
    let mut serve = App::open(&home.clone().with_replica(Some("serve".into()))).unwrap();
    let reply = serve.administer(AdminRequest::CreateTask(Box::new(small_spec(2, 2, 1))), 0);
    let AdminResponse::Done { id: Some(task), .. } = reply else {
        panic!("not created: {reply:?}");
    };
    let started = serve.administer(
        AdminRequest::SetTaskState {
            task,
            command: TaskCommand::Start,
        },
        0,
    );
    assert!(matches!(started, AdminResponse::Done { .. }), "{started:?}");
    serve.tick(0);
    assert_eq!(serve.runner.as_ref().map(|r| r.id()), Some(task));
    let mut gpu = App::open(
        &home
            .clone()
            .with_replica(Some("gpu".into()))
            .with_role(crate::app::Role::Aggregator),
    )
    .unwrap();
    gpu.tick(0); // heartbeat; the lease is still held
    assert!(gpu.runner.is_none());
    serve.tick(1_000); // hands over
    assert!(serve.runner.is_none());
    gpu.tick(1_000); // takes it
    let lease = gpu.replica().unwrap().lease().cloned().unwrap();
    assert_eq!((lease.owner.as_str(), lease.epoch), ("gpu", 2));
    serve.tick(2_000);
    assert!(serve.runner.is_none(), "taken back from a live aggregator");
    // The aggregator dies: after its heartbeat ages and its lease lapses,
    // the serving replica runs the task again.
    drop(gpu);
    std::thread::sleep(std::time::Duration::from_millis(
        crate::app::LEASE_TTL_MS.max(crate::app::ALIVE_MS) + 200,
    ));
    serve.tick(3_000);
    assert_eq!(serve.runner.as_ref().map(|r| r.id()), Some(task));
    assert_eq!(serve.replica().unwrap().lease().unwrap().epoch, 3);
}
