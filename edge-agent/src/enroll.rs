//! Enrollment: a new device generates its key, connects without a client
//! certificate, trades a one-time token and a signing request for its
//! device certificate, and saves its identity in the state directory.
//!
//! The key and request are saved before they are sent. If the answer is
//! lost (the agent killed before it saved its credentials, the link broken
//! after the coordinator redeemed the token), running the enrollment again
//! with the same token sends the same request, and the coordinator answers
//! it again with the same device and certificate (until the token expires).

use std::net::SocketAddr;
use std::path::PathBuf;

use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::session::{Dialer, client_endpoint};
use fleet_protocol::tls::{Role, anonymous_client_config, device_key_and_csr, role_of};
use rustls::pki_types::CertificateDer;

use crate::session::{SOFTWARE, Session, SessionError};
use crate::state::{Identity, StateDir};

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
