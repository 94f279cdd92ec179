//! The coordinator: the sans-IO round engine, its QUIC driver, durable state
//! and the admin command line.
//!
//! Empty for now: the round engine and server arrive with the coordinator
//! work. Numerics live in `fleet-aggregation` and `fleet-models`, wire types
//! in `fleet-protocol`.
