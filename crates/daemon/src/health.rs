//! dtable-server health: `GET` its health URL (`/ping/`) and expect `pong`; and the
//! HTTP restart hooks' calls.
//!
//! A minimal HTTP/1.1 client, bounded in time and size: plain `http://` (health URLs,
//! on the private network next to the proxy), or `https://` for a hook (rustls, the
//! server's certificate verified for the URL's host; see [`crate::tls`]).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

/// The largest answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// One health check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    /// Answered `200` with a body of `pong`.
    pub up: bool,
    pub url: String,
    /// How long the check took, ms.
    pub elapsed_ms: u64,
    /// Why it is not up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Checks `url` within `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Health {
    let start = Instant::now();
    let result = match tokio::time::timeout(timeout, get(url)).await {
        Ok(Ok((200, body))) if body.trim() == "pong" => Ok(()),
        Ok(Ok((200, body))) => Err(format!(
            "answered 200 but not `pong`: {:?}",
            body.chars().take(80).collect::<String>()
        )),
        Ok(Ok((status, _))) => Err(format!("answered {status}")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    Health {
        up: result.is_ok(),
        url: url.to_owned(),
        elapsed_ms: start.elapsed().as_millis() as u64,
        error: result.err(),
    }
}

/// `GET url` → (status, body). Plain `http://` only.
async fn get(url: &str) -> Result<(u16, String), String> {
    if !url.starts_with("http://") {
        return Err(format!("`{url}` is not an http:// URL"));
    }
    request("GET", url, &[], None).await
}

/// `METHOD url` with extra headers and no body → (status, body). `http://`, or
/// `https://` with the server's certificate checked for the URL's host against `ca`
/// (PEM), or without it the webpki roots. Errors hold no header value.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    ca: Option<&Path>,
) -> Result<(u16, String), String> {
    let (tls, rest) = match url.split_once("://") {
        Some(("http", rest)) => (false, rest),
        Some(("https", rest)) => (true, rest),
        _ => return Err(format!("`{url}` is not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    // A port is what follows the last `:` outside an IPv6 literal's brackets.
    let (host, addr) = match authority.rsplit_once(':') {
        Some((host, _)) if !authority.ends_with(']') => (host, authority.to_owned()),
        _ => (
            authority,
            format!("{authority}:{}", if tls { 443 } else { 80 }),
        ),
    };
    let request = request_head(method, authority, path, headers)?;
    let conn = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    if !tls {
        return exchange(conn, &request, &addr).await;
    }
    let config = crate::tls::hook_client_config(ca).map_err(|e| e.to_string())?;
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|_| format!("`{host}` is not a host name or IP address for TLS"))?
        .to_owned();
    let conn = TlsConnector::from(config)
        .connect(name, conn)
        .await
        .map_err(|e| {
            let trust = match ca {
                Some(ca) => format!("the CA {}", ca.display()),
                None => "the webpki roots (set the hook's `ca` for a private CA)".to_owned(),
            };
            format!("TLS handshake with {addr} (its certificate checked against {trust}): {e}")
        })?;
    exchange(conn, &request, &addr).await
}

/// The request's head: no body, the connection closed after the answer.
fn request_head(
    method: &str,
    authority: &str,
    path: &str,
    headers: &[(String, String)],
) -> Result<Vec<u8>, String> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: seashard\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        if k.contains(['\r', '\n']) || v.contains(['\r', '\n']) {
            return Err(format!("header `{k}` holds a line break"));
        }
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" && method != "HEAD" {
        request.push_str("Content-Length: 0\r\n");
    }
    request.push_str("\r\n");
    Ok(request.into_bytes())
}

/// Sends `request` on `conn` and reads the whole answer (until the peer closes).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    request: &[u8],
    addr: &str,
) -> Result<(u16, String), String> {
    conn.write_all(request)
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    conn.flush()
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match conn.read(&mut chunk).await {
            Ok(n) => n,
            // A TLS peer that closes without close_notify, after its answer.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => 0,
            Err(e) => return Err(format!("read from {addr}: {e}")),
        };
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_ANSWER {
            return Err(format!("{addr} answered more than {MAX_ANSWER} bytes"));
        }
    }
    parse(&buf)
}

/// Status and body of a complete HTTP/1.x answer (chunked bodies decoded).
fn parse(answer: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("the answer has no complete head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("the answer has no status line")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        let (Some(chunk), Some(after)) = (rest.get(..n), rest.get(n..)) else {
            break;
        };
        if n == 0 {
            break;
        }
        out.push_str(chunk);
        s = after.trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn serve_once(answer: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut c, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).await;
            c.write_all(answer.as_bytes()).await.unwrap();
        });
        format!("http://{addr}/ping/")
    }

    #[tokio::test]
    async fn pong_is_up_anything_else_is_not() {
        let url = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong").await;
        assert!(check(&url, Duration::from_secs(2)).await.up);
        let url = serve_once(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\npong\r\n0\r\n\r\n",
        )
        .await;
        assert!(check(&url, Duration::from_secs(2)).await.up);
        let url = serve_once("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n").await;
        let h = check(&url, Duration::from_secs(2)).await;
        assert!(!h.up);
        assert_eq!(h.error.as_deref(), Some("answered 502"));
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let h = check(&format!("http://{closed}/ping/"), Duration::from_secs(2)).await;
        assert!(!h.up && h.error.unwrap().contains("connect"));
    }
}

#[cfg(test)]
mod https_tests {
    use super::*;
    use crate::tls::ApiTls;
    use tokio::net::TcpListener;

    const SECRET: &str = "Bearer hook-secret-0123456789";

    /// A CA and a certificate for 127.0.0.1 signed by it, in `dir`.
    fn pki(dir: &Path) -> ApiTls {
        certs::init(dir, None, 1, false).unwrap();
        let w = certs::server(dir, "agent", &["127.0.0.1".to_owned()], 1, false).unwrap();
        ApiTls {
            cert: w.cert,
            key: w.key,
        }
    }

    /// An HTTPS server answering every request `200 pong`; sends each request
    /// head it read on the channel.
    async fn serve(tls: &ApiTls) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::api_server_config(tls).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                let Ok(mut c) = acceptor.accept(c).await else {
                    continue;
                };
                let mut buf = [0u8; 2048];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = c
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong",
                    )
                    .await;
                let _ = c.shutdown().await;
            }
        });
        (port, rx)
    }

    fn auth() -> Vec<(String, String)> {
        vec![("authorization".to_owned(), SECRET.to_owned())]
    }

    #[tokio::test]
    async fn https_is_verified_against_the_ca_or_refused_without_a_secret() {
        let dir = tempfile::tempdir().unwrap();
        let tls = pki(dir.path());
        let other = tempfile::tempdir().unwrap();
        certs::init(other.path(), None, 1, false).unwrap();
        let (port, mut heads) = serve(&tls).await;
        let url = format!("https://127.0.0.1:{port}/restart");
        let ca = dir.path().join("ca.crt");

        let (status, body) = request("POST", &url, &auth(), Some(&ca)).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "pong"));
        let head = heads.recv().await.unwrap();
        assert!(head.starts_with("POST /restart HTTP/1.1\r\n"), "{head}");
        assert!(
            head.contains(SECRET),
            "the header reached the server: {head}"
        );

        // Another CA, the webpki roots, a name the certificate does not carry: the
        // handshake fails, the request (and its header) is never sent.
        let localhost = format!("https://localhost:{port}/restart");
        for (url, ca, says) in [
            (
                &url,
                Some(other.path().join("ca.crt")),
                "checked against the CA",
            ),
            (&url, None, "the webpki roots"),
            (&localhost, Some(ca.clone()), "not valid for name"),
        ] {
            let err = request("POST", url, &auth(), ca.as_deref())
                .await
                .unwrap_err();
            assert!(err.contains("TLS handshake with"), "{err}");
            assert!(err.contains("invalid peer certificate"), "{err}");
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("hook-secret"), "{err}");
        }
        assert!(
            heads.try_recv().is_err(),
            "a request passed a failed handshake"
        );

        // A CA file that is not one: named, its content never shown.
        let bad = dir.path().join("agent.key");
        let err = request("POST", &url, &auth(), Some(&bad))
            .await
            .unwrap_err();
        assert!(
            err.contains("agent.key") && !err.contains("PRIVATE"),
            "{err}"
        );
        // Plain HTTP to the TLS port gets no answer it could take for one.
        let err = request("POST", &format!("http://127.0.0.1:{port}/"), &[], None).await;
        assert!(!matches!(err, Ok((200, _))), "{err:?}");
    }
}
