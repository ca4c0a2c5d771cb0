//! Reading certificates, private keys and CA bundles from PEM files, with errors naming the file.
//!
//! Owns the file-level checks (exists, readable, bounded size, well-formed PEM, holds the expected
//! sections, each certificate parses). It does not decide what a certificate is trusted for:
//! that is the verifiers' job in `config`.

use std::io::{ErrorKind, Read};
use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// The largest PEM file read, in bytes. A certificate is a few KiB and a long chain or a CA
/// bundle a few hundred; anything bigger is a misconfigured path (a log, a database), and is
/// refused before it is read into memory.
pub const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Reads the whole file, refusing one larger than [`PEM_FILE_BYTES_MAX`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let file = std::fs::File::open(path).map_err(|source| match source.kind() {
        ErrorKind::NotFound => TlsError::FileMissing {
            path: path.to_path_buf(),
        },
        _ => TlsError::FileRead {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let mut bytes = Vec::new();
    // Read one byte past the limit so an oversized file is detected, not silently truncated.
    file.take(PEM_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TlsError::FileRead {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > PEM_FILE_BYTES_MAX {
        return Err(TlsError::FileTooLarge {
            path: path.to_path_buf(),
            bytes_max: PEM_FILE_BYTES_MAX,
        });
    }
    Ok(bytes)
}

/// Describes a PEM error as text: pki-types prints marker lines as byte arrays, which an
/// operator cannot read.
fn pem_error(path: &Path, error: rustls::pki_types::pem::Error) -> TlsError {
    use rustls::pki_types::pem::Error;
    let reason = match error {
        Error::MissingSectionEnd { end_marker } => format!(
            "missing end line for section {:?}",
            String::from_utf8_lossy(&end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("malformed BEGIN line {:?}", String::from_utf8_lossy(&line))
        }
        other => other.to_string(),
    };
    TlsError::Pem {
        path: path.to_path_buf(),
        reason,
    }
}

/// Every `CERTIFICATE` section of the file, in order. Each is parsed as an X.509 certificate
/// here so that a corrupt file fails at startup with its name, not at the first handshake with
/// a bare "bad encoding".
pub(crate) fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| pem_error(path, source))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for (position, certificate) in certificates.iter().enumerate() {
        if let Err(error) = webpki::EndEntityCert::try_from(certificate) {
            return Err(TlsError::BadCertificate {
                path: path.to_path_buf(),
                index: position + 1,
                reason: error.to_string(),
            });
        }
    }
    Ok(certificates)
}

/// The first private key of the file (PKCS#8, PKCS#1 or SEC1). Whether it is usable is checked
/// by the crypto provider in `config`, which knows which algorithms it supports.
pub(crate) fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(pem_error(path, source)),
    }
}

/// The trust anchors of a CA bundle: every certificate in the file, none skipped. A CA file
/// that trusts nothing is an error, not an empty store: an empty store would refuse every peer
/// with an error that does not point back at the file.
pub(crate) fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let certificates = match load_certificates(path) {
        Err(TlsError::NoCertificate { path }) => {
            return Err(TlsError::CaHasNoCertificates { path });
        }
        other => other?,
    };
    let mut roots = RootCertStore::empty();
    for (position, certificate) in certificates.into_iter().enumerate() {
        roots
            .add(certificate)
            .map_err(|source| TlsError::BadCaCertificate {
                path: path.to_path_buf(),
                index: position + 1,
                source,
            })?;
    }
    Ok(roots)
}
