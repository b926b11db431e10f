//! The control plane's test harness: a control plane on loopback, in the test's
//! runtime or in one of its own ([`Served`]), its HTTP API, and simulated Envoys:
//! ADS clients that subscribe to CDS and ECDS and ACK every response, each on its
//! own connection, as many as wanted in one process; over plain gRPC, or over
//! mutual TLS with a client certificate per node ([`SimTls`]).

#![allow(dead_code)] // Each test and bench uses a part.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::resources::{CDS_TYPE_URL, ECDS_TYPE_URL};
use control_plane::{Config, ControlPlane, Proposal, ResourceType, Running, Store};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use serde_json::Value;
use shardmap::{PathRule, ShardMap};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The API token of every control plane here.
pub const TOKEN: &str = "sim-token-0123456";

/// The edges' filter configuration name (their ECDS resource).
pub const FILTER: &str = "seashard.base_router";

/// The `[store]` body of a SQLite store in the configuration's directory.
pub const STATE_DB: &str = "path = \"state.db\"";

/// The text of a `seashard.toml` for a control plane on loopback (ports the system
/// picks) with the API token [`TOKEN`]: `listen` and `api` are more lines of those
/// sections, `store` the `[store]` section's body, `rest` what follows `[filter]`
/// (the servers, a `[rollout]` section).
pub fn config_text(listen: &str, store: &str, api: &str, rest: &str) -> String {
    format!(
        r#"
        [listen]
        grpc = "127.0.0.1:0"
        http = "127.0.0.1:0"
        {listen}
        [store]
        {store}
        [api]
        token = "{TOKEN}"
        {api}
        [filter]
        wasm = "/opt/base-router.wasm"
        {rest}
        "#
    )
}

/// A `[[server]]` section: `name` at `address`, then the lines `more`.
pub fn server(name: &str, address: &str, more: &str) -> String {
    format!("[[server]]\nname = \"{name}\"\naddress = \"{address}\"\n{more}\n")
}

/// The two servers of most tests, `dtable-server` (127.0.0.1:5000) and
/// `dtable-server-2` (127.0.0.1:5001), each with its lines of `more`.
pub fn two_servers(more: [&str; 2]) -> String {
    server("dtable-server", "127.0.0.1:5000", more[0])
        + &server("dtable-server-2", "127.0.0.1:5001", more[1])
}

/// Writes `text` as `dir`/seashard.toml and loads it.
pub fn write_config(dir: &Path, text: &str) -> Config {
    let path = dir.join("seashard.toml");
    std::fs::write(&path, text).expect("write config");
    Config::load(&path).expect("config")
}

/// A control plane on loopback with a store in `dir`.
pub async fn start(dir: &Path) -> Running {
    start_with(dir, "", "").await
}

/// A control plane whose ADS requires mutual TLS with `tls`'s CA (and, with
/// `bind_node_ids`, node ids matching the certificates).
pub async fn start_mtls(dir: &Path, tls: &SimTls, bind_node_ids: bool) -> Running {
    let d = tls.dir.display();
    start_with(
        dir,
        &format!(
            "[listen.tls]\ncert = \"{d}/control-plane.crt\"\nkey = \"{d}/control-plane.key\"\n\
             client_ca = \"{d}/ca.crt\"\nrequire_node_id_match = {bind_node_ids}\n"
        ),
        "",
    )
    .await
}

/// A control plane with `listen_extra` (e.g. `[listen.tls]`) after `[listen]`, and
/// `api_extra` (e.g. `[api.tls]`) after `[api]`.
pub async fn start_with(dir: &Path, listen_extra: &str, api_extra: &str) -> Running {
    start_config(dir, listen_extra, api_extra, STATE_DB).await
}

/// As [`start_with`], with `store` as the `[store]` section's body.
pub async fn start_config(dir: &Path, listen_extra: &str, api_extra: &str, store: &str) -> Running {
    // Every simulated Envoy connects from 127.0.0.1.
    let listen = format!("max_streams_per_peer = 100000\n{listen_extra}");
    let text = config_text(&listen, store, api_extra, &two_servers(["", ""]));
    start_plane(write_config(dir, &text)).await
}

/// A control plane on `config`, serving in this runtime.
pub async fn start_plane(config: Config) -> Running {
    let plane = ControlPlane::open(config).expect("open");
    control_plane::start(plane, TOKEN).await.expect("start")
}

/// The control plane's metrics as `/metrics` shows them.
pub fn metrics(running: &Running) -> String {
    let plane = &running.plane;
    plane
        .metrics()
        .render(&plane.snapshot(), &plane.registry().nodes(), &[])
}

/// A control plane serving on loopback in a runtime of its own, for tests that block
/// (HTTP calls, sleeps). Dropping it drops the runtime: the control plane is killed
/// (no shutdown, no last flush), as a SIGKILL would; [`Served::stop`] shuts it down.
pub struct Served {
    pub rt: tokio::runtime::Runtime,
    pub running: Running,
    pub plane: Arc<ControlPlane>,
    /// The API's URL, `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Served {
    /// A control plane on `config` and the store it names.
    pub fn start(config: Config) -> Served {
        let store = control_plane::store::open(&config).expect("store");
        Served::start_on(config, store)
    }

    /// As [`Served::start`], on `store`.
    pub fn start_on(config: Config, store: Arc<dyn Store>) -> Served {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let plane = ControlPlane::with_store(config, store).expect("open");
        let running = rt
            .block_on(control_plane::start(plane.clone(), TOKEN))
            .expect("start");
        let base = format!("http://{}", running.http_addr);
        Served {
            rt,
            running,
            plane,
            base,
        }
    }

    /// Shuts the control plane down.
    pub fn stop(self) {
        let Served { rt, running, .. } = self;
        rt.block_on(running.shutdown());
    }

    /// [`call`] of the API's `path`.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        call(method, &format!("{}{path}", self.base), token, body)
    }

    /// GET `path` with [`TOKEN`]: (status, JSON body or `Null`).
    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, Some(TOKEN), None)
    }

    /// POST `body` to `path` with [`TOKEN`]: (status, JSON body or `Null`).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(TOKEN), Some(body))
    }

    /// POST `body` as `content_type` to `path` with [`TOKEN`]: (status, body text).
    pub fn send(&self, path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
        let url = format!("{}{path}", self.base);
        fetch("POST", &url, Some(TOKEN), Some(content_type), body)
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        fetch("GET", &format!("{}/metrics", self.base), None, None, &[]).1
    }
}

/// An HTTP client that takes every status as an answer, with a 10 s timeout.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// One HTTP request, GET, DELETE or POST (which sends `body` as `content_type`),
/// with `token` as its bearer token: (status, body text).
pub fn fetch(
    method: &str,
    url: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let a = agent();
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" | "DELETE" => {
            let mut r = if method == "GET" {
                a.get(url)
            } else {
                a.delete(url)
            };
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()
        }
        _ => {
            let mut r = a.post(url);
            if let Some(t) = content_type {
                r = r.header("Content-Type", t);
            }
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send(body)
        }
    };
    let mut resp = resp.expect("HTTP request");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// An API call with `body` as JSON: (status, JSON body or `Null`).
pub fn call(method: &str, url: &str, token: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    let (status, text) = fetch(
        method,
        url,
        token,
        Some("application/json"),
        body.as_bytes(),
    );
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A CA, the control plane's certificate (`127.0.0.1`, `localhost`) and client
/// certificates, made by `control_plane::certs` in a directory.
pub struct SimTls {
    pub dir: PathBuf,
    ca: Certificate,
}

impl SimTls {
    /// A new CA and server certificate in `dir`.
    pub fn new(dir: &Path) -> SimTls {
        certs::init(dir, None, 1, false).expect("CA");
        certs::server(
            dir,
            "control-plane",
            &["127.0.0.1".into(), "localhost".into()],
            1,
            false,
        )
        .expect("server certificate");
        let ca = Certificate::from_pem(std::fs::read(dir.join("ca.crt")).expect("ca.crt"));
        SimTls {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// A client certificate for `cn` (made once), as a node `id`'s TLS client.
    pub fn client(&self, cn: &str) -> ClientTlsConfig {
        let cert = self.dir.join(format!("{cn}.crt"));
        if !cert.exists() {
            certs::client(&self.dir, cn, 1, false).expect("client certificate");
        }
        let read = |p: PathBuf| std::fs::read(p).expect("client certificate files");
        let identity = Identity::from_pem(read(cert), read(self.dir.join(format!("{cn}.key"))));
        self.anonymous().identity(identity)
    }

    /// Trusts the control plane, shows no certificate.
    pub fn anonymous(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .domain_name("localhost")
    }
}

/// One simulated Envoy: subscribes, then ACKs every response, until the stream ends.
/// Like Envoy, it reconnects when a connection fails before any response (500
/// connecting at once can overflow the listen backlog on a busy machine).
pub async fn envoy(addr: SocketAddr, id: String) {
    envoy_with(addr, id, None).await
}

/// [`envoy`], over TLS with `tls`.
pub async fn envoy_with(addr: SocketAddr, id: String, tls: Option<ClientTlsConfig>) {
    for _ in 0..100 {
        if matches!(
            ads(addr, &id, FILTER, tls.clone(), |_| true).await,
            Ok(true)
        ) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Node `id` of the simulated cluster.
pub fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: "sim".into(),
        ..Default::default()
    })
}

/// An Envoy's first requests: CDS as `node`, then the ECDS `resource`.
pub fn subscribe(node: Option<Node>, resource: &str) -> [DiscoveryRequest; 2] {
    [
        DiscoveryRequest {
            node,
            type_url: CDS_TYPE_URL.into(),
            ..Default::default()
        },
        DiscoveryRequest {
            type_url: ECDS_TYPE_URL.into(),
            resource_names: vec![resource.into()],
            ..Default::default()
        },
    ]
}

/// The ACK of `r`; an ECDS one names `resource` again.
pub fn ack(r: DiscoveryResponse, resource: &str) -> DiscoveryRequest {
    let names = if r.type_url == ECDS_TYPE_URL {
        vec![resource.into()]
    } else {
        vec![]
    };
    DiscoveryRequest {
        version_info: r.version_info,
        response_nonce: r.nonce,
        type_url: r.type_url,
        resource_names: names,
        ..Default::default()
    }
}

/// Opens one ADS stream as node `id` and waits for the first response: `Ok` with
/// one, the stream's status (or the connection's error) without.
pub async fn first_response(
    addr: SocketAddr,
    id: &str,
    tls: Option<ClientTlsConfig>,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel(8);
    let mut client = connect(addr, tls).await?;
    let [cds, _] = subscribe(node(id), FILTER);
    tx.send(cds).await.map_err(|e| e.to_string())?;
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    match inbound.message().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("stream closed".into()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    }
}

async fn connect(
    addr: SocketAddr,
    tls: Option<ClientTlsConfig>,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    let endpoint = match tls {
        None => Endpoint::from_shared(format!("http://{addr}")),
        Some(tls) => {
            Endpoint::from_shared(format!("https://{addr}")).and_then(|e| e.tls_config(tls))
        }
    }
    .map_err(|e| e.to_string())?;
    let channel = endpoint.connect().await.map_err(|e| {
        // The transport error's cause says why (a refused handshake, ...).
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    })?;
    Ok(AggregatedDiscoveryServiceClient::new(channel))
}

/// One ADS stream as node `id`, subscribed to CDS and the ECDS `resource`: ACKs each
/// response `take` accepts and ignores the others (as a stopped Envoy), until the
/// stream ends. `Ok(true)` when it got at least one response.
pub async fn ads(
    addr: SocketAddr,
    id: &str,
    resource: &str,
    tls: Option<ClientTlsConfig>,
    mut take: impl FnMut(&DiscoveryResponse) -> bool,
) -> Result<bool, String> {
    let mut client = connect(addr, tls).await?;
    let (tx, rx) = mpsc::channel(8);
    for r in subscribe(node(id), resource) {
        if tx.send(r).await.is_err() {
            return Ok(false);
        }
    }
    let Ok(resp) = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return Ok(false);
    };
    let mut inbound = resp.into_inner();
    let mut answered = false;
    while let Ok(Some(r)) = inbound.message().await {
        answered = true;
        if take(&r) && tx.send(ack(r, resource)).await.is_err() {
            break;
        }
    }
    Ok(answered)
}

/// The node id of the `i`th simulated Envoy.
pub fn node_id(i: usize) -> String {
    format!("sim-{i:04}")
}

/// Starts `n` simulated Envoys and waits until all run the current versions.
pub async fn connect_all(running: &Running, n: usize, timeout: Duration) -> Duration {
    connect_all_with(running, n, timeout, None).await
}

/// [`connect_all`]; with `tls`, each Envoy over mutual TLS with its own client
/// certificate (made before the clock starts).
pub async fn connect_all_with(
    running: &Running,
    n: usize,
    timeout: Duration,
    tls: Option<&SimTls>,
) -> Duration {
    let configs: Vec<Option<ClientTlsConfig>> =
        (0..n).map(|i| tls.map(|t| t.client(&node_id(i)))).collect();
    let start = Instant::now();
    for (i, tls) in configs.into_iter().enumerate() {
        tokio::spawn(envoy_with(running.grpc_addr, node_id(i), tls));
    }
    let plane = &running.plane;
    let deadline = Instant::now() + timeout;
    loop {
        let snap = plane.snapshot();
        let ecds = plane
            .registry()
            .convergence(ResourceType::Ecds, &snap.ecds.version);
        let cds = plane
            .registry()
            .convergence(ResourceType::Cds, &snap.cds.version);
        if ecds.acked.len() == n && cds.acked.len() == n {
            return start.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} simulated Envoys are current after {timeout:?}",
            ecds.acked.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Proposes a map that moves no base: a path rule named after `i`, and `pins` pins
/// on the default server (to make it big). Returns its version.
pub async fn push(plane: &Arc<ControlPlane>, i: usize, pins: usize) -> u64 {
    let mut map = ShardMap {
        default: "dtable-server".into(),
        paths: vec![PathRule {
            prefix: Some(format!("/push/{i}/")),
            regex: None,
            server: "dtable-server-2".into(),
        }],
        ..ShardMap::default()
    };
    for p in 0..pins {
        // Pins on the default server: they move nothing.
        map.pins.insert(format!("{p:08x}"), "dtable-server".into());
    }
    let p = plane.clone();
    tokio::task::spawn_blocking(move || {
        p.propose(&Proposal {
            map,
            base_version: None,
            author: "test".into(),
            comment: String::new(),
            dry_run: false,
        })
    })
    .await
    .expect("join")
    .expect("propose")
    .version
}

/// Publishes a map that moves nothing ([`push`]) and returns how long until every
/// connected node ACKed it.
pub async fn push_and_wait(plane: &Arc<ControlPlane>, i: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    push(plane, i, 0).await;
    let c = plane.wait_ecds_converged(timeout).await;
    assert!(
        c.complete(),
        "not converged: {} pending, {} nacked",
        c.pending.len(),
        c.nacked.len()
    );
    start.elapsed()
}
