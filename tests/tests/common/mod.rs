//! The control plane in-process for end-to-end tests: on loopback, in its own tokio
//! runtime, so that dropping the runtime without any shutdown is its SIGKILL
//! (sockets closed, nothing flushed).

// Each test file uses the part it needs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use control_plane::{Config, ControlPlane, Running};
use seashard_tests::{http, wait_until};
use serde_json::Value;

/// The API token of the tests' control planes.
pub const TOKEN: &str = "e2e-token-0123456";

/// The control plane under test.
pub struct Cp {
    rt: tokio::runtime::Runtime,
    running: Option<Running>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub plane: Arc<ControlPlane>,
}

impl Cp {
    /// Opens the store of `config` and serves ADS and the HTTP API.
    pub fn start(config: Config) -> Result<Cp> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let plane = ControlPlane::open(config)?;
        // A killed predecessor's listener may take a moment to be gone.
        let running = wait_until(Duration::from_secs(10), "the ADS port to be free", || {
            rt.block_on(control_plane::start(plane.clone(), TOKEN))
                .map(Some)
                .map_err(Into::into)
        })?;
        Ok(Cp {
            http: running.http_addr,
            grpc: running.grpc_addr,
            running: Some(running),
            rt,
            plane,
        })
    }

    /// Gone at once, as with SIGKILL: no shutdown, no flush.
    pub fn kill(mut self) {
        self.running.take();
        let Cp { rt, .. } = self;
        rt.shutdown_background();
    }

    /// Runs `future` on the control plane's runtime.
    pub fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.block_on(future)
    }

    /// `GET path` as JSON, with the token.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        http::get_json(self.http, path, TOKEN)
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Value> {
        self.get_json("/v1/status")
    }

    /// `POST path` with the token; status and JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        http::post_json(self.http, path, TOKEN, body)
    }
}

/// One REST-JSON poll of base-router's ECDS (`POST /v3/discovery:extension_configs`)
/// by node `id` running `running`, from the loopback address `source` (an Envoy on
/// another host): the HTTP status and the JSON body (`Null` when there is none).
pub fn rest_poll(cp: &Cp, source: [u8; 4], id: &str, running: &str) -> Result<(u16, Value)> {
    use std::io::{Read as _, Write as _};
    let body = serde_json::json!({"version_info": running, "node": {"id": id, "cluster": "edge"},
                                  "resource_names": ["seashard.base_router"]})
    .to_string();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(std::net::IpAddr::from(source), 0).into())?;
    socket.connect_timeout(&cp.http.into(), Duration::from_secs(5))?;
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /v3/discovery:extension_configs HTTP/1.1\r\nhost: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        cp.http,
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or_default();
    Ok((status, body))
}

/// The generator's bootstrap of a guard of `server` (node `node_id`) in front of
/// `upstream`, as a document to edit: its listener and admin on any loopback port,
/// its control plane port 1 (privileged: nothing of ours ever listens there), so
/// the filter keeps running its `default_config`: `config` when given (inline),
/// else the bootstrap's placeholder (no map yet).
pub fn offline_guard_bootstrap(
    node_id: &str,
    server: &str,
    upstream: SocketAddr,
    config: Option<&shardmap::RouterConfig>,
) -> Result<serde_yaml::Value> {
    use deploy::bootstrap::{Kind, Options, render};
    use seashard_tests::{bootstrap, loopback, wasm_file};
    let yaml = render(&Options {
        node_id: node_id.into(),
        control_plane: "127.0.0.1:1".into(),
        wasm: wasm_file("base_router.wasm")?,
        listen_port: 0,
        admin_port: 0,
        upstream: upstream.to_string(),
        ..Options::new(Kind::Guard {
            server: server.into(),
        })
    })?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    bootstrap::set_listener(&mut doc, 0, loopback(0))?;
    if let Some(config) = config {
        let plugin = bootstrap::ecds_default_plugin(&mut doc)?;
        *bootstrap::at(plugin, &["configuration", "value"])? = config.to_json().into();
    }
    Ok(doc)
}

/// The text of a control plane config on etcd: keys under `prefix` on `endpoints`, this replica
/// named `replica`, a lease of 2 s, requests timing out after `timeout`; listening
/// on any loopback ports, the tests' token, the filter `wasm` (a path an Envoy
/// loads, else any). `rest` follows: `[rollout]`, `[[server]]`, ...
pub fn etcd_config(
    endpoints: &[String],
    prefix: &str,
    replica: &str,
    timeout: &str,
    wasm: &str,
    rest: &str,
) -> String {
    // A JSON array of strings is a TOML array too (as `replicas` writes it).
    let list = serde_json::to_string(endpoints).unwrap_or_default();
    format!(
        r#"
        [listen]
        grpc = "127.0.0.1:0"
        http = "127.0.0.1:0"
        [store]
        kind = "etcd"
        endpoints = {list}
        prefix = "{prefix}"
        replica = "{replica}"
        lease_ttl = "2s"
        timeout = "{timeout}"
        [api]
        token = "{TOKEN}"
        [filter]
        wasm = {wasm:?}
        {rest}"#
    )
}

/// Two servers `a` and `b` (at a port nothing answers), restarted by hand.
pub const SERVERS_A_B: &str = r#"
        [[server]]
        name = "a"
        address = "127.0.0.1:9"
        restart = { kind = "manual" }
        [[server]]
        name = "b"
        address = "127.0.0.1:9"
        restart = { kind = "manual" }
"#;

/// Stops `writers`, then every server of `ha` (final saves): what became of the
/// writes, also printed.
pub fn stop_writers(
    ha: &mut seashard_tests::replicas::HaSetup,
    writers: Vec<seashard_tests::dtable::Writers>,
) -> Result<seashard_tests::lost_writes::Outcome> {
    use seashard_tests::dtable::Writers;
    let logs = writers.into_iter().map(Writers::stop).collect();
    let outcome = seashard_tests::lost_writes::Outcome::from_logs(&mut ha.cluster, logs)?;
    eprintln!(
        "writes: {} (refused: {:?})",
        outcome.summary(),
        outcome.refused
    );
    Ok(outcome)
}

/// A control plane config on a SQLite store in `dir` (written there as
/// `seashard.toml`, `initial` as `initial.json`): ADS on `grpc_port` (0: any), the
/// HTTP API on any port, the tests' token, the filter `wasm`; `rest` (TOML: more of
/// `[filter]`, `[rollout]`, ...) follows the `wasm` line, then a `[[server]]` for
/// each of `servers`.
pub fn sqlite_config(
    dir: &std::path::Path,
    grpc_port: u16,
    wasm: &std::path::Path,
    initial: &Value,
    rest: &str,
    servers: &[&seashard_tests::Upstream],
) -> Result<Config> {
    std::fs::write(dir.join("initial.json"), initial.to_string())?;
    let mut text = format!(
        "initial_map = \"initial.json\"\n\
         [listen]\ngrpc = \"127.0.0.1:{grpc_port}\"\nhttp = \"127.0.0.1:0\"\n\
         [store]\npath = \"seashard.db\"\n\
         [api]\ntoken = \"{TOKEN}\"\n\
         [filter]\nwasm = {wasm:?}\n{rest}"
    );
    for u in servers {
        text.push_str(&format!(
            "[[server]]\nname = \"{}\"\naddress = \"{}\"\n",
            u.name, u.addr
        ));
    }
    let path = dir.join("seashard.toml");
    std::fs::write(&path, text)?;
    Ok(Config::load(&path)?)
}

/// An Envoy bootstrapped by the generator (`seactl envoy-bootstrap`), on loopback.
pub fn start_envoy(
    kind: deploy::bootstrap::Kind,
    node_id: &str,
    cp: SocketAddr,
    wasm: &std::path::Path,
) -> Result<seashard_tests::Envoy> {
    start_envoy_with(deploy::bootstrap::Options {
        node_id: node_id.into(),
        control_plane: cp.to_string(),
        wasm: wasm.to_path_buf(),
        ..deploy::bootstrap::Options::new(kind)
    })
}

/// As [`start_envoy`], with every option given (ports are set to 0 here).
pub fn start_envoy_with(options: deploy::bootstrap::Options) -> Result<seashard_tests::Envoy> {
    use seashard_tests::bootstrap;
    let yaml = deploy::bootstrap::render(&deploy::bootstrap::Options {
        listen_port: 0,
        admin_port: 0,
        ..options
    })?;
    // The edge listens on every interface; the tests stay on loopback.
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    bootstrap::set_listener(&mut doc, 0, "127.0.0.1:0".parse()?)?;
    seashard_tests::Envoy::start(&bootstrap::to_yaml(&doc)?)
}
