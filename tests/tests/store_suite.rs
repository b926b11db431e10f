//! One behaviour, two stores: the same suite runs against the SQLite store and the
//! etcd store (a real etcd on loopback), and etcd's fencing is tried from outside:
//! two replicas on one prefix, the leader deposed, its late writes refused.

use std::time::{Duration, Instant};

use control_plane::Config;
use control_plane::store::{
    EtcdStore, FinishRollout, Leadership, NewAudit, NewVersion, NodeRecord, SqliteStore, Store,
    StoreError, TypeRecord, VersionKind,
};
use seashard_tests::etcd::EtcdCluster;
use shardmap::{Fence, ShardMap};

mod common;

fn map(default: &str) -> ShardMap {
    ShardMap {
        default: default.into(),
        ..ShardMap::default()
    }
}

fn push(s: &dyn Store, expected: u64, m: &ShardMap) -> Result<u64, StoreError> {
    s.append_version(
        expected,
        &NewVersion {
            kind: VersionKind::Map,
            map: m,
            fence: &Fence::default(),
            author: "alice",
            comment: "test",
        },
    )
}

fn node(id: &str) -> NodeRecord {
    NodeRecord {
        id: format!("{id}@127.0.0.2"),
        node_id: id.into(),
        peer: Some("127.0.0.2".into()),
        role: "guard:dtable-server-2".into(),
        cluster: "edge".into(),
        first_seen: 1,
        connected_since: Some(2),
        last_seen: 3,
        transport: "grpc".into(),
        types: vec![(
            "ecds".into(),
            TypeRecord {
                acked_version: Some("1".into()),
                acked_at: Some(3),
                nacked_version: Some("2".into()),
                nack_error: Some("bad".into()),
                nacked_at: Some(4),
            },
        )],
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_leader(s: &dyn Store) -> i64 {
    // A replica campaigns once its API is known.
    s.advertise("http://127.0.0.1:1");
    let rx = s.leadership();
    let mut term = 0;
    wait_for("leadership", Duration::from_secs(10), || {
        match &*rx.borrow() {
            Leadership::Leader { term: t } => {
                term = *t;
                true
            }
            _ => false,
        }
    });
    term
}

/// What every store must do alike.
fn suite(s: &dyn Store) {
    wait_leader(s);
    // Versions: one sequence, compare-and-append, with audit.
    assert_eq!(s.active().unwrap(), None);
    assert_eq!(push(s, 0, &map("a")).unwrap(), 1);
    assert_eq!(push(s, 1, &map("b")).unwrap(), 2);
    let Err(StoreError::Conflict { expected, active }) = push(s, 1, &map("c")) else {
        panic!("a stale append was not refused")
    };
    assert_eq!((expected, active), (1, 2));
    let Err(StoreError::Conflict { active, .. }) = push(s, 0, &map("c")) else {
        panic!("a second first version was not refused")
    };
    assert_eq!(active, 2);
    let active = s.active().unwrap().unwrap();
    assert_eq!((active.version, active.map.default.as_str()), (2, "b"));
    assert_eq!(active.kind, VersionKind::Map);
    let history = s.history(10).unwrap();
    assert_eq!(
        history.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2, 1]
    );
    assert_eq!(s.history(1).unwrap().len(), 1);
    assert_eq!(s.version(1).unwrap().unwrap().author, "alice");
    assert_eq!(s.version(9).unwrap(), None);
    wait_for("watch_active", Duration::from_secs(5), || {
        *s.watch_active().borrow() == 2
    });

    // Audit: newest first, ids increasing.
    s.audit(&NewAudit {
        actor: "bob",
        action: "node.forget",
        version: None,
        detail: serde_json::json!({"node": "x"}),
    })
    .unwrap();
    let audit = s.audit_log(10).unwrap();
    assert_eq!(
        audit.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(),
        vec!["node.forget", "push.map", "push.map"]
    );
    assert!(audit[0].id > audit[1].id && audit[1].id > audit[2].id);
    assert_eq!(audit[1].version, Some(2));
    assert_eq!(s.audit_log(1).unwrap().len(), 1);

    // Nodes: this replica's records round-trip; forgetting removes them.
    let mut n = node("edge-1");
    s.save_nodes(std::slice::from_ref(&n)).unwrap();
    n.connected_since = None;
    s.save_nodes(&[n.clone(), node("edge-2")]).unwrap();
    let loaded = s.load_nodes().unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0], n);
    assert_eq!(s.delete_nodes(&["edge-1@127.0.0.2".into()]).unwrap(), 1);
    assert_eq!(s.delete_nodes(&["nobody@1.2.3.4".into()]).unwrap(), 0);
    assert_eq!(s.load_nodes().unwrap(), vec![node("edge-2")]);

    // Rollouts: insert, save, abort, finish with may_hold, in order.
    assert!(s.unfinished_rollout().unwrap().is_none());
    let id = s
        .insert_rollout("plan", &serde_json::json!({"id": 0, "state": "plan"}))
        .unwrap();
    let r = s.rollout(id).unwrap().unwrap();
    assert_eq!((r.id, r.state.as_str()), (id, "plan"));
    assert_eq!(r.record["id"], serde_json::json!(id));
    s.save_rollout(
        id,
        "fence",
        &serde_json::json!({"id": id, "state": "fence"}),
    )
    .unwrap();
    assert!(matches!(
        s.save_rollout(id + 100, "fence", &serde_json::json!({})),
        Err(StoreError::Corrupt(_))
    ));
    s.request_abort(id, "operator said so").unwrap();
    let u = s.unfinished_rollout().unwrap().unwrap();
    assert_eq!((u.id, u.state.as_str()), (id, "fence"));
    assert_eq!(u.abort_requested.as_deref(), Some("operator said so"));
    assert_eq!(s.may_hold("a").unwrap(), None);
    s.finish_rollout(&FinishRollout {
        id,
        state: "rolled_back",
        record: &serde_json::json!({"id": id, "state": "rolled_back"}),
        may_hold: &[
            ("a".into(), vec![2], Some(1234)),
            ("b".into(), vec![1, 2], None),
        ],
        actor: "rollout",
        version: Some(2),
        detail: &serde_json::json!({}),
    })
    .unwrap();
    assert!(s.unfinished_rollout().unwrap().is_none());
    assert_eq!(s.may_hold("a").unwrap(), Some(vec![2]));
    // A server seashard never restarted keeps "may hold anything".
    assert_eq!(s.may_hold("b").unwrap(), None);
    let states = s.server_states().unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(
        (states[0].last_restart_at, states[0].last_rollout),
        (Some(1234), Some(id))
    );
    let second = s
        .insert_rollout("plan", &serde_json::json!({"id": 0}))
        .unwrap();
    assert!(second > id);
    let list = s.rollouts(10).unwrap();
    assert_eq!(
        list.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![second, id]
    );
    assert_eq!(list[1].state, "rolled_back");
    assert_eq!(list[1].abort_requested.as_deref(), Some("operator said so"));
    assert_eq!(s.audit_log(1).unwrap()[0].action, "rollout.rolled_back");
}

#[test]
fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("s.db")).unwrap();
    suite(&s);
    // SQLite's one process always leads, and sees no other replica's nodes.
    assert_eq!(*s.leadership().borrow(), Leadership::Leader { term: 0 });
    assert!(s.watch_nodes().borrow().is_empty());
}

fn etcd_config(endpoints: &[String], replica: &str, prefix: &str) -> Config {
    let server = "[[server]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n";
    Config::parse(&common::etcd_config(
        endpoints, prefix, replica, "2s", "/a.wasm", server,
    ))
    .unwrap()
}

#[test]
fn etcd_store() {
    let etcd = EtcdCluster::start(1).unwrap();
    let s = EtcdStore::connect(&etcd_config(&etcd.endpoints(), "r1", "/suite")).unwrap();
    suite(&s);
    assert_eq!(s.info().kind, "etcd");
    // Another prefix is another control plane: it sees nothing of this one.
    let other = EtcdStore::connect(&etcd_config(&etcd.endpoints(), "r1", "/other")).unwrap();
    assert_eq!(other.active().unwrap(), None);
}

/// Two replicas on one prefix: one leads; the other's leader writes are refused;
/// nodes written by one are seen by the other; when the leader resigns, the other
/// takes over, and the old leader's late writes are refused by the fence.
#[test]
fn etcd_replicas_one_leader_fenced_writes_and_shared_nodes() {
    let etcd = EtcdCluster::start(1).unwrap();
    let a = EtcdStore::connect(&etcd_config(&etcd.endpoints(), "a", "/two")).unwrap();
    let term_a = wait_leader(&a);
    let b = EtcdStore::connect(&etcd_config(&etcd.endpoints(), "b", "/two")).unwrap();
    b.advertise("http://127.0.0.1:2");
    wait_for("b follows a", Duration::from_secs(5), || {
        matches!(&*b.leadership().borrow(),
            Leadership::Follower { leader: Some(l) } if l.replica == "a")
    });
    // Either may seed the first version; only the leader appends after it.
    assert_eq!(push(&b, 0, &map("a")).unwrap(), 1);
    assert!(matches!(push(&b, 1, &map("b")), Err(StoreError::NotLeader(Some(l))) if l == "a"));
    assert!(matches!(
        b.insert_rollout("plan", &serde_json::json!({})),
        Err(StoreError::NotLeader(_))
    ));
    assert_eq!(push(&a, 1, &map("b")).unwrap(), 2);
    wait_for("b sees version 2", Duration::from_secs(5), || {
        *b.watch_active().borrow() == 2
    });
    // Each replica's node records reach the other, with whether it lives.
    a.save_nodes(&[node("edge-a")]).unwrap();
    wait_for("b sees a's node", Duration::from_secs(5), || {
        b.watch_nodes()
            .borrow()
            .iter()
            .any(|n| n.replica == "a" && n.live && n.record.node_id == "edge-a")
    });
    assert!(b.load_nodes().unwrap().is_empty());

    // A stands down (as when its lease runs out): b takes over with a higher term.
    let id = a.insert_rollout("plan", &serde_json::json!({})).unwrap();
    a.resign();
    let term_b = wait_leader(&b);
    assert!(
        term_b > term_a,
        "the new term {term_b} is not above {term_a}"
    );
    // The deposed leader's late writes are refused, whatever it believes.
    assert!(matches!(
        a.save_rollout(id, "fence", &serde_json::json!({})),
        Err(StoreError::NotLeader(_))
    ));
    assert!(matches!(
        push(&a, 2, &map("c")),
        Err(StoreError::NotLeader(_))
    ));
    assert_eq!(b.rollout(id).unwrap().unwrap().state, "plan");
    // The new leader carries on from the stored state.
    b.save_rollout(id, "fence", &serde_json::json!({"id": id}))
        .unwrap();
    assert_eq!(push(&b, 2, &map("c")).unwrap(), 3);
}
