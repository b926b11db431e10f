//! `seactl serve`, `status`, `push-map` and `envoy-bootstrap`, as an operator runs them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "cli-token-0123456";

fn seactl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_seactl"))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `seactl serve`, killed on drop.
struct Serve {
    child: Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Serve {
    let http = free_port();
    let config = dir.join("seashard.toml");
    std::fs::write(
        &config,
        format!(
            r#"
            [listen]
            grpc = "127.0.0.1:{}"
            http = "127.0.0.1:{http}"
            [store]
            path = "state.db"
            [api]
            token_env = "CLI_TEST_TOKEN"
            [filter]
            wasm = "/opt/seashard/base-router.wasm"
            [[server]]
            name = "dtable-server"
            address = "127.0.0.1:1"
            [[server]]
            name = "dtable-server-2"
            address = "127.0.0.1:2"
            "#,
            free_port()
        ),
    )
    .unwrap();
    let child = seactl()
        .args(["serve", "--config"])
        .arg(&config)
        .env("CLI_TEST_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{http}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(Instant::now() < deadline, "seactl serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Serve { child, url }
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

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
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

    // A map that moves bases: refused, the moves named.
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}}"#,
    )
    .unwrap();
    let o = run(&s.url, &["push-map", m, "--yes"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("slots 8-f"), "{}", text(&o));
    assert!(text(&o).contains("needs a rollout"), "{}", text(&o));

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
    assert_eq!(status["version"], 2);
}

#[test]
fn the_shipped_ads_bootstraps_are_the_generators_output() {
    for (kind, file) in [("edge", "edge-ads.yaml"), ("sidecar", "sidecar-ads.yaml")] {
        let o = seactl()
            .args(["envoy-bootstrap", "--kind", kind])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o));
        let shipped = std::fs::read_to_string(workspace().join("envoy").join(file)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            shipped,
            "envoy/{file} is stale: regenerate it with \
             `seactl envoy-bootstrap --kind {kind} -o envoy/{file}`"
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
}
