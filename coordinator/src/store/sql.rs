//! The SQL the store speaks, on either engine: SQLite (embedded, one
//! coordinator process) or PostgreSQL (shared by coordinator replicas).
//!
//! The store writes each statement once, in the subset both engines read
//! alike: `?N` placeholders (rewritten to `$N` for PostgreSQL), `ON
//! CONFLICT` instead of `INSERT OR …`, `RETURNING` instead of
//! `last_insert_rowid()`, explicit `CAST`s where PostgreSQL cannot infer a
//! parameter's type. The schema is written once in SQLite's type names and
//! translated by [`pg_schema`]. Values cross the boundary as [`Value`]
//! (arguments) and [`Cell`] (results), so that no caller sees either
//! engine's types.
//!
//! A transaction ([`Db::transaction`]) is rolled back when dropped
//! uncommitted, as rusqlite's and postgres's are.

use std::borrow::Cow;
use std::collections::HashMap;

use super::{Result, StoreError};

/// An argument of a statement.
#[derive(Debug, Clone)]
pub enum Value<'a> {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (`INTEGER` / `BIGINT`).
    Int(i64),
    /// A double (`REAL` / `DOUBLE PRECISION`).
    Real(f64),
    /// Text.
    Text(Cow<'a, str>),
    /// Bytes (`BLOB` / `BYTEA`).
    Blob(Cow<'a, [u8]>),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<u64> for Value<'_> {
    fn from(v: u64) -> Self {
        // Ids, rounds, times and sizes: far below 2^63.
        Value::Int(v as i64)
    }
}

impl From<usize> for Value<'_> {
    fn from(v: usize) -> Self {
        Value::Int(v as i64)
    }
}

impl From<f64> for Value<'_> {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Cow::Borrowed(v))
    }
}

impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Value::Text(Cow::Owned(v))
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Blob(Cow::Borrowed(v))
    }
}

impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Blob(Cow::Borrowed(v))
    }
}

impl From<Vec<u8>> for Value<'_> {
    fn from(v: Vec<u8>) -> Self {
        Value::Blob(Cow::Owned(v))
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The arguments of a statement: `args![a, b, c]`.
macro_rules! args {
    () => {
        &[] as &[$crate::store::sql::Value<'_>]
    };
    ($($e:expr),+ $(,)?) => {
        &[$($crate::store::sql::Value::from($e)),*][..]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

impl postgres::types::ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Real(v) if *ty == Type::FLOAT4 => (*v as f32).to_sql(ty, out),
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(v) => v.as_ref().to_sql(ty, out),
            Value::Blob(v) => v.as_ref().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        // Checked per value in `to_sql`: a mismatch is the server's error.
        true
    }

    postgres::types::to_sql_checked!();
}

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// A double.
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
    /// A boolean (PostgreSQL's; SQLite's are integers).
    Bool(bool),
}

/// A row read back.
#[derive(Debug, Clone)]
pub struct Row(Vec<Cell>);

fn wrong(i: usize, want: &str, got: &Cell) -> StoreError {
    StoreError::Corrupt(format!("column {i}: expected {want}, found {got:?}"))
}

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell> {
        self.0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {i}")))
    }

    /// An integer, or NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            other => Err(wrong(i, "an integer", other)),
        }
    }

    /// An integer.
    pub fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?
            .ok_or_else(|| wrong(i, "an integer", &Cell::Null))
    }

    /// A non-negative integer, or NULL.
    pub fn opt_u64(&self, i: usize) -> Result<Option<u64>> {
        self.opt_int(i)?
            .map(|v| {
                u64::try_from(v).map_err(|_| wrong(i, "a non-negative integer", &Cell::Int(v)))
            })
            .transpose()
    }

    /// A non-negative integer.
    pub fn u64(&self, i: usize) -> Result<u64> {
        self.opt_u64(i)?
            .ok_or_else(|| wrong(i, "an integer", &Cell::Null))
    }

    /// A double, or NULL (an integer is widened, as SQLite stores whole
    /// REAL values).
    pub fn opt_real(&self, i: usize) -> Result<Option<f64>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Real(v) => Ok(Some(*v)),
            Cell::Int(v) => Ok(Some(*v as f64)),
            other => Err(wrong(i, "a number", other)),
        }
    }

    /// A double.
    pub fn real(&self, i: usize) -> Result<f64> {
        self.opt_real(i)?
            .ok_or_else(|| wrong(i, "a number", &Cell::Null))
    }

    /// Text, or NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(v) => Ok(Some(v.clone())),
            other => Err(wrong(i, "text", other)),
        }
    }

    /// Text.
    pub fn text(&self, i: usize) -> Result<String> {
        self.opt_text(i)?
            .ok_or_else(|| wrong(i, "text", &Cell::Null))
    }

    /// Bytes, or NULL.
    pub fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Blob(v) => Ok(Some(v.clone())),
            other => Err(wrong(i, "bytes", other)),
        }
    }

    /// Bytes.
    pub fn blob(&self, i: usize) -> Result<Vec<u8>> {
        self.opt_blob(i)?
            .ok_or_else(|| wrong(i, "bytes", &Cell::Null))
    }

    /// A truth value (PostgreSQL's boolean, SQLite's 0 or 1).
    pub fn bool(&self, i: usize) -> Result<bool> {
        match self.cell(i)? {
            Cell::Bool(v) => Ok(*v),
            Cell::Int(v) => Ok(*v != 0),
            other => Err(wrong(i, "a truth value", other)),
        }
    }
}

/// Which engine a [`Db`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded SQLite.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A connection to either engine.
pub enum Db {
    /// SQLite.
    Sqlite(rusqlite::Connection),
    /// PostgreSQL, with its prepared statements by text.
    Postgres {
        /// The connection.
        client: Box<postgres::Client>,
        /// Statements prepared on it, by their text as the store wrote it.
        prepared: HashMap<&'static str, postgres::Statement>,
        /// How to connect again.
        config: Box<postgres::Config>,
        /// Whether a transaction is open (no reconnection inside one).
        in_tx: bool,
        /// The channels this connection listens on (again after a
        /// reconnection).
        channels: Vec<&'static str>,
    },
}

/// Connects to PostgreSQL (no TLS: a Unix socket or a private network;
/// `docs/deploy.md`), with a connect timeout and TCP keep-alives so that a
/// vanished server fails calls instead of hanging them.
pub fn connect_postgres(config: &postgres::Config) -> Result<Db> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.keepalives(true);
    if config.get_application_name().is_none() {
        config.application_name("fleet-coordinator");
    }
    let client = config.connect(postgres::NoTls)?;
    Ok(Db::Postgres {
        client: Box::new(client),
        prepared: HashMap::new(),
        config: Box::new(config),
        in_tx: false,
        channels: Vec::new(),
    })
}

/// `?N` placeholders as PostgreSQL's `$N`. The store's statements hold no
/// `?` inside string literals.
fn pg_placeholders(sql: &str) -> String {
    sql.replace('?', "$")
}

/// The schema, written in SQLite's type names, in PostgreSQL's.
pub fn pg_schema(sql: &str) -> String {
    sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace(" INTEGER", " BIGINT")
        .replace(" BLOB", " BYTEA")
        .replace(" REAL", " DOUBLE PRECISION")
}

fn pg_cell(row: &postgres::Row, i: usize) -> std::result::Result<Cell, postgres::Error> {
    use postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    Ok(if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?
            .map_or(Cell::Null, Cell::Int)
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map_or(Cell::Null, |v| Cell::Int(v.into()))
    } else if ty == Type::INT2 {
        row.try_get::<_, Option<i16>>(i)?
            .map_or(Cell::Null, |v| Cell::Int(v.into()))
    } else if ty == Type::FLOAT8 {
        row.try_get::<_, Option<f64>>(i)?
            .map_or(Cell::Null, Cell::Real)
    } else if ty == Type::FLOAT4 {
        row.try_get::<_, Option<f32>>(i)?
            .map_or(Cell::Null, |v| Cell::Real(v.into()))
    } else if ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(i)?
            .map_or(Cell::Null, Cell::Blob)
    } else if ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)?
            .map_or(Cell::Null, Cell::Bool)
    } else {
        // TEXT, VARCHAR, NAME: anything else is read as text (an error if
        // the driver cannot).
        row.try_get::<_, Option<String>>(i)?
            .map_or(Cell::Null, Cell::Text)
    })
}

fn sqlite_cell(v: rusqlite::types::ValueRef<'_>) -> Cell {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(v) => Cell::Int(v),
        ValueRef::Real(v) => Cell::Real(v),
        ValueRef::Text(v) => Cell::Text(String::from_utf8_lossy(v).into_owned()),
        ValueRef::Blob(v) => Cell::Blob(v.to_vec()),
    }
}

impl Db {
    /// The engine.
    pub fn engine(&self) -> Engine {
        match self {
            Db::Sqlite(_) => Engine::Sqlite,
            Db::Postgres { .. } => Engine::Postgres,
        }
    }

    /// Outside a transaction, replaces a PostgreSQL connection the server
    /// closed (a restart) with a new one.
    fn reconnect_if_closed(&mut self) -> Result<()> {
        if let Db::Postgres {
            client,
            prepared,
            config,
            in_tx: false,
            channels,
        } = self
            && client.is_closed()
        {
            tracing::warn!("the PostgreSQL connection was closed: connecting again");
            let Db::Postgres { client: fresh, .. } = connect_postgres(config)? else {
                unreachable!("connect_postgres returns a PostgreSQL connection");
            };
            *client = fresh;
            prepared.clear();
            for c in channels.iter() {
                client.batch_execute(&format!("LISTEN {c}"))?;
            }
        }
        Ok(())
    }

    /// Listens on `channel` (PostgreSQL; nothing on SQLite), from now on
    /// and again after every reconnection.
    pub fn listen(&mut self, channel: &'static str) -> Result<()> {
        self.reconnect_if_closed()?;
        if let Db::Postgres {
            client, channels, ..
        } = self
            && !channels.contains(&channel)
        {
            client.batch_execute(&format!("LISTEN {channel}"))?;
            channels.push(channel);
        }
        Ok(())
    }

    /// Whether a notification arrived on a channel listened to since the
    /// last call (what the connection buffered or receives within a
    /// millisecond; no statement, no transaction).
    pub fn notified(&mut self) -> Result<bool> {
        self.reconnect_if_closed()?;
        let Db::Postgres { client, .. } = self else {
            return Ok(false);
        };
        use postgres::fallible_iterator::FallibleIterator;
        let mut any = false;
        let mut notes = client.notifications();
        // Waits at most a millisecond: the client's runtime must turn its
        // I/O driver once to see what arrived since its last statement
        // (the non-blocking iterator returns before it does).
        let mut pending = notes.timeout_iter(std::time::Duration::from_millis(1));
        while pending.next()?.is_some() {
            any = true;
        }
        Ok(any)
    }

    fn pg_statement(
        client: &mut postgres::Client,
        prepared: &mut HashMap<&'static str, postgres::Statement>,
        sql: &'static str,
    ) -> Result<postgres::Statement> {
        if let Some(st) = prepared.get(sql) {
            return Ok(st.clone());
        }
        let st = client.prepare(&pg_placeholders(sql))?;
        prepared.insert(sql, st.clone());
        Ok(st)
    }

    /// Runs a statement; the number of rows it changed.
    pub fn execute(&mut self, sql: &'static str, args: &[Value<'_>]) -> Result<u64> {
        self.reconnect_if_closed()?;
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                Ok(st.execute(rusqlite::params_from_iter(args.iter()))? as u64)
            }
            Db::Postgres {
                client, prepared, ..
            } => {
                let st = Self::pg_statement(client, prepared, sql)?;
                let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    args.iter().map(|a| a as _).collect();
                Ok(client.execute(&st, &params)?)
            }
        }
    }

    /// Runs a query; its rows.
    pub fn query(&mut self, sql: &'static str, args: &[Value<'_>]) -> Result<Vec<Row>> {
        self.reconnect_if_closed()?;
        match self {
            Db::Sqlite(c) => {
                let mut st = c.prepare_cached(sql)?;
                let n = st.column_count();
                let mut rows = st.query(rusqlite::params_from_iter(args.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut cells = Vec::with_capacity(n);
                    for i in 0..n {
                        cells.push(sqlite_cell(r.get_ref(i)?));
                    }
                    out.push(Row(cells));
                }
                Ok(out)
            }
            Db::Postgres {
                client, prepared, ..
            } => {
                let st = Self::pg_statement(client, prepared, sql)?;
                let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
                    args.iter().map(|a| a as _).collect();
                let rows = client.query(&st, &params)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    let mut cells = Vec::with_capacity(r.len());
                    for i in 0..r.len() {
                        cells.push(pg_cell(r, i)?);
                    }
                    out.push(Row(cells));
                }
                Ok(out)
            }
        }
    }

    /// The first row of a query, if any.
    pub fn query_opt(&mut self, sql: &'static str, args: &[Value<'_>]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row of a query, which must return one.
    pub fn query_one(&mut self, sql: &'static str, args: &[Value<'_>]) -> Result<Row> {
        self.query_opt(sql, args)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from {sql:?}")))
    }

    /// Runs statements without arguments (schema, transaction control).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        self.reconnect_if_closed()?;
        match self {
            Db::Sqlite(c) => c.execute_batch(sql)?,
            Db::Postgres { client, .. } => client.batch_execute(sql)?,
        }
        Ok(())
    }

    /// Begins a transaction, rolled back unless committed. SQLite's takes
    /// the write lock at once (every transaction of the store writes), so
    /// that two connections never deadlock upgrading read locks; the busy
    /// timeout makes the second wait.
    pub fn transaction(&mut self) -> Result<Tx<'_>> {
        self.batch(match self.engine() {
            Engine::Sqlite => "BEGIN IMMEDIATE",
            Engine::Postgres => "BEGIN",
        })?;
        self.set_in_tx(true);
        Ok(Tx {
            db: self,
            done: false,
        })
    }
}

/// An open transaction: statements run through it (it dereferences to
/// the [`Db`]); dropped without [`Tx::commit`], it rolls back.
pub struct Tx<'a> {
    db: &'a mut Db,
    done: bool,
}

impl Db {
    fn set_in_tx(&mut self, open: bool) {
        if let Db::Postgres { in_tx, .. } = self {
            *in_tx = open;
        }
    }
}

impl Tx<'_> {
    /// Commits.
    pub fn commit(mut self) -> Result<()> {
        self.done = true;
        let r = self.db.batch("COMMIT");
        self.db.set_in_tx(false);
        r
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;
    fn deref(&self) -> &Db {
        self.db
    }
}

impl std::ops::DerefMut for Tx<'_> {
    fn deref_mut(&mut self) -> &mut Db {
        self.db
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            // A failed rollback leaves the connection broken; its next
            // statement reports that.
            let _ = self.db.batch("ROLLBACK");
            self.db.set_in_tx(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_schema_translate() {
        assert_eq!(
            pg_placeholders("SELECT a FROM t WHERE b = ?1 AND c = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = $12"
        );
        assert_eq!(
            pg_schema(
                "CREATE TABLE t (\n    id INTEGER PRIMARY KEY AUTOINCREMENT,\n    n INTEGER NOT NULL,\n    b BLOB,\n    r REAL\n);"
            ),
            "CREATE TABLE t (\n    id BIGSERIAL PRIMARY KEY,\n    n BIGINT NOT NULL,\n    b BYTEA,\n    r DOUBLE PRECISION\n);"
        );
    }

    #[test]
    fn rows_read_both_engines_types() {
        let row = Row(vec![
            Cell::Int(3),
            Cell::Null,
            Cell::Bool(true),
            Cell::Real(0.5),
            Cell::Int(-1),
        ]);
        assert_eq!(row.u64(0).unwrap(), 3);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert!(row.int(1).is_err());
        assert!(row.bool(2).unwrap());
        assert!(row.bool(0).unwrap());
        assert_eq!(row.real(3).unwrap(), 0.5);
        assert_eq!(row.real(0).unwrap(), 3.0);
        assert!(row.u64(4).is_err(), "a negative id is refused, not wrapped");
        assert!(row.text(0).is_err());
        assert!(row.cell(5).is_err());
    }
}
