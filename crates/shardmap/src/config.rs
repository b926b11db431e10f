//! The filter's configuration: what the control plane sends and base-router compiles.

use serde::{Deserialize, Serialize};

use crate::map::{ShardMap, check_server_name};
use crate::problem::Problems;
use crate::router::{Fence, Router};

/// The routing header set by default: Envoy routes on it with `cluster_header`.
pub const DEFAULT_HEADER: &str = "x-dtable-server";
/// Seconds a client is told to wait before retrying a fenced base, by default.
pub const DEFAULT_RETRY_AFTER: u32 = 5;

/// The base-router plugin configuration: a map with its version, the routing header,
/// the fence of a running rollout, how long fenced clients should wait and, for a
/// guard, the server it guards.
///
/// ```json
/// { "version": 7, "header": "x-dtable-server", "retry_after": 5,
///   "fence": { "slots": ["0-3"], "pins": [] },
///   "map": { "default": "dtable-server", "slots": { "0-f": "dtable-server" } } }
/// ```
///
/// With `"guard": "dtable-server-2"` the filter is that server's guard: it routes
/// nothing and passes only requests for bases the server owns (see [`crate::Gate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The map version, reported in `x-shard-map-version` and the filter's gauge.
    pub version: u64,
    #[serde(default = "default_header")]
    pub header: String,
    #[serde(default = "default_retry_after")]
    pub retry_after: u32,
    #[serde(default, skip_serializing_if = "Fence::is_empty")]
    pub fence: Fence,
    /// The server this filter guards (guard mode); `None` for an edge. It need not
    /// appear in the map: then it owns no base and every base is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<String>,
    /// An edge also sets `x-shard-map-version` on every routed request (one more
    /// host call per request); a refusal always carries it.
    #[serde(default = "default_version_header", skip_serializing_if = "is_true")]
    pub version_header: bool,
    pub map: ShardMap,
}

fn default_version_header() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn default_header() -> String {
    DEFAULT_HEADER.to_owned()
}

fn default_retry_after() -> u32 {
    DEFAULT_RETRY_AFTER
}

impl RouterConfig {
    /// A configuration of `map` at `version`, default header, no fence.
    pub fn new(version: u64, map: ShardMap) -> RouterConfig {
        RouterConfig {
            version,
            header: default_header(),
            retry_after: DEFAULT_RETRY_AFTER,
            fence: Fence::default(),
            guard: None,
            version_header: default_version_header(),
            map,
        }
    }

    /// Parses JSON into a configuration (not yet validated: see [`RouterConfig::compile`]).
    pub fn from_json(json: &str) -> Result<RouterConfig, Problems> {
        serde_json::from_str(json).map_err(|e| {
            let mut p = Problems::default();
            p.push("", format!("not a base-router configuration: {e}"));
            p
        })
    }

    /// Validates everything and compiles the router: every problem at once. The filter
    /// compiles a [`crate::Gate`] instead ([`RouterConfig::compile_gate`]).
    pub fn compile(&self) -> Result<Router, Problems> {
        let mut problems = Problems::default();
        if !is_header_name(&self.header) {
            problems.push(
                "header",
                format!("`{}` is not a lowercase HTTP header name", self.header),
            );
        }
        if self.retry_after == 0 || self.retry_after > 3600 {
            problems.push("retry_after", "must be between 1 and 3600 seconds");
        }
        if let Some(Err(e)) = self.guard.as_deref().map(check_server_name) {
            problems.push("guard", e);
        }
        match Router::with_fence(&self.map, &self.fence) {
            Ok(r) if problems.is_empty() => Ok(r),
            Ok(_) => Err(problems),
            Err(more) => {
                problems.0.extend(more.0);
                Err(problems)
            }
        }
    }

    /// The configuration as compact JSON (what goes into Envoy).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A map offered to a filter that already applied a newer one: refused, so Envoy
/// NACKs it and keeps the newer map (DESIGN: a map version never goes back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OlderMap {
    pub offered: u64,
    pub applied: u64,
}

impl std::fmt::Display for OlderMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "map version {} is older than version {}, which this filter applied",
            self.offered, self.applied
        )
    }
}

impl std::error::Error for OlderMap {}

/// Whether a filter may apply map version `offered`. Versions are totally ordered
/// (fence and rollback maps are new, higher versions), so an older one is refused;
/// the same version again is accepted (the same map under other filter settings).
///
/// `vm_applied` is what this VM applied, `process_floor` the newest any VM of the
/// same `vm_id` in this Envoy process applied (Envoy's shared data). A VM that
/// applied a map compares with its own: configurations reach the worker threads in
/// the order the main thread accepted them, and a worker still catching up must
/// not refuse one the main thread already took. A fresh VM (the main thread's
/// configuration canary, whose refusal is Envoy's NACK) compares with the process.
pub fn may_apply(
    vm_applied: Option<u64>,
    process_floor: Option<u64>,
    offered: u64,
) -> Result<(), OlderMap> {
    match vm_applied.or(process_floor) {
        Some(applied) if offered < applied => Err(OlderMap { offered, applied }),
        _ => Ok(()),
    }
}

fn is_header_name(h: &str) -> bool {
    !h.is_empty()
        && !h.starts_with(':')
        && h.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_version_never_goes_back() {
        // Nothing applied yet: anything goes, the placeholder included.
        assert_eq!(may_apply(None, None, 0), Ok(()));
        assert_eq!(may_apply(None, None, 7), Ok(()));
        // Newer and the same version are applied; older is refused.
        assert_eq!(may_apply(Some(7), None, 8), Ok(()));
        assert_eq!(may_apply(Some(7), None, 7), Ok(()));
        let older = may_apply(Some(8), None, 7).unwrap_err();
        assert_eq!(
            older,
            OlderMap {
                offered: 7,
                applied: 8
            }
        );
        assert!(older.to_string().contains("older than version 8"));
        // After a real map the placeholder (0) is older too.
        assert!(may_apply(Some(3), None, 0).is_err());
        // A fresh VM (the configuration canary) compares with the process.
        assert!(may_apply(None, Some(8), 7).is_err());
        assert_eq!(may_apply(None, Some(8), 8), Ok(()));
        // A VM that applied a map compares with its own: a worker catching up.
        assert_eq!(may_apply(Some(6), Some(8), 7), Ok(()));
        assert!(may_apply(Some(8), Some(6), 7).is_err());
    }
}
