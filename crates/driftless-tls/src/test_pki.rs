//! A throwaway certificate authority for tests and demos: a CA and node certificates it signs,
//! written as PEM files that `server_config` and `client_config` read like real ones.
//!
//! Not for production: keys are generated in-process, the CA key is written next to its
//! certificate, and certificates are valid for decades (rcgen's default) so tests never expire.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::TlsError;

/// File names the CA is written under, inside the PKI directory.
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";

/// Public key bytes shown in the CA's name to tell test CAs apart; 8 bytes make a collision
/// between the few CAs of one test run negligible.
const CA_NAME_KEY_BYTES: usize = 8;

/// Test and demo PKI: a CA and certificates it signs, written as PEM files.
pub struct TestPki {
    dir: PathBuf,
    ca_certificate: rcgen::Certificate,
    ca_key: KeyPair,
}

impl std::fmt::Debug for TestPki {
    // Hand-written so the CA private key never lands in a log or a test failure message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn generate_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TlsError {
    let what = what.into();
    move |source| TlsError::Generate { what, source }
}

/// Writes `contents` to `path`; private keys are made readable by the owner only, as a real
/// deployment's should be, so copying a demo setup does not copy a world-readable key.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let write_error = |source| TlsError::FileWrite {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(write_error)?;
    std::io::Write::write_all(&mut file, contents.as_bytes()).map_err(write_error)
}

impl TestPki {
    /// Creates `dir` if needed and a new CA in it (`ca.pem`, `ca.key`), replacing any there.
    pub fn new(dir: &Path) -> Result<TestPki, TlsError> {
        std::fs::create_dir_all(dir).map_err(|source| TlsError::FileWrite {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca_key = KeyPair::generate().map_err(generate_error("the CA key"))?;
        // A name unique to this CA (from its public key): two test CAs with one name would make
        // a foreign certificate fail as "bad signature" rather than the truthful "unknown issuer".
        let key_tag: String = ca_key
            .public_key_raw()
            .iter()
            .skip(1) // the uncompressed-point marker, the same for every P-256 key
            .take(CA_NAME_KEY_BYTES)
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("driftless test CA {key_tag}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_certificate = params
            .self_signed(&ca_key)
            .map_err(generate_error("the CA certificate"))?;
        write_file(&dir.join(CA_CERT_FILE), &ca_certificate.pem(), false)?;
        write_file(&dir.join(CA_KEY_FILE), &ca_key.serialize_pem(), true)?;
        Ok(TestPki {
            dir: dir.to_path_buf(),
            ca_certificate,
            ca_key,
        })
    }

    /// The CA certificate, for `client_ca` and `ca`.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// Issues a certificate for node `name`, written as `<name>-cert.pem` and `<name>-key.pem`
    /// in the PKI directory (the suffixes keep a node called `ca` from overwriting the CA);
    /// returns (certificate path, key path).
    ///
    /// Subject alternative names: DNS `name` first (what `peer_identity` reports and what a
    /// dialer verifies, since it uses the peer name as server name), then DNS `localhost` and IP
    /// 127.0.0.1 for local tools. The common name is `name` too. Extended key usage allows both
    /// server and client authentication: a node both listens and dials with one identity.
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf), TlsError> {
        // The same check the dialer applies to peer names, so an issued certificate is always
        // one that can be verified; it also keeps `name` safe as a file name (no `/`, no `..`).
        crate::server_name(name)?;
        let key = KeyPair::generate().map_err(generate_error(format!("a key for {name}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        let dns_name = |dns: &str| {
            dns.to_owned()
                .try_into()
                .map(SanType::DnsName)
                .map_err(generate_error(format!("a certificate for {name}")))
        };
        params.subject_alt_names = vec![
            dns_name(name)?,
            dns_name("localhost")?,
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params
            .signed_by(&key, &self.ca_certificate, &self.ca_key)
            .map_err(generate_error(format!("a certificate for {name}")))?;
        let cert_path = self.dir.join(format!("{name}-cert.pem"));
        let key_path = self.dir.join(format!("{name}-key.pem"));
        write_file(&cert_path, &certificate.pem(), false)?;
        write_file(&key_path, &key.serialize_pem(), true)?;
        Ok((cert_path, key_path))
    }
}
