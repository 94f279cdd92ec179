//! A hostile enrolled device over the wire, with the default settings.
//!
//! Nine honest agent processes train the 2NN on Dirichlet(0.5) shares of
//! the embedded Fashion-MNIST subset. A tenth device, driven by this test
//! through the real protocol with its own certificate, is hostile: every
//! round it is selected, it declares more examples than the task allows
//! (refused before the upload), then sends `f32::MAX` in every coordinate
//! declaring the largest example count the task allows; whenever it is
//! turned away it checks in again at once, twenty times over.
//!
//! The same task runs first with the nine honest devices only, then with the
//! hostile one among them, then once more with the relative bound off. With
//! the defaults the model stays finite and within 3 points of the honest
//! run; without the bound one round of the hostile device wrecks it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fleet_e2e::{ProcessFleet, checkin, code, device_config, hello, try_connect, update};
use fleet_edge_agent::state::StateDir;
use fleet_models::data::fashion::{self, Split};
use fleet_models::{Backend, ModelSpec, evaluate};
use fleet_protocol::ErrorCode;
use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::task::DEFAULT_MAX_EXAMPLES;
use fleet_protocol::transfer::CHUNK_SIZE;

const ROUNDS: u64 = 5;
/// Honest devices; the hostile one is a tenth of the cohort.
const HONEST: usize = 9;

/// What the hostile device did.
#[derive(Default)]
struct Hostile {
    /// Rounds whose plan it received.
    plans: AtomicU64,
    /// Over-claims the coordinator refused before the upload.
    overclaims_refused: AtomicU64,
    /// Updates of `f32::MAX` values the coordinator accepted.
    accepted: AtomicU64,
    /// Check-ins sent after being turned away.
    spam: AtomicU64,
}

/// The hostile device's loop, until `stop`.
async fn hostile(
    addr: SocketAddr,
    cfg: quinn::ClientConfig,
    stats: Arc<Hostile>,
    stop: Arc<AtomicBool>,
) {
    let spec = ModelSpec::fashion_2nn();
    let values = vec![f32::MAX; spec.layout().total];
    while !stop.load(Ordering::Relaxed) {
        // Refused connections (the per-device cap while earlier ones are
        // still closing) are part of the spam: try again.
        let Ok(mut p) = try_connect(addr, cfg.clone()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let hello_ack = p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
        if !matches!(hello_ack, Some(CoordinatorMessage::HelloAck { .. })) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut reply = p.call(&checkin()).await;
        // Turned away: check in again at once, twenty times over (a plan
        // may come back once the time it was told has passed).
        let mut spam = 0;
        while matches!(reply, Some(CoordinatorMessage::ComeBackLater { .. })) && spam < 20 {
            reply = p.call(&checkin()).await;
            stats.spam.fetch_add(1, Ordering::Relaxed);
            spam += 1;
        }
        if let Some(CoordinatorMessage::Plan(plan)) = reply {
            stats.plans.fetch_add(1, Ordering::Relaxed);
            send_hostile_update(&mut p, &plan, &spec, &values, &stats).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Over-claims (refused), then uploads `f32::MAX` everywhere declaring the
/// largest example count the task allows.
async fn send_hostile_update(
    p: &mut fleet_e2e::Peer,
    plan: &fleet_protocol::message::Plan,
    spec: &ModelSpec,
    values: &[f32],
    stats: &Hostile,
) {
    let (mut meta, bytes) = update(spec, plan.task, plan.round, values);
    meta.examples = Some(DEFAULT_MAX_EXAMPLES + 1);
    let reply = p.call(&AgentMessage::BeginUpload(meta.clone())).await;
    if code(reply) == Some(ErrorCode::UpdateRejected) {
        stats.overclaims_refused.fetch_add(1, Ordering::Relaxed);
    }
    meta.examples = Some(DEFAULT_MAX_EXAMPLES);
    let reply = p.call(&AgentMessage::BeginUpload(meta.clone())).await;
    if !matches!(reply, Some(CoordinatorMessage::UploadProgress { .. })) {
        return; // the round closed meanwhile
    }
    let mut last = None;
    for (k, chunk) in bytes.chunks(CHUNK_SIZE).enumerate() {
        last = p
            .call(&AgentMessage::UploadChunk {
                object: meta.object.id,
                offset: (k * CHUNK_SIZE) as u64,
                data: chunk.to_vec(),
            })
            .await;
    }
    if matches!(last, Some(CoordinatorMessage::UploadAccepted { .. })) {
        stats.accepted.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the hostile device on its own thread until the returned flag is set.
fn start_hostile(
    addr: SocketAddr,
    state: &std::path::Path,
) -> (Arc<Hostile>, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let cfg = device_config(&StateDir::at(state));
    let stats = Arc::new(Hostile::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, st) = (stats.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(hostile(addr, cfg, s, st));
    });
    (stats, stop, handle)
}

fn accuracy(params: &[f32], test: &fleet_models::Dataset) -> f32 {
    evaluate(
        &ModelSpec::fashion_2nn(),
        params,
        test.view(),
        Backend::DEFAULT,
    )
    .unwrap()
    .accuracy
}

#[test]
fn a_hostile_device_moves_the_model_no_further_than_the_bound_allows() {
    let dir = fashion::default_dir();
    assert!(
        fashion::available(&dir),
        "this test needs Fashion-MNIST: apt-get install dataset-fashion-mnist"
    );
    let test = fashion::load(&dir, Split::Test).unwrap();
    let mut fleet = ProcessFleet::new("byzantine", HONEST, "embedded");
    for k in 0..HONEST {
        fleet.start_agent(k, &[]);
    }
    // Cohorts drawn at random among the devices that checked in during the
    // first 2 s of selection (every device is needed here, but the hostile
    // one, always first, goes through the window like the others).
    let args = [
        "--batch",
        "32",
        "--lr",
        "0.05",
        "--report-deadline",
        "60",
        "--selection-window",
        "2",
    ];

    // The honest run: the honest devices, every one in every round.
    fleet.create_task("honest", ROUNDS, 1, &args);
    fleet.admin(&["tasks", "start", "1"]);
    fleet.wait_finished(1, 600);
    let honest = fleet.closed_round_models(1);
    assert_eq!(honest.len(), ROUNDS as usize);
    let honest_acc = accuracy(&fleet.model(&honest.last().unwrap().1), &test);

    // The hostile device enrolls (with a data directory it never uses).
    let k = fleet.enroll_agent(&fleet.dir.join("data").join("device-0"));
    let addr: SocketAddr = fleet.addr.parse().unwrap();
    let (stats, stop, handle) = start_hostile(addr, &fleet.dir.join(format!("agent-{k}")));
    let hostile_id = HONEST as u64 + 1;

    // The same task with the hostile device too, the defaults.
    fleet.create_task("attacked", ROUNDS, 1, &args);
    fleet.admin(&["tasks", "start", "2"]);
    fleet.wait_finished(2, 600);
    let attacked = fleet.closed_round_models(2);
    assert_eq!(attacked.len(), ROUNDS as usize);
    for (round, model, participants) in &attacked {
        assert!(
            participants.contains(&hostile_id),
            "round {round}: the hostile update was not aggregated: {participants:?}"
        );
        let params = fleet.model(model);
        assert!(
            params.iter().all(|v| v.is_finite()),
            "round {round}: a non-finite model"
        );
    }
    let attacked_acc = accuracy(&fleet.model(&attacked.last().unwrap().1), &test);
    eprintln!(
        "honest run: accuracy {honest_acc:.4}; with the hostile device: {attacked_acc:.4} \
         after {ROUNDS} rounds"
    );
    assert!(
        attacked_acc >= honest_acc - 0.03,
        "accuracy {attacked_acc} with the hostile device, {honest_acc} without"
    );
    assert_eq!(stats.accepted.load(Ordering::Relaxed), ROUNDS);
    assert_eq!(stats.overclaims_refused.load(Ordering::Relaxed), ROUNDS);
    let log = std::fs::read_to_string(fleet.dir.join("coordinator.log")).unwrap();
    let bounded = log
        .lines()
        .filter(|l| l.contains("task 2: round") && l.contains("by the relative bound"))
        .count();
    assert_eq!(
        bounded, ROUNDS as usize,
        "every round bounded the hostile update"
    );

    // Without the bound, one round of the same device takes the model.
    fleet.create_task(
        "unbounded",
        1,
        1,
        &[&args[..], &["--no-relative-bound"]].concat(),
    );
    fleet.admin(&["tasks", "start", "3"]);
    fleet.wait_finished(3, 600);
    let unbounded = fleet.closed_round_models(3);
    stop.store(true, Ordering::Relaxed);
    let wrecked = accuracy(&fleet.model(&unbounded[0].1), &test);
    eprintln!("without the relative bound: accuracy {wrecked:.4} after one round");
    assert!(wrecked < 0.3, "accuracy {wrecked} without the bound");
    eprintln!(
        "hostile device: {} plans, {} over-claims refused, {} updates accepted, {} spam check-ins",
        stats.plans.load(Ordering::Relaxed),
        stats.overclaims_refused.load(Ordering::Relaxed),
        stats.accepted.load(Ordering::Relaxed),
        stats.spam.load(Ordering::Relaxed)
    );
    handle.join().unwrap();
}
