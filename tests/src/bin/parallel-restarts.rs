//! `parallel-restarts [--restart 2] [--out FILE]`
//!
//! The fence window of a rollout that restarts four dtable-servers, one at a time
//! (`max_parallel_restarts = 1`) beside all at once (`push-map --parallel 4`), in one
//! run: four `fake-dtable-server`s whose restart hook takes `--restart` seconds
//! (`sleep`, then `fake-dtable-ctl restart`), a real `seactl serve` (`drain` 200 ms)
//! and an edge Envoy; the map moves three quarters of the bases off the first server
//! (the first rollout: all four restart). A prober asks for a moved base through the
//! edge every 10 ms: the fence window is from its first `503` to its first answer
//! from the new owner. Written as Markdown to `target/bench/parallel-restarts.md`.
//!
//! Needs Envoy (`ENVOY_BIN`), the built `base_router.wasm`, and `fake-dtable-server`,
//! `fake-dtable-ctl` and `seactl` next to this binary:
//! `cargo build --release -p seactl -p seashard-tests --bins`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use seashard_tests::cli::{number_and_out, run_main};
use seashard_tests::dtable::Cluster;
use seashard_tests::rollout::{
    ControlPlaneProcess, ServeConfig, delayed_hook, server_table, start_envoy,
};
use seashard_tests::{Connection, free_port, loopback, wait_until, workspace_dir};
use serde_json::json;

const SERVERS: [&str; 4] = [
    "dtable-server",
    "dtable-server-2",
    "dtable-server-3",
    "dtable-server-4",
];
/// A base of slot `c`: it moves from the first server to the fourth.
const MOVED: &str = "/dtable-server/api/v1/dtables/c0ffee00-0000-4000-8000-000000000001/rows/";

fn main() -> ExitCode {
    run_main("parallel-restarts", run)
}

fn run() -> Result<()> {
    let (restart, out) = number_and_out(
        "--restart",
        2u64,
        workspace_dir().join("target/bench/parallel-restarts.md"),
        "parallel-restarts [--restart SECONDS] [--out FILE]",
    )?;
    let mut s = String::new();
    writeln!(
        s,
        "# Parallel restarts: the fence window of a rollout restarting four servers\n\n\
         `parallel-restarts --restart {restart}`: 4 fake dtable-servers, each restart hook \
         taking {restart} s; `seactl serve` with `drain = \"200ms\"`; one edge Envoy; a \
         prober asks for a moved base every 10 ms.\n"
    )?;
    writeln!(
        s,
        "| parallel | fence window (first 503 → new owner) | restart step (stored) | \
         window / one restart |"
    )?;
    writeln!(s, "|---|---|---|---|")?;
    for parallel in [1u64, 4] {
        let (window, restart_ms) = once(parallel, restart)?;
        eprintln!("parallel {parallel}: fence window {window:?}, restart step {restart_ms} ms");
        writeln!(
            s,
            "| {parallel} | {:.2} s | {:.2} s | {:.2}× |",
            window.as_secs_f64(),
            restart_ms as f64 / 1000.0,
            window.as_secs_f64() / restart as f64
        )?;
    }
    println!("{s}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &s)?;
    Ok(())
}

/// One rollout at `parallel`: the fence window the prober saw, and the restart step.
fn once(parallel: u64, restart: u64) -> Result<(Duration, u64)> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-parallel-")
        .tempdir()?;
    let cluster = Cluster::start(&SERVERS, Duration::from_secs(2))?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let config = write_config(dir.path(), &cluster, http, grpc, restart)?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let envoy = start_envoy("edge-1", grpc)?;
    wait_until(Duration::from_secs(30), "the edge to route", || {
        Ok(probe(envoy.listener_addr)?
            .filter(|s| s == SERVERS[0])
            .map(|_| ()))
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (stop, addr) = (stop.clone(), envoy.listener_addr);
        std::thread::spawn(move || -> Result<Duration> {
            let (mut first_503, mut window) = (None::<Instant>, None);
            while !stop.load(Ordering::SeqCst) {
                match probe(addr)? {
                    None if first_503.is_none() => first_503 = Some(Instant::now()),
                    Some(s) if s == SERVERS[3] => {
                        if let Some(t) = first_503 {
                            window = Some(t.elapsed());
                            break;
                        }
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            window.ok_or_else(|| anyhow!("the prober never saw the fence and the new owner"))
        })
    };
    let new_map = json!({"default": SERVERS[0], "slots": {
        "0-3": SERVERS[0], "4-7": SERVERS[1], "8-b": SERVERS[2], "c-f": SERVERS[3]}});
    let (status, body) = cp.post(
        "/v1/maps",
        &json!({"map": new_map, "parallel": parallel, "comment": "parallel restarts"}),
    )?;
    if status != 202 {
        bail!("POST /v1/maps: {status} {body}");
    }
    let id = body["rollout"].as_u64().ok_or_else(|| anyhow!("{body}"))?;
    let r = cp.wait_rollout(id, Duration::from_secs(120))?;
    if r["state"] != "done" {
        bail!("the rollout did not complete: {r}");
    }
    let window = prober
        .join()
        .map_err(|_| anyhow!("the prober panicked"))??;
    stop.store(true, Ordering::SeqCst);
    Ok((window, r["restart_ms"].as_u64().unwrap_or(0)))
}

/// The server that answered a moved base, `None` for a refusal (503).
fn probe(addr: SocketAddr) -> Result<Option<String>> {
    let r = Connection::open(addr)?.get(MOVED, &[])?;
    Ok(match r.status {
        200 => r.header("x-served-by").map(str::to_owned).or_else(|| {
            r.json()
                .ok()
                .and_then(|v| v["server"].as_str().map(str::to_owned))
        }),
        _ => None,
    })
}

fn write_config(
    dir: &Path,
    cluster: &Cluster,
    http: SocketAddr,
    grpc: SocketAddr,
    restart: u64,
) -> Result<PathBuf> {
    let mut servers = String::new();
    for s in &cluster.servers {
        let hook = delayed_hook(&restart.to_string(), s.restart_hook()?);
        servers += &server_table(&s.name, s.addr, "", &hook)?;
    }
    ServeConfig {
        initial_map: json!({"default": SERVERS[0], "slots": {"0-f": SERVERS[0]}}),
        listen: "",
        store: "path = \"seashard.db\"\n",
        rollout: "ack_timeout = \"10s\"\nhealth_timeout = \"20s\"\nrestart_timeout = \"60s\"\n\
                  drain = \"200ms\"\n",
        servers,
    }
    .write(dir, http, grpc)
}
