//! The agent's connection to the coordinator: every exchange (the training
//! link, each deployment check and drift report, enrollment) is a
//! [`fleet_protocol::session::Session`] of agent messages, greeted with
//! this build's `Hello` ([`SOFTWARE`]).

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use fleet_protocol::message::AgentMessage;
use fleet_protocol::session::{Dialer, client_endpoint};
use fleet_protocol::tls::{TlsError, client_config};

pub use fleet_protocol::session::SessionError;

use crate::state::StateDir;

/// A session with the coordinator.
pub type Session = fleet_protocol::session::Session<AgentMessage>;

/// The software the agent's `Hello` names.
pub const SOFTWARE: &str = concat!("fleet-edge-agent ", env!("CARGO_PKG_VERSION"));

/// How long connecting (handshake and stream) may take before a session
/// gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the device's connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The state directory holds no usable identity or credentials.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The credentials make no TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No endpoint could be opened.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// The coordinator as this device reaches it: an endpoint holding the
/// device's certificate, the coordinator's address and name. Clones share
/// the endpoint, so a renewed certificate ([`Coordinator::reload`]) serves
/// every later connection of the agent's parts.
#[derive(Debug, Clone)]
pub struct Coordinator {
    dialer: Arc<RwLock<Dialer>>,
    /// Every address of the coordinator (its replicas), the one dialled first.
    addrs: Arc<[SocketAddr]>,
}

impl Coordinator {
    /// The coordinator at `addr`, named `server_name` in its certificate,
    /// through `endpoint`'s client configuration.
    pub fn new(endpoint: quinn::Endpoint, addr: SocketAddr, server_name: &str) -> Self {
        Self {
            dialer: Arc::new(RwLock::new(
                Dialer::new(endpoint, addr, server_name).timeout(CONNECT_TIMEOUT),
            )),
            addrs: Arc::from([addr]),
        }
    }

    /// The same coordinator, also reachable at `replicas` (tried in turn
    /// after the first address by [`Coordinator::fail_over`]).
    pub fn with_replicas(mut self, replicas: &[SocketAddr]) -> Self {
        let first = self.addr();
        let mut addrs = vec![first];
        addrs.extend(replicas.iter().filter(|a| **a != first));
        self.addrs = addrs.into();
        self
    }

    /// Dials the next of the coordinator's addresses from now on (after a
    /// connection could not be made or was lost); `false` when it has only
    /// one.
    pub fn fail_over(&self) -> bool {
        if self.addrs.len() < 2 {
            return false;
        }
        let mut dialer = self.dialer.write().unwrap_or_else(PoisonError::into_inner);
        let at = self
            .addrs
            .iter()
            .position(|a| *a == dialer.addr())
            .unwrap_or(0);
        let next = self.addrs[(at + 1) % self.addrs.len()];
        *dialer = Dialer::new(dialer.endpoint().clone(), next, dialer.server_name())
            .timeout(CONNECT_TIMEOUT);
        true
    }

    /// The enrolled device's: its identity's coordinator, reached with the
    /// credentials in `state` (a renewal left half-done is finished first).
    pub fn of_device(state: &StateDir) -> Result<Self, SetupError> {
        let identity = state.identity().map_err(SetupError::State)?;
        let endpoint = client_endpoint(identity.coordinator, device_config(state)?)?;
        Ok(Self::new(
            endpoint,
            identity.coordinator,
            &identity.server_name,
        ))
    }

    /// Connects with the credentials now in `state` from here on (after a
    /// renewal). Open connections keep theirs until they end.
    pub fn reload(&self, state: &StateDir) -> Result<(), SetupError> {
        let config = device_config(state)?;
        let mut dialer = self.dialer.write().unwrap_or_else(PoisonError::into_inner);
        let mut endpoint = dialer.endpoint().clone();
        endpoint.set_default_client_config(config);
        *dialer =
            Dialer::new(endpoint, dialer.addr(), dialer.server_name()).timeout(CONNECT_TIMEOUT);
        Ok(())
    }

    fn dialer(&self) -> Dialer {
        self.dialer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The coordinator's address.
    pub fn addr(&self) -> SocketAddr {
        self.dialer().addr()
    }

    /// The endpoint sessions go through.
    pub fn endpoint(&self) -> quinn::Endpoint {
        self.dialer().endpoint().clone()
    }

    /// A session of its own, greeted.
    pub async fn open(&self) -> Result<Session, SessionError> {
        self.dialer().open(SOFTWARE).await
    }

    /// A connection and its stream, not greeted: for the training link,
    /// whose `Hello` the [`crate::machine::Machine`] sends.
    pub async fn connect(&self) -> Result<Session, SessionError> {
        self.dialer().connect().await
    }
}

/// The client configuration of the device's credentials in `state`.
fn device_config(state: &StateDir) -> Result<quinn::ClientConfig, SetupError> {
    state.finish_renewal().map_err(SetupError::State)?;
    let (cert, key, ca) = state.credentials().map_err(SetupError::State)?;
    Ok(client_config(&ca, cert, key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replicas' addresses are dialled in turn, the enrolled one first,
    /// each once per turn; with one address there is nothing to fail over to.
    #[tokio::test]
    async fn failing_over_cycles_through_the_replicas() {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let a: SocketAddr = "10.0.0.1:7400".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:7400".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:7400".parse().unwrap();
        let alone = Coordinator::new(endpoint.clone(), a, "localhost");
        assert!(!alone.fail_over());
        assert_eq!(alone.addr(), a);
        // The enrolled address listed again among the replicas counts once.
        let fleet = Coordinator::new(endpoint, a, "localhost").with_replicas(&[b, a, c]);
        let shared = fleet.clone();
        let mut seen = vec![fleet.addr()];
        for _ in 0..3 {
            assert!(fleet.fail_over());
            seen.push(shared.addr());
        }
        assert_eq!(seen, [a, b, c, a]);
    }
}
