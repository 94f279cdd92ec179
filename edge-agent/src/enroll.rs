//! Enrollment: a new device generates its key, connects without a client
//! certificate, trades a one-time token and a signing request for its
//! device certificate, and saves its identity in the state directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::stream::{recv, send};
use fleet_protocol::tls::{Role, anonymous_client_config, device_key_and_csr, role_of};
use fleet_protocol::{MAX_FRAME, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION};
use rustls::pki_types::CertificateDer;

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
    let (key, csr) = device_key_and_csr().map_err(|e| e.to_string())?;
    let cfg = anonymous_client_config(&ca).map_err(|e| e.to_string())?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let mut endpoint =
        quinn::Endpoint::client(bind).map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    endpoint.set_default_client_config(cfg);
    let unreachable =
        |e: &dyn std::fmt::Display| format!("cannot reach the coordinator at {addr}: {e}");
    let conn = endpoint
        .connect(addr, server_name)
        .map_err(|e| unreachable(&e))?
        .await
        .map_err(|e| unreachable(&e))?;
    let (mut tx, mut rx) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
    let mut call = async |msg: AgentMessage| -> Result<CoordinatorMessage, String> {
        send(&mut tx, &msg).await.map_err(|e| e.to_string())?;
        match recv::<CoordinatorMessage>(&mut rx, MAX_FRAME).await {
            Ok(Some(CoordinatorMessage::Error(e))) => {
                Err(format!("enrollment refused: {}", e.message))
            }
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err("the coordinator closed the connection".into()),
            Err(e) => Err(e.to_string()),
        }
    };
    call(AgentMessage::Hello {
        version: PROTOCOL_VERSION,
        min_version: MIN_SUPPORTED_VERSION,
        software: concat!("fleet-edge-agent ", env!("CARGO_PKG_VERSION")).into(),
    })
    .await?;
    let reply = call(AgentMessage::Enroll {
        token: token.trim().to_string(),
        csr,
    })
    .await?;
    conn.close(0u32.into(), b"enrolled");
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
    endpoint.wait_idle().await;
    Ok(device)
}
