//! Child processes of the tests (fake upstreams, Envoy, nginx): each one is
//! started in its own process group and the whole group is killed when its
//! handle is dropped, so no worker outlives a test, even one that panics.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::http::{self, Response};

/// How long a process gets to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process and its process group; killed (the group, with SIGKILL) on drop.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Spawns `cmd` (a `Command` or a `&mut Command`) as the leader of a new process
    /// group.
    pub fn spawn(mut cmd: impl std::borrow::BorrowMut<Command>, what: &str) -> Result<Proc> {
        use std::os::unix::process::CommandExt;
        let cmd = cmd.borrow_mut();
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {what}: {cmd:?}"))?;
        Ok(Proc {
            child,
            what: what.to_string(),
        })
    }

    /// Runs `cmd` (as [`Proc::spawn`]) to its end, waiting for it at most `timeout`
    /// (then it is killed): its exit status.
    pub fn run(cmd: Command, what: &str, timeout: Duration) -> Result<std::process::ExitStatus> {
        let mut proc = Proc::spawn(cmd, what)?;
        wait_until(timeout, what, || Ok(proc.exited()))
    }

    /// The pid (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process group and reaps the leader. Idempotent.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let pgid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) has no memory-safety preconditions; a negative pid
            // names the process group we created for this child.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = self.child.kill();
        } else {
            // The leader is gone; its group may still hold workers.
            let pgid = self.child.id() as libc::pid_t;
            // SAFETY: as above.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }

    /// SIGKILL of the leader alone, reaped: the rest of its group (a hook it ran)
    /// lives on, as after a real crash, until this handle is dropped.
    pub fn kill_leader(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` to the leader only (e.g. `libc::SIGHUP` to reload nginx).
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        if rc != 0 {
            bail!(
                "kill({}, {signal}) of {}: {}",
                self.child.id(),
                self.what,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An error that ends a [`wait_until`] at once (e.g. the process exited),
/// where any other error is taken as "not yet".
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Polls `check` every 20 ms until it returns `Ok(Some(v))`, for at most
/// `timeout`. An error from `check` counts as "not yet", unless it is a
/// [`Fatal`], which is returned at once. On timeout, the error names `what`
/// and carries the last error `check` returned.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) if e.is::<Fatal>() => {
                return Err(e.context(format!("while waiting for {what}")));
            }
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn connectable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------
// Fake dtable-server
// ---------------------------------------------------------------------------

/// A running `echo-upstream` (a fake dtable-server), killed on drop.
pub struct Upstream {
    /// Its name: what it answers in `server` and `x-served-by`.
    pub name: String,
    /// Where it listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    proc: Proc,
}

impl Upstream {
    /// Starts an echo upstream named `name` on a free loopback port.
    ///
    /// The binary is `$ECHO_UPSTREAM_BIN`, else `echo-upstream` in the
    /// target directory of the running test (cargo builds it for the
    /// integration tests of this package).
    pub fn start(name: &str) -> Result<Upstream> {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts it on a given address (e.g. the one of a stopped upstream, to
    /// model a restarted dtable-server).
    pub fn start_on(name: &str, listen: SocketAddr) -> Result<Upstream> {
        let bin = crate::echo_upstream_bin()?;
        let mut cmd = Command::new(&bin);
        cmd.args(["--name", name, "--listen", &listen.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn(cmd, &format!("echo-upstream {name}"))?;
        let stdout = proc.child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| anyhow!("echo-upstream {name} did not print `ready` in time"))?;
        let addr = line
            .trim()
            .strip_prefix("ready ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow!("echo-upstream {name} printed {line:?}, not `ready ADDR`"))?;
        Ok(Upstream {
            name: name.to_string(),
            addr,
            proc,
        })
    }

    /// Kills it now (a dtable-server going down).
    pub fn stop(&mut self) {
        self.proc.kill();
    }
}

// ---------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------

static BASE_ID: AtomicU32 = AtomicU32::new(0);

/// A running Envoy, killed on drop. Its files (bootstrap, log) live in a
/// temporary directory removed on drop.
pub struct Envoy {
    /// The admin interface.
    pub admin_addr: SocketAddr,
    /// The address of the first listener of the bootstrap.
    pub listener_addr: SocketAddr,
    /// Every listener: (name, bound address).
    pub listeners: Vec<(String, SocketAddr)>,
    dir: tempfile::TempDir,
    proc: Proc,
}

impl Envoy {
    /// Starts Envoy on `bootstrap_yaml` with `--concurrency 1 -l warn`.
    /// Ports may be 0 (admin and listeners): the bound addresses are read
    /// back from Envoy. Returns once `/ready` answers `LIVE` (at most
    /// [`START_TIMEOUT`]); the error carries Envoy's log.
    pub fn start(bootstrap_yaml: &str) -> Result<Envoy> {
        Self::start_with_args(bootstrap_yaml, &[])
    }

    /// As [`Envoy::start`], with extra command-line arguments (e.g.
    /// `["--component-log-level", "wasm:debug"]`).
    pub fn start_with_args(bootstrap_yaml: &str, extra_args: &[&str]) -> Result<Envoy> {
        let bin = crate::envoy_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("seashard-envoy-")
            .tempdir()?;
        let config = dir.path().join("bootstrap.yaml");
        std::fs::write(&config, bootstrap_yaml)?;
        let admin_path = dir.path().join("admin-address");
        let log = File::create(dir.path().join("envoy.log"))?;
        // Unique per process and per Envoy, so parallel tests never share
        // shared-memory names (hot restart is off anyway).
        let base_id =
            (std::process::id() % 100_000) * 100 + BASE_ID.fetch_add(1, Ordering::Relaxed);
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config)
            .args(["--base-id", &base_id.to_string()])
            .args(["--concurrency", "1", "-l", "warn", "--disable-hot-restart"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(extra_args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = Proc::spawn(cmd, "envoy")?;
        let mut envoy = Envoy {
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            listener_addr: "127.0.0.1:0".parse().unwrap(),
            listeners: Vec::new(),
            dir,
            proc,
        };
        envoy
            .wait_ready()
            .with_context(|| format!("Envoy did not start; its log:\n{}", envoy.logs()))?;
        Ok(envoy)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let admin_path = self.dir.path().join("admin-address");
        let deadline = Instant::now() + START_TIMEOUT;
        let left = || deadline.saturating_duration_since(Instant::now());
        let admin: SocketAddr = wait_until(left(), "Envoy's admin address", || {
            if let Some(status) = self.proc.exited() {
                return Err(Fatal(format!("envoy exited: {status}")).into());
            }
            Ok(std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok()))
        })?;
        self.admin_addr = admin;
        wait_until(left(), "Envoy's /ready to answer LIVE", || {
            if let Some(status) = self.proc.exited() {
                return Err(Fatal(format!("envoy exited: {status}")).into());
            }
            let r = http::get(admin, "/ready", &[])?;
            Ok((r.status == 200 && r.text().trim() == "LIVE").then_some(()))
        })?;
        let listeners = http::get(admin, "/listeners?format=json", &[])?.json()?;
        for l in listeners["listener_statuses"]
            .as_array()
            .ok_or_else(|| anyhow!("unexpected /listeners answer: {listeners}"))?
        {
            let sa = &l["local_address"]["socket_address"];
            let addr: SocketAddr = format!(
                "{}:{}",
                sa["address"].as_str().unwrap_or_default(),
                sa["port_value"].as_u64().unwrap_or_default()
            )
            .parse()
            .with_context(|| format!("listener address in {l}"))?;
            // A wildcard listener is reached on loopback.
            let addr = if addr.ip().is_unspecified() {
                SocketAddr::new([127, 0, 0, 1].into(), addr.port())
            } else {
                addr
            };
            let name = l["name"].as_str().unwrap_or_default().to_string();
            self.listeners.push((name, addr));
        }
        self.listener_addr = self
            .listeners
            .first()
            .map(|(_, a)| *a)
            .ok_or_else(|| anyhow!("Envoy has no listener"))?;
        Ok(())
    }

    /// Everything Envoy wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// `GET path` on the admin interface (e.g. `/stats?filter=wasm`).
    pub fn admin_get(&self, path: &str) -> Result<Response> {
        http::get(self.admin_addr, path, &[])
    }

    /// The value of one counter or gauge from `/stats`, `None` if absent.
    pub fn stat(&self, name: &str) -> Result<Option<u64>> {
        let text = self
            .admin_get(&format!("/stats?filter=^{}$", regex_escape(name)))?
            .text();
        Ok(text.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        }))
    }

    /// The temporary directory holding the bootstrap and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The underlying process (pid, kill, signal).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------

/// A running nginx (master and workers in one process group), killed on drop.
pub struct Nginx {
    /// The address given to [`Nginx::start`], reachable once started.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    proc: Proc,
}

impl Nginx {
    /// Starts nginx with the configuration text `conf` and waits (at most
    /// [`START_TIMEOUT`]) until `listen` accepts connections.
    ///
    /// The harness adds on the command line `daemon off; pid ...;
    /// error_log ...;` (main context), so `conf` must not set these; the
    /// prefix (`-p`) is a temporary directory, so relative paths in `conf`
    /// (logs, temp files) land there; `logs/` and `tmp/` exist in it.
    /// `conf` must `listen` on `listen`.
    pub fn start(conf: &str, listen: SocketAddr) -> Result<Nginx> {
        let bin = crate::nginx_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("seashard-nginx-")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("logs"))?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let conf_path = dir.path().join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let globals = format!(
            "daemon off; pid {}; error_log {} warn;",
            dir.path().join("nginx.pid").display(),
            dir.path().join("logs/error.log").display()
        );
        let mut cmd = Command::new(&bin);
        cmd.arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", &globals])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(dir.path().join("logs/stdout.log"))?)
            .stderr(File::create(dir.path().join("logs/stderr.log"))?);
        let proc = Proc::spawn(cmd, "nginx")?;
        let mut nginx = Nginx {
            addr: listen,
            dir,
            proc,
        };
        let started = wait_until(START_TIMEOUT, "nginx to accept connections", || {
            if let Some(status) = nginx.proc.exited() {
                return Err(Fatal(format!("nginx exited: {status}")).into());
            }
            Ok(connectable(listen).then_some(()))
        });
        if let Err(e) = started {
            return Err(e.context(format!("nginx did not start; its log:\n{}", nginx.logs())));
        }
        Ok(nginx)
    }

    /// nginx's stderr and error log.
    pub fn logs(&self) -> String {
        let read = |p: &str| std::fs::read_to_string(self.dir.path().join(p)).unwrap_or_default();
        format!("{}{}", read("logs/stderr.log"), read("logs/error.log"))
    }

    /// Reloads the configuration from `conf` (written over the old one,
    /// then SIGHUP to the master), as an operator's `nginx -s reload`.
    pub fn reload(&self, conf: &str) -> Result<()> {
        std::fs::write(self.dir.path().join("nginx.conf"), conf)?;
        self.proc.signal(libc::SIGHUP)
    }

    /// The prefix directory (`-p`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The master process (its workers are its children, in its process group).
    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Stops nginx as `nginx -s stop` does: SIGTERM to the master, which stops
    /// and reaps its workers, then exits; waits for that at most 5 s, then kills
    /// the group (as drop does, which can leave workers unreaped when the
    /// master dies with them).
    pub fn stop(&mut self) {
        if self.proc.signal(libc::SIGTERM).is_ok() {
            let _ = wait_until(Duration::from_secs(5), "nginx to stop", || {
                Ok(self.proc.exited().map(|_| ()))
            });
        }
        self.proc.kill();
    }
}

/// A path to a binary: `$VAR` if set (must exist), else the first existing
/// of `candidates`, else an error telling how to get it.
pub(crate) fn find_binary(var: &str, candidates: &[PathBuf], hint: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("${var} is {}, which is not a file ({hint})", p.display());
    }
    first_file(candidates).ok_or_else(|| {
        anyhow!(
            "no binary found: ${var} is unset and none of {:?} exists ({hint})",
            candidates
        )
    })
}

/// The first of `candidates` that is a file.
pub(crate) fn first_file(candidates: &[PathBuf]) -> Option<PathBuf> {
    candidates.iter().find(|p| p.is_file()).cloned()
}
