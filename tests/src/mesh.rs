//! Real Envoys standing in for Istio sidecars, built from what `seactl mesh istio`
//! writes (no cluster can run here).
//!
//! ```text
//! writers ─▶ [client pod's sidecar, outbound :5000]          [dtable-server-N pod's sidecar,
//!             base-router (edges.yaml's patch) sets  ──route──▶  inbound :5000]
//!             x-dtable-server; routes rendered from             base-router (guards.yaml's
//!             routing.yaml's VirtualService                     patch) ─▶ fake dtable-server
//!                     │  ECDS over gRPC (the override's static cluster)  │
//!                     └──────────────▶ seactl serve ◀─────────────────────┘
//! ```
//!
//! Each stand-in is made as the real sidecar is:
//!
//! - **bootstrap**: a base with the node Istio gives a sidecar (`sidecar~IP~POD.NS~...`)
//!   and the listener and clusters istiod would send, then the generated bootstrap
//!   override passed as `--config-yaml`, which is how Istio's agent hands it to Envoy
//!   (Envoy merges it: repeated fields appended). Only the override's one endpoint
//!   address is changed, from the cluster's DNS name to the test's loopback port;
//! - **filter**: the EnvoyFilter's `patch.value`, inserted where its `match` says
//!   (`INSERT_BEFORE` the router of the HCM on that port, inbound or outbound),
//!   after the CORS and fault filters istiod puts first, which choose the route;
//! - **routes** (edges): one per `http` entry of the VirtualService, as istiod
//!   renders them: a header match to `outbound|PORT||HOST.NS.svc.cluster.local`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Envoy;
use crate::rollout::seactl_bin;

/// Every file `seactl mesh istio` wrote, by its name, as JSON documents.
pub struct Manifests {
    pub files: BTreeMap<String, Vec<Value>>,
}

impl Manifests {
    /// Runs `seactl mesh istio --config CONFIG --wasm WASM -o OUT ARGS` and parses
    /// every file it lists.
    pub fn generate(config: &Path, wasm: &Path, out: &Path, args: &[&str]) -> Result<Manifests> {
        let o = Command::new(seactl_bin()?)
            .args(["mesh", "istio", "--image", "seashard:test", "--config"])
            .arg(config)
            .arg("--wasm")
            .arg(wasm)
            .arg("--output-dir")
            .arg(out)
            .args(args)
            .output()?;
        if !o.status.success() {
            bail!("seactl mesh istio: {}", String::from_utf8_lossy(&o.stderr));
        }
        let mut files = BTreeMap::new();
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            let path = Path::new(line.trim());
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let name = path
                .strip_prefix(out)
                .unwrap_or(path)
                .to_string_lossy()
                .into_owned();
            files.insert(name, parse_documents(&text)?);
        }
        ensure!(!files.is_empty(), "seactl mesh istio listed no file");
        Ok(Manifests { files })
    }

    /// The one object of `kind` named `name`, in any file.
    pub fn object(&self, kind: &str, name: &str) -> Result<&Value> {
        self.files
            .values()
            .flatten()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .ok_or_else(|| anyhow!("no {kind} named {name} in the manifests"))
    }
}

/// Every document of a YAML stream, as JSON (serde_yaml: a parser independent of
/// the writer in `deploy::yaml`).
pub fn parse_documents(text: &str) -> Result<Vec<Value>> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).map_err(anyhow::Error::from))
        .collect()
}

/// The HTTP filter an EnvoyFilter inserts, after checking that it is one
/// `INSERT_BEFORE` the router of the HTTP connection manager in `context` on `port`.
pub fn envoy_filter_value(filter: &Value, context: &str, port: u16) -> Result<Value> {
    let patches = filter["spec"]["configPatches"]
        .as_array()
        .ok_or_else(|| anyhow!("no configPatches in {filter}"))?;
    ensure!(patches.len() == 1, "one patch expected: {filter}");
    let p = &patches[0];
    let m = &p["match"];
    ensure!(p["applyTo"] == "HTTP_FILTER", "applyTo: {p}");
    ensure!(m["context"] == context, "context: want {context}: {p}");
    ensure!(m["listener"]["portNumber"] == port, "portNumber: {p}");
    let chain = &m["listener"]["filterChain"]["filter"];
    ensure!(
        chain["name"] == "envoy.filters.network.http_connection_manager"
            && chain["subFilter"]["name"] == "envoy.filters.http.router",
        "filterChain: {p}"
    );
    ensure!(p["patch"]["operation"] == "INSERT_BEFORE", "operation: {p}");
    Ok(p["patch"]["value"].clone())
}

/// The bootstrap override's `custom_bootstrap.json`, its one endpoint (the
/// control plane's headless Service) pointed at `grpc`.
pub fn bootstrap_override(m: &Manifests, name: &str, grpc: SocketAddr) -> Result<String> {
    let cm = m.object("ConfigMap", &format!("{name}-bootstrap"))?;
    let text = cm["data"]["custom_bootstrap.json"]
        .as_str()
        .ok_or_else(|| anyhow!("no custom_bootstrap.json in {cm}"))?;
    let mut doc: Value = serde_json::from_str(text)?;
    let clusters = doc["static_resources"]["clusters"]
        .as_array_mut()
        .ok_or_else(|| anyhow!("no clusters in the override"))?;
    ensure!(clusters.len() == 1, "one cluster expected in the override");
    let sa = &mut clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    ensure!(
        sa["address"]
            .as_str()
            .is_some_and(|a| a.ends_with(".svc.cluster.local")),
        "the override's endpoint is not a Service name: {sa}"
    );
    sa["address"] = json!(grpc.ip().to_string());
    sa["port_value"] = json!(grpc.port());
    Ok(doc.to_string())
}

/// The node id Istio gives the sidecar of pod `pod` in `namespace`.
pub fn istio_node_id(pod: &str, namespace: &str) -> String {
    format!("sidecar~127.0.0.1~{pod}.{namespace}~{namespace}.svc.cluster.local")
}

/// A static loopback cluster as istiod's EDS would fill it.
fn static_cluster(name: &str, addr: SocketAddr, connect_timeout: &str) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {
            "address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}
        }}]}]},
    })
}

/// Starts a stand-in sidecar: the base bootstrap (node, admin, one listener on
/// `listen` whose HCM runs `filter` then the router over `routes`, `clusters`)
/// merged with `override_json` by Envoy itself (`--config-yaml`).
pub fn start_sidecar(
    node_id: &str,
    listen: SocketAddr,
    stat_prefix: &str,
    filter: Value,
    routes: Vec<Value>,
    clusters: Vec<Value>,
    override_json: &str,
) -> Result<Envoy> {
    let bootstrap = json!({
        "node": {"id": node_id, "cluster": stat_prefix},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": stat_prefix,
                "address": {"socket_address": {"address": listen.ip().to_string(), "port_value": listen.port()}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": stat_prefix,
                        "route_config": {
                            "name": "5000",
                            "validate_clusters": false,
                            "virtual_hosts": [{"name": "dtable-server", "domains": ["*"], "routes": routes}],
                        },
                        // Before the patch point, as istiod renders a sidecar's chain:
                        // CORS and fault read the route (their per-route settings), so
                        // it is chosen before base-router runs and must be chosen again
                        // once base-router set the header.
                        "http_filters": [
                            {"name": "envoy.filters.http.cors", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                            }},
                            {"name": "envoy.filters.http.fault", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
                            }},
                            filter,
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                            }},
                        ],
                    },
                }]}],
            }],
            "clusters": clusters,
        },
    });
    Envoy::start_with_args(&bootstrap.to_string(), &["--config-yaml", override_json])
}

/// An inbound stand-in (a dtable-server pod's sidecar): `filter` (the guard's)
/// in front of the app at `app`, connecting to it within the `Sidecar` resource's
/// `inboundConnectionPool` timeout.
pub fn start_guard(
    node_id: &str,
    listen: SocketAddr,
    filter: Value,
    sidecar: &Value,
    app: SocketAddr,
    override_json: &str,
) -> Result<Envoy> {
    let cluster = "inbound|5000||";
    let connect = sidecar["spec"]["inboundConnectionPool"]["tcp"]["connectTimeout"]
        .as_str()
        .ok_or_else(|| anyhow!("no inbound connect timeout in {sidecar}"))?;
    start_sidecar(
        node_id,
        listen,
        "inbound_0.0.0.0_5000",
        filter,
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}})],
        vec![static_cluster(cluster, app, connect)],
        override_json,
    )
}

/// An outbound stand-in (a client pod's sidecar): `filter` (the edge's) and the
/// routes istiod renders from `virtual_service`, each destination Service
/// `HOST` reached at `services[HOST]` (its pod's inbound stand-in).
pub fn start_edge(
    node_id: &str,
    listen: SocketAddr,
    filter: Value,
    virtual_service: &Value,
    namespace: &str,
    services: &BTreeMap<String, SocketAddr>,
    override_json: &str,
) -> Result<Envoy> {
    let mut routes = Vec::new();
    let mut clusters: BTreeMap<String, Value> = BTreeMap::new();
    for http in virtual_service["spec"]["http"]
        .as_array()
        .ok_or_else(|| anyhow!("no http routes in {virtual_service}"))?
    {
        let dest = &http["route"][0]["destination"];
        let host = dest["host"]
            .as_str()
            .ok_or_else(|| anyhow!("no destination host in {http}"))?;
        let port = dest["port"]["number"].as_u64().unwrap_or(0);
        let cluster = format!("outbound|{port}||{host}.{namespace}.svc.cluster.local");
        let addr = services
            .get(host)
            .ok_or_else(|| anyhow!("no stand-in for Service {host}"))?;
        clusters.insert(cluster.clone(), static_cluster(&cluster, *addr, "1s"));
        let mut m = json!({"prefix": "/"});
        if let Some(matches) = http["match"].as_array() {
            ensure!(matches.len() == 1, "one match per route expected: {http}");
            let headers = matches[0]["headers"]
                .as_object()
                .ok_or_else(|| anyhow!("a match without headers: {http}"))?;
            m["headers"] = headers
                .iter()
                .map(|(name, cond)| {
                    let exact = cond["exact"]
                        .as_str()
                        .ok_or_else(|| anyhow!("only exact header matches: {http}"))?;
                    Ok(json!({"name": name, "string_match": {"exact": exact}}))
                })
                .collect::<Result<Vec<_>>>()?
                .into();
        }
        routes.push(json!({
            "name": http["name"],
            "match": m,
            "route": {"cluster": cluster, "timeout": "0s"},
        }));
    }
    start_sidecar(
        node_id,
        listen,
        "outbound_0.0.0.0_5000",
        filter,
        routes,
        clusters.into_values().collect(),
        override_json,
    )
}
