//! The edge agent: enrolls a device with the coordinator, then trains on
//! the device's data when the coordinator asks and uploads private, encoded
//! updates.
//!
//! - [`machine`]: the protocol logic, a sans-IO state machine;
//! - [`run`]: its driver (one current-thread runtime, a reader task, a
//!   trainer thread, bounded channels);
//! - [`work`]: what a device computes for a plan (shared with the simulator);
//! - [`enroll`]: first contact: a token and a key-pair for a certificate;
//! - [`state`]: the state directory that survives restarts;
//! - [`eligibility`]: rules on power, load and network before training;
//! - [`install`]: run configuration and systemd unit;
//! - [`deploy`]: the deployed model: fetched from the coordinator, checked,
//!   persisted and hot-swapped into the predictor served to apps;
//! - [`inference`]: on-device predictions with tract (int8 or float ONNX
//!   artifacts), hot-swap and rollback, a local serving endpoint.

pub mod deploy;
pub mod drift;
pub mod eligibility;
pub mod enroll;
pub mod inference;
pub mod install;
pub mod machine;
pub mod run;
pub mod state;
pub mod work;
