//! ADS over gRPC, state of the world: one task per Envoy stream answers its requests
//! and, when a new snapshot is published, sends it what it does not run yet. Every
//! stream watches the same snapshot, so a push reaches all of them at once.
//!
//! A replica that cannot show it is current ([`Standing::NotCurrent`]: no etcd
//! session, no answer in time) ends every stream and refuses new ones with
//! `UNAVAILABLE`: the Envoy keeps its map and opens its next stream to another
//! replica. One that is behind (adopting a newer version) sends no map until it
//! serves it. Neither ever hands an Envoy a map older than one that exists.
//!
//! With `[listen.tls] require_node_id_match`, the node id the first request names
//! must be one the stream's client certificate carries ([`crate::identity`]): else
//! the stream ends with `PERMISSION_DENIED` before the node is known to the registry,
//! so it is never counted and never waited for.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
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
use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_server::{
    ExtensionConfigDiscoveryService, ExtensionConfigDiscoveryServiceServer,
};
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::nodes::{self, Event, Stream};
use crate::plane::{ControlPlane, Standing};
use crate::resources::{ResourceType, Snapshot};

/// Responses queued per stream before the stream task waits for Envoy to read.
const STREAM_BUFFER: usize = 8;

static NONCE: AtomicU64 = AtomicU64::new(1);

/// A nonce unique within this process.
pub fn next_nonce() -> String {
    NONCE.fetch_add(1, Ordering::Relaxed).to_string()
}

/// The ADS service, and the same streams as the ECDS-only gRPC service
/// (`ExtensionConfigDiscoveryService`): a config source with `api_config_source`
/// instead of `ads` (an Istio sidecar, whose ADS belongs to istiod) opens one of
/// those. Both carry `DiscoveryRequest`s and are served alike.
#[derive(Clone)]
pub struct Ads {
    plane: Arc<ControlPlane>,
    /// Becomes true when the control plane stops: every stream ends.
    stop: watch::Receiver<bool>,
    /// `[listen.tls] require_node_id_match`.
    bind_node_ids: bool,
    /// Open streams per peer address, against `[listen] max_streams_per_peer`.
    per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

/// One open stream counted against its peer address; uncounted on drop.
struct PeerSlot {
    ip: IpAddr,
    per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// The client certificates of a stream whose node id must be one of theirs.
type Binding = Option<Arc<Vec<CertificateDer<'static>>>>;

impl Ads {
    pub fn new(plane: Arc<ControlPlane>, stop: watch::Receiver<bool>) -> Ads {
        let bind_node_ids = plane
            .config()
            .listen
            .tls
            .as_ref()
            .is_some_and(|t| t.require_node_id_match);
        Ads {
            plane,
            stop,
            bind_node_ids,
            per_peer: Arc::default(),
        }
    }

    /// Counts a new stream from `peer`, or refuses it when the peer holds the most.
    fn admit(&self, peer: Option<SocketAddr>) -> Result<Option<PeerSlot>, Status> {
        let Some(ip) = peer.map(|p| p.ip()) else {
            return Ok(None);
        };
        let limit = self.plane.config().listen.max_streams_per_peer;
        let mut m = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= limit {
            self.plane.metrics().stream_refused();
            return Err(Status::resource_exhausted(format!(
                "{ip} already holds {limit} ADS streams (`[listen] max_streams_per_peer`)"
            )));
        }
        *n += 1;
        Ok(Some(PeerSlot {
            ip,
            per_peer: self.per_peer.clone(),
        }))
    }

    /// As a tonic service, ready for `Server::add_service`.
    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_DECODING)
            .max_encoding_message_size(MAX_ENCODING)
    }

    /// The ECDS-only service over the same streams, for `Server::add_service`.
    pub fn into_ecds_service(self) -> ExtensionConfigDiscoveryServiceServer<Ads> {
        ExtensionConfigDiscoveryServiceServer::new(self)
            .max_decoding_message_size(MAX_DECODING)
            .max_encoding_message_size(MAX_ENCODING)
    }

    /// Opens one state-of-the-world stream: ADS, or ECDS alone.
    fn open(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = request.remote_addr();
        let slot = self.admit(peer)?;
        let binding: Option<Binding> = self.bind_node_ids.then(|| request.peer_certs());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let plane = self.plane.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = Stream::new(peer);
            let result = tokio::select! {
                r = run_stream(&plane, &mut stream, binding.as_ref(), inbound, &tx) => r,
                _ = stop.wait_for(|s| *s) => Err(Status::unavailable("the control plane is stopping")),
            };
            plane.registry().close(&stream);
            match result {
                Ok(()) => tracing::info!(node = ?stream.node_id(), ?peer, "ADS stream closed"),
                Err(status) => {
                    tracing::warn!(node = ?stream.node_id(), ?peer, code = ?status.code(), status = %status.message(), "ADS stream ended");
                    // A peer that reads nothing must not hold this task.
                    let _ = tx.try_send(Err(status));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

const MAX_DECODING: usize = 16 * 1024 * 1024;
const MAX_ENCODING: usize = 64 * 1024 * 1024;

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
        self.open(request)
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

#[tonic::async_trait]
impl ExtensionConfigDiscoveryService for Ads {
    type StreamExtensionConfigsStream = ResponseStream;
    type DeltaExtensionConfigsStream = DeltaStream;

    async fn stream_extension_configs(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamExtensionConfigsStream>, Status> {
        self.open(request)
    }

    async fn delta_extension_configs(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaExtensionConfigsStream>, Status> {
        Err(Status::unimplemented(
            "seashard serves state-of-the-world ECDS only (api_type: GRPC, not DELTA_GRPC)",
        ))
    }

    async fn fetch_extension_configs(
        &self,
        _request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        Err(Status::unimplemented(
            "seashard serves ECDS as a stream (api_type: GRPC), or by REST polling on the HTTP API",
        ))
    }
}

/// Serves one stream until Envoy closes it, the response channel closes, or a
/// protocol error. With a `binding`, the node id must be one of its certificate's.
async fn run_stream(
    plane: &ControlPlane,
    stream: &mut Stream,
    binding: Option<&Binding>,
    mut inbound: Streaming<DiscoveryRequest>,
    tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let mut snapshots = plane.subscribe();
    let mut currency = plane.watch_currency();
    // A store that never changes currency (SQLite) closes its sender at once.
    let mut currency_moves = true;
    may_send_map(plane)?;
    loop {
        tokio::select! {
            changed = currency.changed(), if currency_moves => {
                match changed {
                    Ok(()) => {
                        currency.borrow_and_update();
                        may_send_map(plane)?;
                    }
                    Err(_) => currency_moves = false,
                }
            }
            msg = inbound.message() => {
                let Some(req) = msg? else { return Ok(()) };
                let snap = snapshots.borrow().clone();
                let req = request_of(&req);
                if let (Some(certs), None, Some((id, _))) = (binding, stream.node_id(), &req.node)
                    && let Err(reason) = crate::identity::check_node_id(certs.as_deref().map(|c| c.as_slice()), id)
                {
                    plane.metrics().node_id_refused();
                    return Err(Status::permission_denied(reason));
                }
                let (event, due) = plane
                    .registry()
                    .handle(stream, &req, "grpc", &snap)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
                log_event(plane, stream, &req, &event);
                if let Some(t) = due
                    && (t == ResourceType::Cds || may_send_map(plane)?)
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
                    if t == ResourceType::Ecds && !may_send_map(plane)? {
                        continue;
                    }
                    if !send(plane, stream, &snap, t, tx).await {
                        return Ok(());
                    }
                }
            }
            () = tx.closed() => return Ok(()),
        }
    }
}

/// Whether this replica may send a map now: true when current, false while it is
/// behind (the map goes out once it serves the newer version: a new snapshot);
/// `UNAVAILABLE` when it cannot show it is current, which ends the stream.
fn may_send_map(plane: &ControlPlane) -> Result<bool, Status> {
    match plane.standing() {
        Standing::Current => Ok(true),
        Standing::Behind { served, active } => {
            tracing::debug!(
                served,
                active,
                "behind the store: no map sent until it is adopted"
            );
            Ok(false)
        }
        Standing::NotCurrent { reason } => Err(Status::unavailable(format!(
            "this control plane replica cannot show that its map is current ({reason}): \
             try another replica"
        ))),
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
    let timeout = plane.config().listen.send_timeout;
    match tokio::time::timeout(timeout, tx.send(Ok(response))).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            plane.metrics().slow_consumer();
            tracing::warn!(
                node = ?stream.node_id(),
                ?timeout,
                "the Envoy read no response for `[listen] send_timeout`: ending its stream"
            );
            false
        }
    }
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

#[cfg(test)]
mod tests {
    //! The tracking fed with `DiscoveryRequest`s as Envoy 1.40 sends them with
    //! `set_node_on_first_message_only: true`: the node on the first request only,
    //! ECDS named, CDS wildcard, a NACK carrying `error_detail` (gRPC status).

    use super::*;
    use crate::nodes::Registry;
    use crate::resources::testing::snapshot;
    use crate::resources::{CDS_TYPE_URL, ECDS_TYPE_URL};
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn request(
        node: bool,
        type_url: &str,
        version: &str,
        nonce: &str,
        error: Option<&str>,
    ) -> DiscoveryRequest {
        DiscoveryRequest {
            node: node.then(|| PbNode {
                id: "edge-1".into(),
                cluster: "seashard-edge".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            resource_names: if type_url == ECDS_TYPE_URL {
                vec!["seashard.base_router".into()]
            } else {
                vec![]
            },
            error_detail: error.map(|m| RpcStatus {
                code: 13,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_envoy_session_subscribes_acks_and_nacks() {
        let reg = Registry::default();
        let good = snapshot(1, "/a.wasm");
        let bad = snapshot(2, "/missing.wasm");
        let (cds, g, b) = (
            good.cds.version.clone(),
            good.ecds.version.clone(),
            bad.ecds.version.clone(),
        );
        let mut s = Stream::default();
        let handle = |req: DiscoveryRequest, snap: &Snapshot, s: &mut Stream| {
            reg.handle(s, &request_of(&req), "grpc", snap).unwrap()
        };
        // Envoy starts: CDS (with the node), then ECDS (without).
        let (_, due) = handle(request(true, CDS_TYPE_URL, "", "", None), &good, &mut s);
        assert_eq!(due, Some(ResourceType::Cds));
        reg.sent(&mut s, ResourceType::Cds, &cds, "n1");
        let (_, due) = handle(request(false, ECDS_TYPE_URL, "", "", None), &good, &mut s);
        assert_eq!(due, Some(ResourceType::Ecds));
        reg.sent(&mut s, ResourceType::Ecds, &g, "n2");
        // Both ACKed.
        handle(
            request(false, CDS_TYPE_URL, &cds, "n1", None),
            &good,
            &mut s,
        );
        let (e, due) = handle(request(false, ECDS_TYPE_URL, &g, "n2", None), &good, &mut s);
        assert_eq!((e, due), (Event::Ack { version: g.clone() }, None));
        // A bad config is pushed and NACKed with the detail; the old one still runs.
        assert_eq!(reg.due(&s, &bad), [ResourceType::Ecds]);
        reg.sent(&mut s, ResourceType::Ecds, &b, "n3");
        let (e, due) = handle(
            request(
                false,
                ECDS_TYPE_URL,
                &g,
                "n3",
                Some("Unable to create Wasm plugin"),
            ),
            &bad,
            &mut s,
        );
        assert_eq!(
            e,
            Event::Nack {
                version: b.clone(),
                running: g.clone(),
                error: "Unable to create Wasm plugin".into()
            }
        );
        assert_eq!(due, None, "never resent");
        let node = reg.node("edge-1").unwrap();
        assert_eq!(node.cluster, "seashard-edge");
        assert_eq!(node.acked(ResourceType::Ecds), Some(g.as_str()));
        assert_eq!(node.acked(ResourceType::Cds), Some(cds.as_str()));
        assert_eq!(node.nacked(ResourceType::Ecds), Some(b.as_str()));
    }
}
