//! A client's session with the coordinator: connect, open the request
//! stream, say `Hello`, then request and answer.
//!
//! Agents and administrators talk to the coordinator the same way: one QUIC
//! connection, one bidirectional stream of [`crate::frame`]s, a `Hello`
//! first (see [`crate::version`]). [`Session`] does this once for both
//! message families; [`Request`] and [`Answer`] say where a family keeps
//! its `Hello`, `HelloAck` and `Error`. Like the agents, a session takes any
//! `HelloAck`: the coordinator checks versions.
//!
//! Failures are a [`SessionError`]. When the connection is gone its quinn
//! reason is kept, so a caller tells why it was dropped from the
//! [`crate::close`] code ([`SessionError::close_code`],
//! [`SessionError::revoked`]), never from a message's text.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::{AdminRequest, AdminResponse};
use crate::error::WireError;
use crate::frame::MAX_FRAME;
use crate::message::{AgentMessage, CoordinatorMessage};
use crate::stream::{self, StreamError};
use crate::{MIN_SUPPORTED_VERSION, PROTOCOL_VERSION};

/// A message family's requests: what a client sends.
pub trait Request: Serialize + Debug + Send + Sync {
    /// The family's answers.
    type Answer: Answer;
    /// This build's `Hello` (its version and the oldest it accepts), naming
    /// `software` where the family carries it.
    fn hello(software: &str) -> Self;
}

/// A message family's answers: what the coordinator sends back.
pub trait Answer: DeserializeOwned + Debug + Send {
    /// The version of a `HelloAck`; `None` for any other answer.
    fn hello_ack(&self) -> Option<u16>;
    /// The refusal of an `Error` answer; any other answer back as it was.
    fn into_refusal(self) -> Result<WireError, Self>;
}

impl Request for AgentMessage {
    type Answer = CoordinatorMessage;
    fn hello(software: &str) -> Self {
        AgentMessage::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_SUPPORTED_VERSION,
            software: software.into(),
        }
    }
}

impl Answer for CoordinatorMessage {
    fn hello_ack(&self) -> Option<u16> {
        match self {
            CoordinatorMessage::HelloAck { version } => Some(*version),
            _ => None,
        }
    }
    fn into_refusal(self) -> Result<WireError, Self> {
        match self {
            CoordinatorMessage::Error(e) => Ok(e),
            other => Err(other),
        }
    }
}

impl Request for AdminRequest {
    type Answer = AdminResponse;
    /// The admin `Hello` carries no software name.
    fn hello(_software: &str) -> Self {
        AdminRequest::Hello {
            version: PROTOCOL_VERSION,
            min_version: MIN_SUPPORTED_VERSION,
        }
    }
}

impl Answer for AdminResponse {
    fn hello_ack(&self) -> Option<u16> {
        match self {
            AdminResponse::HelloAck { version } => Some(*version),
            _ => None,
        }
    }
    fn into_refusal(self) -> Result<WireError, Self> {
        match self {
            AdminResponse::Error(e) => Ok(e),
            other => Err(other),
        }
    }
}

/// Why a session could not be opened or a request not answered.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No UDP socket could be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The connection could not even start (an unusable address or server
    /// name, no client configuration).
    #[error("cannot reach the coordinator at {addr}: {source}")]
    Connect {
        /// The coordinator's address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectError,
    },
    /// The handshake failed: nobody answered, or the coordinator refused
    /// this side's certificate.
    #[error("cannot reach the coordinator at {addr}: {source}")]
    Handshake {
        /// The coordinator's address.
        addr: SocketAddr,
        /// quinn's reason.
        #[source]
        source: quinn::ConnectionError,
    },
    /// Connecting (handshake and stream) took longer than allowed.
    #[error("connecting to {addr} timed out")]
    TimedOut {
        /// The coordinator's address.
        addr: SocketAddr,
    },
    /// The connection is gone, closed by the coordinator (see
    /// [`SessionError::close_code`]) or lost.
    #[error("connection closed: {0}")]
    Closed(#[source] quinn::ConnectionError),
    /// The coordinator finished the stream instead of answering.
    #[error("the coordinator closed the stream")]
    Finished,
    /// The stream failed otherwise (reset, stopped, cut inside a frame).
    #[error("the stream to the coordinator failed: {0}")]
    Stream(#[source] StreamError),
    /// The coordinator sent a frame that is too large or not a message.
    #[error("bad frame from the coordinator: {0}")]
    Frame(#[source] crate::error::Error),
    /// The coordinator answered with an error.
    #[error("the coordinator refused {what}: {error}")]
    Refused {
        /// What was refused.
        what: &'static str,
        /// The refusal as sent.
        error: WireError,
    },
    /// The coordinator answered with something else than the request calls for.
    #[error("unexpected answer to {what}: {answer}")]
    Unexpected {
        /// The request.
        what: &'static str,
        /// The answer (its `Debug` form).
        answer: String,
    },
}

impl SessionError {
    /// The error for `answer`, which is not what `what` calls for: a
    /// refusal when it is an `Error`, otherwise an unexpected answer.
    pub fn unexpected<A: Answer>(what: &'static str, answer: A) -> Self {
        match answer.into_refusal() {
            Ok(error) => SessionError::Refused { what, error },
            Err(other) => SessionError::Unexpected {
                what,
                answer: format!("{other:?}"),
            },
        }
    }

    /// Why the connection ended, when it did.
    pub fn connection(&self) -> Option<&quinn::ConnectionError> {
        match self {
            SessionError::Handshake { source, .. } => Some(source),
            SessionError::Closed(e) => Some(e),
            _ => None,
        }
    }

    /// The application close code the coordinator closed the connection
    /// with (one of [`crate::close`]), if it did.
    pub fn close_code(&self) -> Option<u64> {
        match self.connection()? {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }

    /// Whether the coordinator no longer accepts this side's certificate:
    /// it closed the connection with [`crate::close::REVOKED`], or its TLS
    /// handshake refused the certificate as revoked (TLS alert
    /// `certificate_revoked`).
    pub fn revoked(&self) -> bool {
        let tls_revoked =
            quinn::TransportErrorCode::crypto(rustls::AlertDescription::CertificateRevoked.into());
        match self.connection() {
            Some(quinn::ConnectionError::ApplicationClosed(c)) => {
                c.error_code == crate::close::REVOKED.into()
            }
            Some(quinn::ConnectionError::ConnectionClosed(c)) => c.error_code == tls_revoked,
            _ => false,
        }
    }

    /// The coordinator's refusal, if it answered with an error.
    pub fn refusal(&self) -> Option<&WireError> {
        match self {
            SessionError::Refused { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A client endpoint for reaching `addr`, bound to an ephemeral port of the
/// same address family, with `config` as its default client configuration.
pub fn client_endpoint(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, SessionError> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(SessionError::Socket)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Where sessions go: an endpoint (with its client configuration), the
/// coordinator's address and the name in its certificate, and how long
/// connecting may take.
#[derive(Debug, Clone)]
pub struct Dialer {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    server_name: String,
    timeout: Option<Duration>,
}

impl Dialer {
    /// Sessions to `addr`, named `server_name` in its certificate, through
    /// `endpoint`'s default client configuration. Without a timeout quinn's
    /// idle timeout ends a handshake nobody answers.
    pub fn new(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: impl Into<String>,
    ) -> Self {
        Self {
            endpoint,
            addr,
            server_name: server_name.into(),
            timeout: None,
        }
    }

    /// The same, giving up connecting (handshake and stream) after `limit`.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// The coordinator's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name in the coordinator's certificate.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// Connects and opens the request stream; says nothing yet. For a
    /// driver that says `Hello` itself (the agent's state machine) or a test
    /// that sends raw frames.
    pub async fn connect<R: Request>(&self) -> Result<Session<R>, SessionError> {
        let addr = self.addr;
        let connect = async {
            let conn = self
                .endpoint
                .connect(addr, &self.server_name)
                .map_err(|source| SessionError::Connect { addr, source })?
                .await
                .map_err(|source| SessionError::Handshake { addr, source })?;
            let (tx, rx) = conn.open_bi().await.map_err(SessionError::Closed)?;
            Ok(Session {
                endpoint: self.endpoint.clone(),
                conn,
                tx,
                rx,
                max_frame: MAX_FRAME,
                version: None,
                family: PhantomData,
            })
        };
        match self.timeout {
            Some(limit) => tokio::time::timeout(limit, connect)
                .await
                .map_err(|_| SessionError::TimedOut { addr })?,
            None => connect.await,
        }
    }

    /// Connects, opens the request stream and says `Hello` (naming
    /// `software` where the family carries it).
    pub async fn open<R: Request>(&self, software: &str) -> Result<Session<R>, SessionError> {
        let mut session = self.connect().await?;
        session.hello(&R::hello(software)).await?;
        Ok(session)
    }
}

/// One connection to the coordinator and its request stream, for requests
/// of the family `R`.
#[derive(Debug)]
pub struct Session<R: Request> {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: quinn::RecvStream,
    max_frame: usize,
    version: Option<u16>,
    family: PhantomData<fn(R) -> R::Answer>,
}

impl<R: Request> Session<R> {
    /// Sends `hello` and takes the coordinator's `HelloAck`; returns the
    /// version the session speaks. A refusal (an incompatible version, for
    /// one) is [`SessionError::Refused`].
    pub async fn hello(&mut self, hello: &R) -> Result<u16, SessionError> {
        let answer = self.call(hello).await?;
        match answer.hello_ack() {
            Some(version) => {
                self.version = Some(version);
                Ok(version)
            }
            None => Err(SessionError::unexpected("the hello", answer)),
        }
    }

    /// Answers larger than `max` bytes are refused ([`MAX_FRAME`] by default).
    pub fn with_max_frame(mut self, max: usize) -> Self {
        self.max_frame = max;
        self
    }

    /// The version the coordinator acknowledged, once greeted.
    pub fn version(&self) -> Option<u16> {
        self.version
    }

    /// The connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Sends a request and reads one answer, whatever it is (an `Error`
    /// answer included).
    pub async fn call(&mut self, request: &R) -> Result<R::Answer, SessionError> {
        self.send(request).await?;
        self.recv().await
    }

    /// Like [`Session::call`], but an `Error` answer is
    /// [`SessionError::Refused`] (naming `what`).
    pub async fn request(
        &mut self,
        what: &'static str,
        request: &R,
    ) -> Result<R::Answer, SessionError> {
        match self.call(request).await?.into_refusal() {
            Ok(error) => Err(SessionError::Refused { what, error }),
            Err(answer) => Ok(answer),
        }
    }

    /// Sends one request without waiting for an answer.
    pub async fn send(&mut self, request: &R) -> Result<(), SessionError> {
        match stream::send(&mut self.tx, request).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Reads one answer.
    pub async fn recv(&mut self) -> Result<R::Answer, SessionError> {
        match stream::recv(&mut self.rx, self.max_frame).await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => Err(self
                .conn
                .close_reason()
                .map_or(SessionError::Finished, SessionError::Closed)),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The error for a failed stream operation: the connection's end when
    /// it is gone (it says why), otherwise the stream's own failure.
    fn failed(&self, e: StreamError) -> SessionError {
        if let Some(reason) = self.conn.close_reason() {
            return SessionError::Closed(reason);
        }
        match e {
            StreamError::Read(quinn::ReadExactError::ReadError(
                quinn::ReadError::ConnectionLost(c),
            ))
            | StreamError::Write(quinn::WriteError::ConnectionLost(c)) => SessionError::Closed(c),
            StreamError::Frame(e) => SessionError::Frame(e),
            other => SessionError::Stream(other),
        }
    }

    /// Closes the connection with `code` (one of [`crate::close`]).
    pub fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(code.into(), reason);
    }

    /// The endpoint, connection and stream halves, for a driver that reads
    /// and writes on its own (the agent's training link).
    pub fn into_parts(
        self,
    ) -> (
        quinn::Endpoint,
        quinn::Connection,
        quinn::SendStream,
        quinn::RecvStream,
    ) {
        (self.endpoint, self.conn, self.tx, self.rx)
    }
}

#[cfg(test)]
mod tests {
    //! Sessions over real QUIC on loopback against a scripted coordinator.

    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::*;
    use crate::error::ErrorCode;
    use crate::tls::{
        CertificateAuthority, RevocationList, client_config, device_key_and_csr, role_of,
        server_config,
    };

    struct Server {
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        ca: CertificateAuthority,
        revoked: Arc<RevocationList>,
    }

    fn server() -> Server {
        let ca = CertificateAuthority::create("session test CA").unwrap();
        let (cert, key) = ca.issue_server(&["localhost".into()], 30).unwrap();
        let revoked = Arc::new(RevocationList::default());
        let cfg = server_config(ca.cert(), cert, key, revoked.clone()).unwrap();
        let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        Server {
            endpoint,
            addr,
            ca,
            revoked,
        }
    }

    fn device(
        ca: &CertificateAuthority,
        id: u64,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (key, csr) = device_key_and_csr().unwrap();
        (ca.issue_device(&csr, id, 30).unwrap(), key)
    }

    fn dialer(s: &Server, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Dialer {
        let cfg = client_config(s.ca.cert(), cert, key).unwrap();
        Dialer::new(client_endpoint(s.addr, cfg).unwrap(), s.addr, "localhost")
    }

    /// Accepts one connection and its stream, and answers each request
    /// with what `script` says (`None`: close the connection with `close`).
    async fn coordinator<Q: DeserializeOwned, A: Serialize>(
        endpoint: quinn::Endpoint,
        close: u32,
        mut script: impl FnMut(Q) -> Option<A>,
    ) {
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut tx, mut rx) = conn.accept_bi().await.unwrap();
        while let Ok(Some(q)) = stream::recv::<Q>(&mut rx, MAX_FRAME).await {
            match script(q) {
                Some(a) => stream::send(&mut tx, &a).await.unwrap(),
                None => {
                    conn.close(close.into(), b"closed by the script");
                    break;
                }
            }
        }
        conn.closed().await;
    }

    #[tokio::test]
    async fn agent_session_says_hello_then_calls() {
        let s = server();
        let (cert, key) = device(&s.ca, 7);
        let task = tokio::spawn(coordinator(s.endpoint.clone(), 0, |q: AgentMessage| {
            Some(match q {
                AgentMessage::Hello {
                    version, software, ..
                } => {
                    assert_eq!(software, "agent 1.0");
                    CoordinatorMessage::HelloAck { version }
                }
                AgentMessage::GetDeployment => CoordinatorMessage::Deployment(None),
                _ => CoordinatorMessage::Error(WireError {
                    code: ErrorCode::Malformed,
                    message: "not now".into(),
                }),
            })
        }));
        let d = dialer(&s, cert, key).timeout(Duration::from_secs(10));
        let mut session = d.open::<AgentMessage>("agent 1.0").await.unwrap();
        assert_eq!(session.version(), Some(PROTOCOL_VERSION));
        let answer = session.call(&AgentMessage::GetDeployment).await.unwrap();
        assert_eq!(answer, CoordinatorMessage::Deployment(None));
        // `call` hands over a refusal as an answer, `request` as an error.
        let answer = session.call(&AgentMessage::GetDriftSpec).await.unwrap();
        assert!(matches!(answer, CoordinatorMessage::Error(_)), "{answer:?}");
        let e = session
            .request("GetDriftSpec", &AgentMessage::GetDriftSpec)
            .await
            .unwrap_err();
        assert_eq!(e.refusal().map(|w| w.code), Some(ErrorCode::Malformed));
        assert_eq!(
            e.to_string(),
            "the coordinator refused GetDriftSpec: Malformed: not now"
        );
        session.close(crate::close::DONE, b"done");
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_version_is_a_typed_refusal() {
        let s = server();
        let (admin, key) = s.ca.issue_admin("ops", 1).unwrap();
        let task = tokio::spawn(coordinator(s.endpoint.clone(), 0, |q: AdminRequest| {
            let AdminRequest::Hello { version, .. } = q else {
                panic!("{q:?} before Hello")
            };
            Some(AdminResponse::Error(
                crate::check_peer_version(version, 99)
                    .unwrap_err()
                    .to_wire(),
            ))
        }));
        let d = dialer(&s, admin, key);
        let e = d.open::<AdminRequest>("admin").await.unwrap_err();
        assert!(
            matches!(&e, SessionError::Refused { what: "the hello", error }
                if error.code == ErrorCode::IncompatibleVersion),
            "{e:?}"
        );
        assert!(e.to_string().contains("upgrade this side"), "{e}");
        assert_eq!(e.close_code(), None);
        assert!(!e.revoked());
        drop(d);
        s.endpoint.close(0u32.into(), b"");
        let _ = task.await;
    }

    #[tokio::test]
    async fn a_closed_connection_carries_its_close_code() {
        let s = server();
        let (cert, key) = device(&s.ca, 8);
        let task = tokio::spawn(coordinator(
            s.endpoint.clone(),
            crate::close::REVOKED,
            |q: AgentMessage| match q {
                AgentMessage::Hello { version, .. } => {
                    Some(CoordinatorMessage::HelloAck { version })
                }
                _ => None,
            },
        ));
        let mut session = dialer(&s, cert, key)
            .open::<AgentMessage>("a")
            .await
            .unwrap();
        let e = session
            .call(&AgentMessage::GetDeployment)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::Closed(_)), "{e:?}");
        assert_eq!(e.close_code(), Some(u64::from(crate::close::REVOKED)));
        assert!(e.revoked(), "{e}");
        // Any other code is not a revocation.
        let e = SessionError::Closed(quinn::ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: crate::close::SHUTDOWN.into(),
                reason: Default::default(),
            },
        ));
        assert_eq!(e.close_code(), Some(u64::from(crate::close::SHUTDOWN)));
        assert!(!e.revoked());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_revoked_certificate_is_told_by_its_tls_alert() {
        let s = server();
        let (cert, key) = device(&s.ca, 9);
        s.revoked.revoke(role_of(&cert).unwrap().1);
        let endpoint = s.endpoint.clone();
        let task = tokio::spawn(async move {
            // The handshake fails on this side.
            let _ = endpoint.accept().await.unwrap().await;
        });
        let d = dialer(&s, cert, key).timeout(Duration::from_secs(10));
        // With TLS 1.3 the client may finish its handshake before the
        // server refuses its certificate: the refusal then ends the stream.
        let e = match d.open::<AgentMessage>("a").await {
            Err(e) => e,
            Ok(_) => panic!("a revoked certificate was accepted"),
        };
        assert!(e.revoked(), "{e:?}");
        assert_eq!(e.close_code(), None);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn nobody_answering_times_out() {
        // A bound UDP socket that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let ca = CertificateAuthority::create("session test CA").unwrap();
        let (cert, key) = device(&ca, 1);
        let cfg = client_config(ca.cert(), cert, key).unwrap();
        let d = Dialer::new(client_endpoint(addr, cfg).unwrap(), addr, "localhost")
            .timeout(Duration::from_millis(200));
        let e = d.connect::<AgentMessage>().await.unwrap_err();
        assert!(
            matches!(e, SessionError::TimedOut { addr: a } if a == addr),
            "{e:?}"
        );
        assert_eq!(e.to_string(), format!("connecting to {addr} timed out"));
    }

    #[tokio::test]
    async fn the_frame_limit_applies_to_answers() {
        let s = server();
        let (cert, key) = device(&s.ca, 10);
        let task = tokio::spawn(coordinator(s.endpoint.clone(), 0, |q: AgentMessage| {
            Some(match q {
                AgentMessage::Hello { version, .. } => CoordinatorMessage::HelloAck { version },
                _ => CoordinatorMessage::Error(WireError {
                    code: ErrorCode::Internal,
                    message: "x".repeat(1000),
                }),
            })
        }));
        let session = dialer(&s, cert, key)
            .open::<AgentMessage>("a")
            .await
            .unwrap();
        let mut session = session.with_max_frame(100);
        let e = session
            .call(&AgentMessage::GetDeployment)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SessionError::Frame(crate::error::Error::FrameTooLarge { max: 100, .. })
            ),
            "{e:?}"
        );
        session.close(crate::close::DONE, b"done");
        task.await.unwrap();
    }
}
