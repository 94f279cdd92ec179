//! The `edge-agent` binary: parses the command line and runs it on one
//! current-thread runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use fleet_edge_agent::state::StateDir;
use fleet_edge_agent::{config, install};
use fleet_models::data::fashion::{self, Split};
use fleet_models::data::partition::{Scheme, partition};
use fleet_models::data::{device, embedded};
use fleet_protocol::logging::{self, LogFormat};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Edge agent of the fleet learning runtime.
///
/// Enroll once (`enroll`), then `run` (or `install` a service that runs it).
#[derive(Debug, Parser)]
#[command(name = "edge-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines are written on standard error: `text`, or one JSON
    /// object per line for log shippers. `RUST_LOG` filters them (default `info`).
    #[arg(long, global = true, default_value = "text", value_parser = LogFormat::NAMES)]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enrolls this device with a coordinator, using a one-time token.
    #[command(group(ArgGroup::new("token_source").required(true).args(["token", "token_file"])))]
    Enroll {
        /// State directory (identity, cached model, pending update).
        #[arg(long, env = "FLEET_AGENT_STATE", default_value = "fleet-agent")]
        state: PathBuf,
        /// Coordinator address, host:port (UDP).
        #[arg(long)]
        coordinator: String,
        /// Name in the coordinator's certificate (default: the host of --coordinator).
        #[arg(long)]
        server_name: Option<String>,
        /// The coordinator's CA certificate (ca.crt from its home directory).
        #[arg(long)]
        ca: PathBuf,
        /// The one-time token from `coordinator token create`. Visible to
        /// other users in the process list: prefer --token-file.
        #[arg(long)]
        token: Option<String>,
        /// File holding the one-time token (whitespace around it is
        /// ignored); `-` reads it from standard input.
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Directory of local training data (images.idx, labels.idx).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Runs the agent: check in, train when selected, upload, repeat; fetch
    /// the deployed model and serve it (with --socket).
    Run {
        /// State directory.
        #[arg(long, env = "FLEET_AGENT_STATE", default_value = "fleet-agent")]
        state: PathBuf,
        /// Directory of local training data (overrides the configuration).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Exit after this many accepted updates.
        #[arg(long)]
        max_rounds: Option<u64>,
        /// Another address of the coordinator (a replica sharing its
        /// store); repeat for several. Tried in turn after the enrolled
        /// address when a connection cannot be made or is lost.
        #[arg(long = "replica", value_name = "HOST:PORT")]
        replicas: Vec<std::net::SocketAddr>,
        /// Upload bandwidth limit in bytes per second.
        #[arg(long)]
        upload_limit: Option<u64>,
        /// Train on battery too.
        #[arg(long)]
        allow_battery: bool,
        /// Serve predictions from the deployed model on this Unix socket
        /// (the schema of `edge-agent serve`; see docs/inference.md).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Seconds between checks for a newly deployed model (0: never).
        #[arg(long)]
        deployment_check_secs: Option<u64>,
        /// Cohort tag sent with drift summaries, e.g. region:eu or hw:rpi4
        /// (repeat for several; replaces the configured tags).
        #[arg(long = "drift-tag", value_name = "TAG")]
        drift_tags: Vec<String>,
        /// Summarise one served prediction in N for drift monitoring
        /// (1: all; 0: send no drift summaries).
        #[arg(long, value_name = "N")]
        drift_sample_every: Option<u64>,
        /// Add Gaussian noise to drift summaries: noise multiplier (noise
        /// std over the L2 sensitivity of one prediction); each window is
        /// accounted against --drift-epsilon.
        #[arg(long, value_name = "Z")]
        drift_noise: Option<f64>,
        /// ε budget of noised drift summaries (at --drift-delta); once
        /// spent, no more summaries are sent.
        #[arg(long, value_name = "EPSILON")]
        drift_epsilon: Option<f64>,
        /// δ of the drift summaries' budget.
        #[arg(long, value_name = "DELTA")]
        drift_delta: Option<f64>,
    },
    /// Shows the device's identity and activity.
    Status {
        /// State directory.
        #[arg(long, env = "FLEET_AGENT_STATE", default_value = "fleet-agent")]
        state: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Writes the run configuration and a systemd unit for this agent.
    Install {
        /// State directory (must hold an enrolled device).
        #[arg(long, env = "FLEET_AGENT_STATE", default_value = "fleet-agent")]
        state: PathBuf,
        /// Directory of local training data.
        #[arg(long)]
        data: PathBuf,
        /// Where to write the unit.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
        /// User the service runs as (must exist; a dedicated, unprivileged
        /// one is best).
        #[arg(long, default_value = install::DEFAULT_USER)]
        user: String,
        /// Upload bandwidth limit in bytes per second.
        #[arg(long)]
        upload_limit: Option<u64>,
        /// The network is metered (training then waits for an unmetered one).
        #[arg(long)]
        metered: bool,
    },
    /// Predicts with an inference artifact (ONNX, float or int8).
    ///
    /// INPUT is an IDX image file (gzip or not), raw pixel bytes, or raw
    /// little-endian float32 features. Example:
    /// edge-agent predict --model 2nn-v12-int8.onnx /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz --limit 5
    Predict {
        /// The artifact (its manifest, `<file>.json`, is checked when present).
        #[arg(long)]
        model: PathBuf,
        /// Input file.
        input: PathBuf,
        /// Most examples to predict.
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Serves predictions to apps on this device over a Unix socket
    /// (length-prefixed JSON; see docs/inference.md).
    Serve {
        /// The artifact.
        #[arg(long)]
        model: PathBuf,
        /// Socket path.
        #[arg(long, default_value = "fleet-agent.sock")]
        socket: PathBuf,
    },
    /// Local data tools.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Splits a data set into per-device data directories (out/device-<k>/).
    Split {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Number of devices.
        #[arg(long)]
        devices: usize,
        /// How labels spread: iid, dirichlet:<alpha> or shards:<n>.
        #[arg(long, default_value = "dirichlet:0.5")]
        partition: Scheme,
        /// Source: the embedded subset or the full Fashion-MNIST training set.
        #[arg(long, value_enum, default_value_t = Source::Embedded)]
        source: Source,
        /// Seed of the split.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Source {
    Embedded,
    FashionMnist,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .map_err(|e| format!("--coordinator {addr:?}: {e} (expected host:port)"))?
        .next()
        .ok_or_else(|| format!("--coordinator {addr:?} resolves to no address"))
}

/// Why the agent exits, and with which status.
struct Failure {
    code: u8,
    message: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Self {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    logging::init(cli.log_format.parse()?)?;
    match cli.command {
        Command::Enroll {
            state,
            coordinator,
            server_name,
            ca,
            token,
            token_file,
            data,
        } => {
            // Read first: a missing token is told before any connection.
            let token = match (token, token_file) {
                (Some(token), _) => token,
                (None, Some(path)) => fleet_edge_agent::enroll::read_token_file(&path)?,
                (None, None) => unreachable!("clap requires --token or --token-file"),
            };
            let addr = resolve(&coordinator)?;
            let name = server_name.unwrap_or_else(|| {
                coordinator
                    .rsplit_once(':')
                    .map_or(coordinator.clone(), |(h, _)| {
                        h.trim_matches(['[', ']']).to_string()
                    })
            });
            let ca = CertificateDer::from_pem_file(&ca)
                .map_err(|e| format!("{}: not a PEM certificate: {e}", ca.display()))?;
            let dir = StateDir::at(&state);
            let device = runtime()?.block_on(fleet_edge_agent::enroll::enroll(
                &dir, addr, &name, ca, &token, data,
            ))?;
            println!(
                "enrolled as device {device}; state in {}\nnext: edge-agent run --state {0}",
                state.display()
            );
            Ok(())
        }
        Command::Run {
            state,
            data,
            max_rounds,
            replicas,
            upload_limit,
            allow_battery,
            socket,
            deployment_check_secs,
            drift_tags,
            drift_sample_every,
            drift_noise,
            drift_epsilon,
            drift_delta,
        } => {
            let dir = StateDir::at(&state);
            let mut cfg = config::load(&dir)?;
            cfg.data = data.or(cfg.data);
            cfg.max_rounds = max_rounds.or(cfg.max_rounds);
            if !replicas.is_empty() {
                cfg.replicas = replicas;
            }
            cfg.upload_bytes_per_sec = upload_limit.or(cfg.upload_bytes_per_sec);
            if allow_battery {
                cfg.eligibility.require_ac_power = false;
            }
            cfg.socket = socket.or(cfg.socket);
            cfg.deployment_check_secs = deployment_check_secs.unwrap_or(cfg.deployment_check_secs);
            if !drift_tags.is_empty() {
                cfg.drift_tags = drift_tags;
            }
            cfg.drift_sample_every = drift_sample_every.unwrap_or(cfg.drift_sample_every);
            cfg.drift_noise_multiplier = drift_noise.or(cfg.drift_noise_multiplier);
            cfg.drift_epsilon = drift_epsilon.unwrap_or(cfg.drift_epsilon);
            cfg.drift_delta = drift_delta.unwrap_or(cfg.drift_delta);
            runtime()?
                .block_on(fleet_edge_agent::run::run(&dir, cfg))
                .map_err(|e| Failure {
                    code: e.exit_code(),
                    message: e.to_string(),
                })
        }
        Command::Status { state, json } => {
            let dir = StateDir::at(&state);
            let identity = dir.identity()?;
            let status = dir.status()?;
            let pending = dir.pending()?;
            let model = dir.cached_model()?.map(|(id, _)| id.to_string());
            if json {
                let v = serde_json::json!({
                    "identity": identity,
                    "status": status,
                    "pending_update": pending.as_ref().map(|p| &p.meta),
                    "cached_model": model,
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                println!("device:        {}", identity.device);
                println!(
                    "coordinator:   {} ({})",
                    identity.coordinator, identity.server_name
                );
                println!(
                    "data:          {}",
                    identity
                        .data
                        .map_or("-".into(), |d| d.display().to_string())
                );
                println!(
                    "accepted:      {} updates ({} refused)",
                    status.accepted, status.refused
                );
                println!(
                    "last round:    {}",
                    status
                        .last_round
                        .map_or("-".into(), |(t, r)| format!("task {t} round {r}"))
                );
                println!(
                    "bytes:         {} up, {} down",
                    status.bytes_up, status.bytes_down
                );
                println!(
                    "pending:       {}",
                    pending.map_or("none".into(), |p| format!(
                        "update for task {} round {} ({} bytes)",
                        p.meta.task, p.meta.round, p.meta.object.size
                    ))
                );
                println!("cached model:  {}", model.unwrap_or("-".into()));
                if let Some(e) = status.last_error {
                    println!("last error:    {e}");
                }
            }
            Ok(())
        }
        Command::Install {
            state,
            data,
            unit_dir,
            user,
            upload_limit,
            metered,
        } => {
            let dir = StateDir::at(&state);
            dir.identity()?;
            let mut cfg = config::load(&dir)?;
            cfg.data = Some(std::path::absolute(&data).map_err(|e| e.to_string())?);
            cfg.upload_bytes_per_sec = upload_limit;
            cfg.eligibility.metered = metered;
            let binary = std::env::current_exe().map_err(|e| e.to_string())?;
            let unit = install::install(&dir, &cfg, &binary, &unit_dir, &user)?;
            println!(
                "wrote {} and {}\nnext: systemctl daemon-reload && systemctl enable --now {}",
                dir.dir().join("config.json").display(),
                unit.display(),
                install::UNIT
            );
            Ok(())
        }
        Command::Predict {
            model,
            input,
            limit,
        } => {
            use fleet_edge_agent::inference::{Model, input};
            let model = Model::load_file(&model).map_err(|e| e.to_string())?;
            let x = input::read_input(&model, &input, limit).map_err(|e| e.to_string())?;
            let p = model.predict(&x.values).map_err(|e| e.to_string())?;
            eprintln!(
                "{} example(s) read as {} from {}; model version {} (tract kernels: {})",
                x.examples,
                x.kind,
                input.display(),
                model.version(),
                model.kernels().join(", ")
            );
            for line in input::describe(&model, &p) {
                println!("{line}");
            }
            Ok(())
        }
        Command::Serve { model, socket } => {
            use fleet_edge_agent::inference::{Model, Predictor, endpoint};
            let model = Model::load_file(&model).map_err(|e| e.to_string())?;
            let version = model.version();
            let kernels = model.kernels().join(", ");
            let predictor = std::sync::Arc::new(Predictor::new(model));
            runtime()?.block_on(async {
                let _ = std::fs::remove_file(&socket);
                let listener = tokio::net::UnixListener::bind(&socket)
                    .map_err(|e| Failure::from(format!("cannot listen on {}: {e}", socket.display())))?;
                eprintln!(
                    "serving model version {version} on {} (tract kernels: {kernels}); stop with Ctrl-C",
                    socket.display()
                );
                // Runs until the process is stopped (Ctrl-C, systemctl stop).
                endpoint::serve(listener, predictor, std::future::pending())
                    .await
                    .map_err(Failure::from)
            })
        }
        Command::Data(DataCommand::Split {
            out,
            devices,
            partition: scheme,
            source,
            seed,
        }) => {
            let (images, labels) = match source {
                Source::Embedded => embedded::raw(Split::Train),
                Source::FashionMnist => fashion::raw(&fashion::default_dir(), Split::Train),
            }
            .map_err(|e| e.to_string())?;
            let parts =
                partition(&labels.data, 10, devices, scheme, seed).map_err(|e| e.to_string())?;
            let dirs = device::write_partition(&out, &images, &labels, &parts)
                .map_err(|e| e.to_string())?;
            for (d, p) in dirs.iter().zip(&parts.clients) {
                println!("{}: {} examples", d.display(), p.len());
            }
            Ok(())
        }
    }
}
