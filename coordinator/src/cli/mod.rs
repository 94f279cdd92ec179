//! The `coordinator` command line: setting up a coordinator, running it,
//! administering it, and the privacy calculator.

pub mod admin;
pub mod models;
pub mod privacy;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fleet_protocol::logging::{self, LogFormat};

use crate::home::{Home, Settings};
use admin::{AdminCommand, DevicesCommand, ModelsCommand, TasksCommand, TokenCommand};

/// Coordinator and admin tool of the fleet learning runtime.
///
/// Start with `coordinator init`, then `coordinator serve`; administer the
/// running coordinator from another terminal with the other commands.
#[derive(Debug, Parser)]
#[command(name = "coordinator", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How `serve` writes its log lines on standard error: `text`, or one
    /// JSON object per line for log shippers. `RUST_LOG` filters them
    /// (default `info`).
    #[arg(long, global = true, default_value = "text", value_parser = LogFormat::NAMES)]
    pub log_format: String,
}

/// Where the coordinator's home is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct HomeArgs {
    /// The coordinator's home directory (CA, credentials, database).
    #[arg(
        long,
        global = true,
        env = "FLEET_COORDINATOR_DIR",
        default_value = "fleet-coordinator"
    )]
    pub dir: PathBuf,
    /// Address of the running coordinator (default: the one in the home's settings).
    #[arg(long, global = true)]
    pub coordinator: Option<SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Creates a coordinator home: certificate authority, server and admin certificates, settings.
    Init {
        /// Directory to create.
        #[arg(
            long,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// Host names or IP addresses agents use to reach the coordinator (repeatable).
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// TCP address of the Prometheus endpoint (`none` to disable).
        #[arg(long, default_value = "127.0.0.1:9400")]
        metrics: String,
        /// Name in the first administrator's certificate.
        #[arg(long, default_value = "admin")]
        admin_name: String,
        /// Encrypt the CA key with the passphrase in this file (at least 12
        /// bytes; one trailing newline is ignored). `serve` and
        /// `admins issue` then need it too. Recommended for any home that
        /// lives on a shared or backed-up disk.
        #[arg(long, env = "FLEET_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
        /// Keep the coordinator's state in this PostgreSQL database (a
        /// `postgres://` URL) instead of the embedded SQLite one, so that
        /// several `serve` processes can share it as replicas.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
    },
    /// Runs the coordinator (resumes a running task after a restart).
    Serve {
        /// The coordinator's home directory.
        #[arg(
            long,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// The file holding the CA key's passphrase, if the key is
        /// encrypted (default: the systemd credential `ca-passphrase`).
        #[arg(long, env = "FLEET_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
        /// Keep the state in this PostgreSQL database instead of the
        /// embedded SQLite one (overrides the settings' `store`), so that
        /// several `serve` processes share it as replicas: one runs the
        /// task, taking it over if that one dies; e.g.
        /// postgres://fleet@db.example/fleet.
        #[arg(long, env = "FLEET_STORE", value_name = "URL")]
        store: Option<String>,
        /// This replica's name in leases, `coordinator status` and metrics
        /// (default: host name and process id).
        #[arg(long, env = "FLEET_REPLICA", value_name = "NAME")]
        replica: Option<String>,
        /// On a shared store: `aggregator` makes this replica the preferred
        /// owner of the running task (an aggregation server, with a GPU
        /// where built with the `cuda` feature); `serve` replicas serve
        /// devices and run the task only while no aggregator is alive.
        #[arg(long, value_enum, default_value = "serve")]
        role: crate::app::Role,
        /// UDP address to listen on, instead of the settings' `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// TCP address of the Prometheus endpoint (`none` to disable),
        /// instead of the settings' `metrics`.
        #[arg(long)]
        metrics: Option<String>,
    },
    /// Enrollment tokens for new devices.
    Token {
        #[command(flatten)]
        home: HomeArgs,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled devices: list, revoke.
    Devices {
        #[command(flatten)]
        home: HomeArgs,
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Tasks: create, list, start, pause, stop.
    Tasks {
        #[command(flatten)]
        home: HomeArgs,
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Rounds of a task with their participants and ε.
    Rounds {
        #[command(flatten)]
        home: HomeArgs,
        /// Task id.
        task: u64,
    },
    /// Model versions: list, deploy, roll back; inference artifacts: export, quantize, inspect.
    Models {
        #[command(flatten)]
        home: HomeArgs,
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Privacy budget spent by a task.
    Budget {
        #[command(flatten)]
        home: HomeArgs,
        /// Task id.
        task: u64,
    },
    /// Drift of the deployed model: scores of the fleet, cohorts and devices in
    /// the last closed window, and recent flag changes.
    Drift {
        #[command(flatten)]
        home: HomeArgs,
        /// Scopes to list.
        #[arg(long, value_enum, default_value = "cohorts")]
        scope: admin::DriftScope,
    },
    /// Plan differential privacy: ε for a noise multiplier, or the noise for an ε.
    #[command(subcommand)]
    Privacy(privacy::PrivacyCommand),
    /// Administrators: issue a certificate, list, revoke. Works on the
    /// coordinator's host (it needs the CA key and the database), running
    /// coordinator or not.
    Admins {
        /// The coordinator's home directory.
        #[arg(
            long,
            global = true,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        /// The file holding the CA key's passphrase, if the key is
        /// encrypted (`admins issue` signs with it).
        #[arg(long, global = true, env = "FLEET_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
        #[command(subcommand)]
        command: AdminsCommand,
    },
    /// The CA key: encrypt it with a passphrase, or change the passphrase.
    /// Works on the coordinator's host; restart `serve` with the new
    /// passphrase afterwards.
    CaKey {
        /// The coordinator's home directory.
        #[arg(
            long,
            global = true,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// The file holding the key's current passphrase, if it is
        /// encrypted already.
        #[arg(long, global = true, env = "FLEET_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
        #[command(subcommand)]
        command: CaKeyCommand,
    },
    /// The audit log: every administrator's changing request (tokens,
    /// revocations, tasks, deployments) and its outcome, newest last. Works
    /// on the coordinator's host.
    /// The replicas sharing this coordinator's store, the task leases and
    /// which replica runs which task. Reads the store (the settings' or
    /// `--store`'s PostgreSQL database), so it works from any host that
    /// reaches it.
    Status {
        /// The coordinator's home directory.
        #[arg(
            long,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// The store's PostgreSQL URL, instead of the settings'.
        #[arg(long, env = "FLEET_STORE", value_name = "URL")]
        store: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    Audit {
        /// The coordinator's home directory.
        #[arg(
            long,
            env = "FLEET_COORDINATOR_DIR",
            default_value = "fleet-coordinator"
        )]
        dir: PathBuf,
        /// How many entries, the newest.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `coordinator ca-key …`
#[derive(Debug, Subcommand)]
pub enum CaKeyCommand {
    /// Encrypts the CA key (or re-encrypts it) with the passphrase in
    /// `--new-passphrase-file`: PKCS#8, PBKDF2-HMAC-SHA256 and AES-256-CBC,
    /// which `openssl pkey -in ca.key -passin file:FILE` also reads.
    Encrypt {
        /// The file holding the new passphrase (at least 12 bytes).
        #[arg(long)]
        new_passphrase_file: PathBuf,
    },
    /// Says whether the CA key is encrypted.
    Status,
}

/// `coordinator admins …`
#[derive(Debug, Subcommand)]
pub enum AdminsCommand {
    /// Issues a certificate for a new administrator and writes it, with
    /// its key, the CA certificate and the settings, into `--out`: hand
    /// that directory over; it works as `--dir` for the other commands.
    Issue {
        /// The administrator's name (in the certificate and the audit log).
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 90)]
        days: u64,
        /// Directory to write the credentials into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Lists every administrator certificate issued, with revocations.
    List,
    /// Revokes every certificate of an administrator: the coordinator
    /// refuses their next connection.
    Revoke {
        /// The administrator's name.
        name: String,
    },
}

fn ca_key(home: Home, command: CaKeyCommand) -> Result<(), String> {
    match command {
        CaKeyCommand::Encrypt {
            new_passphrase_file,
        } => {
            home.encrypt_ca_key(&new_passphrase_file)?;
            println!(
                "the CA key in {} is encrypted with the passphrase in {}\n  \
                 restart the coordinator with: coordinator serve --dir {0} --ca-passphrase-file {1}\n  \
                 keep the passphrase apart from the home (and from its backups)",
                home.dir().display(),
                new_passphrase_file.display()
            );
            Ok(())
        }
        CaKeyCommand::Status => {
            if home.ca_key_encrypted()? {
                println!("encrypted");
            } else {
                println!(
                    "not encrypted: encrypt it with `coordinator ca-key encrypt --dir {} \
                     --new-passphrase-file FILE`",
                    home.dir().display()
                );
            }
            Ok(())
        }
    }
}

fn admins(home: Home, json: bool, command: AdminsCommand) -> Result<(), String> {
    match command {
        AdminsCommand::Issue { name, days, out } => {
            let serial = home.issue_admin(&name, days, &out)?;
            let serial: String = serial.iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "administrator {name}: certificate {serial}, valid {days} days, written to {}\n  \
                 use it:  coordinator tasks list --dir {0}",
                out.display()
            );
            Ok(())
        }
        AdminsCommand::List => {
            let store = home.open_store()?;
            let rows = store.admins().map_err(|e| e.to_string())?;
            print_rows(json, rows, &["NAME", "SERIAL", "ISSUED", "REVOKED"], |r| {
                vec![
                    r.name,
                    r.serial,
                    admin::when(Some(r.issued_at)),
                    admin::when(r.revoked_at),
                ]
            });
            Ok(())
        }
        AdminsCommand::Revoke { name } => {
            let store = home.open_store()?;
            match store.revoke_admin(&name).map_err(|e| e.to_string())? {
                0 => Err(format!(
                    "no certificate of administrator {name:?} is active: see `coordinator admins list`"
                )),
                n => {
                    println!("administrator {name}: {n} certificate(s) revoked");
                    Ok(())
                }
            }
        }
    }
}

/// A `--metrics` value: an address, or `none`.
fn parse_metrics(m: &str) -> Result<Option<SocketAddr>, String> {
    match m {
        "none" => Ok(None),
        m => m
            .parse()
            .map(Some)
            .map_err(|e| format!("--metrics {m:?}: {e} (an address or `none`)")),
    }
}

/// `coordinator status`: replicas and leases, from the store.
fn status(home: Home, json: bool) -> Result<(), String> {
    let store = home.open_store()?;
    let now = crate::store::unix_millis();
    let replicas = store.replicas().map_err(|e| e.to_string())?;
    let leases = store.leases().map_err(|e| e.to_string())?;
    let running: Vec<u64> = store
        .tasks()
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|t| t.state == fleet_protocol::admin::TaskState::Running)
        .map(|t| t.id)
        .collect();
    let held = |l: &crate::store::Lease| l.expires_at > now;
    if json {
        let value = serde_json::json!({
            "store": home.store_location()?.display(),
            "running": running,
            "replicas": replicas.iter().map(|r| serde_json::json!({
                "name": r.name,
                "role": r.role,
                "alive": r.seen_at + crate::app::ALIVE_MS >= now,
                "started_at": r.started_at,
                "seen_at": r.seen_at,
                "owns": leases.iter().filter(|l| l.owner == r.name && held(l)).map(|l| l.task).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "leases": leases.iter().map(|l| serde_json::json!({
                "task": l.task,
                "owner": l.owner,
                "epoch": l.epoch,
                "expires_at": l.expires_at,
                "held": held(l),
            })).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    println!("store: {}", home.store_location()?.display());
    match running.as_slice() {
        [] => println!("running task: none"),
        ids => println!("running task: {ids:?}"),
    }
    println!("\nREPLICA                          ROLE        ALIVE  SEEN (s ago)  OWNS");
    for r in &replicas {
        let owns: Vec<String> = leases
            .iter()
            .filter(|l| l.owner == r.name && held(l))
            .map(|l| format!("task {}", l.task))
            .collect();
        println!(
            "{:<32} {:<11} {:<6} {:<13} {}",
            r.name,
            r.role,
            if r.seen_at + crate::app::ALIVE_MS >= now {
                "yes"
            } else {
                "no"
            },
            format!("{:.1}", now.saturating_sub(r.seen_at) as f64 / 1000.0),
            if owns.is_empty() {
                "-".into()
            } else {
                owns.join(", ")
            }
        );
    }
    if replicas.is_empty() {
        println!("(no replica has run on this store: a single coordinator on SQLite has none)");
    }
    println!("\nTASK  OWNER                            EPOCH  LEASE");
    for l in &leases {
        let state = if held(l) {
            format!("held, {:.1} s left", (l.expires_at - now) as f64 / 1000.0)
        } else {
            "free".to_string()
        };
        println!("{:<5} {:<32} {:<6} {state}", l.task, l.owner, l.epoch);
    }
    Ok(())
}

fn audit(dir: PathBuf, limit: usize, json: bool) -> Result<(), String> {
    let store = Home::at(&dir).open_store()?;
    let rows = store.audit_log(limit).map_err(|e| e.to_string())?;
    print_rows(
        json,
        rows,
        &["AT (UTC)", "ADMIN", "REQUEST", "OUTCOME"],
        |r| {
            vec![
                admin::when(Some(r.at / 1000)),
                r.admin,
                r.request,
                r.outcome,
            ]
        },
    );
    Ok(())
}

/// Prints `rows` as JSON, or as a table of the cells `cells` makes of each.
fn print_rows<T: serde::Serialize>(
    json: bool,
    rows: Vec<T>,
    header: &[&str],
    cells: impl Fn(T) -> Vec<String>,
) {
    let mut out = String::new();
    if json {
        out = admin::to_json(&rows);
    } else {
        admin::table(&mut out, header, rows.into_iter().map(cells).collect());
    }
    println!("{}", out.trim_end());
}

fn admin(home: HomeArgs, cmd: AdminCommand) -> Result<(), String> {
    admin::run(&Home::at(home.dir), home.coordinator, cmd, home.json)
}

/// Runs a parsed command line; the error's text is printed by `main`.
pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Init {
            dir,
            hosts,
            listen,
            metrics,
            admin_name,
            ca_passphrase_file,
            store,
        } => {
            let metrics = parse_metrics(&metrics)?;
            if let Some(url) = &store {
                // Checked (and its schema created) before anything is written.
                crate::store::Store::at(
                    &crate::store::Location::postgres(url).map_err(|e| e.to_string())?,
                )
                .map_err(|e| format!("--store: {e}"))?;
            }
            let encrypted = ca_passphrase_file.is_some();
            let home = Home::at(&dir).with_ca_passphrase(ca_passphrase_file);
            home.init(
                &Settings {
                    listen,
                    server_names: hosts,
                    metrics,
                    drift: Default::default(),
                    limits: Default::default(),
                    keep_models: Some(crate::store::KEEP_MODELS),
                    store,
                },
                &admin_name,
            )?;
            let serve = if encrypted {
                " --ca-passphrase-file FILE"
            } else {
                ""
            };
            println!(
                "coordinator home created in {}\n  run it:           coordinator serve --dir {0}{serve}\n  give devices:     {0}/ca.crt and a token from `coordinator token create --dir {0}`",
                dir.display()
            );
            Ok(())
        }
        Command::Serve {
            dir,
            ca_passphrase_file,
            store,
            replica,
            role,
            listen,
            metrics,
        } => {
            let metrics = metrics.as_deref().map(parse_metrics).transpose()?;
            logging::init(cli.log_format.parse()?)?;
            // Network I/O on every core; decisions on the App's own thread.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(crate::server::run(
                Home::at(&dir)
                    .with_ca_passphrase(ca_passphrase_file)
                    .with_store(store)
                    .with_replica(replica)
                    .with_role(role)
                    .serving_at(listen, metrics),
            ))
        }
        Command::Token { home, command } => admin(home, AdminCommand::Token(command)),
        Command::Devices { home, command } => admin(home, AdminCommand::Devices(command)),
        Command::Tasks { home, command } => admin(home, AdminCommand::Tasks(command)),
        Command::Rounds { home, task } => admin(home, AdminCommand::Rounds(task)),
        Command::Models { home, command } => match command {
            // Artifact commands work on files and need no running coordinator.
            ModelsCommand::Export(a) => models::run(models::ModelsCommand::Export(a)),
            ModelsCommand::Quantize(a) => models::run(models::ModelsCommand::Quantize(a)),
            ModelsCommand::Inspect(a) => models::run(models::ModelsCommand::Inspect(a)),
            other => admin(home, AdminCommand::Models(other)),
        },
        Command::Budget { home, task } => admin(home, AdminCommand::Budget(task)),
        Command::Drift { home, scope } => admin(home, AdminCommand::Drift { scope }),
        Command::Privacy(cmd) => privacy::run(cmd),
        Command::Admins {
            dir,
            json,
            ca_passphrase_file,
            command,
        } => admins(
            Home::at(dir).with_ca_passphrase(ca_passphrase_file),
            json,
            command,
        ),
        Command::CaKey {
            dir,
            ca_passphrase_file,
            command,
        } => ca_key(
            Home::at(dir).with_ca_passphrase(ca_passphrase_file),
            command,
        ),
        Command::Audit { dir, limit, json } => audit(dir, limit, json),
        Command::Status { dir, store, json } => status(Home::at(&dir).with_store(store), json),
    }
}
