//! The fleet simulator.
//!
//! [`rounds`] runs federated rounds in one process: it samples a cohort,
//! trains each sampled client for real with `fleet-models` (in parallel
//! across cores), passes every update through the same privacy and codec
//! steps a device applies, and aggregates them with `fleet-aggregation`.
//! It does not model time, networks or device availability yet; those come
//! with the coordinator's round engine, which this simulator will drive.

pub mod plot;
pub mod rounds;
