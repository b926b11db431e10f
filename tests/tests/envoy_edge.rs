//! The shipped edge bootstrap (`envoy/edge-static.yaml`) with the built
//! base-router filter, in a real Envoy 1.40, in front of two fake
//! dtable-servers: every request must reach the server that owns its base
//! under the shipped shard map
//!
//!     slots 0-9 → dtable-server-2, a-f → dtable-server,
//!     pin ff84e1a1-66e2 → dtable-server-2, default dtable-server.
//!
//! Expectations are written out by hand; one test also checks that the
//! proxy and `shardmap` (the routing core) agree on many generated requests.
//!
//! At the end, a guard: the generator's guard bootstrap (`seactl
//! envoy-bootstrap --kind guard`) in front of one fake dtable-server, its
//! control plane unreachable, so the filter runs the configuration given
//! inline as its `default_config` (or the bootstrap's own placeholder).

use seashard_tests::bootstrap;
use seashard_tests::{
    Connection, Envoy, Response, Upstream, loopback, random_uuid, render_edge_static, wasm_file,
    xorshift,
};
use serde_json::Value;

mod common;

const A: &str = "dtable-server"; // owns a-f and the default
const B: &str = "dtable-server-2"; // owns 0-9 and the pin

/// Bases whose owner is known from the shipped map.
const AF_BASES: &[&str] = &[
    "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d",
    "c0ffee00-1234-4abc-9def-0123456789ab",
    "f0e1d2c3-b4a5-4968-8776-655443322110",
];
const DIGIT_BASES: &[&str] = &[
    "0a1b2c3d-4e5f-4a6b-8c7d-8e9f0a1b2c3d",
    "5f3e2d1c-0b9a-4876-9543-210fedcba987",
    "9abcdef0-1234-4567-89ab-cdef01234567",
];
const PINNED: &str = "ff84e1a1-66e2-4d0c-9b1e-7a3c5e9f2b41";

/// The three kinds of path that carry a base in their path.
fn base_paths(uuid: &str) -> Vec<String> {
    vec![
        format!("/dtable-server/api/v1/dtables/{uuid}/rows/?table_name=Table1"),
        format!("/api/v1/dtables/{uuid}/"),
        format!("/api-gateway/api/v2/dtables/{uuid}/rows/"),
    ]
}

fn hex32(dashed: &str) -> String {
    dashed.replace('-', "")
}

struct Edge {
    envoy: Envoy,
    _servers: [Upstream; 2],
}

impl Edge {
    fn start() -> Edge {
        let a = Upstream::start(A).unwrap();
        let b = Upstream::start(B).unwrap();
        let wasm = wasm_file("base_router.wasm").unwrap_or_else(|e| panic!("{e:#}"));
        let yaml = render_edge_static(&wasm, loopback(0), loopback(0), &[(A, a.addr), (B, b.addr)])
            .unwrap();
        let envoy = Envoy::start(&yaml).unwrap_or_else(|e| panic!("{e:#}"));
        Edge {
            envoy,
            _servers: [a, b],
        }
    }

    fn conn(&self) -> Connection {
        Connection::open(self.envoy.listener_addr).unwrap()
    }

    /// `GET path` through Envoy; asserts a 200 from one of the fake servers
    /// and returns which one, with what it received.
    fn route(&self, path: &str, headers: &[(&str, &str)]) -> (String, Value) {
        let r = self.conn().get(path, headers).unwrap();
        self.served(path, &r)
    }

    fn served(&self, path: &str, r: &Response) -> (String, Value) {
        assert_eq!(
            r.status,
            200,
            "GET {path}: {} {}\nEnvoy log:\n{}",
            r.status,
            r.text(),
            self.envoy.logs()
        );
        let server = r
            .header("x-served-by")
            .unwrap_or_else(|| panic!("GET {path}: no x-served-by in {:?}", r.headers))
            .to_string();
        let echo = r.json().unwrap();
        assert_eq!(echo["server"], server.as_str());
        assert_eq!(
            echo["path"], path,
            "the upstream got another request target"
        );
        (server, echo)
    }
}

#[test]
fn ping_goes_to_the_default_server() {
    let edge = Edge::start();
    let r = edge.conn().get("/ping/", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", edge.envoy.logs());
    assert_eq!(r.text(), "pong");
    assert_eq!(r.header("x-served-by"), Some(A));
}

#[test]
fn bases_reach_the_owner_of_their_slot() {
    let edge = Edge::start();
    for (bases, owner) in [(AF_BASES, A), (DIGIT_BASES, B)] {
        for base in bases {
            for path in base_paths(base) {
                let (server, echo) = edge.route(&path, &[]);
                assert_eq!(server, owner, "{path}");
                // What Envoy routed on, and the map version, reach the server.
                assert_eq!(echo["headers"]["x-dtable-server"], owner, "{path}");
                assert_eq!(echo["headers"]["x-shard-map-version"], "1", "{path}");
            }
        }
    }
}

#[test]
fn the_pinned_base_reaches_its_pin_not_its_slot() {
    let edge = Edge::start();
    for path in base_paths(PINNED) {
        assert_eq!(edge.route(&path, &[]).0, B, "{path}");
    }
    // Any spelling of the pinned base.
    for spelling in [
        PINNED.to_uppercase(),
        hex32(PINNED),
        hex32(PINNED).to_uppercase(),
    ] {
        let path = format!("/api/v1/dtables/{spelling}/");
        assert_eq!(edge.route(&path, &[]).0, B, "{path}");
    }
    // A neighbour that shares only part of the pin's prefix keeps its slot (f → A).
    let neighbour = "ff84e1a1-66e3-4d0c-9b1e-7a3c5e9f2b41";
    assert_eq!(
        edge.route(&format!("/api/v1/dtables/{neighbour}/"), &[]).0,
        A
    );
}

#[test]
fn socket_io_polling_and_websocket_reach_the_base_owner() {
    let edge = Edge::start();
    for (base, owner) in [(AF_BASES[0], A), (DIGIT_BASES[0], B), (PINNED, B)] {
        let polling = format!("/socket.io/?dtable_uuid={base}&EIO=4&transport=polling");
        assert_eq!(edge.route(&polling, &[]).0, owner, "{polling}");

        let ws_path = format!("/socket.io/?dtable_uuid={base}&EIO=4&transport=websocket");
        let (resp, mut ws) = edge
            .conn()
            .upgrade_websocket(&ws_path, &[])
            .unwrap_or_else(|e| panic!("{e:#}\nEnvoy log:\n{}", edge.envoy.logs()));
        assert_eq!(resp.header("x-served-by"), Some(owner), "{ws_path}");
        assert_eq!(ws.read_line().unwrap(), owner, "{ws_path}");
        ws.write_all(b"42[\"join-room\"]\n").unwrap();
        assert_eq!(ws.read_line().unwrap(), "42[\"join-room\"]");
    }
}

/// SeaTable's nginx map only sees dashed uuids; the 32-hex form (or any case)
/// must not fall to the default server.
#[test]
fn hex32_and_uppercase_forms_reach_the_same_server_as_the_dashed_form() {
    let edge = Edge::start();
    for base in AF_BASES.iter().chain(DIGIT_BASES) {
        let (dashed, _) = edge.route(&format!("/api/v1/dtables/{base}/"), &[]);
        for spelling in [hex32(base), base.to_uppercase(), hex32(base).to_uppercase()] {
            for path in [
                format!("/api/v1/dtables/{spelling}/"),
                format!("/dtable-server/api/v1/dtables/{spelling}/rows/"),
                format!("/socket.io/?dtable_uuid={spelling}&EIO=4&transport=polling"),
            ] {
                assert_eq!(edge.route(&path, &[]).0, dashed, "{path} vs {base}");
            }
        }
    }
    // In particular a digit base in 32-hex form goes to its slot owner, where
    // the nginx map would have sent it to the default.
    let path = format!("/api/v1/dtables/{}/", hex32(DIGIT_BASES[1]));
    assert_eq!(edge.route(&path, &[]).0, B);
}

#[test]
fn a_client_cannot_choose_its_server() {
    let edge = Edge::start();
    let spoof = [("x-dtable-server", B), ("x-shard-map-version", "99")];
    for path in base_paths(AF_BASES[1]) {
        let (server, echo) = edge.route(&path, &spoof);
        assert_eq!(server, A, "{path}");
        // The client's values are replaced, not joined.
        assert_eq!(echo["headers"]["x-dtable-server"], A, "{path}");
        assert_eq!(echo["headers"]["x-shard-map-version"], "1", "{path}");
    }
    // Nor for a request without a base.
    let (server, _) = edge.route("/api/v1/admin/sys-info/", &[("X-DTable-Server", B)]);
    assert_eq!(server, A);
    // Nor towards a server that does not exist.
    let (server, _) = edge.route(
        &format!("/api/v1/dtables/{}/", DIGIT_BASES[2]),
        &[("x-dtable-server", "no-such-cluster")],
    );
    assert_eq!(server, B);
}

/// The decision is per request: one keep-alive connection carrying requests
/// for bases of both servers routes each one by its own base.
#[test]
fn one_keep_alive_connection_routes_each_request_by_its_base() {
    let edge = Edge::start();
    let mut conn = edge.conn();
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push((format!("/api/v1/dtables/{}/", AF_BASES[i]), A));
        expected.push((format!("/api/v1/dtables/{}/", DIGIT_BASES[i]), B));
        expected.push(("/ping/".to_string(), A));
        expected.push((format!("/api/v1/dtables/{PINNED}/"), B));
    }
    for (path, owner) in &expected {
        let r = conn.get(path, &[]).unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("x-served-by"), Some(*owner), "{path}");
    }
    assert_eq!(conn.requests, expected.len());
    assert_eq!(
        edge.envoy
            .stat("http.dtable_server_proxy.downstream_cx_total")
            .unwrap(),
        Some(1),
        "all requests on one downstream connection"
    );
}

/// Deterministic pseudo-random uuids (xorshift), so a failure is reproducible.
fn generated_uuids(n: usize) -> Vec<String> {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    (0..n).map(|_| random_uuid(&mut next).dashed()).collect()
}

/// The proxy and the routing core agree: for generated requests of every
/// shape, the server Envoy reached is the one `shardmap` decides under the
/// shipped configuration.
#[test]
fn the_proxy_agrees_with_shardmap_on_generated_requests() {
    let shipped =
        bootstrap::plugin_configuration(&mut bootstrap::load("edge-static.yaml").unwrap()).unwrap();
    let router = shardmap::RouterConfig::from_json(&shipped.to_string())
        .unwrap()
        .compile()
        .unwrap();

    let edge = Edge::start();
    let mut conn = edge.conn();
    let mut per_server = std::collections::BTreeMap::<String, usize>::new();
    for (i, uuid) in generated_uuids(48).iter().enumerate() {
        let spelling = match i % 4 {
            0 => uuid.clone(),
            1 => hex32(uuid),
            2 => uuid.to_uppercase(),
            _ => hex32(uuid).to_uppercase(),
        };
        let path = match i % 5 {
            0 => format!("/dtable-server/api/v1/dtables/{spelling}/rows/"),
            1 => format!("/api/v1/dtables/{spelling}/?from=web"),
            2 => format!("/api/v1/internal/dtables/{spelling}/"),
            3 => format!("/api-gateway/api/v2/dtables/{spelling}/rows/"),
            _ => format!("/socket.io/?EIO=4&dtable_uuid={spelling}&transport=polling"),
        };
        let expected = router.decide(&path).server.to_string();
        let r = conn.get(&path, &[]).unwrap();
        let (server, _) = edge.served(&path, &r);
        assert_eq!(server, expected, "{path}");
        *per_server.entry(server).or_default() += 1;
    }
    // Both servers were exercised (else the comparison proves little).
    assert_eq!(per_server.len(), 2, "{per_server:?}");
}

// ---------------------------------------------------------------------------
// A guard of dtable-server-2
// ---------------------------------------------------------------------------

/// A guard of `B` from the generator, in front of one fake `B`, listening on
/// loopback. Its control plane is a port nothing listens on, so the filter
/// keeps running its `default_config`: `config` when given (inline), else the
/// bootstrap's placeholder (no map yet).
struct Guard {
    envoy: Envoy,
    _server: Upstream,
}

impl Guard {
    fn start(config: Option<&shardmap::RouterConfig>) -> Guard {
        let server = Upstream::start(B).unwrap();
        let doc = common::offline_guard_bootstrap("guard-test", B, server.addr, config)
            .unwrap_or_else(|e| panic!("{e:#}"));
        let envoy =
            Envoy::start(&bootstrap::to_yaml(&doc).unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
        Guard {
            envoy,
            _server: server,
        }
    }

    fn get(&self, path: &str) -> Response {
        Connection::open(self.envoy.listener_addr)
            .unwrap()
            .get(path, &[])
            .unwrap()
    }

    /// Asserts the request reached the fake dtable-server untouched.
    fn passes(&self, path: &str) {
        let r = self.get(path);
        assert_eq!(
            (r.status, r.header("x-served-by")),
            (200, Some(B)),
            "GET {path}: {}\nEnvoy log:\n{}",
            r.text(),
            self.envoy.logs()
        );
        if path != "/ping/" {
            let echo = r.json().unwrap();
            assert_eq!(echo["path"], path);
            // A guard routes nothing and adds nothing.
            assert_eq!(echo["headers"]["x-dtable-server"], Value::Null);
            assert_eq!(echo["headers"]["x-shard-map-version"], Value::Null);
        }
    }

    /// Asserts a local JSON refusal with `status`; returns its body.
    fn refuses(&self, path: &str, status: u16) -> (Response, Value) {
        let r = self.get(path);
        assert_eq!(
            r.status,
            status,
            "GET {path}: {}\nEnvoy log:\n{}",
            r.text(),
            self.envoy.logs()
        );
        assert_eq!(r.header("x-served-by"), None, "{path} reached a server");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let body = r.json().unwrap();
        (r, body)
    }
}

/// The shipped map (edge-static.yaml) at version 3 for the guard of `B`,
/// with slot `9` fenced.
fn guard_config() -> shardmap::RouterConfig {
    let shipped =
        bootstrap::plugin_configuration(&mut bootstrap::load("edge-static.yaml").unwrap()).unwrap();
    let map = shardmap::ShardMap::from_json(&shipped["map"].to_string()).unwrap();
    shardmap::RouterConfig {
        guard: Some(B.into()),
        fence: shardmap::Fence {
            slots: vec!["9".into()],
            pins: vec![],
        },
        retry_after: 4,
        ..shardmap::RouterConfig::new(3, map)
    }
}

#[test]
fn a_guard_passes_its_bases_and_refuses_the_others() {
    let guard = Guard::start(Some(&guard_config()));
    // Owned by B (slots 0-9, the pin), not fenced: through, untouched.
    for base in [DIGIT_BASES[0], DIGIT_BASES[1], PINNED] {
        for path in base_paths(base) {
            guard.passes(&path);
        }
        guard.passes(&format!("/socket.io/?dtable_uuid={}&EIO=4", hex32(base)));
    }
    // Without a base: through.
    guard.passes("/ping/");
    assert_eq!(guard.get("/ping/").text(), "pong");
    // socket.io's websocket transport, for an owned base.
    let ws_path = format!(
        "/socket.io/?dtable_uuid={}&EIO=4&transport=websocket",
        DIGIT_BASES[0]
    );
    let (resp, mut ws) = Connection::open(guard.envoy.listener_addr)
        .unwrap()
        .upgrade_websocket(&ws_path, &[])
        .unwrap_or_else(|e| panic!("{e:#}\nEnvoy log:\n{}", guard.envoy.logs()));
    assert_eq!(resp.header("x-served-by"), Some(B));
    assert_eq!(ws.read_line().unwrap(), B);
    drop(ws);

    // Owned by A: 421, naming the base and its owner.
    for base in AF_BASES {
        for path in base_paths(base) {
            let (r, body) = guard.refuses(&path, 421);
            assert_eq!(body["error"], "misdirected");
            assert_eq!(body["base_uuid"], *base);
            assert_eq!(body["owner"], A);
            assert_eq!(body["server"], B);
            assert_eq!(r.header("x-shard-map-version"), Some("3"));
            assert_eq!(r.header("retry-after"), None);
        }
    }

    // Fenced (slot 9): 503 + retry-after, although B owns it.
    let (r, body) = guard.refuses(&base_paths(DIGIT_BASES[2])[0], 503);
    assert_eq!(body["error"], "base_moving");
    assert_eq!(body["base_uuid"], DIGIT_BASES[2]);
    assert_eq!(r.header("retry-after"), Some("4"));
}

#[test]
fn a_guard_without_a_map_refuses_every_base_and_passes_ping() {
    let guard = Guard::start(None);
    for base in [AF_BASES[0], DIGIT_BASES[0], PINNED] {
        let (r, body) = guard.refuses(&base_paths(base)[1], 503);
        assert_eq!(body["error"], "no_shard_map_yet");
        assert_eq!(body["base_uuid"], base);
        assert_eq!(r.header("retry-after"), Some("5"));
        assert_eq!(r.header("x-shard-map-version"), Some("0"));
    }
    guard.passes("/ping/");
}
