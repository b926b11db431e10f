//! Envoy bootstraps managed by the control plane (`seactl envoy-bootstrap`), for
//! Envoys outside a mesh (in an Istio mesh, see [`crate::istio`]).
//!
//! The listener and route are static; the clusters (CDS) and the base-router
//! filter's configuration (ECDS) come over one ADS stream (or, where gRPC cannot
//! pass, by REST-JSON polling). Until the first ECDS answer, the filter runs
//! `default_config` (map version [`shardmap::AWAITING_MAP_VERSION`]): every base
//! fenced (503 `no_shard_map_yet` with `retry-after`), uuid-less requests to the
//! default server. A fresh Envoy never guesses a base's server: a guess could open
//! the base on a second server.
//!
//! Three kinds: the **edge** (replaces SeaTable's dtable-server-proxy), a **sidecar**
//! (next to one client), and a **guard** (in front of one dtable-server, the only way
//! in). A guard routes nothing: its one upstream is the local dtable-server, fixed in
//! the bootstrap (no CDS), and its filter, configured by ECDS under
//! [`guard_resource_name`], passes only requests for bases that server owns.
//!
//! Every Envoy needs its own node id: the control plane counts instances by id, and
//! two Envoys sharing one would be counted as one, so a rollout could proceed while
//! one of them never saw the fence. [`default_node_id`] derives one from the kind and
//! the host name; nothing here invents a shared default.

use std::fmt::Write as _;
use std::path::PathBuf;

use shardmap::{AWAITING_MAP_VERSION, Fence, RouterConfig, ShardMap};

pub use control_plane::config::GUARD_CONNECT_TIMEOUT;
pub use control_plane::config::local_hostname;
use control_plane::config::{DEFAULT_FILTER_NAME, sanitize_hostname, split_host_port};
/// The ECDS resource (and HttpFilter name) of a guard of `server`,
/// `{filter_name}.guard.{server}`: the control plane serves the filter configuration
/// with `guard: server` under this name. One definition, beside the resources.
pub use control_plane::resources::guard_resource_name;
use control_plane::resources::proto_json_duration;

/// Where the Envoy sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Replaces SeaTable's `dtable-server-proxy` on the dtable-web node: listens on
    /// all interfaces where that proxy did.
    Edge,
    /// Next to one client (dtable-db, api-gateway, ...): listens on loopback only.
    Sidecar,
    /// In front of one dtable-server (same host or pod), the only way in: listens
    /// where clients expected that server and passes only requests for the bases it
    /// owns (`421` for another server's base, `503` while fenced).
    Guard {
        /// The guarded server, by its name in the shard map.
        server: String,
    },
}

impl Kind {
    /// `edge`, `sidecar` or `guard`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Edge => "edge",
            Kind::Sidecar => "sidecar",
            Kind::Guard { .. } => "guard",
        }
    }

    /// The guarded server, for a guard.
    pub fn guarded(&self) -> Option<&str> {
        match self {
            Kind::Guard { server } => Some(server),
            _ => None,
        }
    }
}

/// How Envoy reaches the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xds {
    /// ADS over gRPC (`--control-plane` is the gRPC address): ACK/NACK with detail.
    Grpc,
    /// REST-JSON polling (`--control-plane` is the HTTP API address): the fallback
    /// where gRPC cannot pass.
    Rest,
}

/// Where a guard sends what it passes, by default: the dtable-server moved off the
/// port the guard now listens on, to loopback.
pub const DEFAULT_GUARD_UPSTREAM: &str = "127.0.0.1:5001";

/// What a bootstrap is made of.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    /// The node id the control plane tracks this Envoy by: unique per Envoy (see
    /// [`default_node_id`]). Empty is refused.
    pub node_id: String,
    /// The node cluster (a group name shown in `status`).
    pub node_cluster: String,
    /// The control plane's address, `host:port`: ADS (gRPC), or the HTTP API (REST).
    /// Several replicas: their addresses separated by commas (see
    /// [`control_plane_addresses`]); Envoy then holds one stream to one of them and
    /// moves to another when it dies.
    pub control_plane: String,
    pub xds: Xds,
    /// How often a REST poller asks (REST only).
    pub refresh_delay: std::time::Duration,
    /// The listener's port (0: any free port, for tests).
    pub listen_port: u16,
    /// The admin interface's port, on 127.0.0.1 (0: any).
    pub admin_port: u16,
    /// The filter's `.wasm` on this host.
    pub wasm: PathBuf,
    /// The HttpFilter name (= the ECDS resource name of edges and sidecars; a guard's
    /// is [`guard_resource_name`] of it).
    pub filter_name: String,
    /// The routing header the filter sets.
    pub header: String,
    /// Where uuid-less requests go before the first map arrives and when no header is
    /// set (edge and sidecar).
    pub default_server: String,
    /// The guarded dtable-server's own address, `host:port` (guard only): it must be
    /// reachable only through the guard (loopback, or a firewalled port).
    pub upstream: String,
    /// TLS to the control plane; `None`: plain (one host, or a private network).
    pub tls: Option<ControlPlaneTls>,
}

/// How an Envoy reaches the control plane over TLS (`--tls-ca`, `--tls-cert`,
/// `--tls-key`). Paths are files on the Envoy host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneTls {
    /// The CA that signed the control plane's certificate. Envoy also checks that
    /// the certificate names the host of `--control-plane` (DNS name or IP address).
    pub ca: PathBuf,
    /// This Envoy's client certificate and key, for ADS over mutual TLS
    /// (`[listen.tls]`): the certificate's CN should be the node id.
    pub client: Option<(PathBuf, PathBuf)>,
}

impl Options {
    /// The defaults of a kind: the edge and a guard on :5000, a sidecar on
    /// 127.0.0.1:5000; a guard's upstream on [`DEFAULT_GUARD_UPSTREAM`]. The node id is
    /// left empty: each Envoy needs its own (see [`default_node_id`]).
    pub fn new(kind: Kind) -> Options {
        Options {
            node_id: String::new(),
            node_cluster: format!("seashard-{}", kind.as_str()),
            kind,
            control_plane: "seashard-control-plane:18000".into(),
            xds: Xds::Grpc,
            refresh_delay: std::time::Duration::from_secs(1),
            listen_port: 5000,
            admin_port: 9901,
            wasm: "/opt/seashard/base-router.wasm".into(),
            filter_name: DEFAULT_FILTER_NAME.into(),
            header: shardmap::DEFAULT_HEADER.into(),
            default_server: "dtable-server".into(),
            upstream: DEFAULT_GUARD_UPSTREAM.into(),
            tls: None,
        }
    }
}

/// A bootstrap that cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BootstrapError(String);

/// The node id of an Envoy of `kind` on host `hostname`: `edge-<host>`,
/// `sidecar-<host>`, `guard-<server>-<host>`. The host name is lowercased and every
/// character outside `[a-z0-9.-]` becomes `-`; one that leaves nothing is refused.
pub fn default_node_id(kind: &Kind, hostname: &str) -> Result<String, BootstrapError> {
    let host = sanitize_hostname(hostname).ok_or_else(|| {
        BootstrapError(format!(
            "no host name to derive this Envoy's node id from (got `{hostname}`): pass \
             --node-id, unique per Envoy (two Envoys with one id are counted as one, and a \
             rollout could proceed while one of them never saw the fence)"
        ))
    })?;
    Ok(match kind {
        Kind::Guard { server } => format!("guard-{server}-{host}"),
        k => format!("{}-{host}", k.as_str()),
    })
}

/// The control plane addresses in `list`: `HOST:PORT`, several separated by commas
/// (the replicas of one control plane). Refused: none, an empty entry, one that is
/// not `HOST:PORT` (a DNS name, an IPv4 address or a bracketed IPv6 address), and
/// one given twice.
pub fn control_plane_addresses(list: &str) -> Result<Vec<(&str, u16)>, BootstrapError> {
    let mut out: Vec<(&str, u16)> = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(BootstrapError(format!(
                "control plane addresses `{list}`: an empty address (want HOST:PORT, \
                 several separated by commas)"
            )));
        }
        let (host, port) = split_host_port(entry)
            .filter(|(h, _)| valid_host(h))
            .ok_or_else(|| {
                BootstrapError(format!("control plane address `{entry}` is not HOST:PORT"))
            })?;
        if out
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && *p == port)
        {
            return Err(BootstrapError(format!(
                "control plane address `{entry}` is given twice"
            )));
        }
        out.push((host, port));
    }
    Ok(out)
}

/// An IP address, or a DNS name of letters, digits, `-`, `_` and `.`.
fn valid_host(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok()
        || (host.len() <= 253
            && host
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && !host.starts_with(['-', '.'])
            && host.parse::<f64>().is_err())
}

/// The bootstrap YAML.
pub fn render(o: &Options) -> Result<String, BootstrapError> {
    let cps = control_plane_addresses(&o.control_plane)?;
    let several = cps.len() > 1;
    if o.node_id.trim().is_empty() {
        return Err(BootstrapError(
            "the node id is empty: pass --node-id, unique per Envoy (two Envoys with one id \
             are counted as one, and a rollout could proceed while one of them never saw \
             the fence)"
                .into(),
        ));
    }
    let guarded = o.kind.guarded();
    if let Some(server) = guarded {
        shardmap::check_server_name(server)
            .map_err(|e| BootstrapError(format!("the guarded server: {e}")))?;
    } else {
        shardmap::check_server_name(&o.default_server).map_err(BootstrapError)?;
    }
    // The placeholder until the first map: every base fenced. A guard's map gives its
    // own server everything, so uuid-less requests are passed, not refused.
    let default_config = RouterConfig {
        header: o.header.clone(),
        fence: Fence {
            slots: vec!["0-f".into()],
            pins: vec![],
        },
        guard: guarded.map(str::to_owned),
        ..RouterConfig::new(
            AWAITING_MAP_VERSION,
            ShardMap {
                default: guarded.unwrap_or(&o.default_server).to_owned(),
                ..ShardMap::default()
            },
        )
    };
    default_config
        .compile()
        .map_err(|p| BootstrapError(p.to_string()))?;
    let host_type = |host: &str| {
        if host.parse::<std::net::IpAddr>().is_ok() {
            "STATIC"
        } else {
            "STRICT_DNS"
        }
    };
    let cp_type = if cps.iter().all(|(h, _)| host_type(h) == "STATIC") {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let http_filter_name = match guarded {
        Some(server) => guard_resource_name(&o.filter_name, server),
        None => o.filter_name.clone(),
    };
    let (listen_addr, listener_name, intro) = match &o.kind {
        Kind::Edge => (
            "0.0.0.0",
            "dtable_server_proxy",
            "# seashard edge proxy, managed by the control plane (Envoy 1.40).\n\
             #\n\
             # Replaces SeaTable's `dtable-server-proxy` on the dtable-web node: dtable-web\n\
             # (INNER_DTABLE_SERVER), dtable-db, api-gateway and SeaTable's nginx reach\n\
             # dtable-server through it."
                .to_owned(),
        ),
        Kind::Sidecar => (
            "127.0.0.1",
            "dtable_server_proxy",
            "# seashard sidecar proxy, managed by the control plane (Envoy 1.40).\n\
             #\n\
             # Runs next to one client of dtable-server (dtable-db, api-gateway, ...) and\n\
             # listens on loopback only: point the client's dtable-server URL at it."
                .to_owned(),
        ),
        Kind::Guard { server } => (
            "0.0.0.0",
            "dtable_server_guard",
            format!(
                "# seashard guard of {server}, managed by the control plane (Envoy 1.40).\n\
                 #\n\
                 # Stands in front of that one dtable-server, on its host or in its pod, and\n\
                 # listens where its clients (the edges) expect it. It routes nothing: it\n\
                 # passes a request only when {server} owns the base under the newest map\n\
                 # this guard holds, answers 421 for another server's base and 503 while the\n\
                 # base is fenced. Stale or cut-off edges can then never open a base here.\n\
                 # The guard must be the only way in: the dtable-server listens on the\n\
                 # upstream below, on loopback or behind a firewall."
            ),
        ),
    };
    let ads_config = format!(
        "  ads_config:
    api_type: GRPC
    transport_api_version: V3
    # The node is sent once per stream, not with every request.
    set_node_on_first_message_only: true
    grpc_services:
{}",
        if several {
            // Envoy's default backoff grows to 30 s: after all replicas were down, the
            // first one back would wait that long for its Envoys.
            "    - envoy_grpc:
        cluster_name: seashard_control_plane
        # A lost stream is opened again after 0.5 s (jittered), backing off to 5 s
        # while no replica answers.
        retry_policy:
          retry_back_off: { base_interval: 0.5s, max_interval: 5s }
"
        } else {
            "    - envoy_grpc: { cluster_name: seashard_control_plane }
"
        }
    );
    let rest_source = |indent: &str| {
        format!(
            "{indent}resource_api_version: V3
{indent}# REST-JSON polling, where gRPC cannot pass: no NACK detail, a poll every
{indent}# refresh_delay (the control plane answers 304 while nothing changed).
{indent}api_config_source:
{indent}  api_type: REST
{indent}  transport_api_version: V3
{indent}  cluster_names: [seashard_control_plane]
{indent}  refresh_delay: {}
{indent}  request_timeout: 5s
",
            proto_json_duration(o.refresh_delay)
        )
    };
    let failover = if several {
        failover(o.xds)
    } else {
        String::new()
    };
    // HTTP/2 PINGs: the only way a stream to a replica that vanished without a reset
    // (host gone, link cut, process paused) ends. With several replicas, soon: there
    // is another to go to.
    let keepalive = if several {
        "              interval: 5s
              timeout: 3s"
    } else {
        "              interval: 30s
              timeout: 10s"
    };
    let (dynamic, ecds_source, cp_cluster_head) = match o.xds {
        Xds::Grpc => (
            match guarded {
                Some(_) => format!(
                    "dynamic_resources:
{ads_config}  # No CDS: a guard's one upstream is its local dtable-server, fixed below.

"
                ),
                None => format!(
                    "dynamic_resources:
{ads_config}  cds_config:
    ads: {{}}
    resource_api_version: V3

"
                ),
            },
            "                ads: {}
                resource_api_version: V3
"
            .to_owned(),
            format!(
                "  # The control plane (ADS over gRPC: HTTP/2).
  - name: seashard_control_plane
    type: {cp_type}
    connect_timeout: 5s
{failover}    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            connection_keepalive:
{keepalive}
"
            ),
        ),
        Xds::Rest => (
            match guarded {
                Some(_) => String::new(),
                None => format!(
                    "dynamic_resources:\n  cds_config:\n{}\n",
                    rest_source("    ")
                ),
            },
            rest_source("                "),
            format!(
                "  # The control plane (REST xDS over HTTP/1.1, its HTTP API port).
  - name: seashard_control_plane
    type: {cp_type}
    connect_timeout: 5s
{failover}"
            ),
        ),
    };
    let cp_cluster_head = match &o.tls {
        Some(tls) => format!("{cp_cluster_head}{}", transport_socket(tls, &cps, o.xds)),
        None => cp_cluster_head,
    };
    let over = if o.xds == Xds::Rest {
        "by REST polling"
    } else {
        "over one ADS stream"
    };
    let xds_flag = if o.xds == Xds::Rest {
        " --xds rest"
    } else {
        ""
    };
    let header = yaml_str(&o.header);
    let (generated, route_config, local_cluster) = match guarded {
        None => {
            let default = yaml_str(&o.default_server);
            (
                format!(
                    "# Generated by `seactl envoy-bootstrap --kind {kind}{xds_flag}`. The listener and route are
# static; the dtable-server clusters (CDS) and the base-router filter's shard map
# (ECDS) come from `seactl serve` {over}. A new map reaches Envoy
# without draining any connection. Until the first map arrives the filter runs
# `default_config`: every base fenced (503 + retry-after, never a guessed server),
# uuid-less requests to {default}.",
                    kind = o.kind.as_str(),
                ),
                format!(
                    "          route_config:
            name: dtable_servers
            # The clusters arrive by CDS: names in `cluster_header` cannot be
            # checked when the route loads. An unknown name still fails safe (503).
            validate_clusters: false
            virtual_hosts:
            - name: dtable_servers
              domains: [\"*\"]
              routes:
              # The filter's decision; it always overwrites a client-sent value.
              - match:
                  prefix: /
                  headers:
                  - name: {header}
                    present_match: true
                route:
                  cluster_header: {header}
                  timeout: 0s
              # No header (the filter was skipped): the default server.
              - match:
                  prefix: /
                route:
                  cluster: {default}
                  timeout: 0s
"
                ),
                String::new(),
            )
        }
        Some(server) => {
            let (up_host, up_port) = split_host_port(&o.upstream).ok_or_else(|| {
                BootstrapError(format!(
                    "the guarded dtable-server's address `{}` is not HOST:PORT",
                    o.upstream
                ))
            })?;
            if up_port == o.listen_port && is_local_host(up_host) {
                return Err(BootstrapError(format!(
                    "the guard would listen on port {} and forward to {}, itself: move \
                     the dtable-server to another port (--upstream)",
                    o.listen_port, o.upstream
                )));
            }
            (
                format!(
                    "# Generated by `seactl envoy-bootstrap --kind guard --server {server}{xds_flag}`.\n\
                     # The listener, route and upstream are static; the base-router filter's shard\n\
                     # map comes from `seactl serve` {over}, as the ECDS resource\n\
                     # {resource}. Until the first map arrives the filter runs\n\
                     # `default_config`: every base refused (503 + retry-after), uuid-less requests\n\
                     # passed.",
                    resource = yaml_str(&http_filter_name),
                ),
                "          route_config:
            name: local_dtable_server
            virtual_hosts:
            - name: local_dtable_server
              domains: [\"*\"]
              routes:
              # What the filter passes goes to the one dtable-server behind this guard.
              - match:
                  prefix: /
                route:
                  cluster: local_dtable_server
                  timeout: 0s
"
                .to_owned(),
                format!(
                    "  # The guarded dtable-server, reachable only through this guard.
  - name: local_dtable_server
    type: {up_type}
    connect_timeout: {guard_connect}s
    load_assignment:
      cluster_name: local_dtable_server
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {up_host}, port_value: {up_port} }}
",
                    up_type = host_type(up_host),
                    up_host = yaml_str(up_host),
                    guard_connect = GUARD_CONNECT_TIMEOUT.as_secs(),
                ),
            )
        }
    };
    let mut y = String::new();
    let w = &mut y;
    // The text is assembled line by line so that every value is quoted for YAML.
    let _ = writeln!(
        w,
        "{intro}
#
{generated}

node:
  # Unique per Envoy: two Envoys with one id are counted as one, and a rollout
  # could then proceed while one of them never saw the fence. Set by `--node-id`
  # (by default KIND-HOSTNAME); Envoy's own `--service-node` overrides it.
  id: {node_id}
  cluster: {node_cluster}

admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}

{dynamic}static_resources:
  listeners:
  - name: {listener_name}
    address:
      socket_address: {{ address: {listen_addr}, port_value: {listen_port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {listener_name}
          codec_type: AUTO
          # Defence in depth (base-router reads encoded bases on its own): the path is
          # normalized before the filter, the route and the upstream see it (dot
          # segments, percent-encoded unreserved characters such as %2D decoded),
          # slashes merged, and an encoded slash or backslash refused with 400: a
          # redirect to the unescaped path would name other segments than the
          # dtable-server reads in the encoded one.
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          # socket.io's websocket transport.
          upgrade_configs:
          - upgrade_type: websocket
{route_config}          http_filters:
          - name: {http_filter_name}
            # The filter's configuration (the shard map) comes by ECDS{ecds_over}.
            config_discovery:
              config_source:
{ecds_source}              type_urls:
              - type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              # Serve with the default at once instead of waiting for the control
              # plane (without it, requests would get 500 until the first map).
              apply_default_config_without_warming: true
              default_config:
                \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                config:
                  name: {filter_name}
                  root_id: base_router
                  # A VM failure recreates the VM and keeps routing. FAIL_OPEN would
                  # skip the filter: {fail_open}, the data loss
                  # this proxy prevents.
                  failure_policy: FAIL_RELOAD
                  vm_config:
                    vm_id: seashard
                    runtime: envoy.wasm.runtime.v8
                    code:
                      local:
                        filename: {wasm}
                  configuration:
                    \"@type\": type.googleapis.com/google.protobuf.StringValue
                    value: {default_json}
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router

  clusters:
{local_cluster}{cp_cluster_head}    load_assignment:
      cluster_name: seashard_control_plane
      endpoints:
      - lb_endpoints:{cp_endpoints}",
        ecds_over = if o.xds == Xds::Rest { " (REST polling)" } else { " over ADS" },
        fail_open = if guarded.is_some() {
            "every base passed unchecked"
        } else {
            "every base to the default server"
        },
        node_id = yaml_str(&o.node_id),
        node_cluster = yaml_str(&o.node_cluster),
        admin_port = o.admin_port,
        listen_port = o.listen_port,
        http_filter_name = yaml_str(&http_filter_name),
        filter_name = yaml_str(&o.filter_name),
        wasm = yaml_str(&o.wasm.to_string_lossy()),
        default_json = yaml_str(&default_config.to_json()),
        cp_endpoints = cps
            .iter()
            .map(|(host, port)| format!(
                "
        - endpoint:
            address:
              socket_address: {{ address: {}, port_value: {port} }}",
                yaml_str(host)
            ))
            .collect::<String>(),
    );
    Ok(y)
}

/// How an Envoy given several control plane replicas keeps to live ones (the part of
/// the control plane cluster after `connect_timeout`).
///
/// Envoy opens its one ADS stream (or each REST poll) to a host the cluster's load
/// balancer picks (round robin here), and keeps every resource it has while no stream
/// is up. A replica can go in two ways:
///
/// - killed or stopped: its kernel resets the connection, the stream ends at once and
///   Envoy opens another after its backoff (0.5 s, see `retry_policy`);
/// - gone without a reset (host down, link cut, process paused): only HTTP/2
///   keepalive ends the stream, so with several replicas it pings every 5 s and gives
///   up after 3 s without an answer (one PING frame per Envoy every 5 s).
///
/// Either way the new stream must not go to the dead replica (tried: without more,
/// Envoy picked a killed one again and again for up to 7 s), so:
///
/// - outlier detection ejects a replica at its first local failure (connection
///   refused or reset, timeout), for 2 s, doubling with each ejection up to 10 s; a
///   passed health check takes it back at once;
/// - active health checks catch what carries no traffic: an HTTP request every 3 s to
///   each replica on a kept-alive connection (a request, not a connection, per check:
///   about 330 requests per second per replica for 1 000 Envoys); any answer below
///   500 proves the process serves (the gRPC port answers `/healthz` with `200` and
///   `grpc-status: 12`, the HTTP API with `200`); two without an answer within 1 s
///   mark it unhealthy, within about 7 s;
/// - `healthy_panic_threshold: 0` keeps an unhealthy or ejected replica out even when
///   most are (by default, with under half healthy, Envoy picks among all).
///
/// Not used: `close_connections_on_host_health_failure` only drains an HTTP/2
/// connection (GOAWAY, then waits for its streams), and the ADS stream never ends by
/// itself (tried: the stream stayed on a blackholed replica).
fn failover(xds: Xds) -> String {
    let codec = match xds {
        Xds::Grpc => "HTTP2",
        Xds::Rest => "HTTP1",
    };
    format!(
        "    # Several replicas: the stream goes to one of them (round robin); Envoy keeps
    # its config while it has none. A replica is not picked for a new stream after
    # a connection to it failed (ejected for 2 s, then longer), nor while it does
    # not answer /healthz (about 7 s; any answer below 500 is alive).
    common_lb_config:
      healthy_panic_threshold: {{ value: 0 }}
    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 1
      enforcing_consecutive_local_origin_failure: 100
      enforcing_consecutive_5xx: 0
      enforcing_success_rate: 0
      enforcing_local_origin_success_rate: 0
      base_ejection_time: 2s
      max_ejection_time: 10s
      max_ejection_percent: 100
    health_checks:
    - timeout: 1s
      interval: 3s
      interval_jitter: 0.3s
      no_traffic_interval: 3s
      unhealthy_threshold: 2
      healthy_threshold: 1
      http_health_check:
        path: /healthz
        codec_client_type: {codec}
        expected_statuses: [{{ start: 200, end: 500 }}]
"
    )
}

/// The control plane cluster's `transport_socket`: TLS, the server's certificate
/// checked against the CA and the host's name or address, and (mutual TLS) this
/// Envoy's certificate.
fn transport_socket(tls: &ControlPlaneTls, cps: &[(&str, u16)], xds: Xds) -> String {
    let file = |p: &PathBuf| yaml_str(&p.to_string_lossy());
    let mut hosts: Vec<&str> = Vec::new();
    for (h, _) in cps {
        if !hosts.iter().any(|x| x.eq_ignore_ascii_case(h)) {
            hosts.push(h);
        }
    }
    let names = hosts.join(" or ");
    let is_ip = |h: &str| h.parse::<std::net::IpAddr>().is_ok();
    let (alpn, protocol) = match xds {
        Xds::Grpc => ("h2", "gRPC needs HTTP/2"),
        Xds::Rest => ("http/1.1", "REST polls over HTTP/1.1"),
    };
    let mut y = format!(
        "    # TLS to the control plane: its certificate must be signed by trusted_ca and
    # name {names}{client_note}.
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
",
        client_note = if tls.client.is_some() {
            "; this Envoy shows its own (mutual TLS: `[listen.tls]`)"
        } else {
            ""
        },
    );
    // One SNI for the whole cluster: the name, when there is one. Several names
    // send none (the control plane serves one certificate whatever the SNI).
    if let [host] = hosts[..]
        && !is_ip(host)
    {
        let _ = writeln!(y, "        sni: {}", yaml_str(host));
    }
    let _ = writeln!(
        y,
        "        common_tls_context:
          alpn_protocols: [{alpn}]    # {protocol}"
    );
    if let Some((cert, key)) = &tls.client {
        let _ = writeln!(
            y,
            "          tls_certificates:
          - certificate_chain: {{ filename: {} }}
            private_key: {{ filename: {} }}",
            file(cert),
            file(key)
        );
    }
    let _ = write!(
        y,
        "          validation_context:
            trusted_ca: {{ filename: {} }}
            match_typed_subject_alt_names:",
        file(&tls.ca),
    );
    // Any one matching is enough: every replica is the control plane.
    for host in hosts {
        let _ = write!(
            y,
            "
            - san_type: {}
              matcher: {{ exact: {} }}",
            if is_ip(host) { "IP_ADDRESS" } else { "DNS" },
            yaml_str(host)
        );
    }
    y.push('\n');
    y
}

/// True for a name or address of this host itself.
fn is_local_host(host: &str) -> bool {
    host == "localhost"
        || host == "0.0.0.0"
        || host == "::"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A YAML scalar: plain when unambiguous, else double-quoted (JSON escaping is valid YAML).
fn yaml_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'/'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "~"
        )
        && s.parse::<f64>().is_err();
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(kind: Kind) -> Options {
        Options {
            node_id: format!("{}-1", kind.as_str()),
            ..Options::new(kind)
        }
    }

    fn guard(server: &str) -> Kind {
        Kind::Guard {
            server: server.into(),
        }
    }

    /// The `default_config`'s plugin configuration of a rendered bootstrap.
    fn default_config(yaml: &str) -> RouterConfig {
        let line = yaml
            .lines()
            .find(|l| l.trim_start().starts_with("value: "))
            .unwrap();
        let quoted = line.trim_start().trim_start_matches("value: ");
        let json: String = serde_json::from_str(quoted).unwrap();
        RouterConfig::from_json(&json).unwrap()
    }

    /// Asserts that `yaml` holds every one of `needles`.
    fn contains_all(yaml: &str, needles: &[&str]) {
        for n in needles {
            assert!(yaml.contains(n), "no `{n}` in\n{yaml}");
        }
    }

    #[test]
    fn renders_both_kinds() {
        let edge = render(&options(Kind::Edge)).unwrap();
        contains_all(
            &edge,
            &[
                "address: 0.0.0.0, port_value: 5000",
                "set_node_on_first_message_only: true",
                "apply_default_config_without_warming: true",
                "failure_policy: FAIL_RELOAD",
                "validate_clusters: false",
                "type: STRICT_DNS",
                "cds_config:",
                "  id: edge-1\n",
            ],
        );
        let side = render(&Options {
            control_plane: "127.0.0.1:18000".into(),
            ..options(Kind::Sidecar)
        })
        .unwrap();
        assert!(side.contains("address: 127.0.0.1, port_value: 5000"));
        assert!(side.contains("type: STATIC"));
    }

    #[test]
    fn the_default_config_is_a_valid_router_config() {
        let y = render(&options(Kind::Edge)).unwrap();
        let rc = default_config(&y);
        assert_eq!(rc.map.default, "dtable-server");
        assert_eq!(rc.version, AWAITING_MAP_VERSION);
        assert_eq!(rc.guard, None);
        let router = rc.compile().unwrap();
        let base = shardmap::BaseUuid::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert!(
            router.is_fenced(&base),
            "a fresh Envoy must not guess a base's server"
        );
        assert_eq!(router.decide("/ping/").server, "dtable-server");
    }

    #[test]
    fn renders_a_guard() {
        let y = render(&options(guard("dtable-server-2"))).unwrap();
        // Its filter subscribes to the guard's resource, and nothing else is dynamic.
        assert!(
            y.contains("  - name: seashard.base_router.guard.dtable-server-2\n"),
            "{y}"
        );
        assert_eq!(
            guard_resource_name(DEFAULT_FILTER_NAME, "dtable-server-2"),
            "seashard.base_router.guard.dtable-server-2"
        );
        assert!(
            y.contains("name: seashard.base_router\n"),
            "the plugin's name"
        );
        assert!(!y.contains("cds_config"), "{y}");
        assert!(!y.contains("cluster_header"), "{y}");
        contains_all(
            &y,
            &[
                "ads_config:",
                "address: 0.0.0.0, port_value: 5000",
                "cluster: local_dtable_server",
                "address: 127.0.0.1, port_value: 5001",
                "upgrade_type: websocket",
                "cluster: seashard-guard\n",
            ],
        );
        let rc = default_config(&y);
        assert_eq!(rc.guard.as_deref(), Some("dtable-server-2"));
        assert_eq!(rc.version, AWAITING_MAP_VERSION);
        assert_eq!(rc.map.default, "dtable-server-2");
        let gate = rc.compile_gate().unwrap();
        assert!(matches!(
            gate.verdict("/api/v1/dtables/0123456789abcdef0123456789abcdef/"),
            shardmap::Verdict::Refuse(r) if r.kind == shardmap::RefusalKind::AwaitingMap
        ));
        assert_eq!(
            gate.verdict("/ping/"),
            shardmap::Verdict::Pass { base: None }
        );

        // REST: no dynamic_resources at all, the ECDS source polls.
        let rest = render(&Options {
            xds: Xds::Rest,
            upstream: "dtable-server-2.local:5000".into(),
            listen_port: 8080,
            ..options(guard("dtable-server-2"))
        })
        .unwrap();
        assert!(!rest.contains("dynamic_resources"), "{rest}");
        assert!(rest.contains("api_type: REST"));
        assert!(rest.contains("address: dtable-server-2.local, port_value: 5000"));
    }

    #[test]
    fn a_guard_needs_a_valid_server_and_upstream() {
        assert!(render(&options(guard("two words"))).is_err());
        assert!(render(&options(guard(""))).is_err());
        let bad = Options {
            upstream: "nowhere".into(),
            ..options(guard("s"))
        };
        assert!(render(&bad).is_err());
        // Forwarding to itself.
        let err = render(&Options {
            upstream: "127.0.0.1:5000".into(),
            ..options(guard("s"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("itself"), "{err}");
    }

    #[test]
    fn refuses_bad_options() {
        let bad = Options {
            control_plane: "nowhere".into(),
            ..options(Kind::Edge)
        };
        assert!(render(&bad).is_err());
        let bad = Options {
            default_server: "not a name".into(),
            ..options(Kind::Edge)
        };
        assert!(render(&bad).is_err());
    }

    #[test]
    fn no_default_node_id_is_invented() {
        let err = render(&Options::new(Kind::Edge)).unwrap_err();
        assert!(err.to_string().contains("--node-id"), "{err}");
    }

    #[test]
    fn node_ids_from_the_host_name() {
        assert_eq!(default_node_id(&Kind::Edge, "web-1").unwrap(), "edge-web-1");
        assert_eq!(
            default_node_id(&Kind::Sidecar, " Db_Host.Example.COM\n").unwrap(),
            "sidecar-db-host.example.com"
        );
        assert_eq!(
            default_node_id(&guard("dtable-server-2"), "node7").unwrap(),
            "guard-dtable-server-2-node7"
        );
        for nothing in ["", "  ", "___", "-.-"] {
            let err = default_node_id(&Kind::Edge, nothing).unwrap_err();
            assert!(err.to_string().contains("--node-id"), "{err}");
        }
        assert_eq!(
            sanitize_hostname(&"a".repeat(100)).map(|h| h.len()),
            Some(63)
        );
    }

    #[test]
    fn tls_to_the_control_plane() {
        let plain = render(&options(Kind::Edge)).unwrap();
        assert!(!plain.contains("transport_socket"));
        let tls = ControlPlaneTls {
            ca: "/etc/seashard/tls/ca.crt".into(),
            client: Some((
                "/etc/seashard/tls/edge-1.crt".into(),
                "/etc/seashard/tls/edge-1 key.pem".into(),
            )),
        };
        let y = render(&Options {
            control_plane: "cp.example:18000".into(),
            tls: Some(tls.clone()),
            ..options(Kind::Edge)
        })
        .unwrap();
        for line in [
            "    transport_socket:\n",
            "        \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n",
            "        sni: cp.example\n",
            "          alpn_protocols: [h2]",
            "          - certificate_chain: { filename: /etc/seashard/tls/edge-1.crt }\n",
            "            private_key: { filename: \"/etc/seashard/tls/edge-1 key.pem\" }\n",
            "            trusted_ca: { filename: /etc/seashard/tls/ca.crt }\n",
            "            - san_type: DNS\n              matcher: { exact: cp.example }\n",
        ] {
            assert!(y.contains(line), "{line:?} not in\n{y}");
        }
        // On the control plane's cluster, before its endpoints.
        let at = |s: &str| y.find(s).unwrap();
        assert!(at("- name: seashard_control_plane") < at("transport_socket:"));
        assert!(
            at("transport_socket:")
                < at("load_assignment:\n      cluster_name: seashard_control_plane")
        );

        // An address: no SNI, the address checked; REST speaks HTTP/1.1; no client
        // certificate given, none shown.
        let y = render(&Options {
            control_plane: "10.0.0.5:18080".into(),
            xds: Xds::Rest,
            tls: Some(ControlPlaneTls {
                client: None,
                ..tls
            }),
            ..options(Kind::Sidecar)
        })
        .unwrap();
        assert!(!y.contains("sni:"), "{y}");
        assert!(!y.contains("tls_certificates"), "{y}");
        assert!(y.contains("alpn_protocols: [http/1.1]"), "{y}");
        assert!(y.contains("san_type: IP_ADDRESS"), "{y}");
        assert!(y.contains("matcher: { exact: 10.0.0.5 }"), "{y}");
    }

    #[test]
    fn several_control_planes() {
        // One address: no health checks, Envoy's default backoff (as before).
        let one = render(&options(Kind::Edge)).unwrap();
        assert!(!one.contains("health_checks"), "{one}");
        assert!(!one.contains("retry_policy"), "{one}");
        assert!(one.contains("              interval: 30s\n"), "{one}");
        for kind in [Kind::Edge, Kind::Sidecar, guard("dtable-server-2")] {
            for xds in [Xds::Grpc, Xds::Rest] {
                let y = render(&Options {
                    control_plane: "10.0.0.1:18000, 10.0.0.2:18000,cp-3.example:18001".into(),
                    xds,
                    ..options(kind.clone())
                })
                .unwrap();
                for line in [
                    "    type: STRICT_DNS\n",
                    "              socket_address: { address: 10.0.0.1, port_value: 18000 }\n",
                    "              socket_address: { address: 10.0.0.2, port_value: 18000 }\n",
                    "              socket_address: { address: cp-3.example, port_value: 18001 }",
                    "      healthy_panic_threshold: { value: 0 }\n",
                    "      consecutive_local_origin_failure: 1\n",
                    "        path: /healthz\n",
                ] {
                    assert!(y.contains(line), "{kind:?} {xds:?}: {line:?} not in\n{y}");
                }
                let codec = if xds == Xds::Grpc { "HTTP2" } else { "HTTP1" };
                assert!(y.contains(&format!("codec_client_type: {codec}\n")), "{y}");
                assert_eq!(y.contains("retry_back_off"), xds == Xds::Grpc, "{y}");
                // Keepalive ends a stream to a replica gone without a reset, soon.
                assert_eq!(
                    y.contains("              interval: 5s\n              timeout: 3s\n"),
                    xds == Xds::Grpc,
                    "{y}"
                );
                // The health checks are on the control plane's cluster only.
                let at = |s: &str| y.find(s).unwrap();
                assert!(at("- name: seashard_control_plane") < at("health_checks:"));
                assert_eq!(y.matches("health_checks:").count(), 1);
            }
        }
        let ips = render(&Options {
            control_plane: "127.0.0.1:1,127.0.0.1:2".into(),
            ..options(Kind::Edge)
        })
        .unwrap();
        assert!(ips.contains("    type: STATIC\n"), "{ips}");
        for bad in ["", "a:1,", "a:1,a:1", "a:1,b", "a:1,b c:2", "a:1;b:2"] {
            let o = Options {
                control_plane: bad.into(),
                ..options(Kind::Edge)
            };
            assert!(render(&o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tls_to_several_control_planes() {
        let tls = ControlPlaneTls {
            ca: "/ca.crt".into(),
            client: None,
        };
        let y = render(&Options {
            control_plane:
                "cp-1.example:18000,cp-2.example:18000,10.0.0.3:18000,cp-1.example:18001".into(),
            tls: Some(tls.clone()),
            ..options(Kind::Edge)
        })
        .unwrap();
        // Any replica's name is accepted; no SNI, as there is no one name.
        assert!(!y.contains("sni:"), "{y}");
        for line in [
            "            - san_type: DNS\n              matcher: { exact: cp-1.example }\n",
            "            - san_type: DNS\n              matcher: { exact: cp-2.example }\n",
            "            - san_type: IP_ADDRESS\n              matcher: { exact: 10.0.0.3 }\n",
        ] {
            assert!(y.contains(line), "{line:?} not in\n{y}");
        }
        assert_eq!(y.matches("san_type").count(), 3, "{y}");
        // One name on several ports: its SNI, as with one address.
        let y = render(&Options {
            control_plane: "cp.example:18000,cp.example:18001".into(),
            tls: Some(tls),
            ..options(Kind::Edge)
        })
        .unwrap();
        assert!(y.contains("        sni: cp.example\n"), "{y}");
    }

    #[test]
    fn yaml_quoting() {
        assert_eq!(yaml_str("dtable-server"), "dtable-server");
        assert_eq!(yaml_str("true"), "\"true\"");
        assert_eq!(yaml_str("123"), "\"123\"");
        assert_eq!(yaml_str("a b"), "\"a b\"");
    }
}
