//! `etcd-bench [--pushes 20] [--takeovers 10] [--pollers 100] [--idle-secs 20] [--out FILE]`
//!
//! Issue 9's numbers, side by side in one run, with real processes on loopback:
//!
//! 1. push → every Envoy applied it (the filter's `seashard.map_version` gauge, polled
//!    every millisecond on each Envoy's admin interface), a push that moves nothing:
//!    one `seactl serve` on SQLite with 2 Envoys, and 2 replicas on a 3-member etcd
//!    with 2 Envoys (one on each replica; the push goes to the leader, the follower's
//!    Envoy gets it through the follower's watch);
//! 2. leader takeover after SIGKILL (the leader process only): from the kill to another
//!    replica reporting `seashard_leader 1`, 3 replicas, with the default `lease_ttl`
//!    (5 s) and with 2 s; p50 and max;
//! 3. the etcd write load: the store's revision (every write and transaction adds one)
//!    over an idle window, with the 2 gRPC Envoys only, then with `--pollers` simulated
//!    REST pollers (`/v3/discovery:extension_configs` every second, each its own node
//!    id); per Envoy per minute; and the revisions one push costs.
//!
//! Writes the results to `--out` (default `target/etcd-bench.txt`) and stdout.
//! Needs Envoy (`ENVOY_BIN`), etcd (`/usr/bin/etcd`), the built `base_router.wasm`,
//! and `seactl` next to this binary: `cargo build -p seactl -p seashard-tests --bins`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use seashard_tests::cli::{Flags, run_main};
use serde_json::{Value, json};

use seashard_tests::etcd::EtcdCluster;
use seashard_tests::replicas::{HaSetup, Options, envoy_map_version, leads};
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, start_envoy};
use seashard_tests::{Connection, Envoy, free_port, loopback, wait_until, wasm_file};

const SERVERS: [&str; 2] = ["dtable-server", "dtable-server-2"];

fn main() -> ExitCode {
    run_main("etcd-bench", run)
}

struct Args {
    pushes: usize,
    takeovers: usize,
    pollers: usize,
    idle: Duration,
    out: std::path::PathBuf,
}

fn args() -> Result<Args> {
    let mut a = Args {
        pushes: 20,
        takeovers: 10,
        pollers: 100,
        idle: Duration::from_secs(20),
        out: seashard_tests::workspace_dir().join("target/etcd-bench.txt"),
    };
    let mut flags = Flags::from_env();
    while let Some(flag) = flags.next_flag() {
        match flag.as_str() {
            "--pushes" => a.pushes = flags.parse(&flag)?,
            "--takeovers" => a.takeovers = flags.parse(&flag)?,
            "--pollers" => a.pollers = flags.parse(&flag)?,
            "--idle-secs" => a.idle = Duration::from_secs(flags.parse(&flag)?),
            "--out" => a.out = flags.value(&flag)?.into(),
            _ => bail!(
                "usage: etcd-bench [--pushes N] [--takeovers N] [--pollers N] [--idle-secs S] [--out FILE]"
            ),
        }
    }
    if a.pushes == 0 || a.takeovers == 0 {
        bail!("--pushes and --takeovers must be at least 1");
    }
    Ok(a)
}

fn run() -> Result<()> {
    let a = args()?;
    let mut out = String::new();
    let mut say = |line: String| {
        println!("{line}");
        out.push_str(&line);
        out.push('\n');
    };
    say(format!(
        "etcd-bench: {} pushes, {} takeovers per lease, {} REST pollers, idle windows of {:?}; {} cores",
        a.pushes,
        a.takeovers,
        a.pollers,
        a.idle,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    ));

    // 1. Push → every Envoy applied it.
    let sqlite = sqlite_push_times(a.pushes).context("SQLite pushes")?;
    say(format!(
        "push → 2 Envoys applied, SQLite (1 seactl serve):        {}",
        stats(&sqlite)
    ));
    let mut ha = HaSetup::start(&Options {
        replicas: 2,
        ..Options::default()
    })
    .context("start 2 replicas on etcd")?;
    let etcd = ha_push_times(&ha, a.pushes).context("etcd pushes")?;
    say(format!(
        "push → 2 Envoys applied, etcd (2 replicas, 1 Envoy each): {}",
        stats(&etcd)
    ));

    // 3. The etcd write load (same setup).
    let (idle_revs, push_revs) = idle_and_push_revisions(&ha, a.idle)?;
    say(format!(
        "etcd revisions, 2 gRPC Envoys idle for {:?}: {idle_revs} ({:.2} per Envoy per minute)",
        a.idle,
        per_envoy_minute(idle_revs, 2, a.idle)
    ));
    say(format!(
        "etcd revisions per push (no move), 2 gRPC Envoys: {push_revs:.1}"
    ));
    let (rest_idle, rest_push) = with_pollers(&mut ha, a.pollers, a.idle)?;
    say(format!(
        "etcd revisions, {} REST pollers (1 s) + 2 gRPC Envoys over {:?}: {rest_idle} ({:.2} per Envoy per minute)",
        a.pollers,
        a.idle,
        per_envoy_minute(rest_idle, a.pollers + 2, a.idle)
    ));
    say(format!(
        "etcd revisions per push (no move), {} REST pollers + 2 gRPC Envoys: {rest_push:.1}",
        a.pollers
    ));
    drop(ha);

    // 2. Leader takeover after SIGKILL.
    for ttl in ["5s", "2s"] {
        let t = takeovers(a.takeovers, ttl).with_context(|| format!("takeovers, lease {ttl}"))?;
        say(format!(
            "leader takeover after SIGKILL, lease_ttl {ttl} (3 replicas): {}",
            stats(&t)
        ));
    }
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, out)?;
    eprintln!("written to {}", a.out.display());
    Ok(())
}

fn stats(times: &[Duration]) -> String {
    let mut t = times.to_vec();
    t.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (n = {})",
        ms(t[t.len() / 2]),
        ms(t[(t.len() * 9 / 10).min(t.len() - 1)]),
        ms(t[t.len() - 1]),
        t.len()
    )
}

fn per_envoy_minute(revs: i64, envoys: usize, window: Duration) -> f64 {
    revs as f64 / envoys as f64 / (window.as_secs_f64() / 60.0)
}

/// A map that moves nothing, new each `i` (a path rule).
fn no_move(i: usize) -> Value {
    json!({"default": SERVERS[0], "slots": {"0-7": SERVERS[0], "8-f": SERVERS[1]},
           "paths": [{"prefix": format!("/bench/{i}/"), "server": SERVERS[1]}]})
}

/// POST the map to `cp`, then wait (polling every ms) until every Envoy applied it.
fn push_and_wait(cp: &ControlPlaneProcess, envoys: &[&Envoy], i: usize) -> Result<Duration> {
    let t = Instant::now();
    let (status, body) = cp.post("/v1/maps", &json!({"map": no_move(i), "comment": "bench"}))?;
    if status != 200 {
        bail!("push {i}: {status} {body}");
    }
    let version = body["version"]
        .as_u64()
        .ok_or_else(|| anyhow!("no version in {body}"))?;
    let deadline = t + Duration::from_secs(10);
    let mut waiting: Vec<&Envoy> = envoys.to_vec();
    while !waiting.is_empty() {
        if Instant::now() > deadline {
            bail!("push {i}: not applied by every Envoy within 10 s");
        }
        let mut still = Vec::new();
        for e in waiting {
            if envoy_map_version(e)? != Some(version) {
                still.push(e);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(t.elapsed())
}

fn sqlite_push_times(pushes: usize) -> Result<Vec<Duration>> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-etcd-bench-")
        .tempdir()?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    std::fs::write(dir.path().join("initial.json"), no_move(0).to_string())?;
    let config = dir.path().join("seashard.toml");
    std::fs::write(
        &config,
        format!(
            "initial_map = \"initial.json\"\n[listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
             [store]\npath = \"s.db\"\n[api]\ntoken = \"{TOKEN}\"\n[filter]\nwasm = {:?}\n\
             [[server]]\nname = \"{}\"\naddress = \"127.0.0.1:1\"\n\
             [[server]]\nname = \"{}\"\naddress = \"127.0.0.1:2\"\n",
            wasm_file("base_router.wasm")?,
            SERVERS[0],
            SERVERS[1]
        ),
    )?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let e1 = start_envoy("edge-1", grpc)?;
    let e2 = start_envoy("edge-2", grpc)?;
    cp.wait_current(&["edge-1", "edge-2"])?;
    (1..=pushes)
        .map(|i| push_and_wait(&cp, &[&e1, &e2], i))
        .collect()
}

fn ha_push_times(ha: &HaSetup, pushes: usize) -> Result<Vec<Duration>> {
    let leader = ha.wait_leader(None, Duration::from_secs(15))?;
    let envoys: Vec<&Envoy> = ha.envoys.iter().collect();
    (1..=pushes)
        .map(|i| push_and_wait(&ha.replicas[leader], &envoys, 1000 + i))
        .collect()
}

/// The store's current revision.
fn revision(etcd: &EtcdCluster) -> Result<i64> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let r = etcd.call_healthy(
        "/v3/kv/range",
        &json!({"key": b64.encode("/"), "count_only": true}),
    )?;
    r["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no revision in {r}"))
}

/// Revisions over an idle window, and per push (5 pushes).
fn idle_and_push_revisions(ha: &HaSetup, idle: Duration) -> Result<(i64, f64)> {
    let r0 = revision(&ha.etcd)?;
    std::thread::sleep(idle);
    let idle_revs = revision(&ha.etcd)? - r0;
    let leader = ha.wait_leader(None, Duration::from_secs(15))?;
    let envoys: Vec<&Envoy> = ha.envoys.iter().collect();
    let r1 = revision(&ha.etcd)?;
    for i in 0..5 {
        push_and_wait(&ha.replicas[leader], &envoys, 2000 + i)?;
    }
    // Let the last ACKs' records be written.
    std::thread::sleep(Duration::from_millis(500));
    let push_revs = (revision(&ha.etcd)? - r1) as f64 / 5.0;
    Ok((idle_revs, push_revs))
}

/// `n` simulated Envoys polling REST xDS every second (alternating replicas): the
/// revisions over an idle window, and per push (5 pushes).
fn with_pollers(ha: &mut HaSetup, n: usize, idle: Duration) -> Result<(i64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let addrs: Vec<SocketAddr> = ha.replicas.iter().map(|r| r.http).collect();
    let handles: Vec<_> = (0..n)
        .map(|k| {
            let (stop, polls) = (stop.clone(), polls.clone());
            let addr = addrs[k % addrs.len()];
            std::thread::spawn(move || poll_loop(addr, &format!("sim-{k}"), &stop, &polls))
        })
        .collect();
    let result = (|| {
        // Every poller known and current.
        wait_until(Duration::from_secs(30), "the pollers to poll", || {
            Ok((polls.load(Ordering::Relaxed) >= 2 * n).then_some(()))
        })?;
        std::thread::sleep(Duration::from_secs(2));
        idle_and_push_revisions(ha, idle)
    })();
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        let _ = h.join();
    }
    result
}

fn poll_loop(addr: SocketAddr, id: &str, stop: &AtomicBool, polls: &AtomicUsize) {
    let mut version = String::new();
    let mut conn: Option<Connection> = None;
    while !stop.load(Ordering::SeqCst) {
        let body = json!({
            "node": {"id": id, "cluster": "seashard-sim"},
            "version_info": version,
            "resource_names": ["seashard.base_router"],
            "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        })
        .to_string();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Connection::open(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        match c.request(
            "POST",
            "/v3/discovery:extension_configs",
            &[("content-type", "application/json")],
            body.as_bytes(),
        ) {
            Ok(r) => {
                polls.fetch_add(1, Ordering::Relaxed);
                if r.status == 200
                    && let Some(v) = r
                        .json()
                        .ok()
                        .and_then(|v| v["version_info"].as_str().map(str::to_owned))
                {
                    version = v;
                }
            }
            Err(_) => conn = None,
        }
        // 1 s between polls, in steps so a stop is seen soon.
        for _ in 0..10 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `runs` takeovers: SIGKILL the leader, time until another leads, start it again.
fn takeovers(runs: usize, lease_ttl: &'static str) -> Result<Vec<Duration>> {
    let mut ha = HaSetup::start(&Options {
        replicas: 3,
        envoys: Vec::new(),
        lease_ttl,
        ..Options::default()
    })?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let leader = ha.wait_leader(None, Duration::from_secs(20))?;
        // Every replica up and following (a restarted one campaigns too).
        std::thread::sleep(Duration::from_millis(500));
        let others: Vec<SocketAddr> = (0..ha.replicas.len())
            .filter(|&i| i != leader)
            .map(|i| ha.replicas[i].http)
            .collect();
        let t = Instant::now();
        ha.kill(leader)?;
        let took = wait_until(Duration::from_secs(30), "another replica to lead", || {
            Ok(others.iter().any(|&h| leads(h)).then(|| t.elapsed()))
        })?;
        times.push(took);
        ha.restart(leader)?;
    }
    Ok(times)
}
