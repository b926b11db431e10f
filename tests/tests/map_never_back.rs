//! Issue 16, "a map version never goes back", end to end: three real `seactl
//! serve` replicas on a real 3-member etcd, the third one's links to etcd cut
//! silently (relays) while it keeps running. The other two roll out a moving map;
//! then both die and every Envoy, edges and a guard, reconnects to the third. It
//! must not hand them its older map: measured before the fix, both edges and the
//! guard went back to it and acknowledged writes were lost.

use std::time::{Duration, Instant};

use seashard_tests::lost_writes::{ENVOY_SERVERS, WAIT};
use seashard_tests::replicas::{HaSetup, Options, TAKEOVER_LIMIT, envoy_map_version, write_once};
use seashard_tests::rollout::{self, new_map};
use seashard_tests::{Envoy, loopback, wait_until};

mod common;

/// A base the new map moves from the first server to the second.
const MOVED: &str = "45678901-1234-1234-1234-123456789abc";
/// The replica cut off from etcd.
const CUT: usize = 2;
/// How long the Envoys are watched once only the cut replica is left.
const WATCH: Duration = Duration::from_secs(12);

/// A guard of the second server (node `guard-NAME`), its ADS addresses every
/// replica's, r0's first.
fn start_guard(ha: &HaSetup) -> Envoy {
    let others: Vec<String> = ha.replicas[1..]
        .iter()
        .map(|r| r.grpc.to_string())
        .collect();
    let mut extra = Vec::new();
    for o in &others {
        extra.extend(["--control-plane", o.as_str()]);
    }
    rollout::start_guard(
        &ha.cluster.servers[1],
        &extra,
        ha.replicas[0].grpc,
        loopback(0),
    )
    .unwrap()
}

/// The map version each edge and the guard applied (their filter's gauge).
fn versions(ha: &HaSetup, guard: &Envoy) -> Vec<Option<u64>> {
    ha.envoys
        .iter()
        .chain([guard])
        .map(|e| envoy_map_version(e).ok().flatten())
        .collect()
}

#[test]
fn a_replica_cut_off_from_etcd_never_hands_envoys_its_older_map() {
    let mut ha = HaSetup::start(&Options {
        etcd_relayed: vec![CUT],
        envoys: Vec::new(),
        ..Options::default()
    })
    .unwrap();
    // Every Envoy is given all three replicas but first connects to one of the
    // other two (the third is down meanwhile): as measured, the rollout below then
    // waits on no Envoy of the replica about to be cut off.
    ha.kill(CUT).unwrap();
    for (k, id) in ["edge-1", "edge-2"].into_iter().enumerate() {
        let e = ha.start_envoy(id, k).unwrap();
        ha.envoys.push(e);
    }
    let guard = start_guard(&ha);
    let guard_id = format!("guard-{}", ha.cluster.servers[1].name);
    ha.wait_current(&["edge-1", "edge-2", &guard_id]).unwrap();
    ha.restart(CUT).unwrap();
    wait_until(WAIT, "the third replica to answer", || {
        Ok(ha.up(CUT).then_some(()))
    })
    .unwrap();
    let writers = ha.writers(2);
    for w in &writers {
        w.wait_for_more(200, WAIT).unwrap();
    }

    // The third replica's links to etcd die silently; it stays up. Once its lease
    // ran out, the others no longer wait for it (and one of them leads).
    ha.cut_etcd(CUT).unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let leader = ha.wait_leader(Some(CUT), TAKEOVER_LIMIT).unwrap();
    let (status, body) = ha.push(leader, &new_map(), "map never back").unwrap();
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    let done = ha.wait_rollout_end(&[0, 1], id).unwrap();
    assert_eq!(done["state"], "done", "{done}");
    let version = ha.get_json(leader, "/healthz").unwrap()["version"]
        .as_u64()
        .unwrap();
    wait_until(WAIT, &format!("every Envoy to apply map {version}"), || {
        Ok(versions(&ha, &guard)
            .iter()
            .all(|v| *v == Some(version))
            .then_some(()))
    })
    .unwrap();
    for w in &writers {
        w.wait_for_more(100, WAIT).unwrap();
    }

    // The two replicas that know the new map die: every Envoy reconnects to the
    // third one, which still holds the old map.
    ha.kill(0).unwrap();
    ha.kill(1).unwrap();
    let t = Instant::now();
    let mut went_back = Vec::new();
    while t.elapsed() < WATCH {
        for (k, v) in versions(&ha, &guard).into_iter().enumerate() {
            if let Some(v) = v
                && v < version
            {
                went_back.push(format!("Envoy {k} at map {v} after {:?}", t.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut_log = ha.logs_tail(30);
    // The moved base still goes to its new owner, through both edges and the guard.
    let mut misrouted = Vec::new();
    let mut via: Vec<(String, std::net::SocketAddr)> = ha
        .envoys
        .iter()
        .enumerate()
        .map(|(k, e)| (format!("edge {k}"), e.listener_addr))
        .collect();
    via.push(("the guard".into(), guard.listener_addr));
    for (name, addr) in via {
        match write_once(addr, MOVED, &format!("after-{name}")) {
            Ok(got) if got == ENVOY_SERVERS[1] => {}
            other => misrouted.push(format!("{name}: {other:?}")),
        }
    }
    for w in &writers {
        w.wait_for_more(100, WAIT).unwrap();
    }

    let outcome = common::stop_writers(&mut ha, writers).unwrap();
    assert!(
        went_back.is_empty(),
        "Envoys went back from map {version}: {went_back:?}; {} acknowledged writes \
         lost\n{cut_log}",
        outcome.missing.len()
    );
    assert!(
        misrouted.is_empty(),
        "the moved base misrouted: {misrouted:?}"
    );
    assert!(outcome.acknowledged >= 400, "{}", outcome.summary());
    assert!(
        outcome.missing.is_empty(),
        "{} acknowledged writes lost: {:?}",
        outcome.missing.len(),
        outcome.missing
    );
    assert!(
        outcome.double.is_empty(),
        "bases held by two servers at once: {:#?}",
        outcome.double
    );
}
