//! The one error type of this crate: every way loading or generating TLS material can fail.
//!
//! Every operation here is "turn these files into a TLS configuration" (or, for the test PKI,
//! the reverse), and they fail in the same ways, so one enum serves them all. Each message names
//! the file and says what is wrong with it: an operator reading the node's log must be able to
//! fix the configuration without reading this code.

use std::path::PathBuf;

/// Why a TLS configuration could not be built, or a test certificate not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The file does not exist.
    #[error("{}: file not found", path.display())]
    FileMissing { path: PathBuf },

    /// The file exists but could not be read (permissions, a directory, ...).
    #[error("{}: cannot read: {source}", path.display())]
    FileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is larger than any certificate chain or key has a reason to be.
    #[error("{}: file is larger than {bytes_max} bytes; not a PEM certificate or key", path.display())]
    FileTooLarge { path: PathBuf, bytes_max: u64 },

    /// The file is not well-formed PEM.
    #[error("{}: malformed PEM: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },

    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{}: no certificate in PEM (expected a BEGIN CERTIFICATE section)", path.display())]
    NoCertificate { path: PathBuf },

    /// A `CERTIFICATE` section does not hold an X.509 certificate that can be parsed.
    #[error("{}: certificate #{index} is not a valid X.509 certificate: {reason}", path.display())]
    BadCertificate {
        path: PathBuf,
        /// Position of the certificate in the file, counting from 1.
        index: usize,
        reason: String,
    },

    /// A key file holds no private key section.
    #[error(
        "{}: no private key in PEM (expected a BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)",
        path.display()
    )]
    NoPrivateKey { path: PathBuf },

    /// The private key is not one the ring provider can sign with.
    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },

    /// The private key does not belong to the certificate.
    #[error("{}: private key does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },

    /// A client certificate was configured without its key.
    #[error("{}: client certificate given without a private key (set both or neither)", cert.display())]
    CertWithoutKey { cert: PathBuf },

    /// A client key was configured without its certificate.
    #[error("{}: client private key given without a certificate (set both or neither)", key.display())]
    KeyWithoutCert { key: PathBuf },

    /// A CA file holds no certificate, so nothing would be trusted.
    #[error("{}: CA file has no certificates; nothing would be trusted", path.display())]
    CaHasNoCertificates { path: PathBuf },

    /// A CA certificate cannot serve as a trust anchor.
    #[error("{}: CA certificate #{index} cannot be used as a trust anchor: {source}", path.display())]
    BadCaCertificate {
        path: PathBuf,
        /// Position of the certificate in the file, counting from 1.
        index: usize,
        #[source]
        source: rustls::Error,
    },

    /// rustls refused the configuration itself (not any one file); a bug or a rustls change.
    #[error("rustls rejected the configuration: {reason}")]
    Config { reason: String },

    /// A peer name is not a valid DNS name, so no certificate can be issued or verified for it.
    #[error("{name:?} is not a valid peer name (must be a DNS name such as \"hub\" or \"edge-1\")")]
    InvalidPeerName { name: String },

    /// The test PKI could not generate a key or sign a certificate.
    #[error("test PKI: cannot generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },

    /// The test PKI could not write a file.
    #[error("{}: cannot write: {source}", path.display())]
    FileWrite {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
