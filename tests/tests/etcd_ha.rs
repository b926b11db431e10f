//! Issue 9 end to end: several real `seactl serve` replicas on a real 3-member
//! etcd, edge Envoys bootstrapped with every replica's ADS address, fake
//! dtable-servers restarted by command hooks, and writers through the Envoys
//! counting acknowledged writes against storage (the lost-write experiment).
//!
//! The tests run one at a time (each starts a dozen processes with 2 s leases;
//! side by side on a small machine they would starve each other's keep-alives).

use std::sync::{Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use seashard_tests::dtable::Writers;
use seashard_tests::lost_writes::{ENVOY_SERVERS, Outcome, WAIT};
use seashard_tests::replicas::{
    HaSetup, Options, TAKEOVER_LIMIT, envoy_map_version, etcd_dump, rollout_history, rollout_ids,
    write_once,
};
use seashard_tests::rollout::{Kill, STEPS, new_map, old_map};
use seashard_tests::wait_until;

mod common;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A base of each server under both experiment maps (slots 0-3 and 8-f).
const BASE_A: &str = "12345678-1234-1234-1234-123456789abc";
const BASE_B: &str = "9abcdef0-1234-1234-1234-123456789abc";

/// Stops the writers, then every server (final saves); asserts no acknowledged
/// write is missing from storage and no base was held by two servers.
fn check_no_write_lost(ha: &mut HaSetup, writers: Vec<Writers>, at_least: usize) -> Outcome {
    let outcome = common::stop_writers(ha, writers).unwrap();
    assert!(
        outcome.acknowledged >= at_least,
        "too few writes acknowledged: {}",
        outcome.summary()
    );
    assert!(
        outcome.missing.is_empty(),
        "acknowledged writes lost: {:?}",
        outcome.missing
    );
    assert!(
        outcome.double.is_empty(),
        "bases held by two servers at once: {:#?}",
        outcome.double
    );
    outcome
}

fn wait_writes(writers: &[Writers], n: usize) {
    for w in writers {
        w.wait_for_more(n, WAIT).unwrap();
    }
}

/// The set-up of `opts` with two writers, once they have written 100 more.
fn writing(opts: &Options) -> (HaSetup, Vec<Writers>) {
    let ha = HaSetup::start(opts).unwrap();
    let writers = ha.writers(2);
    wait_writes(&writers, 100);
    (ha, writers)
}

/// Once `writers` have written 100 more: [`check_no_write_lost`].
fn check_after_more_writes(ha: &mut HaSetup, writers: Vec<Writers>, at_least: usize) -> Outcome {
    wait_writes(&writers, 100);
    check_no_write_lost(ha, writers, at_least)
}

/// A map that moves nothing: the active one with a path rule (no rollout).
fn no_move_map(current: &Value, n: usize) -> Value {
    let mut map = current.clone();
    map["paths"] = json!([{"prefix": format!("/etcd-ha/{n}/"), "server": ENVOY_SERVERS[1]}]);
    map
}

/// Waits until every Envoy of `ha` applied map `version` (its filter's gauge).
fn wait_envoys_at(ha: &HaSetup, version: u64, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    wait_until(
        limit,
        &format!("every Envoy to apply map {version}"),
        || {
            for e in &ha.envoys {
                if envoy_map_version(e)? != Some(version) {
                    return Ok(None);
                }
            }
            Ok(Some(t.elapsed()))
        },
    )
}

/// Both test bases answered through every Envoy by their owner.
fn assert_routes(ha: &HaSetup, tag: &str) {
    for (k, e) in ha.envoys.iter().enumerate() {
        for (base, owner) in [(BASE_A, ENVOY_SERVERS[0]), (BASE_B, ENVOY_SERVERS[1])] {
            let got = write_once(e.listener_addr, base, &format!("{tag}-{k}-{base}"))
                .unwrap_or_else(|err| panic!("{tag}: Envoy {k}, base {base}: {err:#}"));
            assert_eq!(got, owner, "{tag}: Envoy {k} sent base {base} to {got}");
        }
    }
}

// ---------------------------------------------------------------------------
// 1. The leader SIGKILLed at every step and at random moments
// ---------------------------------------------------------------------------

#[derive(Debug)]
struct KillRun {
    kill: Kill,
    /// The step seen when the kill was sent (`done`/`rolled_back` when the rollout
    /// ended before the aimed step was seen).
    killed_at: String,
    takeover: Duration,
    state: String,
    resumed: u64,
    /// The rollout had stored its end before the kill (the step was seen, then it
    /// finished during the `extra` wait): nothing was left to resume.
    ended_before_kill: bool,
}

fn kill_run(ha: &mut HaSetup, n: usize, kill: Kill, to: &Value) -> Result<KillRun> {
    let leader = ha.wait_leader(None, TAKEOVER_LIMIT)?;
    let (status, body) = ha.push(leader, to, &format!("etcd-ha kill run {n}"))?;
    if status != 202 {
        let nodes = etcd_dump(&ha.etcd, &format!("{}/nodes/", ha.prefix));
        let replicas = etcd_dump(&ha.etcd, &format!("{}/replicas/", ha.prefix));
        let view = ha.get_json(leader, "/v1/nodes");
        bail!(
            "run {n}: POST /v1/maps to the leader r{leader}: {status} {body}\n\
             etcd nodes/: {nodes:#?}\netcd replicas/: {replicas:#?}\nr{leader} /v1/nodes: {view:#?}"
        );
    }
    let id = body["rollout"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rollout id in {body}"))?;
    let aim = STEPS.iter().position(|s| *s == kill.step).unwrap_or(0);
    let seen = wait_until(
        WAIT,
        &format!("rollout {id} to reach {}", kill.step),
        || {
            let r = ha.rollout(&[leader], id)?;
            let state = r["state"].as_str().unwrap_or("?").to_owned();
            let at = STEPS.iter().position(|s| *s == state);
            Ok((at.is_none_or(|at| at >= aim)).then_some(state))
        },
    )?;
    std::thread::sleep(kill.extra);
    let t0 = Instant::now();
    let killed_ms = control_plane::store::now_ms();
    ha.kill(leader)?;
    let next = ha.wait_leader(Some(leader), TAKEOVER_LIMIT)?;
    let takeover = t0.elapsed();
    let survivors = ha.running();
    let end = ha.wait_rollout_end(&survivors, id)?;
    if end["state"] == "rolled_back" {
        // Why: the new leader's hook lines, and what the hooks printed.
        let hooks: Vec<String> = ha.replicas[next]
            .last_log()
            .lines()
            .filter(|l| l.contains("hook") || l.contains("restart"))
            .map(|l| l.chars().take(300).collect())
            .collect();
        eprintln!("run {n}: r{next} on hooks: {hooks:#?}");
        for s in &ha.cluster.servers {
            let out = std::fs::read_to_string(s.output_path()).unwrap_or_default();
            let tail: Vec<&str> = out.lines().rev().take(15).collect();
            eprintln!("run {n}: {} output (newest first): {tail:#?}", s.name);
        }
    }
    ha.restart(leader)
        .with_context(|| format!("start r{leader} again"))?;
    eprintln!(
        "run {n}: {kill:?}: killed r{leader} at {seen}; r{next} led after {takeover:?}; \
         rollout {id} {} (resumed {}){}",
        end["state"],
        end["resumed"],
        match end["reason"].as_str() {
            Some(why) if end["state"] == "rolled_back" => format!(": {why}"),
            _ => String::new(),
        }
    );
    Ok(KillRun {
        kill,
        killed_at: seen,
        takeover,
        state: end["state"].as_str().unwrap_or_default().to_owned(),
        resumed: end["resumed"].as_u64().unwrap_or(0),
        ended_before_kill: end["finished_at"].as_i64().is_some_and(|f| f <= killed_ms),
    })
}

#[test]
fn the_leader_sigkilled_at_each_step_and_at_random_moments_loses_no_write() {
    let _serial = serial();
    let seed = std::env::var("SEASHARD_HA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {seed} (replay with SEASHARD_HA_SEED={seed})");
    let mut ha = HaSetup::start(&Options::default()).unwrap();
    let writers = ha.writers(2);
    wait_writes(&writers, 200);

    let kills: Vec<Kill> = STEPS
        .iter()
        .map(|&step| Kill {
            step,
            extra: Duration::from_millis(30),
        })
        .chain((0..10).map(|k| Kill::random(seed.wrapping_add(k))))
        .collect();
    // Each run moves bases 4-7 to the other server (back where a rollout rolled back
    // left them).
    let mut current_is_old = true;
    let mut runs = Vec::new();
    for (n, kill) in kills.into_iter().enumerate() {
        let to = if current_is_old { new_map() } else { old_map() };
        let run = kill_run(&mut ha, n, kill, &to)
            .unwrap_or_else(|e| panic!("seed {seed}, run {n}: {e:#}"));
        if run.state == "done" {
            current_is_old = !current_is_old;
        }
        runs.push(run);
        ha.wait_current(&["edge-1", "edge-2"])
            .unwrap_or_else(|e| panic!("seed {seed}, after run {n}: {e:#}"));
        wait_writes(&writers, 50);
    }
    let outcome = check_no_write_lost(&mut ha, writers, 1000);

    let mut takeovers: Vec<Duration> = runs.iter().map(|r| r.takeover).collect();
    takeovers.sort();
    let p50 = takeovers[takeovers.len() / 2];
    let max = takeovers[takeovers.len() - 1];
    let done = runs.iter().filter(|r| r.state == "done").count();
    eprintln!(
        "seed {seed}: {} runs, {done} done, {} rolled back; takeover after SIGKILL: \
         p50 {p50:?}, max {max:?}; {} acknowledged writes, 0 lost",
        runs.len(),
        runs.len() - done,
        outcome.acknowledged
    );
    for r in &runs {
        assert!(
            matches!(r.state.as_str(), "done" | "rolled_back"),
            "seed {seed}: {r:?}"
        );
        // Killed before its end, the rollout was resumed by the new leader.
        if STEPS.contains(&r.killed_at.as_str()) && !r.ended_before_kill {
            assert!(r.resumed >= 1, "seed {seed}: not resumed: {r:?}");
        }
    }
    // The first four runs aimed at each step: each was killed at that step or later.
    for (r, step) in runs.iter().zip(STEPS) {
        assert_eq!(r.kill.step, step);
    }
    assert!(
        max <= TAKEOVER_LIMIT,
        "seed {seed}: takeover {max:?} > {TAKEOVER_LIMIT:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. A leader paused mid-rollout, resumed after a takeover
// ---------------------------------------------------------------------------

#[test]
fn a_paused_leader_resumed_after_a_takeover_is_refused_by_the_store_and_loses_no_write() {
    let _serial = serial();
    let mut ha = HaSetup::start(&Options::default()).unwrap();
    let writers = ha.writers(2);
    wait_writes(&writers, 200);

    let leader = ha.wait_leader(None, TAKEOVER_LIMIT).unwrap();
    let (status, body) = ha.push(leader, &new_map(), "etcd-ha pause").unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    // Paused while a restart hook it started runs (the hook goes on: the process
    // alone is stopped).
    let seen = wait_until(WAIT, "the rollout to restart a server", || {
        let r = ha.rollout(&[leader], id)?;
        Ok(matches!(
            r["state"].as_str(),
            Some("restart" | "activate" | "done" | "rolled_back")
        )
        .then(|| r["state"].as_str().unwrap_or_default().to_owned()))
    })
    .unwrap();
    assert_eq!(
        seen, "restart",
        "the rollout went past its restart step unseen"
    );
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    ha.replicas[leader].signal(libc::SIGSTOP).unwrap();
    let next = ha.wait_leader(Some(leader), TAKEOVER_LIMIT);
    let takeover = t0.elapsed();
    // SIGCONT whatever happened, so the paused process can be killed and reaped.
    let next = next.unwrap_or_else(|e| {
        let _ = ha.replicas[leader].signal(libc::SIGCONT);
        panic!("no takeover while r{leader} was paused: {e:#}")
    });
    let stored = ha.rollout(&[next], id).unwrap();
    eprintln!(
        "r{leader} paused at {seen}; r{next} led after {takeover:?}; rollout {id} then at {}",
        stored["state"]
    );
    ha.replicas[leader].signal(libc::SIGCONT).unwrap();
    let resumed_at = Instant::now();

    let others: Vec<usize> = (0..ha.replicas.len()).filter(|&i| i != leader).collect();
    let end = ha.wait_rollout_end(&others, id).unwrap();
    // The resumed replica notices it no longer leads: its late write is refused by
    // the fence (or, had its lease keeper noticed first, by its own term check).
    let said = wait_until(
        Duration::from_secs(15),
        "the resumed replica to say it is no longer the leader",
        || {
            let log = ha.replicas[leader].last_log();
            Ok(log
                .lines()
                .find(|l| l.contains("no longer the leader"))
                .map(str::to_owned))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ha.replicas[leader].last_log()));
    eprintln!(
        "r{leader} after SIGCONT ({:?}): {said}",
        resumed_at.elapsed()
    );
    let refused_by_store = ha.replicas[leader]
        .last_log()
        .contains("a leader write was refused");
    eprintln!("refused by the store's fence: {refused_by_store}");
    assert!(!ha.leads(leader), "the resumed replica still says it leads");
    // Give a late write every chance to land, then read the record's whole history.
    std::thread::sleep(Duration::from_secs(1));
    let history = rollout_history(&ha.etcd, &ha.prefix, id).unwrap();
    eprintln!("rollout {id} in etcd: {history:?}");
    let terminal: Vec<&(i64, String)> = history
        .iter()
        .filter(|(_, s)| matches!(s.as_str(), "done" | "rolled_back"))
        .collect();
    assert_eq!(terminal.len(), 1, "ended more than once: {history:?}");
    // No step written after a later one (a deposed leader's stale step would be).
    let rank = |s: &str| match s {
        "plan" => 0,
        "fence" => 1,
        "restart" => 2,
        "activate" => 3,
        "done" => 4,
        "rolling_back" => 5,
        "rolled_back" => 6,
        _ => 7,
    };
    assert!(
        history.windows(2).all(|w| rank(&w[0].1) <= rank(&w[1].1)),
        "a step went back: {history:?}"
    );
    assert_eq!(
        history.last(),
        terminal.first().copied(),
        "written after its end: {history:?}"
    );
    assert_eq!(
        Some(end["state"].as_str().unwrap()),
        terminal.first().map(|t| t.1.as_str())
    );
    let after = ha.rollout(&others, id).unwrap();
    assert_eq!(after["state"], end["state"]);

    ha.wait_current(&["edge-1", "edge-2"]).unwrap();
    check_after_more_writes(&mut ha, writers, 400);
}

// ---------------------------------------------------------------------------
// 3. One etcd member killed
// ---------------------------------------------------------------------------

/// How long, once the remaining etcd members are healthy, a push may be refused
/// after one member died (the clients' connections move to the live members).
const PUSH_RECOVERY: Duration = Duration::from_secs(10);

fn two_replicas() -> Options {
    Options {
        replicas: 2,
        ..Options::default()
    }
}

/// Pushes a map that moves nothing to the leader; it must be applied (200) and
/// reach every Envoy. The push → every Envoy applied time.
fn push_no_move(ha: &HaSetup, n: usize) -> Result<(u64, Duration)> {
    let leader = ha.wait_leader(None, TAKEOVER_LIMIT)?;
    let active = ha.get_json(leader, "/v1/map")?;
    if !active["map"].is_object() {
        bail!("GET /v1/map of r{leader}: {active}");
    }
    let map = no_move_map(&active["map"], n);
    let t = Instant::now();
    let (status, body) = ha.push(leader, &map, "etcd-ha no move")?;
    if status != 200 {
        bail!("push {n} to r{leader}: {status} {body}");
    }
    let version = body["version"]
        .as_u64()
        .ok_or_else(|| anyhow!("no version in {body}"))?;
    wait_envoys_at(ha, version, Duration::from_secs(10))?;
    Ok((version, t.elapsed()))
}

#[test]
fn with_one_etcd_member_killed_pushes_still_work() {
    let _serial = serial();
    let (mut ha, writers) = writing(&two_replicas());
    // The raft leader: the remaining two elect a new one.
    let member = ha.etcd.leader(0).unwrap();
    ha.etcd.kill(member);
    ha.etcd.wait_healthy(Duration::from_secs(10)).unwrap();
    let healthy = Instant::now();
    let mut errors = Vec::new();
    let first = wait_until(
        PUSH_RECOVERY,
        "a push with one etcd member dead",
        || match push_no_move(&ha, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                errors.push(format!("{:?}: {e:#}", healthy.elapsed()));
                Ok(None)
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\nrefusals: {errors:#?}\n{}", ha.logs_tail(30)));
    eprintln!(
        "etcd m{member} dead: the first push worked {:?} after the other two were healthy \
         ({} refused before: {:?}); version {} applied by every Envoy in {:?}",
        healthy.elapsed(),
        errors.len(),
        errors.first(),
        first.0,
        first.1
    );
    // Then every read and push works, whichever member each request goes to.
    let mut failed = Vec::new();
    for n in 0..20 {
        let leader = ha.wait_leader(None, TAKEOVER_LIMIT).unwrap();
        match ha.get_json(leader, "/v1/map") {
            Ok(v) if v["map"].is_object() => {}
            Ok(v) => failed.push(format!("read {n} from r{leader}: {v}")),
            Err(e) => failed.push(format!("read {n} from r{leader}: {e:#}")),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in 1..6 {
        match push_no_move(&ha, n) {
            Ok((version, took)) => eprintln!(
                "etcd m{member} dead: version {version} applied by every Envoy in {took:?}"
            ),
            Err(e) => failed.push(format!("push {n}: {e:#}")),
        }
    }
    assert!(
        failed.is_empty(),
        "with etcd m{member} dead, {} of 25 requests failed: {failed:#?}\n{}",
        failed.len(),
        ha.logs_tail(20)
    );
    assert_routes(&ha, "one-member-dead");
    check_after_more_writes(&mut ha, writers, 200);
}

// ---------------------------------------------------------------------------
// 4. Two of three etcd members killed
// ---------------------------------------------------------------------------

#[test]
fn without_an_etcd_majority_changes_are_refused_naming_etcd_and_envoys_keep_routing() {
    let _serial = serial();
    let (mut ha, writers) = writing(&two_replicas());
    let active = ha.get_json(0, "/v1/map").unwrap();
    let version = active["version"].as_u64().unwrap();

    ha.etcd.kill(1);
    ha.etcd.kill(2);
    let lost = Instant::now();
    // Every replica refuses a change, 503 naming etcd.
    for i in 0..ha.replicas.len() {
        let (status, body) = ha
            .push(i, &no_move_map(&active["map"], 1), "etcd-ha no quorum")
            .unwrap();
        eprintln!(
            "r{i} without a majority ({:?}): {status} {body}",
            lost.elapsed()
        );
        assert_eq!(status, 503, "r{i}: {body}");
        assert!(
            body.to_string().to_lowercase().contains("etcd"),
            "r{i}: the refusal does not name etcd: {body}"
        );
        assert!(
            matches!(
                body["code"].as_str(),
                Some("etcd_unavailable" | "no_leader" | "not_leader")
            ),
            "r{i}: {body}"
        );
    }
    // Envoys keep routing with their last config.
    assert_routes(&ha, "no-majority");
    wait_writes(&writers, 100);
    for e in &ha.envoys {
        assert_eq!(envoy_map_version(e).unwrap(), Some(version));
    }
    // `/v1/status` says why.
    for i in 0..ha.replicas.len() {
        let s = wait_until(
            Duration::from_secs(15),
            "status to say etcd is lost",
            || {
                let s = ha.get_json(i, "/v1/status")?;
                let says = s["store"]["ok"] == false || s["leadership"]["role"] == "unavailable";
                Ok(says.then_some(s))
            },
        )
        .unwrap();
        eprintln!(
            "r{i} status without a majority: store {} leadership {}",
            s["store"], s["leadership"]
        );
        assert_eq!(s["store"]["kind"], "etcd");
        assert_ne!(
            s["leadership"]["role"], "leader",
            "r{i}: {}",
            s["leadership"]
        );
        assert!(
            s.to_string().to_lowercase().contains("etcd") || s["leadership"]["reason"].is_string(),
            "r{i}: status does not say why: {s}"
        );
    }

    // The members back: changes work again.
    ha.etcd.restart(1).unwrap();
    ha.etcd.restart(2).unwrap();
    ha.etcd.wait_healthy(Duration::from_secs(20)).unwrap();
    let back = Instant::now();
    let (version, took) = wait_until(Duration::from_secs(30), "a push to work again", || {
        Ok(push_no_move(&ha, 2).ok())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ha.logs_tail(30)));
    eprintln!(
        "majority back: version {version} applied {:?} after, push → every Envoy {took:?}",
        back.elapsed()
    );
    assert_routes(&ha, "majority-back");
    check_after_more_writes(&mut ha, writers, 300);
}

// ---------------------------------------------------------------------------
// 5. An Envoy restarted while its replica is down
// ---------------------------------------------------------------------------

#[test]
fn an_envoy_restarted_while_its_replica_is_down_gets_its_map_from_another() {
    let _serial = serial();
    let (mut ha, writers) = writing(&two_replicas());
    let version = ha.get_json(0, "/v1/map").unwrap()["version"]
        .as_u64()
        .unwrap();
    // Envoy 0 lists r0 first; r0 dies, then Envoy 0 restarts.
    ha.kill(0).unwrap();
    let old = ha.envoys.remove(0);
    drop(old);
    let t = Instant::now();
    let e = ha.start_envoy("edge-1", 0).unwrap();
    writers[0].retarget(e.listener_addr);
    let started = t.elapsed();
    let routed = wait_until(
        Duration::from_secs(10),
        "the restarted Envoy to route by the map",
        || {
            let a = write_once(
                e.listener_addr,
                BASE_A,
                &format!("restarted-a-{:?}", t.elapsed()),
            );
            let b = write_once(
                e.listener_addr,
                BASE_B,
                &format!("restarted-b-{:?}", t.elapsed()),
            );
            match (a, b) {
                (Ok(a), Ok(b)) => Ok(Some((a, b))),
                (Err(err), _) | (_, Err(err)) => Err(err),
            }
        },
    )
    .unwrap_or_else(|err| panic!("{err:#}\n{}", e.logs()));
    eprintln!(
        "Envoy restarted with its replica r0 down: live after {started:?}, routing after {:?}",
        t.elapsed()
    );
    assert_eq!(routed, (ENVOY_SERVERS[0].into(), ENVOY_SERVERS[1].into()));
    assert_eq!(envoy_map_version(&e).unwrap(), Some(version));
    ha.envoys.insert(0, e);
    ha.wait_current(&["edge-1", "edge-2"]).unwrap();
    check_after_more_writes(&mut ha, writers, 200);
}

// ---------------------------------------------------------------------------
// 6. Two concurrent pushes to two replicas
// ---------------------------------------------------------------------------

#[test]
fn two_concurrent_pushes_to_two_replicas_start_exactly_one_rollout() {
    let _serial = serial();
    let (mut ha, writers) = writing(&two_replicas());
    let before = rollout_ids(&ha.replicas[0]).unwrap();
    // Two different moving maps, one to each replica, at once.
    let [a, b] = ENVOY_SERVERS;
    let maps = [
        new_map(),
        json!({"default": a, "slots": {"0-5": a, "6-f": b}}),
    ];
    let barrier = Barrier::new(2);
    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|i| {
                let (ha, barrier, map) = (&ha, &barrier, &maps[i]);
                s.spawn(move || {
                    barrier.wait();
                    ha.push(i, map, &format!("etcd-ha concurrent {i}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("push thread").expect("push"))
            .collect()
    });
    eprintln!("concurrent pushes: {answers:?}");
    let started: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s == 202).collect();
    assert_eq!(started.len(), 1, "{answers:?}");
    let other = answers.iter().find(|(s, _)| *s != 202).unwrap();
    assert!(matches!(other.0, 409 | 503), "{answers:?}");
    let id = started[0].1["rollout"].as_u64().unwrap();
    for i in 0..ha.replicas.len() {
        let after = rollout_ids(&ha.replicas[i]).unwrap();
        let new: Vec<&u64> = after.iter().filter(|r| !before.contains(r)).collect();
        assert_eq!(
            new,
            vec![&id],
            "r{i}: rollouts {after:?}, before {before:?}"
        );
    }
    let end = ha.wait_rollout_end(&[0, 1], id).unwrap();
    eprintln!("rollout {id}: {}", end["state"]);
    assert_eq!(end["state"], "done", "{end}");
    ha.wait_current(&["edge-1", "edge-2"]).unwrap();
    check_after_more_writes(&mut ha, writers, 200);
}

// ---------------------------------------------------------------------------
// 7. A restart hook a killed leader left running
// ---------------------------------------------------------------------------

/// Whether `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    !seashard_tests::dtable::process_gone(pid)
}

#[test]
fn a_restart_hook_left_running_by_a_killed_leader_is_waited_for_by_the_new_one() {
    let _serial = serial();
    // The hook execs into a second stage that runs past the takeover, as a wrapper
    // script ending in `exec` does (`sh -c '...; exec systemctl restart ...'`).
    let mut hook_prefix = seashard_tests::rollout::slow_hook(Vec::new());
    hook_prefix.extend(["sh", "-c", "sleep 5; exec \"$@\"", "sh"].map(String::from));
    let (mut ha, writers) = writing(&Options {
        hook_prefix,
        ..two_replicas()
    });
    let leader = ha.wait_leader(None, TAKEOVER_LIMIT).unwrap();
    let (status, body) = ha.push(leader, &new_map(), "etcd-ha hook").unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    let (server, pid) = wait_until(WAIT, "a restart hook's pid in the rollout", || {
        let r = ha.rollout(&[leader], id)?;
        Ok(r["restart"].as_array().and_then(|a| {
            a.iter().find_map(|s| {
                Some((
                    s["server"].as_str()?.to_owned(),
                    s["hook_process"]["pid"].as_u64()? as u32,
                ))
            })
        }))
    })
    .unwrap();
    // Past its first stage's `exec`.
    std::thread::sleep(Duration::from_millis(600));
    assert!(alive(pid), "the hook {pid} of {server} ended too soon");
    ha.kill(leader).unwrap();
    let next = ha.wait_leader(Some(leader), TAKEOVER_LIMIT).unwrap();
    let running_at_takeover = alive(pid);
    assert!(
        running_at_takeover,
        "the earlier hook {pid} ended before the takeover: nothing to wait for"
    );
    let end = ha.wait_rollout_end(&[next], id).unwrap();
    let log = ha.replicas[next].last_log();
    let waited = log
        .lines()
        .find(|l| l.contains("an earlier leader started still runs"))
        .map(str::to_owned);
    eprintln!(
        "hook {pid} of {server} ran on past the takeover by r{next}; rollout {id} {}; \
         the new leader waited for it: {waited:?}",
        end["state"]
    );
    ha.wait_current(&["edge-1", "edge-2"]).unwrap();
    check_after_more_writes(&mut ha, writers, 200);
    assert!(
        waited.is_some(),
        "r{next} took over while the hook {pid} that r{leader} started for {server} still \
         ran (on this host, its pid recorded) and ran its own without waiting for it:\n{}",
        log.lines()
            .filter(|l| l.contains("restart") || l.contains("hook"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
