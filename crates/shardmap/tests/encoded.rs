//! The base is read as the dtable-server reads it: percent-encoded request targets,
//! checked against Node's own reading of them (`fixtures/node_readings.json`, made by
//! `fixtures/node_readings.mjs` with Node's `decodeURIComponent` and `querystring`),
//! at the edge and at the guard; plain targets read exactly as before.

use proptest::prelude::*;
use serde_json::Value;
use shardmap::{
    BaseUuid, Gate, Reason, RefusalKind, RouterConfig, ShardMap, Unreadable, Verdict, extract,
    read_base,
};

const MAP: &str = r#"{"default": "dtable-server",
    "slots": {"0-7": "dtable-server-2", "8-f": "dtable-server"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-3"}]}"#;

fn gate(guard: Option<&str>) -> Gate {
    RouterConfig {
        guard: guard.map(str::to_owned),
        ..RouterConfig::new(5, ShardMap::from_json(MAP).unwrap())
    }
    .compile_gate()
    .unwrap()
}

fn cases() -> Vec<Value> {
    let doc: Value = serde_json::from_str(include_str!("fixtures/node_readings.json")).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

/// "base", "none" or "unreadable", and the base.
fn label(target: &str) -> (&'static str, Option<String>) {
    match read_base(target) {
        Ok(Some(b)) => ("base", Some(b.to_string())),
        Ok(None) => ("none", None),
        Err(_) => ("unreadable", None),
    }
}

#[test]
fn every_case_reads_as_labelled_and_never_against_node() {
    let (mut bases, mut unreadable) = (0, 0);
    for c in cases() {
        let target = c["target"].as_str().unwrap();
        let (got, base) = label(target);
        assert_eq!(got, c["expect"], "{target} ({})", c["note"]);
        if got == "base" {
            assert_eq!(base.as_deref(), c["base"].as_str(), "{target}");
            assert_eq!(extract(target).map(|b| b.to_string()), base, "{target}");
            bases += 1;
        } else {
            unreadable += usize::from(got == "unreadable");
            assert_eq!(extract(target), None, "{target}");
        }
        // Whatever Node reads as a base is read as that base or refused: never
        // "no base" (the default server, or a guard's pass) and never another base.
        let node: Vec<&str> = c["node_bases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        if !node.is_empty() {
            assert!(
                got == "unreadable" || (node.len() == 1 && base.as_deref() == Some(node[0])),
                "{target}: Node reads {node:?}, seashard {got} {base:?}"
            );
        }
        // A path segment Node cannot decode before any base: refused too.
        if c["node_error"].is_string() {
            assert_eq!(got, "unreadable", "{target}");
        }
    }
    assert!(bases > 300 && unreadable > 80, "{bases} {unreadable}");
}

#[test]
fn the_edge_routes_every_encoded_form_to_the_owner_and_refuses_the_unreadable_with_400() {
    let edge = gate(None);
    for c in cases() {
        let target = c["target"].as_str().unwrap();
        match (c["expect"].as_str().unwrap(), edge.verdict(target)) {
            ("base", Verdict::Route(d)) => {
                let base = BaseUuid::parse(c["base"].as_str().unwrap()).unwrap();
                assert_eq!(d.base, Some(base), "{target}");
                assert_eq!(d.server, edge.router().owner_of(&base), "{target}");
                assert!(matches!(d.reason, Reason::Slot), "{target}");
            }
            ("none", Verdict::Route(d)) => assert_eq!(d.base, None, "{target}"),
            ("unreadable", Verdict::Refuse(r)) => {
                assert_eq!(
                    (r.status, r.retry_after, r.base),
                    (400, None, None),
                    "{target}"
                );
                let body: Value = serde_json::from_str(&r.body).unwrap();
                assert_eq!(body["error"], "unreadable_base", "{target}");
                let RefusalKind::Unreadable(why) = r.kind else {
                    panic!("{target}: {:?}", r.kind)
                };
                assert_eq!(body["reason"], why.as_str(), "{target}");
                assert!(body.get("base_uuid").is_none(), "{}", r.body);
                assert_eq!(
                    edge.router().decide(target).reason,
                    Reason::Unreadable,
                    "{target}"
                );
            }
            (want, got) => panic!("{target}: expected {want}, got {got:?}"),
        }
    }
}

#[test]
fn a_guard_passes_only_its_own_encoded_bases_and_refuses_the_unreadable() {
    for server in ["dtable-server", "dtable-server-2"] {
        let guard = gate(Some(server));
        for c in cases() {
            let target = c["target"].as_str().unwrap();
            let verdict = guard.verdict(target);
            match c["expect"].as_str().unwrap() {
                "base" => {
                    let base = BaseUuid::parse(c["base"].as_str().unwrap()).unwrap();
                    let owner = guard.router().owner_of(&base);
                    match verdict {
                        Verdict::Pass { base: Some(b) } if owner == server => {
                            assert_eq!(b, base, "{target}")
                        }
                        Verdict::Refuse(r) if owner != server => {
                            assert_eq!(r.status, 421, "{target}");
                            assert_eq!(r.base, Some(base), "{target}");
                        }
                        other => panic!("{server} {target}: {other:?}"),
                    }
                }
                "none" => assert_eq!(verdict, Verdict::Pass { base: None }, "{target}"),
                _ => match verdict {
                    Verdict::Refuse(r) => assert_eq!(r.status, 400, "{target}"),
                    other => panic!("{server} passed the unreadable {target}: {other:?}"),
                },
            }
        }
    }
}

#[test]
fn each_reason_has_its_case() {
    for (target, why) in [
        ("/api/v1/dtables/%zz/", Unreadable::BadEscape),
        ("/api/v1/dtables/%4", Unreadable::BadEscape),
        ("/api/v1/dtables/%C3%28/", Unreadable::InvalidUtf8),
        (
            "/x/0abcdef0-1111-4222-8333-444455556666%2F/",
            Unreadable::UuidAndMore,
        ),
        (
            "/x/%2F0abcdef011114222833344445555666600",
            Unreadable::UuidAndMore,
        ),
        (
            "/?dtable_uuid=0abcdef011114222833344445555666f&dtable_uuid=0abcdef0111142228333444455556666",
            Unreadable::ConflictingQuery,
        ),
        ("/?a%=1", Unreadable::BadEscape),
        ("/?dtable_uuid=%FF", Unreadable::InvalidUtf8),
    ] {
        assert_eq!(read_base(target), Err(why), "{target}");
    }
    // Other values are not read; segments after the base are not read.
    for target in [
        "/?q=%zz&dtable_uuid=0abcdef011114222833344445555666f",
        "/api/v1/dtables/0abcdef011114222833344445555666f/%zz",
    ] {
        assert!(matches!(read_base(target), Ok(Some(_))), "{target}");
    }
}

/// The reader before decoding (kept here as the reference for plain targets): the
/// first path segment that is a uuid, else the first `dtable_uuid=` pair.
fn before(path_and_query: &str) -> Option<BaseUuid> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    for seg in path.split('/') {
        if matches!(seg.len(), 32 | 36)
            && let Some(u) = BaseUuid::parse(seg)
        {
            return Some(u);
        }
    }
    for pair in query?.split('&') {
        if let Some(value) = pair.strip_prefix("dtable_uuid=") {
            return BaseUuid::parse(value);
        }
    }
    None
}

fn uuid() -> impl Strategy<Value = String> {
    (any::<u128>(), any::<bool>(), any::<bool>()).prop_map(|(n, dashed, upper)| {
        let base = BaseUuid::from_u128(n);
        let s = if dashed {
            base.dashed()
        } else {
            base.to_string()
        };
        if upper { s.to_uppercase() } else { s }
    })
}

/// `s` with the characters picked by `mask` percent-encoded, escapes in either case.
fn encode(s: &str, mask: u64, lower: bool) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                let e = format!("%{:02X}", c as u32);
                if lower { e.to_lowercase() } else { e }
            } else {
                c.to_string()
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any percent-encoding of any uuid, in the path or in `dtable_uuid` (key and
    /// value), names that base.
    #[test]
    fn any_encoding_names_the_base(u in uuid(), mask in any::<u64>(), key_mask in any::<u64>(), lower in any::<bool>()) {
        let base = BaseUuid::parse(&u).unwrap();
        let e = encode(&u, mask, lower);
        let key = encode("dtable_uuid", key_mask, !lower);
        for t in [
            format!("/api/v1/dtables/{e}/rows/?table_name=T%20x"),
            format!("/dtable-db/api/v1/query/{e}"),
            format!("/socket.io/?EIO=4&{key}={e}&t=a+b"),
        ] {
            prop_assert_eq!(read_base(&t), Ok(Some(base)), "{}", t);
        }
    }

    /// A target with no `%` anywhere and `dtable_uuid` at most once reads as before.
    #[test]
    fn plain_targets_read_as_before(
        segs in prop::collection::vec(prop::sample::select(vec![
            "api", "v1", "dtables", "", "rows", "0abcdef0-1111-4222-8333-444455556666",
            "A1B2C3D40000400080000000000000FF", "0abcdef0-1111-4222-8333-44445555666", "x+y",
        ]), 0..6),
        query in prop::option::of(prop::collection::vec(prop::sample::select(vec![
            "EIO=4", "dtable_uuid=a1b2c3d4-0000-4000-8000-0000000000ff", "dtable_uuid=",
            "dtable_uuid", "x=dtable_uuid=0abcdef0111142228333444455556666", "t=a+b", "",
            "dtable_uuid=0abcdef011114222833344445555666",
        ]), 0..4)),
    ) {
        let mut t = segs.join("/");
        if let Some(q) = &query {
            t.push('?');
            t.push_str(&q.join("&"));
        }
        let dtable_keys = query.iter().flatten().filter(|p| p.starts_with("dtable_uuid")).count();
        prop_assume!(dtable_keys <= 1);
        prop_assert_eq!(read_base(&t), Ok(before(&t)), "{}", t);
    }

    /// Reading never panics.
    #[test]
    fn reading_never_panics(t in "[/?&=%+a-fA-F0-9_dtableuid\\-]{0,80}") {
        let _ = read_base(&t);
    }
}
