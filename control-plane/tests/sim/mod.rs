//! Simulated Envoys: ADS clients that subscribe to CDS and ECDS and ACK every
//! response, each on its own connection, as many as wanted in one process; over
//! plain gRPC, or over mutual TLS with a client certificate per node ([`SimTls`]).

#![allow(dead_code)] // Each test and bench uses a part.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::resources::{CDS_TYPE_URL, ECDS_TYPE_URL};
use control_plane::{Config, ControlPlane, Proposal, ResourceType, Running};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use shardmap::{PathRule, ShardMap};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

pub const TOKEN: &str = "sim-token-0123456";

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
    start_config(dir, listen_extra, api_extra, "path = \"state.db\"").await
}

/// As [`start_with`], with `store` as the `[store]` section's body.
pub async fn start_config(dir: &Path, listen_extra: &str, api_extra: &str, store: &str) -> Running {
    let text = format!(
        r#"
        [listen]
        grpc = "127.0.0.1:0"
        http = "127.0.0.1:0"
        # Every simulated Envoy connects from 127.0.0.1.
        max_streams_per_peer = 100000
        {listen_extra}
        [store]
        {store}
        [api]
        token = "{TOKEN}"
        {api_extra}
        [filter]
        wasm = "/opt/base-router.wasm"
        [[server]]
        name = "dtable-server"
        address = "127.0.0.1:5000"
        [[server]]
        name = "dtable-server-2"
        address = "127.0.0.1:5001"
        "#
    );
    let path = dir.join("seashard.toml");
    std::fs::write(&path, text).expect("write config");
    let config = Config::load(&path).expect("config");
    let plane = ControlPlane::open(config).expect("open");
    control_plane::start(plane, TOKEN).await.expect("start")
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
        if matches!(session(addr, &id, tls.clone()).await, Ok(true)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
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
    let first = DiscoveryRequest {
        node: Some(Node {
            id: id.to_owned(),
            cluster: "sim".into(),
            ..Default::default()
        }),
        type_url: CDS_TYPE_URL.into(),
        ..Default::default()
    };
    tx.send(first).await.map_err(|e| e.to_string())?;
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

/// One ADS stream; `Ok(true)` when it got at least one response.
async fn session(addr: SocketAddr, id: &str, tls: Option<ClientTlsConfig>) -> Result<bool, String> {
    let mut client = connect(addr, tls).await?;
    let id = id.to_owned();
    let (tx, rx) = mpsc::channel(8);
    let node = Some(Node {
        id,
        cluster: "sim".into(),
        ..Default::default()
    });
    let first = [
        DiscoveryRequest {
            node,
            type_url: CDS_TYPE_URL.into(),
            ..Default::default()
        },
        DiscoveryRequest {
            type_url: ECDS_TYPE_URL.into(),
            resource_names: vec!["seashard.base_router".into()],
            ..Default::default()
        },
    ];
    for r in first {
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
        let names = if r.type_url == ECDS_TYPE_URL {
            vec!["seashard.base_router".into()]
        } else {
            vec![]
        };
        let ack = DiscoveryRequest {
            version_info: r.version_info,
            response_nonce: r.nonce,
            type_url: r.type_url,
            resource_names: names,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
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

/// Publishes a map that moves nothing (a path rule named after `i`) and returns how
/// long until every connected node ACKed it.
pub async fn push_and_wait(plane: &Arc<ControlPlane>, i: usize, timeout: Duration) -> Duration {
    let map = ShardMap {
        default: "dtable-server".into(),
        paths: vec![PathRule {
            prefix: Some(format!("/bench/{i}/")),
            regex: None,
            server: "dtable-server-2".into(),
        }],
        ..ShardMap::default()
    };
    let start = Instant::now();
    let p = plane.clone();
    tokio::task::spawn_blocking(move || {
        p.propose(&Proposal {
            map,
            base_version: None,
            author: "bench".into(),
            comment: String::new(),
            dry_run: false,
        })
    })
    .await
    .expect("join")
    .expect("propose");
    let c = plane.wait_ecds_converged(timeout).await;
    assert!(
        c.complete(),
        "not converged: {} pending, {} nacked",
        c.pending.len(),
        c.nacked.len()
    );
    start.elapsed()
}
