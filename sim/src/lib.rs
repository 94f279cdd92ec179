//! The fleet simulator: drives the coordinator's round engine and the
//! agent's state machine with a virtual clock.
//!
//! Empty for now.
