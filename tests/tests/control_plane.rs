//! End to end: the control plane (in-process, on loopback) and two real Envoys 1.40
//! bootstrapped by `seactl envoy-bootstrap`'s generator, with the built base-router
//! filter and two fake dtable-servers.
//!
//! The control plane runs in its own tokio runtime: dropping that runtime without
//! any shutdown is its SIGKILL (sockets closed, nothing flushed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use control_plane::Config;
use deploy::bootstrap::{Kind, Options, Xds};
use seashard_tests::http::Connection;
use seashard_tests::{Envoy, Upstream, get, wait_until, wasm_file};
use serde_json::{Value, json};

mod common;

use common::{Cp, start_envoy, start_envoy_with};

const CONVERGE: Duration = Duration::from_secs(30);

/// Bases on either side of the initial map's split (`0-7` | `8-f`).
const BASE_LOW: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const BASE_HIGH: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

impl Cp {
    fn post_map(&self, body: &Value) -> Result<(u16, Value)> {
        self.post("/v1/maps", body)
    }

    /// A counter of `/metrics`.
    fn metric(&self, sample: &str) -> Result<u64> {
        let text = get(self.http, "/metrics", &[])?.text();
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .ok_or_else(|| anyhow!("no sample {sample} in /metrics:\n{text}"))
    }

    /// Waits until every node in `ids` is connected and in `state` for both types
    /// (`ecds` only when `state` is `nacked`); returns the status then.
    fn wait_nodes(&self, ids: &[&str], state: &str) -> Result<Value> {
        wait_until(CONVERGE, &format!("nodes {ids:?} to be {state}"), || {
            let s = self.status()?;
            let ok = ids.iter().all(|id| {
                let Some(n) = s["nodes"]
                    .as_array()
                    .and_then(|a| a.iter().find(|n| n["id"] == *id))
                else {
                    return false;
                };
                let types: &[&str] = if state == "nacked" {
                    &["ecds"]
                } else {
                    &["ecds", "cds"]
                };
                n["connected"] == true && types.iter().all(|t| n["state"][t] == state)
            });
            Ok(ok.then_some(s))
        })
        .with_context(|| format!("last status: {}", self.status().unwrap_or_default()))
    }
}

fn initial_map() -> Value {
    json!({"default": "dtable-server",
           "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}})
}

/// Which server a request for `path` reached through `envoy`, and the map version
/// the filter stamped on it.
fn route(envoy: &Envoy, path: &str) -> Result<(String, String)> {
    let r = get(envoy.listener_addr, path, &[])?;
    if r.status != 200 {
        bail!("{path}: {} {}", r.status, r.text());
    }
    served(&r)
}

fn served(r: &seashard_tests::Response) -> Result<(String, String)> {
    let body = r.json()?;
    Ok((
        body["server"].as_str().unwrap_or_default().to_owned(),
        body["headers"]["x-shard-map-version"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

fn rows(base: &str) -> String {
    format!("/dtable-server/api/v1/dtables/{base}/rows/")
}

/// Both Envoys send the two bases where the initial map says, at map `version`.
fn assert_initial_routing(envoys: &[&Envoy], version: &str) -> Result<()> {
    let compact: String = BASE_HIGH.replace('-', "").to_uppercase();
    for e in envoys {
        assert_eq!(
            route(e, &rows(BASE_LOW))?,
            ("dtable-server".into(), version.into())
        );
        assert_eq!(
            route(e, &rows(BASE_HIGH))?,
            ("dtable-server-2".into(), version.into())
        );
        assert_eq!(
            route(e, &format!("/api/v1/dtables/{compact}/"))?.0,
            "dtable-server-2"
        );
        assert_eq!(
            route(e, &format!("/socket.io/?dtable_uuid={BASE_HIGH}&EIO=4"))?.0,
            "dtable-server-2"
        );
    }
    Ok(())
}

struct Fixture {
    dir: tempfile::TempDir,
    wasm: PathBuf,
    a: Upstream,
    b: Upstream,
}

impl Fixture {
    fn new() -> Result<Fixture> {
        Ok(Fixture {
            dir: tempfile::tempdir()?,
            wasm: wasm_file("base_router.wasm")?,
            a: Upstream::start("dtable-server")?,
            b: Upstream::start("dtable-server-2")?,
        })
    }

    fn config(&self, grpc_port: u16, wasm: &Path) -> Result<Config> {
        common::sqlite_config(
            self.dir.path(),
            grpc_port,
            wasm,
            &initial_map(),
            "[rollout]\nack_timeout = \"5s\"\n",
            &[&self.a, &self.b],
        )
    }
}

#[test]
fn two_envoys_route_per_the_map_and_take_a_push_without_draining() -> Result<()> {
    let f = Fixture::new()?;
    let cp = Cp::start(f.config(0, &f.wasm)?)?;
    let edge = start_envoy(Kind::Edge, "edge-1", cp.grpc, &f.wasm)?;
    let side = start_envoy(Kind::Sidecar, "sidecar-1", cp.grpc, &f.wasm)?;
    cp.wait_nodes(&["edge-1", "sidecar-1"], "current")?;
    assert_initial_routing(&[&edge, &side], "1")?;

    // A keep-alive connection opened before the push.
    let mut conn = Connection::open(edge.listener_addr)?;
    let local = conn.local_addr()?;
    let r = conn.get("/api/v1/admin/sys-info/", &[])?;
    assert_eq!(served(&r)?, ("dtable-server".into(), "1".into()));

    // A push that moves no base: a path rule for uuid-less admin requests.
    let mut map = initial_map();
    map["paths"] = json!([{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]);
    let pushed = Instant::now();
    let (status, body) = cp.post_map(&json!({"map": map, "base_version": 1, "comment": "e2e"}))?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 2);
    let s = cp.wait_nodes(&["edge-1", "sidecar-1"], "current")?;
    eprintln!("push → both Envoys ACKed: {:?}", pushed.elapsed());
    for n in s["nodes"].as_array().unwrap_or(&Vec::new()) {
        assert_eq!(n["map_version"], 2, "{n}");
        assert!(n["types"]["ecds"]["nacked_version"].is_null(), "{n}");
    }

    // The same connection (no drain) now routes with map 2.
    let r = wait_until(
        Duration::from_secs(5),
        "map 2 on the kept-alive connection",
        || {
            let r = conn.get("/api/v1/admin/sys-info/", &[])?;
            Ok((served(&r)?.1 == "2").then_some(r))
        },
    )?;
    assert_eq!(served(&r)?.0, "dtable-server-2");
    assert_eq!(conn.local_addr()?, local, "the connection was replaced");
    for e in [&edge, &side] {
        assert_eq!(route(e, "/api/v1/admin/sys-info/")?.0, "dtable-server-2");
        assert_eq!(
            route(e, &rows(BASE_LOW))?,
            ("dtable-server".into(), "2".into())
        );
        // The filter's own gauge: what it applied, whatever an ACK said.
        let stats = e.admin_get("/stats?filter=seashard.map_version")?.text();
        assert!(stats.lines().any(|l| l.ends_with(": 2")), "{stats}");
    }
    // Push → both Envoys ACKed, measured in the control plane (the target:
    // p50 ≤ 50 ms on loopback). Each push moves nothing: a path rule changes.
    let mut times = Vec::new();
    for i in 0..10 {
        let mut map = initial_map();
        map["paths"] = json!([{"prefix": format!("/bench/{i}/"), "server": "dtable-server-2"}]);
        let start = Instant::now();
        let (status, body) = cp.post_map(&map)?;
        assert_eq!(status, 200, "{body}");
        let c = cp.block_on(cp.plane.wait_ecds_converged(Duration::from_secs(10)));
        assert!(c.complete() && c.acked.len() == 2, "{c:?}");
        times.push(start.elapsed());
    }
    times.sort();
    eprintln!(
        "push → 2 real Envoys ACKed, 10 pushes: p50 {:?}, max {:?}",
        times[5], times[9]
    );
    assert!(times[5] < Duration::from_secs(1), "{times:?}");
    assert_eq!(route(&edge, &rows(BASE_LOW))?.1, "12");

    // A map that moves bases needs a rollout (tests/rollout.rs); its dry run names
    // what moves and changes nothing.
    let moving = json!({"default": "dtable-server",
                        "slots": {"0-3": "dtable-server", "4-f": "dtable-server-2"}});
    let (status, body) = cp.post("/v1/maps?dry_run=true", &moving)?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["needs_rollout"], true, "{body}");
    assert_eq!(body["plan"]["fence"]["slots"][0], "4-7", "{body}");
    assert_eq!(route(&edge, &rows(BASE_LOW))?.1, "12");
    cp.kill();
    Ok(())
}

#[test]
fn a_nacked_config_is_recorded_not_resent_and_a_restarted_control_plane_keeps_state() -> Result<()>
{
    let f = Fixture::new()?;
    let cp = Cp::start(f.config(0, &f.wasm)?)?;
    let port = cp.grpc.port();
    let edge = start_envoy(Kind::Edge, "edge-1", cp.grpc, &f.wasm)?;
    let side = start_envoy(Kind::Sidecar, "sidecar-1", cp.grpc, &f.wasm)?;
    let before = cp.wait_nodes(&["edge-1", "sidecar-1"], "current")?;
    let ecds_version = before["ecds_version"].clone();
    assert_initial_routing(&[&edge, &side], "1")?;

    // Killed: the Envoys keep routing meanwhile.
    cp.kill();
    for _ in 0..3 {
        assert_initial_routing(&[&edge, &side], "1")?;
    }

    // Restarted on the same store: same version; the Envoys reconnect already
    // running it, so nothing is sent again.
    let cp = Cp::start(f.config(port, &f.wasm)?)?;
    let s = cp.wait_nodes(&["edge-1", "sidecar-1"], "current")?;
    assert_eq!(s["version"], 1);
    assert_eq!(s["ecds_version"], ecds_version);
    assert_eq!(cp.metric("seashard_xds_responses_total{type=\"ecds\"}")?, 0);
    assert_initial_routing(&[&edge, &side], "1")?;
    cp.kill();

    // A configuration the Envoys reject: the filter's code is not where it says.
    let missing = f.dir.path().join("missing").join("base_router.wasm");
    let cp = Cp::start(f.config(port, &missing)?)?;
    let s = cp.wait_nodes(&["edge-1", "sidecar-1"], "nacked")?;
    for n in s["nodes"].as_array().unwrap_or(&Vec::new()) {
        let ecds = &n["types"]["ecds"];
        assert_eq!(ecds["nacked_version"], s["ecds_version"], "{n}");
        assert_eq!(
            ecds["acked_version"], ecds_version,
            "still runs the old: {n}"
        );
        let error = ecds["nack_error"].as_str().unwrap_or_default();
        assert!(!error.is_empty(), "{n}");
        eprintln!("{} NACKed: {error}", n["id"]);
    }
    // Not resent: one response per node, however long we wait.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(cp.metric("seashard_xds_responses_total{type=\"ecds\"}")?, 2);
    assert_eq!(cp.metric("seashard_xds_nacks_total{type=\"ecds\"}")?, 2);
    // The Envoys keep routing with the map they had.
    assert_initial_routing(&[&edge, &side], "1")?;
    cp.kill();

    // A filter build that refuses the configuration in `on_configure` (here the
    // bench-noop filter, whose configuration schema differs: version skew between
    // the control plane and the filter deployed on the Envoys).
    let other = wasm_file("bench_noop.wasm")?;
    let cp = Cp::start(f.config(port, &other)?)?;
    let s = cp.wait_nodes(&["edge-1", "sidecar-1"], "nacked")?;
    for n in s["nodes"].as_array().unwrap_or(&Vec::new()) {
        let error = n["types"]["ecds"]["nack_error"]
            .as_str()
            .unwrap_or_default();
        eprintln!("{} NACKed: {error}", n["id"]);
        assert!(!error.is_empty(), "{n}");
        assert_eq!(n["types"]["ecds"]["acked_version"], ecds_version, "{n}");
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(cp.metric("seashard_xds_responses_total{type=\"ecds\"}")?, 2);
    assert_initial_routing(&[&edge, &side], "1")?;
    cp.kill();

    // Fixed: back to the configuration they run, still nothing to send.
    let cp = Cp::start(f.config(port, &f.wasm)?)?;
    let s = cp.wait_nodes(&["edge-1", "sidecar-1"], "current")?;
    assert_eq!(s["ecds_version"], ecds_version);
    assert_eq!(cp.metric("seashard_xds_responses_total{type=\"ecds\"}")?, 0);
    let history = cp.get_json("/v1/maps")?;
    assert_eq!(history["versions"].as_array().map(Vec::len), Some(1));
    cp.kill();
    Ok(())
}

#[test]
fn an_envoy_polling_rest_xds_routes_and_follows_a_push() -> Result<()> {
    let f = Fixture::new()?;
    let cp = Cp::start(f.config(0, &f.wasm)?)?;
    let envoy = start_envoy_with(Options {
        node_id: "rest-1".into(),
        control_plane: cp.http.to_string(),
        xds: Xds::Rest,
        refresh_delay: Duration::from_millis(200),
        wasm: f.wasm.clone(),
        ..Options::new(Kind::Sidecar)
    })?;
    let s = cp.wait_nodes(&["rest-1"], "current")?;
    assert_eq!(s["nodes"][0]["transport"], "rest", "{s}");
    assert_initial_routing(&[&envoy], "1")?;

    let mut map = initial_map();
    map["paths"] = json!([{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]);
    let (status, body) = cp.post_map(&map)?;
    assert_eq!(status, 200, "{body}");
    cp.wait_nodes(&["rest-1"], "current")?;
    let r = wait_until(Duration::from_secs(5), "map 2 through REST xDS", || {
        let r = route(&envoy, "/api/v1/admin/sys-info/")?;
        Ok((r.1 == "2").then_some(r))
    })?;
    assert_eq!(r.0, "dtable-server-2");
    // Polls of a current node are answered 304: one response per type and version.
    std::thread::sleep(Duration::from_millis(600));
    assert!(cp.metric("seashard_rest_polls_total")? >= 4);
    assert_eq!(cp.metric("seashard_xds_responses_total{type=\"ecds\"}")?, 2);
    cp.kill();
    Ok(())
}
