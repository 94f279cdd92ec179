//! The coordinator's home directory: its certificate authority, server and
//! admin credentials, settings, database and model objects.
//!
//! ```text
//! <home>/
//!   coordinator.json     listen address and server names
//!   ca.crt  ca.key       the fleet's certificate authority (keep ca.key secret;
//!                        encrypted with a passphrase when one is given, see
//!                        [`crate::cakey`])
//!   server.crt server.key  the coordinator's QUIC server identity
//!   admin.crt admin.key  the first administrator's credentials
//!   coordinator.db       state (SQLite, WAL journal)
//!   objects/             model versions, named by their SHA-256
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_protocol::tls::{CertificateAuthority, pem_encode};
use zeroize::Zeroizing;

use crate::cakey::{self, Passphrase};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// Settings written by `coordinator init`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Address the QUIC server listens on.
    pub listen: SocketAddr,
    /// Names (DNS or IP) in the server certificate; agents and admins connect to the first.
    pub server_names: Vec<String>,
    /// Address of the Prometheus endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Drift monitoring of the deployed model.
    #[serde(default)]
    pub drift: DriftSettings,
    /// Connection and request limits (see `docs/security.md`).
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Model versions each task keeps besides its current model and every
    /// deployed one; older ones are removed with their artifacts after each
    /// round (`null`: keep every version). Absent: 20.
    #[serde(default = "default_keep_models")]
    pub keep_models: Option<usize>,
    /// A PostgreSQL URL holding the coordinator's state, shared by its
    /// replicas (absent: the embedded SQLite database in this directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

fn default_keep_models() -> Option<usize> {
    Some(crate::store::KEEP_MODELS)
}

/// Drift monitoring settings (`drift` in the settings file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DriftSettings {
    /// Length of a reporting window in seconds.
    pub window_secs: u64,
    /// Thresholds and hysteresis.
    pub thresholds: crate::drift::MonitorConfig,
    /// Retraining when a cohort or the fleet drifts (off by default).
    pub retrain: crate::drift::RetrainPolicy,
}

impl Default for DriftSettings {
    fn default() -> Self {
        Self {
            window_secs: 3600,
            thresholds: crate::drift::MonitorConfig::default(),
            retrain: crate::drift::RetrainPolicy::default(),
        }
    }
}

/// A coordinator home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
    /// The file holding the CA key's passphrase, if given.
    ca_passphrase: Option<PathBuf>,
    /// The store's location given on the command line, over the settings'.
    store: Option<String>,
    /// This replica's name given on the command line.
    replica: Option<String>,
    /// This replica's role.
    role: crate::app::Role,
    /// Where `serve` listens, over the settings' `listen`.
    listen: Option<SocketAddr>,
    /// Where `serve` answers metrics (`Some(None)`: nowhere), over the settings'.
    metrics: Option<Option<SocketAddr>>,
}

/// Why the coordinator's home could not be created or read.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// A file could not be read.
    #[error("cannot read {}: {source} (run `coordinator init --dir {}` first?)", path.display(), dir.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Its directory.
        dir: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// `init` on a directory that already holds a coordinator.
    #[error("{} already holds a coordinator (ca.key exists); choose another --dir", dir.display())]
    Exists {
        /// The directory.
        dir: PathBuf,
    },
    /// `init` without a server name.
    #[error("give at least one --host name for the server certificate")]
    NoHost,
    /// A file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Making or loading a certificate failed.
    #[error(transparent)]
    Tls(#[from] fleet_protocol::tls::TlsError),
    /// The CA key could not be encrypted or decrypted.
    #[error("{}: {reason}", path.display())]
    CaKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// For callers whose errors are still messages.
impl From<HomeError> for String {
    fn from(e: HomeError) -> String {
        e.to_string()
    }
}

fn read(path: &Path) -> Result<String, HomeError> {
    std::fs::read_to_string(path).map_err(|source| HomeError::Read {
        path: path.to_path_buf(),
        dir: path.parent().map_or(".".into(), Path::to_path_buf),
        source,
    })
}

/// Writes `text` to a new or existing file; `secret` files are created
/// readable by the owner only (never world-readable, not even briefly).
fn write(path: &Path, text: &str, secret: bool) -> Result<(), HomeError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let write = |mut f: std::fs::File| {
        use std::io::Write;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    options
        .open(path)
        .and_then(write)
        .map_err(|source| HomeError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn invalid(path: &Path, what: &str, e: impl std::fmt::Display) -> HomeError {
    HomeError::Invalid {
        path: path.to_path_buf(),
        reason: format!("not {what}: {e}"),
    }
}

/// Reads a PEM certificate.
pub fn read_cert(path: &Path) -> Result<CertificateDer<'static>, HomeError> {
    CertificateDer::from_pem_slice(read(path)?.as_bytes())
        .map_err(|e| invalid(path, "a PEM certificate", e))
}

/// Reads a PEM private key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, HomeError> {
    PrivateKeyDer::from_pem_slice(read(path)?.as_bytes())
        .map_err(|e| invalid(path, "a PEM private key", e))
}

fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    pem_encode("PRIVATE KEY", key.secret_der())
}

impl Home {
    /// The home at `dir` (not checked).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ca_passphrase: None,
            store: None,
            replica: None,
            role: crate::app::Role::Serve,
            listen: None,
            metrics: None,
        }
    }

    /// The same home, served on `listen` and with metrics on `metrics`
    /// (`Some(None)`: none) instead of the settings' (so that replicas on
    /// one machine, or machines sharing a copy of the home, differ).
    pub fn serving_at(
        mut self,
        listen: Option<SocketAddr>,
        metrics: Option<Option<SocketAddr>>,
    ) -> Self {
        self.listen = listen;
        self.metrics = metrics;
        self
    }

    /// The settings `serve` uses: the file's, with the command line's
    /// listen and metrics addresses.
    pub fn serve_settings(&self) -> Result<Settings, String> {
        let mut settings = self.settings().map_err(|e| e.to_string())?;
        if let Some(listen) = self.listen {
            settings.listen = listen;
        }
        if let Some(metrics) = self.metrics {
            settings.metrics = metrics;
        }
        Ok(settings)
    }

    /// The same home, serving in `role` (on a shared store).
    pub fn with_role(mut self, role: crate::app::Role) -> Self {
        self.role = role;
        self
    }

    /// This replica's role.
    pub fn role(&self) -> crate::app::Role {
        self.role
    }

    /// The same home, with its state in the store at `url` (a
    /// `postgres://` URL) instead of the settings' `store`.
    pub fn with_store(mut self, url: Option<String>) -> Self {
        self.store = url;
        self
    }

    /// The same home, serving as the replica `name`.
    pub fn with_replica(mut self, name: Option<String>) -> Self {
        self.replica = name;
        self
    }

    /// Where the coordinator's state lives: the command line's `--store`,
    /// else the settings' `store`, else the embedded SQLite database in
    /// this directory.
    pub fn store_location(&self) -> Result<crate::store::Location, String> {
        let url = match &self.store {
            Some(url) => Some(url.clone()),
            None => self.settings().map_err(|e| e.to_string())?.store,
        };
        match url {
            Some(url) => crate::store::Location::postgres(&url).map_err(|e| e.to_string()),
            None => Ok(crate::store::Location::Sqlite(self.dir.clone())),
        }
    }

    /// Opens the coordinator's store (see [`Home::store_location`]).
    pub fn open_store(&self) -> Result<crate::store::Store, String> {
        let location = self.store_location()?;
        crate::store::Store::at(&location).map_err(|e| format!("{}: {e}", location.display()))
    }

    /// This replica's name: the command line's `--replica`, else the host's
    /// name and the process id.
    pub fn replica_name(&self) -> String {
        self.replica.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "coordinator".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The same home, with the CA key's passphrase in `file` (when `None`,
    /// the systemd credential `ca-passphrase` if there is one; see
    /// [`crate::cakey::Passphrase::find`]).
    pub fn with_ca_passphrase(mut self, file: Option<PathBuf>) -> Self {
        self.ca_passphrase = file;
        self
    }

    /// The CA key's passphrase, if one is given.
    fn passphrase(&self) -> Result<Option<Passphrase>, HomeError> {
        Passphrase::find(self.ca_passphrase.as_deref()).map_err(|reason| self.ca_key_error(reason))
    }

    fn ca_key_error(&self, reason: String) -> HomeError {
        HomeError::CaKey {
            path: self.path("ca.key"),
            reason,
        }
    }

    /// Its path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a new home: CA, server certificate for `settings.server_names`,
    /// an admin certificate, the settings file. Refuses to overwrite an existing CA.
    pub fn init(&self, settings: &Settings, admin: &str) -> Result<(), HomeError> {
        if self.path("ca.key").exists() {
            return Err(HomeError::Exists {
                dir: self.dir.clone(),
            });
        }
        if settings.server_names.is_empty() {
            return Err(HomeError::NoHost);
        }
        let passphrase = self.passphrase()?;
        // The home holds the CA key and the database of raw updates.
        fleet_protocol::private::private_dir(&self.dir).map_err(|source| HomeError::Write {
            path: self.dir.clone(),
            source,
        })?;
        let ca = CertificateAuthority::create("fleet coordinator CA")?;
        let (ca_pem, ca_key) = ca.to_pem();
        let ca_key = match &passphrase {
            Some(p) => cakey::encrypt(&ca_key, p).map_err(|r| self.ca_key_error(r))?,
            None => Zeroizing::new(ca_key),
        };
        write(&self.path("ca.crt"), &ca_pem, false)?;
        write(&self.path("ca.key"), &ca_key, true)?;
        let (cert, key) = ca.issue_server(&settings.server_names, 3650)?;
        write(
            &self.path("server.crt"),
            &pem_encode("CERTIFICATE", &cert),
            false,
        )?;
        write(&self.path("server.key"), &key_pem(&key), true)?;
        let (cert, key) = ca.issue_admin(admin, 365)?;
        write(
            &self.path("admin.crt"),
            &pem_encode("CERTIFICATE", &cert),
            false,
        )?;
        write(&self.path("admin.key"), &key_pem(&key), true)?;
        self.save_settings(settings)
    }

    /// Writes the settings file.
    pub fn save_settings(&self, settings: &Settings) -> Result<(), HomeError> {
        let json = serde_json::to_string_pretty(settings).expect("settings serialise");
        write(&self.path("coordinator.json"), &json, false)
    }

    /// Reads the settings file.
    pub fn settings(&self) -> Result<Settings, HomeError> {
        let path = self.path("coordinator.json");
        serde_json::from_str(&read(&path)?).map_err(|e| invalid(&path, "valid settings", e))
    }

    /// The certificate authority (certificate and key).
    /// An encrypted key is decrypted with the passphrase given
    /// ([`Home::with_ca_passphrase`]); without one it is an error that says
    /// how to give it.
    pub fn ca(&self) -> Result<CertificateAuthority, HomeError> {
        let cert = read(&self.path("ca.crt"))?;
        let key = self.ca_key_pem()?;
        Ok(CertificateAuthority::from_pem(&cert, &key)?)
    }

    /// The CA key as a plain PEM, decrypted if it is encrypted.
    fn ca_key_pem(&self) -> Result<Zeroizing<String>, HomeError> {
        let key = Zeroizing::new(read(&self.path("ca.key"))?);
        if !cakey::is_encrypted(&key) {
            return Ok(key);
        }
        let Some(passphrase) = self.passphrase()? else {
            return Err(self.ca_key_error(format!(
                "the CA key is encrypted: give its passphrase with --ca-passphrase-file FILE \
                 (or FLEET_CA_PASSPHRASE_FILE, or under systemd LoadCredential={}:FILE)",
                cakey::CREDENTIAL
            )));
        };
        cakey::decrypt(&key, &passphrase).map_err(|r| self.ca_key_error(r))
    }

    /// Whether the CA key is stored encrypted.
    pub fn ca_key_encrypted(&self) -> Result<bool, HomeError> {
        Ok(cakey::is_encrypted(&read(&self.path("ca.key"))?))
    }

    /// Encrypts the CA key with the passphrase in `new` (decrypting it
    /// first with the one given, if it is encrypted already): to encrypt
    /// the key of an existing home, or to change its passphrase. The file
    /// is replaced atomically (a crash leaves the old or the new one).
    pub fn encrypt_ca_key(&self, new: &Path) -> Result<(), HomeError> {
        let new = Passphrase::read(new).map_err(|r| self.ca_key_error(r))?;
        let plain = self.ca_key_pem()?;
        let encrypted = cakey::encrypt(&plain, &new).map_err(|r| self.ca_key_error(r))?;
        // Checked before it replaces the key: it must decrypt to the same key.
        let back = cakey::decrypt(&encrypted, &new).map_err(|r| self.ca_key_error(r))?;
        if back.trim() != plain.trim() {
            return Err(self.ca_key_error("the encrypted key does not decrypt to the key".into()));
        }
        let tmp = self.path("ca.key.tmp");
        write(&tmp, &encrypted, true)?;
        std::fs::rename(&tmp, self.path("ca.key"))
            .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
            .map_err(|source| HomeError::Write {
                path: self.path("ca.key"),
                source,
            })
    }

    /// The CA certificate alone (what agents and admins need).
    pub fn ca_cert(&self) -> Result<CertificateDer<'static>, HomeError> {
        read_cert(&self.path("ca.crt"))
    }

    /// The server's certificate and key.
    pub fn server_identity(
        &self,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), HomeError> {
        Ok((
            read_cert(&self.path("server.crt"))?,
            read_key(&self.path("server.key"))?,
        ))
    }

    /// Issues a certificate for administrator `name`, valid `days`, records
    /// it in the database, and writes what the administrator needs into
    /// `out` (created; must not hold credentials already): `ca.crt`,
    /// `admin.crt`, `admin.key` (owner-only) and a copy of the settings, so
    /// that `out` works as `--dir` for every command that talks to the
    /// running coordinator. Returns the certificate's serial.
    pub fn issue_admin(&self, name: &str, days: u64, out: &Path) -> Result<Vec<u8>, String> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
        {
            return Err(format!(
                "administrator name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or '@'"
            ));
        }
        if !(1..=3650).contains(&days) {
            return Err(format!("--days {days}: between 1 and 3650"));
        }
        if out.join("admin.key").exists() {
            return Err(format!(
                "{} already holds administrator credentials: choose another --out",
                out.display()
            ));
        }
        let store = self.open_store()?;
        let (cert, key) = self
            .ca()?
            .issue_admin(name, days)
            .map_err(|e| e.to_string())?;
        let (_, serial) = fleet_protocol::tls::role_of(&cert).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let settings = read(&self.path("coordinator.json"))?;
        write(&out.join("coordinator.json"), &settings, false)?;
        write(&out.join("ca.crt"), &read(&self.path("ca.crt"))?, false)?;
        write(&out.join("admin.key"), &key_pem(&key), true)?;
        write(
            &out.join("admin.crt"),
            &pem_encode("CERTIFICATE", cert.as_ref()),
            false,
        )?;
        store.add_admin(name, &serial).map_err(|e| e.to_string())?;
        Ok(serial)
    }

    /// The administrator's certificate and key.
    pub fn admin_identity(
        &self,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), HomeError> {
        Ok((
            read_cert(&self.path("admin.crt"))?,
            read_key(&self.path("admin.key"))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempDir;

    fn settings() -> Settings {
        Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            server_names: vec!["localhost".into()],
            metrics: None,
            drift: Default::default(),
            limits: Default::default(),
            keep_models: Some(crate::store::KEEP_MODELS),
            store: None,
        }
    }

    /// Signs a device certificate with the home's CA: the key works.
    fn signs(home: &Home) {
        let (_, csr) = fleet_protocol::tls::device_key_and_csr().unwrap();
        let ca = home.ca().unwrap();
        let cert = ca.issue_device(&csr, 1, 1).unwrap();
        assert!(fleet_protocol::tls::role_of(&cert).is_ok());
    }

    #[test]
    fn an_encrypted_ca_key_opens_only_with_its_passphrase() {
        let dir = TempDir::new("home-cakey");
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "correct horse battery staple\n").unwrap();
        let home = Home::at(dir.path().join("home")).with_ca_passphrase(Some(pass.clone()));
        home.init(&settings(), "admin").unwrap();
        let key = std::fs::read_to_string(home.path("ca.key")).unwrap();
        assert!(
            key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
            "{key}"
        );
        assert!(!key.contains("BEGIN PRIVATE KEY"));
        assert!(home.ca_key_encrypted().unwrap());
        signs(&home);

        // Without the passphrase: an error that says how to give it.
        let bare = Home::at(home.dir());
        let e = bare.ca().err().unwrap().to_string();
        assert!(e.contains("--ca-passphrase-file"), "{e}");
        // With a wrong one: refused, not a garbage key.
        let wrong = dir.path().join("wrong");
        std::fs::write(&wrong, "not the passphrase at all").unwrap();
        let e = Home::at(home.dir())
            .with_ca_passphrase(Some(wrong.clone()))
            .ca()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("wrong passphrase"), "{e}");
        // Too short to be accepted at all.
        let short = dir.path().join("short");
        std::fs::write(&short, "hunter2\n").unwrap();
        let e = Home::at(home.dir())
            .with_ca_passphrase(Some(short))
            .ca()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("at least 12 bytes"), "{e}");

        // A new passphrase: the old one no longer opens it, the new one does,
        // and it is the same CA.
        let before = home.ca().unwrap().cert().clone();
        home.encrypt_ca_key(&wrong).unwrap();
        assert!(home.ca().is_err());
        let rekeyed = Home::at(home.dir()).with_ca_passphrase(Some(wrong));
        assert_eq!(rekeyed.ca().unwrap().cert(), &before);
        signs(&rekeyed);
        assert!(!home.path("ca.key.tmp").exists());
    }

    #[test]
    fn a_plain_ca_key_is_encrypted_in_place() {
        let dir = TempDir::new("home-cakey-plain");
        let home = Home::at(dir.path().join("home"));
        home.init(&settings(), "admin").unwrap();
        assert!(!home.ca_key_encrypted().unwrap());
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "a long enough passphrase").unwrap();
        home.encrypt_ca_key(&pass).unwrap();
        assert!(home.ca_key_encrypted().unwrap());
        assert!(home.ca().is_err());
        signs(&Home::at(home.dir()).with_ca_passphrase(Some(pass)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(home.path("ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn init_refuses_twice_and_without_a_host() {
        let dir = TempDir::new("home-init");
        let home = Home::at(dir.path().join("home"));
        let none = Settings {
            server_names: vec![],
            ..settings()
        };
        assert!(matches!(home.init(&none, "admin"), Err(HomeError::NoHost)));
        home.init(&settings(), "admin").unwrap();
        assert!(matches!(
            home.init(&settings(), "admin"),
            Err(HomeError::Exists { .. })
        ));
        assert!(home.ca().is_ok() && home.server_identity().is_ok());
        let missing = Home::at(dir.path().join("nothing")).settings().unwrap_err();
        assert!(matches!(missing, HomeError::Read { .. }));
        assert!(
            missing.to_string().contains("coordinator init --dir"),
            "{missing}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn keys_and_the_home_are_private_from_the_start() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("home-modes");
        let home = Home::at(dir.path().join("home"));
        home.init(&settings(), "admin").unwrap();
        let mode = |name: &str| {
            std::fs::metadata(home.path(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for secret in ["ca.key", "server.key", "admin.key"] {
            assert_eq!(mode(secret), 0o600, "{secret}");
        }
        let home_mode = std::fs::metadata(home.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(home_mode & 0o077, 0, "{home_mode:o}");
    }
}
