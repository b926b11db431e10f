//! ADS over gRPC, state of the world: one task per Envoy stream answers its requests
//! and, when a new snapshot is published, sends it what it does not run yet. Every
//! stream watches the same snapshot, so a push reaches all of them at once.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::Node as PbNode;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::nodes::{self, Event, Stream};
use crate::plane::ControlPlane;
use crate::resources::{ResourceType, Snapshot};

/// Responses queued per stream before the stream task waits for Envoy to read.
const STREAM_BUFFER: usize = 8;

static NONCE: AtomicU64 = AtomicU64::new(1);

/// A nonce unique within this process.
pub fn next_nonce() -> String {
    NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The ADS service.
pub struct Ads {
    plane: Arc<ControlPlane>,
    /// Becomes true when the control plane stops: every stream ends.
    stop: watch::Receiver<bool>,
}

impl Ads {
    pub fn new(plane: Arc<ControlPlane>, stop: watch::Receiver<bool>) -> Ads {
        Ads { plane, stop }
    }

    /// As a tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

type ResponseStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let plane = self.plane.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut stream = Stream::default();
            let result = tokio::select! {
                r = run_stream(&plane, &mut stream, inbound, &tx) => r,
                _ = stop.wait_for(|s| *s) => Err(Status::unavailable("the control plane is stopping")),
            };
            plane.registry().close(&stream);
            match result {
                Ok(()) => tracing::info!(node = ?stream.node_id(), ?peer, "ADS stream closed"),
                Err(status) => {
                    tracing::warn!(node = ?stream.node_id(), ?peer, %status, "ADS stream ended");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "seashard serves state-of-the-world ADS only (api_type: GRPC, not DELTA_GRPC)",
        ))
    }
}

/// Serves one stream until Envoy closes it, the response channel closes, or a
/// protocol error.
async fn run_stream(
    plane: &ControlPlane,
    stream: &mut Stream,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let mut snapshots = plane.subscribe();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let Some(req) = msg? else { return Ok(()) };
                let snap = snapshots.borrow().clone();
                let req = request_of(&req);
                let (event, due) = plane
                    .registry()
                    .handle(stream, &req, "grpc", &snap)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                log_event(plane, stream, &req, &event);
                if let Some(t) = due
                    && !send(plane, stream, &snap, t, tx).await
                {
                    return Ok(());
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let snap = snapshots.borrow_and_update().clone();
                for t in plane.registry().due(stream, &snap) {
                    if !send(plane, stream, &snap, t, tx).await {
                        return Ok(());
                    }
                }
            }
            () = tx.closed() => return Ok(()),
        }
    }
}

/// Sends the current resources of type `t`; false when the stream is gone.
async fn send(
    plane: &ControlPlane,
    stream: &mut Stream,
    snap: &Snapshot,
    t: ResourceType,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> bool {
    let set = snap.get(t);
    let resources: Vec<_> = set
        .select(stream.names(t))
        .into_iter()
        .map(|r| r.any.clone())
        .collect();
    if resources.is_empty() && t == ResourceType::Ecds {
        // An empty answer would be ACKed while the filter keeps its default config:
        // leave the node visibly behind instead.
        tracing::warn!(
            node = ?stream.node_id(),
            asked = ?stream.names(t),
            served = ?set.resources.iter().map(|r| &r.name).collect::<Vec<_>>(),
            "the node asks for filter configurations this control plane does not serve \
             (check the HttpFilter name in its bootstrap against `filter.name`)"
        );
        return true;
    }
    let nonce = next_nonce();
    let response = DiscoveryResponse {
        version_info: set.version.clone(),
        resources,
        type_url: t.type_url().to_owned(),
        nonce: nonce.clone(),
        ..Default::default()
    };
    plane.registry().sent(stream, t, &set.version, &nonce);
    plane.metrics().responded(t);
    tracing::debug!(node = ?stream.node_id(), r#type = t.as_str(), version = %set.version, %nonce, "sending");
    tx.send(Ok(response)).await.is_ok()
}

fn log_event(plane: &ControlPlane, stream: &Stream, req: &nodes::Request, event: &Event) {
    let node = stream.node_id().unwrap_or_default();
    let t = ResourceType::from_type_url(&req.type_url);
    match event {
        Event::Subscribe { version } => {
            tracing::info!(node, type_url = %req.type_url, version = %version, "subscribed")
        }
        Event::Ack { version } => {
            if let Some(t) = t {
                plane.metrics().acked(t);
            }
            tracing::info!(node, r#type = ?t, %version, "ACK")
        }
        Event::Nack {
            version,
            running,
            error,
        } => {
            if let Some(t) = t {
                plane.metrics().nacked(t);
            }
            tracing::warn!(node, r#type = ?t, %version, %running, %error, "NACK: not resending this content")
        }
        Event::Stale => tracing::debug!(node, "stale response nonce"),
        Event::UnknownType => {
            tracing::debug!(node, type_url = %req.type_url, "type not served")
        }
    }
}

/// The tracked parts of a `DiscoveryRequest`.
pub fn request_of(req: &DiscoveryRequest) -> nodes::Request {
    nodes::Request {
        node: req.node.as_ref().map(node_of),
        type_url: req.type_url.clone(),
        version_info: req.version_info.clone(),
        response_nonce: req.response_nonce.clone(),
        resource_names: req.resource_names.clone(),
        error_detail: req.error_detail.as_ref().map(|s| s.message.clone()),
    }
}

fn node_of(n: &PbNode) -> (String, String) {
    (n.id.clone(), n.cluster.clone())
}
