//! base-router: the proxy-wasm filter that sends each SeaTable request to the
//! dtable-server owning its base.
//!
//! Thin glue over `shardmap`: the plugin configuration (a [`RouterConfig`] as JSON) is
//! compiled into a [`Router`] once in `on_configure`; each request's `:path` is read
//! once, decided, and either the routing header is overwritten (a client-sent value
//! never survives) or a fenced base is answered locally with `503`.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use shardmap::{Reason, Router, RouterConfig};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BaseRouterRoot::default()) });
}}

/// Counts requests per server, default and fenced, and the applied map version.
struct Metrics {
    per_server: Vec<(String, Option<u32>)>,
    default: Option<u32>,
    fenced: Option<u32>,
}

impl Metrics {
    fn define(router: &Router) -> Metrics {
        let counter =
            |name: &str| proxy_wasm::hostcalls::define_metric(MetricType::Counter, name).ok();
        Metrics {
            per_server: router
                .servers()
                .iter()
                .map(|s| (s.clone(), counter(&format!("seashard.requests.server.{s}"))))
                .collect(),
            default: counter("seashard.requests.default"),
            fenced: counter("seashard.requests.fenced"),
        }
    }

    fn count(&self, server: &str, reason: Reason) {
        let by_server = self
            .per_server
            .iter()
            .find(|(s, _)| s == server)
            .and_then(|(_, id)| *id);
        let by_reason = match reason {
            Reason::Default => self.default,
            Reason::Fenced => self.fenced,
            _ => None,
        };
        for id in [by_server, by_reason].into_iter().flatten() {
            // A metric the host refuses to count is not worth failing a request for.
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
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
        self.active = Some(Rc::new(Active {
            metrics: Metrics::define(&router),
            router,
            header: config.header,
            version: config.version.to_string(),
            retry_after: config.retry_after.to_string(),
        }));
        true
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
        active.metrics.count(decision.server, decision.reason);
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

const NO_MAP_BODY: &str =
    r#"{"error":"no_shard_map","message":"base-router has no valid shard map configured"}"#;

fn log(level: LogLevel, message: &str) {
    let _ = proxy_wasm::hostcalls::log(level, message);
}
