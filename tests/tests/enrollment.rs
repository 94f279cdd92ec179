//! An enrollment whose answer was lost (the agent killed before it saved
//! its credentials, or the link broken after the coordinator redeemed the
//! token) is done again with the same token and the key the agent kept.

use fleet_e2e::{InProcess, code, connect, device_config, hello, ok, scratch};
use fleet_edge_agent::state::StateDir;
use fleet_protocol::ErrorCode;
use fleet_protocol::admin::{AdminRequest, AdminResponse};
use fleet_protocol::message::{AgentMessage, CoordinatorMessage};
use fleet_protocol::tls::{anonymous_client_config, device_key_and_csr};

#[tokio::test]
async fn an_enrollment_whose_answer_was_lost_is_answered_again_for_the_same_key() {
    let dir = scratch("enroll-again");
    let c = InProcess::start(&dir).await;
    let mut admin = c.admin().await;
    let AdminResponse::Token { token, .. } = ok(
        &mut admin,
        AdminRequest::CreateToken {
            label: "phone".into(),
            ttl_secs: 600,
        },
    )
    .await
    else {
        panic!("no token")
    };
    let ca = c.home.ca_cert().unwrap();
    let anonymous = || anonymous_client_config(&ca).unwrap();
    let enroll = |csr: Vec<u8>| AgentMessage::Enroll {
        token: token.clone(),
        csr,
    };

    // The agent keeps its request, sends it, and dies before it saves the
    // answer: the token is redeemed, the agent holds no certificate.
    let state = StateDir::at(dir.join("agent"));
    let (key, csr) = device_key_and_csr().unwrap();
    state.save_enrollment_request(&key, &csr).unwrap();
    let mut p = connect(c.addr, anonymous()).await;
    p.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    let Some(CoordinatorMessage::Enrolled {
        device,
        certificate,
    }) = p.call(&enroll(csr)).await
    else {
        panic!("the first enrollment failed")
    };
    drop(p);
    assert!(!state.enrolled());

    // Someone else holding the token, with another key, gets nothing.
    let (_, other) = device_key_and_csr().unwrap();
    let mut q = connect(c.addr, anonymous()).await;
    q.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await;
    assert_eq!(
        code(q.call(&enroll(other)).await),
        Some(ErrorCode::UnknownDevice)
    );

    // The agent enrolls again with the same token: the same device and
    // certificate, its request forgotten, and it is a working device.
    let again =
        fleet_edge_agent::enroll::enroll(&state, c.addr, "localhost", ca.clone(), &token, None)
            .await
            .expect("the retried enrollment");
    assert_eq!(again, device);
    let (cert, _, _) = state.credentials().unwrap();
    assert_eq!(cert.as_ref(), certificate.as_slice());
    assert!(state.enrollment_request().unwrap().is_none());
    let mut d = connect(c.addr, device_config(&state)).await;
    assert!(matches!(
        d.call(&hello(fleet_protocol::PROTOCOL_VERSION)).await,
        Some(CoordinatorMessage::HelloAck { .. })
    ));
    let AdminResponse::Devices(devices) = ok(&mut admin, AdminRequest::ListDevices).await else {
        panic!("no device list")
    };
    assert_eq!(devices.len(), 1, "one device, enrolled once");
}
