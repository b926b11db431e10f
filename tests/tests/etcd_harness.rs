//! The etcd test harness itself: a real 3-member etcd 3.4 cluster on loopback
//! keeps accepting writes with one member gone, refuses them with two gone, and
//! leaves no etcd process behind when dropped.

use std::path::Path;
use std::time::{Duration, Instant};

use seashard_tests::etcd::{EtcdCluster, REQUEST_TIMEOUT};
use seashard_tests::wait_until;

/// Whether `pid` is still a process (a zombie counts as gone: it runs nothing).
fn alive(pid: u32) -> bool {
    !seashard_tests::dtable::process_gone(pid)
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
}

#[test]
fn three_members_survive_one_loss_and_refuse_writes_without_a_majority() {
    let started = Instant::now();
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "3 members healthy in {:?}: {:?}",
        started.elapsed(),
        etcd.endpoints()
    );
    assert!(etcd.is_healthy());
    let pids = etcd.pids();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|&p| comm(p).trim() == "etcd"), "{pids:?}");
    let dir = etcd.dir().to_owned();

    // Written through one member, read through another.
    let rev = etcd.put(0, "seashard/test", "one").unwrap();
    assert!(rev > 1, "revision {rev}");
    assert_eq!(
        etcd.get(2, "seashard/test").unwrap().as_deref(),
        Some("one")
    );
    assert_eq!(etcd.get(1, "seashard/absent").unwrap(), None);

    // One member killed (the raft leader, the harder case): 2 of 3 are a majority.
    let leader = etcd.leader(0).unwrap();
    let pid = etcd.pid(leader).unwrap();
    etcd.kill(leader);
    assert!(!alive(pid), "etcd {pid} still runs after kill");
    let (a, b) = match leader {
        0 => (1, 2),
        1 => (0, 2),
        _ => (0, 1),
    };
    // A new leader is elected within a few election timeouts: ask often.
    etcd.set_request_timeout(Duration::from_millis(300));
    let t = Instant::now();
    let rev2 = wait_until(
        Duration::from_secs(10),
        "a write with one member gone",
        || Ok(etcd.put(a, "seashard/test", "two").ok()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", etcd.logs_tail(20)));
    eprintln!("write accepted {:?} after killing the leader", t.elapsed());
    etcd.set_request_timeout(REQUEST_TIMEOUT);
    assert!(rev2 > rev);
    assert_eq!(
        etcd.get(b, "seashard/test").unwrap().as_deref(),
        Some("two")
    );
    assert!(!etcd.is_healthy(), "a member is down");
    assert!(etcd.member_healthy(a) && etcd.member_healthy(b));

    // A second one killed: no majority, so writes are refused or time out, bounded.
    etcd.kill(b);
    let t = Instant::now();
    let err = etcd.put(a, "seashard/test", "three").unwrap_err();
    let took = t.elapsed();
    eprintln!("write without a majority failed after {took:?}: {err:#}");
    assert!(
        took < REQUEST_TIMEOUT * 2 + Duration::from_secs(1),
        "{took:?}"
    );
    // The survivor says so on /health too, once it lost the leader's lease.
    wait_until(
        Duration::from_secs(10),
        "the survivor to be unhealthy",
        || Ok((!etcd.member_healthy(a)).then_some(())),
    )
    .unwrap();

    // A member restarted on its data brings the majority back, and the data.
    etcd.restart(b).unwrap();
    etcd.wait_healthy(Duration::from_secs(15)).unwrap();
    // A write that timed out is not known to have failed: proposed while the
    // survivor still led, it may commit once the majority is back.
    let now = etcd.get(b, "seashard/test").unwrap();
    assert!(matches!(now.as_deref(), Some("two" | "three")), "{now:?}");

    // Drop kills every member and removes the data.
    let pids = etcd.pids();
    assert_eq!(pids.len(), 2);
    drop(etcd);
    for p in pids {
        assert!(!alive(p), "etcd {p} ({}) outlived the harness", comm(p));
    }
    assert!(!Path::new(&dir).exists(), "{} left behind", dir.display());
}

#[test]
fn a_paused_member_is_unhealthy_and_recovers() {
    let mut etcd = EtcdCluster::start(3).unwrap_or_else(|e| panic!("{e:#}"));
    etcd.stop(1).unwrap();
    assert!(!etcd.member_healthy(1));
    // The others keep a majority.
    etcd.put(0, "k", "v").unwrap();
    etcd.cont(1).unwrap();
    wait_until(Duration::from_secs(10), "the resumed member", || {
        Ok(etcd.member_healthy(1).then_some(()))
    })
    .unwrap();
    assert_eq!(etcd.get(1, "k").unwrap().as_deref(), Some("v"));
    // Drop of a stopped member kills it too.
    etcd.stop(2).unwrap();
    let pids = etcd.pids();
    drop(etcd);
    for p in pids {
        assert!(!alive(p), "etcd {p} outlived the harness");
    }
}
