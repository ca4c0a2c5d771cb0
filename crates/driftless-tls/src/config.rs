//! Building rustls server and client configurations for peer links from PEM file paths.
//!
//! Owns the policy: which crypto provider (ring, installed per configuration), which protocol
//! versions (rustls's safe defaults), whom the listener trusts (nobody, or exactly one client
//! CA with a certificate required) and whom the dialer trusts (exactly one CA, never the system
//! roots). It does no IO beyond reading the configured files, and no networking.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, ServerConfig};

use crate::{TlsError, pem};

/// Paths for the listening side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// PEM certificate chain this node presents, its own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA bundle for mutual TLS. When set, every dialing peer must present a certificate
    /// that chains to it; when unset, peers are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

/// Paths for the dialing side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// PEM CA bundle: the only issuers whose server certificates are trusted.
    pub ca: PathBuf,
    /// PEM certificate chain presented when the server asks for one (mutual TLS).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`. Set both or neither.
    pub key: Option<PathBuf>,
}

/// The ring provider, built here rather than taken from the process-wide default, so no caller
/// has to remember to install one, and two crates choosing different defaults cannot collide.
fn ring_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_error(error: impl std::fmt::Display) -> TlsError {
    TlsError::Config {
        reason: error.to_string(),
    }
}

/// Loads a certificate chain and its key, and checks that the provider can sign with the key and
/// that the key is the certificate's, so either mistake is reported with both file names at
/// startup rather than as a handshake failure on the remote side.
fn load_certified_key(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = pem::load_certificates(cert_path)?;
    let key: PrivateKeyDer<'static> = pem::load_private_key(key_path)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::BadKey {
            path: key_path.to_path_buf(),
            source,
        })?;
    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        // `Unknown`: the provider cannot tell for this key type. rustls accepts that case too;
        // a real mismatch then fails the first handshake instead.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified_key)
        }
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        }),
        Err(other) => Err(TlsError::BadCertificate {
            path: cert_path.to_path_buf(),
            index: 1,
            reason: other.to_string(),
        }),
    }
}

/// The listener's configuration. With `client_ca`, mutual TLS: a client certificate is required
/// and must chain to that CA, so only nodes issued by the cluster's CA can open a peer link.
/// Without it, any client may connect and is authenticated (if at all) by the peer protocol.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = ring_provider();
    let certified_key = load_certified_key(&provider, &files.cert, &files.key)?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(config_error)?;
    let builder = match &files.client_ca {
        Some(client_ca) => {
            let roots = pem::load_roots(client_ca)?;
            // The builder's default is to require a certificate; it is not relaxed here.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(config_error)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
    Ok(Arc::new(config))
}

/// The dialer's configuration: trusts only the certificates in `ca` (never the system roots: a
/// peer link is inside one cluster, and a public CA vouching for a name proves nothing about
/// membership), and presents `cert`/`key` when both are given.
pub fn client_config(files: &ClientTlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = ring_provider();
    // Check the pairing before reading anything, so a half-configured identity is reported as
    // such and not as whatever the one given file happens to contain.
    let identity = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(cert), None) => return Err(TlsError::CertWithoutKey { cert: cert.clone() }),
        (None, Some(key)) => return Err(TlsError::KeyWithoutCert { key: key.clone() }),
    };
    let roots = pem::load_roots(&files.ca)?;
    let certified_key = identity
        .map(|(cert, key)| load_certified_key(&provider, cert, key))
        .transpose()?;
    // `with_root_certificates` verifies with the builder's provider's algorithms (ring).
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(config_error)?
        .with_root_certificates(roots);
    let config = match certified_key {
        Some(certified_key) => {
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)))
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name the dialer verifies the server's certificate against: the peer's configured node
/// name (e.g. `hub`), not the address dialed. Addresses change (DHCP, containers, NAT) while
/// the node name is what the cluster's CA vouched for, so a certificate proves "this is `hub`"
/// wherever `hub` is reached.
pub fn server_name(peer_name: &str) -> Result<ServerName<'static>, TlsError> {
    DnsName::try_from(peer_name)
        .map(|name| ServerName::DnsName(name.to_owned()))
        .map_err(|_| TlsError::InvalidPeerName {
            name: peer_name.to_owned(),
        })
}

/// Wraps a server configuration for accepting TLS on tokio streams.
pub fn acceptor(config: Arc<ServerConfig>) -> tokio_rustls::TlsAcceptor {
    tokio_rustls::TlsAcceptor::from(config)
}

/// Wraps a client configuration for dialing TLS on tokio streams; pair it with [`server_name`].
pub fn connector(config: Arc<ClientConfig>) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(config)
}
