//! Secrets never leave the control plane: with canary secrets in an HTTP restart hook
//! (a header in the TOML, one from the environment, one from a file, a query value in
//! the URL) and in the API tokens, a rollout whose hook fails (and whose
//! hook endpoint echoes every header it got) is followed by every read the API offers
//! and every `seactl` output format; no answer, output, error or log line may carry a
//! canary.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
use common::{Serve, config_in, text as everything};

const TOKEN: &str = "change-token-canary-0a1b";
const READ_TOKEN: &str = "read-token-canary-2c3d";
const CANARIES: [&str; 6] = [
    "hook-header-canary-4e5f",
    "hook-env-canary-6a7b",
    "hook-file-canary-8c9d",
    "url-query-canary-2a3b",
    TOKEN,
    READ_TOKEN,
];

fn seactl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_seactl"))
}

/// An HTTP endpoint answering every request with `status` and the request's head as
/// the body (a hook endpoint that echoes secrets back); it records what it got.
fn echoing_endpoint(status: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = vec![0u8; 8192];
            let n = c.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            log.lock().unwrap().push(head.clone());
            let body = if head.starts_with("GET /ping/") {
                "pong".to_owned()
            } else {
                head
            };
            let status = if body == "pong" { 200 } else { status };
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = c.write_all(answer.as_bytes());
        }
    });
    (port, seen)
}

fn run(url: &str, token: &str, args: &[&str]) -> Output {
    seactl()
        .args(args)
        .env("SEASHARD_URL", url)
        .env("SEASHARD_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn get(url: &str, token: Option<&str>) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    req.call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap_or_default()
}

#[test]
fn no_canary_secret_appears_in_any_answer_output_error_or_log() {
    let dir = tempfile::tempdir().unwrap();
    let (hook_port, hook_seen) = echoing_endpoint(500);
    let (ping_port, _) = echoing_endpoint(200);
    std::fs::write(
        dir.path().join("hook-headers"),
        format!("# secret headers\nX-File-Secret: {}\n", CANARIES[2]),
    )
    .unwrap();
    let hook = format!(
        r#"{{ kind = "http", method = "POST", url = "http://127.0.0.1:{hook_port}/restart?server=a&token={}", headers = {{ authorization = "Bearer {}" }}, headers_env = {{ x-api-key = "HOOK_KEY" }}, headers_file = "hook-headers" }}"#,
        CANARIES[3], CANARIES[0]
    );
    let (config, http) = config_in(
        dir.path(),
        &format!(
            r#"
            [api]
            token_env = "CHANGE_TOKEN"
            read_token_env = "READ_TOKEN"
            [rollout]
            ack_timeout = "2s"
            health_timeout = "2s"
            drain = "10ms"
            [[server]]
            name = "dtable-server"
            address = "127.0.0.1:{ping_port}"
            restart = {hook}
            [[server]]
            name = "dtable-server-2"
            address = "127.0.0.1:{ping_port}"
            restart = {hook}
            "#
        ),
    );
    let url = format!("http://127.0.0.1:{http}");
    let log = dir.path().join("serve.log");
    let out = std::fs::File::create(&log).unwrap();
    let _serve = Serve::start(
        seactl()
            .args(["serve", "--config"])
            .arg(&config)
            .env("CHANGE_TOKEN", TOKEN)
            .env("READ_TOKEN", READ_TOKEN)
            .env("HOOK_KEY", CANARIES[1])
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out),
        http,
    );

    let mut seen = String::new();
    // A map that moves bases: a rollout whose first hook fails, echoing its headers.
    let map = dir.path().join("moving.json");
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}}"#,
    )
    .unwrap();
    let m = map.to_str().unwrap();
    for args in [
        vec!["push-map", m, "--yes"],
        vec!["push-map", m, "--yes", "--output", "json"],
    ] {
        let o = run(&url, TOKEN, &args);
        seen.push_str(&everything(&o));
    }
    assert!(
        seen.contains("rolled back") || seen.contains("rolled_back"),
        "the hook was to fail: {seen}"
    );
    // The hook got every secret (the canaries were in play), its answer echoed them.
    let got = hook_seen.lock().unwrap().join("\n");
    for c in &CANARIES[..3] {
        assert!(got.contains(c), "the hook never got {c}: {got}\n{seen}");
    }
    assert!(got.contains(CANARIES[3]), "{got}");
    for token in [TOKEN, READ_TOKEN] {
        for args in [
            vec!["status"],
            vec!["status", "--output", "json"],
            vec!["rollout", "list"],
            vec!["rollout", "list", "--output", "json"],
        ] {
            seen.push_str(&everything(&run(&url, token, &args)));
        }
    }
    for path in [
        "/healthz",
        "/metrics",
        "/v1/status",
        "/v1/map",
        "/v1/maps",
        "/v1/maps/1",
        "/v1/nodes",
        "/v1/servers",
        "/v1/rollouts",
        "/v1/rollouts/1",
        "/v1/rollouts/2",
        "/v1/audit",
        "/v1/nothing",
    ] {
        for token in [None, Some(READ_TOKEN), Some(TOKEN)] {
            seen.push_str(&get(&format!("{url}{path}"), token));
        }
    }
    // What was shown names the hook's headers, never their values.
    assert!(
        seen.contains("x-api-key") && seen.contains("<redacted>"),
        "{seen}"
    );
    assert!(
        seen.contains("500"),
        "the hook's failure is reported: {seen}"
    );
    seen.push_str(&std::fs::read_to_string(&log).unwrap());
    for c in CANARIES {
        assert!(!seen.contains(c), "`{c}` leaked:\n{seen}");
    }
}
