//! `seactl agent` restarting a real `fake-dtable-server` with its real restart hook
//! (`fake-dtable-ctl restart`: SIGTERM, final save, start again on the same address),
//! as a control plane's HTTP hook calls it: the server comes back as a new process
//! that answers `pong`, an acknowledged write survives, and calls made while the
//! restart runs join it (the server's log shows one stop and one start).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use seashard_tests::dtable::FakeDtableServer;
use seashard_tests::dtable_server::read_stored_rows;
use seashard_tests::rollout::{seactl_bin, slow_hook};
use seashard_tests::{Connection, Proc, free_port, get, loopback, wait_until};
use serde_json::{Value, json};

const TOKEN: &str = "agent-e2e-token-0123456789";
const BASE: &str = "a9e1f00d-1234-4abc-9def-0123456789ab";
const BASE_HEX: &str = "a9e1f00d12344abc9def0123456789ab";

/// `seactl agent` restarting `server` through its hook (after 300 ms, so that
/// calls overlap); killed (its process group) on drop.
fn agent(server: &FakeDtableServer, dir: &Path) -> (Proc, std::net::SocketAddr) {
    let addr = loopback(free_port().unwrap());
    let mut cmd = Command::new(seactl_bin().unwrap());
    cmd.args(["agent", "--listen", &addr.to_string()])
        .args([
            "--health-url",
            &server.health_url(),
            "--health-timeout",
            "15s",
        ])
        .args(["--command-timeout", "30s", "--"])
        .args(slow_hook(server.restart_hook().unwrap()))
        .env("SEASHARD_AGENT_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log")).unwrap());
    let mut proc = Proc::spawn(cmd, "seactl agent").unwrap();
    wait_until(Duration::from_secs(20), "seactl agent to answer", || {
        if let Some(status) = proc.exited() {
            anyhow::bail!("seactl agent exited: {status}");
        }
        Ok(get(addr, "/healthz", &[]).ok().map(|_| ()))
    })
    .unwrap();
    (proc, addr)
}

fn restart(addr: std::net::SocketAddr) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let r = Connection::open(addr)
        .unwrap()
        .request("POST", "/restart", &[("authorization", auth.as_str())], b"")
        .unwrap();
    (r.status, r.json().unwrap_or(Value::Null))
}

#[test]
fn the_agent_restarts_a_fake_dtable_server_once_for_joined_calls() {
    let storage = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server =
        FakeDtableServer::start("s", storage.path(), Duration::from_secs(3600)).unwrap();
    let old_pid = server.pid().unwrap();
    // A write acknowledged before the restart, not saved yet (saves every hour).
    let mut conn = Connection::open(server.addr).unwrap();
    let r = conn
        .request(
            "POST",
            &format!("/dtable-server/api/v1/dtables/{BASE}/rows/"),
            &[("content-type", "application/json")],
            json!({ "write_id": "w1" }).to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    drop(conn);

    let (mut agent_proc, addr) = agent(&server, dir.path());
    let callers = 3;
    let barrier = Arc::new(Barrier::new(callers));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                restart(addr)
            })
        })
        .collect();
    let answers: Vec<(u16, Value)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    for (status, r) in &answers {
        assert_eq!(*status, 200, "{r}\n{}", log());
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["restart"], 1, "{r}");
    }
    assert_eq!(
        answers.iter().filter(|(_, r)| r["joined"] == false).count(),
        1,
        "{answers:?}"
    );

    // A new process on the same address, answering pong; the old one stopped once
    // (its final save kept the write), one new start.
    let new_pid = server.pid().unwrap();
    assert_ne!(new_pid, old_pid);
    assert!(server.ping());
    let events = server.log_events().unwrap();
    let count = |event: &str| events.iter().filter(|e| e.event == event).count();
    assert_eq!((count("start"), count("stop")), (2, 1), "{events:?}");
    assert!(
        events.iter().any(|e| e.event == "stop" && e.pid == old_pid),
        "{events:?}"
    );
    let rows = read_stored_rows(storage.path(), BASE_HEX).unwrap();
    assert!(rows.iter().any(|w| w == "w1"), "{rows:?}");
    assert!(!log().contains(TOKEN), "{}", log());

    agent_proc.kill();
    server.stop().unwrap();
}
