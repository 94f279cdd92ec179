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
//!   enrolling.key     the key of an enrollment sent but not yet saved, and
//!   enrolling.csr     its signing request: a retry of the same token sends
//!                     them again (removed once the credentials are saved)
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

/// The file that holds the device's [`Identity`], written last at
/// enrollment: an enrolled state directory has it.
pub const IDENTITY_FILE: &str = "agent.json";

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

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file could not be read, written, renamed or synced.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The directory holds no enrolled device.
    #[error("{} holds no enrolled device; run `edge-agent enroll` first", dir.display())]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
    },
    /// A credential file is missing.
    #[error("{} is missing; enroll again", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
}

/// For callers whose errors are still messages.
impl From<StateError> for String {
    fn from(e: StateError) -> String {
        e.to_string()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path) -> impl FnOnce(&dyn std::fmt::Display) -> StateError + '_ {
    move |e| StateError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
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

    /// Writes a file atomically and durably: a temporary file readable by
    /// the owner only, synced, renamed over the file, then the directory
    /// synced so that the rename survives a power loss.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        fleet_protocol::private::private_dir(&self.dir).map_err(io(&self.dir))?;
        let path = self.path(name);
        let tmp = self.path(&format!("{name}.tmp"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Updates, keys and ledgers are nobody else's business.
            options.mode(0o600);
        }
        let write = |f: &mut std::fs::File| {
            use std::io::Write;
            f.write_all(bytes)?;
            f.sync_all()
        };
        // A leftover temporary file would keep its old mode.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&tmp)(e)),
            _ => {}
        }
        options
            .open(&tmp)
            .and_then(|mut f| write(&mut f))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        #[cfg(unix)]
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let path = self.path(name);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StateError> {
        self.read(name)?
            .map(|b| serde_json::from_slice(&b).map_err(|e| corrupt(&self.path(name))(&e)))
            .transpose()
    }

    fn put_json(&self, name: &str, v: &impl Serialize) -> Result<(), StateError> {
        self.write(
            name,
            &serde_json::to_vec_pretty(v).expect("plain data serialises"),
        )
    }

    /// The privacy ledger of this device's drift summaries, if any was saved.
    pub fn drift_ledger(
        &self,
    ) -> Result<Option<fleet_aggregation::privacy::accountant::ledger::PrivacyLedger>, StateError>
    {
        self.json("drift-privacy.json")
    }

    /// Saves the drift summaries' privacy ledger (before the summary leaves).
    pub fn save_drift_ledger(
        &self,
        ledger: &fleet_aggregation::privacy::accountant::ledger::PrivacyLedger,
    ) -> Result<(), StateError> {
        self.put_json("drift-privacy.json", ledger)
    }

    /// Whether the device has enrolled here.
    pub fn enrolled(&self) -> bool {
        self.path(IDENTITY_FILE).is_file() && self.path("device.crt").is_file()
    }

    /// Saves the identity and credentials obtained at enrollment.
    pub fn save_enrollment(
        &self,
        identity: &Identity,
        key: &PrivateKeyDer<'_>,
        cert: &[u8],
        ca: &CertificateDer<'_>,
    ) -> Result<(), StateError> {
        self.write(
            "device.key",
            pem_encode("PRIVATE KEY", key.secret_der()).as_bytes(),
        )?;
        self.write("device.crt", pem_encode("CERTIFICATE", cert).as_bytes())?;
        self.write("ca.crt", pem_encode("CERTIFICATE", ca).as_bytes())?;
        self.put_json(IDENTITY_FILE, identity)
    }

    /// The identity.
    pub fn identity(&self) -> Result<Identity, StateError> {
        self.json(IDENTITY_FILE)?
            .ok_or_else(|| StateError::NotEnrolled {
                dir: self.dir.clone(),
            })
    }

    /// Updates the identity (e.g. the data directory).
    pub fn save_identity(&self, identity: &Identity) -> Result<(), StateError> {
        self.put_json(IDENTITY_FILE, identity)
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
        StateError,
    > {
        let pem = |name: &str| {
            self.read(name)?.ok_or_else(|| StateError::Missing {
                path: self.path(name),
            })
        };
        let cert = CertificateDer::from_pem_slice(&pem("device.crt")?)
            .map_err(|e| corrupt(&self.path("device.crt"))(&e))?;
        let key = PrivateKeyDer::from_pem_slice(&pem("device.key")?)
            .map_err(|e| corrupt(&self.path("device.key"))(&e))?;
        let ca = CertificateDer::from_pem_slice(&pem("ca.crt")?)
            .map_err(|e| corrupt(&self.path("ca.crt"))(&e))?;
        Ok((cert, key, ca))
    }

    /// The key and signing request of an enrollment that was sent but whose
    /// answer was not saved, if any: an enrollment retried with the same
    /// token must send them again, since the coordinator redeems a used
    /// token only for the key it certified then.
    pub fn enrollment_request(
        &self,
    ) -> Result<Option<(PrivateKeyDer<'static>, Vec<u8>)>, StateError> {
        let (Some(key), Some(csr)) = (self.read("enrolling.key")?, self.read("enrolling.csr")?)
        else {
            return Ok(None);
        };
        let key = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| corrupt(&self.path("enrolling.key"))(&e))?;
        Ok(Some((key, csr)))
    }

    /// Keeps an enrollment's key and signing request before they are sent.
    pub fn save_enrollment_request(
        &self,
        key: &PrivateKeyDer<'_>,
        csr: &[u8],
    ) -> Result<(), StateError> {
        self.write(
            "enrolling.key",
            pem_encode("PRIVATE KEY", key.secret_der()).as_bytes(),
        )?;
        self.write("enrolling.csr", csr)
    }

    /// Forgets the enrollment request once its credentials are saved.
    pub fn clear_enrollment_request(&self) -> Result<(), StateError> {
        self.remove(&["enrolling.key", "enrolling.csr"])
    }

    /// The key and signing request of a certificate renewal that was
    /// started but not finished, if any: it is sent again, never replaced,
    /// so that a lost answer costs one more request and nothing else.
    pub fn renewal_request(&self) -> Result<Option<(PrivateKeyDer<'static>, Vec<u8>)>, StateError> {
        let (Some(key), Some(csr)) = (self.read("renewing.key")?, self.read("renewing.csr")?)
        else {
            return Ok(None);
        };
        let key = PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| corrupt(&self.path("renewing.key"))(&e))?;
        Ok(Some((key, csr)))
    }

    /// Keeps a renewal's new key and signing request before they are sent.
    pub fn save_renewal_request(
        &self,
        key: &PrivateKeyDer<'_>,
        csr: &[u8],
    ) -> Result<(), StateError> {
        self.write(
            "renewing.key",
            pem_encode("PRIVATE KEY", key.secret_der()).as_bytes(),
        )?;
        self.write("renewing.csr", csr)
    }

    /// Keeps the renewed certificate (DER) for [`StateDir::finish_renewal`].
    pub fn save_renewed(&self, cert: &[u8]) -> Result<(), StateError> {
        self.write("renewed.crt", pem_encode("CERTIFICATE", cert).as_bytes())
    }

    /// Puts a saved renewed certificate and its key in place of the
    /// device's credentials and forgets the renewal; does nothing when no
    /// answer was saved. Every step can be repeated, so a crash anywhere is
    /// finished by the next call (the agent makes one before it loads its
    /// credentials).
    pub fn finish_renewal(&self) -> Result<(), StateError> {
        let (Some(cert), Some(key)) = (self.read("renewed.crt")?, self.read("renewing.key")?)
        else {
            return Ok(());
        };
        self.write("device.key", &key)?;
        self.write("device.crt", &cert)?;
        // The answer first: a renewed certificate left behind without its
        // key would be taken for the answer to the next renewal.
        self.remove(&["renewed.crt", "renewing.key", "renewing.csr"])
    }

    /// Removes the named files; a missing one is not an error.
    fn remove(&self, names: &[&str]) -> Result<(), StateError> {
        for name in names {
            match std::fs::remove_file(self.path(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(&self.path(name))(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The cached global model, if its bytes still match its id.
    pub fn cached_model(&self) -> Result<Option<(ObjectId, Vec<u8>)>, StateError> {
        let (Some(id), Some(bytes)) = (self.read("model.id")?, self.read("model")?) else {
            return Ok(None);
        };
        let actual = ObjectId::of(&bytes);
        Ok((actual.to_string().as_bytes() == id.as_slice()).then_some((actual, bytes)))
    }

    /// Caches a global model.
    pub fn cache_model(&self, id: &ObjectId, bytes: &[u8]) -> Result<(), StateError> {
        self.write("model", bytes)?;
        self.write("model.id", id.to_string().as_bytes())
    }

    /// The update awaiting upload, if any (and if its bytes match its hash).
    pub fn pending(&self) -> Result<Option<Pending>, StateError> {
        let (Some(meta), Some(bytes)) = (
            self.json::<UpdateMeta>("pending.json")?,
            self.read("pending.bin")?,
        ) else {
            return Ok(None);
        };
        Ok((ObjectId::of(&bytes) == meta.object.id).then_some(Pending { meta, bytes }))
    }

    /// Persists an update before its upload starts.
    pub fn save_pending(&self, p: &Pending) -> Result<(), StateError> {
        self.write("pending.bin", &p.bytes)?;
        self.put_json("pending.json", &p.meta)
    }

    /// Forgets the pending update (accepted or refused).
    pub fn clear_pending(&self) -> Result<(), StateError> {
        for name in ["pending.json", "pending.bin"] {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&self.path(name))(e)),
            }
        }
        Ok(())
    }

    /// The status counters.
    pub fn status(&self) -> Result<Status, StateError> {
        Ok(self.json("status.json")?.unwrap_or_default())
    }

    /// Saves the status counters.
    pub fn save_status(&self, s: &Status) -> Result<(), StateError> {
        self.put_json("status.json", s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("fleet-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir::at(dir)
    }

    #[test]
    fn errors_say_which_case_it_is() {
        let state = scratch("errors");
        assert!(matches!(
            state.identity(),
            Err(StateError::NotEnrolled { .. })
        ));
        assert!(matches!(
            state.credentials(),
            Err(StateError::Missing { path }) if path.ends_with("device.crt")
        ));
        state.write("agent.json", b"{ not json").unwrap();
        let e = state.identity().unwrap_err();
        assert!(
            matches!(&e, StateError::Corrupt { path, .. } if path.ends_with("agent.json")),
            "{e}"
        );
        assert!(e.to_string().contains("agent.json"), "{e}");
        let _ = std::fs::remove_dir_all(state.dir());
    }

    /// A renewal interrupted after the new key was put in place, but before
    /// the certificate was, is finished by the next call; it leaves
    /// credentials that belong together.
    #[test]
    fn an_interrupted_renewal_is_finished_with_a_matching_key_and_certificate() {
        use fleet_protocol::tls::{
            CertificateAuthority, certificate_public_key, csr_public_key, device_key_and_csr,
        };
        let state = scratch("renewal");
        let ca = CertificateAuthority::create("test CA").unwrap();
        let (old_key, old_csr) = device_key_and_csr().unwrap();
        let old = ca.issue_device(&old_csr, 7, 90).unwrap();
        let identity = Identity {
            device: 7,
            coordinator: "127.0.0.1:1".parse().unwrap(),
            server_name: "localhost".into(),
            data: None,
        };
        state
            .save_enrollment(&identity, &old_key, &old, ca.cert())
            .unwrap();
        assert!(state.renewal_request().unwrap().is_none());
        state.finish_renewal().unwrap();
        assert_eq!(state.credentials().unwrap().0, old, "nothing to finish");

        let (key, csr) = device_key_and_csr().unwrap();
        state.save_renewal_request(&key, &csr).unwrap();
        let (_, kept) = state.renewal_request().unwrap().unwrap();
        assert_eq!(kept, csr, "the request is kept to be sent again");
        let new = ca.issue_device(&csr, 7, 90).unwrap();
        state.save_renewed(&new).unwrap();
        // The crash: the new key is in place, the certificate is not.
        let pending_key = std::fs::read(state.dir().join("renewing.key")).unwrap();
        state.write("device.key", &pending_key).unwrap();
        state.finish_renewal().unwrap();

        let (cert, key, _) = state.credentials().unwrap();
        assert_eq!(cert, new);
        assert_eq!(
            certificate_public_key(&cert).unwrap(),
            csr_public_key(&csr).unwrap()
        );
        assert_eq!(key.secret_der(), pending_key_der(&pending_key));
        assert!(state.renewal_request().unwrap().is_none());
        for gone in ["renewing.key", "renewing.csr", "renewed.crt"] {
            assert!(!state.dir().join(gone).exists(), "{gone}");
        }
        let _ = std::fs::remove_dir_all(state.dir());
    }

    fn pending_key_der(pem: &[u8]) -> Vec<u8> {
        PrivateKeyDer::from_pem_slice(pem)
            .unwrap()
            .secret_der()
            .to_vec()
    }

    #[cfg(unix)]
    #[test]
    fn files_are_written_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let state = scratch("modes");
        state.write("pending.bin", b"an update").unwrap();
        state.write("pending.bin", b"written again").unwrap();
        let mode = std::fs::metadata(state.dir().join("pending.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert_eq!(
            std::fs::read(state.dir().join("pending.bin")).unwrap(),
            b"written again"
        );
        assert!(!state.dir().join("pending.bin.tmp").exists());
        let _ = std::fs::remove_dir_all(state.dir());
    }
}
