//! QUIC application close codes: the `error_code` of a connection the
//! coordinator (or an agent) closes on purpose.
//!
//! These numbers are part of the wire protocol as much as the messages are:
//! a peer tells why it was dropped by comparing the code of
//! `quinn::ConnectionError::ApplicationClosed` with them. Defined here once,
//! for both sides; `tests/golden.rs` pins their values. Changing a value, or
//! giving a new meaning to one, is a wire change (see [`crate::version`]).

/// Normal end: the peer is done (agents close with it after their work or
/// an enrollment; the coordinator does not log such a connection's end as an
/// error).
pub const DONE: u32 = 0;
/// The peer's role may not do what it asked (e.g. a coordinator certificate
/// used as a client).
pub const FORBIDDEN: u32 = 1;
/// The device was revoked (its live connections are closed with it), or it
/// is unknown or revoked when it connects: it must enroll again. An agent
/// seeing this code stops instead of reconnecting.
pub const REVOKED: u32 = 2;
/// The coordinator is shutting down; reconnect later. Reserved: no code path
/// sends it yet.
pub const SHUTDOWN: u32 = 3;
/// The coordinator is at one of its connection limits (too many
/// connections in all, without a certificate, or for this device), or an
/// enrolling newcomer took too long: try again later, with backoff.
pub const BUSY: u32 = 4;
