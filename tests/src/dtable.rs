//! Harness of the lost-write experiment: fake dtable-servers on a shared
//! storage directory ([`FakeDtableServer`], [`Cluster`]), concurrent writers
//! through a proxy ([`Writers`]), and the evidence afterwards: acknowledged
//! writes missing from storage ([`missing_writes`]) and bases held by two
//! servers at once ([`double_service`], from the servers' logs).
//!
//! The server itself is `fake-dtable-server` (see [`crate::dtable_server`]);
//! its restart hook is `fake-dtable-ctl restart` ([`FakeDtableServer::restart_hook`]).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use shardmap::BaseUuid;

use crate::dtable_server::{ServerArgs, read_stored_rows};
use crate::process::{Fatal, Proc, START_TIMEOUT, wait_until};
use crate::{Connection, process};

/// How long a graceful stop (SIGTERM, final save) may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn sibling_bin(var: &str, name: &str) -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/deps/<test>-<hash> or <target>/<profile>/<bin>
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(name));
        }
    }
    process::find_binary(
        var,
        &candidates,
        &format!("build it with `cargo build -p seashard-tests --bin {name}`"),
    )
}

/// The `fake-dtable-server` binary (`$FAKE_DTABLE_SERVER_BIN`, else next to
/// the running test or binary).
pub fn fake_dtable_server_bin() -> Result<PathBuf> {
    sibling_bin("FAKE_DTABLE_SERVER_BIN", "fake-dtable-server")
}

/// The `fake-dtable-ctl` binary (`$FAKE_DTABLE_CTL_BIN`, else next to the
/// running test or binary).
pub fn fake_dtable_ctl_bin() -> Result<PathBuf> {
    sibling_bin("FAKE_DTABLE_CTL_BIN", "fake-dtable-ctl")
}

// ---------------------------------------------------------------------------
// Processes by pid file (what `fake-dtable-ctl` does)
// ---------------------------------------------------------------------------

/// The pid in a pid file; `None` when the file does not exist.
pub fn read_pid_file(path: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().parse().with_context(|| {
            format!("pid file {} holds {s:?}", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// True when `pid` has exited: no such process, or a zombie its parent has
/// not reaped yet.
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
    }
}

fn send_signal(pid: u32, signal: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTERM to the server named by `pid_file`, then waits (at most `timeout`)
/// until it has exited. `Ok(None)` when no server was running.
pub fn stop_by_pid_file(pid_file: &Path, timeout: Duration) -> Result<Option<u32>> {
    let Some(pid) = read_pid_file(pid_file)? else {
        return Ok(None);
    };
    if process_gone(pid) {
        return Ok(None);
    }
    send_signal(pid, libc::SIGTERM)?;
    wait_until(timeout, &format!("pid {pid} to exit after SIGTERM"), || {
        Ok(process_gone(pid).then_some(()))
    })?;
    Ok(Some(pid))
}

/// Stops the server named by `pid_file` (see [`stop_by_pid_file`]), runs
/// `start` (argv) detached in its own process group with stdout/stderr
/// appended to `output` (or discarded), and waits until the pid file names
/// a new, live process. Returns the new pid.
pub fn restart_by_pid_file(
    pid_file: &Path,
    start: &[String],
    output: Option<&str>,
    timeout: Duration,
) -> Result<u32> {
    let old = stop_by_pid_file(pid_file, timeout)?;
    let (prog, args) = start
        .split_first()
        .ok_or_else(|| anyhow!("empty start command"))?;
    let out = match output {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("open {p}"))?,
        ),
        None => Stdio::null(),
    };
    let err = match output {
        Some(p) => Stdio::from(std::fs::OpenOptions::new().append(true).open(p)?),
        None => Stdio::null(),
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(prog)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawn {start:?}"))?;
    let new = child.id();
    wait_until(timeout, "the restarted server's pid file", || {
        if let Some(status) = child.try_wait()? {
            return Err(Fatal(format!("{start:?} exited: {status}")).into());
        }
        Ok((read_pid_file(pid_file)? == Some(new) && Some(new) != old).then_some(new))
    })
}

// ---------------------------------------------------------------------------
// One fake dtable-server
// ---------------------------------------------------------------------------

/// A `fake-dtable-server` process, killed (SIGKILL) on drop, whoever started
/// its current incarnation (this handle or its restart hook).
pub struct FakeDtableServer {
    pub name: String,
    /// Where it listens; the same across restarts.
    pub addr: SocketAddr,
    pub storage: PathBuf,
    pub save_interval: Duration,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl FakeDtableServer {
    /// Starts a server named `name` on a free loopback port, saving to
    /// `storage_dir` every `save_interval`. Returns once it listens. The port is
    /// [`crate::free_port`]'s, outside the kernel's ephemeral range: no listener
    /// asking for any port can take it while the server restarts.
    pub fn start(name: &str, storage_dir: &Path, save_interval: Duration) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("seashard-dtable-{name}-"))
            .tempdir()?;
        let mut s = FakeDtableServer {
            name: name.to_string(),
            addr: crate::loopback(crate::free_port()?),
            storage: storage_dir.to_path_buf(),
            save_interval,
            dir,
            proc: None,
        };
        s.start_again()?;
        Ok(s)
    }

    /// Its log file (JSON lines, kept across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("events.log")
    }

    /// Its pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("server.pid")
    }

    /// Where the restart hook sends the output of the servers it starts.
    pub fn output_path(&self) -> PathBuf {
        self.dir.path().join("output.log")
    }

    fn args(&self) -> ServerArgs {
        ServerArgs {
            name: self.name.clone(),
            listen: self.addr,
            storage: self.storage.clone(),
            save_interval: self.save_interval,
            log: self.log_path(),
            pid_file: Some(self.pid_file()),
        }
    }

    /// The argv that starts this server again (same name, address, storage).
    pub fn start_command(&self) -> Result<Vec<String>> {
        let mut argv = vec![fake_dtable_server_bin()?.display().to_string()];
        argv.extend(self.args().to_args());
        Ok(argv)
    }

    /// The restart hook a control plane runs (an argv): `fake-dtable-ctl
    /// restart --pid-file F --output F -- <start command>`. It stops the
    /// server gracefully (SIGTERM: the final save) and starts it again.
    pub fn restart_hook(&self) -> Result<Vec<String>> {
        let mut argv = vec![
            fake_dtable_ctl_bin()?.display().to_string(),
            "restart".into(),
            "--pid-file".into(),
            self.pid_file().display().to_string(),
            "--output".into(),
            self.output_path().display().to_string(),
            "--".into(),
        ];
        argv.extend(self.start_command()?);
        Ok(argv)
    }

    /// The pid of the running incarnation (from the pid file).
    pub fn pid(&self) -> Option<u32> {
        read_pid_file(&self.pid_file())
            .ok()
            .flatten()
            .filter(|p| !process_gone(*p))
    }

    /// Starts the server (again) on its address; returns once it listens.
    pub fn start_again(&mut self) -> Result<()> {
        if let Some(pid) = self.pid() {
            bail!("{} is already running (pid {pid})", self.name);
        }
        let mut cmd = Command::new(fake_dtable_server_bin()?);
        cmd.args(self.args().to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.output_path())?,
            ));
        let mut proc = Proc::spawn(cmd, &format!("fake-dtable-server {}", self.name))?;
        let pid = proc.pid();
        let pid_file = self.pid_file();
        let log = self.log_path();
        let started = wait_until(START_TIMEOUT, "fake-dtable-server to listen", || {
            if let Some(status) = proc.exited() {
                return Err(Fatal(format!("fake-dtable-server exited: {status}")).into());
            }
            if read_pid_file(&pid_file)? != Some(pid) {
                return Ok(None);
            }
            let addr = read_events(&log)?
                .into_iter()
                .rev()
                .find(|e| e.pid == pid && e.event == "start")
                .and_then(|e| e.addr);
            Ok(addr)
        });
        let addr = match started {
            Ok(a) => a,
            Err(e) => {
                let out = std::fs::read_to_string(self.output_path()).unwrap_or_default();
                return Err(e.context(format!("{}: output:\n{out}", self.name)));
            }
        };
        self.addr = addr;
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops it gracefully: SIGTERM, then waits until it exited (after saving
    /// every modified base). Works whether this handle or the restart hook
    /// started the running incarnation.
    pub fn stop(&mut self) -> Result<()> {
        let pid = self.pid();
        if let Some(proc) = self.proc.as_mut().filter(|p| Some(p.pid()) == pid) {
            proc.signal(libc::SIGTERM)?;
            let status = wait_until(STOP_TIMEOUT, "fake-dtable-server to exit", || {
                Ok(proc.exited())
            })
            .with_context(|| format!("stop {}", self.name))?;
            if !status.success() {
                bail!("{} exited with {status} after SIGTERM", self.name);
            }
            self.proc = None;
            return Ok(());
        }
        stop_by_pid_file(&self.pid_file(), STOP_TIMEOUT)?;
        Ok(())
    }

    /// Graceful stop, then start on the same address (what SeaTable's docs
    /// ask of an operator after a map change).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Runs the restart hook ([`Self::restart_hook`]) as a control plane would.
    pub fn run_restart_hook(&mut self) -> Result<()> {
        let argv = self.restart_hook()?;
        let out = Command::new(&argv[0]).args(&argv[1..]).output()?;
        if !out.status.success() {
            bail!(
                "restart hook of {} failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Reap the old incarnation if it was ours.
        if let Some(p) = self.proc.as_mut() {
            p.exited();
        }
        Ok(())
    }

    /// Kills it with SIGKILL: a crash, unsaved writes are lost.
    pub fn crash(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = send_signal(pid, libc::SIGKILL);
            let _ = wait_until(STOP_TIMEOUT, "killed server to go", || {
                Ok(process_gone(pid).then_some(()))
            });
        }
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Its health URL, for a control plane: `http://ADDR/ping/` (answers `pong`).
    pub fn health_url(&self) -> String {
        format!("http://{}/ping/", self.addr)
    }

    /// `GET /ping/` answers `pong`.
    pub fn ping(&self) -> bool {
        crate::get(self.addr, "/ping/", &[])
            .map(|r| r.status == 200 && r.text() == "pong")
            .unwrap_or(false)
    }

    /// Every event in its log so far (every incarnation).
    pub fn log_events(&self) -> Result<Vec<Event>> {
        read_events(&self.log_path())
    }
}

impl Drop for FakeDtableServer {
    fn drop(&mut self) {
        let ours = self.proc.as_ref().map(Proc::pid);
        if let Some(pid) = self.pid().filter(|p| Some(*p) != ours) {
            // Started by the restart hook, in its own process group.
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        // `proc`, if any, kills its group when dropped.
    }
}

// ---------------------------------------------------------------------------
// The servers' logs
// ---------------------------------------------------------------------------

/// One line of a fake server's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub t: u64,
    pub server: String,
    pub pid: u32,
    /// `start`, `load`, `write`, `save` or `stop`.
    pub event: String,
    pub base: Option<String>,
    pub write_id: Option<String>,
    /// Rows of the base (`load`, `save`).
    pub rows: Option<u64>,
    /// The bound address (`start`).
    pub addr: Option<SocketAddr>,
}

/// Reads a log file (an absent file is an empty log). A torn last line (being
/// written) is skipped.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let s = |k: &str| v[k].as_str().map(str::to_string);
        out.push(Event {
            t: v["t"].as_u64().unwrap_or(0),
            server: s("server").unwrap_or_default(),
            pid: v["pid"].as_u64().unwrap_or(0) as u32,
            event: s("event").unwrap_or_default(),
            base: s("base"),
            write_id: s("write_id"),
            rows: v["rows"].as_u64(),
            addr: s("addr").and_then(|a| a.parse().ok()),
        });
    }
    Ok(out)
}

/// A base held in memory by two servers at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleService {
    pub base: String,
    /// (server, pid, loaded at, released at) of both holders; `u64::MAX` when
    /// the holder never stopped.
    pub holders: [(String, u32, u64, u64); 2],
}

/// Every pair of servers that held the same base in memory at overlapping
/// times: a server holds a base from its `load` until that incarnation's
/// `stop` (or forever, if the log has no `stop`: killed or still running).
pub fn double_service(events: &[Event]) -> Vec<DoubleService> {
    let mut stops: BTreeMap<u32, u64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.event == "stop") {
        stops.insert(e.pid, e.t);
    }
    // base -> [(server, pid, from, to)]
    let mut held: BTreeMap<&str, Vec<(String, u32, u64, u64)>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.event == "load") {
        if let Some(b) = &e.base {
            let to = stops.get(&e.pid).copied().unwrap_or(u64::MAX);
            held.entry(b)
                .or_default()
                .push((e.server.clone(), e.pid, e.t, to));
        }
    }
    let mut out = Vec::new();
    for (base, hs) in held {
        for (i, a) in hs.iter().enumerate() {
            for b in &hs[i + 1..] {
                if a.0 != b.0 && a.2 < b.3 && b.2 < a.3 {
                    out.push(DoubleService {
                        base: base.to_string(),
                        holders: [a.clone(), b.clone()],
                    });
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

/// The acknowledged writes (`(base, write_id)`, base in 32 lowercase hex)
/// that storage does not hold: lost.
pub fn missing_writes(
    storage_dir: &Path,
    acknowledged: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut stored: BTreeMap<&str, HashSet<String>> = BTreeMap::new();
    for (base, _) in acknowledged {
        if !stored.contains_key(base.as_str()) {
            let rows = read_stored_rows(storage_dir, base)?;
            stored.insert(base, rows.into_iter().collect());
        }
    }
    Ok(acknowledged
        .iter()
        .filter(|(b, id)| !stored[b.as_str()].contains(id))
        .cloned()
        .collect())
}

// ---------------------------------------------------------------------------
// Several servers on one storage
// ---------------------------------------------------------------------------

/// Fake dtable-servers sharing one storage directory (removed on drop).
pub struct Cluster {
    pub storage: tempfile::TempDir,
    pub servers: Vec<FakeDtableServer>,
}

impl Cluster {
    /// Starts one server per name, all saving every `save_interval`.
    pub fn start(names: &[&str], save_interval: Duration) -> Result<Cluster> {
        let storage = tempfile::Builder::new()
            .prefix("seashard-storage-")
            .tempdir()?;
        let servers = names
            .iter()
            .map(|n| FakeDtableServer::start(n, storage.path(), save_interval))
            .collect::<Result<Vec<_>>>()?;
        Ok(Cluster { storage, servers })
    }

    pub fn server(&mut self, name: &str) -> &mut FakeDtableServer {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no server named {name}"))
    }

    /// `(name, addr)` of each server.
    pub fn addrs(&self) -> Vec<(String, SocketAddr)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.addr))
            .collect()
    }

    /// Stops every server gracefully (each saves what it holds).
    pub fn stop_all(&mut self) -> Result<()> {
        for s in &mut self.servers {
            s.stop()?;
        }
        Ok(())
    }

    /// The events of every server, by time.
    pub fn events(&self) -> Result<Vec<Event>> {
        let mut all = Vec::new();
        for s in &self.servers {
            all.extend(s.log_events()?);
        }
        all.sort_by_key(|e| e.t);
        Ok(all)
    }

    /// [`missing_writes`] on this cluster's storage.
    pub fn missing(&self, acknowledged: &[(String, String)]) -> Result<Vec<(String, String)>> {
        missing_writes(self.storage.path(), acknowledged)
    }
}

// ---------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------

/// `n` deterministic bases whose first hex digits cycle through 0-f, so every
/// slot of a one-digit map gets bases.
pub fn spread_bases(n: usize) -> Vec<BaseUuid> {
    let mut next = crate::xorshift(0x0123_4567_89ab_cdef);
    (0..n)
        .map(|i| {
            let a = next();
            let hex = format!("{:x}{:015x}{:016x}", i % 16, a >> 4, next());
            BaseUuid::parse(&hex).expect("32 hex digits")
        })
        .collect()
}

/// What the writers did.
#[derive(Debug, Default)]
pub struct WriteLog {
    /// `(base, write_id, server)` of every acknowledged write.
    pub acked: Vec<(String, String, String)>,
    /// Writes that got no acknowledgement (error status, connection error).
    pub failed: usize,
    /// The failed writes answered with an HTTP status, by status (`421` from a guard,
    /// `503` from a fence, ...).
    pub refused: std::collections::BTreeMap<u16, usize>,
}

impl WriteLog {
    /// Adds what `other` did.
    pub fn absorb(&mut self, other: WriteLog) {
        self.acked.extend(other.acked);
        self.failed += other.failed;
        for (status, n) in other.refused {
            *self.refused.entry(status).or_default() += n;
        }
    }

    /// `(base, write_id)` of the acknowledged writes, for [`missing_writes`].
    pub fn acknowledged(&self) -> Vec<(String, String)> {
        self.acked
            .iter()
            .map(|(b, id, _)| (b.clone(), id.clone()))
            .collect()
    }
}

/// Threads writing to bases through a proxy, each on a keep-alive
/// connection, until stopped (or `max_per_thread` writes, or 5 minutes).
/// `POST /dtable-server/api/v1/dtables/{dashed uuid}/rows/` with a unique
/// `write_id`; a `200 {"ok": true}` is an acknowledgement.
pub struct Writers {
    stop: Arc<AtomicBool>,
    target: Arc<Mutex<SocketAddr>>,
    acked: Arc<AtomicUsize>,
    handles: Vec<JoinHandle<WriteLog>>,
}

/// How writers name a base in their requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spelling {
    /// `/dtable-server/api/v1/dtables/<dashed uuid>/rows/`.
    Plain,
    /// Every other pass over the bases names each only in the query, percent-encoded as a
    /// dtable-server (Express) decodes it: `/dtable-server/api/v1/dtables/rows/?
    /// dtable%5Fuuid=<uuid with %2D dashes and its first hex letter encoded>`; the
    /// others as [`Spelling::Plain`]. One base, two spellings, as a client may mix.
    MixedEncoded,
}

/// The path (and query) of a write to `base` in the `round`-th pass over the bases
/// (rounds alternate spellings, so every base is written both ways).
fn write_target(base: &BaseUuid, round: usize, spelling: Spelling) -> String {
    if spelling == Spelling::Plain || round.is_multiple_of(2) {
        return format!("/dtable-server/api/v1/dtables/{}/rows/", base.dashed());
    }
    let mut encoded = String::new();
    let mut letter_done = false;
    for c in base.dashed().chars() {
        match c {
            '-' => encoded.push_str("%2D"),
            'a'..='f' if !letter_done => {
                letter_done = true;
                encoded.push_str(&format!("%{:02X}", c as u32));
            }
            c => encoded.push(c),
        }
    }
    format!("/dtable-server/api/v1/dtables/rows/?dtable%5Fuuid={encoded}")
}

impl Writers {
    pub fn start(
        target: SocketAddr,
        bases: &[BaseUuid],
        threads: usize,
        max_per_thread: usize,
    ) -> Writers {
        Self::start_spelled(target, bases, threads, max_per_thread, Spelling::Plain)
    }

    /// [`Writers::start`], the bases named as `spelling` says.
    pub fn start_spelled(
        target: SocketAddr,
        bases: &[BaseUuid],
        threads: usize,
        max_per_thread: usize,
        spelling: Spelling,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(Mutex::new(target));
        let acked = Arc::new(AtomicUsize::new(0));
        // Write ids are unique across every `Writers` of this process too, so
        // runs sharing a storage never confuse each other's writes.
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let run = format!(
            "{}.{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let handles = (0..threads)
            .map(|t| {
                let prefix = format!("{run}-w{t}");
                let (stop, target, acked) = (stop.clone(), target.clone(), acked.clone());
                let bases = bases.to_vec();
                thread::spawn(move || {
                    write_loop(
                        t,
                        threads,
                        &prefix,
                        &bases,
                        max_per_thread,
                        spelling,
                        &stop,
                        &target,
                        &acked,
                    )
                })
            })
            .collect();
        Writers {
            stop,
            target,
            acked,
            handles,
        }
    }

    /// Sends the following writes to `addr` (a new proxy).
    pub fn retarget(&self, addr: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Acknowledged writes so far.
    pub fn acknowledged(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more writes are acknowledged (at most `timeout`).
    pub fn wait_for_more(&self, n: usize, timeout: Duration) -> Result<()> {
        let goal = self.acknowledged() + n;
        wait_until(timeout, &format!("{n} more acknowledged writes"), || {
            Ok((self.acknowledged() >= goal).then_some(()))
        })
    }

    /// Stops the writers and returns what they did.
    pub fn stop(self) -> WriteLog {
        self.stop.store(true, Ordering::SeqCst);
        let mut log = WriteLog::default();
        for h in self.handles {
            if let Ok(l) = h.join() {
                log.absorb(l);
            }
        }
        log
    }
}

#[allow(clippy::too_many_arguments)]
fn write_loop(
    t: usize,
    threads: usize,
    prefix: &str,
    bases: &[BaseUuid],
    max: usize,
    spelling: Spelling,
    stop: &AtomicBool,
    target: &Mutex<SocketAddr>,
    acked: &AtomicUsize,
) -> WriteLog {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut log = WriteLog::default();
    let mut conn: Option<(SocketAddr, Connection)> = None;
    for i in 0..max {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline || bases.is_empty() {
            break;
        }
        let base = &bases[(t + i * threads) % bases.len()];
        let write_id = format!("{prefix}-{i}");
        let addr = *target.lock().unwrap_or_else(|p| p.into_inner());
        if conn.as_ref().is_some_and(|(a, _)| *a != addr) {
            conn = None;
        }
        let c = match conn.as_mut() {
            Some((_, c)) => c,
            None => match Connection::open(addr) {
                Ok(c) => &mut conn.insert((addr, c)).1,
                Err(_) => {
                    log.failed += 1;
                    thread::sleep(Duration::from_millis(5));
                    continue;
                }
            },
        };
        let path = write_target(base, (t + i * threads) / bases.len(), spelling);
        let body = serde_json::json!({ "write_id": write_id }).to_string();
        let res = c.request(
            "POST",
            &path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        let ok = match &res {
            Ok(r) if r.status == 200 => r
                .json()
                .ok()
                .filter(|v| v["ok"] == true)
                .and_then(|v| v["server"].as_str().map(str::to_string)),
            _ => None,
        };
        match ok {
            Some(server) => {
                log.acked
                    .push((base.as_str().to_string(), write_id, server));
                acked.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                log.failed += 1;
                if let Ok(r) = &res {
                    *log.refused.entry(r.status).or_default() += 1;
                }
                let closed = match &res {
                    Ok(r) => r
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close")),
                    Err(_) => true,
                };
                if closed {
                    conn = None;
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------
// SeaTable's nginx proxy
// ---------------------------------------------------------------------------

/// An nginx configuration in the style of SeaTable's documented
/// `dtable-server-proxy`: one `upstream` per server, a `map $request_uri` of
/// case-insensitive regexes (first match wins) and `proxy_pass` to the
/// mapped upstream. `rules` are `(regex, server)`; server names must be
/// nginx identifiers (e.g. `dtable_server_1`).
pub fn seatable_nginx_conf(
    listen: SocketAddr,
    servers: &[(String, SocketAddr)],
    default: &str,
    rules: &[(&str, &str)],
) -> String {
    let mut upstreams = String::new();
    for (name, addr) in servers {
        upstreams.push_str(&format!(
            "    upstream {name} {{ server {addr}; keepalive 16; }}\n"
        ));
    }
    let mut map = format!("        default {default};\n");
    for (re, server) in rules {
        map.push_str(&format!("        \"~*{re}\" {server};\n"));
    }
    format!(
        r#"worker_processes 1;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
{upstreams}    map $request_uri $dtable_upstream {{
{map}    }}
    server {{
        listen {listen};
        keepalive_requests 100000;
        location / {{
            proxy_pass http://$dtable_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, server: &str, pid: u32, event: &str, base: Option<&str>) -> Event {
        Event {
            t,
            server: server.into(),
            pid,
            event: event.into(),
            base: base.map(str::to_string),
            write_id: None,
            rows: None,
            addr: None,
        }
    }

    #[test]
    fn double_service_finds_overlaps_only() {
        let x = Some("x");
        // a holds x 10..50; b loads x at 60 (after a stopped): fine.
        let ok = [
            ev(10, "a", 1, "load", x),
            ev(50, "a", 1, "stop", None),
            ev(60, "b", 2, "load", x),
        ];
        assert!(double_service(&ok).is_empty());
        // b loads x at 30 while a holds it until 50: double service.
        let bad = [
            ev(10, "a", 1, "load", x),
            ev(30, "b", 2, "load", x),
            ev(50, "a", 1, "stop", None),
        ];
        let d = double_service(&bad);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].base, "x");
        // The same server reloading after its own restart is not double service.
        let restart = [
            ev(10, "a", 1, "load", x),
            ev(20, "a", 1, "stop", None),
            ev(20, "a", 3, "load", x),
        ];
        assert!(double_service(&restart).is_empty());
        // A holder that never stopped holds forever.
        let killed = [ev(10, "a", 1, "load", x), ev(99, "b", 2, "load", x)];
        assert_eq!(double_service(&killed).len(), 1);
    }

    #[test]
    fn spread_bases_cover_every_first_digit() {
        let b = spread_bases(32);
        let firsts: HashSet<u8> = b.iter().map(|u| u.as_bytes()[0]).collect();
        assert_eq!(firsts.len(), 16);
        assert_eq!(b.iter().collect::<HashSet<_>>().len(), 32, "distinct");
    }

    #[test]
    fn missing_writes_reads_storage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("aa.json"),
            r#"{"base": "aa", "rows": ["1", "2"]}"#,
        )
        .unwrap();
        let acked =
            [("aa", "1"), ("aa", "3"), ("bb", "1")].map(|(a, b)| (a.to_string(), b.to_string()));
        assert_eq!(
            missing_writes(dir.path(), &acked).unwrap(),
            vec![("aa".into(), "3".into()), ("bb".into(), "1".into())]
        );
    }
}
