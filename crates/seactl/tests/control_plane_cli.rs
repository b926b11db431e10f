//! `seactl serve`, `status`, `push-map` and `envoy-bootstrap`, as an operator runs them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{Serve, config_in, free_port, text};

const TOKEN: &str = "cli-token-0123456";

fn seactl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_seactl"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn serve(dir: &Path) -> Serve {
    serve_with(
        dir,
        "[[server]]\nname = \"dtable-server\"\naddress = \"127.0.0.1:1\"\n\
         [[server]]\nname = \"dtable-server-2\"\naddress = \"127.0.0.1:2\"\n",
    )
}

/// `seactl serve` with `extra` (servers, `[rollout]`) appended to its configuration.
fn serve_with(dir: &Path, extra: &str) -> Serve {
    let (config, http) = config_in(
        dir,
        &format!("[api]\ntoken_env = \"CLI_TEST_TOKEN\"\n{extra}"),
    );
    serve_config(&config, http)
}

/// `seactl serve --config CONFIG` whose API listens on `http`.
fn serve_config(config: &Path, http: u16) -> Serve {
    Serve::start(
        seactl()
            .args(["serve", "--config"])
            .arg(config)
            .env("CLI_TEST_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null()),
        http,
    )
}

fn run(url: &str, args: &[&str]) -> Output {
    seactl()
        .args(args)
        .env("SEASHARD_URL", url)
        .env("SEASHARD_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `seactl push-map MAP --yes`, running; its output piped.
fn spawn_push_map(url: &str, map: &str) -> Child {
    seactl()
        .args(["push-map", map, "--yes"])
        .env("SEASHARD_URL", url)
        .env("SEASHARD_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `status` until the running rollout's `field` is `value` (20 s at most).
fn wait_for_rollout(url: &str, field: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = run(url, &["status", "--output", "json"]);
        let status: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if status["rollout"][field] == value {
            return;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_status_and_push_map() {
    let dir = tempfile::tempdir().unwrap();
    let s = serve(dir.path());

    let o = run(&s.url, &["status", "--output", "json"]);
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(status["version"], 1, "{}", text(&o));
    let o = run(&s.url, &["status"]);
    assert!(text(&o).contains("Active map: version 1"), "{}", text(&o));
    assert!(
        text(&o).contains("DOWN"),
        "no server answers here: {}",
        text(&o)
    );

    // A map that moves nothing: the plan, then applied.
    let map = dir.path().join("paths.json");
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]}"#,
    )
    .unwrap();
    let m = map.to_str().unwrap();
    let o = run(&s.url, &["push-map", m, "--dry-run"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("path rules change"), "{}", text(&o));
    assert!(text(&o).contains("No base changes server"), "{}", text(&o));
    // Without --yes on a non-interactive stdin: refused, nothing applied.
    let o = run(&s.url, &["push-map", m]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    let o = run(
        &s.url,
        &[
            "push-map",
            m,
            "--yes",
            "-m",
            "admin to 2",
            "--output",
            "json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out["outcome"]["version"], 2);
    assert_eq!(
        out["acked"], true,
        "no Envoy connected: nothing to wait for"
    );

    // A map that moves bases: a rollout; the plan names the moves and the servers
    // to restart. Their hooks are manual: the rollout waits; `rollout abort` rolls
    // it back and push-map exits non-zero.
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}}"#,
    )
    .unwrap();
    let push = spawn_push_map(&s.url, m);
    wait_for_rollout(&s.url, "waiting_for_confirm", "dtable-server");
    let o = run(&s.url, &["status"]);
    assert!(text(&o).contains("Rollout 1 running"), "{}", text(&o));
    let o = run(&s.url, &["rollout", "confirm", "dtable-server-2"]);
    assert!(!o.status.success(), "not the server waited for");
    let o = run(&s.url, &["rollout", "abort"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = push.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("slots 8-f"), "{t}");
    assert!(t.contains("Servers to restart"), "{t}");
    assert!(t.contains("rolled back"), "{t}");
    let o = run(&s.url, &["rollout", "list"]);
    assert!(text(&o).contains("rolled_back"), "{}", text(&o));

    // An invalid map: every problem.
    std::fs::write(
        &map,
        r#"{"default": "nowhere", "slots": {"0-6": "dtable-server"}}"#,
    )
    .unwrap();
    let o = run(&s.url, &["push-map", m, "--yes"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("gap") && t.contains("nowhere"), "{t}");

    // A wrong token: 401.
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "paths": [{"prefix": "/b/", "server": "dtable-server-2"}]}"#,
    )
    .unwrap();
    let o = seactl()
        .args(["push-map", m, "--yes", "--token", "wrong-token-0000"])
        .env("SEASHARD_URL", &s.url)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("401"), "{}", text(&o));
    let o = run(&s.url, &["status", "--output", "json"]);
    let status: Value = serde_json::from_slice(&o.stdout).unwrap();
    // 3: the fence, 4: the rollback.
    assert_eq!(status["version"], 4);
    assert_eq!(status["kind"], "rollback");
}

/// A health URL answering `pong`, on a thread.
fn pong() -> u16 {
    use std::io::{Read, Write};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong",
            );
        }
    });
    port
}

/// `seactl serve` with servers `a` and `b` (each a `pong` health URL) whose restart
/// hooks sleep `sleep` seconds, then append the server's name to the log returned.
fn serve_restarting_a_and_b(dir: &Path, sleep: &str) -> (Serve, PathBuf) {
    let (a, b) = (pong(), pong());
    let log = dir.join("restarts.log");
    let hook = |name: &str| {
        format!(
            r#"{{ kind = "command", argv = ["sh", "-c", "sleep {sleep}; echo {name} >> {}"] }}"#,
            log.display()
        )
    };
    let extra = format!(
        "[rollout]\nack_timeout = \"2s\"\nhealth_timeout = \"2s\"\n\
         [[server]]\nname = \"a\"\naddress = \"127.0.0.1:{a}\"\nrestart = {}\n\
         [[server]]\nname = \"b\"\naddress = \"127.0.0.1:{b}\"\nrestart = {}\n",
        hook("a"),
        hook("b")
    );
    (serve_with(dir, &extra), log)
}

#[test]
fn push_map_follows_a_rollout_to_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (s, log) = serve_restarting_a_and_b(dir.path(), "0.3");
    let map = dir.path().join("split.json");
    std::fs::write(
        &map,
        r#"{"default": "a", "slots": {"0-7": "a", "8-f": "b"}}"#,
    )
    .unwrap();
    let m = map.to_str().unwrap();
    let o = run(&s.url, &["push-map", m, "--dry-run"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("never restarted"), "{t}");
    let o = run(&s.url, &["push-map", m, "--yes"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for step in ["plan", "fence", "restart", "activate", "done"] {
        assert!(t.contains(&format!("step {step}")), "{step}: {t}");
    }
    assert!(t.contains("restarting a"), "{t}");
    assert!(t.contains("Rollout 1 done: version 3 is active"), "{t}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\n");

    // Slots 4-7 from a to b, as JSON for scripts: only a restarts.
    std::fs::write(
        &map,
        r#"{"default": "a", "slots": {"0-3": "a", "4-f": "b"}}"#,
    )
    .unwrap();
    let o = run(&s.url, &["push-map", m, "--yes", "--output", "json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["state"], "done");
    assert_eq!(r["restart"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["restart"][0]["server"], "a");
    assert_eq!(r["skipped"][0]["server"], "b");
    assert!(r["overhead_ms"].as_u64().unwrap() < 1000, "{r}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "a\nb\na\n");
}

#[test]
fn the_shipped_ads_bootstraps_are_the_generators_output() {
    // Each with a fixed node id: without `--node-id` the id comes from the host name.
    for (file, args) in [
        ("edge-ads.yaml", "--kind edge --node-id edge-1"),
        ("sidecar-ads.yaml", "--kind sidecar --node-id sidecar-1"),
        (
            "guard-ads.yaml",
            "--kind guard --server dtable-server-2 --node-id guard-dtable-server-2-1",
        ),
    ] {
        let o = seactl()
            .arg("envoy-bootstrap")
            .args(args.split(' '))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let shipped = std::fs::read_to_string(workspace().join("envoy").join(file)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            shipped,
            "envoy/{file} is stale: regenerate it with \
             `seactl envoy-bootstrap {args} -o envoy/{file}`"
        );
    }
}

#[test]
fn a_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"nowhere\"\n",
    )
    .unwrap();
    let o = seactl()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("bad.toml") && t.contains("http"), "{t}");
}

/// The README's main job: control plane, a real Envoy with the filter, sample
/// dtable-servers, requests routed, a map pushed.
#[test]
fn the_demo_routes_requests_through_a_real_envoy() {
    let mut child = seactl()
        .arg("demo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("seactl demo did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let line = |server: &str, version: &str, path: &str| {
        t.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w == [server, version, path]
        })
    };
    let high = "/api/v1/dtables/9f8e7d6c5b4a439281706f5e4d3c2b1a/";
    assert!(line("dtable-server-2", "1", high), "{t}");
    assert!(line("dtable-server", "1", "/api/v1/admin/sys-info/"), "{t}");
    assert!(
        line("dtable-server-2", "2", "/api/v1/admin/sys-info/"),
        "{t}"
    );
    assert!(line("dtable-server-2", "2", high), "{t}");
    // The rollout moved slots 4-7 to dtable-server-2 (version 4, after the fence).
    let moved = "/dtable-server/api/v1/dtables/4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/rows/";
    assert!(line("dtable-server", "2", moved), "{t}");
    assert!(line("dtable-server-2", "4", moved), "{t}");
    assert!(t.contains("(503)"), "a moved base during the restarts: {t}");
    // The guards: a base sent to the wrong one is refused, and the rollout waited
    // for them.
    assert!(
        t.contains("421 {\"error\":\"misdirected\"") && t.contains("\"owner\":\"dtable-server-2\""),
        "{t}"
    );
    assert!(
        t.contains("the fence waits for their guards (guard-dtable-server-2@127.0.0.1, guard-dtable-server@127.0.0.1)"),
        "{t}"
    );
}

#[test]
fn a_seactl_serve_killed_with_sigkill_mid_rollout_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, log) = serve_restarting_a_and_b(dir.path(), "1");
    let http: u16 = s.url.rsplit(':').next().unwrap().parse().unwrap();
    let map = dir.path().join("split.json");
    std::fs::write(
        &map,
        r#"{"default": "a", "slots": {"0-7": "a", "8-f": "b"}}"#,
    )
    .unwrap();
    let push = spawn_push_map(&s.url, map.to_str().unwrap());
    wait_for_rollout(&s.url, "restarting", "a");
    // SIGKILL, mid-restart of a; then the same configuration and store again.
    s.proc.kill_leader();
    std::thread::sleep(Duration::from_millis(300));
    let s2 = serve_config(&dir.path().join("seashard.toml"), http);
    let o = push.wait_with_output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("unreachable"), "{t}");
    assert!(
        t.contains("resumed by a restarted control plane at step restart"),
        "{t}"
    );
    assert!(t.contains("Rollout 1 done"), "{t}");
    let o = run(&s2.url, &["rollout", "follow", "1", "--output", "json"]);
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["resumed"], 1);
    assert_eq!(r["state"], "done");
    // The killed plane's hook of a may have finished on its own (a real SIGKILL
    // leaves its children): a restarted at least once more by the resumed one.
    let restarts = std::fs::read_to_string(&log).unwrap();
    assert!(
        restarts.lines().filter(|l| *l == "a").count() >= 1,
        "{restarts}"
    );
    assert!(restarts.lines().any(|l| l == "b"), "{restarts}");
}

/// Several URLs (`--url a,b,c` or `SEASHARD_URL=a,b`): a dead one is skipped; when
/// none answers, the error names each URL with its error.
#[test]
fn several_urls_skip_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let replica = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        serve(&d)
    };
    let (a, mut b) = (replica("a"), replica("b"));
    let dead = format!("http://127.0.0.1:{}", free_port());
    let version = |urls: &str| -> Value {
        let o = run(urls, &["status", "--output", "json"]);
        let s: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
        s["version"].clone()
    };

    // A push through `--url DEAD,A,B` (a map that moves no base) lands on A; B, its
    // own store, stays at version 1.
    let map = dir.path().join("map.json");
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]}"#,
    )
    .unwrap();
    let list = [dead.as_str(), &a.url, &b.url].join(",");
    let m = map.to_str().unwrap();
    let o = run(
        &dead,
        &["push-map", m, "--yes", "--wait", "5", "--url", &list],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(version(&format!("{dead},{}", a.url)), 2);
    assert_eq!(version(&format!("{dead},{}", b.url)), 1);

    // Every URL dead: exit 2, each URL with its error, no token.
    b.proc.kill();
    let o = run(&format!("{dead},{}", b.url), &["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = text(&o);
    assert!(
        err.contains("none of the 2 control plane URLs answered"),
        "{err}"
    );
    for url in [&dead, &b.url] {
        assert!(
            err.contains(&format!("\n  {url}: GET {url}/v1/status")),
            "{err}"
        );
    }
    assert!(!err.contains(TOKEN), "{err}");

    // A bad list is refused before anything is sent.
    let o = run(&format!("{},{}", a.url, a.url), &["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("given twice"), "{}", text(&o));
}
