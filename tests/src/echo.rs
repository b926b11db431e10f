//! The fake dtable-server: an HTTP/1.1 server (keep-alive, one thread per
//! connection) that tells in every answer who it is and what it received.
//!
//! - `GET /ping/` → `200 pong` (text), as a dtable-server answers;
//! - a request with `Upgrade: websocket` → `101 Switching Protocols` with the
//!   right `Sec-WebSocket-Accept`, then the line `NAME\n`, then every byte
//!   received is echoed back until the peer closes;
//! - anything else → `200` with the JSON body
//!   `{"server", "method", "path", "headers": {lowercased name: value}, "body",
//!   "peer"}` (`path` is the request target as received, query included;
//!   `peer` the client's address, which tells connections apart).
//!
//! Every response carries `x-served-by: NAME`.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use crate::http::{find_header, read_framed_body, read_head};

/// A connection idle for this long is closed (bounds the threads left behind
/// by proxies' pooled connections).
const IDLE: Duration = Duration::from_secs(120);

/// Serves `listener` forever, one thread per connection.
pub fn serve(name: &str, listener: TcpListener) -> io::Result<()> {
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("echo-upstream {name}: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let name = name.to_string();
        thread::spawn(move || {
            if let Err(e) = handle(&name, conn)
                && !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::UnexpectedEof
                )
            {
                eprintln!("echo-upstream {name}: {e}");
            }
        });
    }
    Ok(())
}

fn handle(name: &str, stream: TcpStream) -> io::Result<()> {
    let peer = stream.peer_addr()?.to_string();
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_write_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(()); // peer closed an idle connection
        };
        let mut parts = head.start.split(' ');
        let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => {
                (m.to_string(), t.to_string(), v.to_string())
            }
            _ => {
                writer.write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )?;
                return Ok(());
            }
        };
        let headers = head.headers;

        if find_header(&headers, "upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            let key = find_header(&headers, "sec-websocket-key").unwrap_or_default();
            let accept = crate::websocket_accept(key);
            write!(
                writer,
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                 sec-websocket-accept: {accept}\r\nx-served-by: {name}\r\n\r\n{name}\n"
            )?;
            writer.flush()?;
            // Echo raw bytes (whatever the client sent after its head too).
            let mut buf = [0u8; 16 * 1024];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                writer.write_all(&buf[..n])?;
            }
        }

        let body = read_framed_body(&mut reader, &headers)?.unwrap_or_default();
        let close = find_header(&headers, "connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
            || version == "HTTP/1.0";

        let path_only = target.split('?').next().unwrap_or_default();
        let (content_type, payload) = if path_only == "/ping/" {
            ("text/plain", b"pong".to_vec())
        } else {
            let mut hmap = serde_json::Map::new();
            for (n, v) in &headers {
                match hmap.get_mut(n) {
                    Some(serde_json::Value::String(prev)) => {
                        prev.push_str(", ");
                        prev.push_str(v);
                    }
                    _ => {
                        hmap.insert(n.clone(), serde_json::Value::String(v.clone()));
                    }
                }
            }
            let doc = serde_json::json!({
                "server": name,
                "method": method,
                "path": target,
                "peer": peer,
                "headers": hmap,
                "body": String::from_utf8_lossy(&body),
            });
            ("application/json", doc.to_string().into_bytes())
        };
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
             x-served-by: {name}\r\n{}\r\n",
            payload.len(),
            if close { "connection: close\r\n" } else { "" }
        )?;
        if method != "HEAD" {
            writer.write_all(&payload)?;
        }
        writer.flush()?;
        if close {
            return Ok(());
        }
    }
}
