//! The edge agent: connects to the coordinator, takes part in rounds, and
//! trains on the device's own data.
//!
//! [`session`] is the agent's protocol loop over one QUIC connection: hello,
//! check in, and for each plan fetch the model (SHA-256-verified), train with
//! `fleet-models`, clip and noise per the plan's DP settings, encode with the
//! plan's codec and upload in chunks, resuming from what the coordinator
//! already holds. It honours pace steering by sleeping until the time the
//! coordinator named. The daemon, enrollment, local state and eligibility
//! rules come next.

pub mod inference;
pub mod session;
