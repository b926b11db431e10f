//! The fake dtable-server (`fake-dtable-server`, `fake-dtable-ctl`) and part (a)
//! of the lost-write experiment of issue 5: SeaTable's documented procedure for
//! a map change (change the proxy's map, then restart the dtable-servers) loses
//! acknowledged writes, while the same restarts without a map change lose none.

use std::time::Duration;

use seashard_tests::dtable::{FakeDtableServer, missing_writes, spread_bases};
use seashard_tests::dtable_server::{base_file, read_stored_rows};
use seashard_tests::lost_writes::{Outcome, envoy_experiment, moved, nginx_experiment};
use seashard_tests::{Connection, wait_until};
use serde_json::json;

const BASE: &str = "c0ffee00-1234-4abc-9def-0123456789ab";
const BASE_HEX: &str = "c0ffee0012344abc9def0123456789ab";

fn storage() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("seashard-storage-")
        .tempdir()
        .unwrap()
}

fn write(conn: &mut Connection, base: &str, id: &str) -> serde_json::Value {
    let r = conn
        .request(
            "POST",
            &format!("/dtable-server/api/v1/dtables/{base}/rows/"),
            &[("content-type", "application/json")],
            json!({ "write_id": id }).to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().unwrap()
}

#[test]
fn ping_answers_pong_and_unknown_paths_404() {
    let dir = storage();
    let s = FakeDtableServer::start("s1", dir.path(), Duration::from_secs(60)).unwrap();
    assert!(s.ping());
    let r = seashard_tests::get(s.addr, "/api/v1/admin/sys-info/", &[]).unwrap();
    assert_eq!(r.status, 404);
    let events = s.log_events().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "start");
    assert_eq!(events[0].addr, Some(s.addr));
}

#[test]
fn loads_on_first_use_applies_writes_and_saves_periodically() {
    let dir = storage();
    std::fs::write(
        base_file(dir.path(), BASE_HEX),
        json!({"base": BASE_HEX, "rows": ["seed"]}).to_string(),
    )
    .unwrap();
    let s = FakeDtableServer::start("s1", dir.path(), Duration::from_millis(200)).unwrap();
    let mut conn = Connection::open(s.addr).unwrap();

    // Loaded from storage on first use; any spelling of the base is the same base.
    let r = conn.get(&format!("/api/v1/dtables/{BASE}/"), &[]).unwrap();
    assert_eq!(r.json().unwrap()["rows"], json!(["seed"]));
    let ack = write(&mut conn, &BASE.to_uppercase(), "w1");
    assert_eq!(ack, json!({"ok": true, "server": "s1", "rows": 2}));
    let ack = write(&mut conn, BASE_HEX, "w2");
    assert_eq!(ack["rows"], 3);
    let r = conn
        .get(&format!("/socket.io/?dtable_uuid={BASE_HEX}&EIO=4"), &[])
        .unwrap();
    assert_eq!(r.json().unwrap()["rows"], json!(["seed", "w1", "w2"]));

    // A bad write is refused, not acknowledged.
    let r = conn
        .request("POST", &format!("/api/v1/dtables/{BASE}/rows/"), &[], b"{}")
        .unwrap();
    assert_eq!(r.status, 400);

    // Saved within a few intervals, without any stop.
    wait_until(Duration::from_secs(5), "the periodic save", || {
        Ok((read_stored_rows(dir.path(), BASE_HEX)? == ["seed", "w1", "w2"]).then_some(()))
    })
    .unwrap();
    let kinds: Vec<String> = s
        .log_events()
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(kinds[..4], ["start", "load", "write", "write"], "{kinds:?}");
    assert!(kinds.contains(&"save".to_string()), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "load").count(),
        1,
        "loaded once"
    );
}

#[test]
fn sigterm_saves_every_modified_base_and_a_crash_loses_unsaved_writes() {
    let dir = storage();
    // A save interval far beyond the test: only the stop can save.
    let mut s = FakeDtableServer::start("s1", dir.path(), Duration::from_secs(600)).unwrap();
    let bases = spread_bases(4);
    let mut conn = Connection::open(s.addr).unwrap();
    for (i, b) in bases.iter().enumerate() {
        write(&mut conn, &b.dashed(), &format!("w{i}"));
    }
    assert_eq!(
        read_stored_rows(dir.path(), bases[0].as_str())
            .unwrap()
            .len(),
        0
    );
    s.stop().unwrap(); // SIGTERM, exit 0 (checked)
    for (i, b) in bases.iter().enumerate() {
        assert_eq!(
            read_stored_rows(dir.path(), b.as_str()).unwrap(),
            [format!("w{i}")]
        );
    }
    assert_eq!(s.log_events().unwrap().last().unwrap().event, "stop");

    // Started again, it reloads the saved base; killed, it loses what it did not save.
    s.start_again().unwrap();
    let mut conn = Connection::open(s.addr).unwrap();
    assert_eq!(write(&mut conn, &bases[0].dashed(), "late")["rows"], 2);
    s.crash();
    let acked = [(bases[0].as_str().to_string(), "late".to_string())];
    assert_eq!(missing_writes(dir.path(), &acked).unwrap(), acked);
}

#[test]
fn the_restart_hook_stops_gracefully_and_starts_on_the_same_address() {
    let dir = storage();
    let mut s = FakeDtableServer::start("s1", dir.path(), Duration::from_secs(600)).unwrap();
    let (addr, pid) = (s.addr, s.pid().unwrap());
    let mut conn = Connection::open(addr).unwrap();
    write(&mut conn, BASE, "before");

    let hook = s.restart_hook().unwrap();
    assert!(
        hook[0].ends_with("fake-dtable-ctl") && hook[1] == "restart",
        "{hook:?}"
    );
    s.run_restart_hook().unwrap();
    let new_pid = s.pid().unwrap();
    assert_ne!(new_pid, pid);
    assert_eq!(s.addr, addr);
    assert!(s.ping());
    // The write was saved by the graceful stop, and the new incarnation loads it.
    assert_eq!(read_stored_rows(dir.path(), BASE_HEX).unwrap(), ["before"]);
    let mut conn = Connection::open(addr).unwrap();
    assert_eq!(write(&mut conn, BASE, "after")["rows"], 2);

    // The handle can stop the hook's incarnation too.
    s.stop().unwrap();
    assert_eq!(
        read_stored_rows(dir.path(), BASE_HEX).unwrap(),
        ["before", "after"]
    );
    assert!(!s.ping());
    // ...and drop kills one the hook started.
    s.start_again().unwrap();
    s.run_restart_hook().unwrap();
    let orphan = s.pid().unwrap();
    drop(s);
    wait_until(
        Duration::from_secs(5),
        "the hook's server to be killed",
        || Ok(seashard_tests::dtable::process_gone(orphan).then_some(())),
    )
    .unwrap();
}

// ---------------------------------------------------------------------------
// The lost-write experiment, part (a): SeaTable's documented procedure
// (see `seashard_tests::lost_writes`)
// ---------------------------------------------------------------------------

fn check_naive_loses(o: &Outcome) {
    assert!(o.acknowledged > 1000, "{o:?}");
    assert!(
        o.missing.iter().all(|(b, _)| moved(b)),
        "only moved bases may lose writes: {:?}",
        o.missing
    );
    assert!(
        !o.double.is_empty() && o.double.iter().all(|d| moved(&d.base)),
        "the moved bases were held by both servers: {:?}",
        o.double
    );
    assert!(
        !o.missing.is_empty(),
        "the naive procedure lost nothing this time: the experiment is not sensitive"
    );
}

#[test]
fn with_nginx_restarts_without_a_map_change_lose_nothing() {
    let o = nginx_experiment(false).unwrap_or_else(|e| panic!("{e:#}"));
    println!("nginx, restarts without a map change: {}", o.summary());
    assert!(o.acknowledged > 1000, "{o:?}");
    assert_eq!(o.missing, [], "the harness itself loses writes");
    assert_eq!(o.double, [], "no base moved, none may be held twice");
}

#[test]
fn with_nginx_the_documented_map_change_loses_acknowledged_writes() {
    let o = nginx_experiment(true).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "nginx, documented procedure (reload with the new map, restart both servers): {}",
        o.summary()
    );
    check_naive_loses(&o);
}

#[test]
fn with_envoy_the_naive_map_change_loses_acknowledged_writes() {
    let o = envoy_experiment(true).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "Envoy + base-router, new map by a new Envoy, then restart both servers: {}",
        o.summary()
    );
    check_naive_loses(&o);
}

#[test]
fn with_envoy_restarts_without_a_map_change_lose_nothing() {
    let o = envoy_experiment(false).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "Envoy + base-router, restarts without a map change: {}",
        o.summary()
    );
    assert!(o.acknowledged > 1000, "{o:?}");
    assert_eq!(o.missing, [], "the harness itself loses writes");
    assert_eq!(o.double, [], "no base moved, none may be held twice");
}

#[test]
fn the_restart_hook_reports_failures_by_its_exit_status() {
    let dir = storage();
    let mut s = FakeDtableServer::start("s1", dir.path(), Duration::from_secs(600)).unwrap();
    assert_eq!(s.health_url(), format!("http://{}/ping/", s.addr));
    let ctl = seashard_tests::dtable::fake_dtable_ctl_bin().unwrap();
    let pid_file = s.pid_file().display().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(&ctl)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    // Bad usage: 2, and the server is untouched.
    assert_eq!(run(&[]), Some(2));
    assert_eq!(run(&["restart", "--pid-file", &pid_file]), Some(2));
    assert_eq!(run(&["frobnicate", "--pid-file", &pid_file]), Some(2));
    assert!(s.ping());
    // A start command that fails: 1 (after the graceful stop).
    let code = run(&[
        "restart",
        "--pid-file",
        &pid_file,
        "--timeout-ms",
        "5000",
        "--",
        "false",
    ]);
    assert_eq!(code, Some(1));
    assert!(!s.ping());
    // `stop` of a server that is not running succeeds; then the handle starts it again.
    assert_eq!(run(&["stop", "--pid-file", &pid_file]), Some(0));
    s.start_again().unwrap();
    assert!(s.ping());
    assert_eq!(run(&["stop", "--pid-file", &pid_file]), Some(0));
    assert!(!s.ping());
}
