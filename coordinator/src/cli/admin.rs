//! The admin client: connects to a running coordinator over QUIC with the
//! admin certificate from the coordinator's home directory, sends one
//! [`AdminRequest`] and prints the answer as a table or JSON.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

use clap::{Args, Subcommand, ValueEnum};
use fleet_aggregation::codec::CodecKind;
use fleet_aggregation::privacy::accountant::ledger::PrivacyBudget;
use fleet_aggregation::privacy::adaptive::AdaptiveClipping;
use fleet_aggregation::privacy::{DpConfig, NoisePlacement};
use fleet_aggregation::{CentredClip, RelativeBound, StrategyConfig, StrategyName};
use fleet_models::export::Variant;
use fleet_models::{ModelKind, TrainConfig};

use super::models::{codec_kind, model_kind};
use fleet_protocol::admin::{AdminRequest, AdminResponse, TaskCommand};
use fleet_protocol::session::{Dialer, Session, SessionError, client_endpoint};
use fleet_protocol::task::{EngineConfig, SecureAggregation, TaskSpec};
use fleet_protocol::tls::client_config;
use serde::Serialize;

use crate::home::Home;

/// A connection to a coordinator as an administrator: a
/// [`fleet_protocol::session::Session`] of admin requests, with errors as
/// the sentences the command line prints.
pub struct AdminClient {
    session: Session<AdminRequest>,
}

impl AdminClient {
    /// Connects with the admin credentials of `home`, to `addr` (default: the
    /// home's listen address).
    pub async fn connect(home: &Home, addr: Option<SocketAddr>) -> Result<Self, String> {
        let settings = home.settings()?;
        let mut addr = addr.unwrap_or(settings.listen);
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        let (cert, key) = home.admin_identity()?;
        let cfg = client_config(&home.ca_cert()?, cert, key).map_err(|e| e.to_string())?;
        let name = settings
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into());
        Self::connect_with(addr, &name, cfg).await
    }

    /// Connects to `addr` (named `name` in its certificate) with any client configuration.
    pub async fn connect_with(
        addr: SocketAddr,
        name: &str,
        cfg: quinn::ClientConfig,
    ) -> Result<Self, String> {
        let endpoint = client_endpoint(addr, cfg).map_err(say)?;
        let session = Dialer::new(endpoint, addr, name)
            .open(concat!("coordinator ", env!("CARGO_PKG_VERSION")))
            .await
            .map_err(say)?;
        Ok(Self { session })
    }

    /// Sends a request and waits for the answer; a refusal becomes `Err`.
    pub async fn call(&mut self, req: &AdminRequest) -> Result<AdminResponse, String> {
        self.session.request("the request", req).await.map_err(say)
    }
}

/// What the command line prints for a session's failure.
fn say(e: SessionError) -> String {
    match e {
        SessionError::Refused { error, .. } => format!("refused: {}", error.message),
        SessionError::Connect { .. } | SessionError::Handshake { .. } => {
            format!("{e} (is `coordinator serve` running?)")
        }
        SessionError::Finished => "the coordinator closed the connection".into(),
        other => other.to_string(),
    }
}

/// `token` commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A one-time enrollment token for a new device (printed once).
    Create {
        /// Label of the device-to-be.
        #[arg(long, default_value = "device")]
        label: String,
        /// Validity in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
    },
}

/// `devices` commands.
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Enrolled devices.
    List,
    /// Revokes a device: refused from now on, live connections dropped.
    Revoke {
        /// Device id (see `devices list`).
        device: u64,
    },
}

/// `tasks` commands.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// Registers a task (paused; start it with `tasks start`).
    Create(Box<TaskArgs>),
    /// Registered tasks and their progress.
    List,
    /// Starts or resumes a task.
    Start {
        /// Task id.
        task: u64,
    },
    /// Pauses a task (the open round's accepted updates are kept).
    Pause {
        /// Task id.
        task: u64,
    },
    /// Ends a task for good.
    Stop {
        /// Task id.
        task: u64,
    },
}

/// `models` commands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Model versions, newest first, with their inference artifacts (float
    /// and int8 ONNX: object id and size; `-` while not built yet; `--json`
    /// also gives why a build failed). An artifact file is
    /// `<home>/objects/<id>`, readable with `models inspect`.
    List {
        /// Only this task's.
        #[arg(long)]
        task: Option<u64>,
    },
    /// Deploys a model version to the fleet (id or unique prefix).
    Deploy {
        /// Model id or prefix (see `models list`).
        model: String,
    },
    /// Returns to the previously deployed version.
    Rollback,
    /// Exports a model object as a float ONNX artifact (runs locally).
    ///
    /// Example: coordinator models export --model 2nn --params <home>/objects/<id> --version 12 --out 2nn-v12-float.onnx
    Export(super::models::ExportArgs),
    /// Quantizes a model object to an int8 ONNX artifact (runs locally).
    ///
    /// Example: coordinator models quantize --model cnn --params <home>/objects/<id> --version 12 --calibration-data fashion-mnist --out cnn-v12-int8.onnx
    Quantize(super::models::QuantizeArgs),
    /// Shows an artifact's metadata, hash, operators and problems (runs locally).
    Inspect(super::models::InspectArgs),
}

/// The definition of a task on the command line.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Name.
    #[arg(long, default_value = "task")]
    pub name: String,
    /// Model.
    #[arg(long, value_parser = model_kind(), default_value = "2nn")]
    pub model: ModelKind,
    /// Rounds to run.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Reports wanted per round.
    #[arg(long, default_value_t = 10)]
    pub target: usize,
    /// Fewest reports with which a round still closes (default: target).
    #[arg(long)]
    pub min_reports: Option<usize>,
    /// Devices selected per wanted report.
    #[arg(long, default_value_t = 1.3)]
    pub over_selection: f64,
    /// Seconds selection may last.
    #[arg(long, default_value_t = 60)]
    pub selection_timeout: u64,
    /// Seconds at the start of selection during which checking-in devices
    /// are gathered; the cohort is then drawn at random among them, so that
    /// answering first or often gains a device nothing (0: the first
    /// devices to check in are selected). Shorter than the selection timeout.
    #[arg(long, default_value_t = 10)]
    pub selection_window: u64,
    /// Seconds selected devices have to report.
    #[arg(long, default_value_t = 300)]
    pub report_deadline: u64,
    /// Seconds after which a device that is not needed while reports are
    /// collected checks in again.
    #[arg(long, default_value_t = 10)]
    pub retry_secs: u64,
    /// Devices eligible for the task; default: target. With a participation
    /// limit, population × limit must cover rounds × min-reports.
    #[arg(long)]
    pub population: Option<u64>,
    /// Most rounds one device's update may be aggregated in. In a private
    /// task the ledger then charges the device that took part most often
    /// instead of every round, a much smaller ε for long tasks.
    #[arg(long)]
    pub max_participations: Option<u32>,
    /// Fewest rounds between two participations of one device (2: never in
    /// two consecutive rounds); also caps participations.
    #[arg(long, default_value_t = 0)]
    pub min_separation: u64,
    /// Most local examples a report may declare (its weight in the mean, in
    /// a task without DP); a report declaring more is refused before its
    /// update is uploaded. Lower it to what the fleet's devices can hold.
    #[arg(long, default_value_t = fleet_protocol::task::DEFAULT_MAX_EXAMPLES)]
    pub max_examples: u64,
    /// Turns off the relative bound: without it one device's update and
    /// declared examples can move the mean as far as they like (see
    /// docs/security.md, "A report's influence is bounded").
    #[arg(long)]
    pub no_relative_bound: bool,
    /// Relative bound: each update is scaled down to at most this times the
    /// basis norm (the lower median norm of the previous round's reports).
    #[arg(long, default_value_t = RelativeBound::DEFAULT.norm_factor)]
    pub bound_norm_factor: f64,
    /// Relative bound: each report counts with at most this times the
    /// basis weight (the lower median of the previous round's declared
    /// examples).
    #[arg(long, default_value_t = RelativeBound::DEFAULT.weight_factor)]
    pub bound_weight_factor: f64,
    /// Relative bound: in the first round, the reports whose medians set
    /// the basis (held until they are in; at most 64).
    #[arg(long, default_value_t = RelativeBound::DEFAULT.warmup)]
    pub bound_warmup: u32,
    /// Turns off centred clipping (on by default with the relative bound):
    /// each update's deviation from the previous round's delta is clipped
    /// to the previous round's median deviation (see the aggregation
    /// crate's `centred` module).
    #[arg(long)]
    pub no_centred_clip: bool,
    /// Centred clipping: the radius is this times the previous round's
    /// lower median deviation.
    #[arg(long, default_value_t = CentredClip::DEFAULT.radius_factor)]
    pub centred_radius_factor: f64,
    /// Local epochs.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// Aggregation strategy: fedavg, fedavgm, fedadam, fedyogi, fedadagrad,
    /// median, trimmed-mean or krum.
    #[arg(long, default_value = "fedavg")]
    pub strategy: StrategyName,
    /// Server learning rate (FedAvg: 1).
    #[arg(long)]
    pub server_lr: Option<f32>,
    /// Update encoding on the wire: f32, f16, int8 or topk (10% of the
    /// coordinates, f16 values).
    #[arg(long, value_parser = codec_kind(), default_value = "f32")]
    pub codec: CodecKind,
    /// Differential privacy: noise multiplier z (turns DP-FedAvg on).
    #[arg(long)]
    pub dp_noise: Option<f64>,
    /// Differential privacy: clipping norm.
    #[arg(long, default_value_t = 1.0)]
    pub dp_clip: f64,
    /// Differential privacy: where the noise is added. `server` (the
    /// default): the coordinator clips every update again and noises the
    /// sum; it is trusted, as it sees each update before the noise.
    /// `client`: each device adds its share; there is no secure
    /// aggregation, so the coordinator sees each update with noise
    /// multiplier z/√target only.
    /// (Default: `server`, or `client` with --secure.)
    #[arg(long, value_enum)]
    pub dp_placement: Option<PlacementName>,
    /// Differential privacy: adaptive clipping to this quantile of update
    /// norms (Andrew et al. 2021; 0.5 is their default). The clip starts
    /// at --dp-clip; the count of clipped updates shares the round's
    /// noise budget. Server placement only.
    #[arg(long)]
    pub dp_adaptive_quantile: Option<f64>,
    /// Differential privacy: adaptive clipping's learning rate.
    #[arg(long, default_value_t = 0.2)]
    pub dp_adaptive_lr: f64,
    /// Differential privacy: noise on the count of clipped updates
    /// (default: target/20); must exceed half the noise multiplier.
    #[arg(long)]
    pub dp_count_noise: Option<f64>,
    /// Secure aggregation (SecAgg+): the coordinator learns only the sum
    /// of each round's updates. Devices clip, quantise and add their share
    /// of the noise (Skellam) themselves; the rule is the mean, the codec
    /// f32, and there is no relative bound (it needs each update). The
    /// round's reports are the devices' signed key advertisements.
    #[arg(long)]
    pub secure: bool,
    /// Secure aggregation: shares needed to rebuild a device's secrets, out
    /// of its neighbours (default: a majority of --secure-degree). A
    /// device's update stays hidden unless this many of its neighbours
    /// collude with the coordinator. The quorum (--min-reports) must exceed it.
    #[arg(long, requires = "secure")]
    pub secure_threshold: Option<u16>,
    /// Secure aggregation: neighbours of each device on the round's random
    /// ring (default: 2·⌈log2 target⌉, at least 4, at most target − 1).
    #[arg(long, requires = "secure")]
    pub secure_degree: Option<u16>,
    /// Secure aggregation: the longest wait of each stage after the reports
    /// are in, in seconds.
    #[arg(long, requires = "secure", default_value_t = 30)]
    pub secure_stage_timeout: u64,
    /// Secure aggregation without DP: the L2 clip of each update (with DP,
    /// --dp-clip).
    #[arg(long, requires = "secure", default_value_t = 1.0)]
    pub secure_clip: f64,
    /// Differential privacy: ε budget (rounds that would exceed it are refused).
    #[arg(long)]
    pub budget_epsilon: Option<f64>,
    /// Differential privacy: δ of the budget and of reported ε.
    #[arg(long, default_value_t = 1e-5)]
    pub budget_delta: f64,
    /// Seed of the initial model and of local training.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Inference artifact shipped to agents when a model of this task is
    /// deployed (both are built for every model version).
    #[arg(long, value_enum, default_value_t = VariantName::Int8)]
    pub variant: VariantName,
}

/// Where differential-privacy noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementName {
    /// On the server, on the sum of updates it clipped again.
    Server,
    /// On each device, z/√target each.
    Client,
}

/// Inference artifact variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantName {
    /// Int8 weights and activations: about a quarter of the float size.
    Int8,
    /// 32-bit float weights and activations.
    Float,
}

impl TaskArgs {
    /// The task these arguments define.
    pub fn spec(&self) -> TaskSpec {
        let strategy = StrategyConfig {
            bound: (!self.no_relative_bound).then_some(RelativeBound {
                warmup: self.bound_warmup,
                norm_factor: self.bound_norm_factor,
                weight_factor: self.bound_weight_factor,
            }),
            centred: (!self.no_relative_bound && !self.no_centred_clip).then_some(CentredClip {
                radius_factor: self.centred_radius_factor,
            }),
            ..self.strategy.config(self.server_lr, self.target)
        };
        let dp = self.dp_noise.map(|z| DpConfig {
            clip_norm: self.dp_clip,
            noise_multiplier: z,
            placement: match self.dp_placement {
                Some(PlacementName::Server) => NoisePlacement::Server,
                Some(PlacementName::Client) => NoisePlacement::Client,
                None if self.secure => NoisePlacement::Client,
                None => NoisePlacement::Server,
            },
            expected_cohort: self.target,
            adaptive: self.dp_adaptive_quantile.map(|q| AdaptiveClipping {
                target_quantile: q,
                learning_rate: self.dp_adaptive_lr,
                count_noise_std: self.dp_count_noise.unwrap_or(self.target as f64 / 20.0),
            }),
        });
        TaskSpec {
            name: self.name.clone(),
            model: self.model.fashion(),
            train: TrainConfig {
                epochs: self.epochs,
                batch_size: self.batch,
                learning_rate: self.lr,
                seed: self.seed,
                ..TrainConfig::default()
            },
            strategy,
            codec: self.codec.codec(0.1),
            dp,
            budget: self.budget_epsilon.map(|epsilon| PrivacyBudget {
                epsilon,
                delta: self.budget_delta,
            }),
            population: self.population.unwrap_or(self.target as u64),
            engine: EngineConfig {
                target: self.target,
                over_selection: self.over_selection,
                min_reports: self.min_reports.unwrap_or(self.target),
                selection_timeout_ms: self.selection_timeout * 1000,
                selection_window_ms: self.selection_window * 1000,
                report_deadline_ms: self.report_deadline * 1000,
                rounds: self.rounds,
                pace_jitter_ms: 1_000,
                retry_ms: self.retry_secs * 1000,
                seed: self.seed,
                max_participations: self.max_participations,
                min_separation: self.min_separation,
            },
            seed: self.seed,
            variant: match self.variant {
                VariantName::Int8 => Variant::Int8,
                VariantName::Float => Variant::Float,
            },
            max_examples: self.max_examples,
            secure_aggregation: self.secure.then(|| {
                let defaults = SecureAggregation::for_cohort(self.target);
                let degree = self.secure_degree.unwrap_or(defaults.degree);
                SecureAggregation {
                    degree,
                    threshold: self
                        .secure_threshold
                        .unwrap_or_else(|| (degree / 2 + 1).min(degree).max(2)),
                    stage_timeout_ms: self.secure_stage_timeout * 1000,
                    clip_norm: self.dp_noise.is_none().then_some(self.secure_clip),
                }
            }),
        }
    }
}

/// An admin command for the running coordinator.
#[derive(Debug)]
pub enum AdminCommand {
    /// `token …`
    Token(TokenCommand),
    /// `devices …`
    Devices(DevicesCommand),
    /// `tasks …`
    Tasks(TasksCommand),
    /// `rounds <task>`
    Rounds(u64),
    /// `models …`
    Models(ModelsCommand),
    /// `budget <task>`
    Budget(u64),
    /// `drift`
    Drift {
        /// Which scopes to list: fleet, cohort, device or all.
        scope: DriftScope,
    },
}

/// Scopes listed by `coordinator drift`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DriftScope {
    /// The fleet and every cohort.
    Cohorts,
    /// The fleet only.
    Fleet,
    /// Every device with a score.
    Devices,
    /// Everything.
    All,
}

impl AdminCommand {
    fn request(&self) -> AdminRequest {
        match self {
            AdminCommand::Token(TokenCommand::Create { label, ttl_hours }) => {
                AdminRequest::CreateToken {
                    label: label.clone(),
                    ttl_secs: ttl_hours * 3600,
                }
            }
            AdminCommand::Devices(DevicesCommand::List) => AdminRequest::ListDevices,
            AdminCommand::Devices(DevicesCommand::Revoke { device }) => {
                AdminRequest::RevokeDevice { device: *device }
            }
            AdminCommand::Tasks(TasksCommand::Create(args)) => {
                AdminRequest::CreateTask(Box::new(args.spec()))
            }
            AdminCommand::Tasks(TasksCommand::List) => AdminRequest::ListTasks,
            AdminCommand::Tasks(TasksCommand::Start { task }) => AdminRequest::SetTaskState {
                task: *task,
                command: TaskCommand::Start,
            },
            AdminCommand::Tasks(TasksCommand::Pause { task }) => AdminRequest::SetTaskState {
                task: *task,
                command: TaskCommand::Pause,
            },
            AdminCommand::Tasks(TasksCommand::Stop { task }) => AdminRequest::SetTaskState {
                task: *task,
                command: TaskCommand::Stop,
            },
            AdminCommand::Rounds(task) => AdminRequest::ListRounds { task: *task },
            AdminCommand::Models(ModelsCommand::List { task }) => {
                AdminRequest::ListModels { task: *task }
            }
            AdminCommand::Models(ModelsCommand::Deploy { model }) => AdminRequest::Deploy {
                model: model.clone(),
            },
            AdminCommand::Models(ModelsCommand::Rollback) => AdminRequest::Rollback,
            AdminCommand::Models(
                ModelsCommand::Export(_) | ModelsCommand::Quantize(_) | ModelsCommand::Inspect(_),
            ) => unreachable!("artifact commands run locally (cli::run)"),
            AdminCommand::Budget(task) => AdminRequest::Budget { task: *task },
            AdminCommand::Drift { .. } => AdminRequest::Drift,
        }
    }
}

/// Runs an admin command against the coordinator of `home`.
pub fn run(
    home: &Home,
    addr: Option<SocketAddr>,
    cmd: AdminCommand,
    json: bool,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (answer, tasks) = rt.block_on(async {
        let mut client = AdminClient::connect(home, addr).await?;
        let answer = client.call(&cmd.request()).await?;
        // An ε is printed with what it assumes, which is in the task's spec.
        let tasks = match &cmd {
            AdminCommand::Budget(_) | AdminCommand::Rounds(_) => {
                match client.call(&AdminRequest::ListTasks).await? {
                    AdminResponse::Tasks(t) => t,
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        Ok::<_, String>((answer, tasks))
    })?;
    let assumptions = match &cmd {
        AdminCommand::Budget(task) | AdminCommand::Rounds(task) => tasks
            .iter()
            .find(|t| t.id == *task)
            .map(|t| t.spec.privacy_assumptions())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let answer = match (&cmd, answer) {
        (AdminCommand::Drift { scope }, AdminResponse::Drift(Some(mut d))) => {
            d.scopes.retain(|s| keep_scope(*scope, &s.scope));
            AdminResponse::Drift(Some(d))
        }
        (_, answer) => answer,
    };
    let mut out = String::new();
    if json {
        render_json(&mut out, &answer, &assumptions);
    } else {
        render_table(&mut out, &answer);
        render_assumptions(&mut out, &answer, &assumptions);
    }
    // A closed pipe (`| head`) is not an error worth a panic.
    match std::io::stdout().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.to_string()),
        _ => Ok(()),
    }
}

fn keep_scope(which: DriftScope, scope: &str) -> bool {
    let device = scope.starts_with("device ");
    match which {
        DriftScope::All => true,
        DriftScope::Fleet => scope == "fleet",
        DriftScope::Cohorts => !device,
        DriftScope::Devices => device,
    }
}

fn render_drift(out: &mut String, d: &fleet_protocol::admin::DriftInfo) {
    let _ = writeln!(
        out,
        "deployment {}, windows of {} s; {}",
        d.deployment,
        d.window_secs,
        match (d.window, d.closed_at) {
            (Some(w), Some(at)) => format!("last closed window {w} at {} UTC", utc(at)),
            _ => "no window closed yet".into(),
        }
    );
    if d.scopes.is_empty() && d.events.is_empty() && d.rejected.is_empty() {
        return;
    }
    let f = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.3}"));
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{:.1}%", 100.0 * v));
    table(
        out,
        &[
            "SCOPE",
            "DEVICES",
            "INPUTS",
            "PSI",
            "JS",
            "KS",
            "LABEL-PSI",
            "CONF-PSI",
            "ACCURACY",
            "ACC-DROP",
            "FLAGS",
        ],
        d.scopes
            .iter()
            .map(|s| {
                let sc = s.scores.as_ref();
                vec![
                    s.scope.clone(),
                    s.devices.to_string(),
                    sc.map_or("too few".into(), |x| format!("{:.0}", x.inputs)),
                    f(sc.map(|x| x.covariate_psi)),
                    f(sc.map(|x| x.covariate_js)),
                    f(sc.map(|x| x.covariate_ks)),
                    f(sc.and_then(|x| x.label_psi)),
                    f(sc.and_then(|x| x.confidence_psi)),
                    pct(sc.and_then(|x| x.accuracy)),
                    f(sc.and_then(|x| x.accuracy_drop)),
                    s.raised
                        .iter()
                        .map(|x| x.name())
                        .collect::<Vec<_>>()
                        .join(","),
                ]
            })
            .collect(),
    );
    if !d.events.is_empty() {
        let _ = writeln!(out, "\nflag changes:");
        for e in &d.events {
            let _ = writeln!(
                out,
                "  {} UTC  window {}  {} {} {} (score {:.3}){}",
                utc(e.at),
                e.window,
                e.scope,
                e.signal.name(),
                if e.raised { "raised" } else { "cleared" },
                e.score,
                e.action
                    .as_ref()
                    .map(|a| format!("; {a}"))
                    .unwrap_or_default()
            );
        }
    }
    if !d.rejected.is_empty() {
        let list: Vec<String> = d.rejected.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(out, "refused summaries: {}", list.join(", "));
    }
}

/// Under a private task's ε (its rounds or its budget), what that ε assumes.
fn render_assumptions(out: &mut String, answer: &AdminResponse, assumptions: &[String]) {
    let has_epsilon = match answer {
        AdminResponse::Rounds(r) => r.iter().any(|r| r.epsilon.is_some()),
        AdminResponse::Budget(b) => b.private,
        _ => false,
    };
    if !has_epsilon || assumptions.is_empty() {
        return;
    }
    let _ = writeln!(out, "ε assumes:");
    for line in assumptions {
        let _ = writeln!(out, "  - {line}");
    }
}

fn render_json(out: &mut String, answer: &AdminResponse, assumptions: &[String]) {
    let text = match answer {
        AdminResponse::Devices(v) => to_json(v),
        AdminResponse::Tasks(v) => to_json(v),
        AdminResponse::Rounds(v) => to_json(v),
        AdminResponse::Models(v) => to_json(v),
        AdminResponse::Budget(v) => {
            let mut value = serde_json::to_value(v).expect("plain data serialises");
            if let Some(o) = value.as_object_mut() {
                o.insert("assumptions".into(), assumptions.into());
            }
            to_json(&value)
        }
        AdminResponse::Drift(v) => to_json(v),
        other => to_json(other),
    };
    let _ = writeln!(out, "{text}");
}

pub(crate) fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string_pretty(v).expect("plain data serialises")
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss` UTC (days to civil date as in
/// Howard Hinnant's `civil_from_days`).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub(crate) fn when(secs: Option<u64>) -> String {
    secs.map_or("-".into(), utc)
}

pub(crate) fn table(out: &mut String, header: &[&str], rows: Vec<Vec<String>>) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn render_table(out: &mut String, answer: &AdminResponse) {
    macro_rules! outln {
        ($($t:tt)*) => {{
            let _ = writeln!(out, $($t)*);
        }};
    }
    match answer {
        AdminResponse::HelloAck { .. } => {}
        AdminResponse::Token { token, expires_at } => {
            outln!("{token}");
            eprintln!(
                "one-time token, valid until {} UTC; on the device, put it in a file only \
                 the agent's user reads (e.g. /etc/fleet-edge-agent/token) and run:\n  \
                 edge-agent enroll --coordinator <host:port> --ca ca.crt --token-file <file>",
                utc(*expires_at)
            );
        }
        AdminResponse::Devices(devices) => table(
            out,
            &[
                "ID",
                "LABEL",
                "CONNECTED",
                "ENROLLED",
                "LAST SEEN",
                "REVOKED",
            ],
            devices
                .iter()
                .map(|d| {
                    vec![
                        d.id.to_string(),
                        d.label.clone(),
                        if d.connected { "yes" } else { "no" }.into(),
                        utc(d.enrolled_at),
                        when(d.last_seen),
                        when(d.revoked_at),
                    ]
                })
                .collect(),
        ),
        AdminResponse::Tasks(tasks) => table(
            out,
            &["ID", "NAME", "STATE", "ROUNDS", "MODEL", "DP", "NOTE"],
            tasks
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.spec.name.clone(),
                        format!("{:?}", t.state).to_lowercase(),
                        format!("{}/{}", t.rounds_closed, t.spec.engine.rounds),
                        format!("{} {}", t.spec.model.name(), &t.model[..12]),
                        t.spec
                            .dp
                            .map_or("off".into(), |d| format!("z={}", d.noise_multiplier)),
                        t.note.clone().unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        AdminResponse::Rounds(rounds) => table(
            out,
            &[
                "ROUND",
                "OUTCOME",
                "UPDATES",
                "EPSILON",
                "MODEL",
                "PARTICIPANTS",
            ],
            rounds
                .iter()
                .map(|r| {
                    vec![
                        r.round.to_string(),
                        r.outcome.clone(),
                        r.participants.len().to_string(),
                        r.epsilon.map_or("-".into(), |e| format!("{e:.4}")),
                        r.model.as_ref().map_or("-".into(), |m| m[..12].to_string()),
                        r.participants
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect(),
        ),
        AdminResponse::Models(models) => table(
            out,
            &[
                "ID", "TASK", "ROUND", "BYTES", "CREATED", "DEPLOYED", "FLOAT", "INT8",
            ],
            models
                .iter()
                .map(|m| {
                    let artifact =
                        |variant: &str| match m.artifacts.iter().find(|a| a.variant == variant) {
                            None => "-".to_string(),
                            Some(a) => match (&a.id, a.size) {
                                (Some(id), Some(size)) => format!("{} ({size} B)", &id[..12]),
                                _ => "failed".to_string(),
                            },
                        };
                    vec![
                        m.id.clone(),
                        m.task.to_string(),
                        m.round.to_string(),
                        m.size.to_string(),
                        utc(m.created_at),
                        if m.deployed { "yes" } else { "" }.into(),
                        artifact("float"),
                        artifact("int8"),
                    ]
                })
                .collect(),
        ),
        AdminResponse::Budget(b) => {
            outln!("task {}: {} private rounds accounted", b.task, b.rounds);
            match &b.budget {
                Some(budget) => {
                    outln!("budget: ε = {} at δ = {:e}", budget.epsilon, budget.delta)
                }
                None => outln!("budget: none"),
            }
            match (&b.spent, b.delta) {
                (Some(s), Some(delta)) => outln!(
                    "spent:  ε = {:.4} at δ = {delta:e} (RDP {:.4}, PLD {:.4})",
                    s.epsilon,
                    s.epsilon_rdp,
                    s.epsilon_pld
                ),
                _ if b.private => outln!("spent:  nothing yet (no private round has closed)"),
                _ => outln!("spent:  the task is not private"),
            }
        }
        AdminResponse::Drift(None) => outln!(
            "no drift monitoring: nothing is deployed, or the deployed model has no calibration data \
             (deploy one with `coordinator models deploy <id>`)"
        ),
        AdminResponse::Drift(Some(d)) => render_drift(out, d),
        AdminResponse::Done { message, .. } => outln!("{message}"),
        AdminResponse::Error(e) => outln!("refused: {}", e.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        task: TaskArgs,
    }

    fn spec(args: &[&str]) -> TaskSpec {
        let mut all = vec!["test"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().task.spec()
    }

    #[test]
    fn secure_aggregation_from_the_command_line() {
        let s = spec(&["--target", "10", "--secure", "--dp-noise", "1.0"]);
        let sa = s.secure_aggregation.unwrap();
        assert_eq!(s.dp.unwrap().placement, NoisePlacement::Client);
        assert_eq!((sa.degree, sa.threshold, sa.clip_norm), (8, 5, None));
        assert_eq!(sa.stage_timeout_ms, 30_000);
        s.validate().unwrap();
        let s = spec(&[
            "--target",
            "5",
            "--secure",
            "--secure-degree",
            "4",
            "--secure-threshold",
            "2",
            "--secure-clip",
            "3",
        ]);
        let sa = s.secure_aggregation.unwrap();
        assert_eq!((sa.degree, sa.threshold, sa.clip_norm), (4, 2, Some(3.0)));
        s.validate().unwrap();
        // Server-placed noise cannot go with it, and says why.
        let s = spec(&["--secure", "--dp-noise", "1.0", "--dp-placement", "server"]);
        let e = s.validate().unwrap_err();
        assert!(e.contains("use client"), "{e}");
        // The secure settings need --secure.
        assert!(Cli::try_parse_from(["test", "--secure-degree", "4"]).is_err());
    }

    #[test]
    fn dp_noise_goes_on_the_server_unless_asked_otherwise() {
        let s = spec(&["--dp-noise", "1.0"]);
        assert_eq!(s.dp.unwrap().placement, NoisePlacement::Server);
        s.validate().unwrap();
        let s = spec(&["--dp-noise", "1.0", "--dp-placement", "client"]);
        assert_eq!(s.dp.unwrap().placement, NoisePlacement::Client);
        assert!(
            s.privacy_assumptions()
                .iter()
                .any(|l| l.contains("z/√m = 0.3162")),
            "{:?}",
            s.privacy_assumptions()
        );
    }

    #[test]
    fn the_budget_and_rounds_print_what_their_epsilon_assumes() {
        let s = spec(&["--dp-noise", "1.0"]);
        let budget = AdminResponse::Budget(fleet_protocol::admin::BudgetInfo {
            task: 1,
            private: true,
            budget: None,
            spent: None,
            delta: None,
            rounds: 0,
        });
        let mut out = String::new();
        render_assumptions(&mut out, &budget, &s.privacy_assumptions());
        assert!(
            out.contains("noise on the server") && out.contains("trusted"),
            "{out}"
        );
        assert!(out.contains("no sampling amplification"), "{out}");
        let mut json = String::new();
        render_json(&mut json, &budget, &s.privacy_assumptions());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["assumptions"].as_array().unwrap().len(), 2, "{v}");
    }

    #[test]
    fn unix_seconds_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_861_223), "2026-11-28 10:20:23");
    }
}
