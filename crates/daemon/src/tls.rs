//! TLS (rustls with ring) for the daemons' listeners: an HTTPS API ([`ApiTls`], the
//! control plane's `[api.tls]` and the agent's `[tls]`), a listener that requires a
//! client certificate ([`server_config`] with a `client_ca`: the control plane's ADS);
//! and the `https://` restart hooks' client ([`hook_client_config`]).
//!
//! Handshakes run here, each in its own task with a deadline, so a client that
//! connects and never finishes its handshake holds up no one; a failed one is logged
//! (peer and reason) and counted by the caller. What the servers (axum, tonic)
//! receive is an established [`TlsStream`]; tonic reads the peer's certificates from
//! it (`Request::peer_certs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
pub use tokio_rustls::server::TlsStream;

use serde::{Deserialize, Serialize};

/// An HTTPS API's files (`[api.tls]`, the agent's `[tls]`). Paths are relative to
/// the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTls {
    /// The server certificate (PEM, chain after it).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener; more connections wait in the
/// kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;
/// Established connections not yet taken by the server.
const ACCEPTED_BUFFER: usize = 64;

/// TLS material that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {message}")]
    File {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what}: {message}")]
    Config { what: &'static str, message: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Every certificate in the PEM file `path` (a chain: leaf first).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_certs_as("certificate", path)
}

fn read_certs_as(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = |message: String| TlsError::File {
        what,
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| file(e.to_string()))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file(format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(file("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The private key in the PEM file `path`. Its content never appears in an error.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = |message: String| TlsError::File {
        what: "private key",
        path: path.to_owned(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| file(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        file("holds no PEM private key (PKCS#8, PKCS#1 or SEC1) that can be read".into())
    })
}

/// The HTTPS API's server configuration (HTTP/1.1, no client certificate).
pub fn api_server_config(t: &ApiTls) -> Result<Arc<ServerConfig>, TlsError> {
    server_config("[api.tls]", &t.cert, &t.key, None, b"http/1.1")
}

/// A server configuration with `cert` and `key` offering the one protocol `alpn`;
/// with `client_ca`, a client certificate signed by it is required. `section` names
/// the configuration section in errors.
pub fn server_config(
    section: &'static str,
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    alpn: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let private = read_key(key)?;
    check_pair(&certs, &private, section, cert, key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err(section))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs_as("client_ca", ca)? {
                roots.add(c).map_err(|e| TlsError::File {
                    what: "client_ca",
                    path: ca.to_owned(),
                    message: format!("not a usable CA certificate ({e})"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(config_err("client_ca"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, private)
        .map_err(pair_err(section, cert, key))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// An `https://` restart hook's client configuration (HTTP/1.1): the server's
/// certificate must chain to `ca` (PEM: one or more certificates), or without it
/// to the webpki (Mozilla) roots.
pub fn hook_client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let what = "restart hook";
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs_as("CA", path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    what: "CA",
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err(what))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Refuses a key that is not the certificate's (rustls cannot tell for every key
/// type, and would only fail at the first handshake). Key types rcgen cannot read
/// are left to rustls.
fn check_pair(
    certs: &[CertificateDer<'_>],
    key: &PrivateKeyDer<'_>,
    what: &'static str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), TlsError> {
    let (Some(leaf), Ok(pair)) = (certs.first(), rcgen::KeyPair::try_from(key)) else {
        return Ok(());
    };
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert))
            if cert.public_key().subject_public_key.data.as_ref() != pair.public_key_raw() =>
        {
            Err(pair_err(what, cert_path, key_path)(
                "the key is not the certificate's (they belong to different pairs)",
            ))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(pair_err(what, cert_path, key_path)(format!(
            "the certificate cannot be parsed: {e}"
        ))),
    }
}

fn pair_err<E: std::fmt::Display>(
    what: &'static str,
    cert: &Path,
    key: &Path,
) -> impl FnOnce(E) -> TlsError {
    let files = format!("cert {}, key {}", cert.display(), key.display());
    move |e| TlsError::Config {
        what,
        message: format!("{files}: {e}"),
    }
}

fn config_err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TlsError {
    move |e| TlsError::Config {
        what,
        message: e.to_string(),
    }
}

/// Connections of a TLS listener, handshake done. An axum [`axum::serve::Listener`];
/// [`TlsIncoming::into_stream`] gives tonic's `serve_with_incoming`.
pub struct TlsIncoming {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

/// Accepts on `listener` and runs every handshake with `config` in its own task;
/// `on_failure` is called for each failed or timed-out handshake. `what` names the
/// listener in logs. The accepting task ends when the [`TlsIncoming`] is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    what: &'static str,
    on_failure: impl Fn() + Send + Sync + 'static,
) -> std::io::Result<TlsIncoming> {
    let local = listener.local_addr()?;
    let (tx, accepted) = mpsc::channel(ACCEPTED_BUFFER);
    let acceptor = TlsAcceptor::from(config);
    let on_failure = Arc::new(on_failure);
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, as axum does.
                        tracing::debug!(listener = what, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx, on_failure) = (acceptor.clone(), tx.clone(), on_failure.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => {
                        on_failure();
                        tracing::warn!(listener = what, %peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        on_failure();
                        tracing::warn!(
                            listener = what,
                            %peer,
                            "TLS handshake not completed within {HANDSHAKE_TIMEOUT:?}: connection closed"
                        );
                    }
                }
            });
        }
    });
    Ok(TlsIncoming { accepted, local })
}

impl TlsIncoming {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The established connections as a stream, for tonic.
    pub fn into_stream(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
        use tokio_stream::StreamExt as _;
        tokio_stream::wrappers::ReceiverStream::new(self.accepted).map(|(s, _)| Ok(s))
    }
}

impl axum::serve::Listener for TlsIncoming {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(c) => c,
            // The accepting task is gone (the runtime stops): nothing comes any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
