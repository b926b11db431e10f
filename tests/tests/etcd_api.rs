//! Two control plane replicas on one etcd, in-process on loopback: changes sent to
//! the follower are done by the leader, two moving pushes at once start one
//! rollout, both replicas serve what the leader published, and without etcd every
//! change is refused with a clear 503 while status still answers.

use std::time::Duration;

use anyhow::Result;
use control_plane::Config;
use seashard_tests::etcd::EtcdCluster;
use seashard_tests::wait_until;
use serde_json::{Value, json};

mod common;

use common::Cp;

fn config(endpoints: &[String], replica: &str) -> Result<Config> {
    Ok(Config::parse(
        &toml_of(endpoints).replace("REPLICA", replica),
    )?)
}

fn toml_of(endpoints: &[String]) -> String {
    let rollout = "[rollout]\nack_timeout = \"2s\"\ndrain = \"0ms\"\n";
    common::etcd_config(
        endpoints,
        "/api-test",
        "REPLICA",
        "1s",
        "/opt/seashard/base-router.wasm",
        &format!("{rollout}{}", common::SERVERS_A_B),
    )
}

fn role(cp: &Cp) -> String {
    cp.status()
        .map(|s| s["leadership"]["role"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// A map moving no base (the initial one's default with a path rule).
fn path_rule() -> Value {
    json!({"map": {"default": "a", "paths": [{"prefix": "/api/v2.1/x/", "server": "b"}]}})
}

/// A map moving every base from `a` to `b`.
fn moving() -> Value {
    json!({"map": {"default": "b"}, "comment": "move all"})
}

#[test]
fn a_follower_forwards_changes_and_two_pushes_make_one_rollout() -> Result<()> {
    let mut etcd = EtcdCluster::start(1)?;
    let a = Cp::start(config(&etcd.endpoints(), "a")?)?;
    wait_until(Duration::from_secs(10), "a to lead", || {
        Ok((role(&a) == "leader").then_some(()))
    })?;
    let b = Cp::start(config(&etcd.endpoints(), "b")?)?;
    let status = wait_until(Duration::from_secs(10), "b to follow a", || {
        let s = b.status()?;
        Ok((s["leadership"]["leader"]["replica"] == "a").then_some(s))
    })?;
    assert_eq!(status["leadership"]["leader"]["replica"], "a", "{status}");
    assert_eq!(status["store"]["kind"], "etcd");
    assert_eq!(status["store"]["replica"], "b");

    // A change sent to the follower is the leader's: both serve it.
    let (code, body) = b.post("/v1/maps", &path_rule())?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["version"], 2, "{body}");
    for cp in [&a, &b] {
        wait_until(Duration::from_secs(5), "version 2 served", || {
            Ok((cp.status()?["version"] == 2).then_some(()))
        })?;
        assert_eq!(cp.plane.snapshot().map_version, 2);
    }
    let audit = a.get_json("/v1/audit")?;
    assert_eq!(audit["entries"][0]["action"], "push.map", "{audit}");

    // Two moving pushes at once, one to each replica: one rollout.
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.post("/v1/maps", &moving()));
        let tb = s.spawn(|| b.post("/v1/maps", &moving()));
        (ta.join(), tb.join())
    });
    let (ca, ba) = ra.map_err(|_| anyhow::anyhow!("push thread panicked"))??;
    let (cb, bb) = rb.map_err(|_| anyhow::anyhow!("push thread panicked"))??;
    let mut codes = [ca, cb];
    codes.sort();
    assert_eq!(codes, [202, 409], "a: {ba}\nb: {bb}");
    let rollouts = b.get_json("/v1/rollouts")?;
    assert_eq!(
        rollouts["rollouts"].as_array().map(Vec::len),
        Some(1),
        "{rollouts}"
    );
    // Steered through the follower too: abort, and it rolls back.
    let (code, body) = b.post("/v1/rollouts/current/abort", &json!({}))?;
    assert_eq!(code, 200, "{body}");
    wait_until(Duration::from_secs(10), "the rollout to roll back", || {
        let r = a.get_json("/v1/rollouts")?;
        Ok((r["rollouts"][0]["state"] == "rolled_back").then_some(()))
    })?;

    // `seactl serve --check` reads the store (and never campaigns).
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("seashard.toml");
    let text = toml_of(&etcd.endpoints());
    std::fs::write(&file, text)?;
    let check = || {
        std::process::Command::new(seashard_tests::rollout::seactl_bin()?)
            .args(["serve", "--check", "--config"])
            .arg(&file)
            .output()
            .map_err(anyhow::Error::from)
    };
    let out = check()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status_of = |cp: &Cp| {
        std::process::Command::new(seashard_tests::rollout::seactl_bin()?)
            .args(["status", "--url", &format!("http://{}", cp.http)])
            .env("SEASHARD_TOKEN", common::TOKEN)
            .output()
            .map_err(anyhow::Error::from)
    };
    let shown = status_of(&b)?;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("replica b; the leader is a"), "{text}");
    assert!(
        stdout.contains("store: etcd") && stdout.contains("/api-test"),
        "{stdout}"
    );
    assert_eq!(role(&a), "leader", "the check took leadership");

    // etcd gone: every change is refused, naming etcd; status still answers.
    etcd.kill(0);
    let out = check()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("etcd"), "{stderr}");
    let (code, body) = wait_until(Duration::from_secs(10), "a change refused", || {
        let (code, body) = b.post("/v1/maps", &path_rule())?;
        Ok((code == 503).then_some((code, body)))
    })?;
    assert_eq!(code, 503);
    assert_eq!(body["code"], "etcd_unavailable", "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("etcd"),
        "{body}"
    );
    let (code, body) = a.post("/v1/maps", &path_rule())?;
    assert_eq!(
        (code, &body["code"]),
        (503, &json!("etcd_unavailable")),
        "{body}"
    );
    let status = wait_until(Duration::from_secs(10), "status to say why", || {
        let s = a.status()?;
        Ok((s["store"]["ok"] == false && s["leadership"]["role"] == "unavailable").then_some(s))
    })?;
    assert!(
        status["version"].as_u64().is_some_and(|v| v >= 2),
        "{status}"
    );
    assert!(
        status["store"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("etcd"),
        "{status}"
    );
    let shown = status_of(&a)?;
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        !shown.status.success() && text.contains("the store cannot be read"),
        "{text}"
    );
    Ok(())
}

/// Audit entries are leader writes like the rest: a follower's, or a deposed
/// leader's late one, is refused by the leader-term condition and never stored.
#[test]
fn audit_entries_are_written_under_the_leader_term_only() -> Result<()> {
    use control_plane::store::{EtcdStore, Leadership, NewAudit, Store, StoreError};
    let etcd = EtcdCluster::start(1)?;
    let a = EtcdStore::connect(&config(&etcd.endpoints(), "a")?)?;
    a.advertise("http://127.0.0.1:1");
    wait_until(Duration::from_secs(10), "a to lead", || {
        Ok(a.leadership().borrow().is_leader().then_some(()))
    })?;
    let b = EtcdStore::connect(&config(&etcd.endpoints(), "b")?)?;
    b.advertise("http://127.0.0.1:2");
    wait_until(Duration::from_secs(10), "b to follow a", || {
        Ok(matches!(&*b.leadership().borrow(),
            Leadership::Follower { leader: Some(l) } if l.replica == "a")
        .then_some(()))
    })?;
    let entry = |s: &EtcdStore, action: &str| {
        s.audit(&NewAudit {
            actor: "test",
            action,
            version: None,
            detail: json!({}),
        })
    };
    entry(&a, "by.the.leader")?;
    assert!(
        matches!(entry(&b, "by.a.follower"), Err(StoreError::NotLeader(_))),
        "a follower's audit entry was taken"
    );
    // a stands down (as when its lease runs out): b leads in a new term.
    a.resign();
    wait_until(Duration::from_secs(10), "b to lead", || {
        Ok(b.leadership().borrow().is_leader().then_some(()))
    })?;
    assert!(
        matches!(
            entry(&a, "by.a.deposed.leader"),
            Err(StoreError::NotLeader(_))
        ),
        "a deposed leader's audit entry was taken"
    );
    entry(&b, "by.the.new.leader")?;
    let actions: Vec<String> = b.audit_log(10)?.into_iter().map(|e| e.action).collect();
    assert_eq!(actions, ["by.the.new.leader", "by.the.leader"]);
    Ok(())
}

/// An Envoy's record as replica `replica`'s store writes it.
fn node_record(id: &str, ip: &str, connected: bool) -> control_plane::store::NodeRecord {
    let now = control_plane::store::now_ms();
    control_plane::store::NodeRecord {
        id: format!("{id}@{ip}"),
        node_id: id.into(),
        peer: Some(ip.into()),
        role: "edge".into(),
        cluster: "edge".into(),
        first_seen: now,
        connected_since: connected.then_some(now),
        last_seen: now,
        transport: "grpc".into(),
        types: vec![],
    }
}

fn delete(cp: &Cp, path: &str) -> Result<u16> {
    let auth = format!("Bearer {}", common::TOKEN);
    let r = seashard_tests::Connection::open(cp.http)?.request(
        "DELETE",
        path,
        &[("authorization", auth.as_str())],
        b"",
    )?;
    Ok(r.status)
}

/// `DELETE /v1/nodes/{instance}` on the leader looks at every replica's records: an
/// Envoy last seen on a dead replica is forgotten; one connected to a live replica
/// is kept there, even though the leader holds an old disconnected record of it.
#[test]
fn forgetting_a_node_looks_at_every_replicas_records() -> Result<()> {
    use control_plane::store::{EtcdStore, Store};
    let etcd = EtcdCluster::start(1)?;
    let endpoints = etcd.endpoints();
    // a held edge-live once (its record, disconnected, is loaded when a starts).
    {
        let a = EtcdStore::connect(&config(&endpoints, "a")?)?;
        a.save_nodes(&[node_record("edge-live", "127.0.0.8", false)])?;
    }
    // c held edge-dead and is gone (no membership: a dead replica).
    {
        let c = EtcdStore::connect(&config(&endpoints, "c")?)?;
        c.save_nodes(&[node_record("edge-dead", "127.0.0.9", true)])?;
    }
    let a = Cp::start(config(&endpoints, "a")?)?;
    wait_until(Duration::from_secs(10), "a to lead", || {
        Ok((role(&a) == "leader").then_some(()))
    })?;
    // b lives (a follower: its membership lease holds) and holds edge-live's
    // stream now.
    let b = EtcdStore::connect(&config(&endpoints, "b")?)?;
    b.advertise("http://127.0.0.1:2");
    b.save_nodes(&[node_record("edge-live", "127.0.0.8", true)])?;
    let (live, dead) = ("edge-live@127.0.0.8", "edge-dead@127.0.0.9");
    wait_until(Duration::from_secs(15), "a to see both records", || {
        let r = a.plane.registry();
        Ok((r.node(live).is_some_and(|n| n.connected)
            && r.node(dead).is_some_and(|n| !n.connected))
        .then_some(()))
    })?;

    assert_eq!(delete(&a, &format!("/v1/nodes/{live}"))?, 409);
    assert!(
        b.load_nodes()?.iter().any(|n| n.id == live),
        "the live Envoy's record was deleted on its replica"
    );
    assert_eq!(delete(&a, &format!("/v1/nodes/{dead}"))?, 200);
    wait_until(
        Duration::from_secs(10),
        "the dead replica's record to go",
        || {
            let gone = !b.watch_nodes().borrow().iter().any(|n| n.record.id == dead);
            Ok((gone && a.plane.registry().node(dead).is_none()).then_some(()))
        },
    )?;
    assert!(a.plane.registry().node(live).is_some_and(|n| n.connected));
    Ok(())
}
