//! `Gate::verdict`: the edge routes, a guard passes only its own bases, refusals carry
//! their status, retry-after and JSON body.

use serde_json::Value;
use shardmap::{
    AWAITING_MAP_VERSION, BaseUuid, Fence, Gate, Reason, RefusalKind, RouterConfig, ShardMap,
    Verdict,
};

const MAP: &str = r#"{"default": "dtable-server",
    "slots": {"0-9": "dtable-server-2", "a-f": "dtable-server"},
    "pins": {"ff84e1a1-66e2": "dtable-server-2"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-3"}]}"#;

/// Owned by dtable-server-2 (slot 0-9).
const ON_2: &str = "/api/v1/dtables/0abcdef0-0000-4000-8000-000000000001/rows/";
/// Owned by dtable-server (slot a-f).
const ON_1: &str = "/dtable-server/api/v1/dtables/a1b2c3d4-0000-4000-8000-000000000001/";
/// Pinned to dtable-server-2 although its slot is dtable-server's.
const PINNED: &str = "/socket.io/?dtable_uuid=FF84E1A166E240008000000000000001&EIO=4";

fn config(version: u64, guard: Option<&str>, fence: &[&str]) -> RouterConfig {
    RouterConfig {
        guard: guard.map(str::to_owned),
        fence: Fence {
            slots: fence.iter().map(|s| s.to_string()).collect(),
            pins: vec![],
        },
        retry_after: 7,
        ..RouterConfig::new(version, ShardMap::from_json(MAP).unwrap())
    }
}

fn gate(version: u64, guard: Option<&str>, fence: &[&str]) -> Gate {
    config(version, guard, fence).compile_gate().unwrap()
}

/// The refusal of `path`, its body parsed.
fn refused(g: &Gate, path: &str) -> (RefusalKind, u16, Option<u32>, Value) {
    match g.verdict(path) {
        Verdict::Refuse(r) => {
            let body: Value = serde_json::from_str(&r.body)
                .unwrap_or_else(|e| panic!("{path}: body {:?} is not JSON: {e}", r.body));
            assert_eq!(body["error"], r.kind.code());
            assert_eq!(r.status, r.kind.status());
            (r.kind, r.status, r.retry_after, body)
        }
        other => panic!("{path}: not refused: {other:?}"),
    }
}

/// The refusal of `path`, a 503 to retry after the configured 7 s: its kind and body.
fn refused_for_7s(g: &Gate, path: &str) -> (RefusalKind, Value) {
    let (kind, status, retry, body) = refused(g, path);
    assert_eq!(status, 503, "{path}");
    assert_eq!(retry, Some(7), "{path}");
    assert_eq!(body["retry_after"], 7, "{path}");
    (kind, body)
}

#[test]
fn a_guard_passes_the_bases_of_its_server() {
    let g = gate(3, Some("dtable-server-2"), &[]);
    assert_eq!(g.guard(), Some("dtable-server-2"));
    for path in [ON_2, PINNED] {
        match g.verdict(path) {
            Verdict::Pass { base: Some(_) } => {}
            other => panic!("{path}: {other:?}"),
        }
    }
    let g = gate(3, Some("dtable-server"), &[]);
    assert_eq!(
        g.verdict(ON_1),
        Verdict::Pass {
            base: BaseUuid::parse("a1b2c3d4-0000-4000-8000-000000000001")
        }
    );
}

#[test]
fn a_guard_refuses_another_servers_base_with_421_naming_its_owner() {
    let g = gate(3, Some("dtable-server"), &[]);
    for (path, base, owner) in [
        (
            ON_2,
            "0abcdef0-0000-4000-8000-000000000001",
            "dtable-server-2",
        ),
        (
            PINNED,
            "ff84e1a1-66e2-4000-8000-000000000001",
            "dtable-server-2",
        ),
    ] {
        let (kind, status, retry, body) = refused(&g, path);
        assert_eq!(kind, RefusalKind::Misdirected);
        assert_eq!(status, 421);
        assert_eq!(retry, None, "a misdirected request is not retried here");
        assert_eq!(body["base_uuid"], base);
        assert_eq!(body["owner"], owner);
        assert_eq!(body["server"], "dtable-server");
        assert!(body["message"].as_str().unwrap().contains("guard"));
        assert!(body.get("retry_after").is_none(), "{body}");
    }
}

#[test]
fn a_guard_of_a_server_absent_from_the_map_owns_nothing() {
    let g = gate(3, Some("dtable-server-9"), &[]);
    for path in [ON_1, ON_2, PINNED] {
        assert_eq!(refused(&g, path).0, RefusalKind::Misdirected, "{path}");
    }
    // Requests without a base still pass.
    assert_eq!(g.verdict("/ping/"), Verdict::Pass { base: None });
}

#[test]
fn a_fenced_base_is_503_with_retry_after_for_edge_and_guard() {
    for guard in [None, Some("dtable-server-2"), Some("dtable-server")] {
        let g = gate(4, guard, &["0-3"]);
        let (kind, body) = refused_for_7s(&g, ON_2);
        assert_eq!(kind, RefusalKind::BaseMoving, "{guard:?}");
        assert_eq!(body["base_uuid"], "0abcdef0-0000-4000-8000-000000000001");
        assert_eq!(
            body["message"],
            "this base is moving to another server; retry shortly"
        );
    }
}

#[test]
fn requests_without_a_base_pass_a_guard_and_are_routed_by_an_edge() {
    let g = gate(3, Some("dtable-server-2"), &["0-f"]);
    for path in ["/ping/", "/api/v1/admin/sys-info/", "", "/socket.io/?EIO=4"] {
        assert_eq!(g.verdict(path), Verdict::Pass { base: None }, "{path}");
    }
    let e = gate(3, None, &["0-f"]);
    match e.verdict("/api/v1/admin/sys-info/") {
        Verdict::Route(d) => {
            assert_eq!(d.server, "dtable-server-3");
            assert_eq!(d.reason, Reason::Path);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_edge_routes_as_decide_says() {
    let g = gate(5, None, &[]);
    assert_eq!(g.guard(), None);
    for path in [ON_1, ON_2, PINNED, "/ping/", "/api/v1/admin/x"] {
        assert_eq!(g.verdict(path), Verdict::Route(g.router().decide(path)));
    }
}

/// The bootstrap's placeholder: version 0, every base fenced.
#[test]
fn before_the_first_map_every_base_is_refused_as_no_map_yet() {
    assert_eq!(AWAITING_MAP_VERSION, 0);
    for guard in [None, Some("dtable-server-2")] {
        let g = gate(AWAITING_MAP_VERSION, guard, &["0-f"]);
        assert!(g.is_awaiting_map());
        for path in [ON_1, ON_2, PINNED] {
            let (kind, body) = refused_for_7s(&g, path);
            assert_eq!(kind, RefusalKind::AwaitingMap, "{guard:?} {path}");
            assert_eq!(body["error"], "no_shard_map_yet");
            assert!(body["base_uuid"].as_str().unwrap().len() == 36);
        }
    }
    // A real version's fence is a moving base, not a missing map.
    assert_eq!(
        refused(&gate(1, None, &["0-f"]), ON_1).0,
        RefusalKind::BaseMoving
    );
}

#[test]
fn the_guard_is_validated_and_round_trips() {
    let mut c = config(2, Some("not a name"), &[]);
    let problems = c.compile_gate().unwrap_err();
    assert!(problems.iter().any(|p| p.at == "guard"), "{problems}");
    assert!(c.compile().is_err());
    c.guard = Some(String::new());
    assert!(c.compile_gate().is_err());

    let c = config(2, Some("dtable-server-2"), &[]);
    let json = c.to_json();
    assert!(json.contains(r#""guard":"dtable-server-2""#), "{json}");
    assert_eq!(RouterConfig::from_json(&json).unwrap(), c);
    // An edge's configuration has no `guard` key at all.
    let edge = config(2, None, &[]).to_json();
    assert!(!edge.contains("guard"), "{edge}");
    assert_eq!(RouterConfig::from_json(&edge).unwrap().guard, None);
}

#[test]
fn gate_accessors() {
    let mut c = config(9, Some("dtable-server"), &[]);
    c.header = "x-seatable-server".into();
    let g = c.compile_gate().unwrap();
    assert_eq!(g.version(), 9);
    assert_eq!(g.retry_after(), 7);
    assert_eq!(g.header(), "x-seatable-server");
    assert!(!g.is_awaiting_map());
}
