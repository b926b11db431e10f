//! Hostile ADS clients against a real control plane on loopback. Each gets a clear
//! error or a closed stream, and a well-behaved Envoy connected meanwhile still gets
//! the next push within 1 s: a node id of 1 MB, a node that NACKs everything, one that
//! never reads its stream, 2 000 streams from one address, an unknown type URL, and
//! bytes that are not a `DiscoveryRequest`.

mod sim;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::resources::ECDS_TYPE_URL;
use control_plane::{ControlPlane, Running};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use sim::{FILTER, TOKEN, node, push};
use tempfile::TempDir;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// A control plane in a new temporary directory, and a well-behaved Envoy that got
/// its first configuration.
async fn start() -> (TempDir, Running, Good) {
    let dir = tempfile::tempdir().unwrap();
    let text = sim::config_text(
        "max_streams_per_peer = 64\nsend_timeout = \"1s\"",
        sim::STATE_DB,
        "max_body = 65536",
        &sim::two_servers(["", ""]),
    );
    let running = sim::start_plane(sim::write_config(dir.path(), &text)).await;
    let good = Good::start(running.grpc_addr).await;
    (dir, running, good)
}

/// A channel to the control plane from `source` (a loopback address of its own).
async fn channel(addr: SocketAddr, source: Option<IpAddr>) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(source)
        .connect()
        .await
        .unwrap()
}

/// The first requests of an Envoy that is node `id`.
fn subscribe(id: &str) -> Vec<DiscoveryRequest> {
    sim::subscribe(node(id), FILTER).to_vec()
}

/// A well-behaved Envoy: ACKs everything; `latest` is the last ECDS version it got.
struct Good {
    latest: watch::Receiver<String>,
}

impl Good {
    async fn start(addr: SocketAddr) -> Good {
        let (latest_tx, latest) = watch::channel(String::new());
        tokio::spawn(async move {
            sim::ads(addr, "good", FILTER, None, |r| {
                if r.type_url == ECDS_TYPE_URL {
                    latest_tx.send_replace(r.version_info.clone());
                }
                true
            })
            .await
        });
        let mut good = Good { latest };
        good.wait_for(&|v: &str| !v.is_empty(), Duration::from_secs(10))
            .await;
        good
    }

    async fn wait_for(&mut self, ok: &dyn Fn(&str) -> bool, within: Duration) -> Duration {
        let start = Instant::now();
        let got = tokio::time::timeout(within, self.latest.wait_for(|v| ok(v)))
            .await
            .map(|r| r.is_ok());
        assert!(
            got == Ok(true),
            "the good Envoy did not get it within {within:?} (has {:?})",
            self.latest.borrow()
        );
        start.elapsed()
    }

    /// Pushes a map that moves nothing (with `pins` pins, to make it big) and
    /// asserts this Envoy has it within 1 s.
    async fn gets_the_next_push(&mut self, plane: &Arc<ControlPlane>, i: usize, pins: usize) {
        let version = push(plane, i, pins).await;
        self.wait_for(
            &|v: &str| control_plane::resources::ecds_map_version(v) == Some(version),
            Duration::from_secs(1),
        )
        .await;
    }
}

/// Opens a stream sending `first`, returns the response stream (or the refusal).
async fn open(
    ch: Channel,
    first: Vec<DiscoveryRequest>,
) -> (
    mpsc::Sender<DiscoveryRequest>,
    Result<tonic::Streaming<DiscoveryResponse>, tonic::Status>,
) {
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (tx, rx) = mpsc::channel(8);
    for r in first {
        tx.send(r).await.unwrap();
    }
    let r = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner);
    (tx, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_of_one_megabyte_is_refused() {
    let (_dir, running, mut good) = start().await;
    let huge = "x".repeat(1024 * 1024);
    let (_tx, r) = open(channel(running.grpc_addr, None).await, subscribe(&huge)).await;
    let status = match r {
        Ok(mut s) => s.message().await.unwrap_err(),
        Err(s) => s,
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 256"), "{status:?}");
    assert!(
        running
            .plane
            .registry()
            .nodes()
            .iter()
            .all(|n| n.id.len() < 300)
    );
    good.gets_the_next_push(&running.plane, 1, 0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_nacks_everything_is_never_sent_the_same_content_again() {
    let (_dir, running, mut good) = start().await;
    let (tx, r) = open(channel(running.grpc_addr, None).await, subscribe("nacker")).await;
    let mut inbound = r.unwrap();
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok(Some(r)) = inbound.message().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let nack = DiscoveryRequest {
                version_info: String::new(),
                response_nonce: r.nonce,
                type_url: r.type_url,
                error_detail: Some(RpcStatus {
                    code: 3,
                    message: "no".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            if tx.send(nack).await.is_err() {
                return;
            }
        }
    });
    for i in 1..=5 {
        good.gets_the_next_push(&running.plane, i, 0).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The initial CDS and ECDS, then one ECDS per push: never a resend storm.
    let n = received.load(std::sync::atomic::Ordering::SeqCst);
    assert!(n <= 2 + 5, "the NACKing node got {n} responses");
    let nacker = running.plane.registry().node("nacker").unwrap();
    assert!(nacker.nacked(control_plane::ResourceType::Ecds).is_some());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_reads_its_stream_is_ended_and_holds_nobody_up() {
    let (_dir, running, mut good) = start().await;
    // Subscribes, then never reads a response.
    let (_tx, r) = open(
        channel(running.grpc_addr, Some([127, 0, 0, 3].into())).await,
        subscribe("sloth"),
    )
    .await;
    let _never_read = r.unwrap();
    let connected =
        |plane: &Arc<ControlPlane>| plane.registry().node("sloth").is_some_and(|n| n.connected);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !connected(&running.plane) {
        assert!(Instant::now() < deadline, "the sloth never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    // Big maps (3 000 pins, ~100 KB each) until its windows and buffer are full and
    // the control plane gives up on it.
    while connected(&running.plane) {
        assert!(
            Instant::now() < deadline,
            "the sloth's stream was never ended"
        );
        i += 1;
        good.gets_the_next_push(&running.plane, i, 3000).await;
    }
    good.gets_the_next_push(&running.plane, i + 1, 0).await;
    let metrics = sim::metrics(&running);
    assert!(
        metrics.contains("seashard_ads_slow_consumers_total 1"),
        "{metrics}"
    );
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_streams_from_one_address_meet_the_per_peer_limit() {
    let (_dir, running, mut good) = start().await;
    let ch = channel(running.grpc_addr, Some([127, 0, 0, 4].into())).await;
    let mut open_streams = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..2000 {
        let (tx, r) = open(ch.clone(), subscribe(&format!("flood-{i}"))).await;
        match r {
            Ok(s) => {
                accepted += 1;
                open_streams.push((tx, s));
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("max_streams_per_peer"), "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (64, 1936));
    good.gets_the_next_push(&running.plane, 1, 0).await;
    // Closed streams free their slots.
    open_streams.clear();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_tx, r) = open(ch.clone(), subscribe("late")).await;
        if r.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
}

/// A message whose field 1 (`version_info`, a string) holds bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(bytes = "vec", tag = "1")]
    junk: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_and_bytes_that_are_not_a_request_change_nothing() {
    let (_dir, running, mut good) = start().await;

    // An unknown type URL: ignored, the stream stays.
    let mut first = subscribe("curious");
    first.push(DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.listener.v3.Listener".into(),
        ..Default::default()
    });
    let (_tx, r) = open(channel(running.grpc_addr, None).await, first).await;
    let mut curious = r.unwrap();
    assert!(curious.message().await.unwrap().is_some());
    good.gets_the_next_push(&running.plane, 1, 0).await;
    assert!(running.plane.registry().node("curious").unwrap().connected);

    // Bytes that do not decode: the stream ends with an error.
    let mut grpc = tonic::client::Grpc::new(channel(running.grpc_addr, None).await);
    grpc.ready().await.unwrap();
    let (tx, rx) = mpsc::channel(1);
    tx.send(Garbage {
        junk: vec![0xff, 0xfe, 0xfd],
    })
    .await
    .unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    let answer = grpc
        .streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            path,
            tonic_prost::ProstCodec::<Garbage, DiscoveryResponse>::default(),
        )
        .await;
    let status = match answer {
        Ok(r) => r.into_inner().message().await.unwrap_err(),
        Err(s) => s,
    };
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    drop(tx);
    good.gets_the_next_push(&running.plane, 2, 0).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_api_bodies_hold_up_no_push() {
    let (_dir, running, mut good) = start().await;
    let url = format!("http://{}/v1/maps", running.http_addr);
    let mut big = br#"{"map": {"default": "dtable-server"}, "comment": ""#.to_vec();
    // Over `max_body` (64 KiB here), small enough to be sent whole before the answer.
    big.extend(std::iter::repeat_n(b'x', 70 * 1024));
    big.extend(br#""}"#);
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)).into_bytes();
    let dup = br#"{"map": {"default": "dtable-server", "slots": {"0-f": "dtable-server", "0-f": "dtable-server-2"}}}"#.to_vec();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("application/json", big, 413),
        ("text/plain", b"{}".to_vec(), 415),
        ("application/json", deep, 422),
        (
            "application/json",
            br#"{"map": {"default": 7}}"#.to_vec(),
            422,
        ),
        ("application/json", dup, 422),
    ];
    for (i, (content_type, body, want)) in cases.into_iter().enumerate() {
        let url = url.clone();
        let (status, _) = tokio::task::spawn_blocking(move || {
            sim::fetch("POST", &url, Some(TOKEN), Some(content_type), &body)
        })
        .await
        .unwrap();
        assert_eq!(status, want, "case {i}");
        good.gets_the_next_push(&running.plane, i + 1, 0).await;
    }
    running.shutdown().await;
}
