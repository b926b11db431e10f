//! Rollouts against the real control plane on loopback: simulated Envoys (ADS
//! clients that ACK up to a chosen map version), dtable-server health URLs served by
//! threads, restart hooks that are real commands. A control plane is killed by
//! dropping its runtime (no shutdown, no last flush), as a SIGKILL would.

mod sim;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use control_plane::resources::ECDS_TYPE_URL;
use control_plane::rollout::{self, RestartState, Rollout, Step};
use control_plane::store::{FinishRollout, NewAudit, NewVersion, StoredRollout};
use control_plane::{Config, ControlPlane, Proposal, Store, StoreError, VersionKind};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use serde_json::{Value, json};
use shardmap::ShardMap;
use sim::{FILTER, Served};

/// A health URL answering `pong` while `up`.
struct Pong {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// The head of every request received.
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Pong {
    fn start() -> Pong {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let flag = up.clone();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 1024];
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let n = c.read(&mut buf).unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                log.lock().unwrap().push(head);
                let answer = if flag.load(Ordering::SeqCst) {
                    "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong"
                } else {
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = c.write_all(answer.as_bytes());
            }
        });
        Pong { addr, up, seen }
    }
}

/// One server of the test configuration.
struct Srv {
    name: &'static str,
    pong: SocketAddr,
    hook: String,
    /// Reached only through its guard.
    guarded: bool,
}

fn command_hook(script: &str) -> String {
    format!(
        r#"{{ kind = "command", argv = ["sh", "-c", {}], timeout = "20s" }}"#,
        toml_str(script)
    )
}

fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn write_config(dir: &Path, servers: &[Srv], ack_timeout: &str) -> Config {
    let mut rest = format!(
        "[rollout]\nack_timeout = \"{ack_timeout}\"\nhealth_timeout = \"1s\"\n\
         restart_timeout = \"20s\"\ndrain = \"300ms\"\n"
    );
    for s in servers {
        let more = format!(
            "health_url = \"http://{}/ping/\"\nrestart = {}\nguarded = {}",
            s.pong, s.hook, s.guarded
        );
        rest.push_str(&sim::server(s.name, &s.pong.to_string(), &more));
    }
    sim::write_config(dir, &sim::config_text("", sim::STATE_DB, "", &rest))
}

/// A control plane in its own runtime ([`Served`]); dropping it kills it.
struct Cp(Served);

impl Deref for Cp {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Cp {
    fn start(config: Config) -> Cp {
        Cp(Served::start(config))
    }

    /// As [`Cp::start`], on `store`.
    fn start_with(config: Config, store: Arc<dyn Store>) -> Cp {
        Cp(Served::start_on(config, store))
    }

    /// Simulated Envoy `id` that ACKs every version up to `*limit` (and ignores newer).
    fn envoy(&self, id: &str, limit: Arc<AtomicU64>) {
        self.envoy_handle_limited(id, FILTER, limit);
    }

    /// As [`Cp::envoy`], with a handle to disconnect it.
    fn envoy_handle(&self, id: &str) -> tokio::task::JoinHandle<()> {
        self.envoy_handle_limited(id, FILTER, unlimited())
    }

    /// A simulated guard of `server`, ACKing every version.
    fn guard(&self, id: &str, server: &str) -> tokio::task::JoinHandle<()> {
        let resource = control_plane::resources::guard_resource_name(FILTER, server);
        self.envoy_handle_limited(id, &resource, unlimited())
    }

    fn envoy_handle_limited(
        &self,
        id: &str,
        resource: &str,
        limit: Arc<AtomicU64>,
    ) -> tokio::task::JoinHandle<()> {
        self.rt.spawn(sim_envoy(
            self.running.grpc_addr,
            id.to_owned(),
            resource.to_owned(),
            limit,
        ))
    }

    /// Simulated Envoys `ids`, ACKing every version; returns once all are current.
    fn edges(&self, ids: &[&str]) {
        for id in ids {
            self.envoy(id, unlimited());
        }
        self.wait_connected(ids.len());
    }

    /// Waits until `n` Envoys are connected and current.
    fn wait_connected(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self
                .rt
                .block_on(self.plane.wait_ecds_converged(Duration::from_millis(200)));
            if c.acked.len() == n && c.complete() {
                return;
            }
            assert!(Instant::now() < deadline, "Envoys not connected: {c:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn begin(&self, map: &ShardMap) -> Rollout {
        self.try_begin(map).unwrap()
    }

    fn try_begin(&self, map: &ShardMap) -> Result<Rollout, rollout::RolloutError> {
        let _enter = self.rt.enter();
        rollout::begin(&self.plane, &proposal(map, "test rollout"))
    }

    /// Waits until node `id` ACKed map version `version` of the filter configuration.
    fn wait_acked(&self, id: &str, version: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let want = version.to_string();
        while self.plane.registry().node(id).and_then(|n| {
            n.acked(control_plane::ResourceType::Ecds)
                .and_then(control_plane::resources::ecds_map_version)
                .map(|v| v.to_string() == want)
        }) != Some(true)
        {
            assert!(
                Instant::now() < deadline,
                "{id} never ACKed version {version}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the registry holds `n` live streams of node id `id`.
    fn wait_streams(&self, id: &str, n: u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live: u32 = self
                .plane
                .registry()
                .nodes()
                .iter()
                .filter(|x| x.id == id)
                .map(|x| x.streams)
                .sum();
            if live == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} has {live} live streams, not {n}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn rollout(&self, id: u64) -> Rollout {
        rollout::parse(self.plane.store().rollout(id).unwrap().unwrap().record).unwrap()
    }

    /// Waits until rollout `id` reaches a state accepted by `until`.
    fn wait_for(&self, id: u64, what: &str, until: impl Fn(&Rollout) -> bool) -> Rollout {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let r = self.rollout(id);
            if until(&r) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "rollout {id} never reached {what}: {r:#?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finished(&self, id: u64) -> Rollout {
        self.wait_for(id, "its end", |r| r.state.finished())
    }
}

/// An ADS client: subscribes to CDS and to the ECDS `resource`, ACKs what it is sent
/// while the map version is at most `limit`, stays silent otherwise (as a stopped
/// Envoy).
async fn sim_envoy(addr: SocketAddr, id: String, resource: String, limit: Arc<AtomicU64>) {
    let within_limit = |r: &DiscoveryResponse| {
        let v: u64 = r
            .version_info
            .split('-')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        r.type_url != ECDS_TYPE_URL || v <= limit.load(Ordering::SeqCst)
    };
    let _ = sim::ads(addr, &id, &resource, None, within_limit).await;
}

/// A rollout proposal of `map` by "test".
fn proposal(map: &ShardMap, comment: &str) -> Proposal {
    Proposal {
        map: map.clone(),
        base_version: None,
        author: "test".into(),
        comment: comment.into(),
        dry_run: false,
    }
}

/// The servers `r` restarts, in order.
fn restarting(r: &Rollout) -> Vec<&str> {
    r.restart.iter().map(|s| s.server.as_str()).collect()
}

/// The steps `r` went through.
fn steps(r: &Rollout) -> Vec<Step> {
    r.steps.iter().map(|s| s.step).collect()
}

/// The steps of a rollout that completed.
const EVERY_STEP: [Step; 5] = [
    Step::Plan,
    Step::Fence,
    Step::Restart,
    Step::Activate,
    Step::Done,
];

fn map(v: Value) -> ShardMap {
    serde_json::from_value(v).unwrap()
}

/// Every base on `a` but slots 8-f on `b`.
/// Rolls [`half`] out on `cp`, which must roll back: the reason.
fn rolled_back(cp: &Cp) -> String {
    let r = cp.finished(cp.begin(&half()).id);
    assert_eq!(r.state, Step::RolledBack);
    r.reason.unwrap()
}

fn half() -> ShardMap {
    map(json!({"default": "a", "slots": {"0-7": "a", "8-f": "b"}}))
}

/// Two servers whose hooks append their name to a log, in a temporary directory:
/// the set-up most tests here share.
struct Two {
    dir: tempfile::TempDir,
    /// Their health URLs, kept serving for as long as the test runs.
    pongs: [Pong; 2],
    servers: Vec<Srv>,
    log: PathBuf,
}

impl Two {
    fn new() -> Two {
        let dir = tempfile::tempdir().unwrap();
        let pongs = [Pong::start(), Pong::start()];
        let log = dir.path().join("restarts.log");
        let srv = |name: &'static str, p: &Pong| Srv {
            name,
            pong: p.addr,
            hook: command_hook(&format!("echo {name} >> {}", log.display())),
            guarded: false,
        };
        let servers = vec![srv("a", &pongs[0]), srv("b", &pongs[1])];
        Two {
            dir,
            pongs,
            servers,
            log,
        }
    }

    /// Both servers reached only through their guards.
    fn guarded() -> Two {
        let mut two = Two::new();
        for s in &mut two.servers {
            s.guarded = true;
        }
        two
    }

    fn config(&self, ack_timeout: &str) -> Config {
        write_config(self.dir.path(), &self.servers, ack_timeout)
    }

    /// A control plane on this configuration's SQLite store.
    fn start(&self, ack_timeout: &str) -> Cp {
        Cp::start(self.config(ack_timeout))
    }

    /// New servers and a control plane on their configuration.
    fn started(ack_timeout: &str) -> (Two, Cp) {
        let two = Two::new();
        let cp = two.start(ack_timeout);
        (two, cp)
    }

    fn restarted(&self) -> Vec<String> {
        restarted(&self.log)
    }
}

fn restarted(log: &Path) -> Vec<String> {
    seashard_tests::file_lines(log)
}

fn unlimited() -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(u64::MAX))
}

#[test]
fn a_rollout_fences_restarts_activates_and_may_hold_narrows_the_next_one() {
    let (two, cp) = Two::started("5s");
    cp.edges(&["edge-1", "edge-2"]);

    // First rollout after adopting seashard: every server restarts.
    let r = cp.begin(&half());
    assert_eq!(r.fence.slots, vec!["8-f".to_owned()]);
    assert_eq!(restarting(&r), ["a", "b"]);
    assert!(r.restart[0].why.contains("never restarted"), "{r:?}");
    assert_eq!(r.envoys, ["edge-1@127.0.0.1", "edge-2@127.0.0.1"]);
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    // Requests routed before the fence had `drain` to reach the old processes.
    let restart_step = r.steps.iter().find(|s| s.step == Step::Restart).unwrap();
    let first_hook = r.restart[0].started_at.unwrap();
    assert!(
        first_hook - restart_step.started_at >= 300,
        "restarted {} ms after the fence was ACKed",
        first_hook - restart_step.started_at
    );
    assert_eq!(two.restarted(), ["a", "b"]);
    assert_eq!(steps(&r), EVERY_STEP);
    let fence = cp.plane.store().version(2).unwrap().unwrap();
    assert_eq!(fence.kind, VersionKind::Fence);
    assert_eq!(fence.fence, r.fence);
    let active = cp.plane.active().unwrap();
    assert_eq!((active.version, active.kind), (3, VersionKind::Map));
    assert_eq!(active.map, half());
    assert!(active.fence.is_empty());
    assert_eq!(r.new_version, Some(3));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    eprintln!(
        "rollout 1 (restart a, b; 2 simulated Envoys): overhead {} ms, restarts {} ms",
        r.overhead_ms.unwrap(),
        r.restart_ms.unwrap()
    );
    let states = cp.plane.store().server_states().unwrap();
    assert_eq!(states.len(), 2);
    assert!(states.iter().all(|s| s.may_hold == vec![3]), "{states:?}");

    // A later rollout moving 4-7 from a to b: only a may hold them.
    let quarter = map(json!({"default": "a", "slots": {"0-3": "a", "4-f": "b"}}));
    let r = cp.begin(&quarter);
    assert_eq!(restarting(&r), ["a"], "{r:#?}");
    assert_eq!(r.skipped[0].server, "b");
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::Done);
    assert_eq!(two.restarted(), ["a", "b", "a"]);
    eprintln!(
        "rollout 2 (restart a): overhead {} ms, restarts {} ms",
        r.overhead_ms.unwrap(),
        r.restart_ms.unwrap()
    );
    assert!(
        r.overhead_ms.unwrap() < 1000,
        "overhead {} ms",
        r.overhead_ms.unwrap()
    );
    let states = cp.plane.store().server_states().unwrap();
    let a = states.iter().find(|s| s.name == "a").unwrap();
    let b = states.iter().find(|s| s.name == "b").unwrap();
    assert_eq!(a.may_hold, vec![5]);
    assert_eq!(b.may_hold, vec![3, 5]);

    // Moving 4-7 back to a: b owned them under version 5, a did not since its restart.
    let r = cp.begin(&half());
    assert_eq!(restarting(&r), ["b"], "{r:#?}");
    assert_eq!(cp.finished(r.id).state, Step::Done);

    let metrics = cp.metrics();
    assert!(
        metrics.contains("seashard_rollouts_total{state=\"done\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("seashard_server_restarts_total 4"),
        "{metrics}"
    );
    // The audit log records both ends.
    let audit = cp.plane.store().audit_log(50).unwrap();
    assert!(audit.iter().any(|e| e.action == "rollout.done"));
    assert!(audit.iter().any(|e| e.action == "rollout.begin"));
}

#[test]
fn a_failing_hook_rolls_back() {
    let mut two = Two::new();
    two.servers[1].hook = command_hook("echo no >&2; exit 3");
    let cp = two.start("5s");
    cp.edges(&["edge-1"]);
    let r = cp.begin(&half());
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    let reason = r.reason.clone().unwrap();
    assert!(
        reason.contains("restart of b") && reason.contains("exit"),
        "{reason}"
    );
    assert_eq!(r.restart[1].state, RestartState::Failed);
    let active = cp.plane.active().unwrap();
    assert_eq!(active.kind, VersionKind::Rollback);
    assert!(active.fence.is_empty());
    assert_eq!(
        active.map,
        cp.plane.store().version(1).unwrap().unwrap().map
    );
    assert_eq!(r.rollback_version, Some(active.version));
    // a restarted (under the fence): it holds at most the old map; b is still unknown.
    let states = cp.plane.store().server_states().unwrap();
    assert_eq!(states.len(), 1, "{states:?}");
    assert_eq!(
        (states[0].name.as_str(), &states[0].may_hold),
        ("a", &vec![1])
    );
    // Every Envoy ACKed the rollback.
    let c = cp
        .rt
        .block_on(cp.plane.wait_ecds_converged(Duration::from_secs(2)));
    assert!(c.complete() && c.acked.len() == 1, "{c:?}");
}

#[test]
fn a_server_that_never_answers_pong_rolls_back() {
    let two = Two::new();
    two.pongs[0].up.store(false, Ordering::SeqCst);
    let cp = two.start("5s");
    let reason = rolled_back(&cp);
    assert!(
        reason.contains("health of a") && reason.contains("pong"),
        "{reason}"
    );
    assert_eq!(cp.plane.active().unwrap().kind, VersionKind::Rollback);
}

#[test]
fn an_envoy_that_never_acks_the_fence_rolls_back_after_the_timeout() {
    let (two, cp) = Two::started("700ms");
    cp.envoy("edge-1", unlimited());
    cp.envoy("stuck", Arc::new(AtomicU64::new(1)));
    cp.wait_connected(2);
    let start = Instant::now();
    let reason = rolled_back(&cp);
    assert!(
        reason.contains("no ACK") && reason.contains("stuck"),
        "{reason}"
    );
    assert!(start.elapsed() >= Duration::from_millis(700));
    assert!(
        two.restarted().is_empty(),
        "nothing restarts without the fence"
    );
}

#[test]
fn abort_and_manual_confirmation_through_the_api() {
    let mut two = Two::new();
    for s in &mut two.servers {
        s.hook = r#"{ kind = "manual" }"#.into();
    }
    let cp = two.start("5s");
    let post = |path: &str, body: Value| cp.post(path, &body);
    let get = |path: &str| cp.get(path).1;

    // Dry run: the plan with the servers to restart and why.
    let (status, body) = post("/v1/maps?dry_run=true", json!({"map": half()}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["restart"][0]["server"], "a");
    assert!(body["restart"][0]["why"].is_string());

    // A moving map starts a rollout: 202.
    let (status, body) = post("/v1/maps", json!({"map": half(), "comment": "split"}));
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    cp.wait_for(id, "a waiting for a", |r| {
        r.restart[0].state == RestartState::Restarting
    });
    let view = get("/v1/rollouts/current");
    assert_eq!(view["restarting"], "a", "{view}");
    assert_eq!(view["waiting_for_confirm"], "a", "{view}");
    assert_eq!(get("/v1/status")["rollout"]["id"], id);
    // A second change meanwhile: 409.
    let (status, _) = post("/v1/maps", json!({"map": half()}));
    assert_eq!(status, 409);
    // Confirming a server it does not wait for: 409.
    let (status, _) = post("/v1/rollouts/current/confirm", json!({"server": "b"}));
    assert_eq!(status, 409);
    let (status, body) = post("/v1/rollouts/current/confirm", json!({"server": "a"}));
    assert_eq!(status, 200, "{body}");
    cp.wait_for(id, "b waiting", |r| {
        r.restart[1].state == RestartState::Restarting
    });
    let (status, body) = post("/v1/rollouts/current/abort", json!({}));
    assert_eq!(status, 200, "{body}");
    let r = cp.finished(id);
    assert_eq!(r.state, Step::RolledBack);
    assert!(r.reason.unwrap().contains("aborted"));
    assert_eq!(get("/v1/rollouts")["rollouts"][0]["state"], "rolled_back");
    assert_eq!(get("/v1/status")["rollout"], Value::Null);
    // a restarted under the fence, then the rollback: it may hold the old map only;
    // b was never restarted: unknown.
    let servers = get("/v1/servers");
    assert_eq!(servers["servers"][0]["may_hold"], json!([1]), "{servers}");
    assert_eq!(servers["servers"][1]["may_hold"], Value::Null, "{servers}");
    let (status, _) = post("/v1/rollouts/current/abort", json!({}));
    assert_eq!(status, 404);

    // Again, confirmed all the way.
    let (status, body) = post("/v1/maps", json!({"map": half()}));
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        cp.wait_for(id, "waiting", |r| {
            r.restart.get(i).map(|s| s.state) == Some(RestartState::Restarting)
        });
        // The wait begins right after the state is stored.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _) = post("/v1/rollouts/current/confirm", json!({"server": name}));
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let r = cp.finished(id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    // Abort after the end: nothing runs.
    let (status, _) = post("/v1/rollouts/current/abort", json!({}));
    assert_eq!(status, 404);
}

/// Kills the control plane while the rollout is at `step` (held there by a silent
/// Envoy or a slow hook), starts a new one on the same store, and checks the
/// rollout completes from that step without skipping one.
fn killed_at(step: Step) {
    let mut two = Two::new();
    let slow = step == Step::Restart;
    if slow {
        two.servers[1].hook =
            command_hook(&format!("echo b-slow >> {}; sleep 30", two.log.display()));
    }
    let cp = two.start("30s");
    // Version 1 is the initial map; the fence will be 2, the new map 3.
    let limit = match step {
        Step::Fence => 1,
        Step::Activate => 2,
        _ => u64::MAX,
    };
    cp.envoy("edge-1", unlimited());
    cp.envoy("edge-2", Arc::new(AtomicU64::new(limit)));
    cp.wait_connected(2);
    let r = cp.begin(&half());
    let id = r.id;
    let held = cp.wait_for(id, step.as_str(), |r| match step {
        Step::Restart => r.restart[1].state == RestartState::Restarting,
        s => r.state == s,
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(cp);

    if slow {
        two.servers[1].hook = command_hook(&format!("echo b >> {}", two.log.display()));
    }
    let cp = two.start("5s");
    cp.envoy("edge-1", unlimited());
    cp.envoy("edge-2", unlimited());
    let r = cp.finished(id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    assert_eq!(r.resumed, 1);
    assert_eq!(steps(&r), EVERY_STEP, "held at {:?}", held.state);
    // One fence version, one new version: nothing published twice.
    let kinds: Vec<VersionKind> = cp
        .plane
        .store()
        .history(10)
        .unwrap()
        .into_iter()
        .rev()
        .map(|v| v.kind)
        .collect();
    assert_eq!(
        kinds,
        [VersionKind::Initial, VersionKind::Fence, VersionKind::Map]
    );
    let log = two.restarted();
    if slow {
        // a was healthy before the kill: not restarted again; b's hook re-ran.
        assert_eq!(log, ["a", "b-slow", "b"]);
    } else {
        assert_eq!(log, ["a", "b"]);
    }
    assert_eq!(cp.plane.active().unwrap().map, half());
}

#[test]
fn a_control_plane_killed_during_the_fence_resumes_and_completes() {
    killed_at(Step::Fence);
}

#[test]
fn a_control_plane_killed_during_a_restart_resumes_and_completes() {
    killed_at(Step::Restart);
}

#[test]
fn a_control_plane_killed_during_activation_resumes_and_completes() {
    killed_at(Step::Activate);
}

#[test]
fn a_control_plane_killed_right_after_planning_resumes_and_completes() {
    // A rollout stored at its first step (as if killed before it acted).
    a_stored_plan_completes(0);
}

#[test]
fn a_known_but_disconnected_envoy_blocks_the_fence_until_forgotten() {
    let (two, cp) = Two::started("500ms");
    cp.envoy("edge-1", unlimited());
    let gone = cp.envoy_handle("gone");
    cp.wait_connected(2);
    gone.abort();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cp
        .plane
        .registry()
        .node("gone")
        .is_some_and(|n| n.connected)
    {
        assert!(Instant::now() < deadline, "never disconnected");
        std::thread::sleep(Duration::from_millis(10));
    }
    // It may still route with the old map: the fence waits for it, then rolls back.
    let reason = rolled_back(&cp);
    assert!(
        reason.contains("gone@127.0.0.1 (disconnected")
            && reason.contains("DELETE /v1/nodes/gone@127.0.0.1"),
        "{reason}"
    );
    assert!(two.restarted().is_empty());
    // Forgotten (taken out of service): the next rollout goes through.
    let forgotten = cp.plane.registry().forget("gone");
    assert_eq!(forgotten, ["gone@127.0.0.1"]);
    cp.plane.store().delete_nodes(&forgotten).unwrap();
    let r = cp.finished(cp.begin(&half()).id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
}

#[test]
fn http_hooks_are_called_with_their_method_and_headers() {
    let mut two = Two::new();
    two.servers[0].hook = format!(
        r#"{{ kind = "http", method = "POST", url = "http://{}/restart", headers = {{ authorization = "Bearer hook" }}, timeout = "5s" }}"#,
        two.pongs[0].addr
    );
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    two.servers[1].hook =
        format!(r#"{{ kind = "http", method = "PUT", url = "http://{closed}/restart" }}"#);
    let cp = two.start("5s");
    let r = cp.finished(cp.begin(&half()).id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    assert!(
        r.reason
            .as_deref()
            .unwrap()
            .contains(&format!("PUT http://{closed}/restart")),
        "{:?}",
        r.reason
    );
    assert_eq!(r.restart[0].state, RestartState::Healthy);
    let seen = two.pongs[0].seen.lock().unwrap().clone();
    let hook = seen
        .iter()
        .find(|h| h.starts_with("POST /restart HTTP/1.1"))
        .expect("the hook was called");
    assert!(hook.contains("authorization: Bearer hook"), "{hook}");
}

#[test]
fn a_pin_moves_one_base_and_restarts_only_its_holder() {
    let (two, cp) = Two::started("5s");
    cp.edges(&["edge-1"]);
    assert_eq!(cp.finished(cp.begin(&half()).id).state, Step::Done);
    // A pin moves one base of a's slots to b: only a may hold it.
    let mut pinned = half();
    pinned.pins.insert("4c1b2c3d-4e5f".into(), "b".into());
    let r = cp.begin(&pinned);
    assert!(r.fence.slots.is_empty(), "{:?}", r.fence);
    assert_eq!(r.fence.pins, vec!["4c1b2c3d4e5f".to_owned()]);
    assert_eq!(restarting(&r), ["a"]);
    assert_eq!(cp.finished(r.id).state, Step::Done);
    // Removing the pin moves it back: now only b may hold it.
    let r = cp.begin(&half());
    assert_eq!(restarting(&r), ["b"]);
    assert_eq!(cp.finished(r.id).state, Step::Done);
    assert_eq!(two.restarted(), ["a", "b", "a", "b"]);
}

#[test]
fn two_envoys_with_one_node_id_are_a_conflict_that_refuses_a_rollout() {
    let (two, cp) = Two::started("5s");
    let first = cp.envoy_handle("edge-1");
    let second = cp.envoy_handle("edge-1");
    cp.wait_streams("edge-1", 2);
    // Both live streams are shown, never merged.
    let conflicts = cp.plane.registry().conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].id, "edge-1");
    let from = &conflicts[0].instances[0].streams_from;
    assert_eq!(from.len(), 2, "{conflicts:?}");
    assert_ne!(from[0], from[1]);
    let err = cp.try_begin(&half()).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, rollout::RolloutError::Conflicts(_))
            && text.contains("`edge-1`")
            && text.contains(&from[0])
            && text.contains(&from[1]),
        "{text}"
    );
    // Over the API: 409 naming the id; status and /metrics show both peers.
    let (status, body) = cp.send(
        "/v1/maps",
        "application/json",
        json!({ "map": half() }).to_string().as_bytes(),
    );
    assert_eq!(status, 409);
    assert!(body.contains("edge-1") && body.contains(&from[1]), "{body}");
    let (_, status) = cp.get("/v1/status");
    assert_eq!(status["conflicts"][0]["id"], "edge-1");
    let metrics = cp.metrics();
    assert!(
        metrics.contains("seashard_node_id_conflicts 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("peers=\"{} {}\"", from[0], from[1])),
        "{metrics}"
    );
    assert!(two.restarted().is_empty());
    assert_eq!(cp.plane.active().unwrap().version, 1);
    // One of them goes away: the id is no longer shared and the rollout runs.
    second.abort();
    cp.wait_streams("edge-1", 1);
    assert!(cp.plane.registry().conflicts().is_empty());
    let r = cp.finished(cp.begin(&half()).id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    drop(first);
}

#[test]
fn a_node_id_conflict_appearing_during_the_fence_rolls_back() {
    let (two, cp) = Two::started("20s");
    // edge-1 ACKs the initial map only: the fence waits for it.
    let limit = Arc::new(AtomicU64::new(1));
    cp.envoy("edge-1", limit);
    cp.wait_connected(1);
    let r = cp.begin(&half());
    cp.wait_for(r.id, "the fence", |r| r.fence_version.is_some());
    // A second Envoy with the same id connects before activation.
    cp.envoy("edge-1", unlimited());
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    let reason = r.reason.unwrap();
    assert!(
        reason.contains("node id `edge-1` is held by more than one Envoy"),
        "{reason}"
    );
    assert!(two.restarted().is_empty(), "restarted while in conflict");
}

#[test]
fn with_every_involved_server_guarded_the_rollout_waits_for_guards_not_edges() {
    let two = Two::guarded();
    let cp = two.start("1s");
    cp.guard("guard-a", "a");
    cp.guard("guard-b", "b");
    // An edge cut off after the initial map, and two edges sharing one id.
    cp.envoy("edge-cut", Arc::new(AtomicU64::new(1)));
    cp.envoy("edge-dup", unlimited());
    cp.envoy("edge-dup", unlimited());
    cp.wait_streams("edge-dup", 2);
    cp.wait_acked("edge-cut", 1);
    let roles: Vec<(String, Option<String>)> = cp
        .plane
        .registry()
        .nodes()
        .into_iter()
        .map(|n| (n.id, n.role.guarded().map(str::to_owned)))
        .collect();
    assert!(
        roles.contains(&("guard-a".into(), Some("a".into()))),
        "{roles:?}"
    );
    assert!(roles.contains(&("edge-cut".into(), None)), "{roles:?}");
    let r = cp.begin(&half());
    assert_eq!(r.guarded, ["a", "b"]);
    assert_eq!(r.envoys, ["guard-a@127.0.0.1", "guard-b@127.0.0.1"]);
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    assert_eq!(two.restarted(), ["a", "b"]);
    // The cut-off edge is reported, not waited for.
    assert!(
        r.warnings.is_empty(),
        "guards ACKed the activation: {:?}",
        r.warnings
    );
    let edge = cp.plane.registry().node("edge-cut").unwrap();
    assert_eq!(
        edge.acked(control_plane::ResourceType::Ecds)
            .and_then(control_plane::resources::ecds_map_version),
        Some(1)
    );
    // The guards got their own configuration: the map, naming the guarded server.
    let snap = cp.plane.snapshot();
    let guard_a = snap
        .ecds
        .resources
        .iter()
        .find(|x| x.name == "seashard.base_router.guard.a")
        .unwrap();
    let config = control_plane::resources::plugin_configuration(&guard_a.any).unwrap();
    let config = shardmap::RouterConfig::from_json(&config).unwrap();
    assert_eq!(config.guard.as_deref(), Some("a"));
    assert_eq!(config.map, half());
}

#[test]
fn a_guarded_server_without_a_guard_refuses_and_a_partly_guarded_change_waits_for_every_edge() {
    let mut two = Two::guarded();
    let cp = two.start("500ms");
    cp.guard("guard-a", "a");
    cp.envoy("edge-cut", Arc::new(AtomicU64::new(1)));
    cp.wait_streams("guard-a", 1);
    cp.wait_streams("edge-cut", 1);
    let err = cp.try_begin(&half()).unwrap_err();
    assert!(
        matches!(&err, rollout::RolloutError::NoGuard { server } if server == "b"),
        "{err}"
    );
    drop(cp);

    // Only `a` guarded: a request for a moved base may still reach `b` unchecked,
    // so every edge must ACK; the cut-off one never does.
    two.servers[1].guarded = false;
    let dir2 = tempfile::tempdir().unwrap();
    let cp = Cp::start(write_config(dir2.path(), &two.servers, "500ms"));
    cp.guard("guard-a", "a");
    cp.envoy("edge-cut", Arc::new(AtomicU64::new(1)));
    cp.wait_streams("guard-a", 1);
    cp.wait_streams("edge-cut", 1);
    let r = cp.begin(&half());
    assert!(r.guarded.is_empty());
    let r = cp.finished(r.id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    assert!(r.reason.unwrap().contains("edge-cut@127.0.0.1"));
    assert!(two.restarted().is_empty());
}

/// Four servers whose hooks log `start NAME`, sleep `secs`, then log `end NAME` (the
/// server named `fail` exits 1 at once instead).
fn four_servers(dir: &Path, pongs: &[Pong], secs: f64, fail: &str) -> (Vec<Srv>, PathBuf) {
    let log = dir.join("restarts.log");
    let names = ["a", "b", "c", "d"];
    let servers = names
        .iter()
        .zip(pongs)
        .map(|(name, p)| {
            let script = if *name == fail {
                format!("echo fail {name} >> {}; exit 1", log.display())
            } else {
                format!(
                    "echo start {name} >> {l}; sleep {secs}; echo end {name} >> {l}",
                    l = log.display()
                )
            };
            Srv {
                name,
                pong: p.addr,
                hook: command_hook(&script),
                guarded: false,
            }
        })
        .collect();
    (servers, log)
}

/// Every base on `a`, then a quarter on each of a, b, c, d.
fn quarters() -> (ShardMap, ShardMap) {
    (
        map(json!({"default": "a", "slots": {"0-f": "a"}})),
        map(json!({"default": "a", "slots": {"0-3": "a", "4-7": "b", "8-b": "c", "c-f": "d"}})),
    )
}

/// A control plane over [`four_servers`] starting from every base on `a`, with one
/// Envoy current; its restart log; the health URLs (kept alive by the caller).
fn four_server_plane(dir: &Path, secs: f64, fail: &str) -> (Cp, PathBuf, Vec<Pong>) {
    let pongs: Vec<Pong> = (0..4).map(|_| Pong::start()).collect();
    let (servers, log) = four_servers(dir, &pongs, secs, fail);
    std::fs::write(dir.join("initial.json"), json!(quarters().0).to_string()).unwrap();
    let mut config = write_config(dir, &servers, "5s");
    config.initial_map = Some(dir.join("initial.json"));
    let cp = Cp::start(config);
    cp.edges(&["edge-1"]);
    (cp, log, pongs)
}

fn begin_parallel(cp: &Cp, m: &ShardMap, parallel: Option<usize>) -> Rollout {
    let _enter = cp.rt.enter();
    rollout::begin_with(&cp.plane, &proposal(m, ""), parallel).unwrap()
}

/// The most hooks that ran at once, from the log's start and end lines.
fn most_at_once(log: &Path) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for l in restarted(log) {
        if l.starts_with("start") {
            now += 1;
            most = most.max(now);
        } else if l.starts_with("end") {
            now -= 1;
        }
    }
    most
}

#[test]
fn restarts_run_in_parallel_up_to_the_bound() {
    for (parallel, want) in [(Some(4), 4), (Some(2), 2), (None, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let (cp, log, _pongs) = four_server_plane(dir.path(), 0.6, "");
        let r = cp.finished(begin_parallel(&cp, &quarters().1, parallel).id);
        assert_eq!(r.state, Step::Done, "{r:#?}");
        assert_eq!(r.restart.len(), 4);
        assert_eq!(
            most_at_once(&log),
            want,
            "{parallel:?}: {:?}",
            restarted(&log)
        );
        // Four hooks of 0.6 s: about 0.6 s × 4 / parallel.
        let ms = r.restart_ms.unwrap();
        let floor = 600 * 4 / want as u64;
        assert!(ms >= floor, "{parallel:?}: restart step {ms} ms");
        assert!(ms < floor + 2500, "{parallel:?}: restart step {ms} ms");
    }
}

#[test]
fn a_failed_restart_stops_the_parallel_ones_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, log, _pongs) = four_server_plane(dir.path(), 3.0, "c");
    let start = Instant::now();
    let r = cp.finished(begin_parallel(&cp, &quarters().1, Some(4)).id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    assert!(
        r.reason.as_deref().unwrap().contains("restart of c"),
        "{r:?}"
    );
    // The others were stopped mid-hook, not waited for.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_millis(3500));
    let lines = restarted(&log);
    assert!(lines.iter().all(|l| !l.starts_with("end")), "{lines:?}");
    let failed: Vec<&str> = r
        .restart
        .iter()
        .filter(|s| s.state == RestartState::Failed)
        .map(|s| s.server.as_str())
        .collect();
    assert_eq!(failed, ["a", "b", "c", "d"], "{r:#?}");
    assert_eq!(cp.plane.active().unwrap().map, quarters().0);
}

// ---- A store that fails and recovers; rollouts left without a driver ----

/// A store that fails as one under a full disk does, on the test's command: while
/// `failing`, every write is refused (reads go on); `fail_reads` more reads of the
/// unfinished rollout fail (as one `Unavailable` read right after an election).
struct Flaky {
    inner: Arc<dyn Store>,
    failing: Arc<AtomicBool>,
    fail_reads: Arc<AtomicU64>,
}

impl Flaky {
    fn new(inner: Arc<dyn Store>) -> Flaky {
        Flaky {
            inner,
            failing: Arc::new(AtomicBool::new(false)),
            fail_reads: Arc::new(AtomicU64::new(0)),
        }
    }

    fn write(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test: the disk is full".into()))
        } else {
            Ok(())
        }
    }
}

impl Store for Flaky {
    fn info(&self) -> control_plane::store::StoreInfo {
        self.inner.info()
    }
    fn active(&self) -> Result<Option<control_plane::Version>, StoreError> {
        self.inner.active()
    }
    fn version(&self, version: u64) -> Result<Option<control_plane::Version>, StoreError> {
        self.inner.version(version)
    }
    fn history(&self, limit: u32) -> Result<Vec<control_plane::Version>, StoreError> {
        self.inner.history(limit)
    }
    fn append_version(&self, expected: u64, new: &NewVersion<'_>) -> Result<u64, StoreError> {
        self.write()?;
        self.inner.append_version(expected, new)
    }
    fn audit(&self, entry: &NewAudit<'_>) -> Result<(), StoreError> {
        self.write()?;
        self.inner.audit(entry)
    }
    fn audit_log(&self, limit: u32) -> Result<Vec<control_plane::store::AuditEntry>, StoreError> {
        self.inner.audit_log(limit)
    }
    fn save_nodes(&self, nodes: &[control_plane::store::NodeRecord]) -> Result<(), StoreError> {
        self.write()?;
        self.inner.save_nodes(nodes)
    }
    fn load_nodes(&self) -> Result<Vec<control_plane::store::NodeRecord>, StoreError> {
        self.inner.load_nodes()
    }
    fn delete_nodes(&self, keys: &[String]) -> Result<usize, StoreError> {
        self.write()?;
        self.inner.delete_nodes(keys)
    }
    fn insert_rollout(&self, state: &str, record: &Value) -> Result<u64, StoreError> {
        self.write()?;
        self.inner.insert_rollout(state, record)
    }
    fn save_rollout(&self, id: u64, state: &str, record: &Value) -> Result<(), StoreError> {
        self.write()?;
        self.inner.save_rollout(id, state, record)
    }
    fn rollout(&self, id: u64) -> Result<Option<StoredRollout>, StoreError> {
        self.inner.rollout(id)
    }
    fn rollouts(&self, limit: u32) -> Result<Vec<StoredRollout>, StoreError> {
        self.inner.rollouts(limit)
    }
    fn unfinished_rollout(&self) -> Result<Option<StoredRollout>, StoreError> {
        if self
            .fail_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("test: one failed read".into()));
        }
        self.inner.unfinished_rollout()
    }
    fn request_abort(&self, id: u64, reason: &str) -> Result<(), StoreError> {
        self.write()?;
        self.inner.request_abort(id, reason)
    }
    fn finish_rollout(&self, finish: &FinishRollout<'_>) -> Result<(), StoreError> {
        self.write()?;
        self.inner.finish_rollout(finish)
    }
    fn may_hold(&self, server: &str) -> Result<Option<Vec<u64>>, StoreError> {
        self.inner.may_hold(server)
    }
    fn server_states(&self) -> Result<Vec<control_plane::store::ServerState>, StoreError> {
        self.inner.server_states()
    }
    fn leadership(&self) -> tokio::sync::watch::Receiver<control_plane::store::Leadership> {
        self.inner.leadership()
    }
    fn watch_active(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_active()
    }
    fn watch_nodes(
        &self,
    ) -> tokio::sync::watch::Receiver<Arc<Vec<control_plane::store::RemoteNode>>> {
        self.inner.watch_nodes()
    }
}

/// A rollout of `new` from the active map, as `begin` would plan it, at `state`
/// (nothing published): what a test stores to stand for one left by a driver.
fn planned(plane: &ControlPlane, new: &ShardMap, state: Step) -> Rollout {
    let old = plane.active().unwrap();
    let plan = shardmap::diff(&old.map, new).unwrap();
    let (restart, skipped) = rollout::restart_plan(plane, &plan.fence).unwrap();
    let now = control_plane::store::now_ms();
    let steps = [Step::Plan, Step::Fence, Step::Restart, Step::Activate]
        .into_iter()
        .take_while(|s| *s != state)
        .chain([state])
        .map(|step| rollout::StepRecord {
            step,
            started_at: now,
            finished_at: None,
            note: None,
        })
        .collect();
    Rollout {
        id: 0,
        state,
        from_version: old.version,
        old_map: old.map.clone(),
        new_map: new.clone(),
        fence: plan.fence.clone(),
        plan: serde_json::to_value(&plan).unwrap(),
        restart,
        skipped,
        envoys: vec![],
        guarded: vec![],
        fence_version: None,
        new_version: None,
        rollback_version: None,
        author: "test".into(),
        comment: String::new(),
        reason: None,
        warnings: vec![],
        steps,
        created_at: now,
        finished_at: None,
        restart_ms: None,
        overhead_ms: None,
        resumed: 0,
        parallel: None,
    }
}

/// A rollout of [`half`] stored at its first step by a control plane on `config` that
/// is gone (as if killed before the rollout acted): its id.
fn stored_plan(config: &Config) -> u64 {
    let plane = ControlPlane::open(config.clone()).unwrap();
    let r = planned(&plane, &half(), Step::Plan);
    plane
        .store()
        .insert_rollout("plan", &serde_json::to_value(&r).unwrap())
        .unwrap()
}

/// Starts a control plane on a store holding a rollout at its first step
/// ([`stored_plan`]), whose first `failed_reads` reads of that rollout fail, and
/// checks that it completes the rollout.
fn a_stored_plan_completes(failed_reads: u64) {
    let two = Two::new();
    let config = two.config("5s");
    let id = stored_plan(&config);
    let cp = if failed_reads == 0 {
        Cp::start(config)
    } else {
        let flaky = Flaky::new(control_plane::store::open(&config).unwrap());
        flaky.fail_reads.store(failed_reads, Ordering::SeqCst);
        Cp::start_with(config, Arc::new(flaky))
    };
    let r = cp.finished(id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    assert_eq!(two.restarted(), ["a", "b"]);
}

/// Publishes `r`'s fence (as its driver would) and stores `r`, with no driver.
fn store_fenced(plane: &ControlPlane, r: &mut Rollout) -> u64 {
    let active = plane.active().unwrap();
    let fence = plane
        .publish(
            active.version,
            &NewVersion {
                kind: VersionKind::Fence,
                map: &r.old_map,
                fence: &r.fence,
                author: "test",
                comment: "fence",
            },
        )
        .unwrap();
    r.fence_version = Some(fence.version);
    let id = plane
        .store()
        .insert_rollout(r.state.as_str(), &serde_json::to_value(&*r).unwrap())
        .unwrap();
    r.id = id;
    plane
        .store()
        .save_rollout(id, r.state.as_str(), &serde_json::to_value(&*r).unwrap())
        .unwrap();
    id
}

#[test]
fn a_store_that_fails_mid_rollout_for_longer_than_30_tries_never_orphans_it() {
    let mut two = Two::new();
    // a's restart takes a moment: the store fails while it runs.
    two.servers[0].hook = command_hook(&format!("echo a >> {}; sleep 0.5", two.log.display()));
    let config = two.config("5s");
    let flaky = Arc::new(Flaky::new(control_plane::store::open(&config).unwrap()));
    let cp = Cp::start_with(config, flaky.clone());
    cp.edges(&["edge-1"]);
    let r = cp.begin(&half());
    cp.wait_for(r.id, "a restarting", |r| {
        r.restart[0].state == RestartState::Restarting
    });
    flaky.failing.store(true, Ordering::SeqCst);
    // Longer than the 30 tries (a second and the drain each) after which the old
    // driver gave up and left the rollout running with nobody driving it.
    std::thread::sleep(Duration::from_secs(42));
    assert!(!cp.rollout(r.id).state.finished());
    flaky.failing.store(false, Ordering::SeqCst);
    let back = Instant::now();
    let r = cp.finished(r.id);
    let took = back.elapsed();
    assert_eq!(r.state, Step::Done, "{r:#?}");
    assert!(
        took < Duration::from_secs(6),
        "ended {took:?} after the store came back"
    );
    assert!(cp.plane.active().unwrap().fence.is_empty());
    assert!(!cp.plane.rollout_signals().driving());
    // A push afterwards is taken.
    let (status, body) = cp.post(
        "/v1/maps",
        &json!({"map": map(json!({"default": "a", "slots": {"0-3": "a", "4-f": "b"}}))}),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        cp.finished(body["rollout"].as_u64().unwrap()).state,
        Step::Done
    );
}

#[test]
fn a_resume_whose_first_read_fails_is_tried_again() {
    // One Unavailable read, as right after an election.
    a_stored_plan_completes(1);
}

#[test]
fn abort_of_a_rollout_without_a_driver_starts_one_that_rolls_back() {
    let (two, cp) = Two::started("5s");
    cp.edges(&["edge-1"]);
    // A rollout at its fence that nothing drives (as one whose driver stopped).
    let mut r = planned(&cp.plane, &half(), Step::Fence);
    let id = store_fenced(&cp.plane, &mut r);
    let (status, body) = cp.post("/v1/rollouts/current/abort", &json!({}));
    assert_eq!(status, 200, "{body}");
    let start = Instant::now();
    let r = cp.finished(id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(r.reason.unwrap().contains("aborted"));
    let active = cp.plane.active().unwrap();
    assert!(active.fence.is_empty() && active.kind == VersionKind::Rollback);
    assert!(two.restarted().is_empty());
}

#[test]
fn a_rollout_is_refused_while_another_is_unfinished_and_plans_from_its_may_hold() {
    let (_two, cp) = Two::started("5s");
    cp.edges(&["edge-1"]);
    // Rollout 1: every server restarts; both may hold version 3 only.
    assert_eq!(cp.finished(cp.begin(&half()).id).state, Step::Done);
    // Rollout 2 moves 4-7 from a to b; it activated (b serves 4-7 from version 5)
    // and was left there without a driver: may_hold is not updated yet.
    let quarter = map(json!({"default": "a", "slots": {"0-3": "a", "4-f": "b"}}));
    let mut r = planned(&cp.plane, &quarter, Step::Activate);
    assert_eq!(r.restart.len(), 1);
    r.restart[0].state = RestartState::Healthy;
    r.restart[0].healthy_at = Some(control_plane::store::now_ms());
    let id = store_fenced(&cp.plane, &mut r);
    let fence = cp.plane.active().unwrap().version;
    let new = cp
        .plane
        .publish(
            fence,
            &NewVersion {
                kind: VersionKind::Map,
                map: &quarter,
                fence: &Default::default(),
                author: "test",
                comment: "rollout 2",
            },
        )
        .unwrap();
    r.new_version = Some(new.version);
    cp.plane
        .store()
        .save_rollout(id, "activate", &serde_json::to_value(&r).unwrap())
        .unwrap();
    // Moving 4-7 back to a: refused while rollout 2 is unfinished (b's history
    // would not show version 5, and b, which holds 4-7, would be skipped).
    let (status, body) = cp.post("/v1/maps", &json!({"map": half()}));
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["rollout"], id, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("rollout {id}")),
        "{body}"
    );
    // abort reaches a driver: too late to roll back, so it completes.
    let (status, body) = cp.post("/v1/rollouts/current/abort", &json!({}));
    assert_eq!(status, 409, "{body}");
    let r = cp.finished(id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    // Now b's history holds version 5: moving 4-7 back restarts b.
    let r = cp.begin(&half());
    assert_eq!(restarting(&r), ["b"], "{r:#?}");
    assert_eq!(cp.finished(r.id).state, Step::Done);
}

#[test]
fn a_resuming_leader_waits_for_acks_of_the_recorded_fence_not_of_what_it_served() {
    let two = Two::new();
    let config = two.config("1s");
    let cp = Cp::start(config.clone());
    // edge-1 runs the initial map and never ACKs a newer one.
    cp.envoy("edge-1", Arc::new(AtomicU64::new(1)));
    cp.wait_connected(1);
    // Another replica (another plane on the same store) fenced and stored a
    // rollout; this one's snapshot lags: it still serves version 1.
    let other = ControlPlane::open(config).unwrap();
    let mut r = planned(&other, &half(), Step::Fence);
    let id = store_fenced(&other, &mut r);
    assert_eq!(cp.plane.snapshot().map_version, 1);
    {
        let _enter = cp.rt.enter();
        assert_eq!(rollout::resume(&cp.plane).unwrap(), Some(id));
    }
    // edge-1 never ACKed the fence: nothing restarts, the rollout rolls back.
    let r = cp.finished(id);
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    assert!(r.reason.as_deref().unwrap().contains("edge-1"), "{r:#?}");
    assert!(two.restarted().is_empty());
}

#[test]
fn the_drain_before_restarting_a_guarded_server_covers_its_guards_connect_timeout() {
    // A guard waits at most this long for a connection to its server.
    let opts = deploy::bootstrap::Options {
        node_id: "guard-a".into(),
        control_plane: "127.0.0.1:18000".into(),
        ..deploy::bootstrap::Options::new(deploy::bootstrap::Kind::Guard { server: "a".into() })
    };
    let yaml = deploy::bootstrap::render(&opts).unwrap();
    let cluster = &yaml[yaml.find("- name: local_dtable_server\n    type:").unwrap()..];
    assert!(
        cluster.lines().nth(2) == Some("    connect_timeout: 1s"),
        "{cluster}"
    );
    // `drain = "300ms"`, shorter than that: a rollout restarting a guarded server
    // still waits the guard's connect timeout after the fence.
    let two = Two::guarded();
    let cp = two.start("5s");
    cp.guard("guard-a", "a");
    cp.guard("guard-b", "b");
    cp.wait_connected(2);
    let r = cp.finished(cp.begin(&half()).id);
    assert_eq!(r.state, Step::Done, "{r:#?}");
    let restart_step = r.steps.iter().find(|s| s.step == Step::Restart).unwrap();
    let waited = r.restart[0].started_at.unwrap() - restart_step.started_at;
    assert!(
        waited >= 1000,
        "restarted {waited} ms after the fence was ACKed"
    );
}
