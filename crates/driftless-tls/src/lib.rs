//! TLS for driftless peer links: rustls configurations built from PEM files, the node name a
//! verified peer certificate vouches for, and a throwaway PKI for tests and demos.
//!
//! # Design
//!
//! - **The ring provider is installed explicitly.** Every configuration is built with
//!   `builder_with_provider(ring::default_provider())` and rustls's safe default protocol
//!   versions. Nothing relies on a process-wide default provider, so the node never has to call
//!   `install_default` first, and another crate in the same binary choosing a different default
//!   cannot change, or panic, our configuration. rustls is built without aws-lc-rs.
//! - **One CA per side, never system roots.** The dialer trusts only the configured CA: a peer
//!   link stays inside one cluster, and a public CA vouching for a host name says nothing about
//!   cluster membership. The listener, given `client_ca`, requires a client certificate that
//!   chains to it (mutual TLS); without it, it asks for none.
//! - **Server name = peer name.** The dialer verifies the server's certificate against the
//!   peer's configured node *name* ([`server_name`], e.g. `hub`), not the address it dialed.
//!   Addresses change and are often loopback, NAT or container addresses; the name is what the
//!   cluster's CA vouched for. So node certificates carry their name as a DNS subject alternative
//!   name, and [`TestPki::issue`] writes exactly that.
//! - **Identity from the certificate.** On the listener, [`peer_identity`] reads the node name of
//!   the verified client certificate (first DNS SAN, else subject CN), so the node can check that
//!   the peer is who its handshake claims to be. It reads; it never decides trust.
//! - **Errors name the file.** Files are read and checked when the configuration is built, with
//!   [`TlsError`] naming the file and the problem (missing, not PEM, no certificate, no key, key
//!   not matching the certificate, empty CA, ...), so a misconfiguration fails at startup and
//!   not at the first handshake on the other node.
//!
//! # Use
//!
//! ```no_run
//! # fn main() -> Result<(), driftless_tls::TlsError> {
//! use driftless_tls::{ClientTlsFiles, ServerTlsFiles, TestPki};
//! let pki = TestPki::new(std::path::Path::new("/tmp/driftless-pki"))?;
//! let (hub_cert, hub_key) = pki.issue("hub")?;
//! let (edge_cert, edge_key) = pki.issue("edge-1")?;
//! let server = driftless_tls::server_config(&ServerTlsFiles {
//!     cert: hub_cert,
//!     key: hub_key,
//!     client_ca: Some(pki.ca_path()),
//! })?;
//! let client = driftless_tls::client_config(&ClientTlsFiles {
//!     ca: pki.ca_path(),
//!     cert: Some(edge_cert),
//!     key: Some(edge_key),
//! })?;
//! let acceptor = driftless_tls::acceptor(server);
//! let connector = driftless_tls::connector(client);
//! let hub = driftless_tls::server_name("hub")?;
//! // connector.connect(hub, tcp_stream).await, acceptor.accept(tcp_stream).await, then
//! // driftless_tls::peer_identity(tls_stream.get_ref().1) on the accepted side.
//! # let _ = (acceptor, connector, hub);
//! # Ok(())
//! # }
//! ```
//!
//! Architecture invariant: no sockets, no tasks, no process-global state. This crate builds
//! configurations; the node owns the connections.

mod config;
mod error;
mod identity;
mod pem;
mod test_pki;

pub use config::{
    ClientTlsFiles, ServerTlsFiles, acceptor, client_config, connector, server_config, server_name,
};
pub use error::TlsError;
pub use identity::{certificate_identity, peer_identity};
pub use pem::PEM_FILE_BYTES_MAX;
pub use test_pki::TestPki;

// Re-exported so the node names exactly the versions these configurations are built with.
pub use rustls;
pub use tokio_rustls;
