//! The coordinator's home directory: its certificate authority, server and
//! admin credentials, settings, database and model objects.
//!
//! ```text
//! <home>/
//!   coordinator.json     listen address and server names
//!   ca.crt  ca.key       the fleet's certificate authority (keep ca.key secret)
//!   server.crt server.key  the coordinator's QUIC server identity
//!   admin.crt admin.key  the first administrator's credentials
//!   coordinator.db       state (SQLite, WAL journal)
//!   objects/             model versions, named by their SHA-256
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleet_protocol::tls::{CertificateAuthority, pem_encode};
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
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read {}: {e} (run `coordinator init --dir {}` first?)",
            path.display(),
            path.parent()
                .map_or(".".into(), |p| p.display().to_string())
        )
    })
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a PEM certificate.
pub fn read_cert(path: &Path) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(read(path)?.as_bytes())
        .map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))
}

/// Reads a PEM private key.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(read(path)?.as_bytes())
        .map_err(|e| format!("{}: not a PEM private key: {e}", path.display()))
}

fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    pem_encode("PRIVATE KEY", key.secret_der())
}

impl Home {
    /// The home at `dir` (not checked).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
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
    pub fn init(&self, settings: &Settings, admin: &str) -> Result<(), String> {
        if self.path("ca.key").exists() {
            return Err(format!(
                "{} already holds a coordinator (ca.key exists); choose another --dir",
                self.dir.display()
            ));
        }
        if settings.server_names.is_empty() {
            return Err("give at least one --host name for the server certificate".into());
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let ca = CertificateAuthority::create("fleet coordinator CA").map_err(|e| e.to_string())?;
        let (ca_pem, ca_key) = ca.to_pem();
        write(&self.path("ca.crt"), &ca_pem)?;
        write(&self.path("ca.key"), &ca_key)?;
        let (cert, key) = ca
            .issue_server(&settings.server_names, 3650)
            .map_err(|e| e.to_string())?;
        write(&self.path("server.crt"), &pem_encode("CERTIFICATE", &cert))?;
        write(&self.path("server.key"), &key_pem(&key))?;
        let (cert, key) = ca.issue_admin(admin, 365).map_err(|e| e.to_string())?;
        write(&self.path("admin.crt"), &pem_encode("CERTIFICATE", &cert))?;
        write(&self.path("admin.key"), &key_pem(&key))?;
        #[cfg(unix)]
        for secret in ["ca.key", "server.key", "admin.key"] {
            use std::os::unix::fs::PermissionsExt;
            let _ =
                std::fs::set_permissions(self.path(secret), std::fs::Permissions::from_mode(0o600));
        }
        self.save_settings(settings)
    }

    /// Writes the settings file.
    pub fn save_settings(&self, settings: &Settings) -> Result<(), String> {
        let json = serde_json::to_string_pretty(settings).expect("settings serialise");
        write(&self.path("coordinator.json"), &json)
    }

    /// Reads the settings file.
    pub fn settings(&self) -> Result<Settings, String> {
        let path = self.path("coordinator.json");
        serde_json::from_str(&read(&path)?).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The certificate authority (certificate and key).
    pub fn ca(&self) -> Result<CertificateAuthority, String> {
        CertificateAuthority::from_pem(&read(&self.path("ca.crt"))?, &read(&self.path("ca.key"))?)
            .map_err(|e| e.to_string())
    }

    /// The CA certificate alone (what agents and admins need).
    pub fn ca_cert(&self) -> Result<CertificateDer<'static>, String> {
        read_cert(&self.path("ca.crt"))
    }

    /// The server's certificate and key.
    pub fn server_identity(
        &self,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
        Ok((
            read_cert(&self.path("server.crt"))?,
            read_key(&self.path("server.key"))?,
        ))
    }

    /// The administrator's certificate and key.
    pub fn admin_identity(
        &self,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
        Ok((
            read_cert(&self.path("admin.crt"))?,
            read_key(&self.path("admin.key"))?,
        ))
    }
}
