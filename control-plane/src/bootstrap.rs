//! Envoy bootstraps managed by the control plane (`seactl envoy-bootstrap`).
//!
//! The listener and route are static; the clusters (CDS) and the base-router
//! filter's configuration (ECDS) come over one ADS stream (or, where gRPC cannot
//! pass, by REST-JSON polling). Until the first ECDS answer, the filter runs
//! `default_config`: every base fenced (503 with `retry-after`), uuid-less requests
//! to the default server. A fresh Envoy never guesses a base's server: a guess could
//! open the base on a second server.

use std::fmt::Write as _;
use std::path::PathBuf;

use shardmap::{Fence, RouterConfig, ShardMap};

use crate::config::{DEFAULT_FILTER_NAME, split_host_port};
use crate::resources::proto_json_duration;

/// Where the Envoy sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Replaces SeaTable's `dtable-server-proxy` on the dtable-web node: listens on
    /// all interfaces where that proxy did.
    Edge,
    /// Next to one client (dtable-db, api-gateway, ...): listens on loopback only.
    Sidecar,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Edge => "edge",
            Kind::Sidecar => "sidecar",
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

/// What a bootstrap is made of.
#[derive(Debug, Clone)]
pub struct Options {
    pub kind: Kind,
    /// The node id the control plane tracks this Envoy by: unique per Envoy.
    pub node_id: String,
    /// The node cluster (a group name shown in `status`).
    pub node_cluster: String,
    /// The control plane's address, `host:port`: ADS (gRPC), or the HTTP API (REST).
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
    /// The HttpFilter name (= the ECDS resource name).
    pub filter_name: String,
    /// The routing header the filter sets.
    pub header: String,
    /// Where requests go before the first map arrives and when no header is set.
    pub default_server: String,
}

impl Options {
    /// The defaults of a kind: the edge on :5000, a sidecar on 127.0.0.1:5000.
    pub fn new(kind: Kind) -> Options {
        Options {
            kind,
            node_id: format!("{}-1", kind.as_str()),
            node_cluster: format!("seashard-{}", kind.as_str()),
            control_plane: "seashard-control-plane:18000".into(),
            xds: Xds::Grpc,
            refresh_delay: std::time::Duration::from_secs(1),
            listen_port: 5000,
            admin_port: 9901,
            wasm: "/opt/seashard/base-router.wasm".into(),
            filter_name: DEFAULT_FILTER_NAME.into(),
            header: shardmap::DEFAULT_HEADER.into(),
            default_server: "dtable-server".into(),
        }
    }
}

/// A bootstrap that cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BootstrapError(String);

/// The bootstrap YAML.
pub fn render(o: &Options) -> Result<String, BootstrapError> {
    let (cp_host, cp_port) = split_host_port(&o.control_plane).ok_or_else(|| {
        BootstrapError(format!(
            "control plane address `{}` is not HOST:PORT",
            o.control_plane
        ))
    })?;
    if o.node_id.is_empty() {
        return Err(BootstrapError("the node id is empty".into()));
    }
    shardmap::check_server_name(&o.default_server).map_err(BootstrapError)?;
    let default_config = RouterConfig {
        header: o.header.clone(),
        fence: Fence {
            slots: vec!["0-f".into()],
            pins: vec![],
        },
        ..RouterConfig::new(
            0,
            ShardMap {
                default: o.default_server.clone(),
                ..ShardMap::default()
            },
        )
    };
    default_config
        .compile()
        .map_err(|p| BootstrapError(p.to_string()))?;
    let cp_type = if cp_host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    };
    let (listen_addr, intro) = match o.kind {
        Kind::Edge => (
            "0.0.0.0",
            "# seashard edge proxy, managed by the control plane (Envoy 1.40).\n\
             #\n\
             # Replaces SeaTable's `dtable-server-proxy` on the dtable-web node: dtable-web\n\
             # (INNER_DTABLE_SERVER), dtable-db, api-gateway and SeaTable's nginx reach\n\
             # dtable-server through it.",
        ),
        Kind::Sidecar => (
            "127.0.0.1",
            "# seashard sidecar proxy, managed by the control plane (Envoy 1.40).\n\
             #\n\
             # Runs next to one client of dtable-server (dtable-db, api-gateway, ...) and\n\
             # listens on loopback only: point the client's dtable-server URL at it.",
        ),
    };
    let (dynamic, ecds_source, cp_cluster_head) = match o.xds {
        Xds::Grpc => (
            "dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    # The node is sent once per stream, not with every request.
    set_node_on_first_message_only: true
    grpc_services:
    - envoy_grpc: { cluster_name: seashard_control_plane }
  cds_config:
    ads: {}
    resource_api_version: V3
"
            .to_owned(),
            "                ads: {}
                resource_api_version: V3
"
            .to_owned(),
            format!(
                "  # The control plane (ADS over gRPC: HTTP/2).
  - name: seashard_control_plane
    type: {cp_type}
    connect_timeout: 5s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            connection_keepalive:
              interval: 30s
              timeout: 10s
"
            ),
        ),
        Xds::Rest => {
            let source = |indent: &str| {
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
            (
                format!("dynamic_resources:\n  cds_config:\n{}", source("    ")),
                source("                "),
                format!(
                    "  # The control plane (REST xDS over HTTP/1.1, its HTTP API port).
  - name: seashard_control_plane
    type: {cp_type}
    connect_timeout: 5s
"
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
# Generated by `seactl envoy-bootstrap --kind {kind}{xds_flag}`. The listener and route are
# static; the dtable-server clusters (CDS) and the base-router filter's shard map
# (ECDS) come from `seactl serve` {over}. A new map reaches Envoy
# without draining any connection. Until the first map arrives the filter runs
# `default_config`: every base fenced (503 + retry-after, never a guessed server),
# uuid-less requests to {default}.

node:
  id: {node_id}
  cluster: {node_cluster}

admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }}

{dynamic}
static_resources:
  listeners:
  - name: dtable_server_proxy
    address:
      socket_address: {{ address: {listen_addr}, port_value: {listen_port} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dtable_server_proxy
          codec_type: AUTO
          # socket.io's websocket transport.
          upgrade_configs:
          - upgrade_type: websocket
          route_config:
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
          http_filters:
          - name: {filter_name}
            # The filter's configuration (the shard map) comes by ECDS over ADS.
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
                  # skip the filter: every base to the default server, the data loss
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
{cp_cluster_head}    load_assignment:
      cluster_name: seashard_control_plane
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: {cp_host}, port_value: {cp_port} }}",
        dynamic = dynamic,
        xds_flag = if o.xds == Xds::Rest { " --xds rest" } else { "" },
        over = if o.xds == Xds::Rest { "by REST polling" } else { "over one ADS stream" },
        ecds_source = ecds_source,
        cp_cluster_head = cp_cluster_head,
        kind = o.kind.as_str(),
        default = yaml_str(&o.default_server),
        node_id = yaml_str(&o.node_id),
        node_cluster = yaml_str(&o.node_cluster),
        admin_port = o.admin_port,
        listen_port = o.listen_port,
        header = yaml_str(&o.header),
        filter_name = yaml_str(&o.filter_name),
        wasm = yaml_str(&o.wasm.to_string_lossy()),
        default_json = yaml_str(&default_config.to_json()),
        cp_host = yaml_str(cp_host),
    );
    Ok(y)
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

    #[test]
    fn renders_both_kinds() {
        let edge = render(&Options::new(Kind::Edge)).unwrap();
        assert!(edge.contains("address: 0.0.0.0, port_value: 5000"));
        assert!(edge.contains("set_node_on_first_message_only: true"));
        assert!(edge.contains("apply_default_config_without_warming: true"));
        assert!(edge.contains("failure_policy: FAIL_RELOAD"));
        assert!(edge.contains("validate_clusters: false"));
        assert!(edge.contains("type: STRICT_DNS"));
        let side = render(&Options {
            control_plane: "127.0.0.1:18000".into(),
            ..Options::new(Kind::Sidecar)
        })
        .unwrap();
        assert!(side.contains("address: 127.0.0.1, port_value: 5000"));
        assert!(side.contains("type: STATIC"));
    }

    #[test]
    fn the_default_config_is_a_valid_router_config() {
        let y = render(&Options::new(Kind::Edge)).unwrap();
        let line = y
            .lines()
            .find(|l| l.trim_start().starts_with("value: "))
            .unwrap();
        let quoted = line.trim_start().trim_start_matches("value: ");
        let json: String = serde_json::from_str(quoted).unwrap();
        let rc = RouterConfig::from_json(&json).unwrap();
        assert_eq!(rc.map.default, "dtable-server");
        let router = rc.compile().unwrap();
        let base = shardmap::BaseUuid::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert!(
            router.is_fenced(&base),
            "a fresh Envoy must not guess a base's server"
        );
        assert_eq!(router.decide("/ping/").server, "dtable-server");
    }

    #[test]
    fn refuses_bad_options() {
        let bad = Options {
            control_plane: "nowhere".into(),
            ..Options::new(Kind::Edge)
        };
        assert!(render(&bad).is_err());
        let bad = Options {
            default_server: "not a name".into(),
            ..Options::new(Kind::Edge)
        };
        assert!(render(&bad).is_err());
    }

    #[test]
    fn yaml_quoting() {
        assert_eq!(yaml_str("dtable-server"), "dtable-server");
        assert_eq!(yaml_str("true"), "\"true\"");
        assert_eq!(yaml_str("123"), "\"123\"");
        assert_eq!(yaml_str("a b"), "\"a b\"");
    }
}
