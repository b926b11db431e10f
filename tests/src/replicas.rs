//! Several `seactl serve` replicas on one real etcd cluster (issue 9): the
//! lost-write experiment's fake dtable-servers (restarted by command hooks) and
//! writers, edge Envoys bootstrapped with every replica's ADS address, and the
//! leader found and killed, paused or resumed as a real process.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use seashard_tests::replicas::{HaSetup, Options};
//! let mut ha = HaSetup::start(&Options::default())?;
//! let leader = ha.wait_leader(None, std::time::Duration::from_secs(10))?;
//! ha.kill(leader)?;                       // SIGKILL, its hook keeps running
//! let (next, takeover) = ha.wait_leader_since(Some(leader))?;
//! # let _ = (next, takeover); Ok(()) }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::dtable::{Cluster, Writers, spread_bases};
use crate::etcd::EtcdCluster;
use crate::lost_writes::{BASES, ENVOY_SERVERS, MAX_WRITES_PER_THREAD, SAVE_INTERVAL};
use crate::rollout::{ControlPlaneProcess, TOKEN, old_map, slow_hook, start_managed_envoy};
use crate::{Connection, Envoy, free_port, get, loopback, wait_until, wasm_file};

/// The leader's lease of the tests: a dead leader is replaced after about this.
pub const LEASE_TTL: &str = "2s";
/// A bound on a takeover (lease, campaign, and a loaded 2-core machine).
pub const TAKEOVER_LIMIT: Duration = Duration::from_secs(15);
/// A bound on a rollout's end (ack timeout, restarts, a takeover or two).
pub const ROLLOUT_LIMIT: Duration = Duration::from_secs(60);

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// `seactl serve` replicas.
    pub replicas: usize,
    /// Edge Envoys, by node id; each is given every replica's ADS address, the
    /// `i`-th listing replica `i % replicas` first.
    pub envoys: Vec<String>,
    /// `[rollout] ack_timeout`.
    pub ack_timeout: &'static str,
    /// `[store] lease_ttl`.
    pub lease_ttl: &'static str,
    /// Put before each server's restart hook (`fake-dtable-ctl restart`): by default
    /// [`slow_hook`]'s 300 ms pause, so a kill can land while a hook runs.
    pub hook_prefix: Vec<String>,
    /// The replicas that reach etcd through relays ([`HaSetup::cut_etcd`] cuts
    /// their links silently while they keep serving their Envoys).
    pub etcd_relayed: Vec<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            replicas: 3,
            envoys: vec!["edge-1".into(), "edge-2".into()],
            ack_timeout: "4s",
            lease_ttl: LEASE_TTL,
            hook_prefix: slow_hook(Vec::new()),
            etcd_relayed: Vec::new(),
        }
    }
}

/// A 3-member etcd, the replicas, the fake dtable-servers and the Envoys; every
/// process is killed when it is dropped (Envoys first, etcd last).
pub struct HaSetup {
    pub envoys: Vec<Envoy>,
    pub replicas: Vec<ControlPlaneProcess>,
    pub cluster: Cluster,
    pub etcd: EtcdCluster,
    /// The key prefix of this setup in etcd.
    pub prefix: String,
    /// Per relayed replica (`Options::etcd_relayed`), a relay to each etcd member.
    pub etcd_relays: Vec<(usize, Vec<crate::relay::Relay>)>,
    dir: tempfile::TempDir,
}

impl HaSetup {
    /// Starts a 3-member etcd, `replicas` replicas (`[store] kind = "etcd"`,
    /// `lease_ttl` [`LEASE_TTL`], `drain` 200 ms, restart hooks `fake-dtable-ctl
    /// restart` after 300 ms), the Envoys, and waits until one replica leads and
    /// every Envoy is current.
    pub fn start(opts: &Options) -> Result<HaSetup> {
        let dir = tempfile::Builder::new().prefix("seashard-ha-").tempdir()?;
        let etcd = EtcdCluster::start(3)?;
        let cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
        let prefix = format!("/seashard-ha-{}", std::process::id());
        let mut setup = HaSetup {
            envoys: Vec::new(),
            replicas: Vec::new(),
            cluster,
            etcd,
            prefix,
            etcd_relays: Vec::new(),
            dir,
        };
        for &i in &opts.etcd_relayed {
            let relays = (0..setup.etcd.len())
                .map(|k| {
                    crate::relay::Relay::start(setup.etcd.client_addr(k), [127, 0, 0, 1].into())
                })
                .collect::<Result<Vec<_>>>()?;
            setup.etcd_relays.push((i, relays));
        }
        for i in 0..opts.replicas {
            let (config, http, grpc) = setup.write_config(i, opts)?;
            let cp = ControlPlaneProcess::start(&config, http, grpc)
                .with_context(|| format!("start replica r{i}"))?;
            setup.replicas.push(cp);
        }
        setup.wait_leader(None, TAKEOVER_LIMIT)?;
        for (i, id) in opts.envoys.iter().enumerate() {
            let e = setup.start_envoy(id, i % opts.replicas)?;
            setup.envoys.push(e);
        }
        let ids: Vec<&str> = opts.envoys.iter().map(String::as_str).collect();
        setup.wait_current(&ids)?;
        Ok(setup)
    }

    fn write_config(&self, i: usize, opts: &Options) -> Result<(PathBuf, SocketAddr, SocketAddr)> {
        let d = self.dir.path().join(format!("r{i}"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("initial.json"), old_map().to_string())?;
        let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
        let endpoints = match self.etcd_relays.iter().find(|(r, _)| *r == i) {
            Some((_, relays)) => relays
                .iter()
                .map(|r| format!("http://{}", r.addr))
                .collect(),
            None => self.etcd.endpoints(),
        };
        let endpoints = serde_json::to_string(&endpoints)?;
        let mut text = format!(
            "initial_map = \"initial.json\"\n\
             [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
             [store]\nkind = \"etcd\"\nendpoints = {endpoints}\nprefix = \"{}\"\n\
             replica = \"r{i}\"\nlease_ttl = \"{}\"\ntimeout = \"2s\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [filter]\nwasm = {:?}\nretry_after = 1\n\
             [rollout]\nack_timeout = \"{}\"\nhealth_timeout = \"10s\"\n\
             restart_timeout = \"20s\"\ndrain = \"200ms\"\n",
            self.prefix,
            opts.lease_ttl,
            wasm_file("base_router.wasm")?,
            opts.ack_timeout,
        );
        for s in &self.cluster.servers {
            text.push_str(&format!(
                "[[server]]\nname = \"{}\"\naddress = \"{}\"\n\
                 restart = {{ kind = \"command\", argv = {} }}\n",
                s.name,
                s.addr,
                serde_json::to_string(&[opts.hook_prefix.clone(), s.restart_hook()?].concat())?
            ));
        }
        let path = d.join("seashard.toml");
        std::fs::write(&path, text)?;
        Ok((path, http, grpc))
    }

    /// An edge Envoy given every replica's ADS address, replica `first`'s first.
    pub fn start_envoy(&self, node_id: &str, first: usize) -> Result<Envoy> {
        let n = self.replicas.len();
        let others: Vec<String> = (1..n)
            .map(|k| self.replicas[(first + k) % n].grpc.to_string())
            .collect();
        let mut args = vec!["--kind", "edge", "--node-id", node_id];
        for o in &others {
            args.extend(["--control-plane", o.as_str()]);
        }
        start_managed_envoy(&args, self.replicas[first].grpc, loopback(0))
            .with_context(|| format!("start Envoy {node_id}"))
    }

    /// Silently cuts every link of replica `i` to etcd (it must be in
    /// `Options::etcd_relayed`): it keeps running and serving its Envoys.
    pub fn cut_etcd(&self, i: usize) -> Result<()> {
        let (_, relays) = self
            .etcd_relays
            .iter()
            .find(|(r, _)| *r == i)
            .ok_or_else(|| anyhow!("replica r{i} does not reach etcd through relays"))?;
        relays.iter().for_each(crate::relay::Relay::cut);
        Ok(())
    }

    /// Whether replica `i` runs and answers `/healthz`.
    pub fn up(&mut self, i: usize) -> bool {
        self.replicas[i].pid().is_some()
            && get(self.replicas[i].http, "/healthz", &[]).is_ok_and(|r| r.status == 200)
    }

    /// Whether replica `i` says it leads (`seashard_leader 1` on `/metrics`).
    pub fn leads(&self, i: usize) -> bool {
        leads(self.replicas[i].http)
    }

    /// The replicas (not `except`) that say they lead.
    pub fn leaders(&self, except: Option<usize>) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| Some(i) != except && self.leads(i))
            .collect()
    }

    /// Waits until exactly one replica other than `except` leads; its index.
    pub fn wait_leader(&self, except: Option<usize>, timeout: Duration) -> Result<usize> {
        wait_until(timeout, "one replica to lead", || {
            let l = self.leaders(except);
            Ok((l.len() == 1).then(|| l[0]))
        })
        .with_context(|| self.logs_tail(15))
    }

    /// [`HaSetup::wait_leader`] within [`TAKEOVER_LIMIT`], with the time it took.
    pub fn wait_leader_since(&self, except: Option<usize>) -> Result<(usize, Duration)> {
        let t = Instant::now();
        let l = self.wait_leader(except, TAKEOVER_LIMIT)?;
        Ok((l, t.elapsed()))
    }

    /// SIGKILL replica `i` (the process only: a restart hook it runs goes on), and
    /// waits until it is gone.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        self.replicas[i].signal(libc::SIGKILL)?;
        let cp = &mut self.replicas[i];
        wait_until(Duration::from_secs(5), "the killed replica to exit", || {
            Ok(cp.pid().is_none().then_some(()))
        })
    }

    /// Starts replica `i` again (same config, ports and name).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.replicas[i].start_again()
    }

    /// Waits until every node in `ids` is connected and current, as the leader
    /// sees it (its view holds the other replicas' Envoys).
    pub fn wait_current(&self, ids: &[&str]) -> Result<()> {
        let l = self.wait_leader(None, TAKEOVER_LIMIT)?;
        self.replicas[l].wait_current(ids)
    }

    /// `GET path` from replica `i` as JSON.
    pub fn get_json(&self, i: usize, path: &str) -> Result<Value> {
        self.replicas[i].get_json(path)
    }

    /// `POST /v1/maps` of `map` to replica `i`: status and body.
    pub fn push(&self, i: usize, map: &Value, comment: &str) -> Result<(u16, Value)> {
        self.replicas[i].post("/v1/maps", &json!({"map": map, "comment": comment}))
    }

    /// Rollout `id` as the first of `from` that answers sees it.
    pub fn rollout(&self, from: &[usize], id: u64) -> Result<Value> {
        let mut last = None;
        for &i in from {
            match self.get_json(i, &format!("/v1/rollouts/{id}")) {
                Ok(v) if v["state"].is_string() => return Ok(v),
                Ok(v) => last = Some(anyhow!("r{i}: {v}")),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no replica to ask")))
    }

    /// Waits until rollout `id`, read from the replicas `from`, is `done` or
    /// `rolled_back`; the final record.
    pub fn wait_rollout_end(&self, from: &[usize], id: u64) -> Result<Value> {
        wait_until(ROLLOUT_LIMIT, &format!("rollout {id} to end"), || {
            let r = self.rollout(from, id)?;
            Ok(matches!(r["state"].as_str(), Some("done" | "rolled_back")).then_some(r))
        })
        .with_context(|| self.logs_tail(40))
    }

    /// The indexes of the replicas that run.
    pub fn running(&mut self) -> Vec<usize> {
        (0..self.replicas.len())
            .filter(|&i| self.replicas[i].pid().is_some())
            .collect()
    }

    /// Writers (as the lost-write experiment's) through every Envoy, `threads` each.
    pub fn writers(&self, threads: usize) -> Vec<Writers> {
        self.envoys
            .iter()
            .map(|e| {
                Writers::start(
                    e.listener_addr,
                    &spread_bases(BASES),
                    threads,
                    MAX_WRITES_PER_THREAD,
                )
            })
            .collect()
    }

    /// The last `lines` lines of every replica's current log.
    pub fn logs_tail(&self, lines: usize) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let log = r.last_log();
                let all: Vec<&str> = log.lines().collect();
                format!(
                    "--- replica r{i} ---\n{}",
                    all[all.len().saturating_sub(lines)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether the control plane at `http` says it leads (`seashard_leader 1`).
pub fn leads(http: SocketAddr) -> bool {
    get(http, "/metrics", &[])
        .is_ok_and(|r| r.status == 200 && r.text().lines().any(|l| l.trim() == "seashard_leader 1"))
}

/// One write through `proxy` to `base` (dashed uuid): the server that
/// acknowledged it, or the refusal's status and body.
pub fn write_once(proxy: SocketAddr, base: &str, write_id: &str) -> Result<String> {
    let path = format!("/dtable-server/api/v1/dtables/{base}/rows/");
    let body = json!({ "write_id": write_id }).to_string();
    let r = Connection::open(proxy)?.request(
        "POST",
        &path,
        &[("content-type", "application/json")],
        body.as_bytes(),
    )?;
    if r.status != 200 {
        bail!("{} {}", r.status, r.text());
    }
    let v = r.json()?;
    v["server"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no server in {v}"))
}

/// The map version the Envoy's base-router applied (its `seashard.map_version`
/// gauge), `None` before any.
pub fn envoy_map_version(e: &Envoy) -> Result<Option<u64>> {
    let stats = e.admin_get("/stats?filter=seashard.map_version")?.text();
    Ok(stats.lines().find_map(|l| {
        let (name, v) = l.rsplit_once(": ")?;
        name.ends_with("seashard.map_version")
            .then(|| v.trim().parse().ok())
            .flatten()
    }))
}

/// The rollout ids in `GET /v1/rollouts` of replica `cp`.
pub fn rollout_ids(cp: &ControlPlaneProcess) -> Result<Vec<u64>> {
    let v = cp.get_json("/v1/rollouts?limit=1000")?;
    v["rollouts"]
        .as_array()
        .ok_or_else(|| anyhow!("no rollouts in {v}"))?
        .iter()
        .map(|r| r["id"].as_u64().ok_or_else(|| anyhow!("no id in {r}")))
        .collect()
}

/// Every value rollout `id`'s record took in etcd, oldest first, as
/// `(mod_revision, state)`: the key read at its `mod_revision`, then just below
/// it, back to its creation (the test cluster never compacts).
pub fn rollout_history(etcd: &EtcdCluster, prefix: &str, id: u64) -> Result<Vec<(i64, String)>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(format!("{prefix}/rollouts/{id:020}"));
    let member = (0..etcd.len())
        .find(|&i| etcd.member_healthy(i))
        .ok_or_else(|| anyhow!("no healthy etcd member"))?;
    let mut out = Vec::new();
    let mut at: Option<i64> = None;
    // Bounded: a rollout's record changes a few dozen times.
    for _ in 0..1000 {
        let mut q = json!({ "key": key });
        if let Some(r) = at {
            q["revision"] = json!(r.to_string());
        }
        let r = etcd.call(member, "/v3/kv/range", &q)?;
        let Some(kv) = r["kvs"].as_array().and_then(|a| a.first()) else {
            break;
        };
        let num = |k: &str| -> Result<i64> {
            kv[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("no {k} in {kv}"))
        };
        let (modified, created) = (num("mod_revision")?, num("create_revision")?);
        let value = b64
            .decode(kv["value"].as_str().unwrap_or_default())
            .context("the value is not base64")?;
        let v: Value = serde_json::from_slice(&value).context("the record is not JSON")?;
        out.push((modified, v["state"].as_str().unwrap_or("?").to_owned()));
        if modified <= created {
            break;
        }
        at = Some(modified - 1);
    }
    out.reverse();
    Ok(out)
}

/// Every key under `dir` (e.g. `{prefix}/nodes/`) with its value, as etcd holds
/// them (for diagnostics).
pub fn etcd_dump(etcd: &EtcdCluster, dir: &str) -> Result<Vec<(String, String)>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut end = dir.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let r = etcd.call_healthy(
        "/v3/kv/range",
        &json!({"key": b64.encode(dir), "range_end": b64.encode(&end)}),
    )?;
    let text = |v: &Value| -> String {
        let bytes = b64
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(r["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|kv| (text(&kv["key"]), text(&kv["value"])))
                .collect()
        })
        .unwrap_or_default())
}
