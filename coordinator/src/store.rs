//! The coordinator's durable state: a database and a set of
//! content-addressed model objects, on one of two engines.
//!
//! - **SQLite** (the default, embedded): `coordinator.db` (WAL journal,
//!   `synchronous=FULL`) in the coordinator's directory and the objects as
//!   files in `objects/`. One coordinator process.
//! - **PostgreSQL** (`--store postgres://…`): every table in the server's
//!   database and the objects in its `objects` table, so that coordinator
//!   replicas on several machines share one state; a model version and the
//!   rows that name it commit in one place, and the server's own
//!   replication covers both.
//!
//! Every fact the coordinator must not lose is written here before it is
//! acknowledged to anyone: enrolled devices and their certificates' serial
//! numbers, one-time enrollment tokens (only their SHA-256), tasks, closed
//! and abandoned rounds, model versions, the devices selected for the open
//! round, and each accepted update of the open round. A coordinator killed
//! at any moment restarts from these rows: the open round is rebuilt by
//! replaying its accepted updates, in acceptance order, into a fresh
//! aggregator, and an update is accepted by one transaction that a replay
//! of the same report cannot repeat (`UNIQUE(task, round, device)`).
//!
//! A task's owner holds its **lease** ([`Store::acquire_lease`]); once a
//! store is fenced with it ([`Store::fence`]), every write of the task's
//! round state first checks, inside its transaction, that the lease is
//! still this holder's, so a replica that lost its lease cannot write
//! after another took it.
//!
//! A storage error fails the call that met it and changes nothing that was
//! not committed; the server answers the request with an error, and a
//! running task resumes from the last committed state.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use fleet_aggregation::{Basis, History};
use fleet_models::export::Variant;
use fleet_protocol::admin::{ArtifactInfo, DeviceInfo, ModelInfo, RoundInfo, TaskState};
use fleet_protocol::message::{ObjectId, ObjectRef, bytes_to_params, params_to_bytes};
use fleet_protocol::task::TaskSpec;

pub mod scratch;
mod sql;

pub use sql::Engine;
use sql::{Db, Tx, args};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The SQLite database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// The PostgreSQL server failed or could not be reached.
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    /// An object file could not be read or written.
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
    /// A stored value does not parse.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// This store's lease on the task was taken by another replica: the
    /// write was refused and nothing was changed.
    #[error("the lease on task {task} is no longer this replica's: {why}")]
    Fenced {
        /// The task.
        task: u64,
        /// What the lease row says now.
        why: String,
    },
    /// The store's location does not parse.
    #[error("store location {0}")]
    Location(String),
}

type Result<T> = std::result::Result<T, StoreError>;

pub use fleet_protocol::time::{unix_millis, unix_secs};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_by INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label TEXT NOT NULL,
    serial BLOB NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    last_seen INTEGER,
    certificate BLOB,
    previous_serial BLOB
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    round INTEGER NOT NULL,
    closed INTEGER NOT NULL,
    model BLOB NOT NULL,
    server_state BLOB,
    ledger TEXT,
    note TEXT,
    clip_norm REAL,
    bound_norm REAL,
    bound_weight REAL,
    centred_reference BLOB,
    centred_radius REAL
);
CREATE TABLE IF NOT EXISTS models (
    id BLOB PRIMARY KEY,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    ended_at INTEGER NOT NULL,
    participants TEXT NOT NULL,
    model BLOB,
    epsilon REAL,
    PRIMARY KEY (task, round, attempt)
);
CREATE TABLE IF NOT EXISTS selections (
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device INTEGER NOT NULL,
    PRIMARY KEY (task, round, device)
);
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device INTEGER NOT NULL,
    object BLOB NOT NULL,
    weight REAL NOT NULL,
    examples INTEGER,
    train_loss REAL,
    bytes BLOB NOT NULL,
    UNIQUE (task, round, device)
);
CREATE TABLE IF NOT EXISTS quarantine (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    round INTEGER NOT NULL,
    device INTEGER NOT NULL,
    object BLOB NOT NULL,
    weight REAL NOT NULL,
    examples INTEGER,
    bytes BLOB NOT NULL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deployments (
    version INTEGER PRIMARY KEY AUTOINCREMENT,
    model BLOB NOT NULL,
    deployed_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS admins (
    serial BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    admin TEXT NOT NULL,
    request TEXT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    model BLOB NOT NULL,
    variant TEXT NOT NULL,
    object BLOB,
    size INTEGER,
    error TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (model, variant)
);
CREATE TABLE IF NOT EXISTS leases (
    task INTEGER PRIMARY KEY,
    owner TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS replicas (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    seen_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task INTEGER NOT NULL,
    device INTEGER NOT NULL,
    replica TEXT NOT NULL,
    message BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS relay_replies (
    id INTEGER PRIMARY KEY,
    replica TEXT NOT NULL,
    message BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
";

/// What PostgreSQL holds besides [`SCHEMA`]: the objects (files under
/// SQLite), with when each was first written, so that a sweep spares
/// objects a replica has written for a commit still to come.
const PG_OBJECTS: &str = "
CREATE TABLE IF NOT EXISTS objects (
    id BYTEA PRIMARY KEY,
    bytes BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS schema_version (
    version BIGINT NOT NULL
);
";

/// Objects written at most this long ago are never swept from PostgreSQL:
/// another replica may have written one for a transaction that has not
/// committed yet.
const PG_SWEEP_AGE_MS: u64 = 3_600_000;

/// The outcome recorded for a round that closed and moved the model.
/// Abandoned attempts record `abandoned: <why>`, rounds that closed but
/// were discarded (over the privacy budget, a non-finite model) record
/// [`DISCARDED`]`: <why>`.
pub const CLOSED: &str = "closed";

/// The prefix of the outcome of a round that closed but left the model as
/// it was.
pub const DISCARDED: &str = "discarded";

/// What the store says of a device's certificate ([`Store::device_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    /// Enrolled, not revoked, and this is its certificate.
    Active,
    /// Enrolled, not revoked, and this is its certificate, used for the
    /// first time since it was renewed: the previous one may be forgotten
    /// ([`Store::settle_renewal`]).
    Renewed,
    /// Enrolled, not revoked, and this is the certificate it held before
    /// its last renewal, whose answer it has not used yet (lost, or not
    /// saved): admitted, so that it can renew again.
    Previous,
    /// No device has this id.
    Unknown,
    /// The device was revoked.
    Revoked,
    /// The id is enrolled, but under another certificate.
    OtherCertificate,
}

/// A task as stored.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Id.
    pub id: u64,
    /// Definition.
    pub spec: TaskSpec,
    /// State.
    pub state: TaskState,
    /// The open round (or the last one).
    pub round: u64,
    /// Rounds closed.
    pub closed: u64,
    /// The current global model.
    pub model: ObjectId,
    /// Server optimiser moments (`m` then `v`, f32 little-endian), when saved.
    pub server_state: Option<Vec<u8>>,
    /// Privacy ledger (JSON), when the task is private.
    pub ledger: Option<String>,
    /// Why the task stopped by itself.
    pub note: Option<String>,
    /// The open round's clip, when adaptive clipping moved it.
    pub clip_norm: Option<f64>,
    /// The open round's basis under a relative bound, once a round closed.
    pub basis: Option<Basis>,
    /// The open round's history under centred clipping, once a round closed.
    pub history: Option<History>,
}

/// The version of the schema above (SQLite's `user_version`).
///
/// 1: `updates.examples`, `updates.train_loss` and `quarantine.examples`
/// may be NULL (a private task's reports carry neither).
/// 2: `tasks.clip_norm`, the open round's clip under adaptive clipping.
/// 3: `tasks.bound_norm` and `tasks.bound_weight`, the open round's basis
/// under a relative bound; `devices.certificate`, the certificate issued at
/// enrollment (so that an enrollment whose answer was lost can be answered
/// again); the `admins` and `audit` tables.
/// 4: `devices.previous_serial`, the certificate before an unfinished
/// renewal; `tasks.centred_reference` (f32 little-endian) and
/// `tasks.centred_radius`, the open round's history under centred clipping.
/// 5: `leases`, the owner of each task among replicas; `replicas`, each
/// replica's role and last sign of life; `relay_requests` and
/// `relay_replies`, devices' requests to the running task handed by the
/// replica that received them to the one running it, and the answers.
/// PostgreSQL databases start at this version (in their `schema_version`
/// table).
const SCHEMA_VERSION: i64 = 5;

/// Model versions a task keeps by default besides its current model and
/// every model ever deployed: after each round closes, older versions are
/// forgotten with their inference artifacts, and their files removed
/// ([`Store::prune_models`]; `keep_models` in the settings).
pub const KEEP_MODELS: usize = 20;

/// An administrator's certificate, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AdminRow {
    /// The name in the certificate.
    pub name: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it was issued (Unix seconds).
    pub issued_at: u64,
    /// When it was revoked, if it was.
    pub revoked_at: Option<u64>,
}

/// One administrative action, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    /// When (Unix milliseconds).
    pub at: u64,
    /// The administrator's name.
    pub admin: String,
    /// What was asked.
    pub request: String,
    /// `ok: …` or `error: …`.
    pub outcome: String,
}

/// A redeemed enrollment token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    /// The device.
    pub device: u64,
    /// Its certificate (DER).
    pub certificate: Vec<u8>,
    /// Whether the token had been redeemed before by the same key (the
    /// certificate is the one issued then).
    pub again: bool,
}

/// An accepted update of the open round.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    /// Device.
    pub device: u64,
    /// Aggregation weight.
    pub weight: f64,
    /// Local examples (`None` in a private task).
    pub examples: Option<u64>,
    /// Mean local training loss (`None` in a private task).
    pub train_loss: Option<f32>,
    /// The encoded update.
    pub bytes: Vec<u8>,
}

/// What closing a round writes.
#[derive(Debug, Clone)]
pub struct ClosedRound<'a> {
    /// Task.
    pub task: u64,
    /// Round that closed.
    pub round: u64,
    /// The new global model (already written with [`Store::put_object`]).
    pub model: ObjectId,
    /// Its size.
    pub model_size: u64,
    /// Rounds closed after this one.
    pub closed: u64,
    /// Server optimiser moments.
    pub server_state: Vec<u8>,
    /// Privacy ledger after the round.
    pub ledger: Option<String>,
    /// The next round's clip, in a private task.
    pub clip_norm: Option<f64>,
    /// The next round's basis, under a relative bound.
    pub basis: Option<Basis>,
    /// The next round's history, under centred clipping.
    pub history: Option<&'a History>,
    /// ε spent after the round.
    pub epsilon: Option<f64>,
    /// Devices whose updates were aggregated.
    pub participants: &'a [u64],
    /// The task's state afterwards.
    pub state: TaskState,
    /// Why the task stopped, when it did.
    pub note: Option<&'a str>,
    /// Whether the round moved the model (`false`: recorded as discarded,
    /// with the note).
    pub applied: bool,
}

/// An inference artifact of a model version, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRow {
    /// Float or int8.
    pub variant: Variant,
    /// The ONNX object and its size, or why it could not be built.
    pub built: std::result::Result<ObjectRef, String>,
}

/// A stored model version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelRow {
    /// The task that produced it.
    pub task: u64,
    /// The round that produced it (0: the task's initial model).
    pub round: u64,
    /// Size in bytes.
    pub size: u64,
}

fn variant_str(v: Variant) -> &'static str {
    match v {
        Variant::Float => "float",
        Variant::Int8 => "int8",
    }
}

fn parse_variant(s: &str) -> Result<Variant> {
    match s {
        "float" => Ok(Variant::Float),
        "int8" => Ok(Variant::Int8),
        other => Err(StoreError::Corrupt(format!("artifact variant {other:?}"))),
    }
}

/// Where a store lives: the embedded SQLite database of a coordinator's
/// directory, or a PostgreSQL server that replicas share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `coordinator.db` and `objects/` in this directory.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://user@host/db`, or a Unix socket's
    /// directory as the host, percent-encoded: `postgres://user@%2Frun%2Fpostgresql/db`).
    Postgres(String),
}

impl Location {
    /// A `postgres://` or `postgresql://` URL, checked for syntax.
    pub fn postgres(url: &str) -> Result<Self> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(StoreError::Location(format!(
                "{url:?}: a PostgreSQL store is named by a postgres:// URL"
            )));
        }
        url.parse::<postgres::Config>()
            .map_err(|e| StoreError::Location(format!("{:?}: {e}", redact(url))))?;
        Ok(Location::Postgres(url.to_string()))
    }

    /// How the location is shown: a URL without its password.
    pub fn display(&self) -> String {
        match self {
            Location::Sqlite(dir) => format!("sqlite: {}", dir.join("coordinator.db").display()),
            Location::Postgres(url) => format!("postgres: {}", redact(url)),
        }
    }
}

/// A URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(v) => v,
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Where objects are written, detached from the store's connection (for a
/// builder thread): a directory, or a PostgreSQL server reached on a
/// connection of the writer's own.
#[derive(Debug, Clone)]
pub enum ObjectSink {
    /// Files named by their hash.
    Dir(PathBuf),
    /// The `objects` table of this server.
    Postgres(Box<postgres::Config>),
}

impl ObjectSink {
    /// Writes an object under its hash, durably.
    ///
    /// In a directory: a synced temporary file renamed, then the directory
    /// synced, so that the name survives a power cut as the database rows
    /// that refer to it do. An object already present is kept if its bytes
    /// still hash to its name, and written again if not (a damaged file is
    /// repaired, not trusted). In PostgreSQL: one row, committed.
    pub fn put(&self, bytes: &[u8]) -> Result<ObjectId> {
        match self {
            ObjectSink::Dir(dir) => put_file(dir, bytes),
            ObjectSink::Postgres(config) => {
                let mut db = sql::connect_postgres(config)?;
                put_row(&mut db, bytes)
            }
        }
    }
}

fn put_file(dir: &Path, bytes: &[u8]) -> Result<ObjectId> {
    let id = ObjectId::of(bytes);
    let path = dir.join(id.to_string());
    let intact = match std::fs::read(&path) {
        Ok(held) => ObjectId::of(&held) == id,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    if !intact {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(id)
}

/// Writes an object's row (PostgreSQL); a row whose bytes no longer hash
/// to its name is replaced.
fn put_row(db: &mut Db, bytes: &[u8]) -> Result<ObjectId> {
    let id = ObjectId::of(bytes);
    db.execute(
        "INSERT INTO objects (id, bytes, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes, created_at = excluded.created_at
         WHERE sha256(objects.bytes) <> objects.id",
        args![&id.0[..], bytes, unix_millis()],
    )?;
    Ok(id)
}

/// Where a store keeps its objects.
enum Objects {
    /// Files in this directory (SQLite).
    Dir(PathBuf),
    /// The `objects` table (PostgreSQL), and how a writer elsewhere connects.
    Table(Box<postgres::Config>),
}

/// A task's lease: which replica owns the task, until when, and the epoch
/// that fences its writes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lease {
    /// The task.
    pub task: u64,
    /// The replica holding it.
    pub owner: String,
    /// Incremented at every acquisition: a holder's writes name it.
    pub epoch: u64,
    /// When it lapses unless renewed (Unix milliseconds).
    pub expires_at: u64,
}

/// A replica as recorded ([`Store::heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaRow {
    /// Its name.
    pub name: String,
    /// `serve` (devices) or `aggregator` (preferred as task owner).
    pub role: String,
    /// When it started (Unix milliseconds).
    pub started_at: u64,
    /// Its last heartbeat (Unix milliseconds).
    pub seen_at: u64,
}

/// A device's request relayed to the running task's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayRequest {
    /// Its id, which the answer carries.
    pub id: u64,
    /// The device that sent it.
    pub device: u64,
    /// The replica waiting for the answer.
    pub replica: String,
    /// The request (an encoded agent message).
    pub message: Vec<u8>,
}

/// The database and the objects.
pub struct Store {
    db: RefCell<Db>,
    objects: Objects,
    /// The lease the task's round writes must still hold.
    fence: Option<Lease>,
}

fn state_str(s: TaskState) -> &'static str {
    match s {
        TaskState::Paused => "paused",
        TaskState::Running => "running",
        TaskState::Finished => "finished",
        TaskState::Stopped => "stopped",
    }
}

fn parse_state(s: &str) -> Result<TaskState> {
    Ok(match s {
        "paused" => TaskState::Paused,
        "running" => TaskState::Running,
        "finished" => TaskState::Finished,
        "stopped" => TaskState::Stopped,
        other => return Err(StoreError::Corrupt(format!("task state {other:?}"))),
    })
}

fn object_id(bytes: Vec<u8>) -> Result<ObjectId> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("object id is not 32 bytes".into()))?;
    Ok(ObjectId(arr))
}

fn newer(version: i64) -> StoreError {
    StoreError::Corrupt(format!(
        "the database has schema version {version}, newer than this coordinator's \
         {SCHEMA_VERSION}: run the coordinator version that wrote it, or a newer one"
    ))
}

/// Creates the schema, or brings a database written by an older coordinator
/// to [`SCHEMA_VERSION`], in one transaction. A database from a newer
/// coordinator is refused rather than misread.
fn migrate_sqlite(db: &mut rusqlite::Connection) -> Result<()> {
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(newer(version));
    }
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let exists = |table: &str| -> Result<bool> {
        Ok(tx.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |r| r.get::<_, i64>(0),
        )? == 1)
    };
    // Version 0 declared the example counts and losses NOT NULL: rebuild
    // those tables (SQLite cannot change a column's constraint in place).
    let mut rebuilt = Vec::new();
    if version < 1 {
        for table in ["updates", "quarantine"] {
            if exists(table)? {
                tx.execute_batch(&format!("ALTER TABLE {table} RENAME TO {table}_v0"))?;
                rebuilt.push(table);
            }
        }
    }
    if version < 2 && exists("tasks")? {
        tx.execute_batch("ALTER TABLE tasks ADD COLUMN clip_norm REAL")?;
    }
    if version < 3 && exists("tasks")? {
        tx.execute_batch(
            "ALTER TABLE tasks ADD COLUMN bound_norm REAL; ALTER TABLE tasks ADD COLUMN bound_weight REAL",
        )?;
    }
    if version < 3 && exists("devices")? {
        tx.execute_batch("ALTER TABLE devices ADD COLUMN certificate BLOB")?;
    }
    if version < 4 && exists("devices")? {
        tx.execute_batch("ALTER TABLE devices ADD COLUMN previous_serial BLOB")?;
    }
    if version < 4 && exists("tasks")? {
        tx.execute_batch(
            "ALTER TABLE tasks ADD COLUMN centred_reference BLOB; \
             ALTER TABLE tasks ADD COLUMN centred_radius REAL",
        )?;
    }
    // Version 5 adds a table only: `CREATE TABLE IF NOT EXISTS` below.
    tx.execute_batch(SCHEMA)?;
    for table in rebuilt {
        tx.execute_batch(&format!(
            "INSERT INTO {table} SELECT * FROM {table}_v0; DROP TABLE {table}_v0;"
        ))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// The PostgreSQL schema at [`SCHEMA_VERSION`], created in one
/// transaction under an advisory lock, so that replicas starting together
/// create it once. Its version is the `schema_version` table's one row;
/// a newer one is refused. (Versions before 5 never existed on PostgreSQL;
/// later ones migrate here, by version, as SQLite's do.)
fn migrate_postgres(db: &mut Db) -> Result<()> {
    let mut tx = db.transaction()?;
    tx.batch("SELECT pg_advisory_xact_lock(7310315364559716460)")?;
    tx.batch(PG_OBJECTS)?;
    let version = tx
        .query_opt("SELECT MAX(version) FROM schema_version", args![])?
        .and_then(|r| r.opt_int(0).transpose())
        .transpose()?;
    match version {
        Some(v) if v > SCHEMA_VERSION => return Err(newer(v)),
        Some(_) => {}
        None => {
            tx.batch(&sql::pg_schema(SCHEMA))?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                args![SCHEMA_VERSION],
            )?;
        }
    }
    tx.commit()
}

/// SHA-256 of an enrollment token: what the database keeps.
fn token_hash(token: &str) -> Vec<u8> {
    ObjectId::of(token.as_bytes()).0.to_vec()
}

impl Store {
    /// Opens (creating if needed) the SQLite store in `dir`:
    /// `coordinator.db` and `objects/`.
    pub fn open(dir: &Path) -> Result<Self> {
        let objects = dir.join("objects");
        // Raw client updates live here: the owner's only (SQLite gives its
        // WAL and shared-memory files the database file's mode).
        fleet_protocol::private::private_dir(dir)?;
        fleet_protocol::private::private_dir(&objects)?;
        let path = dir.join("coordinator.db");
        let mut db = rusqlite::Connection::open(&path)?;
        fleet_protocol::private::restrict(&path)?;
        // WAL with synchronous=FULL: a transaction is on disk when its
        // commit returns, so what was acknowledged (an enrollment, a
        // revocation, an accepted update) survives a power cut too.
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.set_prepared_statement_cache_capacity(128);
        migrate_sqlite(&mut db)?;
        Ok(Self {
            db: RefCell::new(Db::Sqlite(db)),
            objects: Objects::Dir(objects),
            fence: None,
        })
    }

    /// Connects to a PostgreSQL store (creating or migrating its schema).
    /// The connection is re-established, between transactions, after the
    /// server restarts.
    pub fn connect(url: &str) -> Result<Self> {
        let config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Location(format!("{:?}: {e}", redact(url))))?;
        let mut db = sql::connect_postgres(&config)?;
        migrate_postgres(&mut db)?;
        Ok(Self {
            db: RefCell::new(db),
            objects: Objects::Table(Box::new(config)),
            fence: None,
        })
    }

    /// Opens the store at `location`.
    pub fn at(location: &Location) -> Result<Self> {
        match location {
            Location::Sqlite(dir) => Self::open(dir),
            Location::Postgres(url) => Self::connect(url),
        }
    }

    /// The engine this store runs on.
    pub fn engine(&self) -> Engine {
        self.db.borrow().engine()
    }

    fn db(&self) -> std::cell::RefMut<'_, Db> {
        self.db.borrow_mut()
    }

    fn object_path(dir: &Path, id: &ObjectId) -> PathBuf {
        dir.join(id.to_string())
    }

    /// Writes an object under its hash (see [`ObjectSink::put`]).
    pub fn put_object(&self, bytes: &[u8]) -> Result<ObjectId> {
        match &self.objects {
            Objects::Dir(dir) => put_file(dir, bytes),
            Objects::Table(_) => put_row(&mut self.db(), bytes),
        }
    }

    /// Where objects can be written away from this store's connection (on
    /// a blocking thread, say).
    pub fn object_sink(&self) -> ObjectSink {
        match &self.objects {
            Objects::Dir(dir) => ObjectSink::Dir(dir.clone()),
            Objects::Table(config) => ObjectSink::Postgres(config.clone()),
        }
    }

    /// Removes an object (a damaged one, before it is written again).
    pub fn remove_object(&self, id: &ObjectId) -> Result<()> {
        match &self.objects {
            Objects::Dir(dir) => match std::fs::remove_file(Self::object_path(dir, id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            Objects::Table(_) => {
                self.db()
                    .execute("DELETE FROM objects WHERE id = ?1", args![&id.0[..]])?;
                Ok(())
            }
        }
    }

    /// The size and modification time of an object: what a cache of its
    /// verified bytes compares to notice that it changed. (A PostgreSQL
    /// object's time is when its row was written.)
    pub fn object_stamp(&self, id: &ObjectId) -> Result<(u64, Option<std::time::SystemTime>)> {
        match &self.objects {
            Objects::Dir(dir) => {
                let meta = std::fs::metadata(Self::object_path(dir, id))?;
                Ok((meta.len(), meta.modified().ok()))
            }
            Objects::Table(_) => {
                let row = self
                    .db()
                    .query_opt(
                        "SELECT octet_length(bytes), created_at FROM objects WHERE id = ?1",
                        args![&id.0[..]],
                    )?
                    .ok_or_else(|| missing(id))?;
                let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(row.u64(1)?);
                Ok((row.u64(0)?, Some(at)))
            }
        }
    }

    /// Reads an object and checks its hash.
    pub fn get_object(&self, id: &ObjectId) -> Result<Vec<u8>> {
        let bytes = match &self.objects {
            Objects::Dir(dir) => std::fs::read(Self::object_path(dir, id))?,
            Objects::Table(_) => self
                .db()
                .query_opt("SELECT bytes FROM objects WHERE id = ?1", args![&id.0[..]])?
                .ok_or_else(|| missing(id))?
                .blob(0)?,
        };
        if ObjectId::of(&bytes) != *id {
            return Err(StoreError::Corrupt(format!("object {id} fails its hash")));
        }
        Ok(bytes)
    }

    /// Forgets the model versions of `task` beyond its newest `keep` (by
    /// round), sparing its current model and every model ever deployed (a
    /// rollback target), with their artifacts; removes their objects once
    /// that is committed, unless another row still names them. Returns the
    /// versions forgotten. A crash between the commit and the
    /// removal leaves objects that no row names: [`Store::sweep_objects`]
    /// removes them at the next start.
    pub fn prune_models(&mut self, task: u64, keep: usize) -> Result<Vec<ObjectId>> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        let old: Vec<Vec<u8>> = tx
            .query(
                "SELECT id FROM models WHERE task = ?1
                   AND id NOT IN (SELECT model FROM tasks)
                   AND id NOT IN (SELECT model FROM deployments)
                 ORDER BY round DESC",
                args![task],
            )?
            .iter()
            .skip(keep)
            .map(|r| r.blob(0))
            .collect::<Result<_>>()?;
        let mut files = Vec::new();
        for id in &old {
            for r in tx.query(
                "SELECT object FROM artifacts WHERE model = ?1 AND object IS NOT NULL",
                args![id],
            )? {
                files.push(r.blob(0)?);
            }
            files.push(id.clone());
            tx.execute("DELETE FROM artifacts WHERE model = ?1", args![id])?;
            tx.execute("DELETE FROM models WHERE id = ?1", args![id])?;
        }
        tx.commit()?;
        drop(db);
        for f in files {
            let id = object_id(f)?;
            if !self.referenced(&id)? {
                self.remove_object(&id)?;
            }
        }
        old.into_iter().map(object_id).collect()
    }

    /// Whether any row names object `id` (a model version, a task's
    /// current model, a deployment or an artifact).
    fn referenced(&self, id: &ObjectId) -> Result<bool> {
        self.db()
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM models WHERE id = ?1)
                     OR EXISTS (SELECT 1 FROM tasks WHERE model = ?1)
                     OR EXISTS (SELECT 1 FROM deployments WHERE model = ?1)
                     OR EXISTS (SELECT 1 FROM artifacts WHERE object = ?1)",
                args![&id.0[..]],
            )?
            .bool(0)
    }

    /// Removes the objects no row names (left by a crash between a prune's
    /// commit and its removals, or between an object's write and the
    /// commit that would have named it). Call it before anything writes
    /// objects (at start-up); files whose names are not object ids are left
    /// alone. In PostgreSQL, which replicas share, objects written in the
    /// last hour are spared: another replica may be about to commit the
    /// rows that name them. Returns how many were removed.
    pub fn sweep_objects(&self) -> Result<usize> {
        match &self.objects {
            Objects::Dir(dir) => {
                let mut removed = 0;
                for entry in std::fs::read_dir(dir)? {
                    let name = entry?.file_name();
                    let Some(id) = name.to_str().and_then(ObjectId::from_hex) else {
                        continue;
                    };
                    if !self.referenced(&id)? {
                        self.remove_object(&id)?;
                        removed += 1;
                    }
                }
                Ok(removed)
            }
            Objects::Table(_) => Ok(self.db().execute(
                "DELETE FROM objects WHERE created_at < ?1
                   AND id NOT IN (SELECT id FROM models)
                   AND id NOT IN (SELECT model FROM tasks)
                   AND id NOT IN (SELECT model FROM deployments)
                   AND id NOT IN (SELECT object FROM artifacts WHERE object IS NOT NULL)",
                args![unix_millis().saturating_sub(PG_SWEEP_AGE_MS)],
            )? as usize),
        }
    }

    // ----- leases -----

    /// Takes `task`'s lease for `owner` until `now_ms + ttl_ms` if it is
    /// free (never taken, released, or lapsed): the new lease, with an
    /// epoch one above the last, or `None` while another holds it.
    pub fn acquire_lease(
        &self,
        task: u64,
        owner: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Option<Lease>> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        tx.execute(
            "INSERT INTO leases (task, owner, epoch, expires_at) VALUES (?1, ?2, 0, 0)
             ON CONFLICT (task) DO NOTHING",
            args![task, owner],
        )?;
        let row = tx.query_opt(
            "UPDATE leases SET owner = ?2, epoch = epoch + 1, expires_at = ?3
             WHERE task = ?1 AND expires_at <= ?4 RETURNING epoch",
            args![task, owner, now_ms + ttl_ms, now_ms],
        )?;
        let lease = match row {
            Some(r) => Some(Lease {
                task,
                owner: owner.to_string(),
                epoch: r.u64(0)?,
                expires_at: now_ms + ttl_ms,
            }),
            None => None,
        };
        tx.commit()?;
        Ok(lease)
    }

    /// Extends `lease` to `now_ms + ttl_ms` if no one has taken the task
    /// since (its epoch is current): the renewed lease, or `None` (lost:
    /// stop acting as the owner).
    pub fn renew_lease(&self, lease: &Lease, now_ms: u64, ttl_ms: u64) -> Result<Option<Lease>> {
        let n = self.db().execute(
            "UPDATE leases SET expires_at = ?4 WHERE task = ?1 AND owner = ?2 AND epoch = ?3",
            args![
                lease.task,
                lease.owner.as_str(),
                lease.epoch,
                now_ms + ttl_ms
            ],
        )?;
        Ok((n == 1).then(|| Lease {
            expires_at: now_ms + ttl_ms,
            ..lease.clone()
        }))
    }

    /// Gives `lease` up (if still held), so that another replica can take
    /// the task at once.
    pub fn release_lease(&self, lease: &Lease) -> Result<()> {
        self.db().execute(
            "UPDATE leases SET expires_at = 0 WHERE task = ?1 AND owner = ?2 AND epoch = ?3",
            args![lease.task, lease.owner.as_str(), lease.epoch],
        )?;
        Ok(())
    }

    /// Every lease recorded, by task.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        self.db()
            .query(
                "SELECT task, owner, epoch, expires_at FROM leases ORDER BY task",
                args![],
            )?
            .iter()
            .map(|r| {
                Ok(Lease {
                    task: r.u64(0)?,
                    owner: r.text(1)?,
                    epoch: r.u64(2)?,
                    expires_at: r.u64(3)?,
                })
            })
            .collect()
    }

    /// Fences this store's writes of the round state of `lease.task`
    /// (selections, updates, quarantine, closes and abandons) with `lease`:
    /// each checks, in its transaction and holding the lease row's lock
    /// until it commits, that the lease's epoch is still current, and
    /// changes nothing if not ([`StoreError::Fenced`]). `None` lifts the
    /// fence (a single coordinator on its own database).
    pub fn fence(&mut self, lease: Option<Lease>) {
        self.fence = lease;
    }

    /// The lease this store's writes are fenced with.
    pub fn fenced_with(&self) -> Option<&Lease> {
        self.fence.as_ref()
    }

    /// Inside `tx`: refuses the write unless this store's fence (if any)
    /// is the current lease of `task`. The `UPDATE` locks the lease row
    /// until the transaction ends, so a replica taking the lease waits for
    /// this commit, and this one fails once it has taken it.
    fn check_fence(fence: Option<&Lease>, tx: &mut Tx<'_>, task: u64) -> Result<()> {
        let Some(lease) = fence else {
            return Ok(());
        };
        if lease.task != task {
            return Err(StoreError::Fenced {
                task,
                why: format!("this replica holds the lease of task {}", lease.task),
            });
        }
        let n = tx.execute(
            "UPDATE leases SET epoch = epoch WHERE task = ?1 AND owner = ?2 AND epoch = ?3",
            args![task, lease.owner.as_str(), lease.epoch],
        )?;
        if n == 1 {
            return Ok(());
        }
        let now = tx
            .query_opt(
                "SELECT owner, epoch FROM leases WHERE task = ?1",
                args![task],
            )?
            .map(|r| Ok::<_, StoreError>(format!("{} holds epoch {}", r.text(0)?, r.u64(1)?)))
            .transpose()?
            .unwrap_or_else(|| "no lease is recorded".into());
        Err(StoreError::Fenced {
            task,
            why: format!("{now}, this replica had epoch {}", lease.epoch),
        })
    }

    /// Runs `f` in a transaction fenced for `task`.
    fn fenced<T>(&self, task: u64, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        Self::check_fence(self.fence.as_ref(), &mut tx, task)?;
        let out = f(&mut tx)?;
        tx.commit()?;
        Ok(out)
    }

    // ----- replicas and relayed requests -----

    /// Records that replica `name` (of `role`, started at `started_at`) is
    /// alive at `now_ms`.
    pub fn heartbeat(&self, name: &str, role: &str, started_at: u64, now_ms: u64) -> Result<()> {
        self.db().execute(
            "INSERT INTO replicas (name, role, started_at, seen_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET role = excluded.role,
               started_at = excluded.started_at, seen_at = excluded.seen_at",
            args![name, role, started_at, now_ms],
        )?;
        Ok(())
    }

    /// Every replica recorded, by name.
    pub fn replicas(&self) -> Result<Vec<ReplicaRow>> {
        self.db()
            .query(
                "SELECT name, role, started_at, seen_at FROM replicas ORDER BY name",
                args![],
            )?
            .iter()
            .map(|r| {
                Ok(ReplicaRow {
                    name: r.text(0)?,
                    role: r.text(1)?,
                    started_at: r.u64(2)?,
                    seen_at: r.u64(3)?,
                })
            })
            .collect()
    }

    /// Forgets replicas not seen since `before_ms`.
    pub fn forget_replicas(&self, before_ms: u64) -> Result<u64> {
        self.db()
            .execute("DELETE FROM replicas WHERE seen_at < ?1", args![before_ms])
    }

    /// Listens for relayed requests and answers ([`Store::relay_notified`]).
    pub fn listen_relays(&self) -> Result<()> {
        self.db().listen(RELAY_CHANNEL)
    }

    /// Whether a relayed request or answer was written since the last call
    /// (by any replica of the database; a hint to look, not a promise:
    /// look now and then anyway).
    pub fn relay_notified(&self) -> Result<bool> {
        self.db().notified()
    }

    /// Hands `device`'s request (`message`) for `task` to the task's owner
    /// (and notifies it); the answer will name the returned id.
    pub fn relay_request(
        &self,
        task: u64,
        device: u64,
        replica: &str,
        message: &[u8],
    ) -> Result<u64> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        let id = tx
            .query_one(
                "INSERT INTO relay_requests (task, device, replica, message, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
                args![task, device, replica, message, unix_millis()],
            )?
            .u64(0)?;
        notify(&mut tx)?;
        tx.commit()?;
        Ok(id)
    }

    /// The oldest `limit` requests relayed to `task`'s owner, oldest first.
    pub fn relayed_requests(&self, task: u64, limit: usize) -> Result<Vec<RelayRequest>> {
        self.db()
            .query(
                "SELECT id, device, replica, message FROM relay_requests
                 WHERE task = ?1 ORDER BY id LIMIT ?2",
                args![task, limit],
            )?
            .iter()
            .map(|r| {
                Ok(RelayRequest {
                    id: r.u64(0)?,
                    device: r.u64(1)?,
                    replica: r.text(2)?,
                    message: r.blob(3)?,
                })
            })
            .collect()
    }

    /// Answers relayed request `id` (for `replica`): the answer is stored
    /// and the request removed, in one transaction.
    pub fn relay_reply(&self, id: u64, replica: &str, message: &[u8]) -> Result<()> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        tx.execute(
            "INSERT INTO relay_replies (id, replica, message, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO NOTHING",
            args![id, replica, message, unix_millis()],
        )?;
        tx.execute("DELETE FROM relay_requests WHERE id = ?1", args![id])?;
        notify(&mut tx)?;
        tx.commit()
    }

    /// Takes the answers waiting for `replica`: (request id, answer).
    pub fn take_relay_replies(&self, replica: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        self.db()
            .query(
                "DELETE FROM relay_replies WHERE replica = ?1 RETURNING id, message",
                args![replica],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.blob(1)?)))
            .collect()
    }

    /// Drops relayed requests and answers older than `before_ms` (their
    /// replica gave up waiting, or died): how many.
    pub fn expire_relays(&self, before_ms: u64) -> Result<u64> {
        let mut db = self.db();
        let n = db.execute(
            "DELETE FROM relay_requests WHERE created_at < ?1",
            args![before_ms],
        )?;
        Ok(n + db.execute(
            "DELETE FROM relay_replies WHERE created_at < ?1",
            args![before_ms],
        )?)
    }

    // ----- administrators and the audit log -----

    /// Records an administrator's certificate (`serial`) for `name`.
    pub fn add_admin(&self, name: &str, serial: &[u8]) -> Result<()> {
        self.db().execute(
            "INSERT INTO admins (serial, name, issued_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING",
            args![serial, name, unix_secs()],
        )?;
        Ok(())
    }

    /// Every administrator certificate recorded, oldest first.
    pub fn admins(&self) -> Result<Vec<AdminRow>> {
        self.db()
            .query(
                "SELECT name, serial, issued_at, revoked_at FROM admins ORDER BY issued_at, name",
                args![],
            )?
            .iter()
            .map(|r| {
                Ok(AdminRow {
                    name: r.text(0)?,
                    serial: r.blob(1)?.iter().map(|b| format!("{b:02x}")).collect(),
                    issued_at: r.u64(2)?,
                    revoked_at: r.opt_u64(3)?,
                })
            })
            .collect()
    }

    /// Revokes every certificate of administrator `name`; how many.
    pub fn revoke_admin(&self, name: &str) -> Result<usize> {
        Ok(self.db().execute(
            "UPDATE admins SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
            args![unix_secs(), name],
        )? as usize)
    }

    /// Whether the administrator certificate `serial` is recorded and not
    /// revoked (an allow-list, as for devices).
    pub fn admin_allowed(&self, serial: &[u8]) -> Result<bool> {
        match self.db().query_opt(
            "SELECT revoked_at IS NULL FROM admins WHERE serial = ?1",
            args![serial],
        )? {
            Some(r) => r.bool(0),
            None => Ok(false),
        }
    }

    /// Appends an administrative action to the audit log.
    pub fn audit(&self, admin: &str, request: &str, outcome: &str) -> Result<()> {
        self.db().execute(
            "INSERT INTO audit (at, admin, request, outcome) VALUES (?1, ?2, ?3, ?4)",
            args![unix_millis(), admin, request, outcome],
        )?;
        Ok(())
    }

    /// The last `limit` entries of the audit log, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRow>> {
        self.db()
            .query(
                "SELECT at, admin, request, outcome FROM
                   (SELECT seq, at, admin, request, outcome FROM audit ORDER BY seq DESC LIMIT ?1)
                   AS recent
                 ORDER BY seq",
                args![limit],
            )?
            .iter()
            .map(|r| {
                Ok(AuditRow {
                    at: r.u64(0)?,
                    admin: r.text(1)?,
                    request: r.text(2)?,
                    outcome: r.text(3)?,
                })
            })
            .collect()
    }

    // ----- enrollment and devices -----

    /// Stores a new token's hash.
    pub fn create_token(&self, token: &str, label: &str, expires_at: u64) -> Result<()> {
        self.db().execute(
            "INSERT INTO tokens (hash, label, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            args![token_hash(token), label, unix_secs(), expires_at],
        )?;
        Ok(())
    }

    /// Redeems a token for a new device in one transaction: `issue` gets the
    /// new device id and returns the certificate and its serial number.
    /// `Ok(Err(reason))` when the token is unknown, used or expired.
    ///
    /// A used token is redeemed again, until it expires, by a request for
    /// the same public key (`same_key` says whether a stored certificate
    /// certifies the requested key): the device enrolled with it gets its
    /// certificate again, unless it was revoked. An agent whose first answer
    /// was lost (a crash before it saved its credentials, a broken link)
    /// retries with the key it kept; anyone else holding the token gets
    /// nothing, since they lack that key. Two replicas redeeming one token
    /// at once: the token's row is marked used only if it still is not, so
    /// one of them enrolls a device and the other rolls back.
    pub fn enroll<E>(
        &mut self,
        token: &str,
        same_key: impl Fn(&[u8]) -> bool,
        issue: impl FnOnce(u64) -> std::result::Result<(Vec<u8>, Vec<u8>), E>,
    ) -> Result<std::result::Result<Enrollment, String>>
    where
        E: std::fmt::Display,
    {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        let row = tx.query_opt(
            "SELECT label, expires_at, used_by FROM tokens WHERE hash = ?1",
            args![token_hash(token)],
        )?;
        let Some(row) = row else {
            return Ok(Err("unknown enrollment token".into()));
        };
        if row.u64(1)? < unix_secs() {
            return Ok(Err("enrollment token expired".into()));
        }
        if let Some(id) = row.opt_u64(2)? {
            let device = tx.query_opt(
                "SELECT certificate, revoked_at FROM devices WHERE id = ?1",
                args![id],
            )?;
            return Ok(match device {
                Some(d) if d.opt_int(1)?.is_none() => match d.opt_blob(0)? {
                    Some(cert) if same_key(&cert) => Ok(Enrollment {
                        device: id,
                        certificate: cert,
                        again: true,
                    }),
                    _ => Err("enrollment token already used".into()),
                },
                _ => Err("enrollment token already used".into()),
            });
        }
        let label = row.text(0)?;
        let id = tx
            .query_one(
                "INSERT INTO devices (label, serial, enrolled_at) VALUES (?1, ?2, ?3) RETURNING id",
                args![label, &b""[..], unix_secs()],
            )?
            .u64(0)?;
        let (cert, serial) = match issue(id) {
            Ok(v) => v,
            // Dropping the transaction rolls back: the token stays usable.
            Err(e) => return Ok(Err(format!("cannot sign the request: {e}"))),
        };
        tx.execute(
            "UPDATE devices SET serial = ?1, certificate = ?2 WHERE id = ?3",
            args![serial, &cert, id],
        )?;
        let marked = tx.execute(
            "UPDATE tokens SET used_by = ?1 WHERE hash = ?2 AND used_by IS NULL",
            args![id, token_hash(token)],
        )?;
        if marked != 1 {
            // Redeemed by another replica since we read it.
            return Ok(Err("enrollment token already used".into()));
        }
        tx.commit()?;
        Ok(Ok(Enrollment {
            device: id,
            certificate: cert,
            again: false,
        }))
    }

    /// Revokes a device; returns the serials of the certificates it may
    /// still hold (the current one and, during a renewal, the previous
    /// one), or `None` if unknown.
    pub fn revoke(&self, device: u64) -> Result<Option<Vec<Vec<u8>>>> {
        let mut db = self.db();
        db.execute(
            "UPDATE devices SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
            args![unix_secs(), device],
        )?;
        let Some(row) = db.query_opt(
            "SELECT serial, previous_serial FROM devices WHERE id = ?1",
            args![device],
        )?
        else {
            return Ok(None);
        };
        Ok(Some(
            std::iter::once(row.blob(0)?)
                .chain(row.opt_blob(1)?)
                .collect(),
        ))
    }

    /// Devices revoked at or after `since` (Unix seconds), with the serials
    /// of the certificates they may still hold.
    pub fn revoked_since(&self, since: u64) -> Result<Vec<(u64, Vec<Vec<u8>>)>> {
        self.db()
            .query(
                "SELECT id, serial, previous_serial FROM devices WHERE revoked_at >= ?1 ORDER BY id",
                args![since],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.u64(0)?,
                    std::iter::once(r.blob(1)?).chain(r.opt_blob(2)?).collect(),
                ))
            })
            .collect()
    }

    /// Serial numbers of revoked certificates.
    pub fn revoked_serials(&self) -> Result<Vec<Vec<u8>>> {
        self.db()
            .query(
                "SELECT serial FROM devices WHERE revoked_at IS NOT NULL UNION ALL \
                 SELECT previous_serial FROM devices WHERE revoked_at IS NOT NULL \
                 AND previous_serial IS NOT NULL",
                args![],
            )?
            .iter()
            .map(|r| r.blob(0))
            .collect()
    }

    /// Renews `device`'s certificate, asked on a connection that presented
    /// the certificate with `serial`: `issue` signs the new one and returns
    /// it with its serial. The certificate presented must be the device's
    /// current one, which is kept as the previous one (still admitted until
    /// the new one is first used, so that a lost answer locks nobody out),
    /// or that previous one (an earlier answer was not used: the
    /// certificate it carried is replaced). The reason when refused.
    pub fn renew<E: std::fmt::Display>(
        &mut self,
        device: u64,
        serial: &[u8],
        issue: impl FnOnce() -> std::result::Result<(Vec<u8>, Vec<u8>), E>,
    ) -> Result<std::result::Result<Vec<u8>, String>> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        let row = tx.query_opt(
            "SELECT serial, previous_serial, revoked_at IS NOT NULL FROM devices WHERE id = ?1",
            args![device],
        )?;
        let Some(row) = row else {
            return Ok(Err("unknown device".into()));
        };
        if row.bool(2)? {
            return Ok(Err("this device is revoked".into()));
        }
        let current = row.blob(0)?;
        let previous = match row.opt_blob(1)? {
            _ if current == serial => current.clone(),
            Some(previous) if previous == serial => previous,
            _ => {
                return Ok(Err(
                    "this is not the certificate issued for this device".into()
                ));
            }
        };
        let (cert, new_serial) = match issue() {
            Ok(v) => v,
            Err(e) => return Ok(Err(format!("cannot sign the request: {e}"))),
        };
        // Only if no other replica renewed it since it was read.
        let n = tx.execute(
            "UPDATE devices SET serial = ?1, certificate = ?2, previous_serial = ?3
             WHERE id = ?4 AND serial = ?5 AND revoked_at IS NULL",
            args![new_serial, &cert, previous, device, current],
        )?;
        if n != 1 {
            return Ok(Err(
                "the certificate was renewed or revoked meanwhile: try again".into(),
            ));
        }
        tx.commit()?;
        Ok(Ok(cert))
    }

    /// Forgets `device`'s certificate from before its last renewal (it
    /// connected with the new one).
    pub fn settle_renewal(&self, device: u64) -> Result<()> {
        self.db().execute(
            "UPDATE devices SET previous_serial = NULL WHERE id = ?1",
            args![device],
        )?;
        Ok(())
    }

    /// Whether a connection presenting a certificate for `device` with
    /// serial `serial` may go on: the id must be enrolled, not revoked, and
    /// the serial the one issued for it. The serial check is an allow-list:
    /// a certificate issued by another incarnation of this database (a
    /// backup restored over a newer one, where the same id was issued
    /// again) does not authenticate as the device that now holds the id.
    pub fn device_status(&self, device: u64, serial: &[u8]) -> Result<DeviceStatus> {
        let Some(row) = self.db().query_opt(
            "SELECT serial, previous_serial, revoked_at IS NOT NULL FROM devices WHERE id = ?1",
            args![device],
        )?
        else {
            return Ok(DeviceStatus::Unknown);
        };
        if row.bool(2)? {
            return Ok(DeviceStatus::Revoked);
        }
        let issued = row.blob(0)?;
        Ok(match row.opt_blob(1)? {
            None if issued == serial => DeviceStatus::Active,
            Some(_) if issued == serial => DeviceStatus::Renewed,
            Some(previous) if previous == serial => DeviceStatus::Previous,
            _ => DeviceStatus::OtherCertificate,
        })
    }

    /// Records a connection from `device`.
    pub fn touch_device(&self, device: u64) -> Result<()> {
        self.db().execute(
            "UPDATE devices SET last_seen = ?1 WHERE id = ?2",
            args![unix_secs(), device],
        )?;
        Ok(())
    }

    /// Enrolled devices; `connected` tells which are connected now.
    pub fn devices(&self, connected: impl Fn(u64) -> bool) -> Result<Vec<DeviceInfo>> {
        self.db()
            .query(
                "SELECT id, label, enrolled_at, revoked_at, last_seen FROM devices ORDER BY id",
                args![],
            )?
            .iter()
            .map(|r| {
                let id = r.u64(0)?;
                Ok(DeviceInfo {
                    id,
                    label: r.text(1)?,
                    enrolled_at: r.u64(2)?,
                    revoked_at: r.opt_u64(3)?,
                    last_seen: r.opt_u64(4)?,
                    connected: connected(id),
                })
            })
            .collect()
    }

    // ----- tasks -----

    /// Registers a task (paused) with its initial model; returns its id.
    pub fn create_task(&mut self, spec: &TaskSpec, model: &[u8]) -> Result<u64> {
        let id = self.put_object(model)?;
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut db = self.db();
        let mut tx = db.transaction()?;
        let task = tx
            .query_one(
                "INSERT INTO tasks (spec, state, round, closed, model)
                 VALUES (?1, 'paused', 1, 0, ?2) RETURNING id",
                args![json, &id.0[..]],
            )?
            .u64(0)?;
        insert_model(&mut tx, &id, task, 0, model.len() as u64)?;
        tx.commit()?;
        Ok(task)
    }

    /// Tasks with `id` (all when `None`), by id.
    fn query_tasks(&self, id: Option<u64>) -> Result<Vec<TaskRow>> {
        let rows = self.db().query(
            "SELECT id, spec, state, round, closed, model, server_state, ledger, note, clip_norm,
             bound_norm, bound_weight, centred_reference, centred_radius FROM tasks
             WHERE CAST(?1 AS BIGINT) IS NULL OR id = ?1 ORDER BY id",
            args![id],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let id = r.u64(0)?;
            out.push(TaskRow {
                id,
                spec: serde_json::from_str(&r.text(1)?)
                    .map_err(|e| StoreError::Corrupt(format!("task {id}: {e}")))?,
                state: parse_state(&r.text(2)?)?,
                round: r.u64(3)?,
                closed: r.u64(4)?,
                model: object_id(r.blob(5)?)?,
                server_state: r.opt_blob(6)?,
                ledger: r.opt_text(7)?,
                note: r.opt_text(8)?,
                clip_norm: r.opt_real(9)?,
                basis: match (r.opt_real(10)?, r.opt_real(11)?) {
                    (Some(norm), Some(weight)) => Some(Basis { norm, weight }),
                    _ => None,
                },
                history: match (r.opt_blob(12)?, r.opt_real(13)?) {
                    (Some(bytes), Some(radius)) => Some(History {
                        reference: bytes_to_params(&bytes).ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "task {id}: a centred clipping reference of {} bytes",
                                bytes.len()
                            ))
                        })?,
                        radius,
                    }),
                    _ => None,
                },
            });
        }
        Ok(out)
    }

    /// The running task (the lowest id, should there be several), read
    /// without its definition or state (replicas ask every second).
    pub fn running_task(&self) -> Result<Option<u64>> {
        self.db()
            .query_opt(
                "SELECT id FROM tasks WHERE state = 'running' ORDER BY id LIMIT 1",
                args![],
            )?
            .map(|r| r.u64(0))
            .transpose()
    }

    /// A task's current model, read alone.
    pub fn task_model(&self, id: u64) -> Result<Option<ObjectId>> {
        self.db()
            .query_opt("SELECT model FROM tasks WHERE id = ?1", args![id])?
            .map(|r| object_id(r.blob(0)?))
            .transpose()
    }

    /// All tasks, by id.
    pub fn tasks(&self) -> Result<Vec<TaskRow>> {
        self.query_tasks(None)
    }

    /// One task.
    pub fn task(&self, id: u64) -> Result<Option<TaskRow>> {
        Ok(self.query_tasks(Some(id))?.pop())
    }

    /// Sets a task's state (and the note saying why, if any).
    pub fn set_task_state(&self, id: u64, state: TaskState, note: Option<&str>) -> Result<()> {
        self.db().execute(
            "UPDATE tasks SET state = ?1, note = ?2 WHERE id = ?3",
            args![state_str(state), note, id],
        )?;
        Ok(())
    }

    // ----- the open round -----

    /// Records that `device` was selected for `round`.
    pub fn select(&self, task: u64, round: u64, device: u64) -> Result<()> {
        self.fenced(task, |tx| {
            tx.execute(
                "INSERT INTO selections (task, round, device) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                args![task, round, device],
            )
        })?;
        Ok(())
    }

    /// Devices selected for `round`.
    pub fn selected(&self, task: u64, round: u64) -> Result<Vec<u64>> {
        self.db()
            .query(
                "SELECT device FROM selections WHERE task = ?1 AND round = ?2 ORDER BY device",
                args![task, round],
            )?
            .iter()
            .map(|r| r.u64(0))
            .collect()
    }

    /// Stores an accepted update; `false` if this device's update for the
    /// round is already stored (a replay).
    pub fn accept_update(&self, task: u64, round: u64, u: &StoredUpdate) -> Result<bool> {
        let n = self.fenced(task, |tx| {
            tx.execute(
                "INSERT INTO updates (task, round, device, object, weight, examples, train_loss, bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                args![
                    task,
                    round,
                    u.device,
                    ObjectId::of(&u.bytes).0.to_vec(),
                    u.weight,
                    u.examples,
                    u.train_loss.map(f64::from),
                    &u.bytes
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// The object id of `device`'s accepted update for `round`, if any.
    pub fn accepted_object(&self, task: u64, round: u64, device: u64) -> Result<Option<ObjectId>> {
        self.db()
            .query_opt(
                "SELECT object FROM updates WHERE task = ?1 AND round = ?2 AND device = ?3",
                args![task, round, device],
            )?
            .map(|r| object_id(r.blob(0)?))
            .transpose()
    }

    /// Accepted updates of `round`, in acceptance order.
    pub fn updates(&self, task: u64, round: u64) -> Result<Vec<StoredUpdate>> {
        self.db()
            .query(
                "SELECT device, weight, examples, train_loss, bytes FROM updates
                 WHERE task = ?1 AND round = ?2 ORDER BY seq",
                args![task, round],
            )?
            .into_iter()
            .map(|r| {
                Ok(StoredUpdate {
                    device: r.u64(0)?,
                    weight: r.real(1)?,
                    examples: r.opt_u64(2)?,
                    train_loss: r.opt_real(3)?.map(|l| l as f32),
                    bytes: r.blob(4)?,
                })
            })
            .collect()
    }

    /// Moves `device`'s stored update of `round` out of the round into the
    /// `quarantine` table, with the reason (an update that can no longer be
    /// aggregated: kept for inspection, never counted).
    pub fn quarantine_update(
        &mut self,
        task: u64,
        round: u64,
        device: u64,
        reason: &str,
    ) -> Result<()> {
        self.fenced(task, |tx| {
            tx.execute(
                "INSERT INTO quarantine (task, round, device, object, weight, examples, bytes, reason, at)
                 SELECT task, round, device, object, weight, examples, bytes,
                        CAST(?4 AS TEXT), CAST(?5 AS BIGINT) FROM updates
                 WHERE task = ?1 AND round = ?2 AND device = ?3",
                args![task, round, device, reason, unix_millis()],
            )?;
            tx.execute(
                "DELETE FROM updates WHERE task = ?1 AND round = ?2 AND device = ?3",
                args![task, round, device],
            )
        })?;
        Ok(())
    }

    /// Quarantined updates of `task`: (round, device, reason), oldest first.
    pub fn quarantined(&self, task: u64) -> Result<Vec<(u64, u64, String)>> {
        self.db()
            .query(
                "SELECT round, device, reason FROM quarantine WHERE task = ?1 ORDER BY seq",
                args![task],
            )?
            .iter()
            .map(|r| Ok((r.u64(0)?, r.u64(1)?, r.text(2)?)))
            .collect()
    }

    fn next_attempt(tx: &mut Tx<'_>, task: u64, round: u64) -> Result<i64> {
        tx.query_one(
            "SELECT COALESCE(MAX(attempt), 0) + 1 FROM rounds WHERE task = ?1 AND round = ?2",
            args![task, round],
        )?
        .int(0)
    }

    /// Closes a round in one transaction: the new model, the round's record,
    /// the task's progress; the round's updates and selections are dropped.
    pub fn close_round(&mut self, c: &ClosedRound<'_>) -> Result<()> {
        let participants = serde_json::to_string(c.participants)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let outcome = if c.applied {
            CLOSED.to_string()
        } else {
            format!(
                "{DISCARDED}: {}",
                c.note.unwrap_or("the model was left as it was")
            )
        };
        self.fenced(c.task, |tx| {
            insert_model(tx, &c.model, c.task, c.round, c.model_size)?;
            let attempt = Self::next_attempt(tx, c.task, c.round)?;
            tx.execute(
                "INSERT INTO rounds (task, round, attempt, outcome, ended_at, participants, model, epsilon)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                args![
                    c.task,
                    c.round,
                    attempt,
                    outcome,
                    unix_millis(),
                    participants,
                    &c.model.0[..],
                    c.epsilon
                ],
            )?;
            tx.execute(
                "UPDATE tasks SET round = ?1, closed = ?2, model = ?3, server_state = ?4, ledger = ?5, state = ?6,
                 note = ?7, clip_norm = ?8, bound_norm = ?9, bound_weight = ?10,
                 centred_reference = ?11, centred_radius = ?12 WHERE id = ?13",
                args![
                    c.round + 1,
                    c.closed,
                    &c.model.0[..],
                    &c.server_state,
                    c.ledger.as_deref(),
                    state_str(c.state),
                    c.note,
                    c.clip_norm,
                    c.basis.map(|b| b.norm),
                    c.basis.map(|b| b.weight),
                    c.history.map(|h| params_to_bytes(&h.reference)),
                    c.history.map(|h| h.radius),
                    c.task
                ],
            )?;
            clear_round(tx, c.task, c.round)
        })
    }

    /// Abandons the open round: its updates and selections are dropped and the
    /// attempt is recorded; the round number stays for the retry.
    pub fn abandon_round(&mut self, task: u64, round: u64, reason: &str) -> Result<()> {
        self.fenced(task, |tx| {
            let attempt = Self::next_attempt(tx, task, round)?;
            let participants: Vec<u64> = tx
                .query(
                    "SELECT device FROM updates WHERE task = ?1 AND round = ?2 ORDER BY seq",
                    args![task, round],
                )?
                .iter()
                .map(|r| r.u64(0))
                .collect::<Result<_>>()?;
            tx.execute(
                "INSERT INTO rounds (task, round, attempt, outcome, ended_at, participants)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                args![
                    task,
                    round,
                    attempt,
                    format!("abandoned: {reason}"),
                    unix_millis(),
                    serde_json::to_string(&participants).expect("ids serialise")
                ],
            )?;
            clear_round(tx, task, round)
        })
    }

    /// A task's rounds (closed and abandoned attempts), oldest first.
    pub fn rounds(&self, task: u64) -> Result<Vec<RoundInfo>> {
        self.db()
            .query(
                "SELECT round, outcome, ended_at, participants, model, epsilon FROM rounds
                 WHERE task = ?1 ORDER BY round, attempt",
                args![task],
            )?
            .iter()
            .map(|r| {
                Ok(RoundInfo {
                    task,
                    round: r.u64(0)?,
                    outcome: r.text(1)?,
                    ended_at: Some(r.u64(2)?),
                    participants: serde_json::from_str(&r.text(3)?)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    model: r
                        .opt_blob(4)?
                        .map(object_id)
                        .transpose()?
                        .map(|m| m.to_string()),
                    epsilon: r.opt_real(5)?,
                })
            })
            .collect()
    }

    // ----- models and deployments -----

    /// Model versions, newest first (of one task, or all).
    pub fn models(&self, task: Option<u64>) -> Result<Vec<ModelInfo>> {
        let deployed = self.deployment()?.map(|(_, id)| id);
        let rows = self.db().query(
            "SELECT id, task, round, size, created_at FROM models
             WHERE CAST(?1 AS BIGINT) IS NULL OR task = ?1
             ORDER BY created_at DESC, task DESC, round DESC",
            args![task],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let id = object_id(r.blob(0)?)?;
            let artifacts = self
                .artifacts(&id)?
                .into_iter()
                .map(|a| {
                    let (id, size, error) = match a.built {
                        Ok(r) => (Some(r.id.to_string()), Some(r.size), None),
                        Err(e) => (None, None, Some(e)),
                    };
                    ArtifactInfo {
                        variant: a.variant.to_string(),
                        id,
                        size,
                        error,
                    }
                })
                .collect();
            out.push(ModelInfo {
                id: id.to_string(),
                task: r.u64(1)?,
                round: r.u64(2)?,
                size: r.u64(3)?,
                created_at: r.u64(4)?,
                deployed: deployed == Some(id),
                artifacts,
            });
        }
        Ok(out)
    }

    /// A stored model version's task, round and size.
    pub fn model_row(&self, id: &ObjectId) -> Result<Option<ModelRow>> {
        self.db()
            .query_opt(
                "SELECT task, round, size FROM models WHERE id = ?1",
                args![&id.0[..]],
            )?
            .map(|r| {
                Ok(ModelRow {
                    task: r.u64(0)?,
                    round: r.u64(1)?,
                    size: r.u64(2)?,
                })
            })
            .transpose()
    }

    /// Records the artifacts of `model` in one transaction (each variant's
    /// ONNX object already written with [`Store::put_object`], or the reason
    /// it could not be built). A variant recorded before is replaced.
    pub fn put_artifacts(
        &mut self,
        model: &ObjectId,
        artifacts: &[(Variant, std::result::Result<ObjectRef, String>)],
    ) -> Result<()> {
        let mut db = self.db();
        let mut tx = db.transaction()?;
        for (variant, built) in artifacts {
            let (object, size, error) = match built {
                Ok(r) => (Some(r.id.0.to_vec()), Some(r.size), None),
                Err(e) => (None, None, Some(e.as_str())),
            };
            tx.execute(
                "INSERT INTO artifacts (model, variant, object, size, error, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (model, variant) DO UPDATE SET object = excluded.object,
                   size = excluded.size, error = excluded.error, created_at = excluded.created_at",
                args![
                    &model.0[..],
                    variant_str(*variant),
                    object,
                    size,
                    error,
                    unix_secs()
                ],
            )?;
        }
        tx.commit()
    }

    /// The recorded artifacts of `model` (float first).
    pub fn artifacts(&self, model: &ObjectId) -> Result<Vec<ArtifactRow>> {
        self.db()
            .query(
                "SELECT variant, object, size, error FROM artifacts WHERE model = ?1 ORDER BY variant",
                args![&model.0[..]],
            )?
            .iter()
            .map(|r| {
                let built = match (r.opt_blob(1)?, r.opt_u64(2)?) {
                    (Some(o), Some(size)) => Ok(ObjectRef {
                        id: object_id(o)?,
                        size,
                    }),
                    _ => Err(r.opt_text(3)?.unwrap_or_else(|| "not built".into())),
                };
                Ok(ArtifactRow {
                    variant: parse_variant(&r.text(0)?)?,
                    built,
                })
            })
            .collect()
    }

    /// The model whose artifact `object` is, if it is one.
    pub fn artifact_model(&self, object: &ObjectId) -> Result<Option<ObjectId>> {
        self.db()
            .query_opt(
                "SELECT model FROM artifacts WHERE object = ?1 LIMIT 1",
                args![&object.0[..]],
            )?
            .map(|r| object_id(r.blob(0)?))
            .transpose()
    }

    /// Forgets the artifacts recorded for `model` (to build them again).
    pub fn forget_artifacts(&self, model: &ObjectId) -> Result<()> {
        self.db().execute(
            "DELETE FROM artifacts WHERE model = ?1",
            args![&model.0[..]],
        )?;
        Ok(())
    }

    /// Model versions that lack a recorded artifact of either variant, newest first.
    pub fn models_without_artifacts(&self) -> Result<Vec<ObjectId>> {
        self.db()
            .query(
                "SELECT id FROM models
                 WHERE (SELECT COUNT(*) FROM artifacts WHERE artifacts.model = models.id) < 2
                 ORDER BY created_at DESC, task DESC, round DESC",
                args![],
            )?
            .into_iter()
            .map(|r| object_id(r.blob(0)?))
            .collect()
    }

    /// Deploys a model; returns the deployment version.
    pub fn deploy(&self, model: &ObjectId) -> Result<u64> {
        self.db()
            .query_one(
                "INSERT INTO deployments (model, deployed_at) VALUES (?1, ?2) RETURNING version",
                args![&model.0[..], unix_secs()],
            )?
            .u64(0)
    }

    /// The current deployment: version and model.
    pub fn deployment(&self) -> Result<Option<(u64, ObjectId)>> {
        self.db()
            .query_opt(
                "SELECT version, model FROM deployments ORDER BY version DESC LIMIT 1",
                args![],
            )?
            .map(|r| Ok((r.u64(0)?, object_id(r.blob(1)?)?)))
            .transpose()
    }

    /// The model deployed before the current one, if any.
    pub fn previous_deployment(&self) -> Result<Option<ObjectId>> {
        self.db()
            .query(
                "SELECT model FROM deployments ORDER BY version DESC LIMIT 2",
                args![],
            )?
            .into_iter()
            .nth(1)
            .map(|r| object_id(r.blob(0)?))
            .transpose()
    }
}

/// The PostgreSQL channel on which relayed requests and answers are announced.
const RELAY_CHANNEL: &str = "fleet_relay";

/// Announces a relayed request or answer on [`RELAY_CHANNEL`] when `tx`
/// commits (PostgreSQL; nothing on SQLite, whose single process needs no
/// relay).
fn notify(tx: &mut Tx<'_>) -> Result<()> {
    if tx.engine() == Engine::Postgres {
        tx.execute("SELECT pg_notify('fleet_relay', '')", args![])?;
    }
    Ok(())
}

/// An object the store should hold but does not.
fn missing(id: &ObjectId) -> StoreError {
    StoreError::Io(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("object {id} is not stored"),
    ))
}

fn insert_model(tx: &mut Tx<'_>, id: &ObjectId, task: u64, round: u64, size: u64) -> Result<()> {
    tx.execute(
        "INSERT INTO models (id, task, round, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT DO NOTHING",
        args![&id.0[..], task, round, size, unix_secs()],
    )?;
    Ok(())
}

fn clear_round(tx: &mut Tx<'_>, task: u64, round: u64) -> Result<()> {
    tx.execute(
        "DELETE FROM updates WHERE task = ?1 AND round = ?2",
        args![task, round],
    )?;
    tx.execute(
        "DELETE FROM selections WHERE task = ?1 AND round = ?2",
        args![task, round],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
