//! An Envoy bootstrapped by `seactl envoy-bootstrap` with two control plane
//! addresses, against two real `seactl serve` replicas (each its own SQLite store,
//! the same initial map): it keeps routing when its replica dies, moves to the other
//! within seconds (killed: its connection resets; blackholed: HTTP/2 keepalive
//! ends the stream, health checks keep the next one off it), an Envoy started
//! while one replica is dead gets its map from the other, and one that lost every
//! replica keeps routing and returns to the first one back.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use seashard_tests::relay::Relay;
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, start_managed_envoy};
use seashard_tests::{Envoy, Upstream, free_port, get, loopback, wait_until, wasm_file};
use serde_json::json;

/// How long an Envoy may take to move to the live replica.
const FAILOVER_LIMIT: Duration = Duration::from_secs(20);

/// A base of the first server (slot 0-7) and one of the second (8-f).
const BASE_1: &str = "12345678-1234-1234-1234-123456789abc";
const BASE_2: &str = "9abcdef0-1234-1234-1234-123456789abc";

/// Dropped in this order: the replicas, then the servers and the directory.
struct Setup {
    replicas: [ControlPlaneProcess; 2],
    _servers: [Upstream; 2],
    _dir: tempfile::TempDir,
}

/// Two fake dtable-servers and two replicas serving the same initial map.
fn setup() -> Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-failover-")
        .tempdir()?;
    let servers = [
        Upstream::start("dtable-server")?,
        Upstream::start("dtable-server-2")?,
    ];
    let map = json!({"default": "dtable-server",
                     "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}});
    let replica = |name: &str| -> Result<ControlPlaneProcess> {
        let d = dir.path().join(name);
        std::fs::create_dir(&d)?;
        std::fs::write(d.join("initial.json"), map.to_string())?;
        let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
        let mut text = format!(
            "initial_map = \"initial.json\"\n\
             [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
             [store]\npath = \"seashard.db\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [filter]\nwasm = {:?}\n",
            wasm_file("base_router.wasm")?
        );
        for s in &servers {
            text.push_str(&format!(
                "[[server]]\nname = \"{}\"\naddress = \"{}\"\n",
                s.name, s.addr
            ));
        }
        std::fs::write(d.join("seashard.toml"), text)?;
        ControlPlaneProcess::start(&d.join("seashard.toml"), http, grpc)
    };
    let replicas = [replica("a")?, replica("b")?];
    Ok(Setup {
        _dir: dir,
        _servers: servers,
        replicas,
    })
}

/// An edge Envoy given both addresses, `first` listed first.
fn envoy(node_id: &str, first: SocketAddr, second: SocketAddr) -> Result<Envoy> {
    // `start_managed_envoy` appends `--control-plane FIRST`: the flag repeats.
    let second = second.to_string();
    let args = ["--kind", "edge", "--node-id", node_id];
    let args = [&args[..], &["--control-plane", &second]].concat();
    start_managed_envoy(&args, first, loopback(0))
}

/// Whether `id` is connected to `cp` and ACKed its current filter config.
fn current_on(cp: &ControlPlaneProcess, id: &str) -> bool {
    cp.get_json("/v1/status").is_ok_and(|s| {
        s["nodes"].as_array().is_some_and(|a| {
            a.iter()
                .any(|n| n["id"] == id && n["connected"] == true && n["state"]["ecds"] == "current")
        })
    })
}

/// The index of the replica `id` is connected to (and current on), waited for.
fn connected_to(replicas: &[ControlPlaneProcess; 2], id: &str) -> Result<usize> {
    wait_until(
        FAILOVER_LIMIT,
        &format!("{id} to be current on a replica"),
        || Ok((0..2).find(|&i| current_on(&replicas[i], id))),
    )
}

/// edge-1, given both replicas' addresses, and the replica it became current on.
fn edge_on_a_replica(replicas: &[ControlPlaneProcess; 2]) -> Result<(Envoy, usize)> {
    let edge = envoy("edge-1", replicas[0].grpc, replicas[1].grpc)?;
    let on = connected_to(replicas, "edge-1")?;
    Ok((edge, on))
}

/// Which server answered a request for `base` through `envoy`.
fn served_by(envoy: &Envoy, base: &str) -> Result<String> {
    let r = get(
        envoy.listener_addr,
        &format!("/api/v1/dtables/{base}/rows/"),
        &[],
    )?;
    if r.status != 200 {
        bail!("{base}: {} {}", r.status, r.text());
    }
    Ok(r.header("x-served-by").unwrap_or_default().to_owned())
}

/// Both bases go where the map says.
fn routes_by_the_map(envoy: &Envoy) -> Result<()> {
    let got = (served_by(envoy, BASE_1)?, served_by(envoy, BASE_2)?);
    if got != ("dtable-server".into(), "dtable-server-2".into()) {
        bail!("routed to {got:?}");
    }
    Ok(())
}

/// What Envoy knows of the control plane cluster: its hosts' health, its health
/// check and connection counters, its log.
fn diagnosis(envoy: &Envoy) -> String {
    let admin = |path: &str| {
        envoy
            .admin_get(path)
            .map(|r| r.text())
            .unwrap_or_else(|e| format!("{e:#}"))
    };
    let hosts: String = admin("/clusters")
        .lines()
        .filter(|l| l.starts_with("seashard_control_plane::"))
        .map(|l| format!("{l}\n"))
        .collect();
    format!(
        "{hosts}{}\n{}",
        admin(
            "/stats?filter=seashard_control_plane\\.(health_check|upstream_cx_(total|destroy|connect_fail))|control_plane"
        ),
        envoy.logs()
    )
}

/// Waits until edge-1 (`envoy`), whose replica `from` just went (`how`), is current
/// on the other, checking meanwhile that it keeps routing by the map; prints and
/// returns how long it took.
fn follow_failover(
    envoy: &Envoy,
    replicas: &[ControlPlaneProcess; 2],
    from: usize,
    how: &str,
) -> Result<Duration> {
    let (id, to) = ("edge-1", &replicas[1 - from]);
    let began = Instant::now();
    let mut routed = 0;
    wait_until(
        FAILOVER_LIMIT,
        &format!("{id} to be current on the other replica"),
        || {
            routes_by_the_map(envoy).map_err(|e| seashard_tests::Fatal(format!("{e:#}")))?;
            routed += 2;
            Ok(current_on(to, id).then_some(()))
        },
    )
    .with_context(|| diagnosis(envoy))?;
    let took = began.elapsed();
    if took > Duration::from_secs(2) {
        // Why it was slow: which replica Envoy tried, how each was judged.
        let why: Vec<String> = diagnosis(envoy)
            .lines()
            .filter(|l| {
                [
                    "::cx_connect_fail::",
                    "::health_flags::",
                    "outlier_detection.ejections_active",
                ]
                .iter()
                .any(|k| l.contains(k))
            })
            .map(str::to_owned)
            .collect();
        eprintln!("slow failover:\n{}", why.join("\n"));
    }
    eprintln!(
        "replica {from} {how}: {id} current on replica {} after {took:?} ({routed} \
         requests routed by the map meanwhile)",
        1 - from
    );
    Ok(took)
}

#[test]
fn an_envoy_moves_to_the_live_replica_and_a_new_one_starts_from_it() {
    let mut setup = setup().unwrap();
    let replicas = &mut setup.replicas;
    let (edge, on) = edge_on_a_replica(replicas).unwrap();
    routes_by_the_map(&edge).unwrap();

    replicas[on].kill();
    follow_failover(&edge, replicas, on, "SIGKILLed").unwrap();
    routes_by_the_map(&edge).unwrap();

    // A new Envoy, the dead replica listed first: its map comes from the live one.
    let other = 1 - on;
    let (dead, live) = (replicas[on].grpc, replicas[other].grpc);
    let began = Instant::now();
    let edge2 = envoy("edge-2", dead, live).unwrap();
    let up = began.elapsed();
    wait_until(FAILOVER_LIMIT, "edge-2 to be current", || {
        Ok(current_on(&replicas[other], "edge-2").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", diagnosis(&edge2)));
    routes_by_the_map(&edge2).unwrap();
    eprintln!(
        "edge-2 started with replica {on} dead: ready in {up:?}, current on replica {other} \
         {:?} later",
        began.elapsed() - up
    );
}

#[test]
fn an_envoy_leaves_a_blackholed_replica_within_seconds() {
    let setup = setup().unwrap();
    let replicas = &setup.replicas;
    // Each replica behind a relay that can silently stop passing bytes: no reset,
    // only HTTP/2 keepalive ends the stream, and the health checks keep the new one
    // off the dead replica.
    let source: IpAddr = [127, 0, 0, 2].into();
    let relays = [
        Relay::start(replicas[0].grpc, source).unwrap(),
        Relay::start(replicas[1].grpc, source).unwrap(),
    ];
    let edge = envoy("edge-1", relays[0].addr, relays[1].addr).unwrap();
    let on = connected_to(replicas, "edge-1").unwrap();
    relays[on].cut();
    let took = follow_failover(&edge, replicas, on, "blackholed").unwrap();
    // Keepalive: a PING every 5 s, 3 s to answer.
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn with_every_replica_down_an_envoy_keeps_routing_and_returns_to_the_first_back() {
    let mut setup = setup().unwrap();
    let replicas = &mut setup.replicas;
    let (edge, on) = edge_on_a_replica(replicas).unwrap();
    replicas[on].kill();
    replicas[1 - on].kill();
    // Both ejected and failing health checks, for a while: nothing to pick.
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        routes_by_the_map(&edge).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    // The one it was not on comes back (same ports, same store).
    let back = 1 - on;
    replicas[back].start_again().unwrap();
    let began = Instant::now();
    wait_until(FAILOVER_LIMIT, "edge-1 to return", || {
        Ok(current_on(&replicas[back], "edge-1").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", diagnosis(&edge)));
    eprintln!(
        "both replicas down; replica {back} back: edge-1 current on it after {:?}",
        began.elapsed()
    );
    routes_by_the_map(&edge).unwrap();
}
