//! seashard in an Istio mesh, with real Envoys standing in for the sidecars (no
//! cluster runs here; `seashard_tests::mesh` says how each stand-in is built from
//! the manifests `seactl mesh istio` writes).
//!
//! What this proves: the bootstrap override, merged by Envoy as Istio's agent has
//! it merged, gives the sidecars a control plane to take ECDS from over gRPC
//! (`ExtensionConfigDiscoveryService`, not ADS: a sidecar's ADS is istiod's); the
//! EnvoyFilters' filter, inserted as their patches say, runs with its map from
//! `seactl serve`, each sidecar its own instance by its Istio node id; the
//! VirtualService's header routes, as istiod renders them, send each base to its
//! Service because base-router's header change re-selects the route (Envoy clears
//! the route cache for proxy-wasm ABI 0.2.1); and a rollout that waits for the
//! inbound (guard) sidecars loses no acknowledged write while an edge sidecar is cut
//! off from the control plane.
//!
//! What it does not prove: istiod rendering (its listeners carry more filters and
//! other names), the injector honouring the annotations, mesh mTLS between the
//! sidecars (plain HTTP here), Kubernetes DNS and pod restarts (the hooks restart
//! local processes).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use seashard_tests::dtable::{Cluster, spread_bases};
use seashard_tests::lost_writes::{
    BASES, ENVOY_SERVERS, Outcome, SAVE_INTERVAL, WAIT, wait_until_a_moved_base_is_loaded_by,
    write_then_cut,
};
use seashard_tests::mesh::{
    Manifests, bootstrap_override, envoy_filter_value, istio_node_id, start_edge, start_guard,
};
use seashard_tests::relay::Relay;
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, new_map, old_map, slow_hook};
use seashard_tests::{Connection, free_port, loopback, wasm_file};

const NS: &str = "seatable";

/// The mesh form of the configuration (`seactl mesh istio` refuses anything else:
/// every server guarded, listening on all addresses, the token from the
/// environment); `health` holds each server's health URL (through its guard).
fn write_mesh_config(
    dir: &Path,
    cluster: &Cluster,
    http: SocketAddr,
    grpc: SocketAddr,
    guards: &[SocketAddr],
) -> Result<String> {
    std::fs::write(dir.join("initial.json"), old_map().to_string())?;
    let wasm = wasm_file("base_router.wasm")?;
    let mut text = format!(
        "initial_map = \"initial.json\"\n\
         [listen]\ngrpc = \"0.0.0.0:{}\"\nhttp = \"0.0.0.0:{}\"\n\
         keepalive_interval = \"2s\"\nkeepalive_timeout = \"2s\"\n\
         [store]\npath = \"{}\"\n\
         [api]\ntoken_env = \"SEASHARD_TOKEN\"\n\
         [filter]\nwasm = {wasm:?}\nretry_after = 1\n\
         [rollout]\nack_timeout = \"6s\"\nhealth_timeout = \"15s\"\nrestart_timeout = \"30s\"\n",
        grpc.port(),
        http.port(),
        dir.join("data/seashard.db").display(),
    );
    for (s, guard) in cluster.servers.iter().zip(guards) {
        text.push_str(&format!(
            "[[server]]\nname = \"{name}\"\naddress = \"{name}:5000\"\n\
             health_url = \"http://{guard}/ping/\"\nguarded = true\n\
             restart = {{ kind = \"command\", argv = {} }}\n",
            serde_json::to_string(&slow_hook(s.restart_hook()?))?,
            name = s.name,
        ));
    }
    Ok(text)
}

/// GET a path through `addr` with `headers`: the status and the answering server.
fn served_by(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String)> {
    let r = Connection::open(addr)?.get(path, headers)?;
    let server = r
        .json()
        .ok()
        .and_then(|j| j["server"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok((r.status, server))
}

#[test]
fn istio_stand_in_sidecars_route_by_header_and_a_guarded_rollout_loses_nothing() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-mesh-")
        .tempdir()?;
    std::fs::create_dir_all(dir.path().join("data"))?;
    let mut cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let guards: Vec<SocketAddr> = (0..ENVOY_SERVERS.len())
        .map(|_| free_port().map(loopback))
        .collect::<Result<_>>()?;

    // The manifests, from the configuration the cluster would run...
    let mesh_text = write_mesh_config(dir.path(), &cluster, http, grpc, &guards)?;
    let mesh_config = dir.path().join("seashard.toml");
    std::fs::write(&mesh_config, &mesh_text)?;
    let wasm = wasm_file("base_router.wasm")?;
    let m = Manifests::generate(&mesh_config, &wasm, &dir.path().join("manifests"), &[])?;
    // ...and the control plane on that configuration, on loopback only here.
    let run_config = dir.path().join("run.toml");
    std::fs::write(&run_config, mesh_text.replace("0.0.0.0:", "127.0.0.1:"))?;
    let env = [("SEASHARD_TOKEN".to_owned(), TOKEN.to_owned())];
    let cp = ControlPlaneProcess::start_with_env(&run_config, http, grpc, &env)?;
    let over = bootstrap_override(&m, "seashard", grpc)?;

    // The dtable-server pods' inbound sidecars: the guards.
    let mut sidecars = Vec::new();
    let mut services = BTreeMap::new();
    for (s, listen) in cluster.servers.iter().zip(&guards) {
        let filter = envoy_filter_value(
            m.object("EnvoyFilter", &format!("seashard-guard-{}", s.name))?,
            "SIDECAR_INBOUND",
            5000,
        )?;
        let sidecar = m.object("Sidecar", &format!("seashard-guard-{}", s.name))?;
        let node = istio_node_id(&format!("{}-0", s.name), NS);
        sidecars.push(start_guard(&node, *listen, filter, sidecar, s.addr, &over)?);
        services.insert(s.name.clone(), *listen);
    }
    // Two clients' outbound sidecars: the edges; dtable-db's reaches the control
    // plane through a relay that will cut it off.
    let edge_filter = envoy_filter_value(
        m.object("EnvoyFilter", "seashard-edge")?,
        "SIDECAR_OUTBOUND",
        5000,
    )?;
    let vs = m.object("VirtualService", "seashard-dtable-server")?;
    let web_node = istio_node_id("dtable-web-7d4b9c6f5-x2k1p", NS);
    let db_node = istio_node_id("dtable-db-5f6b7c8d9-q9z8w", NS);
    let web = start_edge(
        &web_node,
        loopback(0),
        edge_filter.clone(),
        vs,
        NS,
        &services,
        &over,
    )?;
    let relay = Relay::start(grpc, [127, 0, 0, 2].into())?;
    let over_relayed = bootstrap_override(&m, "seashard", relay.addr)?;
    let db = start_edge(
        &db_node,
        loopback(0),
        edge_filter,
        vs,
        NS,
        &services,
        &over_relayed,
    )?;
    let nodes: Vec<String> = ENVOY_SERVERS
        .iter()
        .map(|s| istio_node_id(&format!("{s}-0"), NS))
        .chain([web_node.clone(), db_node.clone()])
        .collect();
    cp.wait_current(&nodes.iter().map(String::as_str).collect::<Vec<_>>())
        .with_context(|| cp.logs())?;
    let status = cp.get_json("/v1/status")?;
    for s in ENVOY_SERVERS {
        let node = istio_node_id(&format!("{s}-0"), NS);
        let n = status["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == node.as_str())
            .ok_or_else(|| anyhow!("{node} not in {status}"))?;
        ensure!(
            n["role"]["kind"] == "guard" && n["role"]["server"] == s,
            "{node} is not known as the guard of {s}: {n}"
        );
    }

    // Routing by the header: a base of each server reaches it, also when the client
    // sends the header itself (the filter overwrites it and the route is chosen
    // again: with the first choice kept, the request would take the no-header
    // route to dtable-server, whose guard answers 421).
    let bases = spread_bases(BASES);
    let of = |first: &[u8]| -> Result<String> {
        bases
            .iter()
            .map(|b| b.to_string())
            .find(|b| first.contains(&b.as_bytes()[0]))
            .ok_or_else(|| anyhow!("no base starting with {first:?}"))
    };
    let (b1, b2) = (of(b"0123")?, of(b"89abcdef")?);
    for (base, owner) in [(&b1, ENVOY_SERVERS[0]), (&b2, ENVOY_SERVERS[1])] {
        let path = format!("/api/v1/dtables/{base}/");
        for spoof in ["", ENVOY_SERVERS[0], ENVOY_SERVERS[1], "elsewhere"] {
            let headers: Vec<(&str, &str)> = if spoof.is_empty() {
                vec![]
            } else {
                vec![("x-dtable-server", spoof)]
            };
            let (status, server) = served_by(web.listener_addr, &path, &headers)?;
            ensure!(
                (status, server.as_str()) == (200, owner),
                "{path} with x-dtable-server `{spoof}`: {status} from `{server}`, want 200 from {owner}\n{}",
                web.logs()
            );
        }
    }
    // A guard refuses another server's base, whoever sends it.
    let (status, _) = served_by(guards[1], &format!("/api/v1/dtables/{b1}/"), &[])?;
    ensure!(
        status == 421,
        "dtable-server-2's guard passed a base of dtable-server: {status}"
    );

    // Writers through both edges; the db sidecar's link dies silently; the map moves
    // bases 4-7 to dtable-server-2. The rollout waits for the guards only.
    let (writers_web, writers_db) = write_then_cut(
        &cluster,
        web.listener_addr,
        db.listener_addr,
        &bases,
        &relay,
    )?;
    let rollout = cp.push_and_wait(&new_map(), "mesh stand-in rollout", Duration::from_secs(90))?;
    ensure!(
        rollout["state"] == "done",
        "the rollout did not finish: {rollout}\n{}",
        cp.logs()
    );
    wait_until_a_moved_base_is_loaded_by(&cluster, ENVOY_SERVERS[1])?;
    writers_web.wait_for_more(200, WAIT)?;
    // The cut-off sidecar keeps its old map for a while: its writes to moved bases
    // must be refused by the old owner's guard, never served.
    std::thread::sleep(Duration::from_millis(1500));
    let logs = vec![writers_web.stop(), writers_db.stop()];
    drop((web, db, sidecars, relay));
    let outcome = Outcome::from_logs(&mut cluster, logs)?;
    drop(cp);
    eprintln!("mesh stand-in rollout: {}", outcome.summary());
    ensure!(
        outcome.acknowledged > 500,
        "too few writes: {}",
        outcome.summary()
    );
    outcome.ensure_nothing_lost()
}
