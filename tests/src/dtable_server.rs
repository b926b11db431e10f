//! The fake dtable-server (binary `fake-dtable-server`): a model of the
//! documented behaviour of SeaTable's dtable-server that matters for lost
//! writes, and nothing else.
//!
//! - `GET /ping/` → `pong`.
//! - A base is loaded from `STORAGE/<base_uuid>.json` (32 lowercase hex; an
//!   absent file is an empty base) on the first request that names it, in any
//!   SeaTable URL shape (found with [`shardmap::extract`]), and kept in memory
//!   until the process exits.
//! - `POST .../dtables/{uuid}/rows/` with the body `{"write_id": "..."}`
//!   appends the id to the base's rows in memory and answers
//!   `200 {"ok": true, "server": NAME, "rows": N}`: the write is acknowledged.
//! - `GET` of any other path naming a base → `200 {"base", "rows", "server"}`
//!   (the in-memory base).
//! - Every `--save-interval-ms`, each modified base is written whole to its file
//!   (write to a temporary file, then rename): the last saver wins, which is
//!   exactly why a base open on two servers loses acknowledged writes.
//! - On SIGTERM (or SIGINT): save every modified base, log `stop`, remove the pid
//!   file, exit 0. No write is acknowledged after that final save.
//! - The log file (appended, one JSON object per line): `{"t": ms since the epoch,
//!   "server", "pid", "event": "start"|"load"|"write"|"save"|"stop", "base",
//!   "write_id", "rows", "addr"}` (fields that apply).
//! - The pid file (written once listening, removed on a clean exit) holds the pid.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::http::{find_header, read_framed_body, read_head};

/// The command line of `fake-dtable-server`.
#[derive(Debug, Clone)]
pub struct ServerArgs {
    pub name: String,
    pub listen: SocketAddr,
    pub storage: PathBuf,
    pub save_interval: Duration,
    pub log: PathBuf,
    pub pid_file: Option<PathBuf>,
}

impl ServerArgs {
    pub const USAGE: &str = "usage: fake-dtable-server --name NAME --listen 127.0.0.1:PORT \
        --storage DIR --save-interval-ms N --log FILE [--pid-file FILE]";

    /// Parses the arguments (without the program name).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<ServerArgs> {
        let (mut name, mut listen, mut storage, mut interval, mut log, mut pid_file) =
            (None, None, None, None, None, None);
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let mut val = || {
                it.next()
                    .with_context(|| format!("{arg} needs a value\n{}", Self::USAGE))
            };
            match arg.as_str() {
                "--name" => name = Some(val()?),
                "--listen" => listen = Some(val()?.parse().context("--listen")?),
                "--storage" => storage = Some(PathBuf::from(val()?)),
                "--save-interval-ms" => {
                    interval = Some(Duration::from_millis(
                        val()?.parse().context("--save-interval-ms")?,
                    ))
                }
                "--log" => log = Some(PathBuf::from(val()?)),
                "--pid-file" => pid_file = Some(PathBuf::from(val()?)),
                other => anyhow::bail!("unknown argument {other:?}\n{}", Self::USAGE),
            }
        }
        let missing = |what: &str| anyhow::anyhow!("{what} is required\n{}", Self::USAGE);
        Ok(ServerArgs {
            name: name.ok_or_else(|| missing("--name"))?,
            listen: listen.ok_or_else(|| missing("--listen"))?,
            storage: storage.ok_or_else(|| missing("--storage"))?,
            save_interval: interval.ok_or_else(|| missing("--save-interval-ms"))?,
            log: log.ok_or_else(|| missing("--log"))?,
            pid_file,
        })
    }

    /// The arguments, as `parse` takes them.
    pub fn to_args(&self) -> Vec<String> {
        let mut v = vec![
            "--name".into(),
            self.name.clone(),
            "--listen".into(),
            self.listen.to_string(),
            "--storage".into(),
            self.storage.display().to_string(),
            "--save-interval-ms".into(),
            self.save_interval.as_millis().to_string(),
            "--log".into(),
            self.log.display().to_string(),
        ];
        if let Some(p) = &self.pid_file {
            v.push("--pid-file".into());
            v.push(p.display().to_string());
        }
        v
    }
}

/// `STORAGE/<base>.json`, the file a base (32 lowercase hex) is saved to.
pub fn base_file(storage: &Path, base: &str) -> PathBuf {
    storage.join(format!("{base}.json"))
}

/// The rows (write ids) stored for `base`; empty when it has no file.
pub fn read_stored_rows(storage: &Path, base: &str) -> Result<Vec<String>> {
    let path = base_file(storage, base);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    Ok(doc["rows"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Base {
    rows: Vec<String>,
    dirty: bool,
}

struct Server {
    args: ServerArgs,
    bases: Mutex<HashMap<String, Base>>,
    log: Mutex<File>,
    pid: u32,
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_terminate(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

impl Server {
    fn log(&self, event: &str, fields: Value) {
        let mut doc =
            json!({"t": now_ms(), "server": self.args.name, "pid": self.pid, "event": event});
        if let (Some(d), Value::Object(f)) = (doc.as_object_mut(), fields) {
            d.extend(f);
        }
        let mut line = doc.to_string();
        line.push('\n');
        // One write(2) per line on an O_APPEND file: lines never interleave.
        let mut f = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            eprintln!("fake-dtable-server {}: log: {e}", self.args.name);
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Base>> {
        self.bases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The base, loaded from storage on first use. Called with the lock held.
    fn loaded<'a>(
        &self,
        bases: &'a mut HashMap<String, Base>,
        base: &str,
    ) -> io::Result<&'a mut Base> {
        if !bases.contains_key(base) {
            let rows = read_stored_rows(&self.args.storage, base).map_err(io::Error::other)?;
            self.log("load", json!({"base": base, "rows": rows.len()}));
            bases.insert(base.to_string(), Base { rows, dirty: false });
        }
        Ok(bases.get_mut(base).expect("inserted above"))
    }

    /// Saves every modified base (whole-file overwrite via rename). Called with
    /// the lock held, so a save is a snapshot no write interleaves with.
    fn save_dirty(&self, bases: &mut HashMap<String, Base>) {
        for (id, base) in bases.iter_mut().filter(|(_, b)| b.dirty) {
            let path = base_file(&self.args.storage, id);
            let tmp = self
                .args
                .storage
                .join(format!(".{id}.json.{}.{}.tmp", self.args.name, self.pid));
            let doc = json!({"base": id, "rows": base.rows});
            let res =
                std::fs::write(&tmp, doc.to_string()).and_then(|()| std::fs::rename(&tmp, &path));
            match res {
                Ok(()) => {
                    base.dirty = false;
                    self.log("save", json!({"base": id, "rows": base.rows.len()}));
                }
                Err(e) => eprintln!(
                    "fake-dtable-server {}: save {}: {e}",
                    self.args.name,
                    path.display()
                ),
            }
        }
    }
}

/// Runs the server until SIGTERM/SIGINT; returns after the final save.
/// `ready` is called with the bound address once listening.
pub fn run(args: ServerArgs, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    // SAFETY: installing an async-signal-safe handler (one atomic store).
    unsafe {
        let handler = on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    std::fs::create_dir_all(&args.storage)
        .with_context(|| format!("create {}", args.storage.display()))?;
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .with_context(|| format!("open log {}", args.log.display()))?;
    let server = Arc::new(Server {
        args,
        bases: Mutex::new(HashMap::new()),
        log: Mutex::new(log),
        pid: std::process::id(),
    });
    server.log("start", json!({"addr": addr.to_string()}));
    if let Some(p) = &server.args.pid_file {
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", server.pid))
            .and_then(|()| std::fs::rename(&tmp, p))
            .with_context(|| format!("write pid file {}", p.display()))?;
    }
    ready(addr);

    let acceptor = Arc::clone(&server);
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            let s = Arc::clone(&acceptor);
            thread::spawn(move || {
                let _ = handle(&s, conn);
            });
        }
    });

    let mut last_save = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(5));
        if TERMINATE.load(Ordering::SeqCst) {
            // The lock stays held until the process exits: nothing is
            // applied, hence acknowledged, after this save.
            let mut bases = server.lock();
            server.save_dirty(&mut bases);
            server.log("stop", json!({"bases": bases.len()}));
            if let Some(p) = &server.args.pid_file {
                let _ = std::fs::remove_file(p);
            }
            std::mem::forget(bases);
            return Ok(());
        }
        if last_save.elapsed() >= server.args.save_interval {
            let mut bases = server.lock();
            server.save_dirty(&mut bases);
            last_save = Instant::now();
        }
    }
}

fn respond(w: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> io::Result<()> {
    write!(
        w,
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )?;
    w.write_all(body)?;
    w.flush()
}

fn handle(server: &Server, stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let name = &server.args.name;
    while let Some(head) = read_head(&mut reader)? {
        let mut parts = head.start.split(' ');
        let (method, target) = (
            parts.next().unwrap_or_default().to_string(),
            parts.next().unwrap_or_default().to_string(),
        );
        let body = read_framed_body(&mut reader, &head.headers)?.unwrap_or_default();
        let close = find_header(&head.headers, "connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"));
        let path = target.split('?').next().unwrap_or_default();
        let (status, ctype, payload) = if path == "/ping/" {
            ("200 OK", "text/plain", b"pong".to_vec())
        } else if let Some(base) = shardmap::extract(&target) {
            let base = base.as_str().to_string();
            let mut bases = server.lock();
            let b = server.loaded(&mut bases, &base)?;
            if method == "POST" && path.ends_with("/rows/") {
                let id = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["write_id"].as_str().map(str::to_string));
                match id {
                    Some(id) => {
                        b.rows.push(id.clone());
                        b.dirty = true;
                        let n = b.rows.len();
                        server.log("write", json!({"base": base, "write_id": id}));
                        drop(bases);
                        let doc = json!({"ok": true, "server": name, "rows": n});
                        ("200 OK", "application/json", doc.to_string().into_bytes())
                    }
                    None => (
                        "400 Bad Request",
                        "application/json",
                        br#"{"error": "body must be {\"write_id\": \"...\"}"}"#.to_vec(),
                    ),
                }
            } else {
                let doc = json!({"base": base, "rows": b.rows, "server": name});
                drop(bases);
                ("200 OK", "application/json", doc.to_string().into_bytes())
            }
        } else {
            (
                "404 Not Found",
                "text/plain",
                b"no base in this path".to_vec(),
            )
        };
        respond(&mut writer, status, ctype, &payload)?;
        if close {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let a = ServerArgs::parse(
            [
                "--name",
                "s1",
                "--listen",
                "127.0.0.1:0",
                "--storage",
                "/tmp/x",
                "--save-interval-ms",
                "250",
                "--log",
                "/tmp/l",
                "--pid-file",
                "/tmp/p",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!(a.save_interval, Duration::from_millis(250));
        let b = ServerArgs::parse(a.to_args()).unwrap();
        assert_eq!(b.to_args(), a.to_args());
        assert!(ServerArgs::parse(["--name".to_string(), "x".into()]).is_err());
        assert!(ServerArgs::parse(["--bogus".to_string()]).is_err());
    }
}
