//! base-router: the proxy-wasm filter that sends each SeaTable request to the
//! dtable-server owning its base.
//!
//! Thin glue over `shardmap`: the plugin configuration (a [`RouterConfig`] as JSON) is
//! compiled into a [`Router`] once in `on_configure`; each request's `:path` is read
//! once, decided, and either the routing header is overwritten (a client-sent value
//! never survives) or a fenced base is answered locally with `503`.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use shardmap::{Reason, Router, RouterConfig};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BaseRouterRoot::default()) });
}}

/// Counts requests per server, default and fenced. Counted in the VM and flushed to
/// Envoy's counters every tick, so a request costs no metric host call.
struct Metrics {
    /// Counter ids, parallel to `Router::servers()`, then default, then fenced.
    ids: Vec<Option<u32>>,
    pending: Vec<Cell<u64>>,
}

impl Metrics {
    fn define(router: &Router) -> Metrics {
        let counter =
            |name: &str| proxy_wasm::hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut ids: Vec<Option<u32>> = router
            .servers()
            .iter()
            .map(|s| counter(&format!("seashard.requests.server.{s}")))
            .collect();
        ids.push(counter("seashard.requests.default"));
        ids.push(counter("seashard.requests.fenced"));
        Metrics {
            pending: ids.iter().map(|_| Cell::new(0)).collect(),
            ids,
        }
    }

    fn count(&self, server: usize, reason: Reason) {
        let n = self.ids.len();
        let by_reason = match reason {
            Reason::Default => n.checked_sub(2),
            Reason::Fenced => n.checked_sub(1),
            _ => None,
        };
        for i in [Some(server), by_reason].into_iter().flatten() {
            if let Some(c) = self.pending.get(i) {
                c.set(c.get() + 1);
            }
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
    router: Router,
    header: String,
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
        let router = match config.compile() {
            Ok(r) => r,
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
        log(
            LogLevel::Info,
            &format!(
                "base-router: map version {} applied ({} servers, fence: {} slot ranges, {} pins)",
                config.version,
                router.servers().len(),
                config.fence.slots.len(),
                config.fence.pins.len()
            ),
        );
        if let Some(old) = &self.active {
            old.metrics.flush();
        }
        self.set_tick_period(FLUSH_PERIOD);
        self.active = Some(Rc::new(Active {
            metrics: Metrics::define(&router),
            router,
            header: config.header,
            version: config.version.to_string(),
            retry_after: config.retry_after.to_string(),
        }));
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
        let decision = active.router.decide(&path);
        active.metrics.count(decision.server_index, decision.reason);
        if decision.reason == Reason::Fenced {
            let base = decision.base.map(|b| b.dashed()).unwrap_or_default();
            let body = format!(
                r#"{{"error":"base_moving","message":"this base is moving to another server; retry shortly","base_uuid":"{base}","retry_after":{}}}"#,
                active.retry_after
            );
            self.send_http_response(
                503,
                vec![
                    ("content-type", "application/json"),
                    ("retry-after", active.retry_after.as_str()),
                    ("cache-control", "no-store"),
                    ("x-shard-map-version", active.version.as_str()),
                ],
                Some(body.as_bytes()),
            );
            return Action::Pause;
        }
        self.set_http_request_header(&active.header, Some(decision.server));
        self.set_http_request_header("x-shard-map-version", Some(&active.version));
        Action::Continue
    }
}

/// How often counted requests reach Envoy's counters.
const FLUSH_PERIOD: Duration = Duration::from_secs(1);

const NO_MAP_BODY: &str =
    r#"{"error":"no_shard_map","message":"base-router has no valid shard map configured"}"#;

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}
