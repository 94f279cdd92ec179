//! Protocol versioning.
//!
//! Each side announces the version it speaks and the oldest it accepts.
//! Two peers can talk when each one's version is within the other's range
//! ([`check_peer_version`]); the lower of the two versions is the one the
//! session speaks. Version 1 is the first.
//!
//! History:
//! - 2: `UpdateMeta::examples` and `UpdateMeta::train_loss` are optional
//!   (a private task's reports carry neither); `EngineConfig` gained
//!   `max_participations` and `min_separation`; `DpConfig` gained
//!   `adaptive` (adaptive clipping); `TaskSpec` gained `max_examples`.
//! - 3: `StrategyConfig` gained `bound` (the relative bound);
//!   `EngineConfig` gained `selection_window_ms`.
//! - 4: `AgentMessage::Renew` and `CoordinatorMessage::Renewed` (device
//!   certificates renewed over the device's own connection);
//!   `StrategyConfig` gained `centred` (centred clipping).
//! - 5: `TaskSpec` gained `secure_aggregation` and `Plan` gained `secure`
//!   (secure aggregation).
//! - 6: `AgentMessage::Secure`, `AgentMessage::SecureChunk` and
//!   `CoordinatorMessage::Secure` (secure aggregation over QUIC).
//!
//! # What the version covers
//!
//! [`PROTOCOL_VERSION`] names the bytes of everything that crosses the wire:
//! the frame header ([`crate::frame`]), every [`crate::message`] and
//! [`crate::admin`] message and every type they carry, those of other
//! crates included (`fleet_models`: `ModelSpec`, `TrainConfig`,
//! `LayoutFingerprint`, `Variant`; `fleet_aggregation`: `Codec`,
//! `StrategyConfig`, `DpConfig`, `PrivacyBudget`, `Spent`, `SketchSpec`,
//! `Summary`, `Scores`, `Signal`, …), the [`crate::error::ErrorCode`]s and
//! the [`crate::close`] codes. `tests/golden.rs` holds the bytes of one
//! value of each of them, recorded at the current version.
//!
//! # When to bump it
//!
//! Messages are postcard: no field names, no tags, no lengths of structs. A
//! struct is its fields in declaration order; an enum is its variant's index
//! (a varint) followed by that variant's fields. So `PROTOCOL_VERSION` goes
//! up with any change of the bytes of an existing message:
//!
//! - a field added, removed, reordered or retyped in a wire struct or enum
//!   variant, in this crate or in a carried type of another crate. Even an
//!   `Option` field added at the end of a struct changes the bytes, and
//!   `#[serde(default)]` does not help: it only applies to self-describing
//!   formats such as the JSON the coordinator stores;
//! - a variant added anywhere but at the end of an enum, or one removed or
//!   reordered (the indices of the others move);
//! - a different meaning for the same bytes (units, a close code's number).
//!
//! A variant appended at the end of an enum leaves the bytes of existing
//! messages (and the goldens) as they were, but a peer of the older version
//! cannot decode the new variant: it sees a malformed frame. It also takes a
//! bump, unless it is never sent to a peer that did not announce the new
//! version (today nothing sends by negotiated version, see below).
//!
//! No bump for: documentation; renaming a field or a variant (postcard
//! encodes no names, but renames do change the stored and submitted JSON);
//! validation rules; types that never cross the wire (this crate's local
//! [`crate::error::Error`], coordinator and agent internals); new functions.
//!
//! A bump is one change: raise `PROTOCOL_VERSION` and re-record the goldens
//! of `tests/golden.rs` together with the version they assert. A golden that
//! fails means the wire format changed: either undo the change or do both.
//!
//! # When `MIN_SUPPORTED_VERSION` moves
//!
//! Neither side keeps the encoding of an older version, and nothing uses the
//! negotiated version of [`CoordinatorMessage::HelloAck`]: coordinator and
//! agents always speak this build's format. An older peer let through the
//! handshake would fail on the first message that changed. So with today's
//! code `MIN_SUPPORTED_VERSION` moves up to the new `PROTOCOL_VERSION` with
//! every bump; it may lag behind only once the code speaks the older format
//! to sessions that negotiated it.
//!
//! What an old peer needs to be told it is old must never change, whatever
//! the version: `AgentMessage::Hello` and `AdminRequest::Hello` (variant 0,
//! fields `version`, `min_version` and, for agents, `software`),
//! `HelloAck` (variant 0 of both answers), the `Error` answers (variant 8 of
//! both, carrying `WireError { code, message }`), and
//! `ErrorCode::IncompatibleVersion` (index 0).
//!
//! # How a peer of another version is answered
//!
//! Every connection (device, enrolling newcomer, administrator) must open
//! with a `Hello`, which the coordinator checks with [`check_peer_version`]
//! (`hello` and `Coordinator::admin` in `coordinator/src/server.rs`). A peer
//! older than `MIN_SUPPORTED_VERSION` ("upgrade the peer"), or one whose
//! minimum is above `PROTOCOL_VERSION` ("upgrade this side", i.e. the
//! coordinator), gets `Error(WireError { code: IncompatibleVersion, .. })`
//! with that sentence. The connection is not closed: the peer stays
//! ungreeted, may send another `Hello`, and any other request is answered
//! `Malformed` ("send Hello first"). Otherwise the answer is `HelloAck` with
//! the lower of the two versions. Agents do not check versions themselves:
//! they take any `HelloAck`. On `IncompatibleVersion` the agent's run loop
//! stops for good ("the coordinator refused this agent's protocol: …;
//! upgrade the agent", also kept as the status's last error) instead of
//! reconnecting; other refusals of the hello make it back off and retry.
//! `edge-agent enroll` reports the refusal's message, and the admin client
//! fails with "refused: …".
//!
//! [`CoordinatorMessage::HelloAck`]: crate::message::CoordinatorMessage::HelloAck

use crate::error::Error;

/// The version this build speaks.
pub const PROTOCOL_VERSION: u16 = 6;
/// The oldest version this build accepts from a peer.
pub const MIN_SUPPORTED_VERSION: u16 = 6;

/// Checks a peer's `(version, min_version)` against ours; returns the version to speak.
pub fn check_peer_version(peer_version: u16, peer_min: u16) -> Result<u16, Error> {
    if peer_version < MIN_SUPPORTED_VERSION {
        return Err(Error::Version(format!(
            "peer speaks protocol {peer_version}, this build needs at least {MIN_SUPPORTED_VERSION}: upgrade the peer"
        )));
    }
    if peer_min > PROTOCOL_VERSION {
        return Err(Error::Version(format!(
            "peer needs protocol {peer_min} or newer, this build speaks {PROTOCOL_VERSION}: upgrade this side"
        )));
    }
    Ok(peer_version.min(PROTOCOL_VERSION))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatible_and_incompatible_peers() {
        let (v, min) = (PROTOCOL_VERSION, MIN_SUPPORTED_VERSION);
        assert_eq!(check_peer_version(v, min), Ok(v));
        assert_eq!(
            check_peer_version(v + 1, v),
            Ok(v),
            "a newer peer that still accepts this version"
        );
        let e = check_peer_version(min - 1, min - 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("upgrade the peer"), "{e}");
        let e = check_peer_version(v + 3, v + 2).unwrap_err().to_string();
        assert!(e.contains("upgrade this side"), "{e}");
    }
}
