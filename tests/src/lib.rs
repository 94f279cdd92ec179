//! Helpers of the end-to-end tests (in this crate's `tests/` directory):
//! scratch directories, an in-process coordinator with a real home
//! directory, enrollment through the real protocol, and the paths of the
//! workspace's binaries for the tests that run separate processes; and a
//! UDP relay that impairs traffic ([`relay`]); and the bodies of the fuzz
//! targets ([`fuzz`]).

pub mod fuzz;
pub mod relay;
pub mod replicas;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleet_coordinator::cli::admin::AdminClient;
use fleet_coordinator::home::{Home, Settings};
use fleet_coordinator::server::Coordinator;
use fleet_edge_agent::state::StateDir;
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::tls::client_config;

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A UDP port free right now on loopback.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// A TCP port free right now on loopback.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free TCP port")
        .port()
}

/// A binary of this workspace, built by `cargo test --workspace` next to the test binaries.
/// Panics, with the command to run, when it is missing or older than any
/// source it is built from (as after `cargo test -p fleet-e2e` alone, which
/// does not rebuild it), so that a test never runs a stale binary.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    let build = "`cargo test --workspace --no-run` (or `cargo build --bins -p fleet-coordinator \
                 -p fleet-edge-agent`); `cargo test --workspace` builds them, `cargo test -p \
                 fleet-e2e` or `--test NAME` alone do not";
    assert!(
        path.is_file(),
        "{} is not built; run {build}",
        path.display()
    );
    // Checked once per binary and test process.
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|c| c == name) {
        return path;
    }
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .expect("binary modification time");
    if let Some(source) = newest_source(name).filter(|(_, changed)| *changed > built) {
        panic!(
            "{} is older than {}, changed since it was built; run {build}",
            path.display(),
            source.0.display()
        );
    }
    checked.push(name.to_string());
    path
}

/// The most recently modified file among the sources of binary `name`
/// (`coordinator` or `edge-agent`): the Rust files, manifests and embedded
/// data of its crate and of the crates it depends on, the lock file and, for
/// the agent, the patched dependency. Left out, because a default build does
/// not compile them (so cargo would not relink the binary after they
/// change): the crates' `tests/`, `benches/` and `examples/`, unit-test
/// files (`tests.rs`, `testing.rs`) and the `cuda` feature's module.
fn newest_source(name: &str) -> Option<(PathBuf, std::time::SystemTime)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let mut newest: Option<(PathBuf, std::time::SystemTime)> = None;
    let mut stack: Vec<PathBuf> = [
        "Cargo.toml",
        "Cargo.lock",
        "protocol",
        "aggregation",
        "drift",
        "models",
    ]
    .iter()
    .map(|p| root.join(p))
    .collect();
    match name {
        "coordinator" => stack.push(root.join("coordinator")),
        "edge-agent" => stack.extend([root.join("edge-agent"), root.join("patches")]),
        other => panic!("no sources known for binary {other}"),
    }
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if meta.is_dir() {
            if matches!(name, "tests" | "benches" | "examples" | "target" | "cuda") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
            continue;
        }
        let source = match name.rsplit_once('.') {
            Some((stem, "rs")) => !matches!(stem, "tests" | "testing" | "cuda"),
            Some((_, "toml" | "lock" | "gz")) => true,
            _ => false,
        };
        if let Ok(t) = meta.modified()
            && source
            && newest.as_ref().is_none_or(|(_, n)| t > *n)
        {
            newest = Some((p, t));
        }
    }
    newest
}

/// A coordinator running in this process on loopback, with its own home.
pub struct InProcess {
    /// The home directory.
    pub home: Home,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// The coordinator.
    pub coordinator: Arc<Coordinator>,
    /// The endpoint it serves.
    pub endpoint: quinn::Endpoint,
}

impl InProcess {
    /// Creates a home in `dir` and starts serving (on the current runtime).
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, Default::default()).await
    }

    /// Like [`InProcess::start`], with these drift monitoring settings.
    pub async fn start_with(dir: &Path, drift: fleet_coordinator::home::DriftSettings) -> Self {
        Self::start_configured(dir, drift, Default::default()).await
    }

    /// Like [`InProcess::start`], with these connection and request limits.
    pub async fn start_limited(dir: &Path, limits: fleet_coordinator::limits::Limits) -> Self {
        Self::start_configured(dir, Default::default(), limits).await
    }

    async fn start_configured(
        dir: &Path,
        drift: fleet_coordinator::home::DriftSettings,
        limits: fleet_coordinator::limits::Limits,
    ) -> Self {
        let home = Home::at(dir.join("coordinator"));
        home.init(
            &Settings {
                listen: "127.0.0.1:0".parse().unwrap(),
                server_names: vec!["localhost".into()],
                metrics: None,
                drift,
                limits,
                keep_models: Some(fleet_coordinator::store::KEEP_MODELS),
                store: None,
            },
            "ops",
        )
        .expect("init");
        Self::open(home).await
    }

    /// Opens an existing home and serves it.
    pub async fn open(home: Home) -> Self {
        let coordinator = Arc::new(Coordinator::open(&home).expect("open"));
        let endpoint =
            quinn::Endpoint::server(coordinator.server_config(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let addr = endpoint.local_addr().unwrap();
        tokio::spawn(coordinator.clone().serve(endpoint.clone(), None));
        Self {
            home,
            addr,
            coordinator,
            endpoint,
        }
    }

    /// An admin connection.
    pub async fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.home, Some(self.addr))
            .await
            .expect("admin connects")
    }

    /// Enrolls a device through the real protocol; returns its id and state directory.
    pub async fn enroll(&self, admin: &mut AdminClient, state: &Path) -> (u64, StateDir) {
        let AdminResponse::Token { token, .. } = admin
            .call(&AdminRequest::CreateToken {
                label: "test".into(),
                ttl_secs: 60,
            })
            .await
            .unwrap()
        else {
            panic!("no token")
        };
        let dir = StateDir::at(state);
        let id = fleet_edge_agent::enroll::enroll(
            &dir,
            self.addr,
            "localhost",
            self.home.ca_cert().unwrap(),
            &token,
            None,
        )
        .await
        .expect("enrollment");
        (id, dir)
    }
}

/// The QUIC client configuration of an enrolled device.
pub fn device_config(state: &StateDir) -> quinn::ClientConfig {
    let (cert, key, ca) = state.credentials().unwrap();
    client_config(&ca, cert, key).unwrap()
}

/// A child process whose output goes to a log file; killed when dropped.
pub struct Proc {
    /// The process.
    pub child: std::process::Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin args…`, logging to `log`.
    pub fn spawn(bin: &Path, args: &[&str], log: &Path) -> Self {
        Self::spawn_with_env(bin, args, log, &[])
    }

    /// [`Proc::spawn`] with these environment variables set.
    pub fn spawn_with_env(bin: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = std::process::Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    /// The log so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills with SIGKILL and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `bin args…` to completion; returns its stdout, panicking with its
/// stderr when it fails.
pub fn run(bin: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after `secs` with `what`.
pub fn wait_for<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`), 0 when the
/// process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// `coordinator init` of a home at `home` listening on `addr` for the host
/// name `localhost`, with `extra` flags.
pub fn init_home(home: &Path, addr: &str, extra: &[&str]) {
    let mut args = vec![
        "init",
        "--dir",
        home.to_str().unwrap(),
        "--listen",
        addr,
        "--host",
        "localhost",
    ];
    args.extend_from_slice(extra);
    run(&binary("coordinator"), &args);
}

/// `edge-agent data split` of `source` into `devices` data directories
/// under `out`, with `extra` flags (a partition).
pub fn split_data(out: &Path, devices: usize, source: &str, extra: &[&str]) {
    let devices = devices.to_string();
    let mut args = vec![
        "data",
        "split",
        "--out",
        out.to_str().unwrap(),
        "--devices",
        &devices,
        "--source",
        source,
    ];
    args.extend_from_slice(extra);
    run(&binary("edge-agent"), &args);
}

/// Waits until the coordinator of `home` answers an admin command.
pub fn wait_listening(home: &Path) {
    wait_for(60, "the coordinator to listen", || {
        std::process::Command::new(binary("coordinator"))
            .args(["tasks", "list", "--dir", home.to_str().unwrap()])
            .output()
            .ok()
            .filter(|o| o.status.success())
    });
}

/// A coordinator process with its home, and the agents around it.
pub struct ProcessFleet {
    /// Scratch directory.
    pub dir: PathBuf,
    /// Coordinator home.
    pub home: PathBuf,
    /// `host:port` of the coordinator.
    pub addr: String,
    /// The coordinator process.
    pub coordinator: Option<Proc>,
    /// Agent processes, by index.
    pub agents: Vec<Option<Proc>>,
}

impl ProcessFleet {
    /// Initialises a home, starts the coordinator, splits the embedded or
    /// full Fashion-MNIST training set across `devices` data directories with
    /// Dirichlet(0.5), and enrolls that many agents (not started yet).
    pub fn new(name: &str, devices: usize, source: &str) -> Self {
        let dir = scratch(name);
        let home = dir.join("home");
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let metrics = format!("127.0.0.1:{}", free_tcp_port());
        init_home(&home, &addr, &["--metrics", &metrics]);
        let mut fleet = Self {
            dir: dir.clone(),
            home: home.clone(),
            addr,
            coordinator: None,
            agents: Vec::new(),
        };
        fleet.start_coordinator();
        let data = dir.join("data");
        split_data(&data, devices, source, &["--partition", "dirichlet:0.5"]);
        for k in 0..devices {
            fleet.enroll_agent(&data.join(format!("device-{k}")));
        }
        fleet
    }

    /// Enrolls one more agent (state `agent-<k>`, not started) holding the
    /// data directory `data`; returns its index `k`.
    pub fn enroll_agent(&mut self, data: &Path) -> usize {
        let k = self.agents.len();
        let token = self.admin(&["token", "create", "--label", &format!("device-{k}")]);
        let state = self.dir.join(format!("agent-{k}"));
        enroll_process(&state, &self.addr, &self.home, &token, data);
        self.agents.push(None);
        k
    }

    /// Starts (or restarts) the coordinator process and waits until it answers.
    pub fn start_coordinator(&mut self) {
        let log = self.dir.join("coordinator.log");
        self.coordinator = Some(Proc::spawn(
            &binary("coordinator"),
            &["serve", "--dir", self.home.to_str().unwrap()],
            &log,
        ));
        wait_listening(&self.home);
    }

    /// Starts agent `k` with extra `args`.
    pub fn start_agent(&mut self, k: usize, args: &[&str]) {
        let state = self.dir.join(format!("agent-{k}"));
        let mut all = vec!["run", "--state", state.to_str().unwrap(), "--allow-battery"];
        all.extend_from_slice(args);
        let log = self.dir.join(format!("agent-{k}.log"));
        self.agents[k] = Some(Proc::spawn(&binary("edge-agent"), &all, &log));
    }

    /// Runs an admin command against the coordinator; returns stdout.
    pub fn admin(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend(["--dir", self.home.to_str().unwrap()]);
        run(&binary("coordinator"), &all)
    }

    /// Creates a task in which every enrolled device takes part in every
    /// round (target = population = devices, no over-selection), one local
    /// epoch, devices told to come back after `retry` seconds; `extra`
    /// flags are appended. Returns the admin command's output.
    pub fn create_task(&self, name: &str, rounds: u64, retry: u64, extra: &[&str]) -> String {
        self.create_task_for(name, rounds, self.agents.len(), retry, extra)
    }

    /// [`ProcessFleet::create_task`] with `target` reports wanted of as
    /// many selected (the population is every enrolled device).
    pub fn create_task_for(
        &self,
        name: &str,
        rounds: u64,
        target: usize,
        retry: u64,
        extra: &[&str],
    ) -> String {
        let args = task_args(name, rounds, self.agents.len(), target, retry, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.admin(&args)
    }

    /// The closed rounds of `task`: round number and sorted participants.
    pub fn closed_rounds(&self, task: u64) -> Vec<(u64, Vec<u64>)> {
        self.closed_round_models(task)
            .into_iter()
            .map(|(round, _, participants)| (round, participants))
            .collect()
    }

    /// The closed rounds of `task`: round number, the model it produced
    /// (hex id) and sorted participants.
    pub fn closed_round_models(&self, task: u64) -> Vec<(u64, String, Vec<u64>)> {
        let rounds = self.admin_json(&["rounds", &task.to_string()]);
        rounds
            .as_array()
            .expect("a list of rounds")
            .iter()
            .filter(|r| r["outcome"] == "closed")
            .map(|r| {
                let mut p: Vec<u64> = r["participants"]
                    .as_array()
                    .expect("participants")
                    .iter()
                    .map(|v| v.as_u64().expect("device id"))
                    .collect();
                p.sort_unstable();
                (
                    r["round"].as_u64().expect("round number"),
                    r["model"].as_str().expect("model id").to_string(),
                    p,
                )
            })
            .collect()
    }

    /// An admin listing as JSON.
    pub fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.admin(&all)).expect("admin JSON")
    }

    /// Waits until task `id` is finished (or panics after `secs`, with the logs).
    pub fn wait_finished(&self, id: u64, secs: u64) {
        let logs = || {
            let mut text =
                std::fs::read_to_string(self.dir.join("coordinator.log")).unwrap_or_default();
            for k in 0..self.agents.len() {
                text += &format!("\n--- agent {k} ---\n");
                text += &std::fs::read_to_string(self.dir.join(format!("agent-{k}.log")))
                    .unwrap_or_default();
            }
            text
        };
        wait_task_finished(|| self.admin_json(&["tasks", "list"]), id, secs, logs);
    }

    /// The parameters of a model version stored by the coordinator.
    pub fn model(&self, id: &str) -> Vec<f32> {
        let bytes = std::fs::read(self.home.join("objects").join(id)).expect("model object");
        fleet_protocol::message::bytes_to_params(&bytes).expect("f32 model")
    }
}

/// A raw device connection: one bidirectional stream of protocol frames.
pub struct Peer {
    _ep: quinn::Endpoint,
    /// The connection.
    pub conn: quinn::Connection,
    /// The stream's send half (for raw frames).
    pub tx: quinn::SendStream,
    /// The stream's receive half.
    pub rx: quinn::RecvStream,
}

impl Peer {
    /// Sends `m` and returns the answer (none: the stream closed).
    pub async fn call(
        &mut self,
        m: &fleet_protocol::message::AgentMessage,
    ) -> Option<fleet_protocol::message::CoordinatorMessage> {
        fleet_protocol::stream::send(&mut self.tx, m).await.ok()?;
        fleet_protocol::stream::recv(&mut self.rx, fleet_protocol::MAX_FRAME)
            .await
            .ok()
            .flatten()
    }
}

/// Connects to `addr` with `cfg` and opens the session's stream; says
/// nothing yet (tests send `hello` themselves, or raw frames).
pub async fn connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Peer {
    try_connect(addr, cfg).await.unwrap()
}

/// [`connect`], or why it failed (a refused or closed connection).
pub async fn try_connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<Peer, String> {
    use fleet_protocol::session::{Dialer, client_endpoint};
    let ep = client_endpoint(addr, cfg).map_err(|e| e.to_string())?;
    let (ep, conn, tx, rx) = Dialer::new(ep, addr, "localhost")
        .connect::<fleet_protocol::message::AgentMessage>()
        .await
        .map_err(|e| e.to_string())?
        .into_parts();
    Ok(Peer {
        _ep: ep,
        conn,
        tx,
        rx,
    })
}

/// The error code of a refusal, if `m` is one.
pub fn code(
    m: Option<fleet_protocol::message::CoordinatorMessage>,
) -> Option<fleet_protocol::ErrorCode> {
    match m {
        Some(fleet_protocol::message::CoordinatorMessage::Error(e)) => Some(e.code),
        _ => None,
    }
}

/// The agent's first message, speaking `version`.
pub fn hello(version: u16) -> fleet_protocol::message::AgentMessage {
    fleet_protocol::message::AgentMessage::Hello {
        version,
        min_version: version.min(1),
        software: "test".into(),
    }
}

/// Sends an admin request that must succeed.
pub async fn ok(
    admin: &mut fleet_coordinator::cli::admin::AdminClient,
    req: fleet_protocol::admin::AdminRequest,
) -> fleet_protocol::admin::AdminResponse {
    admin
        .call(&req)
        .await
        .unwrap_or_else(|e| panic!("{req:?}: {e}"))
}

/// The value of the Prometheus sample `series` (name and labels); panics
/// when the text has no such sample, so that a metric that is never
/// exported cannot pass for a zero.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let value = l.strip_prefix(series)?.strip_prefix(' ')?;
            Some(
                value
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{series}: value {value:?} is not a count: {e}")),
            )
        })
        .unwrap_or_else(|| panic!("no sample {series} in the metrics:\n{text}"))
}

/// A one-round FedAvg task of `spec` for two devices, without the relative
/// bound (tests compute its means by hand; `byzantine.rs` runs the
/// defaults).
pub fn small_task(name: &str, spec: &fleet_models::ModelSpec) -> fleet_protocol::task::TaskSpec {
    use fleet_protocol::task::{EngineConfig, TaskSpec};
    TaskSpec {
        name: name.into(),
        model: spec.clone(),
        train: fleet_models::TrainConfig::default(),
        strategy: fleet_aggregation::StrategyConfig {
            bound: None,
            centred: None,
            ..fleet_aggregation::StrategyConfig::fedavg()
        },
        codec: fleet_aggregation::Codec::F32,
        dp: None,
        budget: None,
        population: 2,
        engine: EngineConfig {
            target: 2,
            over_selection: 1.0,
            min_reports: 1,
            rounds: 1,
            ..EngineConfig::default()
        },
        seed: 1,
        variant: Default::default(),
        max_examples: fleet_protocol::task::DEFAULT_MAX_EXAMPLES,
        secure_aggregation: None,
    }
}

/// Sends one request to an agent's prediction socket (none: no answer).
pub fn ask_socket(
    socket: &Path,
    request: &fleet_edge_agent::inference::endpoint::Request,
) -> Option<fleet_edge_agent::inference::endpoint::Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        fleet_edge_agent::inference::endpoint::call(&mut stream, request)
            .await
            .ok()
    })
}

/// A device's check-in, eligible, with 1 GiB (enough to train every model the tests use).
pub fn checkin() -> fleet_protocol::message::AgentMessage {
    fleet_protocol::message::AgentMessage::CheckIn {
        capabilities: fleet_protocol::message::Capabilities {
            memory_mib: 1024,
            eligible: true,
        },
    }
}

/// Announces `values` (f32 codec, 10 examples) as `p`'s update of (task,
/// round) for a model of `spec`, asserts the announcement is taken, then
/// sends the bytes in one chunk; the coordinator's answer to the chunk.
pub async fn upload(
    p: &mut Peer,
    spec: &fleet_models::ModelSpec,
    task: u64,
    round: u64,
    values: &[f32],
) -> Option<fleet_protocol::message::CoordinatorMessage> {
    use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
    let (meta, bytes) = update(spec, task, round, values);
    let started = p.call(&AgentMessage::BeginUpload(meta.clone())).await;
    assert!(
        matches!(started, Some(CoordinatorMessage::UploadProgress { .. })),
        "{started:?}"
    );
    p.call(&AgentMessage::UploadChunk {
        object: meta.object.id,
        offset: 0,
        data: bytes,
    })
    .await
}

/// `values` encoded as f32 and its announcement as (task, round)'s update
/// of 10 examples for a model of `spec`.
pub fn update(
    spec: &fleet_models::ModelSpec,
    task: u64,
    round: u64,
    values: &[f32],
) -> (fleet_protocol::message::UpdateMeta, Vec<u8>) {
    use fleet_protocol::message::{ObjectId, ObjectRef, UpdateMeta};
    use rand::SeedableRng;
    let bytes = fleet_aggregation::codec::Codec::F32
        .encode(values, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    let meta = UpdateMeta {
        task,
        round,
        fingerprint: spec.layout().fingerprint(),
        object: ObjectRef {
            id: ObjectId::of(&bytes),
            size: bytes.len() as u64,
        },
        examples: Some(10),
        train_loss: Some(1.0),
    };
    (meta, bytes)
}

/// Creates `small_task(name, spec)` through `admin` (paused); its id.
pub async fn create_small_task(
    admin: &mut fleet_coordinator::cli::admin::AdminClient,
    name: &str,
    spec: &fleet_models::ModelSpec,
) -> u64 {
    use fleet_protocol::admin::{AdminRequest, AdminResponse};
    let req = AdminRequest::CreateTask(Box::new(small_task(name, spec)));
    match ok(admin, req).await {
        AdminResponse::Done { id: Some(task), .. } => task,
        other => panic!("task {name:?} not created: {other:?}"),
    }
}

/// The arguments of `coordinator tasks create` for a task in which
/// `target` of `devices` enrolled devices report each round (the
/// population is every device, no over-selection), one local epoch,
/// devices told to come back after `retry` seconds; `extra` flags are
/// appended.
pub fn task_args(
    name: &str,
    rounds: u64,
    devices: usize,
    target: usize,
    retry: u64,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "tasks",
        "create",
        "--name",
        name,
        "--rounds",
        &rounds.to_string(),
        "--target",
        &target.to_string(),
        "--population",
        &devices.to_string(),
        "--over-selection",
        "1",
        "--epochs",
        "1",
        "--retry-secs",
        &retry.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // No selection window unless the test asks for one: every device
    // takes part in every round anyway.
    if !extra.contains(&"--selection-window") {
        args.extend(["--selection-window".into(), "0".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `edge-agent enroll` of the state directory `state` at the coordinator
/// `addr` (named `localhost`) of `home` with `token`, holding the data
/// directory `data`.
pub fn enroll_process(state: &Path, addr: &str, home: &Path, token: &str, data: &Path) {
    run(
        &binary("edge-agent"),
        &[
            "enroll",
            "--state",
            state.to_str().unwrap(),
            "--coordinator",
            addr,
            "--server-name",
            "localhost",
            "--ca",
            home.join("ca.crt").to_str().unwrap(),
            "--token",
            token.trim(),
            "--data",
            data.to_str().unwrap(),
        ],
    );
}

/// Waits until task `id` is finished in the listing `tasks` returns (or
/// panics after `secs`, or when it stopped, with `logs`).
pub fn wait_task_finished(
    tasks: impl Fn() -> serde_json::Value,
    id: u64,
    secs: u64,
    logs: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let task = tasks()
            .as_array()
            .and_then(|a| a.iter().find(|t| t["id"] == id))
            .cloned();
        match task.as_ref().and_then(|t| t["state"].as_str()) {
            Some("Finished") => return,
            Some("Stopped") => panic!("task {id} stopped: {task:?}\n{}", logs()),
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "task {id} did not finish in {secs} s: {task:?}\n{}",
            logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}
