//! The agent's local state, kept in one directory so that it survives a
//! restart:
//!
//! ```text
//! <state dir>/
//!   agent.json        device id, coordinator address and name, data directory
//!   device.key        the device's private key (generated here, never sent)
//!   device.crt        its certificate, issued at enrollment
//!   ca.crt            the coordinator's CA certificate
//!   model             the last global model fetched (its bytes; named in model.id)
//!   model.id          hex SHA-256 of `model`
//!   pending.json      an update trained but not yet accepted (its metadata)
//!   pending.bin       … and its bytes: uploaded (or resumed) at the next connection
//!   status.json       counters for `edge-agent status`
//! ```
//!
//! Files are replaced atomically (written beside, then renamed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_protocol::message::{ObjectId, UpdateMeta};
use fleet_protocol::tls::pem_encode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// What `agent.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// Device id given at enrollment.
    pub device: u64,
    /// Coordinator address.
    pub coordinator: SocketAddr,
    /// Name in the coordinator's certificate.
    pub server_name: String,
    /// Directory of local training data.
    pub data: Option<PathBuf>,
}

/// Counters shown by `edge-agent status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// Updates the coordinator accepted.
    pub accepted: u64,
    /// Updates refused or discarded.
    pub refused: u64,
    /// The last round this device trained for.
    pub last_round: Option<(u64, u64)>,
    /// Update bytes sent.
    pub bytes_up: u64,
    /// Model bytes received.
    pub bytes_down: u64,
    /// Unix time of the last change.
    pub updated_at: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// An update awaiting upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// What the coordinator is told.
    pub meta: UpdateMeta,
    /// The encoded update.
    #[serde(skip)]
    pub bytes: Vec<u8>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("{}: {e}", path.display())
}

impl StateDir {
    /// The state directory at `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Its path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Writes a file atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| err(&self.dir, e))?;
        let path = self.path(name);
        let tmp = self.path(&format!("{name}.tmp"));
        std::fs::write(&tmp, bytes).map_err(|e| err(&tmp, e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, e))
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(&path, e)),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, String> {
        self.read(name)?
            .map(|b| serde_json::from_slice(&b).map_err(|e| err(&self.path(name), e)))
            .transpose()
    }

    fn put_json(&self, name: &str, v: &impl Serialize) -> Result<(), String> {
        self.write(
            name,
            &serde_json::to_vec_pretty(v).expect("plain data serialises"),
        )
    }

    /// The privacy ledger of this device's drift summaries, if any was saved.
    pub fn drift_ledger(
        &self,
    ) -> Result<Option<fleet_aggregation::privacy::accountant::ledger::PrivacyLedger>, String> {
        self.json("drift-privacy.json")
    }

    /// Saves the drift summaries' privacy ledger (before the summary leaves).
    pub fn save_drift_ledger(
        &self,
        ledger: &fleet_aggregation::privacy::accountant::ledger::PrivacyLedger,
    ) -> Result<(), String> {
        self.put_json("drift-privacy.json", ledger)
    }

    /// Whether the device has enrolled here.
    pub fn enrolled(&self) -> bool {
        self.path("agent.json").is_file() && self.path("device.crt").is_file()
    }

    /// Saves the identity and credentials obtained at enrollment.
    pub fn save_enrollment(
        &self,
        identity: &Identity,
        key: &PrivateKeyDer<'_>,
        cert: &[u8],
        ca: &CertificateDer<'_>,
    ) -> Result<(), String> {
        self.write(
            "device.key",
            pem_encode("PRIVATE KEY", key.secret_der()).as_bytes(),
        )?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let p = self.path("device.key");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(&p, e))?;
        }
        self.write("device.crt", pem_encode("CERTIFICATE", cert).as_bytes())?;
        self.write("ca.crt", pem_encode("CERTIFICATE", ca).as_bytes())?;
        self.put_json("agent.json", identity)
    }

    /// The identity.
    pub fn identity(&self) -> Result<Identity, String> {
        self.json("agent.json")?.ok_or_else(|| {
            format!(
                "{} holds no enrolled device; run `edge-agent enroll` first",
                self.dir.display()
            )
        })
    }

    /// Updates the identity (e.g. the data directory).
    pub fn save_identity(&self, identity: &Identity) -> Result<(), String> {
        self.put_json("agent.json", identity)
    }

    /// The device's credentials and the CA certificate.
    #[allow(clippy::type_complexity)]
    pub fn credentials(
        &self,
    ) -> Result<
        (
            CertificateDer<'static>,
            PrivateKeyDer<'static>,
            CertificateDer<'static>,
        ),
        String,
    > {
        let pem = |name: &str| {
            self.read(name)?
                .ok_or_else(|| format!("{} is missing; enroll again", self.path(name).display()))
        };
        let cert = CertificateDer::from_pem_slice(&pem("device.crt")?)
            .map_err(|e| err(&self.path("device.crt"), e))?;
        let key = PrivateKeyDer::from_pem_slice(&pem("device.key")?)
            .map_err(|e| err(&self.path("device.key"), e))?;
        let ca = CertificateDer::from_pem_slice(&pem("ca.crt")?)
            .map_err(|e| err(&self.path("ca.crt"), e))?;
        Ok((cert, key, ca))
    }

    /// The cached global model, if its bytes still match its id.
    pub fn cached_model(&self) -> Result<Option<(ObjectId, Vec<u8>)>, String> {
        let (Some(id), Some(bytes)) = (self.read("model.id")?, self.read("model")?) else {
            return Ok(None);
        };
        let actual = ObjectId::of(&bytes);
        Ok((actual.to_string().as_bytes() == id.as_slice()).then_some((actual, bytes)))
    }

    /// Caches a global model.
    pub fn cache_model(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), String> {
        self.write("model", bytes)?;
        self.write("model.id", id.to_string().as_bytes())
    }

    /// The update awaiting upload, if any (and if its bytes match its hash).
    pub fn pending(&self) -> Result<Option<Pending>, String> {
        let (Some(meta), Some(bytes)) = (
            self.json::<UpdateMeta>("pending.json")?,
            self.read("pending.bin")?,
        ) else {
            return Ok(None);
        };
        Ok((ObjectId::of(&bytes) == meta.object.id).then_some(Pending { meta, bytes }))
    }

    /// Persists an update before its upload starts.
    pub fn save_pending(&self, p: &Pending) -> Result<(), String> {
        self.write("pending.bin", &p.bytes)?;
        self.put_json("pending.json", &p.meta)
    }

    /// Forgets the pending update (accepted or refused).
    pub fn clear_pending(&self) -> Result<(), String> {
        for name in ["pending.json", "pending.bin"] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(err(&self.path(name), e)),
            }
        }
        Ok(())
    }

    /// The status counters.
    pub fn status(&self) -> Result<Status, String> {
        Ok(self.json("status.json")?.unwrap_or_default())
    }

    /// Saves the status counters.
    pub fn save_status(&self, s: &Status) -> Result<(), String> {
        self.put_json("status.json", s)
    }
}
