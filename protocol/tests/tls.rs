//! Real QUIC with mutual TLS on loopback: enrollment by CSR, roles,
//! refusal of foreign and revoked certificates; no certificate, no role.

use std::net::SocketAddr;
use std::sync::Arc;

use fleet_protocol::tls::{
    CertificateAuthority, RevocationList, Role, anonymous_client_config, certificate_validity,
    client_config, device_key_and_csr, peer_role, role_of, server_config,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    revoked: Arc<RevocationList>,
}

fn server(ca: &CertificateAuthority) -> Server {
    let (cert, key) = ca.issue_server(&["localhost".into()], 30).unwrap();
    let revoked = Arc::new(RevocationList::default());
    let cfg = server_config(ca.cert(), cert, key, revoked.clone()).unwrap();
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    Server {
        endpoint,
        addr,
        revoked,
    }
}

/// Accepts one connection and returns the peer's role, or the handshake error.
async fn accept_one(endpoint: &quinn::Endpoint) -> Result<Role, String> {
    let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let role = peer_role(&conn).map(|(r, _)| r).map_err(|e| e.to_string());
    conn.close(0u32.into(), b"done");
    role
}

async fn connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<(), String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let conn = ep
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    // With TLS 1.3 the server checks the client certificate after the client
    // considers the handshake done; a refused certificate closes the
    // connection with a TLS error, an accepted one is closed by
    // `accept_one` ("done"). Every connection of these tests is closed by
    // the server one way or the other, so this waits for that event; the
    // deadline only keeps a broken server from hanging the test.
    let reason = tokio::time::timeout(std::time::Duration::from_secs(60), conn.closed())
        .await
        .expect("the server neither accepted (closing with \"done\") nor refused the connection within 60 s");
    match reason {
        quinn::ConnectionError::ApplicationClosed(_) => Ok(()),
        other => Err(other.to_string()),
    }
}

fn enroll(ca: &CertificateAuthority, id: u64) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let (key, csr) = device_key_and_csr().unwrap();
    (ca.issue_device(&csr, id, 30).unwrap(), key)
}

#[tokio::test]
async fn enrolled_devices_and_admins_connect_with_their_roles() {
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let srv = server(&ca);
    let addr = srv.addr;
    let endpoint = srv.endpoint.clone();
    let accept =
        tokio::spawn(async move { (accept_one(&endpoint).await, accept_one(&endpoint).await) });
    let (cert, key) = enroll(&ca, 42);
    assert_eq!(role_of(&cert).unwrap().0, Role::Device(42));
    connect(addr, client_config(ca.cert(), cert, key).unwrap())
        .await
        .unwrap();
    let (admin, admin_key) = ca.issue_admin("ops", 1).unwrap();
    connect(addr, client_config(ca.cert(), admin, admin_key).unwrap())
        .await
        .unwrap();
    let (device_role, admin_role) = accept.await.unwrap();
    assert_eq!(device_role.unwrap(), Role::Device(42));
    assert_eq!(admin_role.unwrap(), Role::Admin("ops".into()));
}

#[tokio::test]
async fn missing_foreign_and_revoked_certificates_are_refused() {
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let srv = server(&ca);
    let addr = srv.addr;
    let revoked = srv.revoked.clone();
    let endpoint = srv.endpoint.clone();
    let server_task = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..4 {
            results.push(accept_one(&endpoint).await);
        }
        results
    });

    // 1. No client certificate: the handshake succeeds (such a client may
    // enroll) but the connection has no role.
    let anon = connect(addr, anonymous_client_config(ca.cert()).unwrap()).await;
    // 2. A certificate from another CA.
    let other = CertificateAuthority::create("someone else").unwrap();
    let (fcert, fkey) = enroll(&other, 7);
    let foreign = connect(addr, client_config(ca.cert(), fcert, fkey).unwrap()).await;
    // 3. A good device, then 4. the same device after revocation.
    let (cert, key) = enroll(&ca, 9);
    let (_, serial) = role_of(&cert).unwrap();
    let ok = connect(
        addr,
        client_config(ca.cert(), cert.clone(), key.clone_key()).unwrap(),
    )
    .await;
    revoked.revoke(serial);
    let after = connect(addr, client_config(ca.cert(), cert, key).unwrap()).await;

    let results = server_task.await.unwrap();
    assert!(anon.is_ok(), "{anon:?}");
    assert!(
        results[0]
            .as_ref()
            .is_err_and(|e| e.contains("no certificate")),
        "{:?}",
        results[0]
    );
    assert!(
        foreign.is_err() && results[1].is_err(),
        "{foreign:?} / {:?}",
        results[1]
    );
    assert!(ok.is_ok(), "{ok:?}");
    assert_eq!(results[2].as_ref().unwrap(), &Role::Device(9));
    assert!(
        after.is_err() && results[3].is_err(),
        "{after:?} / {:?}",
        results[3]
    );
    assert!(
        format!("{:?}", results[3])
            .to_lowercase()
            .contains("revoked"),
        "{:?}",
        results[3]
    );
}

/// A device certificate past its end is refused at the handshake: a key
/// copied from a device is good for one certificate lifetime at most.
#[tokio::test]
async fn an_expired_device_certificate_is_refused() {
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let srv = server(&ca);
    let (key, csr) = device_key_and_csr().unwrap();
    // Valid for 0 days: it ends the second it is issued.
    let cert = ca.issue_device(&csr, 4, 0).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let endpoint = srv.endpoint.clone();
    let server_task = tokio::spawn(async move { accept_one(&endpoint).await });
    let client = connect(srv.addr, client_config(ca.cert(), cert, key).unwrap()).await;
    let accepted = server_task.await.unwrap();
    assert!(client.is_err(), "{client:?}");
    assert!(
        accepted
            .as_ref()
            .is_err_and(|e| e.to_lowercase().contains("expired")),
        "{accepted:?}"
    );
}

#[test]
fn a_device_cannot_request_another_role() {
    // A CSR asking for the admin role still yields a device certificate.
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::URI("fleet:admin:root".try_into().unwrap()));
    let csr = params.serialize_request(&key).unwrap();
    let cert = ca.issue_device(csr.der(), 5, 1).unwrap();
    assert_eq!(role_of(&cert).unwrap().0, Role::Device(5));
    // Garbage is an error, not a certificate.
    assert!(ca.issue_device(b"not a csr", 5, 1).is_err());
}

#[test]
fn a_device_certificate_is_valid_for_the_days_asked_from_a_little_before_now() {
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let (_, csr) = device_key_and_csr().unwrap();
    let now = fleet_protocol::time::unix_secs();
    let cert = ca.issue_device(&csr, 9, 90).unwrap();
    let (from, to) = certificate_validity(&cert).unwrap();
    // Five minutes of slack for clocks behind the coordinator's.
    assert!((now - 301..=now - 299).contains(&from), "{from} vs {now}");
    assert_eq!(to - from, 90 * 86_400 + 300);
    assert!(certificate_validity(b"not a certificate").is_err());
}

#[test]
fn the_ca_round_trips_through_pem() {
    let ca = CertificateAuthority::create("fleet test CA").unwrap();
    let (cert_pem, key_pem) = ca.to_pem();
    let back = CertificateAuthority::from_pem(&cert_pem, &key_pem).unwrap();
    assert_eq!(back.cert(), ca.cert());
    assert_eq!(
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap(),
        *ca.cert()
    );
    // Certificates the restored CA issues verify against the original.
    let (key, csr) = device_key_and_csr().unwrap();
    let cert = back.issue_device(&csr, 3, 1).unwrap();
    assert_eq!(role_of(&cert).unwrap().0, Role::Device(3));
    let _ = key;
}
