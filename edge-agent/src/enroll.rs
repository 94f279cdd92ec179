//! Enrollment: a new device generates its key, connects without a client
//! certificate, trades a one-time token and a signing request for its
//! device certificate, and saves its identity in the state directory.
//!
//! The key and request are saved before they are sent. If the answer is
//! lost (the agent killed before it saved its credentials, the link broken
//! after the coordinator redeemed the token), running the enrollment again
//! with the same token sends the same request, and the coordinator answers
//! it again with the same device and certificate (until the token expires).
//!
//! The token is best given in a file ([`read_token_file`]): a `--token`
//! argument is visible to every user in the process list.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::session::{Dialer, client_endpoint};
use fleet_protocol::tls::{Role, anonymous_client_config, device_key_and_csr, role_of};
use rustls::pki_types::CertificateDer;

use crate::session::{SOFTWARE, Session, SessionError};
use crate::state::{Identity, StateDir};

/// Reads the one-time token from the file at `path` (`-`: standard input),
/// without the whitespace around it (the newline an editor or `echo`
/// leaves).
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let (text, source) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the enrollment token from standard input: {e}"))?;
        (text, "standard input".to_string())
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the enrollment token from {}: {e} (write the token from \
                 `coordinator token create` into that file, readable by the user who runs \
                 `edge-agent enroll`)",
                path.display()
            )
        })?;
        (text, path.display().to_string())
    };
    token_from(&text, &source)
}

/// The token in `text` read from `source`: trimmed, and not empty.
fn token_from(text: &str, source: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "{source} holds no enrollment token: put the one-time token from `coordinator token \
             create` (run by the coordinator's administrator) there and enroll again"
        ));
    }
    Ok(token.to_string())
}

/// Enrolls with the coordinator at `addr` (named `server_name` in its
/// certificate), trusting `ca`; returns the device id.
pub async fn enroll(
    state: &StateDir,
    addr: SocketAddr,
    server_name: &str,
    ca: CertificateDer<'static>,
    token: &str,
    data: Option<PathBuf>,
) -> Result<u64, String> {
    if state.enrolled() {
        return Err(format!(
            "{} already holds an enrolled device; use another --state directory",
            state.dir().display()
        ));
    }
    let (key, csr) = match state.enrollment_request().map_err(|e| e.to_string())? {
        Some(request) => request,
        None => {
            let (key, csr) = device_key_and_csr().map_err(|e| e.to_string())?;
            state
                .save_enrollment_request(&key, &csr)
                .map_err(|e| e.to_string())?;
            (key, csr)
        }
    };
    let cfg = anonymous_client_config(&ca).map_err(|e| e.to_string())?;
    let endpoint = client_endpoint(addr, cfg).map_err(say)?;
    // No connect timeout: quinn's idle timeout ends a handshake nobody answers.
    let mut session: Session = Dialer::new(endpoint.clone(), addr, server_name)
        .open(SOFTWARE)
        .await
        .map_err(say)?;
    let reply = session
        .request(
            "the enrollment",
            &AgentMessage::Enroll {
                token: token.trim().to_string(),
                csr,
            },
        )
        .await
        .map_err(say)?;
    session.close(fleet_protocol::close::DONE, b"enrolled");
    let CoordinatorMessage::Enrolled {
        device,
        certificate,
    } = reply
    else {
        return Err(format!("unexpected answer to enrollment: {reply:?}"));
    };
    // The certificate must name this device and chain to the CA we trust
    // (checked at every later handshake; the role is checked here).
    match role_of(&CertificateDer::from(certificate.as_slice())) {
        Ok((Role::Device(id), _)) if id == device => {}
        other => {
            return Err(format!(
                "the coordinator issued an unusable certificate: {other:?}"
            ));
        }
    }
    state.save_enrollment(
        &Identity {
            device,
            coordinator: addr,
            server_name: server_name.to_string(),
            data,
        },
        &key,
        &certificate,
        &ca,
    )?;
    state
        .clear_enrollment_request()
        .map_err(|e| e.to_string())?;
    endpoint.wait_idle().await;
    Ok(device)
}

/// What `edge-agent enroll` prints for a session's failure.
fn say(e: SessionError) -> String {
    match e {
        SessionError::Refused { error, .. } => format!("enrollment refused: {}", error.message),
        SessionError::Finished => "the coordinator closed the connection".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("fleet-enroll-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  3f9a-c0de\r\n\n").unwrap();
        assert_eq!(read_token_file(&file).unwrap(), "3f9a-c0de");

        std::fs::write(&file, " \n\t\n").unwrap();
        let err = read_token_file(&file).unwrap_err();
        assert!(err.contains("holds no enrollment token"), "{err}");
        assert!(err.contains("coordinator token create"), "{err}");

        let missing = dir.join("missing");
        let err = read_token_file(&missing).unwrap_err();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("coordinator token create"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
