//! Protocol versioning.
//!
//! Each side announces the version it speaks and the oldest it accepts.
//! Two peers can talk when each one's version is within the other's range;
//! they then speak the lower of the two versions. Version 1 is the first.

use crate::error::Error;

/// The version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest version this build accepts from a peer.
pub const MIN_SUPPORTED_VERSION: u16 = 1;

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
        assert_eq!(check_peer_version(1, 1), Ok(1));
        assert_eq!(
            check_peer_version(3, 1),
            Ok(1),
            "a newer peer that still accepts 1"
        );
        let e = check_peer_version(0, 0).unwrap_err().to_string();
        assert!(e.contains("upgrade the peer"), "{e}");
        let e = check_peer_version(5, 4).unwrap_err().to_string();
        assert!(e.contains("upgrade this side"), "{e}");
    }
}
