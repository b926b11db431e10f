//! A TCP relay that can silently stop passing bytes: a link to the control plane that
//! dies without closing (a firewall dropping packets, a cable pulled), while the Envoy
//! behind it keeps serving.
//!
//! ```text
//! Envoy ──▶ 127.0.0.1:PORT (relay) ──[from SOURCE_IP]──▶ target
//! ```
//!
//! The relay connects to the target from its own loopback address (`127.0.0.2`, ...),
//! so the target sees the Envoy behind it as another host. [`Relay::cut`] makes every
//! connection, open or new, swallow what it reads in both directions without
//! closing anything: neither side learns the link is dead except by timing out.
//! Dropping the relay closes its listener and every connection.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

/// How often a pump checks whether the relay was stopped.
const POLL: Duration = Duration::from_millis(100);

/// A running relay, stopped on drop.
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Relay {
    /// Relays `127.0.0.1:<free port>` to `target`, connecting from `source`.
    pub fn start(target: SocketAddr, source: IpAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (cut, stop, open) = (cut.clone(), stop.clone(), open.clone());
            thread::spawn(move || accept_loop(&listener, target, source, &cut, &stop, &open))
        };
        Ok(Relay {
            addr,
            cut,
            stop,
            open,
            accept: Some(accept),
        })
    }

    /// From now on no byte passes, in either direction, on any connection; nothing
    /// is closed.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Bytes pass again.
    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for s in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    target: SocketAddr,
    source: IpAddr,
    cut: &Arc<AtomicBool>,
    stop: &Arc<AtomicBool>,
    open: &Arc<Mutex<Vec<TcpStream>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        let Ok(upstream) = connect_from(source, target) else {
            continue;
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let pair = (
            client.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
            upstream.try_clone(),
        );
        let (Ok(c_read), Ok(c_keep), Ok(u_read), Ok(u_keep)) = pair else {
            continue;
        };
        {
            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
            o.push(c_keep);
            o.push(u_keep);
        }
        for (from, to) in [(c_read, upstream), (u_read, client)] {
            let (cut, stop) = (cut.clone(), stop.clone());
            thread::spawn(move || pump(from, to, &cut, &stop));
        }
    }
}

/// A connection to `target` from `source` (bound before connecting).
fn connect_from(source: IpAddr, target: SocketAddr) -> Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .with_context(|| format!("bind {source}"))?;
    socket
        .connect_timeout(&target.into(), Duration::from_secs(2))
        .with_context(|| format!("connect {target}"))?;
    Ok(socket.into())
}

/// Copies `from` to `to` until either closes or the relay stops; while cut, reads and
/// drops.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    if !cut.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_bytes_from_its_source_address_then_swallows_them_when_cut() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        let relay = Relay::start(target, "127.0.0.2".parse().unwrap()).unwrap();
        let mut client = TcpStream::connect(relay.addr).unwrap();
        let (mut accepted, peer) = server.accept().unwrap();
        assert_eq!(peer.ip().to_string(), "127.0.0.2");
        accepted
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        client.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        relay.cut();
        client.write_all(b"lost").unwrap();
        let err = accepted.read(&mut buf).unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        // Nothing was closed: the client can still write, and is never told.
        client.write_all(b"more").unwrap();
        thread::sleep(Duration::from_millis(300)); // read and dropped meanwhile
        relay.heal();
        client.write_all(b"back").unwrap();
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"back");
    }
}
