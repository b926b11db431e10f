//! Part (b) of the lost-write experiment: the same cluster, writers and map change as
//! [`crate::lost_writes`], with a real `seactl serve` process rolling the change out to
//! a real Envoy (bootstrapped by `seactl envoy-bootstrap`), optionally killed with
//! SIGKILL at a chosen moment of the rollout and started again on the same store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::dtable::{Cluster, FakeDtableServer, Writers, spread_bases};
use crate::http::{get_json, post_json};
use crate::lost_writes::{
    BASES, ENVOY_SERVERS, MAX_WRITES_PER_THREAD, Outcome, SAVE_INTERVAL, WAIT, WRITERS,
    wait_until_a_moved_base_is_loaded_by,
};
use crate::process::{Proc, find_binary};
use crate::{Envoy, bootstrap, free_port, get, loopback, wait_until, wasm_file};

/// The API token of the experiment's control plane.
pub const TOKEN: &str = "lost-write-experiment-token";

/// The `seactl` binary: `$SEACTL_BIN`, else the one cargo built in the target
/// directory holding the running test or binary.
pub fn seactl_bin() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("seactl"));
        }
    }
    find_binary(
        "SEACTL_BIN",
        &candidates,
        "build it with `cargo build -p seactl` (same profile), or set SEACTL_BIN",
    )
}

/// A `seactl serve` process on fixed loopback ports, so a restarted one is found
/// by the Envoys where the killed one was.
pub struct ControlPlaneProcess {
    config: PathBuf,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    proc: Option<Proc>,
    starts: usize,
    /// Environment variables of the process (e.g. a hook's `headers_env`).
    env: Vec<(String, String)>,
}

impl ControlPlaneProcess {
    /// Starts `seactl serve --config CONFIG` and waits until `/healthz` answers.
    pub fn start(config: &Path, http: SocketAddr, grpc: SocketAddr) -> Result<Self> {
        Self::start_with_env(config, http, grpc, &[])
    }

    /// [`ControlPlaneProcess::start`] with these environment variables set.
    pub fn start_with_env(
        config: &Path,
        http: SocketAddr,
        grpc: SocketAddr,
        env: &[(String, String)],
    ) -> Result<Self> {
        let mut cp = ControlPlaneProcess {
            config: config.to_owned(),
            http,
            grpc,
            proc: None,
            starts: 0,
            env: env.to_vec(),
        };
        cp.start_again()?;
        Ok(cp)
    }

    /// Starts the process again (after [`ControlPlaneProcess::kill`]).
    pub fn start_again(&mut self) -> Result<()> {
        self.starts += 1;
        let dir = self.config.parent().unwrap_or(Path::new("."));
        let log = std::fs::File::create(dir.join(format!("serve-{}.log", self.starts)))?;
        let mut cmd = Command::new(seactl_bin()?);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut proc = Proc::spawn(cmd, "seactl serve")?;
        let http = self.http;
        let ready = wait_until(
            Duration::from_secs(20),
            "seactl serve to answer /healthz",
            || {
                if let Some(status) = proc.exited() {
                    bail!("seactl serve exited: {status}");
                }
                Ok(get(http, "/healthz", &[])
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|_| ()))
            },
        );
        self.proc = Some(proc);
        ready.with_context(|| self.logs())
    }

    /// SIGKILL: no shutdown, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The pid while it runs (a stopped process included), `None` once it exited.
    pub fn pid(&mut self) -> Option<u32> {
        let p = self.proc.as_mut()?;
        p.exited().is_none().then(|| p.pid())
    }

    /// Sends `signal` to the process only, not to its group: a restart hook it
    /// started keeps running, as after a real crash (`SIGKILL`) or pause (`SIGSTOP`).
    /// The hook is killed with the group when this handle is dropped or started again.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        match &self.proc {
            Some(p) => p.signal(signal),
            None => bail!("seactl serve is not running"),
        }
    }

    /// The log of its latest start.
    pub fn last_log(&self) -> String {
        let dir = self.config.parent().unwrap_or(Path::new("."));
        std::fs::read_to_string(dir.join(format!("serve-{}.log", self.starts))).unwrap_or_default()
    }

    /// Everything every start of it logged.
    pub fn logs(&self) -> String {
        let dir = self.config.parent().unwrap_or(Path::new("."));
        (1..=self.starts)
            .map(|i| {
                std::fs::read_to_string(dir.join(format!("serve-{i}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n--- restarted ---\n")
    }

    /// `POST path` with the token; status and JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        post_json(self.http, path, TOKEN, body)
    }

    /// `GET path` as JSON, with the token (an error while the process is down).
    pub fn get_json(&self, path: &str) -> Result<Value> {
        get_json(self.http, path, TOKEN)
    }

    /// `POST /v1/maps` of `map` (a rollout: `202`), then the rollout's record once it
    /// ended (`done` or `rolled_back`), within `timeout`; errors carry its logs.
    pub fn push_and_wait(&self, map: &Value, comment: &str, timeout: Duration) -> Result<Value> {
        let (status, body) = self.post("/v1/maps", &json!({"map": map, "comment": comment}))?;
        if status != 202 {
            bail!("POST /v1/maps: {status} {body}");
        }
        let id = body["rollout"]
            .as_u64()
            .ok_or_else(|| anyhow!("no rollout id in {body}"))?;
        self.wait_rollout(id, timeout)
    }

    /// Rollout `id`'s record once it ended (`done` or `rolled_back`), within
    /// `timeout`; errors carry the logs.
    pub fn wait_rollout(&self, id: u64, timeout: Duration) -> Result<Value> {
        wait_until(timeout, "the rollout to end", || {
            let r = self.get_json(&format!("/v1/rollouts/{id}"))?;
            Ok(matches!(r["state"].as_str(), Some("done" | "rolled_back")).then_some(r))
        })
        .with_context(|| self.logs())
    }

    /// Waits until every node in `ids` is connected and ACKed the current filter config.
    pub fn wait_current(&self, ids: &[&str]) -> Result<()> {
        wait_until(WAIT, &format!("Envoys {ids:?} to be current"), || {
            let Ok(s) = self.get_json("/v1/status") else {
                return Ok(None);
            };
            let ok = ids.iter().all(|id| {
                s["nodes"].as_array().is_some_and(|a| {
                    a.iter().any(|n| {
                        n["id"] == *id && n["connected"] == true && n["state"]["ecds"] == "current"
                    })
                })
            });
            Ok(ok.then_some(()))
        })
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The experiment's maps: 0-7 on the first server, then 4-7 move to the second.
pub fn old_map() -> Value {
    let [a, b] = ENVOY_SERVERS;
    json!({"default": a, "slots": {"0-7": a, "8-f": b}})
}

/// The new map: bases 4-7 move from the first server to the second.
pub fn new_map() -> Value {
    let [a, b] = ENVOY_SERVERS;
    json!({"default": a, "slots": {"0-3": a, "4-f": b}})
}

/// The parts of a test control plane's `seashard.toml` that differ between tests;
/// [`ServeConfig::write`] adds the rest.
pub struct ServeConfig<'a> {
    /// The map of `initial.json`.
    pub initial_map: Value,
    /// More `[listen]` lines (keepalive settings).
    pub listen: &'a str,
    /// The `[store]` table's lines.
    pub store: &'a str,
    /// The `[rollout]` table's lines.
    pub rollout: &'a str,
    /// The `[[server]]` tables ([`server_table`]).
    pub servers: String,
}

impl ServeConfig<'_> {
    /// Writes `initial.json` and `seashard.toml` (on `http` and `grpc`, [`TOKEN`],
    /// the built base-router with `retry_after = 1`) into `dir`; the latter's path.
    pub fn write(&self, dir: &Path, http: SocketAddr, grpc: SocketAddr) -> Result<PathBuf> {
        std::fs::write(dir.join("initial.json"), self.initial_map.to_string())?;
        let wasm = wasm_file("base_router.wasm")?;
        let text = format!(
            "initial_map = \"initial.json\"\n\
             [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n{}\
             [store]\n{}\
             [api]\ntoken = \"{TOKEN}\"\n\
             [filter]\nwasm = {wasm:?}\nretry_after = 1\n\
             [rollout]\n{}{}",
            self.listen, self.store, self.rollout, self.servers
        );
        let path = dir.join("seashard.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// A `[[server]]` table: `name` at `address`, `extra` lines (e.g. `guarded = true`),
/// restarted by the command `argv`.
pub fn server_table(
    name: &str,
    address: SocketAddr,
    extra: &str,
    argv: &[String],
) -> Result<String> {
    Ok(format!(
        "[[server]]\nname = \"{name}\"\naddress = \"{address}\"\n{extra}\
         restart = {{ kind = \"command\", argv = {} }}\n",
        serde_json::to_string(argv)?
    ))
}

/// The control plane's configuration for `cluster`: restart hooks are
/// `fake-dtable-ctl restart` (SIGTERM, final save, start again).
pub fn write_config(
    dir: &Path,
    cluster: &Cluster,
    http: SocketAddr,
    grpc: SocketAddr,
) -> Result<PathBuf> {
    let mut servers = String::new();
    for s in &cluster.servers {
        servers += &server_table(&s.name, s.addr, "", &slow_hook(s.restart_hook()?))?;
    }
    ServeConfig {
        initial_map: old_map(),
        listen: "",
        store: "path = \"seashard.db\"\n",
        rollout: "ack_timeout = \"10s\"\nhealth_timeout = \"15s\"\nrestart_timeout = \"30s\"\n",
        servers,
    }
    .write(dir, http, grpc)
}

/// `hook` after a 300 ms pause: a restart step long enough for a kill to land in it
/// (a real dtable-server takes seconds to stop, save and start).
pub fn slow_hook(hook: Vec<String>) -> Vec<String> {
    delayed_hook("0.3", hook)
}

/// `hook` after `sleep DELAY` (seconds).
pub fn delayed_hook(delay: &str, hook: Vec<String>) -> Vec<String> {
    let mut argv = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        format!("sleep {delay}; exec \"$@\""),
        "sh".to_owned(),
    ];
    argv.extend(hook);
    argv
}

/// An edge Envoy bootstrapped by `seactl envoy-bootstrap`, listening on loopback.
pub fn start_envoy(node_id: &str, grpc: SocketAddr) -> Result<Envoy> {
    start_managed_envoy(&["--kind", "edge", "--node-id", node_id], grpc, loopback(0))
}

/// The guard Envoy of `server`, listening on `listen`: `seactl envoy-bootstrap --kind
/// guard` with the server's name and address, node id `guard-NAME`, then `extra`.
pub fn start_guard(
    server: &FakeDtableServer,
    extra: &[&str],
    grpc: SocketAddr,
    listen: SocketAddr,
) -> Result<Envoy> {
    let (upstream, node_id) = (server.addr.to_string(), format!("guard-{}", server.name));
    let mut args = vec![
        "--kind",
        "guard",
        "--server",
        server.name.as_str(),
        "--upstream",
        upstream.as_str(),
        "--node-id",
        node_id.as_str(),
    ];
    args.extend(extra);
    start_managed_envoy(&args, grpc, listen)
}

/// An Envoy bootstrapped by `seactl envoy-bootstrap ARGS --control-plane GRPC`, its
/// listener on `listen`, its admin interface on any free loopback port.
pub fn start_managed_envoy(args: &[&str], grpc: SocketAddr, listen: SocketAddr) -> Result<Envoy> {
    let wasm = wasm_file("base_router.wasm")?;
    let out = Command::new(seactl_bin()?)
        .arg("envoy-bootstrap")
        .args(args)
        .args([
            "--control-plane",
            &grpc.to_string(),
            "--listen-port",
            "0",
            "--admin-port",
            "0",
        ])
        .arg("--wasm")
        .arg(&wasm)
        .output()?;
    if !out.status.success() {
        bail!(
            "seactl envoy-bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut doc: serde_yaml::Value = serde_yaml::from_slice(&out.stdout)?;
    bootstrap::set_listener(&mut doc, 0, listen)?;
    Envoy::start(&bootstrap::to_yaml(&doc)?)
}

/// What the rollout of one run did.
#[derive(Debug, Clone)]
pub struct RolloutReport {
    /// `done` or `rolled_back`.
    pub state: String,
    /// The step the rollout was at when the control plane was killed.
    pub killed_at: Option<String>,
    /// How often a control plane resumed it after a restart.
    pub resumed: u64,
    /// The rollout's own time beyond the restarts, as the control plane measured it.
    pub overhead_ms: Option<u64>,
    pub elapsed: Duration,
}

/// When to SIGKILL the control plane: `extra` after the rollout is seen at `step`
/// (`plan`, `fence`, `restart` or `activate`; a step passed before it is seen kills at
/// the next one seen).
#[derive(Debug, Clone, Copy)]
pub struct Kill {
    pub step: &'static str,
    pub extra: Duration,
}

/// The steps a kill can aim at, in order.
pub const STEPS: [&str; 4] = ["plan", "fence", "restart", "activate"];

impl Kill {
    /// A step and a delay drawn from `seed` (xorshift).
    pub fn random(seed: u64) -> Kill {
        let x = crate::xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)();
        Kill {
            step: STEPS[(x % 4) as usize],
            extra: Duration::from_millis((x >> 8) % 40),
        }
    }
}

/// One run of part (b): writers through Envoy, a seashard rollout of the map change;
/// with `kill`, the control plane is SIGKILLed during the rollout and started again
/// on the same store. Then [`Outcome::collect`].
pub fn seashard_experiment(kill: Option<Kill>) -> Result<(Outcome, RolloutReport)> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-rollout-")
        .tempdir()?;
    let mut cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let config = write_config(dir.path(), &cluster, http, grpc)?;
    let mut cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let envoy = start_envoy("edge-1", grpc)?;
    cp.wait_current(&["edge-1"])?;

    let writers = Writers::start(
        envoy.listener_addr,
        &spread_bases(BASES),
        WRITERS,
        MAX_WRITES_PER_THREAD,
    );
    writers.wait_for_more(500, WAIT)?;
    wait_until_a_moved_base_is_loaded_by(&cluster, ENVOY_SERVERS[0])?;

    let began = Instant::now();
    let (status, body) = cp.post(
        "/v1/maps",
        &json!({"map": new_map(), "comment": "lost-write experiment"}),
    )?;
    if status != 202 {
        bail!("POST /v1/maps: {status} {body}");
    }
    let id = body["rollout"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rollout id in {body}"))?;
    let path = format!("/v1/rollouts/{id}");

    let mut killed_at = None;
    if let Some(kill) = kill {
        let aim = STEPS.iter().position(|s| *s == kill.step).unwrap_or(0);
        let seen = wait_until(WAIT, &format!("the rollout to reach {}", kill.step), || {
            let state = cp.get_json(&path)?["state"]
                .as_str()
                .unwrap_or("?")
                .to_owned();
            let at = STEPS
                .iter()
                .position(|s| *s == state)
                .unwrap_or(STEPS.len());
            Ok((at >= aim).then_some(state))
        })?;
        std::thread::sleep(kill.extra);
        cp.kill();
        killed_at = Some(seen);
        cp.start_again().context("start the control plane again")?;
    }
    let rollout = wait_until(Duration::from_secs(90), "the rollout to end", || {
        let Ok(r) = cp.get_json(&path) else {
            return Ok(None);
        };
        Ok(matches!(r["state"].as_str(), Some("done" | "rolled_back")).then_some(r))
    })
    .with_context(|| cp.logs())?;
    let elapsed = began.elapsed();
    let state = rollout["state"].as_str().unwrap_or_default().to_owned();
    if state == "done" {
        wait_until_a_moved_base_is_loaded_by(&cluster, ENVOY_SERVERS[1])?;
    }
    writers.wait_for_more(200, WAIT)?;
    let outcome = Outcome::collect(&mut cluster, writers)?;
    drop(envoy);
    Ok((
        outcome,
        RolloutReport {
            state,
            killed_at,
            resumed: rollout["resumed"].as_u64().unwrap_or(0),
            overhead_ms: rollout["overhead_ms"].as_u64(),
            elapsed,
        },
    ))
}
