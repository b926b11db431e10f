//! `big-map-push [--pins 10000] [--pushes 5]`
//!
//! A map of 256 four-digit slots and `--pins` pins (moving no base) pushed through a
//! real `seactl serve` to two real Envoys (bootstrapped by `seactl envoy-bootstrap`):
//! the time from `POST /v1/maps` to both Envoys having ACKed it, median of `--pushes`
//! pushes (each with another path rule, so each is a new version), and each Envoy's
//! memory after. The control plane's share is `cargo bench -p control-plane --bench
//! big_map`, the filter's `cargo bench -p wasm-host --bench configure`.
//!
//! Needs Envoy (`ENVOY_BIN`), the built `base_router.wasm`, and `seactl` next to this
//! binary: `cargo build --release -p seactl -p seashard-tests --bins`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use seashard_tests::cli::{Flags, run_main};
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, start_envoy};
use seashard_tests::{free_port, loopback, wait_until, wasm_file};
use serde_json::{Value, json};

#[path = "../../../crates/shardmap/benches/support/big_map.rs"]
mod big_map;
use big_map::SERVERS;

fn main() -> ExitCode {
    run_main("big-map-push", run)
}

/// [`big_map::big_map`] with a path rule named after `i`.
fn map(pins: usize, i: usize) -> Value {
    let mut map = big_map::big_map(pins);
    map["paths"] = json!([{"prefix": format!("/push/{i}/"), "server": SERVERS[1]}]);
    map
}

fn run() -> Result<()> {
    let (mut pins, mut pushes) = (10_000usize, 5usize);
    let mut flags = Flags::from_env();
    while let Some(a) = flags.next_flag() {
        match a.as_str() {
            "--pins" => pins = flags.parse(&a)?,
            "--pushes" => pushes = flags.parse(&a)?,
            _ => bail!("usage: big-map-push [--pins N] [--pushes N]"),
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("seashard-bigmap-")
        .tempdir()?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let wasm = wasm_file("base_router.wasm")?;
    let config = dir.path().join("seashard.toml");
    std::fs::write(
        dir.path().join("initial.json"),
        big_map::two_slot_map().to_string(),
    )?;
    std::fs::write(
        &config,
        format!(
            "initial_map = \"initial.json\"\n[listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n[store]\npath = \"s.db\"\n\
             [api]\ntoken = \"{TOKEN}\"\n[filter]\nwasm = {wasm:?}\n\
             [[server]]\nname = \"{}\"\naddress = \"127.0.0.1:1\"\n\
             [[server]]\nname = \"{}\"\naddress = \"127.0.0.1:2\"\n",
            SERVERS[0], SERVERS[1]
        ),
    )?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let envoys = [start_envoy("edge-a", grpc)?, start_envoy("edge-b", grpc)?];
    cp.wait_current(&["edge-a", "edge-b"])?;
    let body_len = map(pins, 0).to_string().len();
    let mut times = Vec::new();
    for i in 0..pushes {
        let start = Instant::now();
        let (status, body) = cp.post("/v1/maps", &json!({"map": map(pins, i)}))?;
        if status != 200 {
            let body = body.to_string();
            bail!("POST /v1/maps: {status} {}", &body[..body.len().min(300)]);
        }
        let version = body["version"].as_u64().unwrap_or(0);
        // The ECDS version string: the map version in 20 digits, then a hash.
        let want = format!("{version:020}-");
        wait_until(Duration::from_secs(30), "both Envoys to ACK", || {
            let nodes = cp.get_json("/v1/nodes")?;
            let acked = nodes["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| {
                    n["types"]["ecds"]["acked_version"]
                        .as_str()
                        .is_some_and(|v| v.starts_with(&want))
                })
                .count();
            Ok((acked == 2).then_some(()))
        })?;
        times.push(start.elapsed());
    }
    times.sort();
    let mut rss = Vec::new();
    for e in &envoys {
        let stats = e.admin_get("/memory")?.json()?;
        rss.push(
            stats["allocated"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                / 1_000_000,
        );
    }
    println!(
        "big-map-push: {pins} pins ({} KB) to 2 Envoys, {pushes} pushes: POST → both ACKed \
         median {:.0?} (min {:.0?}, max {:.0?}); Envoy heap allocated {:?} MB",
        body_len / 1000,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        rss
    );
    Ok(())
}
