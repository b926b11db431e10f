//! What the Envoys are sent: the ECDS resource of the base-router filter (its plugin
//! configuration is the shard map) and one CDS cluster per dtable-server, each as
//! protobuf (gRPC ADS) and as proto3 JSON (REST xDS), built from the same inputs.
//!
//! A resource set's version string names its content: the ECDS version is
//! `"{map version, 20 digits}-{hash}"` ([`ecds_version`]), so the same map with
//! other filter settings (a new wasm path) is a new version, and content a node
//! NACKed is never offered under a version it already answered. Map versions are
//! totally ordered (fence and rollback maps are new, higher versions) and the
//! string says so: zero-padded, they order as strings, and [`ecds_map_version`] is
//! the one reader of the map version out of a version an Envoy reports.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AsyncDataSource, DataSource, SocketAddress, TypedExtensionConfig, address,
    async_data_source, data_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm;
use envoy_types::pb::envoy::extensions::wasm::v3::{
    FailurePolicy, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, StringValue};
use envoy_types::util::pack_any;
use prost::Message;
use serde::Serialize;
use serde_json::{Value, json};
use shardmap::RouterConfig;

use crate::config::{FilterConfig, ServerConfig};

/// Type URL of ECDS resources.
pub const ECDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
/// Type URL of CDS resources.
pub const CDS_TYPE_URL: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// The resource types the control plane serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceType {
    /// The filter's configuration (the map).
    Ecds,
    /// The dtable-server clusters.
    Cds,
}

impl ResourceType {
    /// Both, in the order Envoy needs them (clusters first).
    pub const ALL: [ResourceType; 2] = [ResourceType::Cds, ResourceType::Ecds];

    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Ecds => ECDS_TYPE_URL,
            ResourceType::Cds => CDS_TYPE_URL,
        }
    }

    pub fn from_type_url(url: &str) -> Option<ResourceType> {
        match url {
            ECDS_TYPE_URL => Some(ResourceType::Ecds),
            CDS_TYPE_URL => Some(ResourceType::Cds),
            _ => None,
        }
    }

    /// `ecds` or `cds`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Ecds => "ecds",
            ResourceType::Cds => "cds",
        }
    }

    pub fn parse(s: &str) -> Option<ResourceType> {
        match s {
            "ecds" => Some(ResourceType::Ecds),
            "cds" => Some(ResourceType::Cds),
            _ => None,
        }
    }
}

/// One named resource in both encodings.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub any: Any,
    pub json: Value,
}

/// Every resource of one type, and the version naming them all.
#[derive(Debug, Clone)]
pub struct ResourceSet {
    pub version: String,
    pub resources: Vec<Resource>,
}

impl ResourceSet {
    /// The resources among `names` (all of them when `names` is empty: a wildcard).
    pub fn select(&self, names: &[String]) -> Vec<&Resource> {
        self.resources
            .iter()
            .filter(|r| names.is_empty() || names.contains(&r.name))
            .collect()
    }
}

/// Everything served at one moment: what every Envoy must converge to.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The stored version the ECDS resource carries.
    pub map_version: u64,
    pub ecds: ResourceSet,
    pub cds: ResourceSet,
}

impl Snapshot {
    /// The snapshot of `config` run by the filter as `filter` says, with `servers`.
    pub fn build(
        config: &RouterConfig,
        filter: &FilterConfig,
        servers: &[ServerConfig],
    ) -> Arc<Snapshot> {
        // The edges' configuration, then one per server for its guards: the same map
        // and fence, with `guard` naming the server.
        let mut resources = vec![ecds_resource(config, filter, &filter.name)];
        for s in servers {
            let guard = RouterConfig {
                guard: Some(s.name.clone()),
                ..config.clone()
            };
            resources.push(ecds_resource(
                &guard,
                filter,
                &guard_resource_name(&filter.name, &s.name),
            ));
        }
        let mut bytes = Vec::new();
        for r in &resources {
            bytes.extend_from_slice(&r.any.value);
        }
        let ecds = ResourceSet {
            version: ecds_version(config.version, fnv1a(&bytes) as u32),
            resources,
        };
        let clusters: Vec<Resource> = servers.iter().map(cluster_resource).collect();
        let mut bytes = Vec::new();
        for c in &clusters {
            bytes.extend_from_slice(&c.any.value);
        }
        let cds = ResourceSet {
            version: format!("{:016x}", fnv1a(&bytes)),
            resources: clusters,
        };
        Arc::new(Snapshot {
            map_version: config.version,
            ecds,
            cds,
        })
    }

    /// The resources of type `t`.
    pub fn get(&self, t: ResourceType) -> &ResourceSet {
        match t {
            ResourceType::Ecds => &self.ecds,
            ResourceType::Cds => &self.cds,
        }
    }
}

/// The ECDS version string of map `map_version` with content hash `hash`: the map
/// version zero-padded to 20 digits (every `u64`), so versions order as strings do.
pub fn ecds_version(map_version: u64, hash: u32) -> String {
    format!("{map_version:020}-{hash:08x}")
}

/// The map version an ECDS version string carries: the decimal digits before its
/// first `-` (20 of them as written now, fewer from an older seashard). `None` for
/// anything else: empty (an Envoy that runs nothing yet) or not a version of ours.
pub fn ecds_map_version(version: &str) -> Option<u64> {
    let (digits, _) = version.split_once('-')?;
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The ECDS resource a guard of `server` subscribes to.
pub fn guard_resource_name(filter_name: &str, server: &str) -> String {
    format!("{filter_name}.guard.{server}")
}

/// The base-router `TypedExtensionConfig` named `name`: the `Wasm` filter whose plugin
/// configuration is `config` as JSON in a `StringValue`, `FAIL_RELOAD`, its code from
/// a local file.
pub fn ecds_resource(config: &RouterConfig, filter: &FilterConfig, name: &str) -> Resource {
    let json_config = config.to_json();
    let wasm_path = filter.wasm.to_string_lossy().into_owned();
    let wasm = Wasm {
        config: Some(PluginConfig {
            name: filter.name.clone(),
            root_id: filter.root_id.clone(),
            configuration: Some(pack_any(StringValue {
                value: json_config.clone(),
            })),
            failure_policy: FailurePolicy::FailReload as i32,
            vm: Some(plugin_config::Vm::VmConfig(VmConfig {
                vm_id: filter.vm_id.clone(),
                runtime: filter.runtime.clone(),
                code: Some(AsyncDataSource {
                    specifier: Some(async_data_source::Specifier::Local(DataSource {
                        specifier: Some(data_source::Specifier::Filename(wasm_path.clone())),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            })),
            ..Default::default()
        }),
    };
    let typed = TypedExtensionConfig {
        name: name.to_owned(),
        typed_config: Some(pack_any(wasm)),
    };
    let json = json!({
        "@type": ECDS_TYPE_URL,
        "name": name,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": filter.name,
                "root_id": filter.root_id,
                "vm_config": {
                    "vm_id": filter.vm_id,
                    "runtime": filter.runtime,
                    "code": { "local": { "filename": wasm_path } },
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": json_config,
                },
                "failure_policy": "FAIL_RELOAD",
            },
        },
    });
    Resource {
        name: name.to_owned(),
        any: pack_any(typed),
        json,
    }
}

/// The cluster of one dtable-server: STATIC for an IP address, STRICT_DNS for a name.
pub fn cluster_resource(server: &ServerConfig) -> Resource {
    let (host, port) = server.host_port();
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let kind = if is_ip {
        cluster::DiscoveryType::Static
    } else {
        cluster::DiscoveryType::StrictDns
    };
    let c = Cluster {
        name: server.name.clone(),
        connect_timeout: Some(pb_duration(server.connect_timeout)),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(kind as i32)),
        dns_lookup_family: cluster::DnsLookupFamily::V4Preferred as i32,
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: server.name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: host.to_owned(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    u32::from(port),
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let json = json!({
        "@type": CDS_TYPE_URL,
        "name": server.name,
        "type": if is_ip { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": proto_json_duration(server.connect_timeout),
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": server.name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port }
            } } }] }],
        },
    });
    Resource {
        name: server.name.clone(),
        any: pack_any(c),
        json,
    }
}

/// A `google.protobuf.Duration` in proto3 JSON: seconds, with up to 9 decimals.
pub fn proto_json_duration(d: Duration) -> String {
    match d.subsec_nanos() {
        0 => format!("{}s", d.as_secs()),
        n => {
            let frac = format!("{n:09}");
            format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
        }
    }
}

fn pb_duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// FNV-1a, 64 bits: a stable content hash for version strings.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Decodes the plugin configuration JSON back out of an ECDS resource (tests, status).
pub fn plugin_configuration(resource: &Any) -> Option<String> {
    let typed = TypedExtensionConfig::decode(resource.value.as_slice()).ok()?;
    let wasm = Wasm::decode(typed.typed_config?.value.as_slice()).ok()?;
    let any = wasm.config?.configuration?;
    Some(StringValue::decode(any.value.as_slice()).ok()?.value)
}

/// Configurations and snapshots for the crate's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use shardmap::RouterConfig;

    use super::Snapshot;
    use crate::config::Config;

    /// A configuration with the filter at `wasm` and these dtable-servers
    /// (name, address).
    pub(crate) fn config(wasm: &str, servers: &[(&str, &str)]) -> Config {
        let mut text = format!(
            r#"
            [listen]
            grpc = "127.0.0.1:1"
            http = "127.0.0.1:2"
            [store]
            path = "x.db"
            [api]
            token = "01234567"
            [filter]
            wasm = "{wasm}"
            "#
        );
        for (name, address) in servers {
            text.push_str(&format!(
                "[[server]]\nname = \"{name}\"\naddress = \"{address}\"\n"
            ));
        }
        Config::parse(&text).unwrap()
    }

    /// The snapshot of version `version` of the fallback map, with the filter at
    /// `wasm` and one dtable-server (`127.0.0.1:5000`).
    pub(crate) fn snapshot(version: u64, wasm: &str) -> Arc<Snapshot> {
        let c = config(wasm, &[("dtable-server", "127.0.0.1:5000")]);
        Snapshot::build(
            &RouterConfig::new(version, c.fallback_map()),
            &c.filter,
            &c.servers,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        testing::config(
            "/opt/base-router.wasm",
            &[
                ("dtable-server", "127.0.0.1:5000"),
                ("dtable-server-2", "db2.internal:5000"),
            ],
        )
    }

    #[test]
    fn ecds_carries_the_router_config_and_fail_reload() {
        let c = config();
        let rc = RouterConfig::new(7, c.fallback_map());
        let snap = Snapshot::build(&rc, &c.filter, &c.servers);
        assert_eq!(ecds_map_version(&snap.ecds.version), Some(7));
        let r = &snap.ecds.resources[0];
        assert_eq!(r.name, "seashard.base_router");
        assert_eq!(r.any.type_url, ECDS_TYPE_URL);
        let json = plugin_configuration(&r.any).unwrap();
        assert_eq!(RouterConfig::from_json(&json).unwrap(), rc);
        let typed = TypedExtensionConfig::decode(r.any.value.as_slice()).unwrap();
        let wasm = Wasm::decode(typed.typed_config.unwrap().value.as_slice()).unwrap();
        let plugin = wasm.config.unwrap();
        assert_eq!(plugin.failure_policy, FailurePolicy::FailReload as i32);
        // The JSON form says the same.
        let j = &r.json["typed_config"]["config"];
        assert_eq!(j["configuration"]["value"], json);
        assert_eq!(j["failure_policy"], "FAIL_RELOAD");
        assert_eq!(
            j["vm_config"]["code"]["local"]["filename"],
            "/opt/base-router.wasm"
        );
    }

    #[test]
    fn versions_follow_content() {
        let mut c = config();
        let rc = RouterConfig::new(7, c.fallback_map());
        let a = Snapshot::build(&rc, &c.filter, &c.servers);
        let b = Snapshot::build(&rc, &c.filter, &c.servers);
        assert_eq!(a.ecds.version, b.ecds.version);
        assert_eq!(a.cds.version, b.cds.version);
        c.filter.wasm = "/elsewhere.wasm".into();
        let d = Snapshot::build(&rc, &c.filter, &c.servers);
        assert_ne!(a.ecds.version, d.ecds.version);
        assert_eq!(ecds_map_version(&d.ecds.version), Some(7));
        c.servers.pop();
        let e = Snapshot::build(&rc, &c.filter, &c.servers);
        assert_ne!(a.cds.version, e.cds.version);
    }

    #[test]
    fn ecds_versions_order_as_their_maps_and_are_read_back() {
        let c = config();
        let snap = |v| {
            Snapshot::build(
                &RouterConfig::new(v, c.fallback_map()),
                &c.filter,
                &c.servers,
            )
        };
        let versions: Vec<String> = [1, 2, 9, 10, 11, 100, u64::MAX]
            .into_iter()
            .map(|v| snap(v).ecds.version.clone())
            .collect();
        // As strings, in the order of their maps.
        assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
        assert!(versions[0].starts_with("00000000000000000001-"));
        for (v, s) in [1, 2, 9, 10, 11, 100, u64::MAX].into_iter().zip(&versions) {
            assert_eq!(ecds_map_version(s), Some(v));
        }
        // An older seashard's unpadded form is read too.
        assert_eq!(ecds_map_version("7-0a1b2c3d"), Some(7));
        // Nothing else is a version of ours.
        for bad in [
            "",
            "7",
            "-7",
            "x-1",
            "+7-ab",
            "007a-1",
            "99999999999999999999-1",
            "000000000000000000001-1",
            " 7-1",
        ] {
            assert_eq!(ecds_map_version(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_in_proto_json() {
        assert_eq!(proto_json_duration(Duration::from_secs(5)), "5s");
        assert_eq!(proto_json_duration(Duration::from_millis(200)), "0.2s");
        assert_eq!(proto_json_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn clusters_are_static_for_ips_and_dns_for_names() {
        let c = config();
        let snap = Snapshot::build(
            &RouterConfig::new(1, c.fallback_map()),
            &c.filter,
            &c.servers,
        );
        let names: Vec<_> = snap.cds.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["dtable-server", "dtable-server-2"]);
        assert_eq!(snap.cds.resources[0].json["type"], "STATIC");
        assert_eq!(snap.cds.resources[1].json["type"], "STRICT_DNS");
        let c0 = Cluster::decode(snap.cds.resources[0].any.value.as_slice()).unwrap();
        assert_eq!(
            c0.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::Static as i32
            ))
        );
        assert_eq!(snap.cds.select(&["dtable-server-2".into()]).len(), 1);
        assert_eq!(snap.cds.select(&[]).len(), 2);
    }
}
