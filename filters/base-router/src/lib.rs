//! base-router: the proxy-wasm filter that sends each SeaTable request to the
//! dtable-server owning its base, or, as a guard in front of one dtable-server, lets
//! through only the requests for bases that server owns.
//!
//! Thin glue over `shardmap`: the plugin configuration (a [`RouterConfig`] as JSON) is
//! compiled into a [`Gate`] once in `on_configure`; each request's `:path` is read
//! once and the gate's [`Verdict`] applied: route (overwrite the routing header, so a
//! client-sent value never survives, and set `x-shard-map-version`), pass (a guard
//! touches no header), or refuse with the verdict's status, headers and JSON body.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use shardmap::{Gate, Reason, RefusalKind, RouterConfig, Verdict};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BaseRouterRoot::default()) });
}}

/// Counters after the per-server ones, in this order.
const COUNTERS: [&str; 6] = [
    // An edge's requests routed to the default server (no base, no path rule).
    "seashard.requests.default",
    // Refused 503: the base is fenced by a rollout.
    "seashard.requests.fenced",
    // A guard's 421: another server owns the base.
    "seashard.requests.misdirected",
    // Let through by a guard.
    "seashard.requests.passed",
    // Refused 503 before the first map (the bootstrap's placeholder).
    "seashard.requests.no_map",
    // Refused 400: the base cannot be read unambiguously (bad escape, ...).
    "seashard.requests.unreadable",
];
const DEFAULT: usize = 0;
const FENCED: usize = 1;
const MISDIRECTED: usize = 2;
const PASSED: usize = 3;
const NO_MAP: usize = 4;
const UNREADABLE: usize = 5;

/// Counts requests: an edge's per server it routed to, and by outcome. Counted in the
/// VM and flushed to Envoy's counters every tick, so a request costs no metric host
/// call.
struct Metrics {
    /// Counter ids: one per server of the map (edge only), then [`COUNTERS`].
    ids: Vec<Option<u32>>,
    pending: Vec<Cell<u64>>,
    /// Where [`COUNTERS`] begin in `ids`.
    first: usize,
}

impl Metrics {
    fn define(gate: &Gate) -> Metrics {
        let counter =
            |name: &str| proxy_wasm::hostcalls::define_metric(MetricType::Counter, name).ok();
        let servers: &[String] = if gate.guard().is_some() {
            &[]
        } else {
            gate.router().servers()
        };
        let mut ids: Vec<Option<u32>> = servers
            .iter()
            .map(|s| counter(&format!("seashard.requests.server.{s}")))
            .collect();
        let first = ids.len();
        ids.extend(COUNTERS.iter().map(|name| counter(name)));
        Metrics {
            pending: ids.iter().map(|_| Cell::new(0)).collect(),
            ids,
            first,
        }
    }

    fn bump(&self, i: usize) {
        if let Some(c) = self.pending.get(i) {
            c.set(c.get() + 1);
        }
    }

    fn count(&self, verdict: &Verdict<'_>) {
        match verdict {
            Verdict::Route(d) => {
                self.bump(d.server_index);
                if d.reason == Reason::Default {
                    self.bump(self.first + DEFAULT);
                }
            }
            Verdict::Pass { .. } => self.bump(self.first + PASSED),
            Verdict::Refuse(r) => self.bump(
                self.first
                    + match r.kind {
                        RefusalKind::BaseMoving => FENCED,
                        RefusalKind::Misdirected => MISDIRECTED,
                        RefusalKind::AwaitingMap => NO_MAP,
                        RefusalKind::Unreadable(_) => UNREADABLE,
                    },
            ),
        }
    }

    /// Adds what was counted since the last flush to Envoy's counters.
    fn flush(&self) {
        for (id, pending) in self.ids.iter().zip(&self.pending) {
            let delta = pending.take();
            if let (Some(id), 1..) = (id, delta) {
                // A counter the host refuses is not worth failing anything for.
                let _ = proxy_wasm::hostcalls::increment_metric(*id, delta as i64);
            }
        }
    }
}

/// What every request of one configuration shares.
struct Active {
    gate: Gate,
    version: String,
    retry_after: String,
    metrics: Metrics,
}

#[derive(Default)]
struct BaseRouterRoot {
    active: Option<Rc<Active>>,
    version_gauge: Option<u32>,
}

impl Context for BaseRouterRoot {}

impl RootContext for BaseRouterRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            log(
                LogLevel::Error,
                "base-router: configuration refused, previous map kept: the plugin configuration is empty",
            );
            return false;
        };
        let config = match std::str::from_utf8(&bytes)
            .map_err(|e| format!("configuration is not UTF-8: {e}"))
            .and_then(|json| RouterConfig::from_json(json).map_err(|p| p.to_string()))
        {
            Ok(c) => c,
            Err(why) => {
                log(
                    LogLevel::Error,
                    &format!("base-router: configuration refused, previous map kept: {why}"),
                );
                return false;
            }
        };
        // A map version never goes back, whatever a control plane sends.
        if let Err(older) = shardmap::may_apply(VM_APPLIED.get(), process_floor(), config.version) {
            // A VM that runs a newer map (a worker's) keeps it for this configuration
            // too. It must not fail: Envoy caches its canary's verdict per
            // configuration, so a map this Envoy ran before reaches the workers
            // unchecked, and a worker whose configuration failed runs requests
            // without this filter (every base passed, or sent to the default).
            if let Some(newest) = VM_NEWEST.with(|n| n.borrow().clone()) {
                log(
                    LogLevel::Warn,
                    &format!("base-router: configuration not applied, newer map kept: {older}"),
                );
                self.set_tick_period(FLUSH_PERIOD);
                self.active = Some(newest);
                return true;
            }
            // A fresh VM: Envoy's configuration canary, whose refusal is the NACK.
            log(
                LogLevel::Error,
                &format!("base-router: configuration refused, newer map kept: {older}"),
            );
            return false;
        }
        let gate = match config.compile_gate() {
            Ok(g) => g,
            Err(problems) => {
                let list = problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                log(
                    LogLevel::Error,
                    &format!(
                        "base-router: map version {} refused, previous map kept: {list}",
                        config.version
                    ),
                );
                return false;
            }
        };
        let gauge = *self.version_gauge.get_or_insert_with(|| {
            proxy_wasm::hostcalls::define_metric(MetricType::Gauge, "seashard.map_version")
                .unwrap_or(u32::MAX)
        });
        if gauge != u32::MAX {
            let _ = proxy_wasm::hostcalls::record_metric(gauge, config.version);
        }
        VM_APPLIED.set(Some(config.version));
        raise_process_floor(config.version);
        let role = match gate.guard() {
            Some(server) => format!("guard of {server}"),
            None => "edge".to_owned(),
        };
        log(
            LogLevel::Info,
            &format!(
                "base-router: map version {} applied, {role} ({} servers, fence: {} slot ranges, {} pins){}",
                config.version,
                gate.router().servers().len(),
                config.fence.slots.len(),
                config.fence.pins.len(),
                if gate.is_awaiting_map() {
                    "; placeholder until the control plane's first map: every base refused"
                } else {
                    ""
                }
            ),
        );
        if let Some(old) = &self.active {
            old.metrics.flush();
        }
        self.set_tick_period(FLUSH_PERIOD);
        let active = Rc::new(Active {
            metrics: Metrics::define(&gate),
            version: gate.version().to_string(),
            retry_after: gate.retry_after().to_string(),
            gate,
        });
        VM_NEWEST.with(|n| *n.borrow_mut() = Some(active.clone()));
        self.active = Some(active);
        true
    }

    fn on_tick(&mut self) {
        if let Some(active) = &self.active {
            active.metrics.flush();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BaseRouter {
            active: self.active.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct BaseRouter {
    active: Option<Rc<Active>>,
}

impl Context for BaseRouter {}

impl HttpContext for BaseRouter {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(active) = self.active.as_deref() else {
            // Without a map no base can be placed safely: refuse rather than guess.
            self.send_http_response(
                503,
                vec![("content-type", "application/json")],
                Some(NO_MAP_BODY.as_bytes()),
            );
            return Action::Pause;
        };
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let verdict = active.gate.verdict(&path);
        active.metrics.count(&verdict);
        match verdict {
            Verdict::Route(decision) => {
                self.set_http_request_header(active.gate.header(), Some(decision.server));
                if active.gate.version_header() {
                    self.set_http_request_header("x-shard-map-version", Some(&active.version));
                }
                Action::Continue
            }
            // A guard routes nothing: the request goes on to its one upstream as it came.
            Verdict::Pass { .. } => Action::Continue,
            Verdict::Refuse(refusal) => {
                let mut headers = vec![
                    ("content-type", "application/json"),
                    ("cache-control", "no-store"),
                    ("x-shard-map-version", active.version.as_str()),
                ];
                if refusal.retry_after.is_some() {
                    headers.push(("retry-after", active.retry_after.as_str()));
                }
                self.send_http_response(
                    u32::from(refusal.status),
                    headers,
                    Some(refusal.body.as_bytes()),
                );
                Action::Pause
            }
        }
    }
}

thread_local! {
    /// The map version this VM applied last. Envoy gives every plugin configuration
    /// a root context of its own in the same VM, so this lives beside them.
    static VM_APPLIED: Cell<Option<u64>> = const { Cell::new(None) };
    /// What the newest map applied in this VM runs on: a root context offered an
    /// older map keeps it.
    static VM_NEWEST: RefCell<Option<Rc<Active>>> = const { RefCell::new(None) };
}

/// The newest map version applied by any VM of this `vm_id` in this Envoy process
/// (Envoy's shared data: it outlives the fresh VM Envoy configures first, as a
/// canary, whose refusal is the NACK).
const APPLIED_KEY: &str = "seashard.base_router.applied_map_version";

fn process_floor() -> Option<u64> {
    match proxy_wasm::hostcalls::get_shared_data(APPLIED_KEY) {
        Ok((Some(bytes), _)) => std::str::from_utf8(&bytes).ok()?.parse().ok(),
        _ => None,
    }
}

/// Raises the process floor to `version` (compare-and-swap: VMs of several threads
/// write it).
fn raise_process_floor(version: u64) {
    for _ in 0..8 {
        let Ok((bytes, cas)) = proxy_wasm::hostcalls::get_shared_data(APPLIED_KEY) else {
            return;
        };
        let stored = bytes
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok())
            .unwrap_or(0);
        if stored >= version && cas.is_some() {
            return;
        }
        let value = version.to_string();
        // `None` as cas on a key that does not exist yet: Envoy sets it.
        if proxy_wasm::hostcalls::set_shared_data(APPLIED_KEY, Some(value.as_bytes()), cas).is_ok()
        {
            return;
        }
    }
}

/// How often counted requests reach Envoy's counters.
const FLUSH_PERIOD: Duration = Duration::from_secs(1);

const NO_MAP_BODY: &str =
    r#"{"error":"no_shard_map","message":"base-router has no valid shard map configured"}"#;

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}
