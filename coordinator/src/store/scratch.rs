//! Scratch PostgreSQL stores for tests and benchmarks: a fresh schema in
//! the server that `FLEET_POSTGRES` names (`.ci/postgres` starts one and
//! prints its URL), so that every test gets empty tables and tests run in
//! parallel on one server.
//!
//! Without `FLEET_POSTGRES`, [`schema`] returns `None` and the caller skips
//! its PostgreSQL half, saying so; with `FLEET_REQUIRE_POSTGRES=1` (as CI
//! sets it) a missing or unreachable server is an error instead, so that
//! nothing is skipped there silently.

use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable naming the test server.
pub const URL_VAR: &str = "FLEET_POSTGRES";

/// Set to `1` to make a missing server fail instead of skip.
pub const REQUIRE_VAR: &str = "FLEET_REQUIRE_POSTGRES";

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Creates an empty schema named after `label` in the server of
/// `FLEET_POSTGRES` and returns a URL whose connections use it. `None`
/// (after a line on standard error) when `FLEET_POSTGRES` is not set and
/// PostgreSQL is not required.
///
/// # Panics
/// When PostgreSQL is required but not named, or the server cannot be
/// reached: a test that needs it must not pass without it.
pub fn schema(label: &str) -> Option<String> {
    let required = std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1");
    let Ok(base) = std::env::var(URL_VAR) else {
        assert!(
            !required,
            "{REQUIRE_VAR}=1 but {URL_VAR} is not set: start a server with `.ci/postgres`"
        );
        eprintln!(
            "skipping the PostgreSQL half of {label}: set {URL_VAR} (see `.ci/postgres`) to run it"
        );
        return None;
    };
    let name: String = format!(
        "t_{}_{}_{}",
        label,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
    .chars()
    .map(|c| {
        if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        }
    })
    .take(63)
    .collect();
    let mut client = base
        .parse::<postgres::Config>()
        .unwrap_or_else(|e| panic!("{URL_VAR}: {e}"))
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("cannot reach the PostgreSQL server of {URL_VAR}: {e}"));
    client
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
        ))
        .unwrap_or_else(|e| panic!("cannot create schema {name}: {e}"));
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-csearch_path%3D{name}"))
}
