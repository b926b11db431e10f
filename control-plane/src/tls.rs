//! TLS for the control plane's two listeners, on the `daemon` crate's TLS: the HTTP
//! API over HTTPS (`[api.tls]`, [`api_server_config`]), ADS over mutual TLS
//! (`[listen.tls]`: a client certificate signed by `client_ca` is required before
//! any gRPC byte is read, [`ads_server_config`]); tonic reads the peer's
//! certificates from the established stream for [`crate::identity`].

use std::sync::Arc;

pub use daemon::tls::{
    ApiTls, HANDSHAKE_TIMEOUT, TlsError, TlsIncoming, TlsStream, api_server_config,
    hook_client_config, incoming, read_certs, read_key,
};
use tokio_rustls::rustls::ServerConfig;

use crate::config::ListenTls;

/// ADS's server configuration: HTTP/2, a client certificate signed by `client_ca`
/// required.
pub fn ads_server_config(t: &ListenTls) -> Result<Arc<ServerConfig>, TlsError> {
    daemon::tls::server_config("[listen.tls]", &t.cert, &t.key, Some(&t.client_ca), b"h2")
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
    use std::path::Path;

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
