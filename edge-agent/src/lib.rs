//! The edge agent: a small single-threaded daemon that enrolls with a
//! coordinator, trains locally with `fleet-models` and uploads privatised
//! updates.
//!
//! Empty for now: the agent state machine and its QUIC driver arrive with the
//! coordinator/agent work.
