//! The whole per-request decision of base-router, edge or guard: a [`Gate`] (a
//! [`RouterConfig`] compiled) answers every request target with a [`Verdict`] — route
//! it, let it pass, or refuse it with a [`Refusal`] whose status, headers and JSON body
//! are ready to send. The filter only applies the verdict.
//!
//! - An **edge** (no `guard` in the configuration) routes each request to the server
//!   its base belongs to ([`Verdict::Route`]), exactly as [`Router::decide`] says.
//! - A **guard** (`guard: "<server>"`) sits in front of that one dtable-server, as the
//!   only way in, and routes nothing: it lets a request through ([`Verdict::Pass`])
//!   only when its server owns the base under the map the guard holds, fence included.
//!   A base owned by another server is refused `421`, so a stale or cut-off edge can
//!   never open a base on the wrong server. Requests without a base pass.
//! - Both answer a fenced base `503` with `retry-after`; under the bootstrap's
//!   placeholder configuration ([`AWAITING_MAP_VERSION`], every base fenced) the body
//!   says that no map has arrived yet rather than that the base is moving.
//! - Both answer `400 unreadable_base` (with a `reason`) to a request whose base
//!   cannot be read unambiguously as the dtable-server reads it ([`Unreadable`], see
//!   [`read_base`](crate::read_base)): an edge would otherwise send it to the default
//!   server, and a guard never passes a request whose base it cannot rule out.

use serde::Serialize;

use crate::config::RouterConfig;
use crate::problem::Problems;
use crate::router::{Decision, Reason, Router};
use crate::uuid::{BaseUuid, Unreadable};

/// The version of the bootstrap's placeholder configuration (its `default_config`),
/// which fences every base until the control plane's first map arrives. The control
/// plane numbers its versions from 1, so version 0 is never a real map.
pub const AWAITING_MAP_VERSION: u64 = 0;

/// A [`RouterConfig`] compiled for requests: the [`Router`], whether this filter is an
/// edge or the guard of one server, the map version and the retry-after of refusals.
/// Built by [`RouterConfig::compile_gate`].
#[derive(Debug, Clone)]
pub struct Gate {
    router: Router,
    header: String,
    version: u64,
    retry_after: u32,
    guard: Option<Guarded>,
    version_header: bool,
}

/// The server a guard stands in front of.
#[derive(Debug, Clone)]
struct Guarded {
    name: String,
    /// Its index in [`Router::servers`]; `None` when the map gives it nothing.
    index: Option<usize>,
}

/// What to do with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'g> {
    /// Edge: send the request to `decision.server` (set the routing header). Never a
    /// fenced decision.
    Route(Decision<'g>),
    /// Guard: let the request through to the guarded server untouched: its base (if
    /// any) is owned by that server and not fenced.
    Pass {
        /// The base the request is about, if any.
        base: Option<BaseUuid>,
    },
    /// Answer locally; the request goes nowhere.
    Refuse(Refusal),
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The base is fenced by a rollout: `503` + `retry-after`.
    BaseMoving,
    /// A guard's server does not own the base under the guard's map: `421`.
    Misdirected,
    /// The placeholder configuration ([`AWAITING_MAP_VERSION`]): no map has arrived
    /// from the control plane yet, every base is fenced: `503` + `retry-after`.
    AwaitingMap,
    /// The base cannot be read unambiguously: `400`, the body's `reason` says why.
    Unreadable(Unreadable),
}

impl RefusalKind {
    /// The HTTP status of the answer.
    pub fn status(self) -> u16 {
        match self {
            RefusalKind::BaseMoving | RefusalKind::AwaitingMap => 503,
            RefusalKind::Misdirected => 421,
            RefusalKind::Unreadable(_) => 400,
        }
    }

    /// The `error` field of the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            RefusalKind::BaseMoving => "base_moving",
            RefusalKind::Misdirected => "misdirected",
            RefusalKind::AwaitingMap => "no_shard_map_yet",
            RefusalKind::Unreadable(_) => "unreadable_base",
        }
    }

    /// Whether the client is told to retry here after a while (`retry-after`): the
    /// refusal is temporary. A misdirected or unreadable request will not succeed on
    /// retry.
    pub fn retries(self) -> bool {
        !matches!(self, RefusalKind::Misdirected | RefusalKind::Unreadable(_))
    }
}

/// A local answer: status, `retry-after` (seconds) when it applies, JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// The base refused; `None` when it could not be read.
    pub base: Option<BaseUuid>,
    /// The HTTP status (`503`, `421` or `400`).
    pub status: u16,
    /// The `retry-after` header's value in seconds, when the refusal is temporary.
    pub retry_after: Option<u32>,
    /// The JSON body (`application/json`).
    pub body: String,
}

/// The JSON body of a refusal; the fields in this order, absent ones left out.
#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base_uuid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u32>,
}

impl RouterConfig {
    /// Validates everything (as [`RouterConfig::compile`]) and compiles the [`Gate`]
    /// that gives each request its [`Verdict`].
    pub fn compile_gate(&self) -> Result<Gate, Problems> {
        let router = self.compile()?;
        let guard = self.guard.as_ref().map(|name| Guarded {
            index: router.servers().iter().position(|s| s == name),
            name: name.clone(),
        });
        Ok(Gate {
            router,
            header: self.header.clone(),
            version: self.version,
            retry_after: self.retry_after,
            guard,
            version_header: self.version_header,
        })
    }
}

impl Gate {
    /// What to do with the request for `path_and_query` (the `:path` pseudo-header).
    pub fn verdict(&self, path_and_query: &str) -> Verdict<'_> {
        let decision = match self.router.read(path_and_query) {
            Ok(d) => d,
            Err(why) => return Verdict::Refuse(self.unreadable(why)),
        };
        match decision.base {
            Some(base) => self.judge(decision, base),
            None if self.guard.is_some() => Verdict::Pass { base: None },
            None => Verdict::Route(decision),
        }
    }

    /// What to do with a request for `base`.
    pub fn verdict_base(&self, base: &BaseUuid) -> Verdict<'_> {
        self.judge(self.router.decide_base(base), *base)
    }

    fn judge<'g>(&'g self, decision: Decision<'g>, base: BaseUuid) -> Verdict<'g> {
        if decision.reason == Reason::Fenced {
            let kind = if self.is_awaiting_map() {
                RefusalKind::AwaitingMap
            } else {
                RefusalKind::BaseMoving
            };
            return Verdict::Refuse(self.refusal(kind, base, decision.server));
        }
        match &self.guard {
            None => Verdict::Route(decision),
            Some(g) if g.index == Some(decision.server_index) => Verdict::Pass { base: Some(base) },
            Some(_) => {
                Verdict::Refuse(self.refusal(RefusalKind::Misdirected, base, decision.server))
            }
        }
    }

    /// The `400` of a request whose base cannot be read.
    fn unreadable(&self, why: Unreadable) -> Refusal {
        let kind = RefusalKind::Unreadable(why);
        let body = Body {
            error: kind.code(),
            message: why.message(),
            reason: Some(why.as_str()),
            base_uuid: None,
            owner: None,
            server: None,
            retry_after: None,
        };
        Refusal {
            kind,
            base: None,
            status: kind.status(),
            retry_after: None,
            body: serde_json::to_string(&body).unwrap_or_default(),
        }
    }

    fn refusal(&self, kind: RefusalKind, base: BaseUuid, owner: &str) -> Refusal {
        let dashed = base.dashed();
        let retry_after = kind.retries().then_some(self.retry_after);
        let (message, owner, server) = match kind {
            RefusalKind::BaseMoving => (
                "this base is moving to another server; retry shortly",
                None,
                None,
            ),
            RefusalKind::AwaitingMap => (
                "no shard map has arrived from the control plane yet; retry shortly",
                None,
                None,
            ),
            RefusalKind::Misdirected => (
                "this base belongs to another dtable-server under the shard map this guard holds",
                Some(owner),
                self.guard(),
            ),
            RefusalKind::Unreadable(why) => return self.unreadable(why),
        };
        let body = Body {
            error: kind.code(),
            message,
            reason: None,
            base_uuid: Some(&dashed),
            owner,
            server,
            retry_after,
        };
        Refusal {
            kind,
            base: Some(base),
            status: kind.status(),
            retry_after,
            body: serde_json::to_string(&body).unwrap_or_default(),
        }
    }

    /// The compiled map and fence.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The routing header an edge sets.
    pub fn header(&self) -> &str {
        &self.header
    }

    /// Whether a routed request also gets `x-shard-map-version`.
    pub fn version_header(&self) -> bool {
        self.version_header
    }

    /// The map version (`x-shard-map-version`).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Seconds a refused client is told to wait (`retry-after`).
    pub fn retry_after(&self) -> u32 {
        self.retry_after
    }

    /// The server this filter guards; `None` for an edge.
    pub fn guard(&self) -> Option<&str> {
        self.guard.as_ref().map(|g| g.name.as_str())
    }

    /// True for the bootstrap's placeholder configuration: no map from the control
    /// plane yet.
    pub fn is_awaiting_map(&self) -> bool {
        self.version == AWAITING_MAP_VERSION
    }
}
