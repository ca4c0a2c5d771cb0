//! Real handshakes over loopback TCP between configurations built from PEM files, and the
//! error messages for every kind of bad file.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use driftless_tls::rustls::{ClientConfig, ServerConfig};
use driftless_tls::{ClientTlsFiles, ServerTlsFiles, TestPki, TlsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Upper bound on one side of one exchange: a refused handshake must fail, not hang the suite.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory under the target's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "driftless-tls-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the accepting side saw: the client's bytes and the client's certificate identity.
#[derive(Debug)]
struct Accepted {
    received: Vec<u8>,
    identity: Option<String>,
}

/// One accept and one dial over 127.0.0.1: the client sends `ping`, the server answers `pong`.
/// Returns each side's outcome; an error on either side means the link was refused.
async fn exchange(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    server_name: &str,
) -> (io::Result<Accepted>, io::Result<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = driftless_tls::acceptor(server);
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let identity = driftless_tls::peer_identity(tls.get_ref().1);
        let mut received = [0u8; 4];
        tls.read_exact(&mut received).await?;
        tls.write_all(b"pong").await?;
        tls.shutdown().await?;
        Ok(Accepted {
            received: received.to_vec(),
            identity,
        })
    });

    let connector = driftless_tls::connector(client);
    let name = driftless_tls::server_name(server_name).unwrap();
    let client_side = async move {
        let tcp = TcpStream::connect(address).await?;
        let mut tls = connector.connect(name, tcp).await?;
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        // With TLS 1.3 the client finishes its handshake before the server has checked the
        // client certificate, so a refusal may only surface here, as an alert or a closed link.
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        Ok(answer)
    };
    let client_result = tokio::time::timeout(EXCHANGE_TIMEOUT, client_side)
        .await
        .expect("client side timed out");
    let server_result = tokio::time::timeout(EXCHANGE_TIMEOUT, server_side)
        .await
        .expect("server side timed out")
        .expect("server task panicked");
    (server_result, client_result)
}

fn server_files(pki: &TestPki, name: &str, mutual: bool) -> ServerTlsFiles {
    let (cert, key) = pki.issue(name).unwrap();
    ServerTlsFiles {
        cert,
        key,
        client_ca: mutual.then(|| pki.ca_path()),
    }
}

fn client_files(ca: &TestPki, identity: Option<(&TestPki, &str)>) -> ClientTlsFiles {
    let (cert, key) = match identity {
        Some((issuer, name)) => {
            let (cert, key) = issuer.issue(name).unwrap();
            (Some(cert), Some(key))
        }
        None => (None, None),
    };
    ClientTlsFiles {
        ca: ca.ca_path(),
        cert,
        key,
    }
}

/// Both sides failed, and the side that detected the problem reported `cause` (a rustls error
/// name), so the test cannot pass for an unrelated reason such as a closed socket.
fn assert_refused(outcome: (io::Result<Accepted>, io::Result<Vec<u8>>), cause: &str) {
    let (server, client) = outcome;
    let (Err(server), Err(client)) = (&server, &client) else {
        panic!("expected refusal ({cause}), got server {server:?}, client {client:?}");
    };
    let errors = format!("server: {server:?}; client: {client:?}");
    assert!(errors.contains(cause), "expected {cause}, got {errors}");
}

#[tokio::test]
async fn tls_server_certificate_verified_and_bytes_flow() {
    let dir = TempDir::new("tls");
    let pki = TestPki::new(dir.path()).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", false)).unwrap();
    let client = driftless_tls::client_config(&client_files(&pki, None)).unwrap();

    let (server, client) = exchange(server, client, "hub").await;
    let accepted = server.unwrap();
    assert_eq!(accepted.received, b"ping");
    assert_eq!(
        accepted.identity, None,
        "no client certificate was asked for"
    );
    assert_eq!(client.unwrap(), b"pong");
}

#[tokio::test]
async fn server_name_must_match_the_certificate() {
    let dir = TempDir::new("name");
    let pki = TestPki::new(dir.path()).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", false)).unwrap();
    let client = driftless_tls::client_config(&client_files(&pki, None)).unwrap();

    // Same CA, but the dialer expects node `edge-9` and reached `hub`.
    assert_refused(exchange(server, client, "edge-9").await, "NotValidForName");
}

#[tokio::test]
async fn mutual_tls_reports_client_node_name() {
    let dir = TempDir::new("mtls");
    let pki = TestPki::new(dir.path()).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", true)).unwrap();
    let client = driftless_tls::client_config(&client_files(&pki, Some((&pki, "edge-1")))).unwrap();

    let (server, client) = exchange(server, client, "hub").await;
    let accepted = server.unwrap();
    assert_eq!(accepted.received, b"ping");
    assert_eq!(accepted.identity.as_deref(), Some("edge-1"));
    assert_eq!(client.unwrap(), b"pong");
}

#[tokio::test]
async fn client_trusting_another_ca_refuses_the_server() {
    let dir = TempDir::new("other-ca");
    let pki = TestPki::new(&dir.path().join("cluster")).unwrap();
    let stranger = TestPki::new(&dir.path().join("stranger")).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", false)).unwrap();
    let client = driftless_tls::client_config(&client_files(&stranger, None)).unwrap();

    assert_refused(exchange(server, client, "hub").await, "UnknownIssuer");
}

#[tokio::test]
async fn mutual_tls_refuses_client_without_certificate() {
    let dir = TempDir::new("no-client-cert");
    let pki = TestPki::new(dir.path()).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", true)).unwrap();
    let client = driftless_tls::client_config(&client_files(&pki, None)).unwrap();

    assert_refused(
        exchange(server, client, "hub").await,
        "NoCertificatesPresented",
    );
}

#[tokio::test]
async fn mutual_tls_refuses_client_certificate_from_another_ca() {
    let dir = TempDir::new("foreign-client");
    let pki = TestPki::new(&dir.path().join("cluster")).unwrap();
    let stranger = TestPki::new(&dir.path().join("stranger")).unwrap();
    let server = driftless_tls::server_config(&server_files(&pki, "hub", true)).unwrap();
    // Trusts the right CA for the server, but its own certificate comes from another CA.
    let client =
        driftless_tls::client_config(&client_files(&pki, Some((&stranger, "edge-1")))).unwrap();

    assert_refused(exchange(server, client, "hub").await, "UnknownIssuer");
}

// ---- bad files: every error names the file ----

struct BadFiles {
    _dir: TempDir,
    pki: TestPki,
    cert: PathBuf,
    key: PathBuf,
    other_key: PathBuf,
    dir: PathBuf,
}

impl BadFiles {
    fn new(label: &str) -> BadFiles {
        let dir = TempDir::new(label);
        let pki = TestPki::new(dir.path()).unwrap();
        let (cert, key) = pki.issue("hub").unwrap();
        let (_, other_key) = pki.issue("edge-1").unwrap();
        BadFiles {
            dir: dir.path().to_path_buf(),
            _dir: dir,
            pki,
            cert,
            key,
            other_key,
        }
    }

    fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn server(&self, cert: &Path, key: &Path, client_ca: Option<&Path>) -> TlsError {
        driftless_tls::server_config(&ServerTlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
        })
        .expect_err("configuration should be refused")
    }
}

/// The error's message mentions `path`, and the error is the expected kind.
fn assert_names(error: &TlsError, path: &Path, kind: fn(&TlsError) -> bool) {
    let message = error.to_string();
    assert!(kind(error), "unexpected error kind: {error:?}");
    assert!(
        message.contains(&path.display().to_string()),
        "message {message:?} does not name {}",
        path.display()
    );
}

#[test]
fn missing_file() {
    let files = BadFiles::new("missing");
    let missing = files.dir.join("nope.pem");
    let error = files.server(&missing, &files.key, None);
    assert_names(&error, &missing, |e| {
        matches!(e, TlsError::FileMissing { .. })
    });
    assert!(error.to_string().contains("not found"));
}

#[test]
fn directory_instead_of_file() {
    let files = BadFiles::new("directory");
    let error = files.server(&files.dir, &files.key, None);
    assert_names(&error, &files.dir, |e| {
        matches!(e, TlsError::FileRead { .. })
    });
}

#[test]
fn oversized_file() {
    let files = BadFiles::new("oversized");
    let huge = vec![b'#'; driftless_tls::PEM_FILE_BYTES_MAX as usize + 1];
    let path = files.write("huge.pem", &huge);
    let error = files.server(&path, &files.key, None);
    assert_names(&error, &path, |e| {
        matches!(e, TlsError::FileTooLarge { .. })
    });
}

#[test]
fn malformed_pem() {
    let files = BadFiles::new("malformed");
    let path = files.write(
        "broken.pem",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n(no end marker)\n",
    );
    let error = files.server(&path, &files.key, None);
    assert_names(&error, &path, |e| matches!(e, TlsError::Pem { .. }));
}

#[test]
fn no_certificate_in_pem() {
    let files = BadFiles::new("no-cert");
    // A key file given where the certificate belongs.
    let error = files.server(&files.key, &files.key, None);
    assert_names(&error, &files.key, |e| {
        matches!(e, TlsError::NoCertificate { .. })
    });
}

#[test]
fn certificate_that_is_not_x509() {
    let files = BadFiles::new("bad-cert");
    let path = files.write(
        "garbage.pem",
        b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    );
    let error = files.server(&path, &files.key, None);
    assert_names(&error, &path, |e| {
        matches!(e, TlsError::BadCertificate { .. })
    });
}

#[test]
fn no_private_key_in_pem() {
    let files = BadFiles::new("no-key");
    // A certificate file given where the key belongs.
    let error = files.server(&files.cert, &files.cert, None);
    assert_names(&error, &files.cert, |e| {
        matches!(e, TlsError::NoPrivateKey { .. })
    });
}

#[test]
fn unusable_private_key() {
    let files = BadFiles::new("bad-key");
    let path = files.write(
        "garbage.key",
        b"-----BEGIN PRIVATE KEY-----\nAAECAwQF\n-----END PRIVATE KEY-----\n",
    );
    let error = files.server(&files.cert, &path, None);
    assert_names(&error, &path, |e| matches!(e, TlsError::BadKey { .. }));
}

#[test]
fn key_of_another_certificate() {
    let files = BadFiles::new("mismatch");
    let error = files.server(&files.cert, &files.other_key, None);
    assert_names(&error, &files.other_key, |e| {
        matches!(e, TlsError::KeyMismatch { .. })
    });
    assert_names(&error, &files.cert, |_| true);
}

#[test]
fn ca_without_certificates() {
    let files = BadFiles::new("empty-ca");
    let empty = files.write("empty-ca.pem", b"");
    let error = files.server(&files.cert, &files.key, Some(&empty));
    assert_names(&error, &empty, |e| {
        matches!(e, TlsError::CaHasNoCertificates { .. })
    });

    let client_error = driftless_tls::client_config(&ClientTlsFiles {
        ca: files.key.clone(),
        cert: None,
        key: None,
    })
    .expect_err("a key file is no CA");
    assert_names(&client_error, &files.key, |e| {
        matches!(e, TlsError::CaHasNoCertificates { .. })
    });
}

#[test]
fn client_certificate_and_key_come_together() {
    let files = BadFiles::new("half-identity");
    let cert_only = driftless_tls::client_config(&ClientTlsFiles {
        ca: files.pki.ca_path(),
        cert: Some(files.cert.clone()),
        key: None,
    })
    .expect_err("certificate without key");
    assert_names(&cert_only, &files.cert, |e| {
        matches!(e, TlsError::CertWithoutKey { .. })
    });

    let key_only = driftless_tls::client_config(&ClientTlsFiles {
        ca: files.pki.ca_path(),
        cert: None,
        key: Some(files.key.clone()),
    })
    .expect_err("key without certificate");
    assert_names(&key_only, &files.key, |e| {
        matches!(e, TlsError::KeyWithoutCert { .. })
    });
}

#[test]
fn client_side_file_errors_name_the_file() {
    let files = BadFiles::new("client-files");
    let missing_ca = files.dir.join("no-such-ca.pem");
    let error = driftless_tls::client_config(&ClientTlsFiles {
        ca: missing_ca.clone(),
        cert: None,
        key: None,
    })
    .expect_err("missing CA");
    assert_names(&error, &missing_ca, |e| {
        matches!(e, TlsError::FileMissing { .. })
    });

    let error = driftless_tls::client_config(&ClientTlsFiles {
        ca: files.pki.ca_path(),
        cert: Some(files.cert.clone()),
        key: Some(files.other_key.clone()),
    })
    .expect_err("mismatched client identity");
    assert_names(&error, &files.other_key, |e| {
        matches!(e, TlsError::KeyMismatch { .. })
    });
}

#[test]
fn peer_names_must_be_dns_names() {
    let files = BadFiles::new("names");
    for bad in ["", "has space", "../escape", "a/b", "*"] {
        let error = files.pki.issue(bad).expect_err(bad);
        assert!(
            matches!(error, TlsError::InvalidPeerName { .. }),
            "{bad}: {error:?}"
        );
        assert!(driftless_tls::server_name(bad).is_err(), "{bad}");
    }
}
