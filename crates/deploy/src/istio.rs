//! seashard in an Istio mesh: the manifests `seactl mesh istio` writes.
//!
//! ```text
//!  dtable-web / dtable-db / api-gateway pod          dtable-server-N pod
//!  ┌──────────────────────────────────────┐         ┌─────────────────────────────────┐
//!  │ app ─▶ istio-proxy (outbound :5000)  │  mTLS   │ istio-proxy (inbound :5000)     │
//!  │        base-router, edge mode ───────┼────────▶│ base-router, guard of N ─▶ app  │
//!  │        sets x-dtable-server; the     │         │ passes only bases N owns        │
//!  │        VirtualService routes by it   │         │ (421 / 503 / 400 otherwise)     │
//!  └───────────────┬──────────────────────┘         └───────────────┬─────────────────┘
//!                  │ ECDS (gRPC, per-sidecar ACK/NACK)               │
//!                  └──────────────▶ seashard control plane ◀─────────┘
//!                     (Deployment on etcd, or StatefulSet on SQLite; restarts
//!                      dtable-server pods through its hooks, e.g. kubectl)
//! ```
//!
//! Why this shape (see also the README, "In an Istio mesh"):
//!
//! - **seashard's own ECDS, not `WasmPlugin`.** istiod delivers a `WasmPlugin`'s
//!   configuration with no per-proxy ACK, so no fence could be waited for. Each
//!   sidecar instead takes base-router's configuration from `seactl serve` over its
//!   own gRPC stream (`ExtensionConfigDiscoveryService`) and ACKs or NACKs it there.
//! - **The control plane's cluster is static.** Envoy refuses an xDS config source
//!   whose gRPC cluster came by CDS, so an EnvoyFilter `CLUSTER` patch cannot add
//!   it: the bootstrap override (`sidecar.istio.io/bootstrapOverride`, a ConfigMap
//!   Istio hands Envoy as `--config-yaml`, merged into its bootstrap) does.
//! - **Guards are the dtable-server pods' inbound sidecars**, with a `STRICT`
//!   PeerAuthentication so that the sidecar is the only way in: safety rests on
//!   them, not on the many client sidecars.
//! - **Routing by a VirtualService header match** (one route per dtable-server
//!   Service): VirtualService has no `cluster_header`. base-router sets the header
//!   and Envoy re-selects the route (the Rust SDK speaks proxy-wasm ABI 0.2.1, for
//!   which Envoy clears the route cache when a filter changes request headers).
//! - **The module is a mounted file**, from a ConfigMap (`binaryData`) mounted into
//!   the sidecar with `sidecar.istio.io/userVolume`: it is on disk before Envoy
//!   starts, versioned with the release, and needs no fetch at run time and no
//!   second static cluster (Envoy's remote data source would need both, and istiod's
//!   OCI fetching serves only its own `WasmPlugin`s).
//! - **Every sidecar is its own instance**: Istio's node id carries the pod
//!   (`sidecar~IP~POD.NAMESPACE~...`), and the override sets no node, so no two
//!   sidecars share an id.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use control_plane::config::{
    Config, GUARD_CONNECT_TIMEOUT, RestartHook, ServerConfig, StoreKind, split_host_port,
};
use control_plane::resources::guard_resource_name;
use daemon::duration::format_duration;
use serde_json::{Value, json};
use shardmap::{AWAITING_MAP_VERSION, Fence, RouterConfig, ShardMap};

/// The static cluster the sidecars reach the control plane by (the bootstrap
/// override adds it; the EnvoyFilters' config sources name it).
pub const CONTROL_PLANE_CLUSTER: &str = "seashard_control_plane";
/// The bootstrap override ConfigMap's key, as Istio's injector mounts it
/// (`/etc/istio/custom-bootstrap/custom_bootstrap.json`).
pub const BOOTSTRAP_KEY: &str = "custom_bootstrap.json";
/// The label that makes a pod's sidecar an edge (the edge EnvoyFilter selects it).
pub const EDGE_LABEL: &str = "seashard.io/edge";
/// The label naming the dtable-server a pod runs (its guard EnvoyFilter and
/// PeerAuthentication select it).
pub const SERVER_LABEL: &str = "seashard.io/server";
/// A ConfigMap holds at most 1 MiB.
const CONFIGMAP_LIMIT: usize = 1024 * 1024;
const WASM_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";

/// What the manifests are made of.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The control plane's configuration, and its text as written (the ConfigMap
    /// carries the text, so comments survive).
    pub config: &'a Config,
    pub config_text: &'a str,
    /// A map file the configuration's `initial_map` names, shipped beside it.
    pub initial_map: Option<(&'a str, &'a str)>,
    /// The namespace of SeaTable and seashard.
    pub namespace: String,
    /// The prefix of every resource's name (`seashard`).
    pub name: String,
    /// The control plane's image: `seactl` on its PATH (and `kubectl`, for
    /// restart hooks that use it).
    pub image: String,
    /// Control plane replicas (etcd store; SQLite runs one).
    pub replicas: u32,
    /// The base-router module.
    pub wasm: &'a [u8],
    /// The Service clients call for dtable-server, `HOST:PORT` (SeaTable's
    /// `dtable-server:5000`); default: the first server's address.
    pub entry: Option<String>,
    /// Label selectors of the edge sidecars, one EnvoyFilter each (default:
    /// `seashard.io/edge=true`).
    pub edge_selectors: Vec<BTreeMap<String, String>>,
    /// The Secret whose keys become the control plane's environment (tokens,
    /// hook headers, the etcd password): never written here.
    pub secret: String,
    /// A Secret with `ca.crt`, `tls.crt`, `tls.key` for the sidecars' mutual TLS to
    /// the control plane (`[listen.tls]`), mounted into each sidecar.
    pub tls_secret: Option<String>,
}

/// One file of manifests.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its name in the output directory.
    pub file: String,
    /// A comment opening the file: what it holds, how to apply it.
    pub about: String,
    /// The Kubernetes objects (or, for pod patches, one strategic-merge patch).
    pub docs: Vec<Value>,
}

impl Manifest {
    /// The file's text: the comment, then the documents as YAML.
    pub fn to_yaml(&self) -> String {
        let mut out: String = self
            .about
            .lines()
            .map(|l| {
                if l.is_empty() {
                    "#\n".to_owned()
                } else {
                    format!("# {l}\n")
                }
            })
            .collect();
        out.push_str(&crate::yaml::documents(&self.docs));
        out
    }
}

/// A configuration the mesh manifests cannot be made from.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(s: impl Into<String>) -> MeshError {
    MeshError::Invalid(s.into())
}

/// Every manifest, in the order to apply them.
pub fn render(o: &Options) -> Result<Vec<Manifest>, MeshError> {
    check(o)?;
    let entry = entry(o)?;
    let mut out = vec![
        control_plane(o)?,
        sidecar_files(o)?,
        edges(o, &entry)?,
        guards(o)?,
        routing(o, &entry)?,
        edge_patch(o),
    ];
    for s in &o.config.servers {
        out.push(guard_patch(o, s));
    }
    Ok(out)
}

/// What the mesh needs of the configuration, each refused with the reason.
fn check(o: &Options) -> Result<(), MeshError> {
    let c = o.config;
    check_dns_label("--namespace", &o.namespace)?;
    check_dns_label("--name", &o.name)?;
    if c.servers.is_empty() {
        return Err(invalid("the configuration names no [[server]]"));
    }
    for s in &c.servers {
        check_dns_label(&format!("server `{}`", s.name), &s.name)?;
        if !s.guarded {
            return Err(invalid(format!(
                "server `{}` is not `guarded = true`: in the mesh every dtable-server pod's \
                 inbound sidecar is its guard, and rollouts must wait for the guards",
                s.name
            )));
        }
        if let RestartHook::Http { headers, .. } = &s.restart
            && !headers.is_empty()
        {
            return Err(invalid(format!(
                "server `{}`: the restart hook's headers are written in the configuration; \
                 the ConfigMap would carry them in clear: use `headers_env` with a key of \
                 the Secret `{}`",
                s.name, o.secret
            )));
        }
    }
    if c.api.token.is_some() || c.api.read_token.is_some() {
        return Err(invalid(format!(
            "[api] token (or read_token) is written in the configuration; the ConfigMap \
             would carry it in clear: use `token_env` (and `read_token_env`) with a key of \
             the Secret `{}`",
            o.secret
        )));
    }
    if c.store.password.is_some() {
        return Err(invalid(format!(
            "[store] password is written in the configuration: use `password_env` with a \
             key of the Secret `{}`",
            o.secret
        )));
    }
    for (what, addr) in [("grpc", c.listen.grpc), ("http", c.listen.http)] {
        if !addr.ip().is_unspecified() {
            return Err(invalid(format!(
                "[listen] {what} = \"{addr}\": in a pod the control plane must listen on all \
                 addresses (0.0.0.0:{}) for the sidecars and the Service to reach it",
                addr.port()
            )));
        }
    }
    if c.listen.tls.is_some() != o.tls_secret.is_some() {
        return Err(invalid(if c.listen.tls.is_some() {
            "[listen.tls] is set: pass --tls-secret, the Secret with the sidecars' client \
             certificate (ca.crt, tls.crt, tls.key)"
        } else {
            "--tls-secret is given but the configuration has no [listen.tls]"
        }));
    }
    if c.listen
        .tls
        .as_ref()
        .is_some_and(|t| t.require_node_id_match)
    {
        return Err(invalid(
            "[listen.tls] require_node_id_match: an Istio sidecar's node id names its pod \
             (sidecar~IP~POD.NAMESPACE~...), which no certificate shared by a Deployment's \
             pods can carry: set it to false (the sidecars still prove the CA)",
        ));
    }
    if c.store.kind == StoreKind::Sqlite && o.replicas != 1 {
        return Err(invalid(format!(
            "{} control plane replicas on SQLite: SQLite serves one; use the etcd store for \
             several",
            o.replicas
        )));
    }
    if o.replicas == 0 {
        return Err(invalid(
            "--replicas 0: the control plane needs at least one",
        ));
    }
    if !c.filter.wasm.is_absolute() || c.filter.wasm.file_name().is_none() {
        return Err(invalid(format!(
            "[filter] wasm = \"{}\": the path in the sidecars must be absolute (the module \
             is mounted there)",
            c.filter.wasm.display()
        )));
    }
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(o.wasm)
        .len();
    if encoded > CONFIGMAP_LIMIT - 4096 {
        return Err(invalid(format!(
            "the module is {} bytes ({encoded} in base64): too big for a ConfigMap (1 MiB)",
            o.wasm.len()
        )));
    }
    if !o.wasm.starts_with(b"\0asm") {
        return Err(invalid("the module is not a WebAssembly binary"));
    }
    Ok(())
}

/// A Kubernetes name: a DNS-1123 label.
fn check_dns_label(what: &str, s: &str) -> Result<(), MeshError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what}: `{s}` is not a Kubernetes name (lowercase letters, digits and `-`, at \
             most 63)"
        )))
    }
}

/// The Service clients call, and the server it belongs to.
struct Entry {
    host: String,
    port: u16,
    /// The server whose Service this is: uuid-less requests before the first map.
    default_server: String,
}

fn entry(o: &Options) -> Result<Entry, MeshError> {
    let first = &o.config.servers[0];
    let text = o.entry.clone().unwrap_or_else(|| first.address.clone());
    let (host, port) = split_host_port(&text)
        .ok_or_else(|| invalid(format!("--entry `{text}` is not HOST:PORT")))?;
    let default_server = o
        .config
        .servers
        .iter()
        .find(|s| s.host_port().0 == host)
        .unwrap_or(first)
        .name
        .clone();
    Ok(Entry {
        host: host.to_owned(),
        port,
        default_server,
    })
}

fn meta(o: &Options, name: &str) -> Value {
    json!({
        "name": name,
        "namespace": o.namespace,
        "labels": {"app.kubernetes.io/part-of": "seashard", "app.kubernetes.io/managed-by": "seactl"},
    })
}

fn config_dir(o: &Options) -> &'static str {
    let _ = o;
    "/etc/seashard"
}

/// The control plane: its configuration, RBAC for kubectl restart hooks, the
/// Services, the workload and its PodDisruptionBudget.
fn control_plane(o: &Options) -> Result<Manifest, MeshError> {
    let c = o.config;
    let n = &o.name;
    let grpc = c.listen.grpc.port();
    let http = c.listen.http.port();
    let mut data = BTreeMap::new();
    data.insert("seashard.toml".to_owned(), Value::from(o.config_text));
    if let Some((file, text)) = o.initial_map {
        data.insert(file.to_owned(), Value::from(text));
    }
    let labels =
        json!({"app.kubernetes.io/name": n, "app.kubernetes.io/component": "control-plane"});
    let sqlite = c.store.kind == StoreKind::Sqlite;
    let data_dir =
        if sqlite {
            let dir = c.store.path.parent().filter(|p| p.is_absolute()).ok_or_else(|| {
            invalid(format!(
                "[store] path = \"{}\": give an absolute path (its directory is the volume)",
                c.store.path.display()
            ))
        })?;
            Some(dir.to_string_lossy().into_owned())
        } else {
            None
        };
    let scheme = if c.api.tls.is_some() { "HTTPS" } else { "HTTP" };
    let probe = |delay: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/healthz", "port": "http", "scheme": scheme},
            "initialDelaySeconds": delay, "periodSeconds": 5, "timeoutSeconds": 2,
            "failureThreshold": failures,
        })
    };
    let mut mounts = vec![json!({"name": "config", "mountPath": config_dir(o), "readOnly": true})];
    if let Some(dir) = &data_dir {
        mounts.push(json!({"name": "data", "mountPath": dir}));
    }
    let http_scheme = if c.api.tls.is_some() { "https" } else { "http" };
    let container = json!({
        "name": "seashard",
        "image": o.image,
        "args": ["serve", "--config", format!("{}/seashard.toml", config_dir(o))],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SEASHARD_REPLICA", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "SEASHARD_ADVERTISE", "value": format!("{http_scheme}://$(POD_IP):{http}")},
        ],
        "envFrom": [{"secretRef": {"name": o.secret}}],
        "ports": [
            {"name": "grpc", "containerPort": grpc, "protocol": "TCP"},
            {"name": "http", "containerPort": http, "protocol": "TCP"},
        ],
        "readinessProbe": probe(2, 3),
        "livenessProbe": probe(10, 6),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": false, "runAsNonRoot": true, "runAsUser": 10001,
            "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
        },
    });
    let pod = json!({
        "metadata": {
            "labels": labels,
            "annotations": {
                // The sidecars' xDS streams come from their Envoy process, which Istio
                // never captures: plaintext (or seashard's own mTLS). Inbound to these
                // ports bypasses this pod's sidecar so that a STRICT mesh does not refuse
                // them; outbound (health checks, hooks) goes through it with mesh mTLS.
                "traffic.sidecar.istio.io/excludeInboundPorts": format!("{grpc},{http}"),
                "proxy.istio.io/config": "holdApplicationUntilProxyStarts: true\n",
            },
        },
        "spec": {
            "serviceAccountName": n,
            "securityContext": {"fsGroup": 10001},
            "containers": [container],
            "volumes": [{"name": "config", "configMap": {"name": format!("{n}-config")}}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                "weight": 100,
                "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": labels}},
            }]}},
        },
    });
    let workload = if let Some(dir) = &data_dir {
        let _ = dir;
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(o, n),
            "spec": {
                "serviceName": format!("{n}-xds"), "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": pod,
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                }],
            },
        })
    } else {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(o, n),
            "spec": {
                "replicas": o.replicas,
                "selector": {"matchLabels": labels},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
                "template": pod,
            },
        })
    };
    let docs = vec![
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(o, &format!("{n}-config")), "data": data}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(o, n)}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(o, n),
            "rules": [
                // `kubectl delete pod NAME-0 --wait`: the StatefulSet makes it anew, and
                // never runs two pods of one ordinal.
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
                // `kubectl rollout restart statefulset/NAME` and `rollout status`.
                {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get", "list", "watch", "patch"]},
            ],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(o, n),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n},
            "subjects": [{"kind": "ServiceAccount", "name": n, "namespace": o.namespace}],
        }),
        // The API, for seactl and the replicas' forwarding.
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta(o, n),
            "spec": {
                "selector": labels,
                "ports": [
                    {"name": "http", "port": http, "targetPort": "http", "appProtocol": http_scheme},
                    {"name": "grpc", "port": grpc, "targetPort": "grpc", "appProtocol": "grpc"},
                ],
            },
        }),
        // Headless: each sidecar's DNS lookup sees every replica, and Envoy moves its
        // stream to another when one goes.
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta(o, &format!("{n}-xds")),
            "spec": {
                "clusterIP": "None", "publishNotReadyAddresses": false,
                "selector": labels,
                "ports": [{"name": "grpc", "port": grpc, "targetPort": "grpc", "appProtocol": "grpc"}],
            },
        }),
        workload,
        json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(o, n),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        }),
    ];
    Ok(Manifest {
        file: "control-plane.yaml".into(),
        about: format!(
            "seashard's control plane in namespace {ns}: its configuration, RBAC for restart\n\
             hooks that call kubectl, its Services and {what}.\n\
             Create the Secret `{secret}` first: its keys become the environment\n\
             (the API token, hook headers, the etcd password), e.g.\n  \
             kubectl -n {ns} create secret generic {secret} --from-literal=SEASHARD_TOKEN=...",
            ns = o.namespace,
            secret = o.secret,
            what = if sqlite {
                "a one-replica StatefulSet (SQLite on its volume)"
            } else {
                "a Deployment of replicas on etcd"
            },
        ),
        docs,
    })
}

/// The ConfigMaps every seashard sidecar mounts: the bootstrap override and the
/// module.
fn sidecar_files(o: &Options) -> Result<Manifest, MeshError> {
    let n = &o.name;
    let wasm_name = file_name(&o.config.filter.wasm);
    let override_json = serde_json::to_string_pretty(&bootstrap_override(o))
        .map_err(|e| invalid(format!("the bootstrap override: {e}")))?;
    let docs = vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(o, &format!("{n}-bootstrap")),
            "data": {BOOTSTRAP_KEY: format!("{override_json}\n")},
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(o, &format!("{n}-base-router")),
            "binaryData": {wasm_name: base64::engine::general_purpose::STANDARD.encode(o.wasm)},
        }),
    ];
    Ok(Manifest {
        file: "sidecar-files.yaml".into(),
        about: format!(
            "What every seashard sidecar mounts (pod-patches/ add the annotations):\n\
             - {n}-bootstrap: the bootstrap override, merged by Istio into the sidecar's\n  \
             bootstrap: the static cluster `{CONTROL_PLANE_CLUSTER}` the filter's ECDS uses;\n\
             - {n}-base-router: base-router's module, mounted at {}.",
            o.config.filter.wasm.display()
        ),
        docs,
    })
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Where the sidecar finds its client certificate (`--tls-secret`).
const SIDECAR_TLS_DIR: &str = "/etc/seashard/tls";

/// The bootstrap override: one static cluster, merged into the sidecar's bootstrap
/// (Istio passes it as `--config-yaml`: repeated fields are appended, so Istio's own
/// clusters stay). It sets no node: the node id stays Istio's, one per pod.
pub fn bootstrap_override(o: &Options) -> Value {
    let c = o.config;
    let mut cluster = json!({
        "name": CONTROL_PLANE_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        // Every replica, from the headless Service; a lost one is ejected at its
        // first failure and its stream reopened elsewhere.
        "load_assignment": {
            "cluster_name": CONTROL_PLANE_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": format!("{}-xds.{}.svc.cluster.local", o.name, o.namespace),
                "port_value": c.listen.grpc.port(),
            }}}}]}],
        },
        "outlier_detection": {
            "consecutive_local_origin_failure": 1,
            "split_external_local_origin_errors": true,
            "base_ejection_time": "2s",
            "max_ejection_time": "10s",
        },
        "common_lb_config": {"healthy_panic_threshold": {"value": 0.0}},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                // HTTP/2 PINGs end a stream to a replica gone without a reset.
                "explicit_http_config": {"http2_protocol_options": {
                    "connection_keepalive": {"interval": "5s", "timeout": "3s"},
                }},
            },
        },
    });
    if o.tls_secret.is_some() {
        cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("{}-xds.{}.svc.cluster.local", o.name, o.namespace),
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": format!("{SIDECAR_TLS_DIR}/tls.crt")},
                        "private_key": {"filename": format!("{SIDECAR_TLS_DIR}/tls.key")},
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": format!("{SIDECAR_TLS_DIR}/ca.crt")},
                        "match_typed_subject_alt_names": [{
                            "san_type": "DNS",
                            "matcher": {"exact": format!("{}-xds.{}.svc.cluster.local", o.name, o.namespace)},
                        }],
                    },
                },
            },
        });
    }
    json!({"static_resources": {"clusters": [cluster]}})
}

/// The HTTP filter an EnvoyFilter inserts: base-router, its configuration by ECDS
/// from the control plane (resource `resource`), the placeholder (every base fenced)
/// until the first answer.
pub fn filter_patch(o: &Options, resource: &str, placeholder: &RouterConfig) -> Value {
    let f = &o.config.filter;
    json!({
        "name": resource,
        "config_discovery": {
            "config_source": {
                "resource_api_version": "V3",
                "api_config_source": {
                    "api_type": "GRPC",
                    "transport_api_version": "V3",
                    "set_node_on_first_message_only": true,
                    "grpc_services": [{"envoy_grpc": {
                        "cluster_name": CONTROL_PLANE_CLUSTER,
                        "retry_policy": {"retry_back_off": {"base_interval": "0.5s", "max_interval": "5s"}},
                    }}],
                },
            },
            "default_config": {
                "@type": WASM_TYPE_URL,
                "config": {
                    "name": f.name,
                    "root_id": f.root_id,
                    // A VM failure recreates the VM and keeps checking; FAIL_OPEN would
                    // skip the filter.
                    "failure_policy": "FAIL_RELOAD",
                    "vm_config": {
                        "vm_id": f.vm_id,
                        "runtime": f.runtime,
                        "code": {"local": {"filename": f.wasm.to_string_lossy()}},
                    },
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": placeholder.to_json(),
                    },
                },
            },
            "apply_default_config_without_warming": true,
            "type_urls": [WASM_TYPE_URL],
        },
    })
}

/// The configuration a sidecar runs until its first map: every base fenced;
/// uuid-less requests to `default` (an edge) or passed (the guard of `guard`).
pub fn placeholder(o: &Options, default: &str, guard: Option<&str>) -> RouterConfig {
    RouterConfig {
        header: o.config.filter.header.clone(),
        fence: Fence {
            slots: vec!["0-f".into()],
            pins: vec![],
        },
        guard: guard.map(str::to_owned),
        ..RouterConfig::new(
            AWAITING_MAP_VERSION,
            ShardMap {
                default: guard.unwrap_or(default).to_owned(),
                ..ShardMap::default()
            },
        )
    }
}

fn http_filter_patch(context: &str, port: u16, value: Value) -> Value {
    json!({
        "applyTo": "HTTP_FILTER",
        "match": {
            "context": context,
            "listener": {
                "portNumber": port,
                "filterChain": {"filter": {
                    "name": "envoy.filters.network.http_connection_manager",
                    "subFilter": {"name": "envoy.filters.http.router"},
                }},
            },
        },
        "patch": {"operation": "INSERT_BEFORE", "value": value},
    })
}

fn edges(o: &Options, entry: &Entry) -> Result<Manifest, MeshError> {
    let selectors = if o.edge_selectors.is_empty() {
        vec![BTreeMap::from([(EDGE_LABEL.to_owned(), "true".to_owned())])]
    } else {
        o.edge_selectors.clone()
    };
    let patch = filter_patch(
        o,
        &o.config.filter.name,
        &placeholder(o, &entry.default_server, None),
    );
    let docs = selectors
        .iter()
        .enumerate()
        .map(|(i, labels)| {
            let name = if selectors.len() == 1 {
                format!("{}-edge", o.name)
            } else {
                format!("{}-edge-{}", o.name, i + 1)
            };
            json!({
                "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
                "metadata": meta(o, &name),
                "spec": {
                    "workloadSelector": {"labels": labels},
                    "configPatches": [http_filter_patch("SIDECAR_OUTBOUND", entry.port, patch.clone())],
                },
            })
        })
        .collect();
    Ok(Manifest {
        file: "edges.yaml".into(),
        about: format!(
            "base-router in edge mode on the outbound sidecars of dtable-server's clients\n\
             (dtable-web, dtable-db, api-gateway): on port {port}, before the router, it sets\n\
             `{header}`, which routing.yaml's VirtualService routes by. Its map comes by\n\
             ECDS (`{res}`) from the control plane, each sidecar ACKing it.\n\
             Port {port} outbound must carry dtable-server only in these pods.",
            port = entry.port,
            header = o.config.filter.header,
            res = o.config.filter.name,
        ),
        docs,
    })
}

fn guards(o: &Options) -> Result<Manifest, MeshError> {
    let mut docs = Vec::new();
    for s in &o.config.servers {
        let resource = guard_resource_name(&o.config.filter.name, &s.name);
        let (_, port) = s.host_port();
        let patch = filter_patch(o, &resource, &placeholder(o, &s.name, Some(&s.name)));
        let selector = json!({SERVER_LABEL: s.name});
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
            "metadata": meta(o, &format!("{}-guard-{}", o.name, s.name)),
            "spec": {
                "workloadSelector": {"labels": selector},
                "configPatches": [http_filter_patch("SIDECAR_INBOUND", port, patch)],
            },
        }));
        // A request the guard passed just before a fence connects to the old process
        // or fails within the rollout's drain (at least GUARD_CONNECT_TIMEOUT for a
        // guarded server): Istio's inbound default (10 s) would outlast it.
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
            "metadata": meta(o, &format!("{}-guard-{}", o.name, s.name)),
            "spec": {
                "workloadSelector": {"labels": selector},
                "inboundConnectionPool": {"tcp": {"connectTimeout": format_duration(GUARD_CONNECT_TIMEOUT)}},
            },
        }));
        // The guard is the only way in: no plaintext that bypasses the sidecar.
        docs.push(json!({
            "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": meta(o, &format!("{}-guard-{}", o.name, s.name)),
            "spec": {"selector": {"matchLabels": selector}, "mtls": {"mode": "STRICT"}},
        }));
    }
    Ok(Manifest {
        file: "guards.yaml".into(),
        about: "base-router in guard mode on each dtable-server pod's inbound sidecar (label\n\
                `seashard.io/server: NAME`): it passes a request only for a base NAME owns under\n\
                the newest map it holds (421 for another's, 503 while fenced, 400 when the base\n\
                cannot be read). A STRICT PeerAuthentication makes the sidecar the only way in;\n\
                a Sidecar keeps its connect timeout to the app within the rollout's drain.\n\
                Rollouts wait for these guards' ACKs."
            .into(),
        docs,
    })
}

fn routing(o: &Options, entry: &Entry) -> Result<Manifest, MeshError> {
    let header = &o.config.filter.header;
    let dest = |s: &ServerConfig| {
        let (host, port) = s.host_port();
        json!({"destination": {"host": host, "port": {"number": port}}})
    };
    let mut http: Vec<Value> = o
        .config
        .servers
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "match": [{"headers": {header: {"exact": s.name}}}],
                "route": [dest(s)],
            })
        })
        .collect();
    let default = o
        .config
        .server(&entry.default_server)
        .ok_or_else(|| invalid("the entry's server is not in the configuration"))?;
    // No header: base-router did not run (a pod without the edge filter). Its guard
    // still refuses bases it does not own.
    http.push(json!({"name": "no-routing-header", "route": [dest(default)]}));
    let mut docs = vec![json!({
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": meta(o, &format!("{}-dtable-server", o.name)),
        "spec": {"hosts": [entry.host], "http": http},
    })];
    for s in &o.config.servers {
        let (host, _) = s.host_port();
        docs.push(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": meta(o, &format!("{}-{}", o.name, s.name)),
            "spec": {
                "host": host,
                "trafficPolicy": {
                    "tls": {"mode": "ISTIO_MUTUAL"},
                    // Within `[rollout] drain`: a request routed before the fence reaches
                    // the old process or fails, never the restarted one.
                    "connectionPool": {"tcp": {"connectTimeout": format_duration(s.connect_timeout)}},
                },
            },
        }));
    }
    Ok(Manifest {
        file: "routing.yaml".into(),
        about: format!(
            "Routing by base-router's header: clients call {host}:{port}; the VirtualService\n\
             sends each request to the Service of the dtable-server the header names (one\n\
             route per server: VirtualService has no cluster_header). One DestinationRule per\n\
             server: mesh mTLS, and the connect timeout the rollout's drain relies on.",
            host = entry.host,
            port = entry.port,
        ),
        docs,
    })
}

/// The annotations that give a pod's sidecar the bootstrap override and the module
/// (and the client certificate with `--tls-secret`).
fn sidecar_annotations(o: &Options) -> Value {
    let n = &o.name;
    let dir = o
        .config
        .filter
        .wasm
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into());
    let mut volumes =
        vec![json!({"name": "seashard-module", "configMap": {"name": format!("{n}-base-router")}})];
    let mut mounts = vec![json!({"name": "seashard-module", "mountPath": dir, "readOnly": true})];
    if let Some(secret) = &o.tls_secret {
        volumes.push(json!({"name": "seashard-tls", "secret": {"secretName": secret}}));
        mounts
            .push(json!({"name": "seashard-tls", "mountPath": SIDECAR_TLS_DIR, "readOnly": true}));
    }
    json!({
        "sidecar.istio.io/bootstrapOverride": format!("{n}-bootstrap"),
        "sidecar.istio.io/userVolume": Value::Array(volumes).to_string(),
        "sidecar.istio.io/userVolumeMount": Value::Array(mounts).to_string(),
    })
}

fn pod_patch(labels: Value, annotations: Value) -> Value {
    json!({"spec": {"template": {"metadata": {"labels": labels, "annotations": annotations}}}})
}

fn edge_patch(o: &Options) -> Manifest {
    let labels = match o.edge_selectors.first() {
        Some(l) => json!(l),
        None => json!({EDGE_LABEL: "true"}),
    };
    Manifest {
        file: "pod-patches/edge.yaml".into(),
        about: format!(
            "For each client of dtable-server (dtable-web, dtable-db, api-gateway), a\n\
             strategic-merge patch of its Deployment's pod template:\n  \
             kubectl -n {} patch deployment dtable-web --patch-file pod-patches/edge.yaml",
            o.namespace
        ),
        docs: vec![pod_patch(labels, sidecar_annotations(o))],
    }
}

fn guard_patch(o: &Options, s: &ServerConfig) -> Manifest {
    Manifest {
        file: format!("pod-patches/guard-{}.yaml", s.name),
        about: format!(
            "For the workload that runs dtable-server `{name}` (one pod: a StatefulSet of one\n\
             replica, so that a restart never runs two), a strategic-merge patch:\n  \
             kubectl -n {ns} patch statefulset {name} --patch-file pod-patches/guard-{name}.yaml",
            name = s.name,
            ns = o.namespace,
        ),
        docs: vec![pod_patch(
            json!({SERVER_LABEL: s.name}),
            sidecar_annotations(o),
        )],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
[listen]
grpc = "0.0.0.0:18000"
http = "0.0.0.0:18080"
[store]
kind = "etcd"
endpoints = ["http://etcd-0.etcd:2379"]
[api]
token_env = "SEASHARD_TOKEN"
[filter]
wasm = "/var/lib/seashard/base-router.wasm"
[[server]]
name = "dtable-server"
address = "dtable-server:5000"
guarded = true
restart = { kind = "command", argv = ["kubectl", "-n", "seatable", "delete", "pod", "dtable-server-0", "--wait=true"] }
[[server]]
name = "dtable-server-2"
address = "dtable-server-2:5000"
guarded = true
"#;

    fn opts<'a>(config: &'a Config, wasm: &'a [u8]) -> Options<'a> {
        Options {
            config,
            config_text: TOML,
            initial_map: None,
            namespace: "seatable".into(),
            name: "seashard".into(),
            image: "seashard:0.1".into(),
            replicas: 3,
            wasm,
            entry: None,
            edge_selectors: vec![],
            secret: "seashard-secrets".into(),
            tls_secret: None,
        }
    }

    const WASM: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn routes_one_match_per_server_and_guards_each() {
        let config = Config::parse(TOML).unwrap();
        let files = render(&opts(&config, WASM)).unwrap();
        let routing = files.iter().find(|m| m.file == "routing.yaml").unwrap();
        let http = &routing.docs[0]["spec"]["http"];
        assert_eq!(http.as_array().unwrap().len(), 3);
        assert_eq!(
            http[1]["match"][0]["headers"]["x-dtable-server"]["exact"],
            "dtable-server-2"
        );
        assert_eq!(
            http[1]["route"][0]["destination"]["host"],
            "dtable-server-2"
        );
        let guards = files.iter().find(|m| m.file == "guards.yaml").unwrap();
        let names: Vec<_> = guards
            .docs
            .iter()
            .filter(|d| d["kind"] == "EnvoyFilter")
            .map(|d| d["spec"]["configPatches"][0]["patch"]["value"]["name"].clone())
            .collect();
        assert_eq!(
            names,
            vec![
                json!("seashard.base_router.guard.dtable-server"),
                json!("seashard.base_router.guard.dtable-server-2")
            ]
        );
    }

    #[test]
    fn refuses_what_the_mesh_cannot_keep_safe() {
        let cases = [
            (
                TOML.replace("guarded = true\nrestart", "restart"),
                "not `guarded = true`",
            ),
            (
                TOML.replace(
                    "token_env = \"SEASHARD_TOKEN\"",
                    "token = \"0123456789abcdef\"",
                ),
                "would carry it in clear",
            ),
            (
                TOML.replace("grpc = \"0.0.0.0:18000\"", "grpc = \"127.0.0.1:18000\""),
                "all",
            ),
        ];
        for (toml, want) in cases {
            let config = Config::parse(&toml).unwrap();
            let err = render(&opts(&config, WASM)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(
                !err.contains("0123456789abcdef"),
                "a secret in an error: {err}"
            );
        }
        let config = Config::parse(TOML).unwrap();
        let err = render(&opts(&config, b"not wasm")).unwrap_err().to_string();
        assert!(err.contains("not a WebAssembly"), "{err}");
    }

    #[test]
    fn the_override_sets_no_node_and_one_cluster() {
        let config = Config::parse(TOML).unwrap();
        let v = bootstrap_override(&opts(&config, WASM));
        assert!(v.get("node").is_none());
        assert_eq!(
            v["static_resources"]["clusters"][0]["name"],
            CONTROL_PLANE_CLUSTER
        );
        assert_eq!(
            v["static_resources"]["clusters"][0]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                [0]["endpoint"]["address"]["socket_address"]["address"],
            "seashard-xds.seatable.svc.cluster.local"
        );
    }
}
