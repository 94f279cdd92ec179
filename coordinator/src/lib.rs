//! The coordinator: the sans-IO round engine, its QUIC driver, durable state
//! and the admin command line.
//!
//! Today it holds the sans-IO round engine ([`engine`]) and the admin
//! commands that need no running coordinator ([`cli`]); the QUIC server and
//! the durable state come next. Numerics live in
//! `fleet-aggregation` and `fleet-models`, wire types in `fleet-protocol`.

pub mod cli;
pub mod engine;
pub mod server;
