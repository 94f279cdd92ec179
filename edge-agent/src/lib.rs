//! The edge agent: enrolls a device with the coordinator, then trains on
//! the device's data when the coordinator asks and uploads private, encoded
//! updates; serves the deployed model to apps on the device and reports
//! drift summaries of what it served.
//!
//! Modules, in the order they depend on each other (each uses only those
//! above it, never one below):
//!
//! - [`machine`]: the protocol logic of training, a sans-IO state machine;
//!   [`work`]: what a device computes for a plan (shared with the simulator);
//! - [`state`]: the state directory that survives restarts;
//!   [`eligibility`]: rules on power, load and network before training;
//!   [`config`]: how the agent runs ([`config::RunConfig`]);
//! - [`session`]: the connection to the coordinator (every exchange is a
//!   `fleet_protocol::session` of agent messages);
//! - [`inference`]: on-device predictions with tract (int8 or float ONNX
//!   artifacts), hot-swap and rollback, a local serving endpoint;
//!   [`serving`]: the deployed model as apps see it (predictor slot, drift
//!   observer, socket);
//! - services: [`deploy`] (follows the deployment: fetches, checks,
//!   persists and installs artifacts), [`drift`] (reports drift summaries),
//!   [`renew`] (renews the device certificate before it expires), [`run`]
//!   (the training loop, which starts the other three);
//! - commands: [`enroll`] (first contact: a token and a key-pair for a
//!   certificate), [`install`] (run configuration and systemd unit).

pub mod config;
pub mod deploy;
pub mod drift;
pub mod eligibility;
pub mod enroll;
pub mod inference;
pub mod install;
mod log;
pub mod machine;
pub mod renew;
pub mod run;
pub mod serving;
pub mod session;
pub mod state;
pub mod work;
