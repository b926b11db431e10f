//! `Router::decide`: pins, slots, paths, default and fences.

use shardmap::{BaseUuid, Fence, Reason, Router, ShardMap, diff};

const DOC_MAP: &str = r#"{"default": "dtable-server",
    "slots": {"0-9": "dtable-server-2", "a-f": "dtable-server"},
    "pins": {"ff84e1a1-66e2": "dtable-server-2"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-3"},
              {"regex": "(?i)^/api/v1/internal/stats", "server": "dtable-server-2"}]}"#;

fn router(json: &str) -> Router {
    Router::new(&ShardMap::from_json(json).unwrap()).unwrap()
}

fn decide(r: &Router, path: &str) -> (String, Reason, Option<String>) {
    let d = r.decide(path);
    (d.server.to_owned(), d.reason, d.base.map(|b| b.to_string()))
}

#[test]
fn slots_pins_paths_default() {
    let r = router(DOC_MAP);
    let a = "/dtable-server/api/v1/dtables/a1b2c3d4-0000-4000-8000-000000000001/rows/";
    // Not quite the pin: its slot.
    let near = "/api/v1/dtables/ff84e1a1-66e3-4000-8000-000000000001/";
    for (path, server, reason, base) in [
        (
            a,
            "dtable-server",
            Reason::Slot,
            Some("a1b2c3d4000040008000000000000001"),
        ),
        (
            near,
            "dtable-server",
            Reason::Slot,
            Some("ff84e1a166e340008000000000000001"),
        ),
        ("/ping/", "dtable-server", Reason::Default, None),
        (
            "/api/v1/admin/sys-info/",
            "dtable-server-3",
            Reason::Path,
            None,
        ),
    ] {
        let expected = (server.to_owned(), reason, base.map(str::to_owned));
        assert_eq!(decide(&r, path), expected, "{path}");
    }
    let d = "/api/v1/dtables/0abcdef0-0000-4000-8000-000000000001/";
    assert_eq!(decide(&r, d).0, "dtable-server-2");
    let pinned = "/api/v1/dtables/FF84E1A1-66E2-4000-8000-000000000001/";
    assert_eq!(decide(&r, pinned).0, "dtable-server-2");
    assert_eq!(decide(&r, pinned).1, Reason::Pin);
    assert_eq!(
        decide(&r, "/API/v1/internal/stats?x=1").0,
        "dtable-server-2"
    );
    // Path rules see the path, not the query.
    assert_eq!(decide(&r, "/other?/api/v1/admin/").1, Reason::Default);
    // A base wins over path rules.
    assert_eq!(
        decide(
            &r,
            "/api/v1/admin/dtables/0abcdef0-0000-4000-8000-000000000001/"
        )
        .1,
        Reason::Slot
    );
}

#[test]
fn longest_pin_wins() {
    let r = router(
        r#"{"default": "d", "slots": {"0-f": "d"}, "pins": {"ab": "p2", "abcd": "p4", "abcdef01-2": "p9"}}"#,
    );
    let base = |s: &str| BaseUuid::parse(s).unwrap();
    assert_eq!(r.owner_of(&base("abcdef01234567890123456789abcdef")), "p9");
    assert_eq!(r.owner_of(&base("abcdef00234567890123456789abcdef")), "p4");
    assert_eq!(r.owner_of(&base("abce0000234567890123456789abcdef")), "p2");
    assert_eq!(r.owner_of(&base("ac000000234567890123456789abcdef")), "d");
}

#[test]
fn four_digit_slots() {
    let r = router(
        r#"{"default": "d", "slots": {"0000-7fff": "low", "8000-a000": "mid", "a001-ffff": "high"}}"#,
    );
    let base = |s: &str| BaseUuid::parse(s).unwrap();
    assert_eq!(r.owner_of(&base("a0000000000000000000000000000000")), "mid");
    assert_eq!(
        r.owner_of(&base("a0010000000000000000000000000000")),
        "high"
    );
    assert_eq!(r.owner_of(&base("7fffffffffffffffffffffffffffffff")), "low");
}

#[test]
fn no_slots_means_default() {
    let r = router(r#"{"default": "only"}"#);
    let d = r.decide("/api/v1/dtables/0abcdef0-0000-4000-8000-000000000001/");
    assert_eq!((d.server, d.reason), ("only", Reason::Default));
    assert!(d.base.is_some());
}

#[test]
fn fences() {
    let map = ShardMap::from_json(DOC_MAP).unwrap();
    let fence = Fence {
        slots: vec!["0-1".into(), "3f".into()],
        pins: vec!["ff84e1a1-66e2".into()],
    };
    let r = Router::with_fence(&map, &fence).unwrap();
    for (uuid, fenced) in [
        ("0abcdef0-0000-4000-8000-000000000001", true),
        ("1abcdef0-0000-4000-8000-000000000001", true),
        ("2abcdef0-0000-4000-8000-000000000001", false),
        ("3f000000-0000-4000-8000-000000000001", true),
        ("3e000000-0000-4000-8000-000000000001", false),
        ("ff84e1a1-66e2-4000-8000-000000000001", true),
        ("ff84e1a1-66e3-4000-8000-000000000001", false),
    ] {
        let d = r.decide(&format!("/api/v1/dtables/{uuid}/"));
        assert_eq!(d.reason == Reason::Fenced, fenced, "{uuid}");
    }
    // The query-only form is fenced too, and uuid-less requests never are.
    assert_eq!(
        r.decide("/socket.io/?dtable_uuid=0abcdef0000040008000000000000001")
            .reason,
        Reason::Fenced
    );
    assert_eq!(r.decide("/ping/").reason, Reason::Default);
}

#[test]
fn diff_of_the_documented_split() {
    let old = ShardMap::from_json(r#"{"default": "s1", "slots": {"0-f": "s1"}}"#).unwrap();
    let new = ShardMap::from_json(
        r#"{"default": "s1", "slots": {"0-9": "s2", "a-f": "s1"}, "pins": {"ff84e1a1-66e2": "s2"}}"#,
    )
    .unwrap();
    let plan = diff(&old, &new).unwrap();
    assert_eq!(plan.slots.len(), 1);
    assert_eq!(
        (
            plan.slots[0].range.as_str(),
            plan.slots[0].from.as_str(),
            plan.slots[0].to.as_str()
        ),
        ("0-9", "s1", "s2")
    );
    assert_eq!(plan.pins.len(), 1);
    assert_eq!(plan.pins[0].pin, "ff84e1a166e2");
    assert_eq!(plan.fence.slots, vec!["0-9".to_string()]);
    assert_eq!(plan.fence.pins, vec!["ff84e1a166e2".to_string()]);
    assert_eq!(plan.losing, vec!["s1".to_string()]);
    assert_eq!(plan.gaining, vec!["s2".to_string()]);
    assert_eq!(plan.servers_added, vec!["s2".to_string()]);
    assert!(plan.moves_bases());
    assert!(diff(&new, &new).unwrap().is_empty());
}

#[test]
fn diff_keeps_pinned_bases_out_of_the_fence() {
    // The slot moves, but a pin keeps one prefix where it was: exactly that is not fenced.
    let old =
        ShardMap::from_json(r#"{"default": "a", "slots": {"0-f": "a"}, "pins": {"0abc": "a"}}"#)
            .unwrap();
    let new = ShardMap::from_json(
        r#"{"default": "a", "slots": {"0": "b", "1-f": "a"}, "pins": {"0abc": "a"}}"#,
    )
    .unwrap();
    let plan = diff(&old, &new).unwrap();
    let r = Router::with_fence(&old, &plan.fence).unwrap();
    let fenced = |s: &str| r.is_fenced(&BaseUuid::parse(s).unwrap());
    assert!(!fenced("0abc0000000000000000000000000000"));
    assert!(fenced("0abd0000000000000000000000000000"));
    assert!(fenced("0000ffff000000000000000000000000"));
    assert!(!fenced("1000ffff000000000000000000000000"));
    // A path-rule-only change moves nothing.
    let paths = ShardMap::from_json(r#"{"default": "a", "slots": {"0-f": "a"}, "pins": {"0abc": "a"}, "paths": [{"prefix": "/x", "server": "c"}]}"#).unwrap();
    let plan = diff(&old, &paths).unwrap();
    assert!(!plan.moves_bases() && plan.paths_changed && !plan.is_empty());
}

#[test]
fn owners_within_a_fence() {
    use shardmap::owners_within;
    let map = ShardMap::from_json(
        r#"{"default": "a", "slots": {"0-7": "a", "8-b": "b", "c-f": "c"}, "pins": {"1234": "p", "9": "a"}}"#,
    )
    .unwrap();
    let names = |f: Fence| {
        owners_within(&map, &f)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(Fence {
            slots: vec!["8-9".into()],
            pins: vec![]
        }),
        ["a", "b"]
    );
    assert_eq!(
        names(Fence {
            slots: vec!["0".into()],
            pins: vec![]
        }),
        ["a"]
    );
    assert_eq!(
        names(Fence {
            slots: vec!["1".into()],
            pins: vec![]
        }),
        ["a", "p"]
    );
    assert_eq!(
        names(Fence {
            slots: vec![],
            pins: vec!["12345".into()]
        }),
        ["p"]
    );
    assert_eq!(
        names(Fence {
            slots: vec!["d0-d1".into()],
            pins: vec!["a".into()]
        }),
        ["b", "c"]
    );
    assert!(names(Fence::default()).is_empty());
    assert!(
        owners_within(
            &map,
            &Fence {
                slots: vec!["x".into()],
                pins: vec![]
            }
        )
        .is_err()
    );
}
