//! The control plane's configuration file (TOML): where it listens, where it keeps its
//! state, who may change the map, which dtable-servers exist and how the filter runs.
//!
//! ```toml
//! initial_map = "map.json"           # optional: the map while the store holds none
//!
//! [listen]
//! grpc = "127.0.0.1:18000"           # ADS (ECDS + CDS) for the Envoys
//! http = "127.0.0.1:18080"           # HTTP API, REST xDS, /metrics
//! # [listen.tls]                     # ADS over mutual TLS (paths relative to this file)
//! # cert = "tls/control-plane.crt", key = "tls/control-plane.key", client_ca = "tls/ca.crt"
//! # require_node_id_match = true     # node id = the client certificate's CN or DNS name
//!
//! [store]                            # kind = "sqlite" (the default): one file
//! path = "/var/lib/seashard/seashard.db"
//! # kind = "etcd"                    # several replicas; see StoreConfig
//! # endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
//! # prefix = "/seashard"             # every key lives under it
//! # advertise = "http://10.0.0.1:18080"   # this replica's API, for changes forwarded to it
//! # lease_ttl = "5s"                 # a dead leader is replaced after about this long
//! # username = "seashard", password_env = "SEASHARD_ETCD_PASSWORD"
//! # tls = { ca = "tls/etcd-ca.crt", cert = "tls/etcd-client.crt", key = "tls/etcd-client.key" }
//!
//! [api]
//! token_env = "SEASHARD_TOKEN"       # or: token = "..."     (reads and changes)
//! # read_token_env = "SEASHARD_READ_TOKEN"   # or: read_token = "..." (reads only)
//!
//! [filter]
//! wasm = "/opt/seashard/base-router.wasm"
//! # name = "seashard.base_router", header = "x-dtable-server", retry_after = 5,
//! # root_id = "base_router", vm_id = "seashard", runtime = "envoy.wasm.runtime.v8"
//!
//! [rollout]                          # durations: "500ms", "10s", "2m"
//! ack_timeout = "10s"
//! health_timeout = "60s"
//! restart_timeout = "120s"
//! # drain = "5s"                    # after the fence, before a restart (default: connect_timeout)
//!
//! [[server]]
//! name = "dtable-server"             # the Envoy cluster name the map uses
//! address = "10.0.0.11:5000"
//! # health_url = "http://10.0.0.11:5000/ping/"   (the default)
//! restart = { kind = "command", argv = ["systemctl", "restart", "dtable-server"], timeout = "60s" }
//! # guarded = true                   # reached only through its guard; `address` is the guard's
//! ```

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon::secret::{REDACTED, redact_url, shown_argv, url_secrets};
pub use daemon::tls::ApiTls;
use serde::{Deserialize, Serialize};
use shardmap::{DEFAULT_HEADER, DEFAULT_RETRY_AFTER, ShardMap, check_server_name};

/// The HttpFilter name of base-router in the bootstraps, by default.
pub const DEFAULT_FILTER_NAME: &str = "seashard.base_router";

/// A configuration file that cannot be used, with what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole configuration, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub store: StoreConfig,
    #[serde(default)]
    pub api: ApiConfig,
    pub filter: FilterConfig,
    #[serde(default)]
    pub rollout: RolloutConfig,
    /// The dtable-servers: one Envoy cluster each.
    #[serde(rename = "server", default)]
    pub servers: Vec<ServerConfig>,
    /// The map served while the store holds none (JSON file, relative to the config).
    /// Without it: every base to the first server.
    #[serde(default)]
    pub initial_map: Option<PathBuf>,
}

/// Listen addresses.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// ADS over gRPC (HTTP/2).
    pub grpc: SocketAddr,
    /// The HTTP API, REST xDS and `/metrics`.
    pub http: SocketAddr,
    /// How often an idle ADS connection is pinged (HTTP/2 PING): a half-open stream
    /// (an Envoy gone silent behind a dead link) is found dead within
    /// `keepalive_interval + keepalive_timeout`, and no longer counts as a live
    /// instance of its node id.
    #[serde(
        default = "default_keepalive_interval",
        with = "daemon::duration::serde"
    )]
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[serde(
        default = "default_keepalive_timeout",
        with = "daemon::duration::serde"
    )]
    pub keepalive_timeout: Duration,
    /// The most ADS streams one peer address may hold open at once (an Envoy holds
    /// one; several Envoys behind one address each hold theirs). More: refused with
    /// `RESOURCE_EXHAUSTED`.
    #[serde(default = "default_max_streams_per_peer")]
    pub max_streams_per_peer: usize,
    /// How long a response may wait for its Envoy to read it; a stream whose Envoy
    /// reads nothing for this long is ended (it reconnects and is sent the current
    /// version), so it holds no memory or task for good.
    #[serde(default = "default_send_timeout", with = "daemon::duration::serde")]
    pub send_timeout: Duration,
    /// `[listen.tls]`: ADS over mutual TLS. Without it, ADS is plain gRPC (for a
    /// single host or a private network only).
    #[serde(default)]
    pub tls: Option<ListenTls>,
}

/// `[listen.tls]`: ADS over mutual TLS: every Envoy must show a client certificate
/// signed by `client_ca`. Paths are relative to the configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    /// The control plane's certificate (PEM, chain after it).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA (PEM, one or more certificates) that signs the Envoys' client
    /// certificates.
    pub client_ca: PathBuf,
    /// The node id an Envoy sends must be its certificate's subject CN or one of its
    /// DNS names; a stream that names another is ended with `PERMISSION_DENIED`.
    #[serde(default)]
    pub require_node_id_match: bool,
}

fn default_version_header() -> bool {
    true
}

fn default_max_body() -> usize {
    4 * 1024 * 1024
}

fn default_max_streams_per_peer() -> usize {
    64
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_keepalive_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(5)
}

/// Where the state is kept: one SQLite file (one control plane), or etcd (several
/// replicas, one leader).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default)]
    pub kind: StoreKind,
    /// sqlite: the file (created if missing; relative to the config file).
    #[serde(default)]
    pub path: PathBuf,
    /// etcd: the members' client URLs (`http://HOST:PORT`, `https://` with `tls`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// etcd: the key prefix every key of this control plane lives under.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// etcd: this replica's name (default: the host name and the API port).
    #[serde(default)]
    pub replica: Option<String>,
    /// etcd: this replica's API URL as the other replicas reach it (they forward
    /// changes to the leader). Default: `http(s)://` + `listen.http`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// etcd: the leader's lease. A leader that dies is replaced after at most
    /// about this long; a paused one loses the lease after it.
    #[serde(default = "default_lease_ttl", with = "daemon::duration::serde")]
    pub lease_ttl: Duration,
    /// etcd: each request's deadline.
    #[serde(default = "default_etcd_timeout", with = "daemon::duration::serde")]
    pub timeout: Duration,
    /// etcd: user name (with `password_env` or `password`).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// etcd: the environment variable holding the password (preferred).
    #[serde(default)]
    pub password_env: Option<String>,
    /// etcd: TLS to the members (paths relative to the config file).
    #[serde(default)]
    pub tls: Option<EtcdTls>,
}

/// Which store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Etcd,
}

/// `[store.tls]`: how the etcd members are reached over TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTls {
    /// The CA that signed the members' certificates (PEM).
    pub ca: PathBuf,
    /// A client certificate and key, when the members require one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

fn default_etcd_prefix() -> String {
    "/seashard".to_owned()
}

fn default_lease_ttl() -> Duration {
    Duration::from_secs(5)
}

fn default_etcd_timeout() -> Duration {
    Duration::from_secs(3)
}

impl StoreConfig {
    /// The etcd password: from `password_env` if set, else `password`.
    pub fn etcd_password(&self) -> Result<Option<String>, ConfigError> {
        match (&self.password_env, &self.password) {
            (Some(var), _) => std::env::var(var).map(Some).map_err(|_| {
                invalid(format!(
                    "store.password_env: the environment variable `{var}` is not set"
                ))
            }),
            (None, p) => Ok(p.clone()),
        }
    }

    fn problems(&self, p: &mut Vec<String>) {
        match self.kind {
            StoreKind::Sqlite => {
                if self.path.as_os_str().is_empty() {
                    p.push("store.path: set the SQLite file (or kind = \"etcd\")".to_owned());
                }
                if !self.endpoints.is_empty() || self.tls.is_some() || self.username.is_some() {
                    p.push("store: endpoints, tls and username are for kind = \"etcd\"".to_owned());
                }
            }
            StoreKind::Etcd => {
                if self.endpoints.is_empty() {
                    p.push("store.endpoints: name at least one etcd member".to_owned());
                }
                let scheme = if self.tls.is_some() {
                    "https://"
                } else {
                    "http://"
                };
                for e in &self.endpoints {
                    if !e.starts_with(scheme) || split_host_port(&e[scheme.len()..]).is_none() {
                        p.push(format!(
                            "store.endpoints: `{e}` is not {scheme}HOST:PORT{}",
                            if self.tls.is_some() {
                                " (store.tls is set)"
                            } else {
                                ""
                            }
                        ));
                    }
                }
                if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
                    p.push(format!(
                        "store.prefix: `{}` must start with `/` and not end with one",
                        self.prefix
                    ));
                }
                if self.lease_ttl < Duration::from_secs(2) {
                    p.push("store.lease_ttl: at least 2s".to_owned());
                }
                if self.password.is_some() && self.password_env.is_some() {
                    p.push("store: set `password_env` or `password`, not both".to_owned());
                }
                if (self.password.is_some() || self.password_env.is_some())
                    != self.username.is_some()
                {
                    p.push("store: `username` and a password go together".to_owned());
                }
                if let Some(t) = &self.tls
                    && t.cert.is_some() != t.key.is_some()
                {
                    p.push("store.tls: `cert` and `key` go together".to_owned());
                }
                if let Some(a) = &self.advertise
                    && !(a.starts_with("http://") || a.starts_with("https://"))
                {
                    p.push(format!("store.advertise: `{a}` is not an http(s):// URL"));
                }
                if !self.path.as_os_str().is_empty() {
                    p.push("store.path: is for kind = \"sqlite\"".to_owned());
                }
            }
        }
    }
}

/// Who may change things through the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The bearer token, written in the file.
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// The environment variable holding the bearer token (preferred over `token`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// `[api.tls]`: serve the API over HTTPS only.
    #[serde(default)]
    pub tls: Option<ApiTls>,
    /// A token that may read (every `GET /v1/...`) but change nothing, written in
    /// the file. The change token reads too.
    #[serde(default, skip_serializing)]
    pub read_token: Option<String>,
    /// The environment variable holding the read-only token (preferred over
    /// `read_token`).
    #[serde(default)]
    pub read_token_env: Option<String>,
    /// The largest request body the API reads, in bytes (larger: `413`); 4 MiB by
    /// default (a map of 10 000 pins is about 0.2 MiB).
    #[serde(default = "default_max_body")]
    pub max_body: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token: None,
            token_env: None,
            tls: None,
            read_token: None,
            read_token_env: None,
            max_body: default_max_body(),
        }
    }
}

/// How Envoy runs the base-router filter (what goes into the ECDS resource).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The HttpFilter's name in the bootstraps: the ECDS resource name.
    #[serde(default = "default_filter_name")]
    pub name: String,
    /// The filter's `.wasm` on the Envoy hosts.
    pub wasm: PathBuf,
    /// The routing header (`cluster_header` of the route).
    #[serde(default = "default_header")]
    pub header: String,
    /// Seconds a client of a fenced base is told to wait.
    #[serde(default = "default_retry_after")]
    pub retry_after: u32,
    /// Edges stamp every routed request with `x-shard-map-version` (the map version
    /// that routed it, for the dtable-server's logs); `false` saves a host call per
    /// request.
    #[serde(default = "default_version_header")]
    pub version_header: bool,
    #[serde(default = "default_root_id")]
    pub root_id: String,
    #[serde(default = "default_vm_id")]
    pub vm_id: String,
    #[serde(default = "default_runtime")]
    pub runtime: String,
}

/// Timeouts of the steps of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// How long every connected Envoy has to ACK a pushed configuration.
    #[serde(default = "default_ack_timeout", with = "daemon::duration::serde")]
    pub ack_timeout: Duration,
    /// How long a restarted server has to answer `pong`.
    #[serde(default = "default_health_timeout", with = "daemon::duration::serde")]
    pub health_timeout: Duration,
    /// Longest a restart hook may run (unless the hook sets its own).
    #[serde(default = "default_restart_timeout", with = "daemon::duration::serde")]
    pub restart_timeout: Duration,
    /// How long to wait, once the fence is ACKed, before the first restart: a request
    /// routed (or passed by a guard) just before the fence may still be waiting for
    /// a connection to its server, and must reach the old process, not the restarted
    /// one. Default: the longest `connect_timeout` of the servers (Envoy does not
    /// retry: a queued request connects or fails within it).
    #[serde(default, with = "daemon::duration::serde_opt")]
    pub drain: Option<Duration>,
    /// How many servers a rollout restarts at once (each with its own hook timeout
    /// and health wait); `push-map --parallel N` sets it for one rollout. 1: one
    /// after another.
    #[serde(default = "default_max_parallel_restarts")]
    pub max_parallel_restarts: usize,
}

fn default_max_parallel_restarts() -> usize {
    1
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            ack_timeout: default_ack_timeout(),
            health_timeout: default_health_timeout(),
            restart_timeout: default_restart_timeout(),
            drain: None,
            max_parallel_restarts: default_max_parallel_restarts(),
        }
    }
}

/// One dtable-server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The Envoy cluster name, as the map names it.
    pub name: String,
    /// `host:port` Envoy connects to (an IP gives a STATIC cluster, a name STRICT_DNS).
    pub address: String,
    /// A URL answering `pong` when the server is up; default `http://ADDRESS/ping/`.
    #[serde(default)]
    pub health_url: Option<String>,
    #[serde(default = "default_connect_timeout", with = "daemon::duration::serde")]
    pub connect_timeout: Duration,
    /// How to restart it during a rollout.
    #[serde(default)]
    pub restart: RestartHook,
    /// Every request reaches it through its guard (an Envoy made by `seactl
    /// envoy-bootstrap --kind guard --server NAME`, the only way in), and `address`
    /// is the guard's. A rollout whose moved bases leave or reach only guarded
    /// servers waits for those guards' ACKs, not for the edges'.
    #[serde(default)]
    pub guarded: bool,
}

impl ServerConfig {
    /// The health URL, defaulted.
    pub fn health_url(&self) -> String {
        self.health_url
            .clone()
            .unwrap_or_else(|| format!("http://{}/ping/", self.address))
    }

    /// Host and port of `address` (validated at load).
    pub fn host_port(&self) -> (&str, u16) {
        split_host_port(&self.address).unwrap_or((self.address.as_str(), 0))
    }
}

/// How a server is restarted during a rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum RestartHook {
    /// Run a program (no shell), wait for it to exit 0.
    Command {
        argv: Vec<String>,
        #[serde(default, with = "daemon::duration::serde_opt")]
        timeout: Option<Duration>,
    },
    /// Call a URL (`http://`, or `https://` verified against `ca`), wait for a 2xx
    /// answer. Header values are secrets: never shown, logged or stored; keep them out
    /// of the TOML with `headers_env` or `headers_file`.
    Http {
        #[serde(default = "default_method")]
        method: String,
        url: String,
        #[serde(default)]
        headers: BTreeMap<String, String>,
        /// Header name → the environment variable holding its value.
        #[serde(default)]
        headers_env: BTreeMap<String, String>,
        /// A file of `Name: value` lines (relative to the config file).
        #[serde(default)]
        headers_file: Option<PathBuf>,
        #[serde(default, with = "daemon::duration::serde_opt")]
        timeout: Option<Duration>,
        /// For an `https://` URL: the CA (PEM, relative to the config file) its
        /// server's certificate must chain to, e.g. `seactl certs`' `ca.crt`.
        /// Without it, the webpki (Mozilla) roots.
        #[serde(default)]
        ca: Option<PathBuf>,
    },
    /// An operator restarts it and confirms (`seactl rollout confirm SERVER`).
    #[default]
    Manual,
}

impl RestartHook {
    /// The hook as an API answer may show it: header names but never their values,
    /// a URL without its user info or query values, and a command with every
    /// argument that looks like it carries a secret replaced by `<redacted>`.
    pub fn redacted(&self) -> serde_json::Value {
        match self {
            RestartHook::Command { argv, timeout } => serde_json::json!({
                "kind": "command",
                "argv": shown_argv(argv),
                "timeout": timeout.map(|t| format!("{}ms", t.as_millis())),
            }),
            RestartHook::Http {
                method,
                url,
                headers,
                headers_env,
                headers_file,
                timeout,
                ca,
            } => serde_json::json!({
                "kind": "http",
                "method": method,
                "url": redact_url(url),
                "headers": headers.keys().map(|k| (k.clone(), REDACTED)).collect::<BTreeMap<_, _>>(),
                "headers_env": headers_env,
                "headers_file": headers_file,
                "timeout": timeout.map(|t| format!("{}ms", t.as_millis())),
                "ca": ca,
            }),
            RestartHook::Manual => serde_json::json!({ "kind": "manual" }),
        }
    }

    /// An HTTP hook's headers: `headers`, then `headers_env`, then `headers_file`.
    /// Errors name the variable or file, never a value.
    pub fn http_headers(&self) -> Result<Vec<(String, String)>, String> {
        let RestartHook::Http {
            headers,
            headers_env,
            headers_file,
            ..
        } = self
        else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, var) in headers_env {
            let v =
                std::env::var(var).map_err(|_| format!("header `{name}`: ${var} is not set"))?;
            out.push((name.clone(), v));
        }
        if let Some(path) = headers_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("headers_file {}: {}", path.display(), e.kind()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (k, v) = line.split_once(':').ok_or_else(|| {
                    format!(
                        "headers_file {} line {}: not `Name: value`",
                        path.display(),
                        i + 1
                    )
                })?;
                out.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        for (k, _) in &out {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                return Err(format!("header name `{k}` is not a header name"));
            }
        }
        Ok(out)
    }

    /// Every secret value the hook holds (to scrub from messages): the values of
    /// `headers` (its [`RestartHook::http_headers`], read once by the caller) and its
    /// URL's user info and query values.
    pub fn secrets(&self, headers: &[(String, String)]) -> Vec<String> {
        let mut out: Vec<String> = headers.iter().map(|(_, v)| v.clone()).collect();
        if let RestartHook::Http { url, .. } = self {
            out.extend(url_secrets(url));
        }
        out.retain(|s| s.len() >= 4);
        out
    }
}

impl Config {
    /// Reads, parses and validates `path`; relative paths inside become relative to it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            },
            other => other,
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        if config.store.kind == StoreKind::Sqlite {
            config.store.path = dir.join(&config.store.path);
        }
        if let Some(t) = &mut config.store.tls {
            t.ca = dir.join(&t.ca);
            for p in [&mut t.cert, &mut t.key].into_iter().flatten() {
                *p = dir.join(&*p);
            }
        }
        for s in &mut config.servers {
            if let RestartHook::Http {
                headers_file, ca, ..
            } = &mut s.restart
            {
                for f in [headers_file, ca].into_iter().flatten() {
                    *f = dir.join(&*f);
                }
            }
        }
        config.initial_map = config.initial_map.map(|p| dir.join(p));
        if let Some(t) = &mut config.listen.tls {
            for p in [&mut t.cert, &mut t.key, &mut t.client_ca] {
                *p = dir.join(&*p);
            }
        }
        if let Some(t) = &mut config.api.tls {
            for p in [&mut t.cert, &mut t.key] {
                *p = dir.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses and validates TOML text (paths as written).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: PathBuf::new(),
                problems,
            })
        }
    }

    /// Everything wrong that TOML types do not catch.
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.servers.is_empty() {
            p.push("no [[server]]: name at least one dtable-server".to_owned());
        }
        self.store.problems(&mut p);
        let mut seen = HashSet::new();
        for (i, s) in self.servers.iter().enumerate() {
            let at = format!("server[{i}]");
            if let Err(e) = check_server_name(&s.name) {
                p.push(format!("{at}.name: {e}"));
            }
            if !seen.insert(s.name.as_str()) {
                p.push(format!("{at}.name: `{}` is named twice", s.name));
            }
            if split_host_port(&s.address).is_none() {
                p.push(format!(
                    "{at}.address: `{}` is not HOST:PORT with a port from 1 to 65535",
                    s.address
                ));
            }
            if !s.health_url().starts_with("http://") {
                p.push(format!(
                    "{at}.health_url: `{}` is not an http:// URL",
                    s.health_url()
                ));
            }
            match &s.restart {
                RestartHook::Command { argv, .. } if argv.is_empty() => {
                    p.push(format!("{at}.restart.argv: empty"));
                }
                RestartHook::Http { url, .. }
                    if !url.starts_with("http://") && !url.starts_with("https://") =>
                {
                    p.push(format!(
                        "{at}.restart.url: `{url}` is not an http:// or https:// URL"
                    ));
                }
                RestartHook::Http {
                    url, ca: Some(_), ..
                } if url.starts_with("http://") => {
                    p.push(format!(
                        "{at}.restart.ca: `{url}` is not an https:// URL: the CA would not be \
                         used (and the headers would travel in clear)"
                    ));
                }
                RestartHook::Http { url, .. }
                    if url
                        .split_once("://")
                        .map_or(url.as_str(), |(_, rest)| rest)
                        .split('/')
                        .next()
                        .is_some_and(|a| a.contains('@')) =>
                {
                    p.push(format!(
                        "{at}.restart.url: user info (`user:password@`) is not supported: send \
                         credentials as a header, e.g. headers_env = {{ authorization = \"VAR\" }}"
                    ));
                }
                RestartHook::Http { method, .. }
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) =>
                {
                    p.push(format!(
                        "{at}.restart.method: `{method}` is not an HTTP method (e.g. POST)"
                    ));
                }
                _ => {}
            }
        }
        let probe = shardmap::RouterConfig {
            header: self.filter.header.clone(),
            retry_after: self.filter.retry_after,
            ..shardmap::RouterConfig::new(1, self.fallback_map())
        };
        if let Err(problems) = probe.compile() {
            for e in problems
                .iter()
                .filter(|e| e.at == "header" || e.at == "retry_after")
            {
                p.push(format!("filter.{}: {}", e.at, e.message));
            }
        }
        for (field, v) in [
            ("name", &self.filter.name),
            ("root_id", &self.filter.root_id),
            ("vm_id", &self.filter.vm_id),
            ("runtime", &self.filter.runtime),
        ] {
            if v.is_empty() {
                p.push(format!("filter.{field}: empty"));
            }
        }
        if self.filter.wasm.as_os_str().is_empty() {
            p.push("filter.wasm: empty".to_owned());
        }
        if self.rollout.max_parallel_restarts == 0 {
            p.push("rollout.max_parallel_restarts: must be at least 1".to_owned());
        }
        if let (None, None) = (&self.api.token, &self.api.token_env) {
            p.push(
                "api: set `token_env` (or `token`): the API refuses every change without a token"
                    .to_owned(),
            );
        }
        p
    }

    /// The bearer token of the API: from `api.token_env` if set, else `api.token`.
    pub fn api_token(&self) -> Result<String, ConfigError> {
        let api = &self.api;
        token(&api.token_env, &api.token, "token_env", "token")?
            .ok_or_else(|| invalid("api: no token".into()))
    }

    /// The read-only token of the API, if one is set: from `api.read_token_env`, else
    /// `api.read_token`.
    pub fn api_read_token(&self) -> Result<Option<String>, ConfigError> {
        let api = &self.api;
        token(
            &api.read_token_env,
            &api.read_token,
            "read_token_env",
            "read token",
        )
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// The map served while the store holds none and no `initial_map` is given.
    pub fn fallback_map(&self) -> ShardMap {
        ShardMap {
            default: self
                .servers
                .first()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            ..ShardMap::default()
        }
    }
}

/// A token from its environment variable (`api.VAR_FIELD`) if one is named, else as
/// written; at least 8 characters. Errors name the field, never a value.
fn token(
    var: &Option<String>,
    written: &Option<String>,
    var_field: &str,
    what: &str,
) -> Result<Option<String>, ConfigError> {
    let token = match (var, written) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| invalid(format!("api.{var_field}: ${var} is not set")))?,
        (None, Some(t)) => t.clone(),
        (None, None) => return Ok(None),
    };
    if token.len() < 8 {
        return Err(invalid(format!(
            "api: the {what} is shorter than 8 characters"
        )));
    }
    Ok(Some(token))
}

fn invalid(problem: String) -> ConfigError {
    ConfigError::Invalid {
        path: PathBuf::new(),
        problems: vec![problem],
    }
}

/// `host:port` → (host, port); IPv6 hosts in brackets.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    (!host.is_empty() && !host.contains('/')).then_some((host, port))
}

fn default_filter_name() -> String {
    DEFAULT_FILTER_NAME.to_owned()
}
fn default_header() -> String {
    DEFAULT_HEADER.to_owned()
}
fn default_retry_after() -> u32 {
    DEFAULT_RETRY_AFTER
}
fn default_root_id() -> String {
    "base_router".to_owned()
}
fn default_vm_id() -> String {
    "seashard".to_owned()
}
fn default_runtime() -> String {
    "envoy.wasm.runtime.v8".to_owned()
}
fn default_method() -> String {
    "POST".to_owned()
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_restart_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// How long a guard waits for a connection to its server (its local, or firewalled,
/// dtable-server: connecting is immediate or refused). A rollout's drain (`rollout`) lasts at
/// least this long before it restarts a guarded server: a request the guard passed
/// just before the fence connects to the old process or fails within it.
pub const GUARD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// This host's name: `$HOSTNAME`, else `/proc/sys/kernel/hostname`, else
/// `/etc/hostname`; the first that is not empty.
pub fn local_hostname() -> Option<String> {
    let env = std::env::var("HOSTNAME").ok();
    let files = ["/proc/sys/kernel/hostname", "/etc/hostname"];
    env.into_iter()
        .chain(files.iter().filter_map(|f| std::fs::read_to_string(f).ok()))
        .map(|h| h.trim().to_owned())
        .find(|h| sanitize_hostname(h).is_some())
}

/// `hostname` lowercased, `[a-z0-9.-]` only, at most 63 characters, trimmed of `-`
/// and `.`; `None` when nothing is left.
pub fn sanitize_hostname(hostname: &str) -> Option<String> {
    let s: String = hostname
        .trim()
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let s = s.trim_matches(|c| c == '-' || c == '.');
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [listen]
        grpc = "127.0.0.1:18000"
        http = "127.0.0.1:18080"
        [store]
        path = "state.db"
        [api]
        token = "secret-token"
        [filter]
        wasm = "/opt/seashard/base-router.wasm"
        [rollout]
        ack_timeout = "500ms"
        [[server]]
        name = "dtable-server"
        address = "127.0.0.1:5000"
        [[server]]
        name = "dtable-server-2"
        address = "dtable-server-2:5000"
        restart = { kind = "command", argv = ["systemctl", "restart", "x"], timeout = "30s" }
        [[server]]
        name = "dtable-server-3"
        address = "10.0.0.3:5000"
        restart = { kind = "http", url = "http://10.0.0.3:9000/restart", headers = { "x-a" = "b" } }
    "#;

    #[test]
    fn parses_a_full_config_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.filter.name, "seashard.base_router");
        assert_eq!(c.filter.header, "x-dtable-server");
        assert_eq!(c.rollout.ack_timeout, Duration::from_millis(500));
        assert_eq!(c.rollout.health_timeout, Duration::from_secs(60));
        assert_eq!(c.servers[0].health_url(), "http://127.0.0.1:5000/ping/");
        assert_eq!(c.servers[0].restart, RestartHook::Manual);
        assert_eq!(
            c.servers[1].restart,
            RestartHook::Command {
                argv: vec!["systemctl".into(), "restart".into(), "x".into()],
                timeout: Some(Duration::from_secs(30))
            }
        );
        assert!(
            matches!(c.servers[2].restart, RestartHook::Http { ref method, .. } if method == "POST")
        );
        assert_eq!(c.api_token().unwrap(), "secret-token");
        assert_eq!(c.fallback_map().default, "dtable-server");
    }

    #[test]
    fn reports_every_problem() {
        let bad = GOOD
            .replace("\"127.0.0.1:5000\"", "\"nowhere\"")
            .replace("name = \"dtable-server-3\"", "name = \"dtable-server\"")
            .replace("[filter]", "[filter]\nheader = \"X Bad\"");
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&bad) else {
            panic!("accepted")
        };
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("server[0].address")));
        assert!(problems.iter().any(|p| p.contains("named twice")));
        assert!(problems.iter().any(|p| p.starts_with("filter.header")));
    }

    #[test]
    fn an_https_hook_takes_a_ca_relative_to_the_file() {
        let hook = |url: &str, ca: &str| {
            GOOD.replace(
                "url = \"http://10.0.0.3:9000/restart\"",
                &format!("url = \"{url}\"{ca}"),
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seashard.toml");
        std::fs::write(
            &path,
            hook("https://agent-3:5055/restart", ", ca = \"tls/ca.crt\""),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let RestartHook::Http { ca, .. } = &c.servers[2].restart else {
            panic!("not an HTTP hook")
        };
        assert_eq!(ca.as_deref(), Some(dir.path().join("tls/ca.crt").as_path()));
        assert_eq!(
            c.servers[2].restart.redacted()["ca"],
            dir.path().join("tls/ca.crt").display().to_string()
        );
        // Without a CA: the webpki roots.
        assert!(Config::parse(&hook("https://agent-3:5055/restart", "")).is_ok());
        for (url, ca, problem) in [
            (
                "http://agent-3:5055/restart",
                ", ca = \"ca.crt\"",
                "restart.ca",
            ),
            (
                "ftp://agent-3/restart",
                "",
                "not an http:// or https:// URL",
            ),
            ("https://u:p@agent-3/restart", "", "user info"),
        ] {
            let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&hook(url, ca)) else {
                panic!("{url} accepted")
            };
            assert!(problems.iter().any(|p| p.contains(problem)), "{problems:?}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let bad = GOOD.replace("ack_timeout = \"500ms\"", "ack_timeout = \"soon\"");
        let err = Config::parse(&bad).unwrap_err().to_string();
        assert!(err.contains("ack_timeout") || err.contains("soon"), "{err}");
        let bad = GOOD.replace("[store]", "[store]\ncolour = 1");
        assert!(
            Config::parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("colour")
        );
    }

    #[test]
    fn the_example_file_parses() {
        let c = Config::parse(include_str!("../seashard.example.toml")).unwrap();
        assert_eq!(c.servers.len(), 3);
        assert_eq!(c.servers[2].restart, RestartHook::Manual);
        assert!(
            matches!(c.servers[1].restart, RestartHook::Http { ref headers, .. } if headers.len() == 1)
        );
    }

    #[test]
    fn an_etcd_store_is_checked_as_a_whole() {
        let etcd = GOOD.replace(
            "path = \"state.db\"",
            "kind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\", \"http://127.0.0.2:2379\"]",
        );
        let c = Config::parse(&etcd).unwrap();
        assert_eq!(c.store.kind, StoreKind::Etcd);
        assert_eq!(c.store.prefix, "/seashard");
        assert_eq!(c.store.lease_ttl, Duration::from_secs(5));
        let bad = GOOD.replace(
            "path = \"state.db\"",
            "kind = \"etcd\"\npath = \"x.db\"\nendpoints = [\"127.0.0.1:2379\"]\nprefix = \"x/\"\n\
             lease_ttl = \"1s\"\nusername = \"u\"\ntls = { ca = \"ca.pem\", cert = \"c.pem\" }",
        );
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&bad) else {
            panic!("accepted a broken etcd store")
        };
        let all = problems.join("\n");
        for needle in [
            "`127.0.0.1:2379` is not https://HOST:PORT",
            "store.prefix",
            "store.lease_ttl",
            "`username` and a password go together",
            "`cert` and `key` go together",
            "store.path: is for kind = \"etcd\""
                .replace("etcd", "sqlite")
                .as_str(),
        ] {
            assert!(all.contains(needle), "{needle} missing from {all}");
        }
        let sqlite_without_path = GOOD.replace("path = \"state.db\"", "");
        assert!(Config::parse(&sqlite_without_path).is_err());
    }
}
