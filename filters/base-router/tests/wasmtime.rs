//! The built base-router `.wasm`, driven through the proxy-wasm ABI in wasmtime: it must
//! route exactly as `shardmap` decides natively, refuse bad configuration, fence, and
//! never trap.

use shardmap::{BaseUuid, Fence, Reason, Router, RouterConfig, ShardMap};
use wasm_host::{Action, ContextId, Host, LogLevel, Vm, built_filter};

const MAP: &str = r#"{"default": "dtable-server",
    "slots": {"00-3f": "dtable-server-2", "40-9f": "dtable-server-3", "a-f": "dtable-server"},
    "pins": {"ff84e1a1-66e2": "dtable-server-2", "0abc": "dtable-server", "40": "dtable-server"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-3"},
              {"regex": "(?i)^/api/v1/internal/stats", "server": "dtable-server-2"}]}"#;

fn config(version: u64, fence: Fence) -> RouterConfig {
    let mut c = RouterConfig::new(version, ShardMap::from_json(MAP).unwrap());
    c.fence = fence;
    c
}

fn vm_with(config: &RouterConfig) -> Vm {
    let host = Host::load(built_filter("base-router").unwrap()).unwrap();
    let mut vm = host.instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    assert!(
        vm.configure(config.to_json().as_bytes()).unwrap(),
        "{:?}",
        vm.logs()
    );
    vm
}

fn request(vm: &mut Vm, headers: &[(&str, &str)]) -> (ContextId, Action) {
    let ctx = vm.new_http_context().unwrap();
    let action = vm.request_headers(ctx, headers, true).unwrap();
    (ctx, action)
}

/// A request to `path` that `vm` pauses and answers itself: that answer.
fn answered<'a>(vm: &'a mut Vm, path: &str) -> &'a wasm_host::LocalResponse {
    let (ctx, action) = request_to(vm, path);
    assert_eq!(action, Action::Pause, "{path}");
    vm.local_response(ctx).expect("a local reply")
}

/// A request with a `:path` header only.
fn request_to(vm: &mut Vm, path: &str) -> (ContextId, Action) {
    request(vm, &[(":path", path)])
}

/// A deterministic stream of SeaTable request targets: every shape, every case, near
/// misses and junk.
fn uris(n: usize) -> Vec<String> {
    let mut next = seashard_tests::xorshift(0x2545_f491_4f6c_dd1d);
    let stems = ["", "0abc", "40", "ff84e1a166e2", "3f", "a0"];
    (0..n)
        .map(|i| {
            let r = next();
            let stem = stems[(r % stems.len() as u64) as usize];
            let hex = format!("{stem}{:016x}{:016x}", next(), next());
            let hex = &hex[..32];
            let dashed = BaseUuid::parse(hex).unwrap().dashed();
            let u = if r & 0x100 != 0 {
                dashed.to_uppercase()
            } else {
                dashed.clone()
            };
            match i % 12 {
                0 => format!("/dtable-server/api/v1/dtables/{u}/rows/?table_name=T"),
                1 => format!("/api/v1/dtables/{u}/"),
                2 => format!("/api/v1/internal/dtables/{hex}/operations/"),
                3 => format!("/api-gateway/api/v2/dtables/{u}/rows/"),
                4 => format!("/dtable-db/api/v1/query/{u}/"),
                5 => format!("/socket.io/?dtable_uuid={u}&EIO=4&transport=websocket"),
                6 => format!("/socket.io/?EIO=4&dtable_uuid={hex}"),
                7 => format!("/api/v1/dtables/{}/", &hex[..31]),
                8 => format!("/api/v1/dtables/x{dashed}/"),
                9 => [
                    "/ping/",
                    "/api/v1/admin/sys-info/",
                    "/API/V1/INTERNAL/STATS/x",
                    "/",
                    "",
                ][(r % 5) as usize]
                    .to_owned(),
                10 => format!("/socket.io/?other={dashed}"),
                _ => format!("/%{}?&&=#{}", &hex[..5], &dashed[3..]),
            }
        })
        .collect()
}

#[test]
fn routes_exactly_as_shardmap_decides() {
    let cfg = config(7, Fence::default());
    let router = cfg.compile().unwrap();
    let mut vm = vm_with(&cfg);
    let all = uris(3000);
    for uri in &all {
        let (ctx, action) = request(
            &mut vm,
            &[
                (":path", uri),
                (":method", "GET"),
                (":authority", "seatable"),
            ],
        );
        let want = router.decide(uri);
        if want.reason == Reason::Unreadable {
            // Junk whose escapes do not decode (`%a0...`): refused, sent nowhere.
            assert_eq!(action, Action::Pause, "{uri}");
            assert_eq!(vm.local_response(ctx).map(|r| r.status), Some(400), "{uri}");
            assert_eq!(vm.request_header(ctx, "x-dtable-server"), None, "{uri}");
            vm.finish(ctx).unwrap();
            continue;
        }
        assert_eq!(action, Action::Continue, "{uri}");
        assert_eq!(
            vm.request_header(ctx, "x-dtable-server"),
            Some(want.server),
            "{uri} ({:?})",
            want.reason
        );
        assert_eq!(vm.request_header(ctx, "x-shard-map-version"), Some("7"));
        assert!(vm.local_response(ctx).is_none());
        vm.finish(ctx).unwrap();
    }
    // Counts reach Envoy's counters on the tick, not per request.
    assert_eq!(vm.tick_period_ms(), 1000);
    vm.tick().unwrap();
    // Every server got requests and every count is right.
    for server in router.servers() {
        let want = all
            .iter()
            .filter(|u| {
                let d = router.decide(u);
                d.server == server && d.reason != Reason::Unreadable
            })
            .count() as u64;
        let got = vm
            .metric(&format!("seashard.requests.server.{server}"))
            .map(|m| m.value);
        assert_eq!(got, Some(want), "{server}");
        assert!(want > 0, "{server}");
    }
    let defaults = all
        .iter()
        .filter(|u| router.decide(u).reason == Reason::Default)
        .count() as u64;
    assert_eq!(metric(&vm, "seashard.requests.default"), Some(defaults));
    let unreadable = all
        .iter()
        .filter(|u| router.decide(u).reason == Reason::Unreadable)
        .count() as u64;
    assert_eq!(
        metric(&vm, "seashard.requests.unreadable"),
        Some(unreadable)
    );
    assert_eq!(metric(&vm, "seashard.map_version"), Some(7));
}

#[test]
fn a_client_sent_routing_header_never_survives() {
    let mut vm = vm_with(&config(1, Fence::default()));
    let uri = "/api/v1/dtables/a1b2c3d4-0000-4000-8000-000000000001/";
    let (ctx, _) = request(
        &mut vm,
        &[
            (":path", uri),
            ("x-dtable-server", "dtable-server-2"),
            ("X-Dtable-Server", "evil"),
            ("x-shard-map-version", "99"),
        ],
    );
    let headers = vm.request_headers_of(ctx).unwrap();
    let routing: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-dtable-server"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(routing, vec!["dtable-server"]);
    assert_eq!(vm.request_header(ctx, "x-shard-map-version"), Some("1"));
}

#[test]
fn without_the_version_header_a_routed_request_gets_the_routing_header_only() {
    let mut c = config(4, Fence::default());
    c.version_header = false;
    let mut vm = vm_with(&c);
    let uri = "/api/v1/dtables/a1b2c3d4-0000-4000-8000-000000000001/";
    let (ctx, action) = request_to(&mut vm, uri);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        vm.request_header(ctx, "x-dtable-server"),
        Some("dtable-server")
    );
    assert_eq!(vm.request_header(ctx, "x-shard-map-version"), None);
    // The JSON the control plane sends says so only when it is off.
    assert!(c.to_json().contains(r#""version_header":false"#));
    assert!(
        !config(4, Fence::default())
            .to_json()
            .contains("version_header")
    );
}

#[test]
fn a_fenced_base_gets_503_with_retry_after() {
    let fence = Fence {
        slots: vec!["a-b".into()],
        pins: vec!["ff84e1a1-66e2".into()],
    };
    let mut cfg = config(4, fence);
    cfg.retry_after = 9;
    let mut vm = vm_with(&cfg);
    for uri in [
        "/api/v1/dtables/a1b2c3d4-0000-4000-8000-000000000001/",
        "/socket.io/?dtable_uuid=b1b2c3d4000040008000000000000001",
        "/api/v1/dtables/FF84E1A1-66E2-4000-8000-000000000001/",
    ] {
        let (ctx, action) = request_to(&mut vm, uri);
        assert_eq!(action, Action::Pause, "{uri}");
        let reply = vm
            .local_response(ctx)
            .unwrap_or_else(|| panic!("{uri}: no local reply"));
        assert_eq!(reply.status, 503);
        assert!(
            reply
                .headers
                .iter()
                .any(|(k, v)| k == "retry-after" && v == "9"),
            "{:?}",
            reply.headers
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["error"], "base_moving");
        assert_eq!(body["retry_after"], 9);
        assert!(vm.request_header(ctx, "x-dtable-server").is_none());
    }
    // Not fenced: routed.
    let (ctx, action) = request_to(
        &mut vm,
        "/api/v1/dtables/c1b2c3d4-0000-4000-8000-000000000001/",
    );
    assert_eq!(action, Action::Continue);
    assert_eq!(
        vm.request_header(ctx, "x-dtable-server"),
        Some("dtable-server")
    );
    vm.tick().unwrap();
    assert_eq!(metric(&vm, "seashard.requests.fenced"), Some(3));
}

#[test]
fn invalid_configuration_is_refused_and_the_previous_map_stays() {
    let mut vm = vm_with(&config(1, Fence::default()));
    let bad = [
        "not json".to_owned(),
        r#"{"version": 2, "map": {"default": "a", "slots": {"0-7": "a"}}}"#.to_owned(),
        r#"{"version": 2, "map": {"default": "a"}, "surprise": true}"#.to_owned(),
        r#"{"version": 2, "header": "Bad Header", "map": {"default": "a"}}"#.to_owned(),
        // A slot given twice: which server is meant cannot be told.
        r#"{"version": 2, "map": {"default": "a", "slots": {"0-f": "a", "0-f": "b"}}}"#.to_owned(),
        String::new(),
    ];
    for b in &bad {
        vm.clear_records();
        assert!(!vm.configure(b.as_bytes()).unwrap(), "accepted {b:?}");
        assert!(
            vm.logs_at_least(LogLevel::Error)
                .any(|l| l.contains("refused")),
            "{b:?}: {:?}",
            vm.logs()
        );
    }
    // The gap is named in the log.
    vm.clear_records();
    assert!(!vm.configure(bad[1].as_bytes()).unwrap());
    assert!(
        vm.logs_at_least(LogLevel::Error)
            .any(|l| l.contains("gap: no slot covers 8-f")),
        "{:?}",
        vm.logs()
    );
    let (ctx, _) = request_to(
        &mut vm,
        "/api/v1/dtables/0f000000-0000-4000-8000-000000000001/",
    );
    assert_eq!(
        vm.request_header(ctx, "x-dtable-server"),
        Some("dtable-server-2")
    );
    assert_eq!(vm.request_header(ctx, "x-shard-map-version"), Some("1"));
    assert_eq!(metric(&vm, "seashard.map_version"), Some(1));
    // A valid new map applies.
    assert!(
        vm.configure(
            RouterConfig::new(3, ShardMap::from_json(r#"{"default": "solo"}"#).unwrap())
                .to_json()
                .as_bytes()
        )
        .unwrap()
    );
    let (ctx, _) = request_to(
        &mut vm,
        "/api/v1/dtables/0f000000-0000-4000-8000-000000000001/",
    );
    assert_eq!(vm.request_header(ctx, "x-dtable-server"), Some("solo"));
    assert_eq!(metric(&vm, "seashard.map_version"), Some(3));
}

#[test]
fn unconfigured_filter_refuses_rather_than_guesses() {
    let host = Host::load(built_filter("base-router").unwrap()).unwrap();
    let mut vm = host.instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    assert!(!vm.configure(b"{}").unwrap());
    let (ctx, action) = request_to(&mut vm, "/ping/");
    assert_eq!(action, Action::Pause);
    assert_eq!(vm.local_response(ctx).map(|r| r.status), Some(503));
}

#[test]
fn never_traps_on_odd_requests() {
    let mut vm = vm_with(&config(1, Fence::default()));
    let long = "/".repeat(70_000);
    let odd: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![(":path", "")],
        vec![(":path", long.as_str())],
        vec![(
            ":path",
            "/api/v1/dtables/ÿÿÿÿÿÿÿÿ-ÿÿÿÿ-ÿÿÿÿ-ÿÿÿÿ-ÿÿÿÿÿÿÿÿÿÿÿÿ/",
        )],
        vec![(
            ":path",
            "/api/v1/dtables/\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}x/",
        )],
        vec![(":path", "?dtable_uuid=?dtable_uuid=&dtable_uuid")],
        vec![(":path", "/a"), (":path", "/b")],
    ];
    for headers in &odd {
        let (ctx, action) = request(&mut vm, headers);
        assert_eq!(action, Action::Continue, "{headers:?}");
        assert_eq!(
            vm.request_header(ctx, "x-dtable-server"),
            Some("dtable-server"),
            "{headers:?}"
        );
    }
    let plain = Router::new(&ShardMap::from_json(MAP).unwrap()).unwrap();
    assert_eq!(plain.decide("").server, "dtable-server");
}

/// A guard of `server` under `MAP` at `version` with `fence`.
fn guard_vm(server: &str, version: u64, fence: Fence) -> Vm {
    let mut cfg = config(version, fence);
    cfg.guard = Some(server.into());
    cfg.retry_after = 6;
    vm_with(&cfg)
}

/// The value of the VM's metric `name`.
fn metric(vm: &Vm, name: &str) -> Option<u64> {
    vm.metric(name).map(|m| m.value)
}

fn header<'a>(reply: &'a wasm_host::LocalResponse, name: &str) -> Option<&'a str> {
    reply
        .headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Owned by dtable-server-2 under `MAP` (slot 00-3f).
const OWNED_BY_2: &str = "/api/v1/dtables/1abcdef0-0000-4000-8000-000000000001/rows/";
/// Owned by dtable-server-3 under `MAP` (slot 40-9f; the pin `40` is dtable-server's).
const OWNED_BY_3: &str = "/socket.io/?EIO=4&dtable_uuid=5abcdef0000040008000000000000001";

#[test]
fn a_guard_passes_its_servers_bases_untouched() {
    let mut vm = guard_vm("dtable-server-2", 8, Fence::default());
    assert!(
        vm.logs()
            .iter()
            .any(|l| l.message.contains("guard of dtable-server-2")),
        "{:?}",
        vm.logs()
    );
    for uri in [
        OWNED_BY_2,
        "/api/v1/dtables/FF84E1A1-66E2-4000-8000-000000000001/",
        "/ping/",
        "/api/v1/admin/sys-info/",
    ] {
        let (ctx, action) = request(
            &mut vm,
            &[(":path", uri), ("x-dtable-server", "client-choice")],
        );
        assert_eq!(action, Action::Continue, "{uri}");
        assert!(vm.local_response(ctx).is_none(), "{uri}");
        // A guard routes nothing: the request goes on as it came.
        assert_eq!(
            vm.request_header(ctx, "x-dtable-server"),
            Some("client-choice")
        );
        assert_eq!(vm.request_header(ctx, "x-shard-map-version"), None);
        vm.finish(ctx).unwrap();
    }
    vm.tick().unwrap();
    assert_eq!(metric(&vm, "seashard.requests.passed"), Some(4));
    assert!(
        vm.metric("seashard.requests.server.dtable-server-2")
            .is_none()
    );
}

#[test]
fn a_guard_refuses_another_servers_base_with_421_naming_the_owner() {
    let mut vm = guard_vm("dtable-server-2", 8, Fence::default());
    let reply = answered(&mut vm, OWNED_BY_3);
    assert_eq!(reply.status, 421);
    assert_eq!(header(reply, "content-type"), Some("application/json"));
    assert_eq!(header(reply, "cache-control"), Some("no-store"));
    assert_eq!(header(reply, "x-shard-map-version"), Some("8"));
    assert_eq!(header(reply, "retry-after"), None);
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "misdirected");
    assert_eq!(body["base_uuid"], "5abcdef0-0000-4000-8000-000000000001");
    assert_eq!(body["owner"], "dtable-server-3");
    assert_eq!(body["server"], "dtable-server-2");
    vm.tick().unwrap();
    assert_eq!(metric(&vm, "seashard.requests.misdirected"), Some(1));
}

#[test]
fn a_guard_refuses_a_fenced_base_with_503_and_retry_after() {
    let fence = Fence {
        slots: vec!["1".into()],
        pins: vec![],
    };
    let mut vm = guard_vm("dtable-server-2", 9, fence);
    let reply = answered(&mut vm, OWNED_BY_2);
    assert_eq!(reply.status, 503);
    assert_eq!(header(reply, "retry-after"), Some("6"));
    assert_eq!(header(reply, "x-shard-map-version"), Some("9"));
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["error"], "base_moving");
    assert_eq!(body["retry_after"], 6);
    assert_eq!(body["base_uuid"], "1abcdef0-0000-4000-8000-000000000001");
    // Outside the fence, the server's other bases still pass.
    let (_, action) = request_to(
        &mut vm,
        "/api/v1/dtables/2abcdef0-0000-4000-8000-000000000001/",
    );
    assert_eq!(action, Action::Continue);
    vm.tick().unwrap();
    assert_eq!(metric(&vm, "seashard.requests.fenced"), Some(1));
}

/// The bootstrap's placeholder: version 0, every base fenced, for a guard and an edge.
#[test]
fn before_the_first_map_bases_get_no_shard_map_yet() {
    let placeholder = |guard: Option<&str>| RouterConfig {
        guard: guard.map(str::to_owned),
        fence: Fence {
            slots: vec!["0-f".into()],
            pins: vec![],
        },
        ..RouterConfig::new(
            shardmap::AWAITING_MAP_VERSION,
            ShardMap::from_json(r#"{"default": "dtable-server-2"}"#).unwrap(),
        )
    };
    for guard in [Some("dtable-server-2"), None] {
        let mut vm = vm_with(&placeholder(guard));
        for uri in [OWNED_BY_2, OWNED_BY_3] {
            let (ctx, action) = request_to(&mut vm, uri);
            assert_eq!(action, Action::Pause, "{guard:?} {uri}");
            let reply = vm.local_response(ctx).expect("a local reply");
            assert_eq!(reply.status, 503);
            assert_eq!(header(reply, "retry-after"), Some("5"));
            assert_eq!(header(reply, "x-shard-map-version"), Some("0"));
            let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(body["error"], "no_shard_map_yet", "{guard:?}");
            assert_eq!(body["retry_after"], 5);
            assert!(body["base_uuid"].is_string());
        }
        // Without a base: passed by the guard, to the default server by the edge.
        let (ctx, action) = request_to(&mut vm, "/ping/");
        assert_eq!(action, Action::Continue);
        let routed = vm.request_header(ctx, "x-dtable-server");
        assert_eq!(routed, guard.is_none().then_some("dtable-server-2"));
        vm.tick().unwrap();
        assert_eq!(metric(&vm, "seashard.requests.no_map"), Some(2));
        assert_eq!(metric(&vm, "seashard.requests.fenced"), Some(0));
    }
}

#[test]
fn a_guard_with_an_invalid_server_name_is_refused() {
    let mut vm = vm_with(&config(1, Fence::default()));
    let mut bad = config(2, Fence::default());
    bad.guard = Some("two words".into());
    assert!(!vm.configure(bad.to_json().as_bytes()).unwrap());
    assert!(
        vm.logs_at_least(LogLevel::Error)
            .any(|l| l.contains("guard")),
        "{:?}",
        vm.logs()
    );
}

/// On generated requests, a guard and an edge under a fence answer exactly as the
/// gate's verdict natively.
#[test]
fn edge_and_guard_answer_exactly_as_the_gate_decides() {
    let fence = Fence {
        slots: vec!["3f".into(), "a".into()],
        pins: vec!["0abc".into()],
    };
    for guard in [None, Some("dtable-server-3"), Some("dtable-server-9")] {
        let mut cfg = config(12, fence.clone());
        cfg.guard = guard.map(str::to_owned);
        let gate = cfg.compile_gate().unwrap();
        let mut vm = vm_with(&cfg);
        for uri in uris(1200) {
            let (ctx, action) = request_to(&mut vm, &uri);
            let routed = vm.request_header(ctx, "x-dtable-server");
            let reply = vm.local_response(ctx);
            match gate.verdict(&uri) {
                shardmap::Verdict::Route(d) => {
                    assert_eq!(
                        (action, routed),
                        (Action::Continue, Some(d.server)),
                        "{uri}"
                    );
                }
                shardmap::Verdict::Pass { .. } => {
                    assert_eq!((action, routed), (Action::Continue, None), "{uri}");
                    assert!(reply.is_none());
                }
                shardmap::Verdict::Refuse(r) => {
                    assert_eq!(action, Action::Pause, "{uri}");
                    let reply = reply.expect("a local reply");
                    assert_eq!(reply.status, u32::from(r.status), "{uri}");
                    assert_eq!(reply.body, r.body.as_bytes(), "{uri}");
                }
            }
            vm.finish(ctx).unwrap();
        }
    }
}

/// A map version never goes back: a VM refuses a configuration older than the one it
/// applied (Envoy NACKs it) and keeps routing with the newer map; so does a fresh VM
/// of the same Envoy process (Envoy's configuration canary), through shared data.
#[test]
fn an_older_map_is_refused_and_the_newer_kept() {
    let host = Host::load(built_filter("base-router").unwrap()).unwrap();
    let mut vm = host.instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    let newer = config(8, Fence::default());
    let mut older = config(7, Fence::default());
    // The older map sends slot 40-9f elsewhere: routing tells which map runs.
    older.map =
        ShardMap::from_json(r#"{"default": "dtable-server", "slots": {"0-f": "dtable-server-2"}}"#)
            .unwrap();
    let base = "/api/v1/dtables/41000000-0000-0000-0000-000000000000/";
    assert!(vm.configure(newer.to_json().as_bytes()).unwrap());
    // A VM that runs map 8 (a worker's) keeps it and does not fail: Envoy caches its
    // canary's verdict, so a map it ran before reaches the workers unchecked, and a
    // failed worker configuration would leave requests without the filter.
    assert!(vm.configure(older.to_json().as_bytes()).unwrap());
    assert!(
        vm.logs_at_least(LogLevel::Warn)
            .any(|l| l.contains("newer map kept")
                && l.contains("map version 7 is older than version 8")),
        "{:?}",
        vm.logs()
    );
    let (ctx, action) = request_to(&mut vm, base);
    assert_eq!(action, Action::Continue);
    assert_eq!(
        vm.request_header(ctx, "x-dtable-server"),
        Some("dtable-server-3")
    );
    assert_eq!(vm.request_header(ctx, "x-shard-map-version"), Some("8"));
    assert_eq!(metric(&vm, "seashard.map_version"), Some(8));
    // The same version again and a newer one are applied.
    assert!(vm.configure(newer.to_json().as_bytes()).unwrap());
    let newest = config(9, Fence::default());
    assert!(vm.configure(newest.to_json().as_bytes()).unwrap());
    // The placeholder (version 0) is older than any map: map 9 is kept.
    let placeholder = config(0, Fence::default());
    assert!(vm.configure(placeholder.to_json().as_bytes()).unwrap());
    let (ctx, _) = request_to(&mut vm, base);
    assert_eq!(vm.request_header(ctx, "x-shard-map-version"), Some("9"));
    // A fresh VM of the same process (Envoy's canary) refuses what is older than the
    // process applied: Envoy NACKs it.
    let mut canary = host.instantiate().unwrap();
    assert!(canary.start(b"").unwrap());
    assert!(!canary.configure(newer.to_json().as_bytes()).unwrap());
    assert!(canary.configure(newest.to_json().as_bytes()).unwrap());
    // Another process (another host) starts with no floor.
    let other = Host::load(built_filter("base-router").unwrap()).unwrap();
    let mut fresh = other.instantiate().unwrap();
    assert!(fresh.start(b"").unwrap());
    assert!(fresh.configure(older.to_json().as_bytes()).unwrap());
}

/// Percent-encoded bases, as Node itself reads them (the targets of
/// `crates/shardmap/tests/fixtures/node_readings.json`, labelled by Node's
/// `decodeURIComponent` and `querystring`), through the built filter: an edge routes
/// every encoded form to the base's owner, a guard passes its own and refuses another
/// server's (421), and edge and guards answer 400 `unreadable_base` to what cannot be
/// read unambiguously, counted in `seashard.requests.unreadable`.
#[test]
fn encoded_bases_reach_their_owner_and_the_unreadable_get_400() {
    let doc: serde_json::Value = serde_json::from_str(include_str!(
        "../../../crates/shardmap/tests/fixtures/node_readings.json"
    ))
    .unwrap();
    let cases = doc["cases"].as_array().unwrap();
    for guard in [None, Some("dtable-server"), Some("dtable-server-2")] {
        let mut cfg = config(12, Fence::default());
        cfg.guard = guard.map(str::to_owned);
        let router = cfg.compile().unwrap();
        let mut vm = vm_with(&cfg);
        let (mut unreadable, mut moved) = (0u64, 0);
        for c in cases {
            let target = c["target"].as_str().unwrap();
            let (ctx, action) = request_to(&mut vm, target);
            let routed = vm.request_header(ctx, "x-dtable-server");
            let reply = vm.local_response(ctx);
            match c["expect"].as_str().unwrap() {
                "base" => {
                    let base = shardmap::BaseUuid::parse(c["base"].as_str().unwrap()).unwrap();
                    let owner = router.owner_of(&base);
                    moved += usize::from(owner != router.default_server());
                    match guard {
                        None => assert_eq!((action, routed), (Action::Continue, Some(owner))),
                        Some(g) if g == owner => {
                            assert_eq!((action, routed), (Action::Continue, None), "{target}");
                            assert!(reply.is_none(), "{target}");
                        }
                        Some(_) => {
                            assert_eq!(action, Action::Pause, "{target}");
                            assert_eq!(reply.map(|r| r.status), Some(421), "{target}");
                        }
                    }
                }
                "none" => {
                    assert_eq!(action, Action::Continue, "{target}");
                    assert!(reply.is_none(), "{target}");
                }
                _ => {
                    assert_eq!(action, Action::Pause, "{guard:?} {target}");
                    assert_eq!(routed, None, "{target}");
                    let reply = reply.expect("a local reply");
                    assert_eq!(reply.status, 400, "{target}");
                    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
                    assert_eq!(body["error"], "unreadable_base", "{target}");
                    assert!(body["reason"].is_string(), "{body}");
                    assert_eq!(header(reply, "retry-after"), None);
                    unreadable += 1;
                }
            }
            vm.finish(ctx).unwrap();
        }
        // Not decoded, these would have gone to `default` or through the guard.
        assert!(moved > 100, "{moved}");
        vm.tick().unwrap();
        assert_eq!(
            metric(&vm, "seashard.requests.unreadable"),
            Some(unreadable),
            "{guard:?}"
        );
        assert!(unreadable > 80);
    }
}
