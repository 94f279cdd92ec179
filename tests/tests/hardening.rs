//! The coordinator against hostile peers and load (`docs/security.md`):
//! each test would fail without the bound it names.
//!
//! - an anonymous peer cannot open more than the one request stream, and
//!   stuffing connections leaves a coordinator process's memory bounded;
//! - 500 anonymous connections are capped and a device is still served;
//! - a device holds at most `per_device` connections;
//! - a connection without a certificate must enroll in time;
//! - a `Fetch` past the end is answered with an error; an `BeginUpload`
//!   from a device not selected is refused;
//! - a peer that does not read its answers is dropped after the send timeout;
//! - a device with less memory than training the model takes is not selected;
//! - a coordinator busy deciding keeps its connections alive.
//!
//! Waits are on events (a connection closed, an answer, a count reached)
//! with generous deadlines: the machines running them are loaded.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use fleet_coordinator::limits::Limits;
use fleet_e2e::{
    InProcess, Proc, binary, code, connect, device_config, free_udp_port, hello, metric, ok, run,
    scratch, small_task,
};
use fleet_models::ModelSpec;
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand};
use fleet_protocol::message::{
    AgentMessage, Capabilities, CoordinatorMessage, ObjectId, ObjectRef, Plan, UpdateMeta,
};
use fleet_protocol::session::client_endpoint;
use fleet_protocol::tls::anonymous_client_config;
use fleet_protocol::{ErrorCode, close};

/// A generous deadline for anything a loaded machine should do in seconds.
const PATIENCE: Duration = Duration::from_secs(120);

/// Polls `fut` once: its output if it was ready at once.
async fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        Poll::Ready(match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// The application close code of a connection error, if it is one.
fn app_code(e: &quinn::ConnectionError) -> Option<u32> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner() as u32),
        _ => None,
    }
}

/// Waits (with [`PATIENCE`]) until `conn` is closed; its reason.
async fn closed(conn: &quinn::Connection, what: &str) -> quinn::ConnectionError {
    tokio::time::timeout(PATIENCE, conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection was never closed"))
}

fn checkin() -> AgentMessage {
    AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib: 1024,
            eligible: true,
        },
    }
}

/// Creates and starts `spec`'s task; its id.
async fn start_task(
    admin: &mut fleet_coordinator::cli::admin::AdminClient,
    spec: fleet_protocol::task::TaskSpec,
) -> u64 {
    let AdminResponse::Done { id: Some(task), .. } =
        ok(admin, AdminRequest::CreateTask(Box::new(spec))).await
    else {
        panic!("task not created")
    };
    ok(
        admin,
        AdminRequest::SetTaskState {
            task,
            command: TaskCommand::Start,
        },
    )
    .await;
    task
}

/// The fleet's CA certificate.
type Ca = quinn::rustls::pki_types::CertificateDer<'static>;

/// An anonymous connection to `addr` on a fresh endpoint, handshake done.
async fn anonymous(
    addr: SocketAddr,
    ca: &Ca,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let ep = client_endpoint(addr, anonymous_client_config(ca).unwrap()).unwrap();
    let conn = ep.connect(addr, "localhost").unwrap().await?;
    Ok((ep, conn))
}

#[tokio::test]
async fn an_anonymous_peer_gets_one_stream_and_must_enroll_in_time() {
    let dir = scratch("harden-anon-deadline");
    let c = InProcess::start_limited(
        &dir,
        Limits {
            enroll_ms: 1_000,
            ..Limits::default()
        },
    )
    .await;
    let ca: Ca = c.home.ca_cert().unwrap();
    let (_ep, conn) = anonymous(c.addr, &ca).await.unwrap();
    // One bidirectional stream, no unidirectional one: the server's
    // transport parameters (known once the handshake is done) say so.
    let (mut tx, _rx) = conn.open_bi().await.unwrap();
    tx.write_all(&fleet_protocol::encode(&hello(
        fleet_protocol::PROTOCOL_VERSION,
    )))
    .await
    .unwrap();
    for k in 0..200 {
        assert!(
            poll_once(conn.open_bi()).await.is_none(),
            "a second bidirectional stream opened (attempt {k})"
        );
        assert!(
            poll_once(conn.open_uni()).await.is_none(),
            "a unidirectional stream opened (attempt {k})"
        );
    }
    // Saying nothing more, it is closed at the enrollment deadline.
    let why = closed(&conn, "an idle anonymous connection").await;
    assert_eq!(app_code(&why), Some(close::BUSY), "{why}");
    assert_eq!(c.coordinator.open_connections().1, 0);
    // An honest newcomer still enrolls.
    let mut admin = c.admin().await;
    let (id, _) = c.enroll(&mut admin, &dir.join("agent")).await;
    assert!(id > 0);
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "fleet_connections_refused_total{reason=\"enroll_deadline\"}"
        ),
        1
    );
}

#[tokio::test]
async fn five_hundred_anonymous_connections_are_capped_and_a_device_is_served() {
    let dir = scratch("harden-anon-flood");
    let limits = Limits {
        max_connections: 128,
        max_anonymous: 32,
        // All from one address here: the total cap is what is tested.
        anonymous_per_address: 32,
        retry_above: 64,
        enroll_ms: 600_000,
        ..Limits::default()
    };
    let c = InProcess::start_limited(&dir, limits.clone()).await;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    start_task(&mut admin, small_task("flood", &spec)).await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let ca = c.home.ca_cert().unwrap();
    let ep = client_endpoint(c.addr, anonymous_client_config(&ca).unwrap()).unwrap();
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let ep = ep.clone();
        let addr = c.addr;
        attempts.spawn(async move { ep.connect(addr, "localhost").unwrap().await });
    }
    let mut held = Vec::new();
    let mut failed = 0;
    while let Some(r) = attempts.join_next().await {
        match r.unwrap() {
            Ok(conn) => held.push(conn),
            Err(_) => failed += 1,
        }
        assert!(c.coordinator.open_connections().1 <= limits.max_anonymous);
    }
    // Connections over the anonymous cap are closed right after their
    // handshake; wait until the client has heard of every such close.
    let deadline = Instant::now() + PATIENCE;
    let alive = loop {
        let alive = held.iter().filter(|c| c.close_reason().is_none()).count();
        if alive <= limits.max_anonymous {
            break alive;
        }
        assert!(
            Instant::now() < deadline,
            "{alive} anonymous connections still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(alive > 0, "no anonymous connection was let in at all");
    eprintln!("{alive} anonymous connections held, {failed} refused");
    let busy = held
        .iter()
        .filter_map(|c| c.close_reason())
        .filter(|r| app_code(r) == Some(close::BUSY))
        .count();
    assert_eq!(
        alive + busy + failed,
        500,
        "each attempt is held, closed as busy, or refused"
    );
    // The enrolled device is served while the flood is held.
    let mut p = connect(c.addr, device_config(&state)).await;
    assert!(matches!(
        p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    ));
    let reply = p.call(&checkin()).await;
    assert!(
        matches!(
            reply,
            Some(CoordinatorMessage::Plan(_) | CoordinatorMessage::ComeBackLater { .. })
        ),
        "{reply:?}"
    );
    let text = c.coordinator.metrics_text().await;
    assert!(
        metric(
            &text,
            "fleet_connections_refused_total{reason=\"anonymous_cap\"}"
        ) > 0
    );
    assert!(metric(&text, "fleet_anonymous_connections_open") <= limits.max_anonymous as u64);
}

/// One address cannot hold every anonymous slot: past its share its
/// connections are closed as busy, while a newcomer from another address
/// is let in and answered.
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_anonymous_connections() {
    let dir = scratch("harden-per-address");
    let limits = Limits {
        max_anonymous: 16,
        anonymous_per_address: 4,
        enroll_ms: 600_000,
        ..Limits::default()
    };
    let c = InProcess::start_limited(&dir, limits.clone()).await;
    let ca: Ca = c.home.ca_cert().unwrap();
    let from = |ip: &str| {
        let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse().unwrap()).unwrap();
        ep.set_default_client_config(anonymous_client_config(&ca).unwrap());
        ep
    };
    let flood = from("127.0.0.1");
    let mut held = Vec::new();
    for _ in 0..limits.anonymous_per_address + 3 {
        held.push(flood.connect(c.addr, "localhost").unwrap().await.unwrap());
    }
    let deadline = Instant::now() + PATIENCE;
    while held.iter().filter(|c| c.close_reason().is_some()).count() < 3 {
        assert!(
            Instant::now() < deadline,
            "the extra connections are still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy = held
        .iter()
        .filter_map(|c| c.close_reason())
        .filter(|r| app_code(r) == Some(close::BUSY))
        .count();
    assert_eq!(busy, 3, "past its share, one address is told busy");
    assert_eq!(
        c.coordinator.open_connections().1,
        limits.anonymous_per_address
    );
    // Another address still gets in and is answered.
    let elsewhere = from("127.0.0.2");
    let conn = elsewhere
        .connect(c.addr, "localhost")
        .unwrap()
        .await
        .unwrap();
    let (mut tx, mut rx) = conn.open_bi().await.unwrap();
    fleet_protocol::stream::send(&mut tx, &hello(fleet_protocol::PROTOCOL_VERSION))
        .await
        .unwrap();
    let reply: CoordinatorMessage =
        fleet_protocol::stream::recv(&mut rx, fleet_protocol::MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
    assert!(
        matches!(reply, CoordinatorMessage::HelloAck { .. }),
        "{reply:?}"
    );
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "fleet_connections_refused_total{reason=\"address_cap\"}"
        ),
        3
    );
}

#[tokio::test]
async fn a_device_holds_at_most_its_share_of_connections() {
    let dir = scratch("harden-per-device");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let per_device = Limits::default().per_device;
    let mut peers = Vec::new();
    for _ in 0..per_device {
        let mut p = connect(c.addr, device_config(&state)).await;
        assert!(matches!(
            p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
            Some(CoordinatorMessage::HelloAck { .. })
        ));
        peers.push(p);
    }
    let mut extra = connect(c.addr, device_config(&state)).await;
    assert!(
        extra
            .call(&hello(fleet_protocol::PROTOCOL_VERSION))
            .await
            .is_none(),
        "one too many served"
    );
    let why = closed(&extra.conn, "a connection over the device's share").await;
    assert_eq!(app_code(&why), Some(close::BUSY), "{why}");
    // Once one closes, the device may connect again.
    let first = peers.remove(0);
    first.conn.close(close::DONE.into(), b"done");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut p = connect(c.addr, device_config(&state)).await;
        if matches!(
            p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
            Some(CoordinatorMessage::HelloAck { .. })
        ) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed share was never given back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks in devices 1..=n in order; their plans (None: not selected).
async fn plans(
    addr: SocketAddr,
    configs: &[quinn::ClientConfig],
) -> Vec<(fleet_e2e::Peer, Option<Plan>)> {
    let mut out = Vec::new();
    for cfg in configs {
        let mut p = connect(addr, cfg.clone()).await;
        assert!(matches!(
            p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
            Some(CoordinatorMessage::HelloAck { .. })
        ));
        let plan = match p.call(&checkin()).await {
            Some(CoordinatorMessage::Plan(plan)) => Some(plan),
            Some(CoordinatorMessage::ComeBackLater { .. }) => None,
            other => panic!("check-in answered {other:?}"),
        };
        out.push((p, plan));
    }
    out
}

#[tokio::test]
async fn fetches_past_the_end_and_uploads_of_unselected_devices_are_refused() {
    let dir = scratch("harden-fetch-upload");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let spec = ModelSpec::LogReg {
        inputs: 784,
        classes: 10,
    };
    // Target 2, no over-selection: the third device is not selected.
    let task = start_task(&mut admin, small_task("fetch", &spec)).await;
    let mut configs = Vec::new();
    for k in 0..3 {
        let (_, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
        configs.push(device_config(&state));
    }
    let mut devices = plans(c.addr, &configs).await;
    let plan = devices[0].1.clone().expect("the first device is selected");
    assert!(devices[2].1.is_none(), "the third device was selected");
    let model = plan.model;

    // A fetch at or past the end is answered, with an error.
    let p = &mut devices[0].0;
    for offset in [model.size, model.size + 1, u64::MAX] {
        let reply = tokio::time::timeout(
            PATIENCE,
            p.call(&AgentMessage::Fetch {
                object: model.id,
                offset,
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("a fetch at offset {offset} was never answered"));
        assert_eq!(code(reply), Some(ErrorCode::Malformed), "offset {offset}");
    }
    // The connection still serves a proper fetch.
    let reply = p
        .call(&AgentMessage::Fetch {
            object: model.id,
            offset: model.size - 1,
        })
        .await;
    assert!(
        matches!(reply, Some(CoordinatorMessage::Chunk { ref data, .. }) if data.len() == 1),
        "{reply:?}"
    );

    // The unselected device may not even announce an update.
    let meta = UpdateMeta {
        task,
        round: plan.round,
        fingerprint: spec.layout().fingerprint(),
        object: ObjectRef {
            id: ObjectId::of(b"not selected"),
            size: 8 * spec.layout().total as u64,
        },
        examples: Some(1),
        train_loss: Some(0.0),
    };
    let stranger = &mut devices[2].0;
    assert_eq!(
        code(stranger.call(&AgentMessage::BeginUpload(meta)).await),
        Some(ErrorCode::NoSuchRound)
    );
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(&text, "fleet_rejected_total{reason=\"not_selected\"}"),
        1
    );
    assert_eq!(
        metric(&text, "fleet_rejected_total{reason=\"fetch_range\"}"),
        3
    );
}

#[tokio::test]
async fn a_peer_that_does_not_read_is_dropped_after_the_send_timeout() {
    let dir = scratch("harden-send-timeout");
    let c = InProcess::start_limited(
        &dir,
        Limits {
            send_timeout_ms: 1_000,
            ..Limits::default()
        },
    )
    .await;
    let mut admin = c.admin().await;
    // A model of 8 MB: more than the flow-control windows can hold.
    let spec = ModelSpec::LogReg {
        inputs: 200_000,
        classes: 10,
    };
    start_task(&mut admin, small_task("big", &spec)).await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let mut devices = plans(c.addr, &[device_config(&state)]).await;
    let (p, plan) = &mut devices[0];
    let model = plan.as_ref().expect("selected").model;
    assert!(model.size > 4 * u64::from(fleet_protocol::tls::STREAM_WINDOW));
    // Ask for the model and never read a byte of it.
    fleet_protocol::stream::send(
        &mut p.tx,
        &AgentMessage::Fetch {
            object: model.id,
            offset: 0,
        },
    )
    .await
    .unwrap();
    let why = closed(&p.conn, "a connection that does not read").await;
    assert_eq!(app_code(&why), Some(close::BUSY), "{why}");
    let text = c.coordinator.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            "fleet_connections_refused_total{reason=\"send_timeout\"}"
        ),
        1
    );
}

/// Peak and current resident memory of process `pid` (KiB), from `/proc`.
fn memory_kib(pid: u32) -> (u64, u64) {
    let field = |name: &str| match fleet_e2e::proc_status_kib(pid, name) {
        0 => panic!("no {name} in /proc/{pid}/status"),
        kib => kib,
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A coordinator process serving a fresh home with these limits; its
/// address and home directory.
fn coordinator_process(
    dir: &std::path::Path,
    limits: &Limits,
) -> (Proc, SocketAddr, std::path::PathBuf) {
    let home = dir.join("home");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let c = binary("coordinator");
    let home_s = home.to_str().unwrap();
    fleet_e2e::init_home(&home, &addr.to_string(), &[]);
    let settings = home.join("coordinator.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings).unwrap()).unwrap();
    json["limits"] = serde_json::to_value(limits).unwrap();
    std::fs::write(&settings, json.to_string()).unwrap();
    let proc = Proc::spawn(
        &c,
        &["serve", "--dir", home_s],
        &dir.join("coordinator.log"),
    );
    fleet_e2e::wait_listening(&home);
    (proc, addr, home)
}

/// Anonymous peers try to open 200 bidirectional and 200 unidirectional
/// streams each and stuff every stream they get; with quinn's defaults
/// each connection could park about 250 MB in the coordinator. They get one
/// stream each, the coordinator reserves nothing for a frame announced but
/// not sent, closes them at the enrollment deadline, and its peak resident
/// memory grows by a few MiB per connection at most.
#[tokio::test]
async fn stuffed_anonymous_connections_leave_the_coordinator_memory_bounded() {
    let dir = scratch("harden-stuffing");
    let limits = Limits {
        enroll_ms: 3_000,
        // All from one address here: every connection is let in and stuffed.
        anonymous_per_address: 32,
        ..Limits::default()
    };
    let (proc, addr, home) = coordinator_process(&dir, &limits);
    let pid = proc.child.id();
    let (peak_before, _) = memory_kib(pid);
    let ca: Ca = fleet_coordinator::home::Home::at(&home).ca_cert().unwrap();
    const CONNECTIONS: usize = 32;
    let extra_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut peers = tokio::task::JoinSet::new();
    for _ in 0..CONNECTIONS {
        let ca = ca.clone();
        let extra = extra_streams.clone();
        peers.spawn(async move {
            let (ep, conn) = anonymous(addr, &ca).await.expect("handshake");
            let junk = vec![0x5a; 1 << 20];
            // The one request stream: a frame that announces almost the
            // anonymous limit and sends a sliver of it, then junk streams.
            let (mut tx, _rx) = conn.open_bi().await.unwrap();
            let mut head = (16u32 * 1024 - 1).to_le_bytes().to_vec();
            head.extend_from_slice(&[1; 100]);
            let _ = tx.write_all(&head).await;
            let mut stuffing = Vec::new();
            for _ in 0..200 {
                if let Some(Ok((mut s, _))) = poll_once(conn.open_bi()).await {
                    extra.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let junk = junk.clone();
                    stuffing.push(tokio::spawn(async move {
                        let _ = s.write_all(&junk).await;
                    }));
                }
                if let Some(Ok(mut s)) = poll_once(conn.open_uni()).await {
                    extra.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let junk = junk.clone();
                    stuffing.push(tokio::spawn(async move {
                        let _ = s.write_all(&junk).await;
                    }));
                }
            }
            let why = closed(&conn, "a stuffed anonymous connection").await;
            for s in stuffing {
                s.abort();
            }
            drop(ep);
            why
        });
    }
    while let Some(why) = peers.join_next().await {
        let why = why.unwrap();
        assert_eq!(app_code(&why), Some(close::BUSY), "{why}");
    }
    assert_eq!(
        extra_streams.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "peers opened streams beyond the one request stream"
    );
    let (peak_after, _) = memory_kib(pid);
    let grown = peak_after.saturating_sub(peak_before);
    // Each connection may hold one stream window (about 1.1 MiB) plus
    // quinn's and rustls's own state; 4 MiB each is a generous bound, and
    // three orders of magnitude below what the defaults allowed.
    let bound = CONNECTIONS as u64 * 4 * 1024;
    eprintln!("peak resident memory: {peak_before} KiB before, {peak_after} KiB after");
    assert!(
        grown < bound,
        "peak resident memory grew by {grown} KiB (bound {bound} KiB) for {CONNECTIONS} connections"
    );
    // The coordinator still enrolls an honest newcomer.
    let token = run(
        &binary("coordinator"),
        &[
            "token",
            "create",
            "--label",
            "honest",
            "--dir",
            home.to_str().unwrap(),
        ],
    );
    let state = fleet_edge_agent::state::StateDir::at(dir.join("agent"));
    let id = fleet_edge_agent::enroll::enroll(&state, addr, "localhost", ca, token.trim(), None)
        .await
        .expect("an honest enrollment after the attack");
    assert!(id > 0);
}

#[tokio::test]
async fn a_device_without_the_memory_to_train_the_model_is_not_selected() {
    let dir = scratch("harden-memory");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    // The 2NN at batch 32 needs 5 MiB (`ModelSpec::training_memory_bytes`).
    let spec = ModelSpec::fashion_2nn();
    assert_eq!(spec.training_memory_bytes(32).div_ceil(1 << 20), 5);
    let mut task = small_task("memory", &spec);
    task.train.batch_size = 32;
    start_task(&mut admin, task).await;
    let mut configs = Vec::new();
    for k in 0..2 {
        let (_, state) = c.enroll(&mut admin, &dir.join(format!("agent-{k}"))).await;
        configs.push(device_config(&state));
    }
    let check_in = |memory_mib| AgentMessage::CheckIn {
        capabilities: Capabilities {
            memory_mib,
            eligible: true,
        },
    };
    let mut small = connect(c.addr, configs[0].clone()).await;
    assert!(matches!(
        small.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    ));
    // 4 MiB: told to come back in a quarter of an hour, every time.
    for _ in 0..3 {
        let reply = small.call(&check_in(4)).await;
        assert_eq!(
            reply,
            Some(CoordinatorMessage::ComeBackLater { after_ms: 900_000 })
        );
    }
    let text = c.coordinator.metrics_text().await;
    assert_eq!(metric(&text, "fleet_rejected_total{reason=\"memory\"}"), 3);
    // Enough memory: the plan.
    let mut big = connect(c.addr, configs[1].clone()).await;
    big.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    assert!(
        matches!(
            big.call(&check_in(5)).await,
            Some(CoordinatorMessage::Plan(_))
        ),
        "a device with 5 MiB is selected"
    );
}

/// A coordinator busy deciding (a long round close, a slow fsync) keeps
/// serving the network: a device whose idle timeout is a third of the busy
/// spell keeps its connection, and its request is answered once the
/// decision thread is free. The device runs on its own thread, so only the
/// coordinator's own I/O keeps the connection alive.
#[tokio::test]
async fn a_busy_coordinator_keeps_its_connections_alive() {
    let dir = scratch("harden-busy");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (_, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let mut cfg = device_config(&state);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(Duration::from_secs(1).try_into().unwrap()))
        .keep_alive_interval(Some(Duration::from_millis(200)));
    cfg.transport_config(Arc::new(transport));
    let busy = Duration::from_secs(3);

    let addr = c.addr;
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let device = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut p = connect(addr, cfg).await;
            assert!(matches!(
                p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
                Some(CoordinatorMessage::HelloAck { .. })
            ));
            ready_tx.send(()).unwrap();
            go_rx.await.unwrap();
            let asked = Instant::now();
            let reply = p.call(&checkin()).await;
            let _ = done_tx.send((reply, asked.elapsed(), p.conn.close_reason()));
            p.conn.close(close::DONE.into(), b"done");
        })
    });
    ready.await.expect("the device connected");
    // The busy spell is queued before the device asks.
    let (_, ()) = tokio::join!(c.coordinator.occupy(busy), async {
        go.send(()).unwrap();
    });
    let (reply, waited, lost) = tokio::time::timeout(PATIENCE, done)
        .await
        .expect("the device never heard back")
        .expect("the device's thread failed");
    device.join().unwrap();
    assert_eq!(
        lost, None,
        "the connection was lost while the coordinator was busy"
    );
    assert!(
        matches!(reply, Some(CoordinatorMessage::ComeBackLater { .. })),
        "{reply:?}"
    );
    // The answer waited for the decision thread: the spell did overlap.
    assert!(waited >= busy / 2, "answered after {waited:?}");
}
