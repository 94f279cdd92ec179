//! The coordinator's durable state: an SQLite database (WAL journal) and a
//! directory of content-addressed model objects.
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
//! A storage error fails the call that met it and changes nothing that was
//! not committed; the server answers the request with an error, and a
//! running task resumes from the last committed state.

use std::path::{Path, PathBuf};

use fleet_aggregation::{Basis, History};
use fleet_models::export::Variant;
use fleet_protocol::admin::{ArtifactInfo, DeviceInfo, ModelInfo, RoundInfo, TaskState};
use fleet_protocol::message::{ObjectId, ObjectRef, bytes_to_params, params_to_bytes};
use fleet_protocol::task::TaskSpec;
use rusqlite::{Connection, OptionalExtension, Transaction, params};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// An object file could not be read or written.
    #[error("object store: {0}")]
    Io(#[from] std::io::Error),
    /// A stored value does not parse.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
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
";

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
const SCHEMA_VERSION: i64 = 4;

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

/// The directory of content-addressed objects, detached from the database.
#[derive(Debug, Clone)]
pub struct ObjectDir(PathBuf);

impl ObjectDir {
    /// Writes an object under its hash, durably: a synced temporary file
    /// renamed, then the directory synced, so that the name survives a
    /// power cut as the database rows that refer to it do. An object
    /// already present is kept if its bytes still hash to its name, and
    /// written again if not (a damaged file is repaired, not trusted).
    pub fn put(&self, bytes: &[u8]) -> Result<ObjectId> {
        let id = ObjectId::of(bytes);
        let path = self.0.join(id.to_string());
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
            std::fs::File::open(&self.0)?.sync_all()?;
        }
        Ok(id)
    }
}

/// The database and the object directory.
pub struct Store {
    db: Connection,
    objects: PathBuf,
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

/// Creates the schema, or brings a database written by an older coordinator
/// to [`SCHEMA_VERSION`], in one transaction. A database from a newer
/// coordinator is refused rather than misread.
fn migrate(db: &mut Connection) -> Result<()> {
    let version: i64 = db.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {version}, newer than this coordinator's \
             {SCHEMA_VERSION}: run the coordinator version that wrote it, or a newer one"
        )));
    }
    let tx = db.transaction()?;
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

/// SHA-256 of an enrollment token: what the database keeps.
fn token_hash(token: &str) -> Vec<u8> {
    ObjectId::of(token.as_bytes()).0.to_vec()
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: `coordinator.db` and `objects/`.
    pub fn open(dir: &Path) -> Result<Self> {
        let objects = dir.join("objects");
        // Raw client updates live here: the owner's only (SQLite gives its
        // WAL and shared-memory files the database file's mode).
        fleet_protocol::private::private_dir(dir)?;
        fleet_protocol::private::private_dir(&objects)?;
        let path = dir.join("coordinator.db");
        let mut db = Connection::open(&path)?;
        fleet_protocol::private::restrict(&path)?;
        // WAL with synchronous=FULL: a transaction is on disk when its
        // commit returns, so what was acknowledged (an enrollment, a
        // revocation, an accepted update) survives a power cut too.
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "FULL")?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut db)?;
        Ok(Self { db, objects })
    }

    fn object_path(&self, id: &ObjectId) -> PathBuf {
        self.objects.join(id.to_string())
    }

    /// Writes an object under its hash (atomically: a temporary file renamed).
    pub fn put_object(&self, bytes: &[u8]) -> Result<ObjectId> {
        self.object_dir().put(bytes)
    }

    /// The object directory alone, for writing objects away from the
    /// database (on a blocking thread, say).
    pub fn object_dir(&self) -> ObjectDir {
        ObjectDir(self.objects.clone())
    }

    /// Removes an object file (a damaged one, before it is written again).
    pub fn remove_object(&self, id: &ObjectId) -> Result<()> {
        match std::fs::remove_file(self.object_path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The size and modification time of an object's file: what a cache of
    /// its verified bytes compares to notice that the file changed.
    pub fn object_stamp(&self, id: &ObjectId) -> Result<(u64, Option<std::time::SystemTime>)> {
        let meta = std::fs::metadata(self.object_path(id))?;
        Ok((meta.len(), meta.modified().ok()))
    }

    /// Reads an object and checks its hash.
    pub fn get_object(&self, id: &ObjectId) -> Result<Vec<u8>> {
        let bytes = std::fs::read(self.object_path(id))?;
        if ObjectId::of(&bytes) != *id {
            return Err(StoreError::Corrupt(format!("object {id} fails its hash")));
        }
        Ok(bytes)
    }

    /// Forgets the model versions of `task` beyond its newest `keep` (by
    /// round), sparing its current model and every model ever deployed (a
    /// rollback target), with their artifacts; removes their files once
    /// that is committed, unless another row still names them. Returns the
    /// versions forgotten. A crash between the commit and the
    /// removal leaves files that no row names: [`Store::sweep_objects`]
    /// removes them at the next start.
    pub fn prune_models(&mut self, task: u64, keep: usize) -> Result<Vec<ObjectId>> {
        let tx = self.db.transaction()?;
        let old: Vec<Vec<u8>> = {
            let mut st = tx.prepare(
                "SELECT id FROM models WHERE task = ?1
                   AND id NOT IN (SELECT model FROM tasks)
                   AND id NOT IN (SELECT model FROM deployments)
                 ORDER BY round DESC LIMIT -1 OFFSET ?2",
            )?;
            st.query_map(params![task as i64, keep as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut files = Vec::new();
        for id in &old {
            let mut st =
                tx.prepare("SELECT object FROM artifacts WHERE model = ?1 AND object IS NOT NULL")?;
            let artifacts: Vec<Vec<u8>> = st
                .query_map(params![id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            files.extend(artifacts);
            files.push(id.clone());
            tx.execute("DELETE FROM artifacts WHERE model = ?1", params![id])?;
            tx.execute("DELETE FROM models WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
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
        Ok(self.db.query_row(
            "SELECT EXISTS (SELECT 1 FROM models WHERE id = ?1)
                 OR EXISTS (SELECT 1 FROM tasks WHERE model = ?1)
                 OR EXISTS (SELECT 1 FROM deployments WHERE model = ?1)
                 OR EXISTS (SELECT 1 FROM artifacts WHERE object = ?1)",
            params![id.0.to_vec()],
            |r| r.get(0),
        )?)
    }

    /// Removes the object files no row names (left by a crash between a
    /// prune's commit and its removals, or between an object's write and
    /// the commit that would have named it). Call it before anything writes
    /// objects (at start-up); files whose names are not object ids are left
    /// alone. Returns how many were removed.
    pub fn sweep_objects(&self) -> Result<usize> {
        let mut removed = 0;
        for entry in std::fs::read_dir(&self.objects)? {
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

    // ----- administrators and the audit log -----

    /// Records an administrator's certificate (`serial`) for `name`.
    pub fn add_admin(&self, name: &str, serial: &[u8]) -> Result<()> {
        self.db.execute(
            "INSERT OR IGNORE INTO admins (serial, name, issued_at) VALUES (?1, ?2, ?3)",
            params![serial, name, unix_secs() as i64],
        )?;
        Ok(())
    }

    /// Every administrator certificate recorded, oldest first.
    pub fn admins(&self) -> Result<Vec<AdminRow>> {
        let mut st = self.db.prepare(
            "SELECT name, serial, issued_at, revoked_at FROM admins ORDER BY issued_at, name",
        )?;
        let rows = st.query_map([], |r| {
            let serial: Vec<u8> = r.get(1)?;
            Ok(AdminRow {
                name: r.get(0)?,
                serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
                issued_at: r.get::<_, i64>(2)? as u64,
                revoked_at: r.get::<_, Option<i64>>(3)?.map(|t| t as u64),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Revokes every certificate of administrator `name`; how many.
    pub fn revoke_admin(&self, name: &str) -> Result<usize> {
        Ok(self.db.execute(
            "UPDATE admins SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
            params![unix_secs() as i64, name],
        )?)
    }

    /// Whether the administrator certificate `serial` is recorded and not
    /// revoked (an allow-list, as for devices).
    pub fn admin_allowed(&self, serial: &[u8]) -> Result<bool> {
        Ok(self
            .db
            .query_row(
                "SELECT revoked_at IS NULL FROM admins WHERE serial = ?1",
                params![serial],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(false))
    }

    /// Appends an administrative action to the audit log.
    pub fn audit(&self, admin: &str, request: &str, outcome: &str) -> Result<()> {
        self.db.execute(
            "INSERT INTO audit (at, admin, request, outcome) VALUES (?1, ?2, ?3, ?4)",
            params![unix_millis() as i64, admin, request, outcome],
        )?;
        Ok(())
    }

    /// The last `limit` entries of the audit log, oldest first.
    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditRow>> {
        let mut st = self.db.prepare(
            "SELECT at, admin, request, outcome FROM
               (SELECT seq, at, admin, request, outcome FROM audit ORDER BY seq DESC LIMIT ?1)
             ORDER BY seq",
        )?;
        let rows = st.query_map(params![limit as i64], |r| {
            Ok(AuditRow {
                at: r.get::<_, i64>(0)? as u64,
                admin: r.get(1)?,
                request: r.get(2)?,
                outcome: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- enrollment and devices -----

    /// Stores a new token's hash.
    pub fn create_token(&self, token: &str, label: &str, expires_at: u64) -> Result<()> {
        self.db.execute(
            "INSERT INTO tokens (hash, label, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![
                token_hash(token),
                label,
                unix_secs() as i64,
                expires_at as i64
            ],
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
    /// nothing, since they lack that key.
    pub fn enroll<E>(
        &mut self,
        token: &str,
        same_key: impl Fn(&[u8]) -> bool,
        issue: impl FnOnce(u64) -> std::result::Result<(Vec<u8>, Vec<u8>), E>,
    ) -> Result<std::result::Result<Enrollment, String>>
    where
        E: std::fmt::Display,
    {
        let tx = self.db.transaction()?;
        let row: Option<(String, i64, Option<i64>)> = tx
            .query_row(
                "SELECT label, expires_at, used_by FROM tokens WHERE hash = ?1",
                params![token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let expired = |exp: i64| (exp as u64) < unix_secs();
        let label = match row {
            None => return Ok(Err("unknown enrollment token".into())),
            Some((_, exp, _)) if expired(exp) => {
                return Ok(Err("enrollment token expired".into()));
            }
            Some((_, _, Some(id))) => {
                let device: Option<(Option<Vec<u8>>, Option<i64>)> = tx
                    .query_row(
                        "SELECT certificate, revoked_at FROM devices WHERE id = ?1",
                        params![id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                return Ok(match device {
                    Some((Some(cert), None)) if same_key(&cert) => Ok(Enrollment {
                        device: id as u64,
                        certificate: cert,
                        again: true,
                    }),
                    _ => Err("enrollment token already used".into()),
                });
            }
            Some((label, _, None)) => label,
        };
        tx.execute(
            "INSERT INTO devices (label, serial, enrolled_at) VALUES (?1, x'', ?2)",
            params![label, unix_secs() as i64],
        )?;
        let id = tx.last_insert_rowid() as u64;
        let (cert, serial) = match issue(id) {
            Ok(v) => v,
            // Dropping the transaction rolls back: the token stays usable.
            Err(e) => return Ok(Err(format!("cannot sign the request: {e}"))),
        };
        tx.execute(
            "UPDATE devices SET serial = ?1, certificate = ?2 WHERE id = ?3",
            params![serial, cert, id as i64],
        )?;
        tx.execute(
            "UPDATE tokens SET used_by = ?1 WHERE hash = ?2",
            params![id as i64, token_hash(token)],
        )?;
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
        self.db.execute(
            "UPDATE devices SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
            params![unix_secs() as i64, device as i64],
        )?;
        let row: Option<(Vec<u8>, Option<Vec<u8>>)> = self
            .db
            .query_row(
                "SELECT serial, previous_serial FROM devices WHERE id = ?1",
                params![device as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.map(|(serial, previous)| std::iter::once(serial).chain(previous).collect()))
    }

    /// Serial numbers of revoked certificates.
    pub fn revoked_serials(&self) -> Result<Vec<Vec<u8>>> {
        let mut st = self.db.prepare(
            "SELECT serial FROM devices WHERE revoked_at IS NOT NULL UNION ALL \
             SELECT previous_serial FROM devices WHERE revoked_at IS NOT NULL \
             AND previous_serial IS NOT NULL",
        )?;
        let rows = st.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        let tx = self.db.transaction()?;
        let row: Option<(Vec<u8>, Option<Vec<u8>>, bool)> = tx
            .query_row(
                "SELECT serial, previous_serial, revoked_at IS NOT NULL FROM devices WHERE id = ?1",
                params![device as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let previous = match row {
            None => return Ok(Err("unknown device".into())),
            Some((_, _, true)) => return Ok(Err("this device is revoked".into())),
            Some((current, _, false)) if current == serial => current,
            Some((_, Some(previous), false)) if previous == serial => previous,
            Some(_) => {
                return Ok(Err(
                    "this is not the certificate issued for this device".into()
                ));
            }
        };
        let (cert, new_serial) = match issue() {
            Ok(v) => v,
            Err(e) => return Ok(Err(format!("cannot sign the request: {e}"))),
        };
        tx.execute(
            "UPDATE devices SET serial = ?1, certificate = ?2, previous_serial = ?3 WHERE id = ?4",
            params![new_serial, cert, previous, device as i64],
        )?;
        tx.commit()?;
        Ok(Ok(cert))
    }

    /// Forgets `device`'s certificate from before its last renewal (it
    /// connected with the new one).
    pub fn settle_renewal(&self, device: u64) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET previous_serial = NULL WHERE id = ?1",
            params![device as i64],
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
        let row: Option<(Vec<u8>, Option<Vec<u8>>, bool)> = self
            .db
            .query_row(
                "SELECT serial, previous_serial, revoked_at IS NOT NULL FROM devices WHERE id = ?1",
                params![device as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        Ok(match row {
            None => DeviceStatus::Unknown,
            Some((_, _, true)) => DeviceStatus::Revoked,
            Some((issued, None, false)) if issued == serial => DeviceStatus::Active,
            Some((issued, Some(_), false)) if issued == serial => DeviceStatus::Renewed,
            Some((_, Some(previous), false)) if previous == serial => DeviceStatus::Previous,
            Some(_) => DeviceStatus::OtherCertificate,
        })
    }

    /// Records a connection from `device`.
    pub fn touch_device(&self, device: u64) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET last_seen = ?1 WHERE id = ?2",
            params![unix_secs() as i64, device as i64],
        )?;
        Ok(())
    }

    /// Enrolled devices; `connected` tells which are connected now.
    pub fn devices(&self, connected: impl Fn(u64) -> bool) -> Result<Vec<DeviceInfo>> {
        let mut st = self.db.prepare(
            "SELECT id, label, enrolled_at, revoked_at, last_seen FROM devices ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            let id = r.get::<_, i64>(0)? as u64;
            Ok(DeviceInfo {
                id,
                label: r.get(1)?,
                enrolled_at: r.get::<_, i64>(2)? as u64,
                revoked_at: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                last_seen: r.get::<_, Option<i64>>(4)?.map(|v| v as u64),
                connected: connected(id),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ----- tasks -----

    /// Registers a task (paused) with its initial model; returns its id.
    pub fn create_task(&mut self, spec: &TaskSpec, model: &[u8]) -> Result<u64> {
        let id = self.put_object(model)?;
        let json = serde_json::to_string(spec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO tasks (spec, state, round, closed, model) VALUES (?1, 'paused', 1, 0, ?2)",
            params![json, id.0.to_vec()],
        )?;
        let task = tx.last_insert_rowid() as u64;
        insert_model(&tx, &id, task, 0, model.len() as u64)?;
        tx.commit()?;
        Ok(task)
    }

    /// Tasks with `id` (all when `None`), by id.
    fn query_tasks(&self, id: Option<u64>) -> Result<Vec<TaskRow>> {
        let mut st = self.db.prepare(
            "SELECT id, spec, state, round, closed, model, server_state, ledger, note, clip_norm,
             bound_norm, bound_weight, centred_reference, centred_radius FROM tasks
             WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        )?;
        let mut rows = st.query(params![id.map(|i| i as i64)])?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let spec: String = r.get(1)?;
            let state: String = r.get(2)?;
            out.push(TaskRow {
                id: id as u64,
                spec: serde_json::from_str(&spec)
                    .map_err(|e| StoreError::Corrupt(format!("task {id}: {e}")))?,
                state: parse_state(&state)?,
                round: r.get::<_, i64>(3)? as u64,
                closed: r.get::<_, i64>(4)? as u64,
                model: object_id(r.get(5)?)?,
                server_state: r.get(6)?,
                ledger: r.get(7)?,
                note: r.get(8)?,
                clip_norm: r.get(9)?,
                basis: match (r.get::<_, Option<f64>>(10)?, r.get::<_, Option<f64>>(11)?) {
                    (Some(norm), Some(weight)) => Some(Basis { norm, weight }),
                    _ => None,
                },
                history: match (
                    r.get::<_, Option<Vec<u8>>>(12)?,
                    r.get::<_, Option<f64>>(13)?,
                ) {
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
        self.db.execute(
            "UPDATE tasks SET state = ?1, note = ?2 WHERE id = ?3",
            params![state_str(state), note, id as i64],
        )?;
        Ok(())
    }

    // ----- the open round -----

    /// Records that `device` was selected for `round`.
    pub fn select(&self, task: u64, round: u64, device: u64) -> Result<()> {
        self.db.execute(
            "INSERT OR IGNORE INTO selections (task, round, device) VALUES (?1, ?2, ?3)",
            params![task as i64, round as i64, device as i64],
        )?;
        Ok(())
    }

    /// Devices selected for `round`.
    pub fn selected(&self, task: u64, round: u64) -> Result<Vec<u64>> {
        let mut st = self.db.prepare(
            "SELECT device FROM selections WHERE task = ?1 AND round = ?2 ORDER BY device",
        )?;
        let rows = st.query_map(params![task as i64, round as i64], |r| {
            r.get::<_, i64>(0).map(|v| v as u64)
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Stores an accepted update; `false` if this device's update for the
    /// round is already stored (a replay).
    pub fn accept_update(&self, task: u64, round: u64, u: &StoredUpdate) -> Result<bool> {
        let n = self.db.execute(
            "INSERT OR IGNORE INTO updates (task, round, device, object, weight, examples, train_loss, bytes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                task as i64,
                round as i64,
                u.device as i64,
                ObjectId::of(&u.bytes).0.to_vec(),
                u.weight,
                u.examples.map(|e| e as i64),
                u.train_loss.map(f64::from),
                u.bytes
            ],
        )?;
        Ok(n == 1)
    }

    /// The object id of `device`'s accepted update for `round`, if any.
    pub fn accepted_object(&self, task: u64, round: u64, device: u64) -> Result<Option<ObjectId>> {
        self.db
            .query_row(
                "SELECT object FROM updates WHERE task = ?1 AND round = ?2 AND device = ?3",
                params![task as i64, round as i64, device as i64],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?
            .map(object_id)
            .transpose()
    }

    /// Accepted updates of `round`, in acceptance order.
    pub fn updates(&self, task: u64, round: u64) -> Result<Vec<StoredUpdate>> {
        let mut st = self.db.prepare(
            "SELECT device, weight, examples, train_loss, bytes FROM updates
             WHERE task = ?1 AND round = ?2 ORDER BY seq",
        )?;
        let rows = st.query_map(params![task as i64, round as i64], |r| {
            Ok(StoredUpdate {
                device: r.get::<_, i64>(0)? as u64,
                weight: r.get(1)?,
                examples: r.get::<_, Option<i64>>(2)?.map(|e| e as u64),
                train_loss: r.get::<_, Option<f64>>(3)?.map(|l| l as f32),
                bytes: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        let tx = self.db.transaction()?;
        tx.execute(
            "INSERT INTO quarantine (task, round, device, object, weight, examples, bytes, reason, at)
             SELECT task, round, device, object, weight, examples, bytes, ?4, ?5 FROM updates
             WHERE task = ?1 AND round = ?2 AND device = ?3",
            params![
                task as i64,
                round as i64,
                device as i64,
                reason,
                unix_millis() as i64
            ],
        )?;
        tx.execute(
            "DELETE FROM updates WHERE task = ?1 AND round = ?2 AND device = ?3",
            params![task as i64, round as i64, device as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Quarantined updates of `task`: (round, device, reason), oldest first.
    pub fn quarantined(&self, task: u64) -> Result<Vec<(u64, u64, String)>> {
        let mut st = self
            .db
            .prepare("SELECT round, device, reason FROM quarantine WHERE task = ?1 ORDER BY seq")?;
        let rows = st.query_map(params![task as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, String>(2)?,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn next_attempt(tx: &Transaction<'_>, task: u64, round: u64) -> Result<i64> {
        Ok(tx.query_row(
            "SELECT COALESCE(MAX(attempt), 0) + 1 FROM rounds WHERE task = ?1 AND round = ?2",
            params![task as i64, round as i64],
            |r| r.get(0),
        )?)
    }

    /// Closes a round in one transaction: the new model, the round's record,
    /// the task's progress; the round's updates and selections are dropped.
    pub fn close_round(&mut self, c: &ClosedRound<'_>) -> Result<()> {
        let tx = self.db.transaction()?;
        insert_model(&tx, &c.model, c.task, c.round, c.model_size)?;
        let attempt = Self::next_attempt(&tx, c.task, c.round)?;
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
        tx.execute(
            "INSERT INTO rounds (task, round, attempt, outcome, ended_at, participants, model, epsilon)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                c.task as i64,
                c.round as i64,
                attempt,
                outcome,
                unix_millis() as i64,
                participants,
                c.model.0.to_vec(),
                c.epsilon
            ],
        )?;
        tx.execute(
            "UPDATE tasks SET round = ?1, closed = ?2, model = ?3, server_state = ?4, ledger = ?5, state = ?6,
             note = ?7, clip_norm = ?8, bound_norm = ?9, bound_weight = ?10,
             centred_reference = ?11, centred_radius = ?12 WHERE id = ?13",
            params![
                c.round + 1,
                c.closed as i64,
                c.model.0.to_vec(),
                c.server_state,
                c.ledger,
                state_str(c.state),
                c.note,
                c.clip_norm,
                c.basis.map(|b| b.norm),
                c.basis.map(|b| b.weight),
                c.history.map(|h| params_to_bytes(&h.reference)),
                c.history.map(|h| h.radius),
                c.task as i64
            ],
        )?;
        clear_round(&tx, c.task, c.round)?;
        tx.commit()?;
        Ok(())
    }

    /// Abandons the open round: its updates and selections are dropped and the
    /// attempt is recorded; the round number stays for the retry.
    pub fn abandon_round(&mut self, task: u64, round: u64, reason: &str) -> Result<()> {
        let tx = self.db.transaction()?;
        let attempt = Self::next_attempt(&tx, task, round)?;
        let participants: Vec<u64> = {
            let mut st = tx.prepare(
                "SELECT device FROM updates WHERE task = ?1 AND round = ?2 ORDER BY seq",
            )?;
            st.query_map(params![task as i64, round as i64], |r| {
                r.get::<_, i64>(0).map(|v| v as u64)
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        tx.execute(
            "INSERT INTO rounds (task, round, attempt, outcome, ended_at, participants)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                task as i64,
                round as i64,
                attempt,
                format!("abandoned: {reason}"),
                unix_millis() as i64,
                serde_json::to_string(&participants).expect("ids serialise")
            ],
        )?;
        clear_round(&tx, task, round)?;
        tx.commit()?;
        Ok(())
    }

    /// A task's rounds (closed and abandoned attempts), oldest first.
    pub fn rounds(&self, task: u64) -> Result<Vec<RoundInfo>> {
        let mut st = self.db.prepare(
            "SELECT round, outcome, ended_at, participants, model, epsilon FROM rounds
             WHERE task = ?1 ORDER BY round, attempt",
        )?;
        let rows = st.query_map(params![task as i64], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, String>(3)?,
                r.get::<_, Option<Vec<u8>>>(4)?,
                r.get::<_, Option<f64>>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (round, outcome, ended_at, participants, model, epsilon) = row?;
            out.push(RoundInfo {
                task,
                round,
                outcome,
                ended_at: Some(ended_at),
                participants: serde_json::from_str(&participants)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                model: model.map(object_id).transpose()?.map(|m| m.to_string()),
                epsilon,
            });
        }
        Ok(out)
    }

    // ----- models and deployments -----

    /// Model versions, newest first (of one task, or all).
    pub fn models(&self, task: Option<u64>) -> Result<Vec<ModelInfo>> {
        let deployed = self.deployment()?.map(|(_, id)| id);
        let mut st = self.db.prepare(
            "SELECT id, task, round, size, created_at FROM models
             WHERE ?1 IS NULL OR task = ?1 ORDER BY created_at DESC, task DESC, round DESC",
        )?;
        let rows = st.query_map(params![task.map(|t| t as i64)], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)? as u64,
            ))
        })?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for row in rows {
            let (id, task, round, size, created_at) = row?;
            let id = object_id(id)?;
            ids.push(id);
            out.push(ModelInfo {
                id: id.to_string(),
                task,
                round,
                size,
                created_at,
                deployed: deployed == Some(id),
                artifacts: Vec::new(),
            });
        }
        drop(st);
        for (m, id) in out.iter_mut().zip(ids) {
            m.artifacts = self
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
        }
        Ok(out)
    }

    /// A stored model version's task, round and size.
    pub fn model_row(&self, id: &ObjectId) -> Result<Option<ModelRow>> {
        Ok(self
            .db
            .query_row(
                "SELECT task, round, size FROM models WHERE id = ?1",
                params![id.0.to_vec()],
                |r| {
                    Ok(ModelRow {
                        task: r.get::<_, i64>(0)? as u64,
                        round: r.get::<_, i64>(1)? as u64,
                        size: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()?)
    }

    /// Records the artifacts of `model` in one transaction (each variant's
    /// ONNX object already written with [`Store::put_object`], or the reason
    /// it could not be built). A variant recorded before is replaced.
    pub fn put_artifacts(
        &mut self,
        model: &ObjectId,
        artifacts: &[(Variant, std::result::Result<ObjectRef, String>)],
    ) -> Result<()> {
        let tx = self.db.transaction()?;
        for (variant, built) in artifacts {
            let (object, size, error) = match built {
                Ok(r) => (Some(r.id.0.to_vec()), Some(r.size as i64), None),
                Err(e) => (None, None, Some(e.as_str())),
            };
            tx.execute(
                "INSERT OR REPLACE INTO artifacts (model, variant, object, size, error, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    model.0.to_vec(),
                    variant_str(*variant),
                    object,
                    size,
                    error,
                    unix_secs() as i64
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The recorded artifacts of `model` (float first).
    pub fn artifacts(&self, model: &ObjectId) -> Result<Vec<ArtifactRow>> {
        let mut st = self.db.prepare(
            "SELECT variant, object, size, error FROM artifacts WHERE model = ?1 ORDER BY variant",
        )?;
        let rows = st.query_map(params![model.0.to_vec()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<String>>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (variant, object, size, error) = row?;
            let built = match (object, size) {
                (Some(o), Some(size)) => Ok(ObjectRef {
                    id: object_id(o)?,
                    size: size as u64,
                }),
                _ => Err(error.unwrap_or_else(|| "not built".into())),
            };
            out.push(ArtifactRow {
                variant: parse_variant(&variant)?,
                built,
            });
        }
        Ok(out)
    }

    /// The model whose artifact `object` is, if it is one.
    pub fn artifact_model(&self, object: &ObjectId) -> Result<Option<ObjectId>> {
        self.db
            .query_row(
                "SELECT model FROM artifacts WHERE object = ?1 LIMIT 1",
                params![object.0.to_vec()],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?
            .map(object_id)
            .transpose()
    }

    /// Forgets the artifacts recorded for `model` (to build them again).
    pub fn forget_artifacts(&self, model: &ObjectId) -> Result<()> {
        self.db.execute(
            "DELETE FROM artifacts WHERE model = ?1",
            params![model.0.to_vec()],
        )?;
        Ok(())
    }

    /// Model versions that lack a recorded artifact of either variant, newest first.
    pub fn models_without_artifacts(&self) -> Result<Vec<ObjectId>> {
        let mut st = self.db.prepare(
            "SELECT id FROM models
             WHERE (SELECT COUNT(*) FROM artifacts WHERE artifacts.model = models.id) < 2
             ORDER BY created_at DESC, task DESC, round DESC",
        )?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.map(|r| object_id(r?)).collect()
    }

    /// Deploys a model; returns the deployment version.
    pub fn deploy(&self, model: &ObjectId) -> Result<u64> {
        self.db.execute(
            "INSERT INTO deployments (model, deployed_at) VALUES (?1, ?2)",
            params![model.0.to_vec(), unix_secs() as i64],
        )?;
        Ok(self.db.last_insert_rowid() as u64)
    }

    /// The current deployment: version and model.
    pub fn deployment(&self) -> Result<Option<(u64, ObjectId)>> {
        self.db
            .query_row(
                "SELECT version, model FROM deployments ORDER BY version DESC LIMIT 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?
            .map(|(v, m)| Ok((v, object_id(m)?)))
            .transpose()
    }

    /// The model deployed before the current one, if any.
    pub fn previous_deployment(&self) -> Result<Option<ObjectId>> {
        let mut st = self
            .db
            .prepare("SELECT model FROM deployments ORDER BY version DESC LIMIT 2")?;
        let models: Vec<Vec<u8>> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        models.into_iter().nth(1).map(object_id).transpose()
    }
}

fn insert_model(
    tx: &Transaction<'_>,
    id: &ObjectId,
    task: u64,
    round: u64,
    size: u64,
) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO models (id, task, round, size, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id.0.to_vec(), task as i64, round as i64, size as i64, unix_secs() as i64],
    )?;
    Ok(())
}

fn clear_round(tx: &Transaction<'_>, task: u64, round: u64) -> Result<()> {
    tx.execute(
        "DELETE FROM updates WHERE task = ?1 AND round = ?2",
        params![task as i64, round as i64],
    )?;
    tx.execute(
        "DELETE FROM selections WHERE task = ?1 AND round = ?2",
        params![task as i64, round as i64],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
