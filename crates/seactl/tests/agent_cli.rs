//! `seactl agent`, the restart agent, as real processes on loopback: a fake
//! dtable-server (a `pong` server that a restart script takes down and brings back),
//! restarts, joined calls, a wrong token, a failing and a hanging command, HTTPS, and
//! `seactl serve` rolling a map out through agents with its HTTP hook kind. Every
//! process is killed on drop; no secret may reach an answer or a log.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Proc, Serve, config_in, file_lines, free_port, text, wait_until};
use seashard_tests::http::https_client;
use seashard_tests::process::START_TIMEOUT;

const TOKEN: &str = "agent-cli-token-0a1b2c3d4e";
const CANARY: &str = "stderr-canary-password-9f8e";
const API_TOKEN: &str = "agent-cli-api-token-5566";

fn seactl() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seactl"));
    c.env_remove("SEASHARD_AGENT_CONFIG")
        .env_remove("SEASHARD_CA")
        .stdin(Stdio::null());
    c
}

/// A fake dtable-server: `GET /ping/` answers `pong`, or `503` while the file
/// `down` exists (a restart script creates and removes it). Counts the 503s.
struct FakeServer {
    port: u16,
    down: PathBuf,
    refused: Arc<AtomicUsize>,
}

fn fake_server(dir: &Path, name: &str) -> FakeServer {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let down = dir.join(format!("{name}.down"));
    let refused = Arc::new(AtomicUsize::new(0));
    let (d, r) = (down.clone(), refused.clone());
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let answer: &[u8] = if d.exists() {
                r.fetch_add(1, Ordering::Relaxed);
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\nConnection: close\r\n\r\nrestarting"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong"
            };
            let _ = c.write_all(answer);
        }
    });
    FakeServer {
        port,
        down,
        refused,
    }
}

impl FakeServer {
    fn health_url(&self) -> String {
        format!("http://127.0.0.1:{}/ping/", self.port)
    }
}

/// The restart of `server`: appends `name` to `log`, takes the server down, and
/// brings it back `back_after` later (in the background, as a service manager
/// would); exits 3 instead while `DIR/fail` exists.
fn restart_script(server: &FakeServer, name: &str, log: &Path, back_after: &str) -> Vec<String> {
    let fail = log.with_file_name("fail");
    sh(format!(
        "if [ -e {fail} ]; then echo \"restart of {name} failed\" >&2; exit 3; fi; \
         echo {name} >> {log}; touch {down}; \
         (sleep {back_after}; rm -f {down}) >/dev/null 2>&1 &",
        fail = fail.display(),
        log = log.display(),
        down = server.down.display(),
    ))
}

/// `seactl agent`, killed with its process group on drop; its log in a file.
struct Agent {
    proc: Proc,
    port: u16,
    log: PathBuf,
}

impl Agent {
    /// Everything it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `seactl agent ARGS -- COMMAND` on a free loopback port, the token in
/// `$SEASHARD_AGENT_TOKEN` (and in `$LEAKED_TOKEN`, which the command inherits);
/// returns once `/healthz` answers.
fn agent(dir: &Path, name: &str, args: &[&str], command: &[String]) -> Agent {
    let port = free_port();
    let log = dir.join(format!("agent-{name}.log"));
    let mut cmd = seactl();
    cmd.arg("agent")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .arg("--")
        .args(command)
        .env("SEASHARD_AGENT_TOKEN", TOKEN)
        .env("LEAKED_TOKEN", TOKEN)
        .env("CANARY", CANARY)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut a = Agent {
        proc: Proc::spawn(cmd, "seactl agent").unwrap(),
        port,
        log,
    };
    let ready = wait_until(START_TIMEOUT, "the agent's /healthz", || {
        if let Some(status) = a.proc.exited() {
            anyhow::bail!("seactl agent exited ({status})");
        }
        Ok(call(port, "GET", "/healthz", None)
            .is_some_and(|(s, _)| s == 200)
            .then_some(()))
    });
    if let Err(e) = ready {
        panic!("{e:#}: {}", a.log());
    }
    a
}

/// Agent `a` with `args` running `command`, its health URL `server`'s.
fn agent_a(dir: &Path, server: &FakeServer, args: &[&str], command: &[String]) -> Agent {
    let url = server.health_url();
    agent(dir, "a", &[&["--health-url", &url], args].concat(), command)
}

/// A fake server `s` and agent `a` for it whose command appends `run` to the file
/// `count`, then runs `then`: (server, agent, `count`).
fn counting_agent(dir: &Path, then: &str) -> (FakeServer, Agent, PathBuf) {
    let server = fake_server(dir, "s");
    let count = dir.join("count");
    let script = sh(format!("echo run >> {}{then}", count.display()));
    let a = agent_a(dir, &server, &[], &script);
    (server, a, count)
}

/// `METHOD path` on 127.0.0.1:`port` → status and body; `None` when nothing answers.
fn call(port: u16, method: &str, path: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Length: 0\r\n{auth}\r\n"
    );
    c.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// `POST /restart` with `auth`: status, body as JSON, body as text.
fn restart(port: u16, auth: Option<&str>) -> (u16, Value, String) {
    let (status, body) = call(port, "POST", "/restart", auth).expect("the agent answers");
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json, body)
}

/// `sh -c SCRIPT`.
fn sh(script: impl Into<String>) -> Vec<String> {
    vec!["sh".to_owned(), "-c".to_owned(), script.into()]
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [TOKEN, CANARY, API_TOKEN] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

#[test]
fn a_restart_runs_the_command_and_waits_for_pong() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(dir.path(), "s");
    let log = dir.path().join("restarts.log");
    let a = agent_a(
        dir.path(),
        &server,
        &["--health-timeout", "10s"],
        &restart_script(&server, "s", &log, "1"),
    );
    let (status, r, body) = restart(a.port, Some(&bearer()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["joined"], false, "{r}");
    assert_eq!(r["exit_status"], 0, "{r}");
    assert_eq!(r["restart"], 1, "{r}");
    assert_eq!(r["health_url"], server.health_url(), "{r}");
    // The server was down for a second after the command: the agent waited for it.
    assert!(r["health_ms"].as_u64().unwrap() >= 300, "{r}");
    assert!(r["took_ms"].as_u64().unwrap() >= r["health_ms"].as_u64().unwrap());
    assert!(server.refused.load(Ordering::Relaxed) > 0);
    assert!(!server.down.exists());
    assert_eq!(file_lines(&log), ["s"]);
    assert!(r.get("stderr").is_none(), "{r}");

    // /healthz is open: the last outcome, nothing of the command.
    let (status, body) = call(a.port, "GET", "/healthz", None).unwrap();
    assert_eq!(status, 200);
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["restarting"], false, "{h}");
    assert_eq!(h["restarts"], 1, "{h}");
    assert_eq!(h["last"]["ok"], true, "{h}");
    assert!(
        !body.contains("sh -c") && !body.contains("restarts.log"),
        "{body}"
    );

    // Unknown routes and methods.
    assert_eq!(call(a.port, "GET", "/restart", None).unwrap().0, 405);
    assert_eq!(call(a.port, "GET", "/nothing", None).unwrap().0, 404);
    drop(a);
}

#[test]
fn concurrent_calls_join_one_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, a, count) = counting_agent(dir.path(), "; sleep 2");
    let callers = 6;
    let barrier = Arc::new(Barrier::new(callers));
    let port = a.port;
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                restart(port, Some(&bearer()))
            })
        })
        .collect();
    let answers: Vec<(u16, Value, String)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (status, r, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["restart"], 1, "one restart for all: {r}");
        assert_eq!(r["started_at_ms"], answers[0].1["started_at_ms"], "{r}");
    }
    let started = answers.iter().filter(|(_, r, _)| r["joined"] == false);
    assert_eq!(started.count(), 1, "{answers:?}");
    assert_eq!(file_lines(&count), ["run"], "the command ran once");

    // A call after it ended starts a new restart.
    let (status, r, _) = restart(port, Some(&bearer()));
    assert_eq!(status, 200);
    assert_eq!(
        (r["restart"].as_u64(), r["joined"].as_bool()),
        (Some(2), Some(false))
    );
    assert_eq!(file_lines(&count), ["run", "run"]);
}

#[test]
fn a_wrong_token_is_401_and_restarts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, a, count) = counting_agent(dir.path(), "");
    let wrong = [
        None,
        Some("Bearer agent-cli-token-0a1b2c3d4f".to_owned()),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(TOKEN.to_owned()),
        Some(format!("Basic {TOKEN}")),
    ];
    for auth in &wrong {
        let (status, r, body) = restart(a.port, auth.as_deref());
        assert_eq!(status, 401, "{auth:?}: {body}");
        assert_eq!(r["ok"], false);
        assert_no_secret("a 401", &body);
    }
    assert!(!count.exists(), "nothing ran");
    let log = a.log();
    assert!(log.contains("restart refused"), "{log}");
    assert_no_secret("the agent's log", &log);
    assert!(
        !log.contains("0a1b2c3d4f"),
        "a wrong token in the log: {log}"
    );
}

#[test]
fn a_failing_command_answers_its_status_and_redacted_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(dir.path(), "s");
    // Secrets on stderr: a canary after `password=`, the agent's own token (from a
    // variable the command inherits), a random-looking key; and whether the token's
    // own variable reached the command.
    let script = sh("echo \"connecting with password=$CANARY\" >&2; \
         echo \"the agent was called with $LEAKED_TOKEN!\" >&2; \
         echo \"id aZ3kP9qL2mX8vB7nC4tR6yW1\" >&2; \
         echo \"its variable: ${SEASHARD_AGENT_TOKEN:-unset}\" >&2; \
         echo 'Error response from daemon: No such container: dtable-server' >&2; \
         exit 3");
    let a = agent_a(dir.path(), &server, &[], &script);
    let (status, r, body) = restart(a.port, Some(&bearer()));
    assert_eq!(status, 502, "{body}");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["failed"], "command", "{r}");
    assert_eq!(r["exit_status"], 3, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("exit status: 3"),
        "{r}"
    );
    let stderr = r["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("No such container: dtable-server"),
        "{stderr}"
    );
    assert!(stderr.contains("password=<redacted>"), "{stderr}");
    assert!(stderr.contains("called with <redacted>!"), "{stderr}");
    assert!(stderr.contains("id <redacted>"), "{stderr}");
    assert!(stderr.contains("its variable: unset"), "{stderr}");
    assert!(r.get("health_ms").is_none(), "no health wait: {r}");
    assert_no_secret("the answer", &body);
    assert!(!body.contains("aZ3kP9qL2mX8vB7nC4tR6yW1"), "{body}");
    let log = a.log();
    assert!(log.contains("restart failed"), "{log}");
    assert_no_secret("the agent's log", &log);
}

/// Gone: no such process, or a zombie nobody reaped yet.
fn gone(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn a_command_hanging_past_its_timeout_is_killed_with_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(dir.path(), "s");
    let (sh_pid, sleep_pid) = (dir.path().join("sh.pid"), dir.path().join("sleep.pid"));
    let script = sh(format!(
        "echo $$ > {}; sleep 120 & echo $! > {}; echo 'stuck' >&2; wait",
        sh_pid.display(),
        sleep_pid.display()
    ));
    let a = agent_a(dir.path(), &server, &["--command-timeout", "1s"], &script);
    let start = Instant::now();
    let (status, r, body) = restart(a.port, Some(&bearer()));
    assert!(start.elapsed() < Duration::from_secs(10), "{body}");
    assert_eq!(status, 504, "{body}");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["failed"], "command", "{r}");
    assert_eq!(r["exit_status"], Value::Null, "{r}");
    assert_eq!(r["signal"], 9, "{r}");
    assert!(r["error"].as_str().unwrap().contains("within 1s"), "{r}");
    assert_eq!(r["stderr"], "stuck", "{r}");
    for f in [&sh_pid, &sleep_pid] {
        let pid = std::fs::read_to_string(f).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !gone(&pid) {
            assert!(Instant::now() < deadline, "{} still runs", pid.trim());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The agent takes the next call.
    let (_, h) = call(a.port, "GET", "/healthz", None).unwrap();
    assert!(h.contains("\"restarting\":false"), "{h}");
}

#[test]
fn a_server_that_never_answers_pong_is_a_health_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = fake_server(dir.path(), "s");
    std::fs::write(&server.down, "").unwrap();
    let a = agent_a(
        dir.path(),
        &server,
        &["--health-timeout", "700ms"],
        &["true".to_owned()],
    );
    let (status, r, body) = restart(a.port, Some(&bearer()));
    assert_eq!(status, 504, "{body}");
    assert_eq!(r["failed"], "health", "{r}");
    assert_eq!(r["exit_status"], 0, "{r}");
    assert!(r["error"].as_str().unwrap().contains("answered 503"), "{r}");
}

#[test]
fn bad_settings_are_refused_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let o = seactl()
        .args(["agent", "--listen", "127.0.0.1:0", "--", "true"])
        .env_remove("SEASHARD_AGENT_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("$SEASHARD_AGENT_TOKEN is not set"),
        "{}",
        text(&o)
    );
    let o = seactl()
        .args(["agent", "--health-url", "https://x/ping/"])
        .env("SEASHARD_AGENT_TOKEN", TOKEN)
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(2));
    for field in ["listen", "command", "health_url"] {
        assert!(t.contains(field), "{field}: {t}");
    }
    let file = dir.path().join("short.token");
    std::fs::write(&file, "short\n").unwrap();
    let o = seactl()
        .args(["agent", "--listen", "127.0.0.1:0", "--token-file"])
        .arg(&file)
        .args(["--", "true"])
        .output()
        .unwrap();
    assert!(text(&o).contains("shorter than 16"), "{}", text(&o));
    assert!(!text(&o).contains("short\n"), "{}", text(&o));
    // A configuration file, checked: the token from a file beside it.
    std::fs::write(dir.path().join("agent.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.path().join("agent.toml"),
        "listen = \"127.0.0.1:5055\"\ncommand = [\"systemctl\", \"restart\", \"dtable-server\"]\n\
         token_file = \"agent.token\"\n",
    )
    .unwrap();
    let o = seactl()
        .args(["agent", "--check", "--config"])
        .arg(dir.path().join("agent.toml"))
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("`systemctl restart dtable-server`") && t.contains("agent.token"),
        "{t}"
    );
    assert_no_secret("--check", &t);
}

#[test]
fn https_with_a_certificate_from_seactl_certs() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    for args in [
        vec!["init", "--dir", tls.to_str().unwrap()],
        vec![
            "server",
            "--dir",
            tls.to_str().unwrap(),
            "--name",
            "agent",
            "--san",
            "127.0.0.1",
        ],
    ] {
        let o = seactl().arg("certs").args(&args).output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    let server = fake_server(dir.path(), "s");
    let count = dir.path().join("count");
    let script = sh(format!("echo run >> {}", count.display()));
    let port = free_port();
    let log = dir.path().join("agent.log");
    let mut cmd = seactl();
    cmd.args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--health-url", &server.health_url()])
        .arg("--tls-cert")
        .arg(tls.join("agent.crt"))
        .arg("--tls-key")
        .arg(tls.join("agent.key"))
        .arg("--")
        .args(&script)
        .env("SEASHARD_AGENT_TOKEN", TOKEN)
        .stderr(std::fs::File::create(&log).unwrap());
    let _a = Agent {
        proc: Proc::spawn(cmd, "seactl agent").unwrap(),
        port,
        log: log.clone(),
    };
    let client: ureq::Agent = https_client(&tls.join("ca.crt"))
        .unwrap()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let base = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(&format!("{base}/healthz")).call().is_err() {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut resp = client
        .post(&format!("{base}/restart"))
        .header("authorization", &bearer())
        .send_empty()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(file_lines(&count), ["run"]);
    // Plain HTTP gets no answer.
    assert!(call(port, "POST", "/restart", Some(&bearer())).is_none());
    assert_eq!(file_lines(&count), ["run"]);
}

/// Writes `json` to `map` and pushes it.
fn push_map(url: &str, map: &Path, json: &str) -> Output {
    std::fs::write(map, json).unwrap();
    seactl()
        .args(["push-map", map.to_str().unwrap(), "--yes"])
        .env("SEASHARD_URL", url)
        .env("SEASHARD_TOKEN", API_TOKEN)
        .output()
        .unwrap()
}

#[test]
fn seactl_serve_rolls_out_through_agents() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("restarts.log");
    let (sa, sb) = (fake_server(dir.path(), "a"), fake_server(dir.path(), "b"));
    // Agent a from flags; agent b from a configuration file with a token file.
    let agent_a = agent(
        dir.path(),
        "a",
        &["--health-url", &sa.health_url(), "--health-timeout", "10s"],
        &restart_script(&sa, "a", &log, "0.3"),
    );
    std::fs::write(dir.path().join("agent-b.token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(
        dir.path().join("agent-b.toml"),
        format!(
            "command = {}\nhealth_url = \"{}\"\nhealth_timeout = \"10s\"\n\
             token_file = \"agent-b.token\"\n",
            serde_json::to_string(&restart_script(&sb, "b", &log, "0.3")).unwrap(),
            sb.health_url()
        ),
    )
    .unwrap();
    let agent_b = agent(
        dir.path(),
        "b",
        &[
            "--config",
            dir.path().join("agent-b.toml").to_str().unwrap(),
        ],
        &[],
    );

    let hook = |port: u16| {
        format!(
            "{{ kind = \"http\", method = \"POST\", url = \"http://127.0.0.1:{port}/restart\", \
             headers_env = {{ authorization = \"AGENT_AUTH\" }}, timeout = \"30s\" }}"
        )
    };
    let (config, http) = config_in(
        dir.path(),
        &format!(
            "[api]\ntoken_env = \"CLI_TEST_TOKEN\"\n\
             [rollout]\nack_timeout = \"2s\"\nhealth_timeout = \"5s\"\ndrain = \"100ms\"\n\
             [[server]]\nname = \"a\"\naddress = \"127.0.0.1:{}\"\nrestart = {}\n\
             [[server]]\nname = \"b\"\naddress = \"127.0.0.1:{}\"\nrestart = {}\n",
            sa.port,
            hook(agent_a.port),
            sb.port,
            hook(agent_b.port),
        ),
    );
    let serve_log = dir.path().join("serve.log");
    let s = Serve::start(
        seactl()
            .args(["serve", "--config"])
            .arg(&config)
            .env("CLI_TEST_TOKEN", API_TOKEN)
            .env("AGENT_AUTH", bearer())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&serve_log).unwrap()),
        http,
    );

    // Bases move: both servers restart, through their agents, one after another.
    let map = dir.path().join("split.json");
    let o = push_map(
        &s.url,
        &map,
        r#"{"default": "a", "slots": {"0-7": "a", "8-f": "b"}}"#,
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}\n{}", agent_a.log());
    assert!(t.contains("Rollout 1 done"), "{t}");
    assert_eq!(file_lines(&log), ["a", "b"]);
    assert!(sa.refused.load(Ordering::Relaxed) > 0, "a was down a while");

    // Agent a's command fails: the rollout rolls back, and its error carries the
    // agent's answer (exit status, stderr), not a secret.
    std::fs::write(dir.path().join("fail"), "").unwrap();
    let o = push_map(
        &s.url,
        &map,
        r#"{"default": "a", "slots": {"0-3": "a", "4-f": "b"}}"#,
    );
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("answered 502"), "{t}");
    assert!(t.contains("exit status: 3"), "{t}");
    assert!(t.contains("rolled back"), "{t}");
    assert_no_secret("push-map", &t);
    assert_eq!(file_lines(&log), ["a", "b"]);

    drop(s);
    let serve_log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert_no_secret("seactl serve's log", &serve_log);
    assert_no_secret("agent a's log", &agent_a.log());
    assert_no_secret("agent b's log", &agent_b.log());
    assert!(agent_b.log().contains("agent-b.token"), "{}", agent_b.log());
}
