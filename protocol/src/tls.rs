//! Mutual TLS for every connection: the certificate authority, roles, and
//! the rustls/quinn configurations both sides use.
//!
//! - The coordinator owns a [`CertificateAuthority`]. An agent generates its
//!   own key and a certificate signing request ([`device_key_and_csr`]); the
//!   coordinator, after checking a one-time enrollment token, signs it with
//!   [`CertificateAuthority::issue_device`], which sets the subject, the role
//!   and the validity itself, whatever the request asked for.
//! - A certificate carries exactly one [`Role`], as a URI subject alternative
//!   name: `fleet:device:<id>` or `fleet:admin:<name>`. A device certificate
//!   can never act as admin: the role is read from the verified certificate.
//! - Both sides verify the peer's chain against the CA; there is no
//!   plaintext mode. Client certificates are mandatory, and the server's
//!   verifier refuses serial numbers in its [`RevocationList`] at handshake.
//! - One crypto provider, `ring`, as quinn uses: configs are built with
//!   explicit providers, never the process default.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName as RustlsDn, SignatureScheme};

/// ALPN protocol id of the fleet protocol.
pub const ALPN: &[u8] = b"fleet/1";

/// Errors of certificate handling and TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation or signing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A rustls configuration could not be built.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate could not be parsed or carries no valid role.
    #[error("{0}")]
    Role(String),
    /// Any other configuration problem.
    #[error("{0}")]
    Config(String),
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// An enrolled device.
    Device(u64),
    /// An administrator.
    Admin(String),
    /// The coordinator itself (its server certificate).
    Coordinator,
}

impl Role {
    pub(crate) fn uri(&self) -> String {
        match self {
            Role::Device(id) => format!("fleet:device:{id}"),
            Role::Admin(name) => format!("fleet:admin:{name}"),
            Role::Coordinator => "fleet:coordinator".into(),
        }
    }

    fn from_uri(uri: &str) -> Option<Role> {
        if uri == "fleet:coordinator" {
            return Some(Role::Coordinator);
        }
        if let Some(id) = uri.strip_prefix("fleet:device:") {
            return id.parse().ok().map(Role::Device);
        }
        uri.strip_prefix("fleet:admin:")
            .filter(|n| !n.is_empty())
            .map(|n| Role::Admin(n.to_string()))
    }
}

/// The public key (DER `SubjectPublicKeyInfo`) a certificate signing
/// request asks to have certified.
pub fn csr_public_key(csr: &[u8]) -> Result<Vec<u8>, TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, req) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|e| TlsError::Role(format!("unparsable signing request: {e}")))?;
    Ok(req.certification_request_info.subject_pki.raw.to_vec())
}

/// The public key (DER `SubjectPublicKeyInfo`) a DER certificate certifies.
pub fn certificate_public_key(cert: &[u8]) -> Result<Vec<u8>, TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| TlsError::Role(format!("unparsable certificate: {e}")))?;
    Ok(x.tbs_certificate.subject_pki.raw.to_vec())
}

/// When a DER certificate starts and stops being valid (Unix seconds).
pub fn certificate_validity(cert: &[u8]) -> Result<(u64, u64), TlsError> {
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| TlsError::Role(format!("unparsable certificate: {e}")))?;
    let v = x.validity();
    let secs = |t: i64| u64::try_from(t).unwrap_or(0);
    Ok((
        secs(v.not_before.timestamp()),
        secs(v.not_after.timestamp()),
    ))
}

/// The role and serial number of a DER certificate (not verified here:
/// call it on certificates the TLS handshake verified).
pub fn role_of(cert: &CertificateDer<'_>) -> Result<(Role, Vec<u8>), TlsError> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(cert)
        .map_err(|e| TlsError::Role(format!("unparsable certificate: {e}")))?;
    let serial = x.raw_serial().to_vec();
    let san = x
        .subject_alternative_name()
        .map_err(|e| TlsError::Role(format!("bad subject alternative names: {e}")))?
        .ok_or_else(|| TlsError::Role("certificate has no fleet role".into()))?;
    let roles: Vec<Role> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Role::from_uri(u),
            _ => None,
        })
        .collect();
    match roles.as_slice() {
        [role] => Ok((role.clone(), serial)),
        [] => Err(TlsError::Role("certificate has no fleet role".into())),
        _ => Err(TlsError::Role(
            "certificate claims more than one fleet role".into(),
        )),
    }
}

/// The serial numbers of revoked certificates, shared with the server's verifier.
#[derive(Debug, Default)]
pub struct RevocationList {
    serials: RwLock<HashSet<Vec<u8>>>,
}

impl RevocationList {
    /// Revokes a serial number (effective at the next handshake).
    pub fn revoke(&self, serial: Vec<u8>) {
        self.serials
            .write()
            .expect("revocation lock")
            .insert(serial);
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.serials
            .read()
            .expect("revocation lock")
            .contains(serial)
    }
}

/// The certificate authority of one coordinator.
pub struct CertificateAuthority {
    cert: CertificateDer<'static>,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

fn random_serial() -> SerialNumber {
    use rand::Rng;
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte, so the DER encoding keeps all 16 bytes
    SerialNumber::from_slice(&bytes)
}

fn leaf_params(role: &Role, dns: &[String], days: u64) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(dns.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, role.uri());
    p.distinguished_name = dn;
    p.subject_alt_names
        .push(SanType::URI(role.uri().try_into()?));
    p.serial_number = Some(random_serial());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match role {
        Role::Coordinator => vec![ExtendedKeyUsagePurpose::ServerAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = time_now();
    p.not_before = now - Duration::from_secs(300);
    p.not_after = now + Duration::from_secs(days * 86_400);
    Ok(p)
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

impl CertificateAuthority {
    /// A new self-signed CA named `name`, valid ten years.
    pub fn create(name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        let now = time_now();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + Duration::from_secs(3650 * 86_400);
        let cert = params.self_signed(&key)?.der().clone();
        Ok(Self {
            cert,
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Restores a CA from its certificate and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| TlsError::Config(format!("CA certificate PEM: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&cert, KeyPair::from_pem(key_pem)?)?;
        Ok(Self {
            cert,
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate (DER), which every peer trusts.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Certificate and key as PEM, for storage.
    pub fn to_pem(&self) -> (String, String) {
        (pem_encode("CERTIFICATE", &self.cert), self.key_pem.clone())
    }

    /// Signs a device's request as device `id`, valid `days`. Only the
    /// request's public key is used: subject, role, usages and validity are
    /// the CA's.
    pub fn issue_device(
        &self,
        csr_der: &[u8],
        id: u64,
        days: u64,
    ) -> Result<CertificateDer<'static>, TlsError> {
        let mut csr = CertificateSigningRequestParams::from_der(
            &CertificateSigningRequestDer::from(csr_der),
        )?;
        csr.params = leaf_params(&Role::Device(id), &[], days)?;
        Ok(csr.signed_by(&self.issuer)?.der().clone())
    }

    /// A new key and certificate for an administrator.
    pub fn issue_admin(
        &self,
        name: &str,
        days: u64,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        self.issue_with_key(&Role::Admin(name.to_string()), &[], days)
    }

    /// A new key and server certificate for the coordinator at `hosts` (DNS names or IPs).
    pub fn issue_server(
        &self,
        hosts: &[String],
        days: u64,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        self.issue_with_key(&Role::Coordinator, hosts, days)
    }

    fn issue_with_key(
        &self,
        role: &Role,
        hosts: &[String],
        days: u64,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(role, hosts, days)?.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), key_der(&key)))
    }
}

/// PEM-encodes DER bytes under `label`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", std::str::from_utf8(line).expect("ascii"));
    }
    let _ = writeln!(out, "-----END {label}-----");
    out
}

/// A new device key (PKCS#8 DER) and a certificate signing request for it.
pub fn device_key_and_csr() -> Result<(PrivateKeyDer<'static>, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((key_der(&key), csr.der().to_vec()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's client-certificate verifier: the CA's chain check, then the revocation list.
#[derive(Debug)]
struct Verifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RevocationList>,
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[RustlsDn] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let (_, serial) = role_of(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        if self.revoked.is_revoked(&serial) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn roots(ca: &CertificateDer<'_>) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone().into_owned())?;
    Ok(roots)
}

/// The coordinator's QUIC server configuration: TLS 1.3; a client
/// certificate, when presented, must chain to `ca` and not be revoked.
/// Clients without one are let in so that they can enroll; the coordinator
/// refuses every other request from them ([`peer_role`] fails).
pub fn server_config(
    ca: &CertificateDer<'_>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    revoked: Arc<RevocationList>,
) -> Result<quinn::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let verifier = Arc::new(Verifier { inner, revoked });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(format!("QUIC server TLS: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(server_transport()));
    Ok(cfg)
}

/// Flow-control window of one stream, in either direction: one whole frame
/// (the largest payload, [`crate::MAX_FRAME`], and its 4-byte header) with
/// 64 KiB to spare. Both protocols are request and answer on one stream, so
/// an honest peer never has more than one frame in flight toward the side
/// that reads; a bigger window would only let a hostile peer park more bytes
/// in the reader's buffers.
pub const STREAM_WINDOW: u32 = (crate::MAX_FRAME + 4 + 64 * 1024) as u32;

/// How long a connection may stay silent before either side drops it.
/// Clients send keep-alives every [`KEEP_ALIVE`], well within it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of the clients' keep-alives (agents wait between rounds as the
/// coordinator steers them; keep-alives hold the connection open).
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The coordinator's QUIC transport limits, instead of quinn's defaults
/// (100 + 100 streams of 1.25 MB each and no connection-wide cap, about
/// 250 MB a peer could make the server buffer on one connection):
///
/// - one bidirectional stream at a time, opened by the client (the
///   protocol's one request stream), and no unidirectional stream;
/// - the receive windows of that stream and of the whole connection are
///   [`STREAM_WINDOW`], so a connection holds at most about 1.1 MiB of
///   unread bytes, whatever the peer sends;
/// - the send window is the same, so a peer that stops reading holds at
///   most that much of the server's outgoing data;
/// - a connection silent for [`IDLE_TIMEOUT`] is closed.
///
/// The server sends no keep-alives: clients keep their connections alive.
pub fn server_transport() -> quinn::TransportConfig {
    transport(1, None)
}

/// The clients' transport: they accept no stream from the coordinator (it
/// never opens one), read answers through windows of the same size as the
/// server's (a fetched object streams in chunks of at most
/// [`crate::transfer::CHUNK_SIZE`], several fitting in one window), time out
/// after [`IDLE_TIMEOUT`] and send keep-alives every [`KEEP_ALIVE`].
pub fn client_transport() -> quinn::TransportConfig {
    transport(0, Some(KEEP_ALIVE))
}

/// Both sides' limits: `bidi` streams the peer may open, windows of
/// [`STREAM_WINDOW`], the idle timeout, `keep_alive`, no datagrams.
fn transport(bidi: u32, keep_alive: Option<Duration>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(bidi.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(STREAM_WINDOW.into())
        .receive_window(STREAM_WINDOW.into())
        .send_window(u64::from(STREAM_WINDOW))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        .keep_alive_interval(keep_alive)
        .datagram_receive_buffer_size(None);
    t
}

/// An agent's or admin's QUIC client configuration: trusts only `ca`,
/// presents `cert`.
pub fn client_config(
    ca: &CertificateDer<'_>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![cert], key)?;
    quic_client(tls)
}

/// A client configuration presenting no certificate: what a device uses to
/// enroll. The coordinator accepts nothing else from such a client.
pub fn anonymous_client_config(ca: &CertificateDer<'_>) -> Result<quinn::ClientConfig, TlsError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?)
        .with_no_client_auth();
    quic_client(tls)
}

fn quic_client(mut tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(format!("QUIC client TLS: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(client_transport()));
    Ok(cfg)
}

/// The verified role of a connection's peer.
pub fn peer_role(conn: &quinn::Connection) -> Result<(Role, Vec<u8>), TlsError> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TlsError::Role("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::Role("unexpected peer identity type".into()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TlsError::Role("peer presented an empty certificate chain".into()))?;
    role_of(leaf)
}
