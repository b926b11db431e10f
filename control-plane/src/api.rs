//! The HTTP API (JSON), the REST-JSON xDS fallback, `/healthz` and `/metrics`.
//!
//! | route | what |
//! |---|---|
//! | `GET /healthz` | liveness: `{"ok": true, "version": N}` |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/status` | active version, every node's ACK/NACK state, every server's health |
//! | `GET /v1/map` | the active version (map, fence, author, ...) |
//! | `GET /v1/maps?limit=N` | history, newest first |
//! | `GET /v1/maps/{version}` | one version |
//! | `POST /v1/maps[?dry_run=true]` | propose a map: `{"map": {...}, "base_version": N, "comment": "..."}` or a bare map; a map that moves bases starts a rollout (`202`, `{"rollout": ID, "plan", "restart", "skipped"}`); dry, the plan with the servers to restart and why |
//! | `GET /v1/nodes`, `GET /v1/nodes/{id}`, `DELETE /v1/nodes/{id}` | Envoy nodes |
//! | `GET /v1/servers` | the dtable-servers and their health (`/ping/` → `pong`) |
//! | `GET /v1/rollouts?limit=N` | rollouts, newest first |
//! | `GET /v1/rollouts/{id}`, `GET /v1/rollouts/current` | one rollout: steps with times, Envoys owing an ACK, the server restarting |
//! | `POST /v1/rollouts/current/confirm` | `{"server": NAME}`: an operator restarted it (manual hook) |
//! | `POST /v1/rollouts/current/abort` | roll back the running rollout (`409` once activation began) |
//! | `GET /v1/audit?limit=N` | who changed what |
//! | `POST /v3/discovery:extension_configs`, `POST /v3/discovery:clusters` | REST xDS: 304 when current |
//!
//! Changes (`POST /v1/maps` without `dry_run`, `DELETE`, rollout confirm/abort) need `Authorization: Bearer
//! TOKEN` (compared in constant time), else `401`. Errors are
//! `{"error": reason, "problems": [{"at", "message"}]}`: `422` invalid map (every
//! problem), `409` concurrent change or a map that moves bases (the moves named), `404`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shardmap::{Plan, Problem, ShardMap};

pub use crate::answer::ApiError;
use crate::nodes::Node;
use crate::plane::{ControlPlane, Proposal, ProposeError};
use crate::resources::ResourceType;
use crate::rollout::{self, RolloutError};
use crate::store::{NewAudit, StoreError, Version};
use daemon::health::{self, Health};
use daemon::token::{bearer, constant_time_eq};

/// How long one server's health check may take in an API call.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared by the handlers.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) plane: Arc<ControlPlane>,
    /// Reads and changes.
    token: Arc<str>,
    /// Reads only.
    read_token: Option<Arc<str>>,
}

/// The API's router. Every `/v1/*` request needs a token (`read_token` or `token`);
/// changes need `token`. `/healthz`, `/metrics` and the REST xDS of Envoys are open.
pub fn router(plane: Arc<ControlPlane>, token: &str, read_token: Option<&str>) -> Router {
    let max_body = plane.config().api.max_body;
    let api = Api {
        plane,
        token: Arc::from(token),
        read_token: read_token.map(Arc::from),
    };
    let v1 = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/map", get(active_map))
        .route("/v1/maps", get(history).post(propose))
        .route("/v1/maps/{version}", get(one_version))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{id}", get(one_node).delete(forget_node))
        .route("/v1/servers", get(servers))
        .route("/v1/rollouts", get(rollouts))
        .route("/v1/rollouts/current/confirm", post(rollout_confirm))
        .route("/v1/rollouts/current/abort", post(rollout_abort))
        .route("/v1/rollouts/{id}", get(one_rollout))
        .route("/v1/audit", get(audit))
        // Inner: a follower forwards changes to the leader; outer: the token first.
        .route_layer(axum::middleware::from_fn_with_state(
            api.plane.clone(),
            crate::forward::changes_to_leader,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .route("/v3/discovery:extension_configs", post(rest_ecds))
        .route("/v3/discovery:clusters", post(rest_cds))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(api)
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store");
        // A client (seactl with several URLs) tries another replica on these codes.
        let code = match &e {
            StoreError::Unavailable(_) => "etcd_unavailable",
            StoreError::NotLeader(_) => "not_leader",
            _ => return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
        ApiError::coded(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
    }
}

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> Self {
        let reason = e.to_string();
        match e {
            ProposeError::Invalid(problems) => ApiError {
                problems: problems.0,
                ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, reason)
            },
            ProposeError::Busy | ProposeError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, reason)
            }
            ProposeError::MovesBases(plan) => ApiError {
                problems: moved_problems(&plan),
                ..ApiError::new(StatusCode::CONFLICT, reason)
                    .with("plan", serde_json::to_value(&*plan).unwrap_or(Value::Null))
            },
            ProposeError::Store(e) => e.into(),
        }
    }
}

/// One problem per moved slot range and pin.
pub fn moved_problems(plan: &Plan) -> Vec<Problem> {
    let slots = plan.slots.iter().map(|m| Problem {
        at: format!("slots.\"{}\"", m.range),
        message: format!("moves bases from {} to {}", m.from, m.to),
    });
    let pins = plan.pins.iter().map(|p| Problem {
        at: format!("pins.\"{}\"", p.pin),
        message: format!(
            "moves the base from {} to {}",
            p.before.as_deref().unwrap_or("its slot's server"),
            p.after.as_deref().unwrap_or("its slot's server")
        ),
    });
    slots.chain(pins).collect()
}

/// Every answer of the API is JSON: axum's own refusals (a body over `max_body`:
/// 413, a method not allowed: 405) are given a JSON body saying why.
async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json || status == StatusCode::NOT_MODIFIED {
        return response;
    }
    let why = match status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            "the request body is larger than the API reads (`[api] max_body`)".to_owned()
        }
        StatusCode::METHOD_NOT_ALLOWED => "this method is not allowed here".to_owned(),
        s => s.canonical_reason().unwrap_or("error").to_owned(),
    };
    ApiError::new(status, why).into_response()
}

/// Refuses a body that does not say it is JSON (`415`).
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = ct.split(';').next().unwrap_or("").trim();
    if media.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be `content-type: application/json`, not `{}`",
                ct.chars().take(64).collect::<String>()
            ),
        ))
    }
}

/// Every `/v1/*` request: the read-only token or the change token may pass (a change
/// checks the change token again in its handler).
async fn require_token(
    State(api): State<Api>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = bearer(request.headers()).as_bytes();
    let change = constant_time_eq(given, api.token.as_bytes());
    let read = api
        .read_token
        .as_ref()
        .is_some_and(|t| constant_time_eq(given, t.as_bytes()));
    if change || read {
        return next.run(request).await;
    }
    api.plane.metrics().api_error();
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "the API needs `Authorization: Bearer TOKEN`: the read-only token or the change token \
         (seactl sends $SEASHARD_TOKEN)",
    )
    .into_response()
}

/// `Ok` when the request carries the change token.
fn authorize(api: &Api, headers: &HeaderMap) -> Result<(), ApiError> {
    if constant_time_eq(bearer(headers).as_bytes(), api.token.as_bytes()) {
        Ok(())
    } else {
        api.plane.metrics().api_error();
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this change needs `Authorization: Bearer TOKEN` with the control plane's API token",
        ))
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such route: {}", uri.path()),
    )
}

async fn healthz(State(api): State<Api>) -> Json<Value> {
    Json(json!({ "ok": true, "version": api.plane.snapshot().map_version }))
}

async fn metrics(State(api): State<Api>) -> impl IntoResponse {
    let text = api.plane.metrics().render(
        &api.plane.snapshot(),
        &api.plane.registry().nodes(),
        &api.plane.registry().conflicts(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// A node with its state on the current versions, as `status` shows it.
#[derive(Debug, Serialize)]
struct NodeStatus {
    #[serde(flatten)]
    node: Node,
    /// Per type: `current`, `pending`, `nacked`, `behind` or `disconnected`.
    state: std::collections::BTreeMap<ResourceType, &'static str>,
    /// The map version of the filter configuration it ACKed last.
    map_version: Option<u64>,
}

/// Every Envoy instance the registry knows, as `status` and `GET /v1/nodes` show them.
fn node_statuses(api: &Api) -> Vec<NodeStatus> {
    let nodes = api.plane.registry().nodes();
    nodes.into_iter().map(|n| node_status(api, n)).collect()
}

fn node_status(api: &Api, node: Node) -> NodeStatus {
    let snap = api.plane.snapshot();
    let state = ResourceType::ALL
        .iter()
        .map(|t| {
            let current = snap.get(*t).version.as_str();
            let s = node.types.get(t);
            let word = if s.is_none() {
                "unsubscribed"
            } else if !node.connected {
                "disconnected"
            } else if node.acked(*t) == Some(current) {
                "current"
            } else if node.nacked(*t) == Some(current) {
                "nacked"
            } else if s.and_then(|s| s.pending_version.as_deref()) == Some(current) {
                "pending"
            } else {
                "behind"
            };
            (*t, word)
        })
        .collect();
    let map_version = acked_map_version(&node);
    NodeStatus {
        node,
        state,
        map_version,
    }
}

/// The map version of the filter configuration `node` ACKed last.
fn acked_map_version(node: &Node) -> Option<u64> {
    node.acked(ResourceType::Ecds)
        .and_then(crate::resources::ecds_map_version)
}

#[derive(Debug, Serialize)]
struct ServerStatus {
    name: String,
    address: String,
    /// Its restart hook, secrets redacted.
    restart: Value,
    /// Every request reaches it through its guard.
    guarded: bool,
    /// Its guards (instance keys) and whether each is connected.
    guards: Vec<GuardStatus>,
    /// Slot ranges, pins and path rules the active map gives it, and whether it is the default.
    assigned: Assigned,
    health: Health,
    /// The map versions it may hold since seashard last restarted it; `null`: unknown
    /// (never restarted by seashard: its next rollout restarts it).
    may_hold: Option<Vec<u64>>,
    /// When seashard last restarted it (unix ms).
    last_restart_at: Option<i64>,
}

#[derive(Debug, Serialize)]
struct GuardStatus {
    instance: String,
    connected: bool,
    /// The map version of the filter configuration it ACKed last.
    map_version: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
struct Assigned {
    default: bool,
    slots: Vec<String>,
    pins: Vec<String>,
    paths: usize,
}

fn assigned(map: &ShardMap, server: &str) -> Assigned {
    let keys = |m: &std::collections::BTreeMap<String, String>| {
        let owned = m.iter().filter(|(_, s)| *s == server);
        owned.map(|(k, _)| k.clone()).collect()
    };
    Assigned {
        default: map.default == server,
        slots: keys(&map.slots),
        pins: keys(&map.pins),
        paths: map.paths.iter().filter(|r| r.server == server).count(),
    }
}

/// Every server as configured, with its health and its stored state (none when
/// the store cannot be read).
async fn server_statuses(api: &Api, active: &Version) -> Vec<ServerStatus> {
    let mut checks = tokio::task::JoinSet::new();
    for (i, s) in api.plane.config().servers.iter().enumerate() {
        let url = s.health_url();
        checks.spawn(async move { (i, health::check(&url, HEALTH_TIMEOUT).await) });
    }
    let mut healths: Vec<Option<Health>> = vec![None; api.plane.config().servers.len()];
    while let Some(joined) = checks.join_next().await {
        if let Ok((i, h)) = joined
            && let Some(slot) = healths.get_mut(i)
        {
            *slot = Some(h);
        }
    }
    let states = api.plane.store().server_states().unwrap_or_default();
    let nodes = api.plane.registry().nodes();
    api.plane
        .config()
        .servers
        .iter()
        .zip(healths)
        .map(|(s, h)| {
            let state = states.iter().find(|x| x.name == s.name);
            ServerStatus {
                may_hold: state.map(|x| x.may_hold.clone()),
                last_restart_at: state.and_then(|x| x.last_restart_at),
                name: s.name.clone(),
                address: s.address.clone(),
                restart: s.restart.redacted(),
                guarded: s.guarded,
                guards: nodes
                    .iter()
                    .filter(|n| n.role.guarded() == Some(s.name.as_str()))
                    .map(|n| GuardStatus {
                        instance: n.instance.clone(),
                        connected: n.connected,
                        map_version: acked_map_version(n),
                    })
                    .collect(),
                assigned: assigned(&active.map, &s.name),
                health: h.unwrap_or_else(|| Health {
                    up: false,
                    url: s.health_url(),
                    elapsed_ms: 0,
                    error: Some("the check did not finish".into()),
                }),
            }
        })
        .collect()
}

/// The state of this replica and what it serves. Served from memory when the
/// store cannot be read (etcd without a majority): `store.error` says why.
async fn status(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let mut store_errors = Vec::new();
    let mut note = |e: ApiError| store_errors.push(e.error);
    let active = api.plane.active().map(Arc::new).unwrap_or_else(|e| {
        note(e.into());
        api.plane.served()
    });
    let snap = api.plane.snapshot();
    let nodes = node_statuses(&api);
    let servers = server_statuses(&api, &active).await;
    let rollout = current_rollout(&api).unwrap_or_else(|e| {
        note(e);
        Value::Null
    });
    let info = api.plane.store().info();
    let leadership = api.plane.store().leadership().borrow().clone();
    Ok(Json(json!({
        "store": {
            "kind": info.kind,
            "location": info.location,
            "replica": info.replica,
            "ok": store_errors.is_empty(),
            "error": store_errors.first(),
        },
        "leadership": leadership,
        "version": active.version,
        "kind": active.kind,
        "author": active.author,
        "created_at": active.created_at,
        "fence": active.fence,
        "ecds_version": snap.ecds.version,
        "cds_version": snap.cds.version,
        "nodes": nodes,
        "conflicts": api.plane.registry().conflicts(),
        "servers": servers,
        "rollout": rollout,
    })))
}

async fn active_map(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    Ok(Json(
        serde_json::to_value(api.plane.active()?).unwrap_or(Value::Null),
    ))
}

/// `limit` from the query string, bounded; `default` when absent or unreadable.
fn limit(query: Option<&str>, default: u32) -> u32 {
    query
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("limit="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .min(1000)
}

async fn history(State(api): State<Api>, uri: axum::http::Uri) -> Result<Json<Value>, ApiError> {
    let versions = api.plane.store().history(limit(uri.query(), 50))?;
    Ok(Json(json!({ "versions": versions })))
}

async fn one_version(
    State(api): State<Api>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let version = number(&version, "a version number")?;
    match api.plane.store().version(version)? {
        Some(v) => Ok(Json(serde_json::to_value(v).unwrap_or(Value::Null))),
        None => Err(no_such(format!("no version {version}"))),
    }
}

/// `dry_run` from the query string: `true`, `1` or bare; absent means false.
fn dry_run(query: Option<&str>) -> Result<bool, ApiError> {
    for pair in query.unwrap_or_default().split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k == "dry_run" {
            return match v {
                "true" | "1" | "" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("dry_run={v}: use true or false"),
                )),
            };
        }
    }
    Ok(false)
}

/// The body of `POST /v1/maps`: an envelope, or a bare map.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    map: Value,
    #[serde(default)]
    base_version: Option<u64>,
    /// For a rollout: at most this many servers restart at once.
    #[serde(default)]
    parallel: Option<usize>,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    author: Option<String>,
}

async fn propose(
    State(api): State<Api>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let is_dry_run = dry_run(uri.query())?;
    if !is_dry_run {
        authorize(&api, &headers)?;
    }
    require_json(&headers)?;
    let unprocessable = |at: &str, message: String| ApiError {
        problems: vec![Problem {
            at: at.to_owned(),
            message: message.clone(),
        }],
        ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "the map is invalid")
    };
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| unprocessable("", format!("the body is not JSON: {e}")))?;
    // `Value` keeps the last of a repeated key: refuse one before it is lost.
    if let Err(e) = std::str::from_utf8(&body)
        .map_err(|e| e.to_string())
        .and_then(shardmap::check_unique_keys)
    {
        return Err(unprocessable("", e));
    }
    let envelope = if value.get("map").is_some() {
        serde_json::from_value::<Envelope>(value)
            .map_err(|e| unprocessable("", format!("not a proposal: {e}")))?
    } else {
        Envelope {
            map: value,
            base_version: None,
            parallel: None,
            comment: String::new(),
            author: None,
        }
    };
    let map: ShardMap = serde_json::from_value(envelope.map)
        .map_err(|e| unprocessable("map", format!("not a shard map: {e}")))?;
    let author = envelope
        .author
        .or_else(|| {
            headers
                .get("x-seashard-author")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "api".to_owned());
    if envelope.parallel == Some(0) {
        return Err(unprocessable("parallel", "must be at least 1".into()));
    }
    let parallel = envelope.parallel;
    let proposal = Proposal {
        map,
        base_version: envelope.base_version,
        author,
        comment: envelope.comment,
        dry_run: is_dry_run,
    };
    let plane = api.plane.clone();
    let p2 = proposal.clone();
    let outcome = tokio::task::spawn_blocking(move || plane.propose(&p2))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match outcome {
        Ok(o) => {
            let mut v = serde_json::to_value(&o).unwrap_or(Value::Null);
            if o.needs_rollout {
                let (restart, skipped) = rollout::restart_plan(&api.plane, &o.plan.fence)?;
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("restart".into(), json!(restart));
                    obj.insert("skipped".into(), json!(skipped));
                }
            }
            Ok((StatusCode::OK, Json(v)))
        }
        Err(ProposeError::MovesBases(_)) => match begin_rollout(&api, proposal, parallel).await? {
            Ok(r) => Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "rollout": r.id,
                    "from_version": r.from_version,
                    "needs_rollout": true,
                    "applied": false,
                    "plan": r.plan,
                    "restart": r.restart,
                    "skipped": r.skipped,
                })),
            )),
            Err(e) => {
                api.plane.metrics().api_error();
                Err(e.into())
            }
        },
        Err(e) => {
            api.plane.metrics().api_error();
            Err(e.into())
        }
    }
}

async fn nodes(State(api): State<Api>) -> Json<Value> {
    let nodes = node_statuses(&api);
    Json(json!({ "nodes": nodes, "conflicts": api.plane.registry().conflicts() }))
}

async fn one_node(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let node = api
        .plane
        .registry()
        .node(&id)
        .ok_or_else(|| no_such(format!("no node `{id}`")))?;
    Ok(Json(
        serde_json::to_value(node_status(&api, node)).unwrap_or(Value::Null),
    ))
}

async fn forget_node(
    State(api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers)?;
    // Every replica's records as they stand (with etcd, an Envoy may be held, or
    // last seen, on another replica): an instance connected anywhere live is kept;
    // a disconnected one is forgotten wherever it was recorded, a dead replica's
    // record included.
    let forgotten: Vec<String> = api
        .plane
        .registry()
        .nodes()
        .into_iter()
        .filter(|n| !n.connected && (n.instance == id || n.id == id))
        .map(|n| n.instance)
        .collect();
    if forgotten.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("node `{id}` is unknown or still connected"),
        ));
    }
    for key in &forgotten {
        api.plane.registry().forget(key);
    }
    api.plane.store().delete_nodes(&forgotten)?;
    api.plane.store().audit(&NewAudit {
        actor: "api",
        action: "node.forget",
        version: None,
        detail: json!({ "node": id, "instances": forgotten }),
    })?;
    Ok(Json(json!({ "forgotten": forgotten })))
}

async fn servers(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let active = api.plane.active()?;
    Ok(Json(
        json!({ "servers": server_statuses(&api, &active).await }),
    ))
}

/// Starts a rollout off the async workers (taking the change lock may wait a moment).
async fn begin_rollout(
    api: &Api,
    proposal: Proposal,
    parallel: Option<usize>,
) -> Result<Result<rollout::Rollout, RolloutError>, ApiError> {
    let plane = api.plane.clone();
    tokio::task::spawn_blocking(move || rollout::begin_with(&plane, &proposal, parallel))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        let reason = e.to_string();
        match e {
            RolloutError::Propose(p) => p.into(),
            RolloutError::Store(s) => s.into(),
            RolloutError::NoneRunning => ApiError::new(StatusCode::NOT_FOUND, reason),
            RolloutError::Unfinished(id) => {
                ApiError::coded(StatusCode::CONFLICT, "rollout_unfinished", reason)
                    .with("rollout", json!(id))
            }
            RolloutError::TooLate(_)
            | RolloutError::NotWaiting { .. }
            | RolloutError::Conflicts(_)
            | RolloutError::NoGuard { .. } => ApiError::new(StatusCode::CONFLICT, reason),
            RolloutError::Corrupt(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason),
        }
    }
}

/// The running rollout as shown, or `null`.
fn current_rollout(api: &Api) -> Result<Value, ApiError> {
    Ok(match api.plane.store().unfinished_rollout()? {
        Some(stored) => rollout::view(&api.plane, &rollout::parse(stored.record)?),
        None => Value::Null,
    })
}

async fn rollouts(State(api): State<Api>, uri: axum::http::Uri) -> Result<Json<Value>, ApiError> {
    let mut out = Vec::new();
    for stored in api.plane.store().rollouts(limit(uri.query(), 50))? {
        out.push(rollout::view(&api.plane, &rollout::parse(stored.record)?));
    }
    Ok(Json(json!({ "rollouts": out })))
}

async fn one_rollout(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if id == "current" {
        return match current_rollout(&api)? {
            Value::Null => Err(RolloutError::NoneRunning.into()),
            v => Ok(Json(v)),
        };
    }
    let n = number(&id, "a rollout id (or `current`)")?;
    match api.plane.store().rollout(n)? {
        Some(stored) => Ok(Json(rollout::view(
            &api.plane,
            &rollout::parse(stored.record)?,
        ))),
        None => Err(no_such(format!("no rollout {n}"))),
    }
}

/// A path's number (`400` naming `what` it should be).
fn number(text: &str, what: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("`{text}` is not {what}")))
}

fn no_such(message: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, message)
}

#[derive(Debug, Deserialize)]
struct ConfirmBody {
    server: String,
}

async fn rollout_confirm(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers)?;
    let b: ConfirmBody = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"server\": NAME}}: {e}"),
        )
    })?;
    let id = rollout::confirm(&api.plane, &b.server)?;
    api.plane.store().audit(&NewAudit {
        actor: &actor(&headers),
        action: "rollout.confirm",
        version: None,
        detail: json!({ "rollout": id, "server": b.server }),
    })?;
    Ok(Json(json!({ "rollout": id, "confirmed": b.server })))
}

async fn rollout_abort(
    State(api): State<Api>,
    headers: HeaderMap,
    // Read (and ignored), so that the connection stays usable for the next request.
    _body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&api, &headers)?;
    let who = actor(&headers);
    // Off the async workers: a rollout without a driver gets one here, which may
    // wait a moment for the change lock.
    let plane = api.plane.clone();
    let reason = format!("aborted by {who}");
    let id = tokio::task::spawn_blocking(move || rollout::abort(&plane, &reason))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    api.plane.store().audit(&NewAudit {
        actor: &who,
        action: "rollout.abort",
        version: None,
        detail: json!({ "rollout": id }),
    })?;
    Ok(Json(json!({ "rollout": id, "aborting": true })))
}

/// Who calls: the `x-seashard-author` header, else `api`.
fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-seashard-author")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| "api".to_owned())
}

async fn audit(State(api): State<Api>, uri: axum::http::Uri) -> Result<Json<Value>, ApiError> {
    let entries = api.plane.store().audit_log(limit(uri.query(), 100))?;
    Ok(Json(json!({ "entries": entries })))
}

/// A REST-JSON `DiscoveryRequest` (proto3 JSON; both field spellings).
#[derive(Debug, Default, Deserialize)]
struct RestRequest {
    #[serde(default, alias = "versionInfo")]
    version_info: String,
    #[serde(default)]
    node: Option<RestNode>,
    #[serde(default, alias = "resourceNames")]
    resource_names: Vec<String>,
    #[serde(default, alias = "typeUrl")]
    type_url: String,
    #[serde(default, alias = "errorDetail")]
    error_detail: Option<RestStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct RestNode {
    #[serde(default)]
    id: String,
    #[serde(default)]
    cluster: String,
}

#[derive(Debug, Default, Deserialize)]
struct RestStatus {
    #[serde(default)]
    message: String,
}

/// The peer of an API connection, plain or TLS: how a REST poller is told apart
/// from another with its node id. The router is served with it as connect info
/// (`into_make_service_with_connect_info::<Peer>()`, see [`crate::server`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub(crate) std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Peer(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsIncoming>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::tls::TlsIncoming>) -> Self {
        Peer(*s.remote_addr())
    }
}

/// The peer address of the request, when the router is served with [`Peer`].
struct PeerAddr(Option<std::net::SocketAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<Peer>>()
            .map(|c| c.0.0);
        Ok(PeerAddr(peer))
    }
}

async fn rest_ecds(
    State(api): State<Api>,
    PeerAddr(peer): PeerAddr,
    body: axum::body::Bytes,
) -> Response {
    rest_discovery(&api, ResourceType::Ecds, peer, &body)
}

async fn rest_cds(
    State(api): State<Api>,
    PeerAddr(peer): PeerAddr,
    body: axum::body::Bytes,
) -> Response {
    rest_discovery(&api, ResourceType::Cds, peer, &body)
}

/// One REST poll from `peer`: `304` when the node runs the current version (or
/// NACKed it: never resent), else `200` with the resources. The poller is the
/// instance of its node id at `peer`'s address (see [`crate::nodes`]).
fn rest_discovery(
    api: &Api,
    t: ResourceType,
    peer: Option<std::net::SocketAddr>,
    body: &[u8],
) -> Response {
    let req: RestRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("not a DiscoveryRequest: {e}"),
            )
            .into_response();
        }
    };
    if !req.type_url.is_empty() && req.type_url != t.type_url() {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("type_url {} on the {} endpoint", req.type_url, t.as_str()),
        )
        .into_response();
    }
    let Some(node) = req.node.filter(|n| !n.id.is_empty()) else {
        return ApiError::new(StatusCode::BAD_REQUEST, "the request names no node id")
            .into_response();
    };
    let max = crate::nodes::MAX_NODE_NAME;
    if node.id.len().max(node.cluster.len()) > max {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the node id and cluster are names: at most {max} bytes are accepted"),
        )
        .into_response();
    }
    // A map version never goes back: a replica that cannot show it is current
    // hands no map (503: the poller asks another replica), one behind none yet.
    match api.plane.standing() {
        crate::plane::Standing::NotCurrent { reason } => {
            return ApiError::coded(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_current",
                format!(
                    "this control plane replica cannot show that its map is current \
                     ({reason}): try another replica"
                ),
            )
            .into_response();
        }
        crate::plane::Standing::Behind { .. } if t == ResourceType::Ecds => {
            return StatusCode::NOT_MODIFIED.into_response();
        }
        _ => {}
    }
    api.plane.metrics().rest_polled();
    let snap = api.plane.snapshot();
    let set = snap.get(t);
    let error = req.error_detail.map(|s| s.message);
    let poll = crate::nodes::RestPoll {
        id: &node.id,
        cluster: &node.cluster,
        peer,
        t,
        running: &req.version_info,
        error: error.as_deref(),
        names: &req.resource_names,
    };
    let send = api.plane.registry().rest_poll(&poll, &set.version);
    if !send {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    api.plane.metrics().responded(t);
    let resources: Vec<&Value> = set
        .select(&req.resource_names)
        .into_iter()
        .map(|r| &r.json)
        .collect();
    Json(json!({
        "version_info": set.version,
        "resources": resources,
        "type_url": t.type_url(),
        "nonce": crate::xds::next_nonce(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-tokem", b"secret-token"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token-and-more", b"secret-token"));
        assert!(!constant_time_eq(b"", b"secret-token"));
    }

    #[test]
    fn moved_problems_name_slots_and_pins() {
        let old: ShardMap = serde_json::from_value(json!({
            "default": "a", "slots": {"0-7": "a", "8-f": "b"}
        }))
        .unwrap();
        let new: ShardMap = serde_json::from_value(json!({
            "default": "a", "slots": {"0-3": "a", "4-f": "b"}, "pins": {"ff84e1a1": "a"}
        }))
        .unwrap();
        let plan = shardmap::diff(&old, &new).unwrap();
        let p = moved_problems(&plan);
        assert_eq!(p[0].at, "slots.\"4-7\"");
        assert_eq!(p[0].message, "moves bases from a to b");
        assert_eq!(p[1].at, "pins.\"ff84e1a1\"");
    }

    #[test]
    fn problems_type_is_transparent() {
        let p = shardmap::Problems(vec![Problem {
            at: "x".into(),
            message: "y".into(),
        }]);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([{"at": "x", "message": "y"}])
        );
    }
}
