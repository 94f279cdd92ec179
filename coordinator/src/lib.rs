//! The coordinator: the sans-IO round engine, its QUIC driver, durable state
//! and the admin command line.
//!
//! - [`engine`]: the round engine, a deterministic state machine (selection,
//!   deadlines, quorum, pace steering) fed with events and a clock;
//! - [`task`]: the task core, one task's round logic without I/O: the
//!   engine, the open round's aggregate, DP, the server optimiser and the
//!   privacy ledger, fed with check-ins, decoded reports and time, answering
//!   with effects (the simulator runs the same core);
//! - [`runner`]: one running task as the coordinator drives it: uploads
//!   reassembled and decoded, the core's effects persisted in [`store`], the
//!   SQLite database and model objects;
//! - [`app`]: what the coordinator decides for devices, administrators and
//!   enrollment, without network I/O: it owns the store, the runner, the
//!   drift watch and the metrics, and leaves effects for the driver;
//! - [`server`]: the QUIC driver: connections, greetings, streams, the
//!   clock, the ticker and the artifact builder;
//! - [`worker`]: the [`app`]'s own thread, which every decision runs on
//!   (the async runtime carries network I/O only);
//! - [`artifacts`]: the float and int8 inference artifacts built for every
//!   model version and shipped to agents;
//! - [`drift`]: the fleet drift monitor, a sans-IO state machine fed with
//!   device summaries and closed windows;
//! - [`watch`]: the drift monitor of the deployed model, as the server runs it;
//! - [`metrics`]: Prometheus counters and their HTTP endpoint;
//! - [`home`]: the coordinator's directory (CA, credentials, settings);
//!   [`cakey`]: the CA key encrypted at rest with a passphrase;
//! - [`limits`]: connection and request limits against hostile peers and load;
//! - [`cli`]: the `coordinator` command line, including the admin client.
//!
//! Numerics live in `fleet-aggregation` and `fleet-models`, wire types in
//! `fleet-protocol`.

pub mod app;
pub mod artifacts;
pub mod cakey;
pub mod cli;
pub mod drift;
pub mod engine;
pub mod home;
pub mod limits;
pub mod metrics;
pub mod runner;
pub mod server;
pub mod store;
pub mod task;
#[cfg(test)]
mod testing;
pub mod watch;
pub mod worker;
