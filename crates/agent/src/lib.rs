//! The restart agent (`seactl agent`): a small HTTP(S) server on a dtable-server's
//! host that runs one configured command on `POST /restart` and answers once the
//! server answers `pong` again, so a control plane restarts it through its HTTP hook
//! kind, without SSH:
//!
//! ```toml
//! # seashard.toml, [[server]]; AGENT_AUTH holds `Bearer TOKEN`
//! restart = { kind = "http", method = "POST", url = "http://10.0.0.11:5055/restart",
//!             headers_env = { authorization = "AGENT_AUTH" } }
//! ```
//!
//! - `POST /restart` needs `Authorization: Bearer TOKEN` (compared in constant
//!   time, [`constant_time_eq`]); else `401`.
//! - One restart at a time: a call while one runs *joins* it and gets its outcome
//!   (`"joined": true`); the command never runs twice at once. A restart runs to its
//!   end even when its callers hang up.
//! - The command is an argv (no shell), run in its own process group with stdin
//!   closed, stdout discarded, stderr kept (the last 64 KiB), and the token's
//!   environment variable removed from its environment. Past `command_timeout` the
//!   whole group is killed (SIGKILL) and the answer is a failure.
//! - After exit 0, `health_url` (`http://127.0.0.1:5000/ping/`) is polled until it
//!   answers `pong` or `health_timeout` passed.
//! - Answers are JSON: `200 {"ok": true, "took_ms", ...}`; `502` when the command
//!   could not run or failed (its exit status or signal and an excerpt of its stderr,
//!   redacted: the token, words that look like secrets and what follows them, long
//!   random-looking strings); `504` when the command or the health wait timed out.
//! - `GET /healthz` is open and carries no secret.
//!
//! Configuration: [`AgentConfig`] (TOML, `crates/agent/agent.example.toml`); the
//! token from an environment variable (default `SEASHARD_AGENT_TOKEN`) or a file,
//! never from the TOML, never logged. With `[tls]` (cert and key, as `[api.tls]`)
//! the agent speaks HTTPS only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use daemon::duration::format_duration;
use daemon::secret::{REDACTED, names_a_secret, redact_url, scrub, shown_argv};
use daemon::tls::{self, ApiTls, TlsError};
use daemon::token::{bearer, constant_time_eq};

/// The health URL polled after a restart, by default: dtable-server on this host.
pub const DEFAULT_HEALTH_URL: &str = "http://127.0.0.1:5000/ping/";
/// The environment variable holding the token when neither `token_env` nor
/// `token_file` is set.
pub const DEFAULT_TOKEN_ENV: &str = "SEASHARD_AGENT_TOKEN";
/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Default `command_timeout`. With the default `health_timeout` the agent answers
/// within 110 s, inside the control plane's default `restart_timeout` (120 s).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `health_timeout`.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(50);

/// The most of the command's stderr kept (its end).
const STDERR_KEPT: usize = 64 * 1024;
/// The most of the (redacted) stderr shown in an answer, in characters (its end).
const STDERR_EXCERPT: usize = 2000;
/// How long, once the command exited, its stderr may still take to close (a
/// process it left behind may hold it open: it is then read and discarded).
const STDERR_GRACE: Duration = Duration::from_millis(300);
/// How long a killed command may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two health checks.
const HEALTH_POLL: Duration = Duration::from_millis(200);
/// The longest one health check may take.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Random-looking runs of at least this many characters are redacted.
const RANDOM_RUN: usize = 24;

/// Why the agent cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}", .problems.join("; "))]
    Invalid { problems: Vec<String> },
    /// The token cannot be had; names the variable or file, never a value.
    #[error("token: {0}")]
    Token(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the agent's HTTP server failed: {0}")]
    Failed(String),
}

/// The agent's configuration (TOML). Paths are relative to the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `HOST:PORT` to listen on (required).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The restart command, an argv (no shell), e.g.
    /// `["docker", "restart", "dtable-server"]` (required).
    #[serde(default)]
    pub command: Vec<String>,
    /// Longest the command may run; then its process group is killed.
    #[serde(default = "default_command_timeout", with = "daemon::duration::serde")]
    pub command_timeout: Duration,
    /// A URL answering `pong` once the server is up (plain `http://`).
    #[serde(default = "default_health_url")]
    pub health_url: String,
    /// How long the server has to answer `pong` once the command exited 0.
    #[serde(default = "default_health_timeout", with = "daemon::duration::serde")]
    pub health_timeout: Duration,
    /// The environment variable holding the bearer token (default
    /// `SEASHARD_AGENT_TOKEN` unless `token_file` is set).
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file holding the bearer token (surrounding whitespace ignored; keep it
    /// mode 0600).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// `[tls]`: HTTPS only, with this certificate and key (PEM).
    #[serde(default)]
    pub tls: Option<ApiTls>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: None,
            command: Vec::new(),
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            health_url: DEFAULT_HEALTH_URL.to_owned(),
            health_timeout: DEFAULT_HEALTH_TIMEOUT,
            token_env: None,
            token_file: None,
            tls: None,
        }
    }
}

fn default_command_timeout() -> Duration {
    DEFAULT_COMMAND_TIMEOUT
}
fn default_health_timeout() -> Duration {
    DEFAULT_HEALTH_TIMEOUT
}
fn default_health_url() -> String {
    DEFAULT_HEALTH_URL.to_owned()
}

impl AgentConfig {
    /// Reads and parses `path` (not validated: flags may still complete it); relative
    /// paths inside become relative to it.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = AgentConfig::parse(&text).map_err(|e| match e {
            AgentError::Parse { message, .. } => AgentError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(f) = &mut config.token_file {
            *f = dir.join(&*f);
        }
        if let Some(t) = &mut config.tls {
            for p in [&mut t.cert, &mut t.key] {
                *p = dir.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses TOML text (paths as written).
    pub fn parse(text: &str) -> Result<AgentConfig, AgentError> {
        toml::from_str(text).map_err(|e| AgentError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })
    }

    /// Everything wrong with it, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.listen.is_none() {
            p.push("listen: not set (HOST:PORT, e.g. 10.0.0.11:5055)".to_owned());
        }
        match self.command.first() {
            None => p.push(
                "command: not set (an argv, e.g. [\"docker\", \"restart\", \"dtable-server\"])"
                    .to_owned(),
            ),
            Some(program) if program.is_empty() => p.push("command[0]: empty".to_owned()),
            Some(_) => {}
        }
        if !self.health_url.starts_with("http://") {
            p.push(format!(
                "health_url: `{}` is not an http:// URL",
                redact_url(&self.health_url)
            ));
        }
        for (field, d) in [
            ("command_timeout", self.command_timeout),
            ("health_timeout", self.health_timeout),
        ] {
            if d.is_zero() {
                p.push(format!("{field}: must be more than 0"));
            }
        }
        if self.token_env.is_some() && self.token_file.is_some() {
            p.push("token_env and token_file: set one of them".to_owned());
        }
        if self.token_env.as_deref() == Some("") {
            p.push("token_env: empty".to_owned());
        }
        p
    }

    /// `Ok` when [`AgentConfig::problems`] finds none.
    pub fn validate(&self) -> Result<(), AgentError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(AgentError::Invalid { problems })
        }
    }

    /// The environment variable the token comes from, if it comes from one.
    pub fn token_var(&self) -> Option<&str> {
        match (&self.token_env, &self.token_file) {
            (Some(var), _) => Some(var),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TOKEN_ENV),
        }
    }

    /// Where the token comes from, for messages: `$VAR` or the file's path.
    pub fn token_source(&self) -> String {
        match (self.token_var(), &self.token_file) {
            (Some(var), _) => format!("${var}"),
            (None, Some(f)) => f.display().to_string(),
            (None, None) => String::new(),
        }
    }

    /// The command as messages and logs show it: arguments that look like they carry
    /// a secret are `<redacted>`, as a command hook's ([`shown_argv`]).
    pub fn shown_command(&self) -> String {
        shown_argv(&self.command).join(" ")
    }

    /// The bearer token, from its variable or file. Errors name the source, never a
    /// value.
    pub fn token(&self) -> Result<String, AgentError> {
        let token = match (self.token_var(), &self.token_file) {
            (Some(var), _) => {
                std::env::var(var).map_err(|_| AgentError::Token(format!("${var} is not set")))?
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    AgentError::Token(format!("cannot read {}: {}", path.display(), e.kind()))
                })?;
                warn_if_readable_by_others(path);
                text.trim().to_owned()
            }
            (None, None) => return Err(AgentError::Token("no source".into())),
        };
        check_token(&token)
            .map_err(|m| AgentError::Token(format!("{}: {m}", self.token_source())))?;
        Ok(token)
    }
}

/// A token must be long enough and fit in a header as it is.
fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is shorter than {MIN_TOKEN_LEN} characters"
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token holds a space, a control or a non-ASCII character".into());
    }
    Ok(())
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(m) = std::fs::metadata(path)
        && m.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", m.permissions().mode() & 0o777),
            "the token file can be read by others than its owner: chmod 600 it"
        );
    }
}

/// How one restart ended: the JSON of the answer (what matters first: a hook's
/// caller may show only the beginning of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The command exited 0 and the health URL answered `pong`.
    pub ok: bool,
    /// The step that failed: `command` or `health`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed: Option<&'static str>,
    /// The command's exit code; `null` when it did not exit by itself (killed by a
    /// signal, or never started).
    pub exit_status: Option<i32>,
    /// The signal that ended the command.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The command or the health wait ran past its timeout.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Why not (redacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The end of the command's stderr, redacted (on failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    /// This restart's number since the agent started (joined calls share it).
    pub restart: u64,
    /// This call joined a restart already running (another call started it).
    pub joined: bool,
    /// From the command's start to the end.
    pub took_ms: u64,
    pub command_ms: u64,
    /// The health wait, when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_ms: Option<u64>,
    pub health_url: String,
    /// When it started, ms since the Unix epoch.
    pub started_at_ms: u64,
}

impl Outcome {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> StatusCode {
        if self.ok {
            StatusCode::OK
        } else if self.timed_out {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        }
    }
}

/// A restart in progress: its outcome, once there is one.
type Pending = watch::Receiver<Option<Arc<Outcome>>>;

/// The agent's state, shared by the handlers.
struct Agent {
    config: AgentConfig,
    token: String,
    /// Scrubbed from every text the command produced: the token, as it is and as
    /// a header value.
    secrets: Vec<String>,
    /// The command as shown (arguments that look like secrets redacted).
    shown: String,
    running: Mutex<Option<Pending>>,
    restarts: AtomicU64,
    last: Mutex<Option<Arc<Outcome>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Agent {
    fn new(config: AgentConfig, token: String) -> Agent {
        let shown = config.shown_command();
        let secrets = vec![format!("Bearer {token}"), token.clone()];
        Agent {
            config,
            token,
            secrets,
            shown,
            running: Mutex::new(None),
            restarts: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    /// The restart in progress, if one is.
    fn pending(&self) -> Option<Pending> {
        lock(&self.running)
            .as_ref()
            // A restart whose task is gone (it cannot send any more) is not joined.
            .filter(|rx| rx.has_changed().is_ok())
            .cloned()
    }

    /// Joins the restart in progress (`true`), or starts one.
    fn begin(self: &Arc<Self>) -> (Pending, bool) {
        let mut slot = lock(&self.running);
        if let Some(rx) = slot.as_ref().filter(|rx| rx.has_changed().is_ok()) {
            return (rx.clone(), true);
        }
        let (tx, rx) = watch::channel(None);
        *slot = Some(rx.clone());
        let n = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        let agent = self.clone();
        // Its own task: it runs to its end even if every caller hangs up.
        tokio::spawn(async move {
            let outcome = Arc::new(agent.restart(n).await);
            *lock(&agent.last) = Some(outcome.clone());
            // Under the lock: a call from now on starts a new restart, a call before
            // it has its receiver and gets this outcome.
            let mut slot = lock(&agent.running);
            *slot = None;
            tx.send_replace(Some(outcome));
        });
        (rx, false)
    }

    /// One restart: the command, then the health wait.
    async fn restart(&self, n: u64) -> Outcome {
        let started = Instant::now();
        let started_at_ms = now_ms();
        tracing::info!(restart = n, command = %self.shown, "restart: running the command");
        let run = run_command(
            &self.config.command,
            self.config.command_timeout,
            self.config.token_var(),
        )
        .await;
        let command_ms = ms(started.elapsed());
        let mut outcome = Outcome {
            ok: false,
            error: None,
            failed: None,
            exit_status: run.status.and_then(|s| s.code()),
            signal: run.status.and_then(|s| {
                use std::os::unix::process::ExitStatusExt as _;
                s.signal()
            }),
            timed_out: run.timed_out,
            stderr: None,
            restart: n,
            joined: false,
            took_ms: command_ms,
            command_ms,
            health_ms: None,
            health_url: redact_url(&self.config.health_url),
            started_at_ms,
        };
        let cmd = short(&self.shown, 80);
        let command_error = if let Some(e) = &run.spawn_error {
            Some(format!("cannot run the command: {e} (`{cmd}`)"))
        } else if run.timed_out {
            Some(format!(
                "the command did not finish within {}: its process group was killed (`{cmd}`)",
                format_duration(self.config.command_timeout)
            ))
        } else {
            match run.status {
                Some(s) if s.success() => None,
                Some(s) => Some(format!("the command failed: {s} (`{cmd}`)")),
                None => Some(format!("the command gave no exit status (`{cmd}`)")),
            }
        };
        if let Some(e) = command_error {
            outcome.error = Some(scrub(&e, &self.secrets));
            outcome.failed = Some("command");
            outcome.stderr = Some(stderr_excerpt(&run.stderr, run.stderr_cut, &self.secrets));
            tracing::warn!(
                restart = n,
                error = outcome.error.as_deref().unwrap_or_default(),
                stderr = outcome.stderr.as_deref().unwrap_or_default(),
                took_ms = outcome.took_ms,
                "restart failed"
            );
            return outcome;
        }
        let health = Instant::now();
        let healthy = wait_healthy(&self.config.health_url, self.config.health_timeout).await;
        outcome.health_ms = Some(ms(health.elapsed()));
        outcome.took_ms = ms(started.elapsed());
        match healthy {
            Ok(()) => {
                outcome.ok = true;
                tracing::info!(
                    restart = n,
                    took_ms = outcome.took_ms,
                    command_ms,
                    health_ms = outcome.health_ms.unwrap_or_default(),
                    "restarted and healthy"
                );
            }
            Err(e) => {
                outcome.error = Some(scrub(&e, &self.secrets));
                outcome.failed = Some("health");
                outcome.timed_out = true;
                tracing::warn!(
                    restart = n,
                    error = outcome.error.as_deref().unwrap_or_default(),
                    took_ms = outcome.took_ms,
                    "restart failed: the server is not healthy"
                );
            }
        }
        outcome
    }
}

/// `s`, cut after `max` characters.
fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(max).collect::<String>())
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(ms)
        .unwrap_or_default()
}

/// What running the command gave.
struct CommandRun {
    /// Its exit status, when it was reaped.
    status: Option<std::process::ExitStatus>,
    /// It could not be started.
    spawn_error: Option<String>,
    timed_out: bool,
    /// The end of its stderr (at most [`STDERR_KEPT`] bytes)...
    stderr: Vec<u8>,
    /// ... and whether its beginning was dropped.
    stderr_cut: bool,
}

/// The command's stderr as it is read.
#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    cut: bool,
    /// Taken: what comes later is read and discarded.
    done: bool,
}

/// Runs `argv` in its own process group, killing the group past `timeout`.
async fn run_command(argv: &[String], timeout: Duration, token_var: Option<&str>) -> CommandRun {
    let mut run = CommandRun {
        status: None,
        spawn_error: None,
        timed_out: false,
        stderr: Vec::new(),
        stderr_cut: false,
    };
    let Some((program, args)) = argv.split_first() else {
        run.spawn_error = Some("the command is empty".into());
        return run;
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(var) = token_var {
        cmd.env_remove(var);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            run.spawn_error = Some(e.to_string());
            return run;
        }
    };
    let group = child.id();
    let captured = Arc::new(Mutex::new(Captured::default()));
    let reader = child.stderr.take().map(|mut stderr| {
        let captured = captured.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 4096];
            loop {
                let n = match stderr.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut c = lock(&captured);
                if c.done {
                    continue;
                }
                c.bytes.extend_from_slice(&chunk[..n]);
                if c.bytes.len() > 2 * STDERR_KEPT {
                    let cut = c.bytes.len() - STDERR_KEPT;
                    c.bytes.drain(..cut);
                    c.cut = true;
                }
            }
        })
    });
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => run.status = Some(status),
        Ok(Err(e)) => run.spawn_error = Some(format!("waiting for it: {e}")),
        Err(_) => {
            run.timed_out = true;
            // The group first (what the command started), while its leader is not
            // reaped yet, so the group id cannot have been reused.
            if let Some(pgid) = group {
                kill_group(pgid);
            }
            let _ = child.start_kill();
            if let Ok(Ok(status)) = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await {
                run.status = Some(status);
            }
        }
    }
    if let Some(reader) = reader {
        // EOF, unless something the command left behind holds stderr open: then
        // it is read on (and discarded) rather than closed under it (SIGPIPE).
        let _ = tokio::time::timeout(STDERR_GRACE, reader).await;
    }
    let mut c = lock(&captured);
    c.done = true;
    let mut bytes = std::mem::take(&mut c.bytes);
    if bytes.len() > STDERR_KEPT {
        bytes.drain(..bytes.len() - STDERR_KEPT);
        c.cut = true;
    }
    run.stderr = bytes;
    run.stderr_cut = c.cut;
    run
}

/// SIGKILL to every process of group `pgid`. Never to group 0 (the agent's own) or
/// -1 (every process).
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid > 1 {
        // SAFETY: kill(2) takes two integers and touches no memory of this process.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Polls `url` until it answers `pong` or `timeout` passed.
async fn wait_healthy(url: &str, timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let h = daemon::health::check(
            url,
            HEALTH_CHECK_TIMEOUT.min(left.max(Duration::from_millis(10))),
        )
        .await;
        if h.up {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{} did not answer pong within {}: {}",
                redact_url(url),
                format_duration(timeout),
                h.error.unwrap_or_default()
            ));
        }
        tokio::time::sleep(HEALTH_POLL.min(timeout.saturating_sub(start.elapsed()))).await;
    }
}

/// The end of a command's stderr as an answer may show it: `raw` (whose beginning
/// was dropped if `cut`) without its first, partial line, redacted ([`redact`]),
/// then its last [`STDERR_EXCERPT`] characters.
fn stderr_excerpt(raw: &[u8], cut: bool, secrets: &[String]) -> String {
    let text = String::from_utf8_lossy(raw);
    let text = if cut {
        text.split_once('\n').map_or("", |(_, rest)| rest)
    } else {
        &text
    };
    let redacted = redact(text, secrets);
    let redacted = redacted.trim_end();
    let count = redacted.chars().count();
    if count <= STDERR_EXCERPT {
        return redacted.to_owned();
    }
    let tail: String = redacted.chars().skip(count - STDERR_EXCERPT).collect();
    // From a line's start when one is in sight.
    let tail = match tail.split_once('\n') {
        Some((_, rest)) if !rest.is_empty() => rest.to_owned(),
        _ => tail,
    };
    format!("…{tail}")
}

/// `text` with what looks like a secret replaced by `<redacted>`: every one of
/// `secrets`; on each line, whatever follows the first word that names a secret
/// ([`names_a_secret`]: `token`, `password`, `key`, `authorization`,
/// ...; `password=x` keeps `password=`); and random-looking runs
/// (at least 24 letters, digits, `+`, `=`, `_`, `-`, with a digit and both cases, or
/// at least 32 hex digits). Best effort: a secret in plain words is not recognized.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let text = scrub(text, secrets);
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&redact_runs(&redact_after_marker(line)));
    }
    out
}

/// `line` with everything after its first secret-naming word (and that word's
/// own `=value` or `:value`) redacted.
fn redact_after_marker(line: &str) -> String {
    let mut start = 0;
    for word in line.split_inclusive(char::is_whitespace) {
        let bare = word.trim_end();
        if names_a_secret(bare) {
            // Keep the key: up to its first `=` or `:` (with it; not a URL's `://`),
            // else the whole word.
            let key_len = bare
                .char_indices()
                .find(|&(i, c)| c == '=' || (c == ':' && !bare[i..].starts_with("://")))
                .map_or(word.len(), |(i, _)| i + 1);
            let kept = &line[..start + key_len];
            let rest = line[start + key_len..].trim();
            if rest.is_empty() || rest == REDACTED {
                return line.to_owned();
            }
            let sep = if kept.ends_with(char::is_whitespace) || kept.ends_with('=') {
                ""
            } else {
                " "
            };
            return format!("{kept}{sep}{REDACTED}");
        }
        start += word.len();
    }
    line.to_owned()
}

/// `line` with random-looking runs redacted.
fn redact_runs(line: &str) -> String {
    let is_run_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '=' | '_' | '-');
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find(is_run_char) {
        out.push_str(&rest[..i]);
        let run_rest = &rest[i..];
        let end = run_rest
            .find(|c: char| !is_run_char(c))
            .unwrap_or(run_rest.len());
        let run = &run_rest[..end];
        if looks_random(run) {
            out.push_str(REDACTED);
        } else {
            out.push_str(run);
        }
        rest = &run_rest[end..];
    }
    out.push_str(rest);
    out
}

fn looks_random(run: &str) -> bool {
    let digit = run.bytes().any(|b| b.is_ascii_digit());
    let upper = run.bytes().any(|b| b.is_ascii_uppercase());
    let lower = run.bytes().any(|b| b.is_ascii_lowercase());
    let hex = run.bytes().all(|b| b.is_ascii_hexdigit());
    (run.len() >= RANDOM_RUN && digit && upper && lower) || (run.len() >= 32 && hex)
}

/// The peer of a connection, plain or TLS.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

impl Connected<axum::serve::IncomingStream<'_, tls::TlsIncoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tls::TlsIncoming>) -> Self {
        Peer(*stream.remote_addr())
    }
}

fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/restart", post(restart))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .with_state(agent)
}

async fn restart(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let given = bearer(&headers);
    if !constant_time_eq(given.as_bytes(), agent.token.as_bytes()) {
        tracing::warn!(%peer, "restart refused: no valid bearer token");
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(json!({
                "ok": false,
                "error": "POST /restart needs `Authorization: Bearer TOKEN` with the agent's token",
            })),
        )
            .into_response();
    }
    let (mut pending, joined) = agent.begin();
    tracing::info!(%peer, joined, "restart requested");
    let outcome = match pending.wait_for(Option::is_some).await {
        Ok(o) => o.clone(),
        Err(_) => None,
    };
    let Some(outcome) = outcome else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({ "ok": false, "error": "the restart ended without an outcome" })),
        )
            .into_response();
    };
    let mut answer = (*outcome).clone();
    answer.joined = joined;
    (answer.status(), axum::Json(answer)).into_response()
}

/// Open: whether a restart runs, and how the last one ended (no command output).
async fn healthz(State(agent): State<Arc<Agent>>) -> axum::Json<Value> {
    let last = lock(&agent.last).clone();
    axum::Json(json!({
        "ok": true,
        "restarting": agent.pending().is_some(),
        "restarts": agent.restarts.load(Ordering::Relaxed),
        "last": last.map(|o| json!({
            "ok": o.ok,
            "restart": o.restart,
            "took_ms": o.took_ms,
            "started_at_ms": o.started_at_ms,
        })),
    }))
}

async fn not_found(uri: axum::http::Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({
            "ok": false,
            "error": format!("no such route: {} (POST /restart, GET /healthz)", uri.path()),
        })),
    )
        .into_response()
}

/// A running agent.
pub struct RunningAgent {
    /// The bound address (port 0 in `listen` gets a free port).
    pub addr: SocketAddr,
    /// It speaks HTTPS.
    pub https: bool,
    agent: Arc<Agent>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), AgentError>>,
}

/// Validates `config` and `token`, loads the TLS files, binds and starts serving.
pub async fn start(config: AgentConfig, token: String) -> Result<RunningAgent, AgentError> {
    config.validate()?;
    check_token(&token).map_err(AgentError::Token)?;
    let tls = config
        .tls
        .as_ref()
        .map(tls::api_server_config)
        .transpose()?;
    let listen = config.listen.ok_or_else(|| AgentError::Invalid {
        problems: vec!["listen: not set".into()],
    })?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: listen,
        source,
    })?;
    let agent = Arc::new(Agent::new(config, token));
    let app = router(agent.clone()).into_make_service_with_connect_info::<Peer>();
    let (stop, mut stopped) = watch::channel(false);
    let until = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let https = tls.is_some();
    let server = match tls {
        Some(c) => {
            let incoming = tls::incoming(listener, c, "restart agent", || {})
                .map_err(|source| AgentError::Bind { addr, source })?;
            tokio::spawn(async move {
                axum::serve(incoming, app)
                    .with_graceful_shutdown(until)
                    .await
                    .map_err(|e| AgentError::Failed(e.to_string()))
            })
        }
        None => tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await
                .map_err(|e| AgentError::Failed(e.to_string()))
        }),
    };
    tracing::info!(
        %addr,
        https,
        command = %agent.shown,
        command_timeout = %format_duration(agent.config.command_timeout),
        health_url = %redact_url(&agent.config.health_url),
        health_timeout = %format_duration(agent.config.health_timeout),
        token = %agent.config.token_source(),
        "restart agent listening"
    );
    Ok(RunningAgent {
        addr,
        https,
        agent,
        stop,
        server,
    })
}

impl RunningAgent {
    /// A handle that asks the agent to stop (e.g. from a signal handler): it stops
    /// accepting, answers the calls in progress, and lets a running restart end.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }

    /// Serves until stopped (or the server fails); then waits for a running
    /// restart to end (within its own timeouts).
    pub async fn wait(self) -> Result<(), AgentError> {
        let result = match self.server.await {
            Ok(r) => r,
            Err(e) => Err(AgentError::Failed(e.to_string())),
        };
        if let Some(mut pending) = self.agent.pending() {
            tracing::info!("waiting for the running restart to end");
            let _ = pending.wait_for(Option::is_some).await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "agent-token-0123456789";

    fn secrets() -> Vec<String> {
        vec![format!("Bearer {TOKEN}"), TOKEN.to_owned()]
    }

    #[test]
    fn the_example_file_parses_and_is_valid() {
        let c = AgentConfig::parse(include_str!("../agent.example.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.command, ["docker", "restart", "dtable-server"]);
        assert_eq!(c.health_url, DEFAULT_HEALTH_URL);
        assert_eq!(c.token_var(), Some("SEASHARD_AGENT_TOKEN"));
        assert_eq!(c.command_timeout, Duration::from_secs(60));
    }

    #[test]
    fn the_examples_tls_section_parses_uncommented() {
        let text: String = include_str!("../agent.example.toml")
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with("[tls]")
                        || rest.starts_with("cert =")
                        || rest.starts_with("key =") =>
                {
                    format!("{rest}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.tls.unwrap().cert, Path::new("tls/agent.crt"));
    }

    #[test]
    fn problems_name_their_field() {
        let c = AgentConfig {
            health_url: "https://x/ping/".into(),
            command: vec![String::new()],
            token_env: Some("A".into()),
            token_file: Some("f".into()),
            command_timeout: Duration::ZERO,
            ..AgentConfig::default()
        };
        let p = c.problems();
        assert_eq!(p.len(), 5, "{p:?}");
        for field in [
            "listen",
            "command[0]",
            "health_url",
            "command_timeout",
            "token_env",
        ] {
            assert!(p.iter().any(|m| m.starts_with(field)), "{field}: {p:?}");
        }
        let err = AgentConfig::parse("listen = \"127.0.0.1:1\"\ncolour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("colour"), "{err}");
        let err = AgentConfig::parse("command_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
    }

    #[test]
    fn the_token_from_a_file_is_trimmed_and_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("agent.token");
        std::fs::write(&f, format!("{TOKEN}\n")).unwrap();
        let c = AgentConfig {
            token_file: Some(f.clone()),
            ..AgentConfig::default()
        };
        assert_eq!(c.token_var(), None);
        assert_eq!(c.token().unwrap(), TOKEN);
        std::fs::write(&f, "short-secret\n").unwrap();
        let err = c.token().unwrap_err().to_string();
        assert!(
            err.contains("agent.token") && err.contains("shorter"),
            "{err}"
        );
        assert!(!err.contains("short-secret"), "{err}");
        std::fs::write(&f, "with a space in the token\n").unwrap();
        assert!(c.token().is_err());
        let c = AgentConfig {
            token_env: Some("SEASHARD_AGENT_TEST_UNSET_VAR".into()),
            ..AgentConfig::default()
        };
        let err = c.token().unwrap_err().to_string();
        assert!(
            err.contains("$SEASHARD_AGENT_TEST_UNSET_VAR is not set"),
            "{err}"
        );
    }

    #[test]
    fn redaction() {
        let s = secrets();
        let r = |t: &str| redact(t, &s);
        assert_eq!(
            r(&format!("curl: sent Bearer {TOKEN} to x")),
            "curl: sent <redacted> to x"
        );
        assert_eq!(r(&format!("agent said {TOKEN}.")), "agent said <redacted>.");
        assert_eq!(
            r("login failed: password=hunter2 for bob"),
            "login failed: password=<redacted>"
        );
        assert_eq!(
            r("Authorization: Basic dXNlcjpwYXNz"),
            "Authorization: <redacted>"
        );
        assert_eq!(r("--api-key s3cr3t --verbose"), "--api-key <redacted>");
        assert_eq!(r("{\"token\": \"abc\"}"), "{\"token\": <redacted>");
        assert_eq!(r("no token"), "no token");
        assert_eq!(
            r("got aZ3kP9qL2mX8vB7nC4tR6yW1 back"),
            "got <redacted> back"
        );
        let hex = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c";
        assert_eq!(
            r(&format!("container {hex} gone")),
            "container <redacted> gone"
        );
        // Ordinary output stays readable.
        let plain = "Error response from daemon: No such container: dtable-server\n\
                     base 4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d at /opt/seatable/dtable_server_2024.py";
        assert_eq!(r(plain), plain);
    }

    #[test]
    fn the_excerpt_is_the_redacted_end_from_a_line_start() {
        let s = secrets();
        let mut raw = String::new();
        for i in 0..400 {
            raw.push_str(&format!("line {i}: password=p{i}-secret\n"));
        }
        raw.push_str("the end\n");
        let e = stderr_excerpt(raw.as_bytes(), false, &s);
        assert!(e.starts_with("…line "), "{e}");
        assert!(e.ends_with("the end"), "{e}");
        assert!(!e.contains("-secret"), "{e}");
        assert!(e.chars().count() <= STDERR_EXCERPT + 1);
        // A cut capture loses its first, partial line (a secret's tail, maybe).
        let e = stderr_excerpt(b"ken-abc-rest\nsecond line", true, &s);
        assert_eq!(e, "second line");
    }

    #[test]
    fn outcome_statuses() {
        let mut o = Outcome {
            ok: true,
            error: None,
            failed: None,
            exit_status: Some(0),
            signal: None,
            timed_out: false,
            stderr: None,
            restart: 1,
            joined: false,
            took_ms: 1,
            command_ms: 1,
            health_ms: Some(0),
            health_url: DEFAULT_HEALTH_URL.into(),
            started_at_ms: 0,
        };
        assert_eq!(o.status(), StatusCode::OK);
        o.ok = false;
        assert_eq!(o.status(), StatusCode::BAD_GATEWAY);
        o.timed_out = true;
        assert_eq!(o.status(), StatusCode::GATEWAY_TIMEOUT);
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["timed_out"], true);
        assert!(v.get("stderr").is_none());
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        // A grandchild in the command's group, which the kill must reach too.
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let start = Instant::now();
        let run = run_command(
            &["sh".into(), "-c".into(), script],
            Duration::from_millis(500),
            None,
        )
        .await;
        assert!(run.timed_out);
        assert_eq!(run.status.and_then(|s| s.code()), None);
        assert!(start.elapsed() < Duration::from_secs(5));
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let gone = || {
            std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone() {
            assert!(Instant::now() < deadline, "sleep {pid} still runs");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
