//! A real etcd cluster for tests: `n` members of Debian's etcd 3.4 on loopback
//! ports, data in a temporary directory, fast elections. Members can be killed
//! (SIGKILL), paused (SIGSTOP / SIGCONT) and restarted on their data. Dropping
//! the cluster kills every member (each in its own process group, see
//! [`Proc`]) and removes the data, whatever happened.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use seashard_tests::etcd::EtcdCluster;
//! let mut etcd = EtcdCluster::start(3)?;
//! let rev = etcd.put(0, "k", "v")?;        // through the v3 HTTP gateway
//! assert_eq!(etcd.get(1, "k")?.as_deref(), Some("v"));
//! etcd.kill(2);                             // 2 of 3 left: still a majority
//! # let _ = rev; Ok(()) }
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufReader, ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::http::{find_header, read_framed_body, read_head};
use crate::process::{Fatal, Proc, find_binary};
use crate::{free_port, loopback, wait_until};

/// How long a cluster (or a restarted member) gets to become ready.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The default timeout of one HTTP request to a member (connect, write, read); see
/// [`EtcdCluster::set_request_timeout`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Raft heartbeat, ms (etcd's default is 100).
pub const HEARTBEAT_MS: u64 = 50;
/// Raft election timeout, ms (etcd's default is 1000): a lost leader is replaced
/// within about this, plus a round of voting.
pub const ELECTION_TIMEOUT_MS: u64 = 500;

/// How many times [`EtcdCluster::start`] tries fresh ports when one was taken
/// between choosing it and etcd binding it (other tests run at the same time).
const PORT_ATTEMPTS: usize = 3;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// The etcd binary: `$ETCD_BIN`, else `/usr/bin/etcd` (Debian's `etcd-server`,
/// installed by `.ci/setup`).
pub fn etcd_bin() -> Result<PathBuf> {
    find_binary(
        "ETCD_BIN",
        &[PathBuf::from("/usr/bin/etcd")],
        "run `bash .ci/setup` to install Debian's etcd-server, or set ETCD_BIN",
    )
}

/// One member: its ports are fixed for its life, so a restarted member is found
/// where it was.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    data_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    stopped: bool,
}

/// A running etcd cluster; every member is killed and the data removed on drop.
pub struct EtcdCluster {
    members: Vec<Member>,
    request_timeout: Duration,
    initial_cluster: String,
    token: String,
    // Dropped after `members` (declaration order), so no member still writes to it.
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members (1 to 9) on free loopback ports and waits (at most
    /// [`ETCD_START_TIMEOUT`]) until every one answers `/health` with
    /// `{"health":"true"}`. A port taken meanwhile by someone else is retried
    /// with fresh ports; the error carries each member's log tail.
    pub fn start(n: usize) -> Result<EtcdCluster> {
        if !(1..=9).contains(&n) {
            bail!("an etcd cluster of {n} members: want 1 to 9");
        }
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let cluster = Self::start_once(n)?;
            match cluster.wait_healthy(ETCD_START_TIMEOUT) {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    let logs = cluster.logs_tail(30);
                    let port_taken = logs.contains("address already in use");
                    let err = e.context(format!("etcd cluster of {n} did not start:\n{logs}"));
                    if !port_taken {
                        return Err(err);
                    }
                    last = Some(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("etcd cluster of {n} did not start")))
    }

    fn start_once(n: usize) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new()
            .prefix("seashard-etcd-")
            .tempdir()?;
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client: loopback(free_port()?),
                peer: loopback(free_port()?),
                data_dir: dir.path().join(format!("m{i}.etcd")),
                log: dir.path().join(format!("m{i}.log")),
                proc: None,
                stopped: false,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "seashard-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = EtcdCluster {
            members,
            request_timeout: REQUEST_TIMEOUT,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let bin = etcd_bin()?;
        let m = &self.members[i];
        let client = format!("http://{}", m.client);
        let peer = format!("http://{}", m.peer);
        // `existing` once the member has data: etcd then ignores the initial flags.
        let state = if m.data_dir.exists() {
            "existing"
        } else {
            "new"
        };
        let mut log = OpenOptions::new().create(true).append(true).open(&m.log)?;
        writeln!(log, "--- start of {} ({state}) ---", m.name)?;
        let mut cmd = Command::new(bin);
        // Nothing from an operator's environment (ETCD_* variables are flags).
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_TIMEOUT_MS.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = Proc::spawn(cmd, &format!("etcd {}", m.name))?;
        let m = &mut self.members[i];
        m.proc = Some(proc);
        m.stopped = false;
        Ok(())
    }

    /// How long [`EtcdCluster::put`], [`EtcdCluster::get`], [`EtcdCluster::call`]
    /// and the health checks wait for one answer ([`REQUEST_TIMEOUT`] by default).
    /// etcd itself holds a request it cannot commit for about 5 s before it
    /// answers with an error.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Never: a cluster has at least one member.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, `http://127.0.0.1:PORT`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.members[i].client)
    }

    /// Member `i`'s client address.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        self.members[i].client
    }

    /// Member `i`'s pid, while it runs (stopped included).
    pub fn pid(&mut self, i: usize) -> Option<u32> {
        let m = &mut self.members[i];
        let p = m.proc.as_mut()?;
        p.exited().is_none().then(|| p.pid())
    }

    /// The pids of every running member.
    pub fn pids(&mut self) -> Vec<u32> {
        (0..self.len()).filter_map(|i| self.pid(i)).collect()
    }

    /// SIGKILL member `i` (and reap it). Its data stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut p) = m.proc.take() {
            p.kill();
        }
        m.stopped = false;
    }

    /// SIGSTOP member `i`: it stays alive and holds its ports, but answers nothing.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGSTOP)?;
        self.members[i].stopped = true;
        Ok(())
    }

    /// SIGCONT member `i` after [`EtcdCluster::stop`].
    pub fn cont(&mut self, i: usize) -> Result<()> {
        self.signal(i, libc::SIGCONT)?;
        self.members[i].stopped = false;
        Ok(())
    }

    fn signal(&mut self, i: usize, sig: libc::c_int) -> Result<()> {
        let name = self.members[i].name.clone();
        let Some(p) = self.members[i].proc.as_mut() else {
            bail!("etcd {name} is not running");
        };
        if p.exited().is_some() {
            bail!("etcd {name} exited");
        }
        p.signal(sig)
    }

    /// Kills member `i` if it runs, starts it again on its data and ports, and
    /// waits (at most [`ETCD_START_TIMEOUT`]) until it answers `/health`: with a
    /// majority of members up, [`EtcdCluster::member_healthy`] then soon holds (see
    /// [`EtcdCluster::wait_healthy`]); without one it never does.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        let addr = self.members[i].client;
        let name = self.members[i].name.clone();
        let waited = wait_until(
            ETCD_START_TIMEOUT,
            &format!("restarted etcd {name} to answer /health"),
            || {
                self.check_exited(i)?;
                Ok(request(addr, "GET", "/health", None, REQUEST_TIMEOUT)
                    .ok()
                    .map(|_| ()))
            },
        );
        waited.with_context(|| self.logs_tail(30))
    }

    fn check_exited(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        match m.proc.as_mut().and_then(|p| p.exited()) {
            Some(status) => Err(Fatal(format!("etcd {} exited: {status}", m.name)).into()),
            None => Ok(()),
        }
    }

    /// Whether member `i` answers `/health` with `{"health":"true"}` (it is up and
    /// sees a leader) within the request timeout.
    pub fn member_healthy(&self, i: usize) -> bool {
        let m = &self.members[i];
        if m.proc.is_none() {
            return false;
        }
        health(m.client, self.request_timeout).unwrap_or(false)
    }

    /// Whether every member is running and healthy.
    pub fn is_healthy(&self) -> bool {
        (0..self.len()).all(|i| self.member_healthy(i))
    }

    /// Waits until every member that runs (and is not stopped) is healthy; an
    /// error names the ones that are not, with the log tails.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let up: Vec<usize> = (0..self.len())
            .filter(|&i| self.members[i].proc.is_some() && !self.members[i].stopped)
            .collect();
        wait_until(timeout, "every running etcd member to be healthy", || {
            let sick: Vec<&str> = up
                .iter()
                .filter(|&&i| !self.member_healthy(i))
                .map(|&i| self.members[i].name.as_str())
                .collect();
            if sick.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!("not healthy yet: {}", sick.join(", ")))
            }
        })
    }

    /// The index of the member that is the raft leader, as member `asked` sees it.
    pub fn leader(&self, asked: usize) -> Result<usize> {
        let status = self.call(asked, "/v3/maintenance/status", &json!({}))?;
        let leader = status["leader"]
            .as_str()
            .ok_or_else(|| anyhow!("no leader in {status}"))?
            .to_owned();
        for i in 0..self.len() {
            if i == asked {
                if status["header"]["member_id"].as_str() == Some(leader.as_str()) {
                    return Ok(i);
                }
                continue;
            }
            let id = self
                .call(i, "/v3/maintenance/status", &json!({}))
                .ok()
                .and_then(|s| s["header"]["member_id"].as_str().map(str::to_owned));
            if id.as_deref() == Some(leader.as_str()) {
                return Ok(i);
            }
        }
        bail!("leader {leader} is no member that answers")
    }

    /// Puts `key` = `value` through member `i`'s v3 HTTP gateway; the store's
    /// revision after it. An error when the member refuses (no quorum: an etcd
    /// error answer) or does not answer within the request timeout.
    pub fn put(&self, i: usize, key: &str, value: &str) -> Result<i64> {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        let r = self.call(i, "/v3/kv/put", &body)?;
        revision(&r)
    }

    /// Reads `key` through member `i` (a linearizable read: it needs a quorum).
    pub fn get(&self, i: usize, key: &str) -> Result<Option<String>> {
        let r = self.call(i, "/v3/kv/range", &json!({"key": B64.encode(key)}))?;
        let Some(kv) = r["kvs"].as_array().and_then(|a| a.first()) else {
            return Ok(None);
        };
        let v = B64
            .decode(kv["value"].as_str().unwrap_or_default())
            .context("the value is not base64")?;
        Ok(Some(
            String::from_utf8(v).context("the value is not UTF-8")?,
        ))
    }

    /// `POST path` with a JSON body to member `i`'s v3 HTTP gateway; the JSON
    /// answer of a `200`, else an error with the answer.
    pub fn call(&self, i: usize, path: &str, body: &Value) -> Result<Value> {
        let m = &self.members[i];
        let (status, text) = request(
            m.client,
            "POST",
            path,
            Some(body.to_string().as_bytes()),
            self.request_timeout,
        )
        .with_context(|| format!("etcd {} POST {path}", m.name))?;
        if status != 200 {
            bail!("etcd {} POST {path}: {status} {text}", m.name);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("etcd {} POST {path}: not JSON: {text}", m.name))
    }

    /// [`EtcdCluster::call`] on the first healthy member.
    pub fn call_healthy(&self, path: &str, body: &Value) -> Result<Value> {
        let member = (0..self.len())
            .find(|&i| self.member_healthy(i))
            .ok_or_else(|| anyhow!("no healthy etcd member"))?;
        self.call(member, path, body)
    }

    /// The last `lines` lines of every member's log, each under its name.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "--- etcd {} ({}) ---\n{}",
                    m.name,
                    m.client,
                    tail(&m.log, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The directory holding every member's data and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            // A stopped process dies of SIGKILL too.
            self.kill(i);
        }
    }
}

/// The `header.revision` of an etcd answer.
fn revision(r: &Value) -> Result<i64> {
    r["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no revision in {r}"))
}

/// `GET /health` of one member: `Some(true)` for `{"health":"true"}`.
fn health(addr: SocketAddr, timeout: Duration) -> Result<bool> {
    let (status, text) = request(addr, "GET", "/health", None, timeout)?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(status == 200 && v["health"] == "true")
}

/// One HTTP/1.1 request on a fresh connection, every step bounded by `timeout`
/// (and the whole by about twice that); status and body text.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<(u16, String)> {
    let deadline = Instant::now() + timeout * 2;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let head = match read_head(&mut reader) {
        Ok(Some(head)) => head,
        Ok(None) => bail!("{addr}: connection closed before a response"),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            bail!("{addr}: no answer within {timeout:?}")
        }
        Err(e) => return Err(e.into()),
    };
    let status: u16 = head
        .start
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{addr}: bad status line {:?}", head.start))?;
    if Instant::now() > deadline {
        bail!("{addr}: answered after {:?}", timeout * 2);
    }
    let body = match read_framed_body(&mut reader, &head.headers)? {
        Some(b) => b,
        None if find_header(&head.headers, "content-length").is_none() => {
            // Neither framing: the body ends with the connection (we asked to close).
            let mut b = Vec::new();
            reader.take(1 << 20).read_to_end(&mut b)?;
            b
        }
        None => Vec::new(),
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The last `lines` lines of a file (at most its last 64 KiB are read).
fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(no log: {e})"),
    }
}
