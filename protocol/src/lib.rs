//! Wire protocol between the coordinator and edge agents.
//!
//! The only place wire types are defined:
//!
//! - [`version`]: the protocol version and the handshake rule;
//! - [`message`]: what agents and the coordinator say to each other;
//! - [`frame`]: length-delimited postcard frames with a maximum size, and a
//!   sans-IO decoder that never panics on any byte string;
//! - [`transfer`]: chunked, resumable transfer of model artifacts and
//!   updates, checked with SHA-256;
//! - [`task`]: the definition of a federated task;
//! - [`admin`]: administration requests and answers;
//! - [`close`]: the QUIC application close codes;
//! - [`time`]: Unix time as both sides stamp it;
//! - [`tls`]: the certificate authority, certificate roles and the mutual-TLS
//!   QUIC configurations of both sides;
//! - [`logging`]: the log subscriber every binary installs (text or JSON
//!   lines), so that all of the fleet's processes log alike;
//! - [`secure`]: device certificates as secure aggregation's identity keys
//!   (signing advertisements, checking them against the fleet CA);
//! - [`private`]: directories and files only their owner may read (the
//!   coordinator's home, an agent's state).
//!
//! Apart from [`stream`], a thin async adapter for quinn streams, and
//! [`session`], a client's connection to the coordinator built on it
//! (connect, `Hello`, requests), nothing here does I/O; the QUIC drivers feed
//! bytes in and take bytes out.

pub mod admin;
pub mod close;
pub mod error;
pub mod frame;
pub mod logging;
pub mod message;
pub mod private;
pub mod secure;
pub mod session;
pub mod stream;
pub mod task;
pub mod time;
pub mod tls;
pub mod transfer;
pub mod version;

pub use error::{ErrorCode, WireError};
pub use frame::{FrameDecoder, MAX_FRAME, decode, encode};
pub use message::{AgentMessage, CoordinatorMessage};
pub use version::{MIN_SUPPORTED_VERSION, PROTOCOL_VERSION, check_peer_version};
