//! `seactl` commands given several control plane URLs (`SEASHARD_URL=a,b` or
//! `--url a,b`): the first that answers is used; a dead one is skipped.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const TOKEN: &str = "failover-cli-token-0123";

fn seactl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_seactl"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `seactl serve` with its own SQLite store, killed on drop.
struct Replica {
    child: Child,
    url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replica(dir: &Path) -> Replica {
    std::fs::create_dir_all(dir).unwrap();
    let http = free_port();
    let config = dir.join("seashard.toml");
    let text = format!(
        "[listen]\ngrpc = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{http}\"\n\
         [store]\npath = \"state.db\"\n[api]\ntoken_env = \"FAILOVER_TOKEN\"\n\
         [filter]\nwasm = \"/opt/seashard/base-router.wasm\"\n\
         [[server]]\nname = \"dtable-server\"\naddress = \"127.0.0.1:1\"\n\
         [[server]]\nname = \"dtable-server-2\"\naddress = \"127.0.0.1:2\"\n",
        free_port()
    );
    std::fs::write(&config, text).unwrap();
    let mut child = seactl()
        .args(["serve", "--config"])
        .arg(&config)
        .env("FAILOVER_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("seactl serve did not listen on {http}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Replica {
        child,
        url: format!("http://127.0.0.1:{http}"),
    }
}

/// `seactl ARGS` with `SEASHARD_URL=urls`.
fn run(urls: &[&str], args: &[&str]) -> Output {
    seactl()
        .args(args)
        .env("SEASHARD_URL", urls.join(","))
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

/// The active map version `seactl status` shows through `urls`.
fn version(urls: &[&str]) -> u64 {
    let o = run(urls, &["status", "--output", "json"]);
    let s: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    s["version"].as_u64().unwrap()
}

#[test]
fn a_dead_url_is_skipped_and_an_error_names_every_url() {
    let dir = tempfile::tempdir().unwrap();
    let a = replica(&dir.path().join("a"));
    let mut b = replica(&dir.path().join("b"));
    let dead = format!("http://127.0.0.1:{}", free_port());

    // A push through `--url DEAD,A,B` (a map that moves no base) lands on A; B,
    // its own store, stays at version 1.
    let map = dir.path().join("map.json");
    std::fs::write(
        &map,
        r#"{"default": "dtable-server", "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]}"#,
    )
    .unwrap();
    let url = [dead.as_str(), &a.url, &b.url].join(",");
    let o = seactl()
        .args(["push-map", "--yes", "--wait", "5", "--url", &url])
        .arg(&map)
        .env("SEASHARD_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(version(&[&dead, &a.url]), 2);
    assert_eq!(version(&[&dead, &b.url]), 1);

    // Every URL dead: exit 2, each URL with its error, no token.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let o = run(&[&dead, &b.url], &["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = text(&o);
    assert!(
        err.contains("none of the 2 control plane URLs answered"),
        "{err}"
    );
    assert!(
        err.contains(&format!("\n  {dead}: GET {dead}/v1/status")),
        "{err}"
    );
    assert!(
        err.contains(&format!("\n  {}: GET {}/v1/status", b.url, b.url)),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "{err}");

    // A bad list is refused before anything is sent.
    let o = run(&[&a.url, &a.url], &["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("given twice"), "{}", text(&o));
}
