//! Device certificates are short-lived and renewed over the device's own
//! connection: real QUIC, real TLS, the agent's renewal code.
//!
//! - a renewed certificate is valid `limits.device_cert_days` and certifies
//!   a new key; the device is served with it;
//! - the previous certificate is admitted until the new one is first used
//!   (so a lost answer locks nobody out), refused from then on;
//! - a renewal asked on the previous certificate (its answer was lost) is
//!   answered with another certificate;
//! - revoking a device in the middle of a renewal refuses both certificates;
//! - a device certificate is not renewed before half its life.

use std::time::Duration;

use fleet_e2e::{InProcess, code, connect, device_config, hello, scratch};
use fleet_edge_agent::renew::{renew, renew_if_due};
use fleet_edge_agent::session::Coordinator;
use fleet_protocol::admin::AdminRequest;
use fleet_protocol::message::{AgentMessage, Capabilities, CoordinatorMessage};
use fleet_protocol::tls::{certificate_validity, device_key_and_csr};
use fleet_protocol::{ErrorCode, close};

const PATIENCE: Duration = Duration::from_secs(60);

/// Whether a connection with `cfg` is served: greeted and answered.
async fn served(addr: std::net::SocketAddr, cfg: quinn::ClientConfig) -> bool {
    let mut p = connect(addr, cfg).await;
    let greeted = matches!(
        p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    );
    let answered = matches!(
        p.call(&AgentMessage::CheckIn {
            capabilities: Capabilities {
                memory_mib: 1024,
                eligible: true,
            },
        })
        .await,
        Some(CoordinatorMessage::ComeBackLater { .. })
    );
    if !(greeted && answered) {
        let why = tokio::time::timeout(PATIENCE, p.conn.closed())
            .await
            .expect("a refused connection is closed");
        assert!(
            matches!(&why, quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == close::REVOKED.into()),
            "{why}"
        );
        return false;
    }
    p.conn.close(close::DONE.into(), b"done");
    true
}

#[tokio::test]
async fn a_device_renews_its_certificate_and_the_previous_one_stops_at_first_use() {
    let dir = scratch("renewal");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let (device, state) = c.enroll(&mut admin, &dir.join("agent")).await;
    let first = device_config(&state);
    let (first_cert, ..) = state.credentials().unwrap();
    let coordinator = Coordinator::of_device(&state).unwrap();

    // Just enrolled: not due.
    assert!(!renew_if_due(&state, &coordinator).await.unwrap());
    assert_eq!(state.credentials().unwrap().0, first_cert);

    renew(&state, &coordinator).await.expect("renewal");
    let (cert, ..) = state.credentials().unwrap();
    assert_ne!(cert, first_cert);
    let (from, to) = certificate_validity(&cert).unwrap();
    assert_eq!(to - from, 90 * 86_400 + 300, "limits.device_cert_days");
    let renewed = device_config(&state);

    // The previous certificate still passes until the new one is used…
    assert!(served(c.addr, first.clone()).await);
    assert!(served(c.addr, renewed.clone()).await);
    // …and never after.
    assert!(!served(c.addr, first).await);
    assert!(served(c.addr, renewed.clone()).await);
    let text = c.coordinator.metrics_text().await;
    assert!(
        text.contains("fleet_certificate_renewals_total 1"),
        "{text}"
    );

    // A renewal whose answer was lost: asked again on the previous
    // certificate (the current one was never used), it is answered with
    // another certificate, and the unused one is dropped.
    let (_, csr) = device_key_and_csr().unwrap();
    let mut p = connect(c.addr, renewed.clone()).await;
    p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    let Some(CoordinatorMessage::Renewed { certificate: lost }) =
        p.call(&AgentMessage::Renew { csr: csr.clone() }).await
    else {
        panic!("no renewal")
    };
    p.conn.close(close::DONE.into(), b"done");
    let mut q = connect(c.addr, renewed.clone()).await;
    q.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    let Some(CoordinatorMessage::Renewed { certificate: again }) =
        q.call(&AgentMessage::Renew { csr }).await
    else {
        panic!("a renewal asked on the previous certificate was refused")
    };
    q.conn.close(close::DONE.into(), b"done");
    assert_ne!(lost, again);

    // Garbage is refused with a reason.
    let mut r = connect(c.addr, renewed.clone()).await;
    r.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    assert_eq!(
        code(r.call(&AgentMessage::Renew { csr: vec![1, 2, 3] }).await),
        Some(ErrorCode::Malformed)
    );
    r.conn.close(close::DONE.into(), b"done");

    // Revoked mid-renewal: the previous certificate is refused too.
    fleet_e2e::ok(&mut admin, AdminRequest::RevokeDevice { device }).await;
    let refused = fleet_e2e::try_connect(c.addr, renewed).await;
    if let Ok(mut p) = refused {
        assert!(
            p.call(&hello(fleet_protocol::PROTOCOL_VERSION))
                .await
                .is_none(),
            "a revoked device's previous certificate was served"
        );
    }
}
