//! The CA key at rest: encrypted with a passphrase the operator keeps apart
//! from the home.
//!
//! Format: PKCS#8 `EncryptedPrivateKeyInfo` in PEM (`ENCRYPTED PRIVATE
//! KEY`), PBES2 with PBKDF2-HMAC-SHA256 ([`PBKDF2_ROUNDS`] rounds, a random
//! 16-byte salt) and AES-256-CBC (a random IV): the standard format, which
//! OpenSSL reads too (`openssl pkey -in ca.key -passin file:PASSFILE`), so
//! the key can be moved to other tools or offline storage.
//!
//! Where the passphrase comes from ([`Passphrase::find`]): a file named on
//! the command line (`--ca-passphrase-file`), else the systemd credential
//! `ca-passphrase` (`LoadCredential=ca-passphrase:/path` in the unit; the
//! file is read from `$CREDENTIALS_DIRECTORY`), else none. A home whose key
//! is encrypted cannot be opened without it; one whose key is not encrypted
//! ignores it.

use std::path::{Path, PathBuf};

use pkcs8::der::Decode;
use pkcs8::pkcs5::pbes2;
use pkcs8::{EncryptedPrivateKeyInfo, LineEnding, PrivateKeyInfo, SecretDocument};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// PEM label of an encrypted key.
pub const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// PBKDF2-HMAC-SHA256 rounds (OWASP's 2023 recommendation for it).
pub const PBKDF2_ROUNDS: u32 = 600_000;

/// Shortest passphrase accepted (bytes).
pub const MIN_PASSPHRASE: usize = 12;

/// Name of the systemd credential that holds the passphrase.
pub const CREDENTIAL: &str = "ca-passphrase";

/// A passphrase, wiped from memory when dropped.
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(…)")
    }
}

impl Passphrase {
    /// The passphrase in `path`: its bytes without one trailing newline, at
    /// least [`MIN_PASSPHRASE`] of them.
    pub fn read(path: &Path) -> Result<Self, String> {
        let mut bytes = Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("passphrase file {}: {e}", path.display()))?,
        );
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        if bytes.len() < MIN_PASSPHRASE {
            return Err(format!(
                "passphrase file {}: the passphrase must be at least {MIN_PASSPHRASE} bytes \
                 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display()
            ));
        }
        Ok(Self(bytes))
    }

    /// The passphrase from `file` if given, else from the systemd
    /// credential [`CREDENTIAL`] if there is one.
    pub fn find(file: Option<&Path>) -> Result<Option<Self>, String> {
        let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| PathBuf::from(dir).join(CREDENTIAL))
            .filter(|p| p.is_file());
        match file.map(Path::to_path_buf).or(credential) {
            Some(path) => Self::read(&path).map(Some),
            None => Ok(None),
        }
    }
}

/// Whether a key file holds an encrypted key.
pub fn is_encrypted(pem: &str) -> bool {
    pem.trim_start()
        .starts_with(&format!("-----BEGIN {ENCRYPTED_LABEL}-----"))
}

/// Encrypts a PKCS#8 `PRIVATE KEY` PEM with `passphrase`.
pub fn encrypt(key_pem: &str, passphrase: &Passphrase) -> Result<Zeroizing<String>, String> {
    let (label, doc) =
        SecretDocument::from_pem(key_pem).map_err(|e| format!("the CA key is not PEM: {e}"))?;
    if label != "PRIVATE KEY" {
        return Err(format!(
            "the CA key is a {label:?}, not a PKCS#8 PRIVATE KEY"
        ));
    }
    let info = PrivateKeyInfo::from_der(doc.as_bytes())
        .map_err(|e| format!("the CA key is not PKCS#8: {e}"))?;
    let rng = SystemRandom::new();
    let (mut salt, mut iv) = ([0u8; 16], [0u8; 16]);
    rng.fill(&mut salt)
        .and_then(|()| rng.fill(&mut iv))
        .map_err(|_| "the system's random source failed".to_string())?;
    let params = pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, &iv)
        .map_err(|e| format!("encryption parameters: {e}"))?;
    let encrypted = info
        .encrypt_with_params(params, passphrase.0.as_slice())
        .map_err(|e| format!("cannot encrypt the CA key: {e}"))?;
    encrypted
        .to_pem(ENCRYPTED_LABEL, LineEnding::LF)
        .map_err(|e| format!("cannot encode the encrypted CA key: {e}"))
}

/// Decrypts an `ENCRYPTED PRIVATE KEY` PEM with `passphrase`; the key as a
/// `PRIVATE KEY` PEM.
pub fn decrypt(pem: &str, passphrase: &Passphrase) -> Result<Zeroizing<String>, String> {
    let (label, doc) =
        SecretDocument::from_pem(pem).map_err(|e| format!("the CA key is not PEM: {e}"))?;
    if label != ENCRYPTED_LABEL {
        return Err(format!(
            "the CA key is a {label:?}, not an {ENCRYPTED_LABEL}"
        ));
    }
    let info = EncryptedPrivateKeyInfo::from_der(doc.as_bytes())
        .map_err(|e| format!("the encrypted CA key is damaged: {e}"))?;
    let key = info.decrypt(passphrase.0.as_slice()).map_err(|_| {
        "cannot decrypt the CA key: wrong passphrase (or a damaged key file)".to_string()
    })?;
    key.to_pem("PRIVATE KEY", LineEnding::LF)
        .map_err(|e| format!("cannot encode the CA key: {e}"))
}
