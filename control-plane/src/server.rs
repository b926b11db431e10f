//! Runs the control plane: binds the gRPC (ADS) and HTTP listeners, and a task that
//! writes node changes to the store in batches. With `[listen.tls]` ADS is served
//! over mutual TLS, with `[api.tls]` the API over HTTPS ([`crate::tls`]).

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

/// How often changed nodes are written to the store.
const FLUSH_EVERY: Duration = Duration::from_millis(200);
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
    let ads = Ads::new(plane.clone(), stopped.clone()).into_service();
    let grpc_stop = until(stopped.clone());
    // With TLS, handshakes run beside the servers, which get established streams.
    let with_tls = |l: TcpListener, config, what, which: TlsListener, addr| {
        let p = plane.clone();
        tls::incoming(l, config, what, move || {
            p.metrics().tls_handshake_failed(which)
        })
        .map_err(|source| ServeError::Bind { what, addr, source })
    };
    let grpc_incoming = match ads_tls {
        Some(c) => Incoming::Tls(with_tls(
            grpc_listener,
            c,
            "ADS gRPC",
            TlsListener::Ads,
            grpc_addr,
        )?),
        None => Incoming::Plain(grpc_listener),
    };
    let http_incoming = match api_tls {
        Some(c) => Incoming::Tls(with_tls(
            http_listener,
            c,
            "HTTP API",
            TlsListener::Api,
            http_addr,
        )?),
        None => Incoming::Plain(http_listener),
    };
    let grpc = tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(listen.keepalive_interval))
            .http2_keepalive_timeout(Some(listen.keepalive_timeout))
            .add_service(ads);
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
    let flusher = tokio::spawn(flush_loop(plane.clone(), stopped));
    match crate::rollout::resume(&plane) {
        Ok(Some(id)) => tracing::warn!(rollout = id, "resumed an unfinished rollout"),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "cannot resume the stored rollout"),
    }
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
    })
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

/// Writes node changes every [`FLUSH_EVERY`] until stopped, then once more.
async fn flush_loop(plane: Arc<ControlPlane>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => break,
        }
        plane.registry().expire_pollers(REST_POLLER_EXPIRY);
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
        flush(&self.plane).await;
    }

    /// A handle that asks the servers to stop (e.g. from a signal handler).
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}
