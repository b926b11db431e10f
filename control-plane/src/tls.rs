//! TLS for both listeners (rustls with ring): the HTTP API over HTTPS (`[api.tls]`),
//! ADS over mutual TLS (`[listen.tls]`: a client certificate signed by `client_ca`
//! is required before any gRPC byte is read); and for the `https://` restart hooks'
//! client ([`hook_client_config`]).
//!
//! Handshakes run here, each in its own task with a deadline, so a client that
//! connects and never finishes its handshake holds up no one; a failed one is logged
//! (peer and reason) and counted. What the servers (axum, tonic) receive is an
//! established [`TlsStream`]; tonic reads the peer's certificates from it
//! (`Request::peer_certs`) for [`crate::identity`].

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

use crate::config::{ApiTls, ListenTls};

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

/// The HTTPS API's server configuration (HTTP/1.1).
pub fn api_server_config(t: &ApiTls) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&t.cert)?;
    let key = read_key(&t.key)?;
    check_pair(&certs, &key, "[api.tls]", &t.cert, &t.key)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("[api.tls]"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(pair_err("[api.tls]", &t.cert, &t.key))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// ADS's server configuration: HTTP/2, a client certificate signed by `client_ca`
/// required.
pub fn ads_server_config(t: &ListenTls) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(&t.cert)?;
    let key = read_key(&t.key)?;
    check_pair(&certs, &key, "[listen.tls]", &t.cert, &t.key)?;
    let mut roots = RootCertStore::empty();
    for ca in read_certs_as("client_ca", &t.client_ca)? {
        roots.add(ca).map_err(|e| TlsError::File {
            what: "client_ca",
            path: t.client_ca.clone(),
            message: format!("not a usable CA certificate ({e})"),
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(config_err("[listen.tls] client_ca"))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err("[listen.tls]"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(pair_err("[listen.tls]", &t.cert, &t.key))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
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

/// Loads every TLS file the configuration names, as `seactl serve` will at start
/// (for `seactl serve --check`).
pub fn check(config: &crate::Config) -> Result<(), TlsError> {
    if let Some(t) = &config.listen.tls {
        ads_server_config(t)?;
    }
    if let Some(t) = &config.api.tls {
        api_server_config(t)?;
    }
    for s in &config.servers {
        if let crate::RestartHook::Http { ca: Some(ca), .. } = &s.restart {
            hook_client_config(Some(ca))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example configuration's TLS sections, uncommented, are valid.
    #[test]
    fn the_example_tls_sections_parse() {
        let mut uncommenting = false;
        let text: String = include_str!("../seashard.example.toml")
            .lines()
            .map(|l| {
                if l.starts_with("# [listen.tls]") || l.starts_with("# [api.tls]") {
                    uncommenting = true;
                } else if !l.starts_with("# ") {
                    uncommenting = false;
                }
                let l = if uncommenting { &l[2..] } else { l };
                format!("{l}\n")
            })
            .collect();
        let c = crate::Config::parse(&text).unwrap();
        let listen = c.listen.tls.unwrap();
        assert_eq!(listen.client_ca, Path::new("tls/ca.crt"));
        assert!(listen.require_node_id_match);
        assert_eq!(c.api.tls.unwrap().cert, Path::new("tls/control-plane.crt"));
    }

    #[test]
    fn errors_name_the_file_and_never_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("x.key");
        let secret =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n";
        std::fs::write(&key, secret).unwrap();
        let cert = dir.path().join("x.crt");
        std::fs::write(&cert, "not pem").unwrap();
        let err = api_server_config(&ApiTls {
            cert: cert.clone(),
            key: key.clone(),
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("x.crt") && err.contains("no PEM certificate"),
            "{err}"
        );

        certs::init(dir.path(), None, 1, false).unwrap();
        let s = certs::server(dir.path(), "cp", &["127.0.0.1".into()], 1, false).unwrap();
        let err = api_server_config(&ApiTls {
            cert: s.cert.clone(),
            key: key.clone(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("x.key"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");
        // The server's key with the CA's certificate: refused, not served.
        let err = api_server_config(&ApiTls {
            cert: dir.path().join("ca.crt"),
            key: s.key.clone(),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("not the certificate's"), "{err}");
        api_server_config(&ApiTls {
            cert: s.cert.clone(),
            key: s.key.clone(),
        })
        .unwrap();
        ads_server_config(&ListenTls {
            cert: s.cert,
            key: s.key,
            client_ca: dir.path().join("ca.crt"),
            require_node_id_match: true,
        })
        .unwrap();
    }
}
