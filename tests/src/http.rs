//! A tiny blocking HTTP/1.1 client over [`TcpStream`], with keep-alive reuse,
//! timeouts on every read and write, and a raw-bytes view of upgraded
//! (websocket) connections. Also the message parsing the echo upstream uses.
//!
//! It is deliberately small: enough to see exactly what a proxy sends and
//! answers, nothing a test does not need.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Read/write timeout of the client's sockets.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

const MAX_LINE: usize = 64 * 1024;
const MAX_HEADERS: usize = 256;
const MAX_BODY: usize = 64 * 1024 * 1024;

/// An HTTP response as received. Header names are lowercased, in arrival order.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The body as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; the error shows the status and body.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "response body is not JSON (status {}): {:?}",
                self.status,
                self.text()
            )
        })
    }
}

pub(crate) fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One client connection; send several requests on it to test keep-alive.
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    peer: SocketAddr,
    /// Requests completed on this connection.
    pub requests: usize,
}

impl Connection {
    /// Connects to `addr` with connect/read/write timeouts of [`IO_TIMEOUT`].
    pub fn open(addr: SocketAddr) -> Result<Connection> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .with_context(|| format!("connect to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        Ok(Connection {
            reader: BufReader::new(stream),
            writer,
            peer: addr,
            requests: 0,
        })
    }

    /// The address this connection was opened to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The local address (port) of this connection: the same value across
    /// requests proves they shared one TCP connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.writer.local_addr()?)
    }

    /// `GET path` with extra `headers` on this connection.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
        self.request("GET", path, headers, &[])
    }

    /// Sends one request and reads its response. Adds `Host` and
    /// `Content-Length` unless given. The connection stays usable unless
    /// the response said `Connection: close`.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response> {
        self.send_head(method, path, headers, Some(body.len()))?;
        self.writer.write_all(body)?;
        self.writer.flush()?;
        let head = read_head(&mut self.reader)?
            .ok_or_else(|| anyhow!("{}: connection closed before a response", self.peer))?;
        let (status, headers) = parse_status(&head)?;
        let body = read_response_body(&mut self.reader, method, status, &headers)
            .with_context(|| format!("reading the body of {method} {path}"))?;
        self.requests += 1;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn send_head(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        content_length: Option<usize>,
    ) -> Result<()> {
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        let has = |n: &str| headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(n));
        if !has("host") {
            head.push_str(&format!("Host: {}\r\n", self.peer));
        }
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(len) = content_length
            && !has("content-length")
            && !has("transfer-encoding")
            && (len > 0 || matches!(method, "POST" | "PUT" | "PATCH"))
        {
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        head.push_str("\r\n");
        self.writer
            .write_all(head.as_bytes())
            .with_context(|| format!("send {method} {path} to {}", self.peer))?;
        Ok(())
    }

    /// Sends a websocket upgrade request for `path` and reads the response
    /// head. On `101` the returned [`Upgraded`] carries the raw byte stream
    /// (with anything the server sent right after its head); on any other
    /// status, the error shows the response.
    pub fn upgrade_websocket(
        mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Response, Upgraded)> {
        let key = "dGhlIHNhbXBsZSBub25jZQ=="; // RFC 6455's sample nonce
        let mut all: Vec<(&str, &str)> = vec![
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key),
        ];
        all.extend_from_slice(headers);
        self.send_head("GET", path, &all, None)?;
        self.writer.flush()?;
        let head = read_head(&mut self.reader)?
            .ok_or_else(|| anyhow!("{}: connection closed before a response", self.peer))?;
        let (status, resp_headers) = parse_status(&head)?;
        if status != 101 {
            let body = read_response_body(&mut self.reader, "GET", status, &resp_headers)
                .unwrap_or_default();
            bail!(
                "websocket upgrade of {path} answered {status} {:?}: {}",
                resp_headers,
                String::from_utf8_lossy(&body)
            );
        }
        let expected = crate::websocket_accept(key);
        let got = find_header(&resp_headers, "sec-websocket-accept");
        if got != Some(expected.as_str()) {
            bail!("Sec-WebSocket-Accept is {got:?}, expected {expected:?}");
        }
        Ok((
            Response {
                status,
                headers: resp_headers,
                body: Vec::new(),
            },
            Upgraded {
                reader: self.reader,
                writer: self.writer,
            },
        ))
    }
}

/// The raw byte stream of a connection after `101 Switching Protocols`.
pub struct Upgraded {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Upgraded {
    /// Reads one `\n`-terminated line (without the newline).
    pub fn read_line(&mut self) -> Result<String> {
        let line = read_line(&mut self.reader)?.ok_or_else(|| anyhow!("upgraded stream closed"))?;
        Ok(line)
    }

    /// Writes `bytes` and flushes.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads exactly `n` bytes.
    pub fn read_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }
}

/// One-shot `GET` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Response> {
    Connection::open(addr)?.get(path, headers)
}

/// One-shot `POST path` of the JSON `body` with `Authorization: Bearer TOKEN`: the
/// status and the JSON answer.
pub fn post_json(addr: SocketAddr, path: &str, token: &str, body: &Value) -> Result<(u16, Value)> {
    let auth = format!("Bearer {token}");
    let r = Connection::open(addr)?.request(
        "POST",
        path,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )?;
    Ok((r.status, r.json()?))
}

/// One-shot `GET path` with `Authorization: Bearer TOKEN`, its answer as JSON.
pub fn get_json(addr: SocketAddr, path: &str, token: &str) -> Result<Value> {
    let auth = format!("Bearer {token}");
    get(addr, path, &[("authorization", auth.as_str())])?.json()
}

/// Reads one line, without its `\r\n` or `\n`. `None` on EOF before any byte.
pub(crate) fn read_line<R: BufRead>(r: &mut R) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if n > MAX_LINE {
                "line too long"
            } else {
                "unexpected EOF in a line"
            },
        ));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// The start line and the header fields of one message (names lowercased).
pub(crate) struct Head {
    pub start: String,
    pub headers: Vec<(String, String)>,
}

/// Reads a message head. `None` on EOF before the first byte (an idle
/// keep-alive connection closed by the peer).
pub(crate) fn read_head<R: BufRead>(r: &mut R) -> io::Result<Option<Head>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "EOF in headers"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "too many headers",
            ));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "header without ':'"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Some(Head { start, headers }))
}

fn parse_status(head: &Head) -> Result<(u16, Vec<(String, String)>)> {
    let mut parts = head.start.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {:?}", head.start);
    }
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {:?}", head.start))?;
    Ok((status, head.headers.clone()))
}

/// Reads a body framed by `Transfer-Encoding: chunked` or `Content-Length`;
/// `None` when neither is present.
pub(crate) fn read_framed_body<R: BufRead>(
    r: &mut R,
    headers: &[(String, String)],
) -> io::Result<Option<Vec<u8>>> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    if find_header(headers, "transfer-encoding").is_some_and(|te| te.contains("chunked")) {
        let mut body = Vec::new();
        loop {
            let line = read_line(r)?.ok_or_else(|| invalid("EOF in chunk size"))?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
            if body.len() + size > MAX_BODY {
                return Err(invalid("body too large"));
            }
            if size == 0 {
                // trailers, up to the empty line
                while !read_line(r)?
                    .ok_or_else(|| invalid("EOF in trailers"))?
                    .is_empty()
                {}
                return Ok(Some(body));
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            if !read_line(r)?
                .ok_or_else(|| invalid("EOF after chunk"))?
                .is_empty()
            {
                return Err(invalid("chunk not followed by CRLF"));
            }
        }
    }
    if let Some(len) = find_header(headers, "content-length") {
        let len: usize = len.parse().map_err(|_| invalid("bad content-length"))?;
        if len > MAX_BODY {
            return Err(invalid("body too large"));
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body)?;
        return Ok(Some(body));
    }
    Ok(None)
}

fn read_response_body<R: BufRead>(
    r: &mut R,
    method: &str,
    status: u16,
    headers: &[(String, String)],
) -> io::Result<Vec<u8>> {
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    if let Some(body) = read_framed_body(r, headers)? {
        return Ok(body);
    }
    // Neither length nor chunking: the body ends when the server closes.
    let mut body = Vec::new();
    r.take(MAX_BODY as u64).read_to_end(&mut body)?;
    Ok(body)
}

/// An HTTPS client configuration (ureq) that trusts the CA in the PEM file `ca` and
/// nothing else; the caller adds its own settings and builds it.
pub fn https_client(
    ca: &std::path::Path,
) -> Result<ureq::config::ConfigBuilder<ureq::typestate::AgentScope>> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item? {
            certs.push(c);
        }
    }
    let roots = ureq::tls::RootCerts::new_with_certs(&certs);
    Ok(ureq::Agent::config_builder()
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build()))
}
