//! Simulated Envoys: ADS clients that subscribe to CDS and ECDS and ACK every
//! response, each on its own connection, as many as wanted in one process.

use std::net::SocketAddr;
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

pub const TOKEN: &str = "sim-token-0123456";

/// A control plane on loopback with a store in `dir`.
pub async fn start(dir: &std::path::Path) -> Running {
    let text = format!(
        r#"
        [listen]
        grpc = "127.0.0.1:0"
        http = "127.0.0.1:0"
        [store]
        path = "state.db"
        [api]
        token = "{TOKEN}"
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

/// One simulated Envoy: subscribes, then ACKs every response, until the stream ends.
/// Like Envoy, it reconnects when a connection fails before any response (500
/// connecting at once can overflow the listen backlog on a busy machine).
pub async fn envoy(addr: SocketAddr, id: String) {
    for _ in 0..100 {
        if session(addr, &id).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One ADS stream; true when it got at least one response.
async fn session(addr: SocketAddr, id: &str) -> bool {
    let Ok(mut client) = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await
    else {
        return false;
    };
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
            return false;
        }
    }
    let Ok(resp) = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    else {
        return false;
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
    answered
}

/// Starts `n` simulated Envoys and waits until all run the current versions.
pub async fn connect_all(running: &Running, n: usize, timeout: Duration) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        tokio::spawn(envoy(running.grpc_addr, format!("sim-{i:04}")));
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
