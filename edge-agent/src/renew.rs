//! Certificate renewal: a device trades its certificate for a fresh one,
//! with a new key, over its authenticated channel, long before it expires.
//!
//! Device certificates are short-lived (the coordinator's
//! `device_cert_days`, 90 by default). [`keep_fresh`] looks at the
//! certificate at start and every [`CHECK_EVERY`] and renews it once half
//! its lifetime has passed ([`due`]), or at once when it was issued for
//! longer than [`LONGEST`] (a certificate from before renewal existed). A
//! device that stays offline past its certificate's end must enroll again.
//!
//! A renewal survives a crash at any point: the new key and signing
//! request are saved before they are sent (a lost answer is asked for
//! again with the same request), and the answer is saved before the
//! credentials are swapped ([`StateDir::finish_renewal`], which the agent
//! also runs at start). The coordinator keeps admitting the previous
//! certificate until the new one is first used, so a device whose answer
//! was lost is never locked out.

use std::time::Duration;

use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::tls::{
    Role, certificate_public_key, certificate_validity, csr_public_key, device_key_and_csr, role_of,
};
use rustls::pki_types::CertificateDer;

use crate::log::log;
use crate::session::Coordinator;
use crate::state::StateDir;

/// How often the certificate's age is looked at.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// A certificate valid for longer than this (seconds; 398 days, the
/// longest the Web PKI allows) is renewed at once.
pub const LONGEST: u64 = 398 * 86_400;

/// Whether a certificate valid from `not_before` to `not_after` (Unix
/// seconds) should be renewed at `now`: half its lifetime has passed, or
/// its lifetime is longer than [`LONGEST`].
pub fn due(not_before: u64, not_after: u64, now: u64) -> bool {
    let lifetime = not_after.saturating_sub(not_before);
    lifetime > LONGEST || now >= not_before + lifetime / 2
}

/// Renews the device's certificate when [`due`], at start and every
/// [`CHECK_EVERY`], for as long as the agent runs. Failures are logged and
/// tried again at the next check.
pub async fn keep_fresh(state: StateDir, coordinator: Coordinator) {
    loop {
        match renew_if_due(&state, &coordinator).await {
            Ok(true) => log!("certificate renewed"),
            Ok(false) => {}
            Err(e) => log!(format!(
                "certificate renewal failed (tried again later): {e}"
            )),
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Renews the certificate if it is [`due`] (or a renewal was left
/// unfinished); whether it did.
pub async fn renew_if_due(state: &StateDir, coordinator: &Coordinator) -> Result<bool, String> {
    let (cert, _, _) = state.credentials().map_err(|e| e.to_string())?;
    let (not_before, not_after) = certificate_validity(&cert).map_err(|e| e.to_string())?;
    let pending = state
        .renewal_request()
        .map_err(|e| e.to_string())?
        .is_some();
    if !pending && !due(not_before, not_after, fleet_protocol::time::unix_secs()) {
        return Ok(false);
    }
    renew(state, coordinator).await.map(|()| true)
}

/// Renews the certificate now: a new key, its signing request sent over
/// the device's own connection, the answer checked and saved, and later
/// connections made with it.
pub async fn renew(state: &StateDir, coordinator: &Coordinator) -> Result<(), String> {
    let identity = state.identity().map_err(|e| e.to_string())?;
    let csr = match state.renewal_request().map_err(|e| e.to_string())? {
        Some((_, csr)) => csr,
        None => {
            let (key, csr) = device_key_and_csr().map_err(|e| e.to_string())?;
            state
                .save_renewal_request(&key, &csr)
                .map_err(|e| e.to_string())?;
            csr
        }
    };
    // Every version this build accepts has `Renew` (protocol 4 and later).
    let mut session = coordinator.open().await.map_err(|e| e.to_string())?;
    let reply = session
        .request("the renewal", &AgentMessage::Renew { csr: csr.clone() })
        .await
        .map_err(|e| e.to_string())?;
    session.close(fleet_protocol::close::DONE, b"renewed");
    let CoordinatorMessage::Renewed { certificate } = reply else {
        return Err(format!("unexpected answer to the renewal: {reply:?}"));
    };
    // The certificate must name this device and certify the new key (the
    // chain to the CA is checked at every handshake).
    let der = CertificateDer::from(certificate.as_slice());
    match role_of(&der) {
        Ok((Role::Device(id), _)) if id == identity.device => {}
        other => {
            return Err(format!(
                "the coordinator issued an unusable certificate: {other:?}"
            ));
        }
    }
    let wanted = csr_public_key(&csr).map_err(|e| e.to_string())?;
    if certificate_public_key(&certificate).map_err(|e| e.to_string())? != wanted {
        return Err("the renewed certificate does not certify the key sent".into());
    }
    state
        .save_renewed(&certificate)
        .map_err(|e| e.to_string())?;
    state.finish_renewal().map_err(|e| e.to_string())?;
    coordinator
        .reload(state)
        .map_err(|e| format!("renewed, but the new credentials do not load: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn a_certificate_is_due_at_half_its_life_or_at_once_when_too_long() {
        let from = 1_000_000;
        let to = from + 90 * DAY;
        assert!(!due(from, to, from));
        assert!(!due(from, to, from + 45 * DAY - 1));
        assert!(due(from, to, from + 45 * DAY));
        assert!(due(from, to, to + 1));
        // Issued for ten years (before renewal existed): renewed at once.
        assert!(due(from, from + 3650 * DAY, from));
        assert!(!due(from, from + 398 * DAY, from));
    }
}
