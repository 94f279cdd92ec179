//! The fleet simulator.
//!
//! A fleet — devices with profiles, their data, a federated task and
//! scenarios — is described in a TOML file ([`fleet`]). [`driver`] runs it
//! as a discrete-event simulation on a virtual clock around the
//! coordinator's sans-IO round engine, the same state machine the QUIC
//! server drives: devices check in when available, download, train for
//! real with `fleet-models` (in parallel across cores), drop out or upload,
//! and their updates go through the same privacy, codec, admission and
//! aggregation steps as in a deployment. [`report`] writes the run
//! directory: per-round CSV and JSON and an HTML report with plots.
//! [`network`] runs the same fleet file over real QUIC: a real coordinator
//! and one real agent per device on loopback.

pub mod agent;
pub mod data;
pub mod driver;
pub mod fleet;
pub mod memory;
pub mod monitor;
pub mod network;
pub mod population;
pub mod report;
pub mod scenario;
