//! A percent-encoded base is read as the dtable-server reads it, through a real Envoy
//! 1.40 with the built filter: the shipped edge bootstrap (`envoy/edge-static.yaml`)
//! and the generator's guard bootstrap, each run twice: as shipped (paths normalized
//! by Envoy: `normalize_path`, `merge_slashes`, encoded slashes refused) and with that
//! normalization taken out, since the filter must be right on its own.
//!
//! The targets and their ground truth are Node's own reading of them
//! (`crates/shardmap/tests/fixtures/node_readings.json`, made by `node_readings.mjs`
//! with `decodeURIComponent` and `querystring.parse`): every target that names a base
//! reaches that base's owner through the edge, a guard passes only its server's bases
//! (421 for the others), and what cannot be read unambiguously is refused with 400 at
//! the edge and at the guard, never sent to a server.

use std::collections::BTreeMap;

use seashard_tests::{Envoy, Response, Upstream, bootstrap, get, loopback, wasm_file};
use serde_json::Value;
use shardmap::{BaseUuid, Router, RouterConfig, ShardMap};

mod common;

const A: &str = "dtable-server"; // owns a-f and the default under the shipped map
const B: &str = "dtable-server-2"; // owns 0-9 and the pin

/// The HTTP connection manager's normalization options in every bootstrap.
const NORMALIZATION: [&str; 3] = [
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
];

struct Case {
    target: String,
    expect: String,
    base: Option<BaseUuid>,
}

fn cases() -> Vec<Case> {
    let doc: Value = serde_json::from_str(include_str!(
        "../../crates/shardmap/tests/fixtures/node_readings.json"
    ))
    .unwrap();
    doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            target: c["target"].as_str().unwrap().to_owned(),
            expect: c["expect"].as_str().unwrap().to_owned(),
            base: c["base"].as_str().map(|b| BaseUuid::parse(b).unwrap()),
        })
        .collect()
}

/// Removes the normalization options wherever they are; how many were removed.
fn without_normalization(doc: &mut serde_yaml::Value) -> usize {
    match doc {
        serde_yaml::Value::Mapping(m) => {
            let mut n = 0;
            for key in NORMALIZATION {
                n += usize::from(m.remove(key).is_some());
            }
            n + m.values_mut().map(without_normalization).sum::<usize>()
        }
        serde_yaml::Value::Sequence(s) => s.iter_mut().map(without_normalization).sum(),
        _ => 0,
    }
}

/// The shipped map of `edge-static.yaml`.
fn shipped_map() -> ShardMap {
    let config =
        bootstrap::plugin_configuration(&mut bootstrap::load("edge-static.yaml").unwrap()).unwrap();
    ShardMap::from_json(&config["map"].to_string()).unwrap()
}

fn start_edge(normalized: bool) -> (Envoy, [Upstream; 2]) {
    let a = Upstream::start(A).unwrap();
    let b = Upstream::start(B).unwrap();
    let wasm = wasm_file("base_router.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let yaml = seashard_tests::render_edge_static(
        &wasm,
        loopback(0),
        loopback(0),
        &[(A, a.addr), (B, b.addr)],
    )
    .unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    if !normalized {
        assert_eq!(without_normalization(&mut doc), 3, "edge-static.yaml");
    }
    let envoy =
        Envoy::start(&bootstrap::to_yaml(&doc).unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
    (envoy, [a, b])
}

/// A guard of `B` from the generator, its map given inline (its control plane is a
/// port nothing listens on).
fn start_guard(normalized: bool, config: &RouterConfig) -> (Envoy, Upstream) {
    let server = Upstream::start(B).unwrap();
    let mut doc = common::offline_guard_bootstrap("guard-encoded", B, server.addr, Some(config))
        .unwrap_or_else(|e| panic!("{e:#}"));
    if !normalized {
        assert_eq!(without_normalization(&mut doc), 3, "the guard bootstrap");
    }
    let envoy =
        Envoy::start(&bootstrap::to_yaml(&doc).unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
    (envoy, server)
}

fn send(envoy: &Envoy, target: &str) -> Response {
    get(envoy.listener_addr, target, &[])
        .unwrap_or_else(|e| panic!("GET {target}: {e:#}\n{}", envoy.logs()))
}

/// A 200 from `server`.
fn assert_served_by(r: &Response, server: &str, target: &str, normalized: bool, envoy: &Envoy) {
    assert_eq!(
        (r.status, r.header("x-served-by")),
        (200, Some(server)),
        "GET {target} (normalized: {normalized}): {}\n{}",
        r.text(),
        envoy.logs()
    );
}

/// A 400 that reached no server; when the filter gave it (always, without Envoy's
/// normalization), its JSON body says why.
fn assert_unreadable(r: &Response, target: &str, normalized: bool, envoy: &Envoy) {
    assert_eq!(
        (r.status, r.header("x-served-by")),
        (400, None),
        "GET {target}: {}\n{}",
        r.text(),
        envoy.logs()
    );
    if !normalized || r.header("content-type") == Some("application/json") {
        let body = r.json().unwrap_or_else(|e| panic!("{target}: {e:#}"));
        assert_eq!(body["error"], "unreadable_base", "{target}");
        assert!(body["reason"].is_string(), "{target}: {body}");
    }
}

#[test]
fn every_encoded_form_reaches_the_owner_through_an_edge_and_the_unreadable_get_400() {
    let router = Router::new(&shipped_map()).unwrap();
    let cases = cases();
    for normalized in [true, false] {
        let (edge, _servers) = start_edge(normalized);
        let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &cases {
            let r = send(&edge, &c.target);
            match c.expect.as_str() {
                "base" => {
                    let base = c.base.unwrap();
                    let owner = router.owner_of(&base);
                    assert_served_by(&r, owner, &c.target, normalized, &edge);
                    // Without decoding it would have gone to the default server.
                    if owner != router.default_server() {
                        *tally.entry("base, owner not the default").or_default() += 1;
                    }
                    *tally.entry("base").or_default() += 1;
                }
                "none" => {
                    assert_eq!(r.status, 200, "GET {}: {}", c.target, r.text());
                    if !normalized {
                        let want = router.decide(&c.target).server;
                        assert_eq!(r.header("x-served-by"), Some(want), "{}", c.target);
                    }
                    *tally.entry("none").or_default() += 1;
                }
                _ => {
                    assert_unreadable(&r, &c.target, normalized, &edge);
                    let by = if r.header("content-type") == Some("application/json") {
                        "unreadable, 400 by the filter"
                    } else {
                        "unreadable, 400 by Envoy"
                    };
                    *tally.entry(by).or_default() += 1;
                }
            }
        }
        eprintln!("edge, normalized: {normalized}: {tally:?}");
        assert!(tally["base, owner not the default"] > 150, "{tally:?}");
        if !normalized {
            assert_eq!(tally.get("unreadable, 400 by Envoy"), None, "{tally:?}");
        }
    }
}

#[test]
fn a_guard_passes_only_its_servers_encoded_bases_and_refuses_the_unreadable() {
    let config = RouterConfig {
        guard: Some(B.into()),
        ..RouterConfig::new(3, shipped_map())
    };
    let router = config.compile().unwrap();
    let cases = cases();
    for normalized in [true, false] {
        let (guard, _server) = start_guard(normalized, &config);
        let (mut passed, mut misdirected, mut unreadable) = (0, 0, 0);
        for c in &cases {
            let r = send(&guard, &c.target);
            let owner = c.base.map(|b| router.owner_of(&b));
            match (c.expect.as_str(), owner) {
                ("base", Some(B)) | ("none", _) => {
                    assert_served_by(&r, B, &c.target, normalized, &guard);
                    passed += 1;
                }
                ("base", Some(other)) => {
                    assert_eq!(
                        (r.status, r.header("x-served-by")),
                        (421, None),
                        "GET {}: {}",
                        c.target,
                        r.text()
                    );
                    let body = r.json().unwrap();
                    assert_eq!(body["owner"], other, "{}", c.target);
                    assert_eq!(
                        body["base_uuid"].as_str(),
                        c.base.map(|b| b.dashed()).as_deref()
                    );
                    misdirected += 1;
                }
                _ => {
                    assert_unreadable(&r, &c.target, normalized, &guard);
                    unreadable += 1;
                }
            }
        }
        eprintln!(
            "guard of {B}, normalized: {normalized}: {passed} passed, {misdirected} refused 421, {unreadable} refused 400"
        );
        assert!(misdirected > 80 && passed > 200 && unreadable > 80);
    }
}
