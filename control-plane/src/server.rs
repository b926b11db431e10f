//! Runs the control plane: binds the gRPC (ADS) and HTTP listeners, a task that
//! writes node changes to the store in batches, and one that follows the store:
//! the active version another replica published, the other replicas' Envoys, and
//! this replica's leadership (a new leader resumes the stored rollout). With
//! `[listen.tls]` ADS is served over mutual TLS, with `[api.tls]` the API over
//! HTTPS ([`crate::tls`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use crate::metrics::TlsListener;
use crate::plane::ControlPlane;
use crate::tls::{self, TlsError};
use crate::xds::Ads;

/// How long node changes are gathered before one write to the store (the leader
/// of several replicas reads other replicas' ACKs from there).
const FLUSH_BATCH: Duration = Duration::from_millis(10);
/// How often REST pollers are checked for silence.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// A REST poller silent this long counts as disconnected.
const REST_POLLER_EXPIRY: Duration = Duration::from_secs(60);

/// Why the control plane could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} server failed: {message}")]
    Failed { what: &'static str, message: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running control plane.
pub struct Running {
    /// Where ADS listens (the bound address: port 0 in the config gets a free port).
    pub grpc_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    pub plane: Arc<ControlPlane>,
    stop: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), ServeError>>,
    http: JoinHandle<Result<(), ServeError>>,
    flusher: JoinHandle<()>,
    follower: JoinHandle<()>,
}

/// Binds both listeners and starts serving `plane`.
pub async fn start(plane: Arc<ControlPlane>, token: &str) -> Result<Running, ServeError> {
    let read_token = plane
        .config()
        .api_read_token()
        .map_err(|e| ServeError::Failed {
            what: "HTTP API",
            message: e.to_string(),
        })?;
    let listen = plane.config().listen.clone();
    // Every TLS file is read before anything listens: a bad one fails the start.
    let ads_tls = listen
        .tls
        .as_ref()
        .map(tls::ads_server_config)
        .transpose()?;
    let api_tls = plane
        .config()
        .api
        .tls
        .as_ref()
        .map(tls::api_server_config)
        .transpose()?;
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let grpc_listener = bind("ADS gRPC", listen.grpc).await?;
    let http_listener = bind("HTTP API", listen.http).await?;
    let local = |l: &TcpListener, what, addr| {
        l.local_addr()
            .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let grpc_addr = local(&grpc_listener, "ADS gRPC", listen.grpc)?;
    let http_addr = local(&http_listener, "HTTP API", listen.http)?;
    let (stop, stopped) = watch::channel(false);

    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let ads = Ads::new(plane.clone(), stopped.clone());
    let ecds = ads.clone().into_ecds_service();
    let ads = ads.into_service();
    let grpc_stop = until(stopped.clone());
    // With TLS, handshakes run beside the servers, which get established streams.
    let incoming = |l: TcpListener, config, what, which: TlsListener, addr| match config {
        Some(config) => {
            let p = plane.clone();
            tls::incoming(l, config, what, move || {
                p.metrics().tls_handshake_failed(which)
            })
            .map(Incoming::Tls)
            .map_err(|source| ServeError::Bind { what, addr, source })
        }
        None => Ok(Incoming::Plain(l)),
    };
    let grpc_incoming = incoming(
        grpc_listener,
        ads_tls,
        "ADS gRPC",
        TlsListener::Ads,
        grpc_addr,
    )?;
    let http_incoming = incoming(
        http_listener,
        api_tls,
        "HTTP API",
        TlsListener::Api,
        http_addr,
    )?;
    let grpc = tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(listen.keepalive_interval))
            .http2_keepalive_timeout(Some(listen.keepalive_timeout))
            .add_service(ads)
            .add_service(ecds);
        match grpc_incoming {
            Incoming::Tls(tls) => {
                server
                    .serve_with_incoming_shutdown(tls.into_stream(), grpc_stop)
                    .await
            }
            Incoming::Plain(tcp) => {
                server
                    .serve_with_incoming_shutdown(TcpListenerStream::new(tcp), grpc_stop)
                    .await
            }
        }
        .map_err(|e| ServeError::Failed {
            what: "ADS gRPC",
            message: e.to_string(),
        })
    });
    let app = crate::api::router(plane.clone(), token, read_token.as_deref());
    // REST xDS proves no certificate: where node ids are bound to certificates, a
    // REST poller could name any node, so it is refused.
    let app = if listen.tls.as_ref().is_some_and(|t| t.require_node_id_match) {
        app.layer(axum::middleware::from_fn(refuse_rest_xds))
    } else {
        app
    };
    // Each request knows its peer: REST pollers are instances by address.
    let app = app.into_make_service_with_connect_info::<crate::api::Peer>();
    let http_stop = until(stopped.clone());
    let http = tokio::spawn(async move {
        match http_incoming {
            Incoming::Tls(tls) => {
                axum::serve(tls, app)
                    .with_graceful_shutdown(http_stop)
                    .await
            }
            Incoming::Plain(tcp) => {
                axum::serve(tcp, app)
                    .with_graceful_shutdown(http_stop)
                    .await
            }
        }
        .map_err(|e| ServeError::Failed {
            what: "HTTP API",
            message: e.to_string(),
        })
    });
    let scheme = if plane.config().api.tls.is_some() {
        "https"
    } else {
        "http"
    };
    plane.store().advertise(&format!("{scheme}://{http_addr}"));
    let flusher = tokio::spawn(flush_loop(plane.clone(), stopped.clone()));
    let mut leadership = plane.store().leadership();
    let leads = leadership.borrow_and_update().is_leader();
    plane.metrics().leader(leads);
    if leads
        && !resume(&plane)
        && let Some(term) = plane.leader_term()
    {
        // At start nothing else holds the change lock, but the store may fail.
        tokio::spawn(resume_as_leader(plane.clone(), term));
    }
    let follower = tokio::spawn(follow_store(plane.clone(), leadership, stopped));
    tracing::info!(
        %grpc_addr,
        %http_addr,
        ads_mtls = plane.config().listen.tls.is_some(),
        api_https = plane.config().api.tls.is_some(),
        "control plane listening"
    );
    Ok(Running {
        grpc_addr,
        http_addr,
        plane,
        stop,
        grpc,
        http,
        flusher,
        follower,
    })
}

/// Resumes the stored unfinished rollout, if any (this replica leads). False when
/// it must be tried again: the change lock is held (a driver of an earlier term
/// still has to notice that it no longer leads), or the store failed (one
/// `Unavailable` read right after an election must not leave the rollout without
/// a driver).
fn resume(plane: &Arc<ControlPlane>) -> bool {
    match crate::rollout::resume(plane) {
        Ok(Some(id)) => tracing::warn!(rollout = id, "resumed an unfinished rollout"),
        Ok(None) => {}
        Err(crate::rollout::RolloutError::Propose(crate::plane::ProposeError::Busy)) => {
            return false;
        }
        Err(e @ crate::rollout::RolloutError::Corrupt(_)) => {
            // Trying again reads the same record.
            tracing::error!(error = %e, "cannot resume the stored rollout");
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot resume the stored rollout yet; trying again");
            return false;
        }
    }
    true
}

/// How soon a new leader tries again to resume; the wait doubles up to
/// [`RESUME_RETRY_MAX`] while it fails.
const RESUME_RETRY: Duration = Duration::from_millis(200);
const RESUME_RETRY_MAX: Duration = Duration::from_secs(2);

/// Resumes the stored rollout as the leader of `term`, trying again while it
/// cannot (change lock held, store failing) and this replica still leads in that
/// term.
async fn resume_as_leader(plane: Arc<ControlPlane>, term: i64) {
    let mut wait = RESUME_RETRY;
    loop {
        let p = plane.clone();
        let done = tokio::task::spawn_blocking(move || resume(&p))
            .await
            .unwrap_or(true);
        if done || plane.leader_term() != Some(term) {
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESUME_RETRY_MAX);
    }
}

/// Follows the store until stopped: serves the active version the leader
/// published, counts the other replicas' Envoys, and resumes the stored rollout
/// when this replica becomes the leader.
async fn follow_store(
    plane: Arc<ControlPlane>,
    mut leadership: watch::Receiver<crate::store::Leadership>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut active = plane.store().watch_active();
    let mut nodes = plane.store().watch_nodes();
    plane.registry().set_remote(&nodes.borrow_and_update());
    // Read first: a watch's borrow must not be held across an await.
    let n = *active.borrow_and_update();
    adopt(&plane, n).await;
    enum Change {
        Active,
        Nodes,
        Leadership,
    }
    loop {
        let change = tokio::select! {
            r = active.changed() => r.map(|()| Change::Active),
            r = nodes.changed() => r.map(|()| Change::Nodes),
            r = leadership.changed() => r.map(|()| Change::Leadership),
            _ = stopped.wait_for(|s| *s) => break,
        };
        match change {
            Err(_) => break,
            Ok(Change::Active) => {
                let n = *active.borrow_and_update();
                adopt(&plane, n).await;
            }
            Ok(Change::Nodes) => {
                let records = nodes.borrow_and_update().clone();
                plane.registry().set_remote(&records);
            }
            Ok(Change::Leadership) => {
                let now = leadership.borrow_and_update().clone();
                plane.metrics().leader(now.is_leader());
                if let crate::store::Leadership::Leader { term } = now {
                    tracing::info!(term, "this replica leads");
                    tokio::spawn(resume_as_leader(plane.clone(), term));
                } else {
                    tracing::info!(leadership = ?now, "this replica does not lead");
                }
            }
        }
    }
}

/// Serves version `n` if it is newer than what is served.
async fn adopt(plane: &Arc<ControlPlane>, n: u64) {
    let p = plane.clone();
    match tokio::task::spawn_blocking(move || p.adopt(n)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::error!(version = n, error = %e, "cannot read the new active version")
        }
        Err(e) => tracing::error!(error = %e, "the version reader failed"),
    }
}

/// `403` for REST xDS (`/v3/discovery:*`): with `[listen.tls] require_node_id_match`
/// a node id must be proven by a client certificate, which the API never asks for.
async fn refuse_rest_xds(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    if request.uri().path().starts_with("/v3/discovery") {
        tracing::warn!(
            path = request.uri().path(),
            "REST xDS refused: [listen.tls] require_node_id_match binds node ids to client \
             certificates, which only ADS over mutual TLS checks"
        );
        return (
            axum::http::StatusCode::FORBIDDEN,
            axum::Json(serde_json::json!({
                "error": "rest_xds_refused",
                "message": "[listen.tls] require_node_id_match: node ids are bound to client \
                            certificates; use ADS over mutual TLS (envoy-bootstrap --xds grpc \
                            --tls-cert/--tls-key)",
            })),
        )
            .into_response();
    }
    next.run(request).await
}

/// A listener, plain or with TLS.
enum Incoming {
    Plain(TcpListener),
    Tls(tls::TlsIncoming),
}

/// Writes node changes as they come, gathered for [`FLUSH_BATCH`], until stopped;
/// then once more.
async fn flush_loop(plane: Arc<ControlPlane>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EXPIRE_EVERY);
    let mut changed = plane.registry().watch();
    loop {
        let node_changed = tokio::select! {
            _ = tick.tick() => false,
            r = changed.changed() => r.is_ok(),
            _ = stopped.wait_for(|s| *s) => break,
        };
        if node_changed {
            tokio::time::sleep(FLUSH_BATCH).await;
            changed.borrow_and_update();
        } else {
            plane.registry().expire_pollers(REST_POLLER_EXPIRY);
        }
        flush(&plane).await;
    }
    flush(&plane).await;
}

async fn flush(plane: &Arc<ControlPlane>) {
    let p = plane.clone();
    match tokio::task::spawn_blocking(move || p.flush_nodes()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "cannot save node state"),
        Err(e) => tracing::error!(error = %e, "node state writer failed"),
    }
}

impl Running {
    /// Serves until a server fails or the stopper (see [`Running::stopper`]) is
    /// used; then stops everything and writes the node state.
    pub async fn wait(mut self) -> Result<(), ServeError> {
        let joined = |r: Result<Result<(), ServeError>, tokio::task::JoinError>, what| match r {
            Ok(r) => r,
            Err(e) => Err(ServeError::Failed {
                what,
                message: e.to_string(),
            }),
        };
        let result = tokio::select! {
            r = &mut self.grpc => joined(r, "ADS gRPC"),
            r = &mut self.http => joined(r, "HTTP API"),
        };
        self.shutdown().await;
        result
    }

    /// Stops listening, ends every stream, writes the node state. Streams are cut,
    /// not drained: Envoys keep their config and reconnect to the next control plane.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in [self.grpc, self.http] {
            // A task that ended (and was awaited by `wait`) must not be polled again.
            if !task.is_finished() {
                let abort = task.abort_handle();
                if tokio::time::timeout(Duration::from_secs(5), task)
                    .await
                    .is_err()
                {
                    abort.abort();
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.flusher).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.follower).await;
        flush(&self.plane).await;
    }

    /// A handle that asks the servers to stop (e.g. from a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}
