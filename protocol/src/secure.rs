//! Device certificates as secure aggregation's identity keys.
//!
//! SecAgg+ needs each device's round keys signed by a key the server
//! cannot forge, checked by the other devices (`fleet_secagg::Signer`,
//! `fleet_secagg::Authenticator`). In a real fleet that key is the one of
//! the device's TLS certificate, issued by the fleet's CA at enrollment:
//!
//! - [`CertSigner`] signs with the device's private key and hands its
//!   certificate (DER) along as the credential;
//! - [`CaAuthenticator`] accepts a credential only when it is a
//!   certificate the fleet CA issued, valid now, for client
//!   authentication, whose role is `fleet:device:<id>` for the id the
//!   advertisement names, and the signature is that certificate key's.
//!
//! Agents check their neighbours' advertisements with it, and the
//! coordinator checks every advertisement before it enters a round, so
//! that one device's bad advertisement cannot end its neighbours' round.

use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::tls::{Role, TlsError, role_of};

/// The schemes a device key may sign advertisements with (those of the
/// keys the CA issues and of the keys agents generate).
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
];

/// Signs with a device's certificate key.
pub struct CertSigner {
    cert: Vec<u8>,
    signer: Box<dyn rustls::sign::Signer>,
}

impl std::fmt::Debug for CertSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSigner").finish_non_exhaustive()
    }
}

impl CertSigner {
    /// The signer of the device holding `key`, certified by `cert`.
    pub fn new(cert: &CertificateDer<'_>, key: &PrivateKeyDer<'_>) -> Result<Self, TlsError> {
        let provider = rustls::crypto::ring::default_provider();
        let key = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(TlsError::Rustls)?;
        let signer = key.choose_scheme(SCHEMES).ok_or_else(|| {
            TlsError::Config("the device key cannot sign with ECDSA P-256 or Ed25519".into())
        })?;
        Ok(Self {
            cert: cert.to_vec(),
            signer,
        })
    }
}

impl fleet_secagg::Signer for CertSigner {
    fn credential(&self) -> Vec<u8> {
        self.cert.clone()
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        // ring's signers fail only on a broken random source; an empty
        // signature is then refused by every verifier.
        self.signer.sign(message).unwrap_or_default()
    }
}

/// Checks advertisements against the fleet's CA certificate.
#[derive(Debug, Clone)]
pub struct CaAuthenticator {
    ca: Arc<CertificateDer<'static>>,
}

impl CaAuthenticator {
    /// An authenticator trusting the CA certificate `ca` (DER).
    pub fn new(ca: CertificateDer<'static>) -> Result<Self, TlsError> {
        webpki::anchor_from_trusted_cert(&ca)
            .map_err(|e| TlsError::Config(format!("the CA certificate is unusable: {e}")))?;
        Ok(Self { ca: Arc::new(ca) })
    }
}

impl fleet_secagg::Authenticator for CaAuthenticator {
    fn verify(
        &self,
        device: fleet_secagg::DeviceId,
        credential: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), String> {
        let cert = CertificateDer::from(credential);
        let ee = webpki::EndEntityCert::try_from(&cert)
            .map_err(|e| format!("device {device}: not a certificate: {e}"))?;
        let anchors = [webpki::anchor_from_trusted_cert(&self.ca)
            .map_err(|e| format!("the CA certificate is unusable: {e}"))?];
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| format!("device {device}: the certificate is not the fleet CA's: {e}"))?;
        match role_of(&cert) {
            Ok((Role::Device(id), _)) if id == device => {}
            Ok((role, _)) => {
                return Err(format!(
                    "device {device}: the certificate is {}'s",
                    role.uri()
                ));
            }
            Err(e) => return Err(format!("device {device}: {e}")),
        }
        let algorithms = [webpki::ring::ECDSA_P256_SHA256, webpki::ring::ED25519];
        if algorithms
            .iter()
            .any(|alg| ee.verify_signature(*alg, message, signature).is_ok())
        {
            Ok(())
        } else {
            Err(format!(
                "device {device}: the advertisement is not signed by its certificate's key"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use fleet_secagg::{Authenticator, Signer};

    use super::*;
    use crate::tls::{CertificateAuthority, device_key_and_csr};

    fn device(ca: &CertificateAuthority, id: u64) -> CertSigner {
        let (key, csr) = device_key_and_csr().unwrap();
        let cert = ca.issue_device(&csr, id, 30).unwrap();
        CertSigner::new(&cert, &key).unwrap()
    }

    #[test]
    fn a_device_signature_verifies_and_nothing_else_does() {
        let ca = CertificateAuthority::create("fleet").unwrap();
        let auth = CaAuthenticator::new(ca.cert().clone()).unwrap();
        let seven = device(&ca, 7);
        let sig = seven.sign(b"keys of round 3");
        let cred = seven.credential();
        assert_eq!(auth.verify(7, &cred, b"keys of round 3", &sig), Ok(()));

        // Another message, another device's id, a bit flipped.
        let e = auth.verify(7, &cred, b"keys of round 4", &sig).unwrap_err();
        assert!(e.contains("not signed"), "{e}");
        let e = auth.verify(8, &cred, b"keys of round 3", &sig).unwrap_err();
        assert!(e.contains("fleet:device:7"), "{e}");
        let mut bad = sig.clone();
        bad[10] ^= 1;
        assert!(auth.verify(7, &cred, b"keys of round 3", &bad).is_err());

        // A certificate of another CA, even for the right id.
        let other = CertificateAuthority::create("other").unwrap();
        let stranger = device(&other, 7);
        let sig = stranger.sign(b"m");
        let e = auth
            .verify(7, &stranger.credential(), b"m", &sig)
            .unwrap_err();
        assert!(e.contains("not the fleet CA's"), "{e}");

        // An admin's certificate is no device's.
        let (cert, key) = ca.issue_admin("ops", 30).unwrap();
        let admin = CertSigner::new(&cert, &key).unwrap();
        let sig = admin.sign(b"m");
        assert!(auth.verify(7, &admin.credential(), b"m", &sig).is_err());

        // Garbage.
        assert!(auth.verify(7, b"not der", b"m", &sig).is_err());
    }
}
