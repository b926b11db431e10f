//! End to end: rollouts with the control plane (in-process, on loopback), two real
//! Envoys 1.40 with the built base-router filter, and fake dtable-servers restarted
//! by their real restart hook (`fake-dtable-ctl restart`, SIGTERM = final save).
//!
//! The control plane runs in its own tokio runtime: dropping that runtime without
//! any shutdown is its SIGKILL (sockets closed, nothing flushed).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use control_plane::Config;
use control_plane::rollout::{self, Rollout, Step};
use deploy::bootstrap::Kind;
use seashard_tests::dtable::{Cluster, double_service};
use seashard_tests::rollout::delayed_hook;
use seashard_tests::{Envoy, get, wait_until, wasm_file};
use serde_json::{Value, json};
use tempfile::TempDir;

mod common;

use common::{Cp, TOKEN, start_envoy};

const CONVERGE: Duration = Duration::from_secs(30);
const A: &str = "dtable-server";
const B: &str = "dtable-server-2";

/// Slot 0-3: stays on A in the first move.
const BASE_STAY: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/// Slot 4-7: moves from A to B.
const BASE_MOVED: &str = "4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
/// Slot 8-f: always B.
const BASE_HIGH: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

fn initial_map() -> Value {
    json!({"default": A, "slots": {"0-7": A, "8-f": B}})
}

/// Moves 4-7 from A to B.
fn moved_map() -> Value {
    json!({"default": A, "slots": {"0-3": A, "4-f": B}})
}

impl Cp {
    /// Starts a rollout of `map`; its id.
    fn start_rollout(&self, map: &Value) -> Result<u64> {
        let (status, body) = self.post("/v1/maps", &json!({"map": map, "comment": "e2e"}))?;
        if status != 202 {
            bail!("POST /v1/maps: {status} {body}");
        }
        body["rollout"]
            .as_u64()
            .ok_or_else(|| anyhow!("no rollout id in {body}"))
    }

    fn rollout(&self, id: u64) -> Result<Rollout> {
        let stored = self
            .plane
            .store()
            .rollout(id)?
            .ok_or_else(|| anyhow!("no rollout {id}"))?;
        Ok(rollout::parse(stored.record)?)
    }

    fn wait_rollout(
        &self,
        id: u64,
        what: &str,
        until: impl Fn(&Rollout) -> bool,
    ) -> Result<Rollout> {
        wait_until(Duration::from_secs(60), what, || {
            let r = self.rollout(id)?;
            Ok(until(&r).then_some(r))
        })
        .with_context(|| format!("rollout: {:#?}", self.rollout(id).ok()))
    }

    fn finished(&self, id: u64) -> Result<Rollout> {
        self.wait_rollout(id, "the rollout to end", |r| r.state.finished())
    }

    /// Waits until every node in `ids` is connected and ACKed the current filter config.
    fn wait_current(&self, ids: &[&str]) -> Result<()> {
        wait_until(CONVERGE, &format!("nodes {ids:?} to be current"), || {
            let s = self.get_json("/v1/status")?;
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

/// The fake dtable-servers A and B (restarted by their hooks), the wasm filter and
/// a directory for the control plane's config and store.
struct Servers {
    wasm: PathBuf,
    dir: TempDir,
    cluster: Cluster,
}

impl Servers {
    /// A and B, each saving every `save_interval`.
    fn start(save_interval: Duration) -> Result<Servers> {
        Ok(Servers {
            wasm: wasm_file("base_router.wasm")?,
            dir: tempfile::tempdir()?,
            cluster: Cluster::start(&[A, B], save_interval)?,
        })
    }

    /// The hook argv of each server, optionally delayed by `delay` seconds (so a
    /// test can look at the Envoys while the restart step runs).
    fn hooks(&self, delay: f64) -> Result<Vec<Vec<String>>> {
        self.cluster
            .servers
            .iter()
            .map(|s| {
                let argv = s.restart_hook()?;
                if delay <= 0.0 {
                    return Ok(argv);
                }
                Ok(delayed_hook(&delay.to_string(), argv))
            })
            .collect()
    }

    /// A control plane restarting the servers with `hooks`, its ADS on `grpc_port`
    /// (0: any), its store in the directory (a second one resumes the first's).
    fn cp(&self, grpc_port: u16, hooks: &[Vec<String>], ack_timeout: &str) -> Result<Cp> {
        let dir = self.dir.path();
        std::fs::write(dir.join("initial.json"), initial_map().to_string())?;
        let wasm = &self.wasm;
        let mut text = format!(
            "initial_map = \"initial.json\"\n\
             [listen]\ngrpc = \"127.0.0.1:{grpc_port}\"\nhttp = \"127.0.0.1:0\"\n\
             [store]\npath = \"seashard.db\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [filter]\nwasm = {wasm:?}\nretry_after = 2\n\
             [rollout]\nack_timeout = \"{ack_timeout}\"\nhealth_timeout = \"10s\"\nrestart_timeout = \"30s\"\n"
        );
        for (s, hook) in self.cluster.servers.iter().zip(hooks) {
            text.push_str(&format!(
                "[[server]]\nname = \"{}\"\naddress = \"{}\"\nrestart = {{ kind = \"command\", argv = {} }}\n",
                s.name,
                s.addr,
                serde_json::to_string(hook)?
            ));
        }
        let path = dir.join("seashard.toml");
        std::fs::write(&path, text)?;
        Cp::start(Config::load(&path)?)
    }

    /// A control plane on any port with an edge (`edge-1`) and a sidecar
    /// (`sidecar-1`) Envoy on it, both current.
    fn cp_and_envoys(
        &self,
        hooks: &[Vec<String>],
        ack_timeout: &str,
    ) -> Result<(Cp, Envoy, Envoy)> {
        let cp = self.cp(0, hooks, ack_timeout)?;
        let edge = start_envoy(Kind::Edge, "edge-1", cp.grpc, &self.wasm)?;
        let side = start_envoy(Kind::Sidecar, "sidecar-1", cp.grpc, &self.wasm)?;
        cp.wait_current(&["edge-1", "sidecar-1"])?;
        Ok((cp, edge, side))
    }

    /// How many times `server` started.
    fn starts(&self, server: &str) -> Result<usize> {
        Ok(self
            .cluster
            .events()?
            .iter()
            .filter(|e| e.server == server && e.event == "start")
            .count())
    }

    /// No base was ever held in memory by two servers at once.
    fn assert_no_double_service(&self) -> Result<()> {
        let doubles = double_service(&self.cluster.events()?);
        assert!(doubles.is_empty(), "bases held twice: {doubles:#?}");
        Ok(())
    }

    /// After the move to [`moved_map`] restarting each server once: the moved base
    /// is served by B through `envoys`, each server started twice, no base was held
    /// twice.
    fn assert_moved_restarting_each_once(&self, envoys: [&Envoy; 2]) -> Result<()> {
        for e in envoys {
            wait_served_by(e, BASE_MOVED, B)?;
        }
        assert_eq!(self.starts(A)?, 2);
        assert_eq!(self.starts(B)?, 2);
        self.assert_no_double_service()
    }
}

fn rows(base: &str) -> String {
    format!("/dtable-server/api/v1/dtables/{base}/rows/")
}

/// Status and serving server of a GET of `base` through `envoy`.
fn fetch(envoy: &Envoy, base: &str) -> Result<(u16, String, Option<String>)> {
    let r = get(envoy.listener_addr, &rows(base), &[])?;
    let server = if r.status == 200 {
        r.json()?["server"].as_str().unwrap_or_default().to_owned()
    } else {
        r.text()
    };
    Ok((r.status, server, r.header("retry-after").map(str::to_owned)))
}

fn served_by(envoy: &Envoy, base: &str) -> Result<String> {
    let (status, server, _) = fetch(envoy, base)?;
    if status != 200 {
        bail!("{base}: {status} {server}");
    }
    Ok(server)
}

/// Waits until `base` is served by `server` through `envoy`.
fn wait_served_by(envoy: &Envoy, base: &str, server: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(10),
        &format!("{base} on {server}"),
        || {
            Ok(fetch(envoy, base)
                .ok()
                .filter(|(s, by, _)| *s == 200 && by == server)
                .map(|_| ()))
        },
    )
}

/// The pid listening on the Envoy's admin port.
fn envoy_pid(envoy: &Envoy) -> Result<i32> {
    let out = std::process::Command::new("lsof")
        .args([
            "-t",
            "-a",
            &format!("-iTCP:{}", envoy.admin_addr.port()),
            "-sTCP:LISTEN",
        ])
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| anyhow!("no process listens on {}", envoy.admin_addr))
}

fn signal(pid: i32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn a_rollout_through_two_real_envoys_fences_restarts_then_moves_the_base() -> Result<()> {
    let servers = Servers::start(Duration::from_millis(200))?;
    let (cp, edge, side) = servers.cp_and_envoys(&servers.hooks(1.5)?, "5s")?;
    for e in [&edge, &side] {
        assert_eq!(served_by(e, BASE_MOVED)?, A);
        assert_eq!(served_by(e, BASE_STAY)?, A);
        assert_eq!(served_by(e, BASE_HIGH)?, B);
    }

    // The first rollout: every server restarts (seashard never restarted them).
    let id = cp.start_rollout(&moved_map())?;
    let r = cp.wait_rollout(id, "the restart step", |r| r.state == Step::Restart)?;
    assert_eq!(r.fence.slots, vec!["4-7".to_owned()]);
    let restart: Vec<&str> = r.restart.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(restart, [A, B]);
    // While the servers restart, the moved base answers 503 + retry-after through
    // both Envoys; the others are still routed.
    for e in [&edge, &side] {
        let (status, body, retry) = fetch(e, BASE_MOVED)?;
        assert_eq!(status, 503, "{body}");
        assert_eq!(retry.as_deref(), Some("2"));
        assert_eq!(served_by(e, BASE_HIGH)?, B);
    }
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::Done, "{r:#?}");
    for e in [&edge, &side] {
        wait_served_by(e, BASE_MOVED, B)?;
        assert_eq!(served_by(e, BASE_STAY)?, A);
    }
    assert_eq!(servers.starts(A)?, 2);
    assert_eq!(servers.starts(B)?, 2);
    eprintln!(
        "rollout 1 (2 real Envoys, restart {A} and {B}): total {} ms, restarts {} ms, overhead {} ms",
        r.finished_at.unwrap_or(0) - r.created_at,
        r.restart_ms.unwrap_or(0),
        r.overhead_ms.unwrap_or(0)
    );

    // A later rollout moving 0-3 from A to B: only A may hold those bases.
    let id = cp.start_rollout(&json!({"default": A, "slots": {"0-3": B, "4-f": B}}))?;
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::Done, "{r:#?}");
    let restart: Vec<&str> = r.restart.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(restart, [A], "{r:#?}");
    assert_eq!(servers.starts(A)?, 3);
    assert_eq!(servers.starts(B)?, 2);
    for e in [&edge, &side] {
        wait_served_by(e, BASE_STAY, B)?;
    }
    let overhead = r.overhead_ms.unwrap_or(u64::MAX);
    eprintln!(
        "rollout 2 (2 real Envoys, restart {A}): total {} ms, restarts {} ms, overhead {overhead} ms",
        r.finished_at.unwrap_or(0) - r.created_at,
        r.restart_ms.unwrap_or(0),
    );
    assert!(overhead <= 1000, "rollout overhead {overhead} ms > 1 s");
    servers.assert_no_double_service()?;
    cp.kill();
    Ok(())
}

#[test]
fn an_envoy_that_never_acks_the_fence_rolls_back() -> Result<()> {
    let servers = Servers::start(Duration::from_millis(200))?;
    let (cp, edge, side) = servers.cp_and_envoys(&servers.hooks(0.0)?, "1s")?;
    let pid = envoy_pid(&side)?;
    signal(pid, libc::SIGSTOP)?;
    let id = cp.start_rollout(&moved_map());
    let r = id.and_then(|id| cp.finished(id));
    signal(pid, libc::SIGCONT)?;
    let r = r?;
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    let reason = r.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no ACK") && reason.contains("sidecar-1"),
        "{reason}"
    );
    // No server was restarted, the rollback reaches both Envoys, the base stays on A.
    assert_eq!(servers.starts(A)?, 1);
    assert_eq!(servers.starts(B)?, 1);
    cp.wait_current(&["edge-1", "sidecar-1"])?;
    for e in [&edge, &side] {
        wait_served_by(e, BASE_MOVED, A)?;
    }
    cp.kill();
    Ok(())
}

#[test]
fn a_failing_hook_rolls_back_and_an_envoy_restarted_mid_rollout_gets_the_fence() -> Result<()> {
    let servers = Servers::start(Duration::from_millis(200))?;
    let mut h = servers.hooks(2.0)?;
    // B's hook fails after A restarted.
    h[1] = vec!["sh".into(), "-c".into(), "sleep 0.5; exit 7".into()];
    let (cp, edge, side) = servers.cp_and_envoys(&h, "5s")?;
    let id = cp.start_rollout(&moved_map())?;
    cp.wait_rollout(id, "the restart step", |r| r.state == Step::Restart)?;
    // The sidecar restarts while A's hook runs: it comes back with the fence.
    drop(side);
    let side = start_envoy(Kind::Sidecar, "sidecar-1", cp.grpc, &servers.wasm)?;
    wait_until(Duration::from_secs(10), "the new sidecar to fence", || {
        let (status, body, _) = fetch(&side, BASE_MOVED)?;
        if status == 200 && body != A {
            bail!("the moved base reached {body} during the fence");
        }
        Ok((status == 503).then_some(()))
    })?;
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::RolledBack, "{r:#?}");
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains(B) && reason.contains("exit"), "{reason}");
    cp.wait_current(&["edge-1", "sidecar-1"])?;
    for e in [&edge, &side] {
        wait_served_by(e, BASE_MOVED, A)?;
    }
    servers.assert_no_double_service()?;
    cp.kill();
    Ok(())
}

#[test]
fn a_control_plane_killed_during_the_restart_step_resumes_and_completes() -> Result<()> {
    let servers = Servers::start(Duration::from_millis(200))?;
    let (cp, edge, side) = servers.cp_and_envoys(&servers.hooks(3.0)?, "5s")?;
    let port = cp.grpc.port();
    assert_eq!(served_by(&edge, BASE_MOVED)?, A);
    let id = cp.start_rollout(&moved_map())?;
    cp.wait_rollout(id, "A's restart", |r| r.restarting().is_some())?;
    let killed_at = Instant::now();
    cp.kill();
    // The Envoys keep the fence while no control plane runs.
    for e in [&edge, &side] {
        assert_eq!(fetch(e, BASE_MOVED)?.0, 503);
    }
    let cp = servers.cp(port, &servers.hooks(0.0)?, "5s")?;
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::Done, "{r:#?}");
    assert_eq!(r.resumed, 1);
    eprintln!(
        "killed during the restart step, resumed and done {:?} later",
        killed_at.elapsed()
    );
    // A's slow hook was killed with the control plane; the new one ran it again.
    servers.assert_moved_restarting_each_once([&edge, &side])?;
    cp.kill();
    Ok(())
}

#[test]
fn writes_through_envoy_during_a_rollout_lose_nothing() -> Result<()> {
    let mut servers = Servers::start(Duration::from_millis(300))?;
    let (cp, edge, side) = servers.cp_and_envoys(&servers.hooks(0.3)?, "5s")?;
    let bases = seashard_tests::dtable::spread_bases(32);
    let writers = seashard_tests::dtable::Writers::start(edge.listener_addr, &bases, 4, 100_000);
    writers.wait_for_more(200, Duration::from_secs(20))?;
    // Moved bases are loaded by A before the change.
    seashard_tests::lost_writes::wait_until_a_moved_base_is_loaded_by(&servers.cluster, A)?;
    let id = cp.start_rollout(&moved_map())?;
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::Done, "{r:#?}");
    seashard_tests::lost_writes::wait_until_a_moved_base_is_loaded_by(&servers.cluster, B)?;
    writers.wait_for_more(200, Duration::from_secs(20))?;
    let outcome = seashard_tests::lost_writes::Outcome::collect(&mut servers.cluster, writers)?;
    eprintln!(
        "writes during a rollout (overhead {} ms): {}",
        r.overhead_ms.unwrap_or(0),
        outcome.summary()
    );
    assert!(outcome.missing.is_empty(), "{:?}", outcome.missing);
    assert!(outcome.double.is_empty(), "{:#?}", outcome.double);
    drop(side);
    cp.kill();
    Ok(())
}

/// Kills the control plane while the rollout waits in `step` for the sidecar's ACK
/// (the sidecar is stopped with SIGSTOP), lets the sidecar go, starts a new control
/// plane on the same port and store: the rollout completes from that step.
fn killed_while_waiting_for_acks(step: Step) -> Result<()> {
    let servers = Servers::start(Duration::from_millis(200))?;
    let h = servers.hooks(0.5)?;
    let (cp, edge, side) = servers.cp_and_envoys(&h, "60s")?;
    let port = cp.grpc.port();
    let pid = envoy_pid(&side)?;
    if step == Step::Fence {
        signal(pid, libc::SIGSTOP)?;
    }
    let id = cp.start_rollout(&moved_map())?;
    if step == Step::Activate {
        cp.wait_rollout(id, "the restart step", |r| r.state == Step::Restart)?;
        signal(pid, libc::SIGSTOP)?;
    }
    let held = cp.wait_rollout(id, step.as_str(), |r| {
        r.state == step
            && (r.fence_version.is_some() && (step == Step::Fence || r.new_version.is_some()))
    });
    std::thread::sleep(Duration::from_millis(300));
    cp.kill();
    signal(pid, libc::SIGCONT)?;
    let held = held?;
    let cp = servers.cp(port, &h, "10s")?;
    let r = cp.finished(id)?;
    assert_eq!(r.state, Step::Done, "held at {:?}: {r:#?}", held.state);
    assert_eq!(r.resumed, 1);
    let steps: Vec<Step> = r.steps.iter().map(|s| s.step).collect();
    assert_eq!(
        steps,
        [
            Step::Plan,
            Step::Fence,
            Step::Restart,
            Step::Activate,
            Step::Done
        ]
    );
    let kinds: Vec<_> = cp
        .plane
        .store()
        .history(10)?
        .into_iter()
        .rev()
        .map(|v| v.kind)
        .collect();
    use control_plane::VersionKind as K;
    assert_eq!(
        kinds,
        [K::Initial, K::Fence, K::Map],
        "one fence, one activation"
    );
    servers.assert_moved_restarting_each_once([&edge, &side])?;
    cp.kill();
    Ok(())
}

#[test]
fn a_control_plane_killed_while_the_fence_waits_for_an_ack_resumes_and_completes() -> Result<()> {
    killed_while_waiting_for_acks(Step::Fence)
}

#[test]
fn a_control_plane_killed_while_activating_resumes_and_completes() -> Result<()> {
    killed_while_waiting_for_acks(Step::Activate)
}
