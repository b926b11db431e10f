//! dtable-server health: `GET` its health URL (`/ping/`) and expect `pong`.
//!
//! A minimal HTTP/1.1 client over a TCP stream (plain `http://` only: the servers sit
//! on the private network next to the proxy), bounded in time and size.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// `GET url` → (status, body).
async fn get(url: &str) -> Result<(u16, String), String> {
    request("GET", url, &[]).await
}

/// `METHOD url` with extra headers and no body → (status, body). Plain `http://` only.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
) -> Result<(u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}` is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut conn = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
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
    conn.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read from {addr}: {e}"))?;
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
