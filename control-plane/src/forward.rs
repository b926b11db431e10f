//! Changes are the leader's: a follower replica forwards every API change (any
//! method but GET and HEAD under `/v1/`) to the leader's API, as it came (path,
//! query, token, body), and answers with the leader's answer.
//!
//! ```text
//! seactl ──POST /v1/maps──▶ follower ──same request──▶ leader (plans, runs the rollout)
//!        ◀────────────── the leader's answer ◀────────
//! ```
//!
//! So two pushes sent at once to two replicas meet at the leader's change lock:
//! one runs, the other gets 409. Without a leader (an election under way) or
//! without etcd, a change gets 503 with a `code` saying why (`no_leader`,
//! `etcd_unavailable`), which `seactl` with several URLs answers by trying the
//! next one. A leader whose API speaks HTTPS is not forwarded to: the answer is
//! 503 `not_leader` naming it, and the client goes there itself. A forwarded
//! change whose answer is lost is 502 `forward_outcome_unknown`: it may have been
//! made, so no client sends it again on its own.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::answer::ApiError;
use crate::plane::ControlPlane;
use crate::store::{LeaderInfo, Leadership};

/// How long the leader gets to answer a forwarded change. A push that starts a
/// rollout answers at once (202); one that needs none waits for the Envoys' ACKs.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The header a forwarded request carries (the leader never forwards it again)
/// and its answer carries back: the replica that did the change.
pub const FORWARDED: &str = "x-seashard-forwarded-to";

/// Middleware: runs a change here when this replica leads, else forwards it.
pub(crate) async fn changes_to_leader(
    State(plane): State<Arc<ControlPlane>>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let leadership = plane.store().leadership().borrow().clone();
    match leadership {
        Leadership::Leader { .. } => next.run(request).await,
        Leadership::Follower { leader: Some(l) } if !request.headers().contains_key(FORWARDED) => {
            forward(&l, request).await
        }
        Leadership::Follower { leader } => refuse(
            "no_leader",
            match leader {
                Some(l) => format!("the leader `{}` did not take the change here", l.replica),
                None => "no control plane replica leads right now (an election is under way); \
                         try again in a few seconds"
                    .to_owned(),
            },
            None,
        ),
        Leadership::Unavailable { reason } => refuse(
            "etcd_unavailable",
            format!(
                "etcd is unavailable, so nothing can change (Envoys keep their configuration): \
                 {reason}"
            ),
            None,
        ),
    }
}

/// 503 with a JSON body: `{"error", "code", "leader"?}`.
fn refuse(code: &str, error: String, leader: Option<&LeaderInfo>) -> Response {
    let err = ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, code, error);
    match leader {
        Some(l) => err.with("leader", json!({ "replica": l.replica, "api": l.api })),
        None => err,
    }
    .into_response()
}

async fn forward(leader: &LeaderInfo, request: Request) -> Response {
    let not_leader = |why: String| {
        refuse(
            "not_leader",
            format!(
                "this replica does not lead; the leader is `{}` at {}: {why}",
                leader.replica, leader.api
            ),
            Some(leader),
        )
    };
    let Some(authority) = leader.api.strip_prefix("http://") else {
        return not_leader("send the change there".into());
    };
    let authority = authority.trim_end_matches('/').to_owned();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let (mut parts, body) = request.into_parts();
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(e) => return not_leader(format!("its address is not usable: {e}")),
    };
    if let Ok(v) = header::HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    parts.headers.insert(
        FORWARDED,
        header::HeaderValue::from_str(&leader.replica)
            .unwrap_or(header::HeaderValue::from_static("leader")),
    );
    let request = Request::from_parts(parts, body);
    // Until the connection is made nothing was sent: a client may try elsewhere.
    // Once the request went out, the leader may have done it: 502, which no
    // client retries, since sending a change twice could apply it twice.
    let stream =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&authority))
            .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return not_leader(format!("cannot connect: {e}")),
            Err(_) => return not_leader(format!("cannot connect within {CONNECT_TIMEOUT:?}")),
        };
    let unknown = |why: String| {
        ApiError::coded(
            StatusCode::BAD_GATEWAY,
            "forward_outcome_unknown",
            format!(
                "forwarded to the leader `{}` at {}, whose answer was lost ({why}): the change \
                 may or may not have been made; check `seactl status` before sending it again",
                leader.replica, leader.api
            ),
        )
        .into_response()
    };
    match tokio::time::timeout(FORWARD_TIMEOUT, send(stream, request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => unknown(e),
        Err(_) => unknown(format!("no answer within {FORWARD_TIMEOUT:?}")),
    }
}

/// Sends `request` over `stream` (HTTP/1.1).
async fn send(stream: tokio::net::TcpStream, request: Request) -> Result<Response, String> {
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    Ok(answer.map(Body::new))
}
