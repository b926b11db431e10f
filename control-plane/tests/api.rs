//! The HTTP API against the real server on 127.0.0.1 with a temporary SQLite file.

mod sim;

use std::path::Path;
use std::time::Duration;

use control_plane::Config;
use serde_json::{Value, json};
use sim::{Served, TOKEN};
use tempfile::TempDir;

const READ_TOKEN: &str = "read-only-token-4567";
/// The health URL of a server that is down.
const DOWN: &str = "http://127.0.0.1:1/ping/";

/// Both servers, the first with the health URL `ping`, and a read-only token.
fn config(dir: &Path, ping: &str) -> Config {
    let health = format!("health_url = \"{ping}\"");
    let servers = sim::two_servers([&health, &format!("health_url = \"{DOWN}\"")]);
    let api = format!("read_token = \"{READ_TOKEN}\"\nmax_body = 65536");
    sim::write_config(dir, &sim::config_text("", sim::STATE_DB, &api, &servers))
}

/// A control plane with its store in `dir`, both servers down.
fn start(dir: &Path) -> Served {
    Served::start(config(dir, DOWN))
}

/// [`start`] in a new temporary directory.
fn fresh() -> (TempDir, Served) {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path());
    (dir, cp)
}

fn moving_map() -> Value {
    json!({"default": "dtable-server",
           "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}})
}

#[test]
fn changes_without_the_token_get_401() {
    let (_dir, cp) = fresh();
    let map = json!({"default": "dtable-server", "paths": [{"prefix": "/x/", "server": "dtable-server-2"}]});
    let url = "/v1/maps";
    for token in [None, Some("wrong-token-0123"), Some("")] {
        let (status, body) = cp.call("POST", url, token, Some(&map));
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].as_str().unwrap().contains("Bearer"));
    }
    let (status, _) = cp.call("DELETE", "/v1/nodes/x", None, None);
    assert_eq!(status, 401);
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["version"], 1);
    let (status, _) = cp.post(url, &map);
    assert_eq!(status, 200);
    cp.stop();
}

#[test]
fn an_invalid_map_gets_422_with_every_problem() {
    let (_dir, cp) = fresh();
    let bad = json!({
        "default": "dtable-server",
        "slots": {"0-6": "dtable-server", "8-f": "dtable-server-9"},
        "pins": {"not-hex": "dtable-server"},
        "paths": [{"prefix": "no-slash", "server": "dtable-server"}]
    });
    let (status, body) = cp.post("/v1/maps", &bad);
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "the map is invalid");
    let problems = body["problems"].as_array().unwrap();
    let at: Vec<&str> = problems.iter().map(|p| p["at"].as_str().unwrap()).collect();
    assert!(at.contains(&"slots"), "the gap 7: {body}");
    assert!(at.iter().any(|a| a.starts_with("pins.")), "{body}");
    assert!(at.contains(&"paths[0].prefix"), "{body}");
    assert!(
        problems
            .iter()
            .any(|p| p["message"].as_str().unwrap().contains("dtable-server-9")),
        "the unknown server: {body}"
    );
    // Not JSON at all, and not a map: 422 too.
    let (status, body) = cp.post(
        "/v1/maps",
        &json!({"default": "dtable-server", "colour": 1}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["version"], 1);
    cp.stop();
}

#[test]
fn a_concurrent_change_gets_409() {
    let (_dir, cp) = fresh();
    let url = "/v1/maps";
    let a = json!({"map": {"default": "dtable-server", "paths": [{"prefix": "/a/", "server": "dtable-server-2"}]},
                   "base_version": 1, "comment": "a"});
    let b = json!({"map": {"default": "dtable-server", "paths": [{"prefix": "/b/", "server": "dtable-server-2"}]},
                   "base_version": 1, "comment": "b"});
    let (status, body) = cp.post(url, &a);
    assert_eq!((status, &body["version"]), (200, &json!(2)), "{body}");
    let (status, body) = cp.post(url, &b);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("someone else"));
    // A change in progress (a rollout holds the lock): 409 too.
    let guard = cp.plane.try_begin_change().unwrap();
    let c = json!({"default": "dtable-server", "paths": [{"prefix": "/c/", "server": "dtable-server-2"}]});
    let (status, body) = cp.post(url, &c);
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("in progress"));
    drop(guard);
    let (status, _) = cp.post(url, &c);
    assert_eq!(status, 200);
    cp.stop();
}

#[test]
fn dry_run_returns_the_plan_and_changes_nothing() {
    let (_dir, cp) = fresh();
    let url = "/v1/maps?dry_run=true";
    // A dry run is a read: the read-only token may plan.
    let (status, body) = cp.call("POST", url, Some(READ_TOKEN), Some(&moving_map()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dry_run"], true);
    assert_eq!(body["applied"], false);
    assert_eq!(body["needs_rollout"], true);
    assert_eq!(body["plan"]["slots"][0]["range"], "8-f");
    assert_eq!(body["plan"]["losing"], json!(["dtable-server"]));
    let (_, history) = cp.get("/v1/maps");
    assert_eq!(history["versions"].as_array().unwrap().len(), 1);
    let (_, audit) = cp.get("/v1/audit");
    assert_eq!(audit["entries"].as_array().unwrap().len(), 1);
    let (status, body) = cp.post("/v1/maps?dry_run=maybe", &moving_map());
    assert_eq!(status, 400, "{body}");
    cp.stop();
}

#[test]
fn every_error_is_json() {
    let (_dir, cp) = fresh();
    let (status, body) = cp.get("/v1/maps/abc");
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("abc"));
    let (status, body) = cp.call("GET", "/v2/nothing", None, None);
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("/v2/nothing"));
    let (status, body) = cp.call(
        "POST",
        "/v3/discovery:clusters",
        None,
        Some(&json!({"node": {}})),
    );
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("node"));
    cp.stop();
}

#[test]
fn a_map_that_moves_bases_starts_a_rollout_naming_the_moves() {
    let (_dir, cp) = fresh();
    let mut map = moving_map();
    map["pins"] = json!({"ff84e1a1-66e2": "dtable-server-2"});
    let (status, body) = cp.post("/v1/maps", &map);
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    assert_eq!(body["plan"]["slots"][0]["range"], "8-f", "{body}");
    assert_eq!(body["plan"]["pins"][0]["pin"], "ff84e1a166e2", "{body}");
    assert!(body["plan"]["fence"]["slots"].is_array());
    // Both servers have manual hooks: the rollout waits for the first one.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, r) = cp.get(&format!("/v1/rollouts/{id}"));
        if r["waiting_for_confirm"] == "dtable-server" {
            assert_eq!(r["state"], "restart");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["kind"], "fence");
    // Abort without the token: 401; with it: rolled back to the old map.
    let abort = "/v1/rollouts/current/abort";
    assert_eq!(cp.call("POST", abort, None, Some(&json!({}))).0, 401);
    assert_eq!(cp.post(abort, &json!({})).0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, r) = cp.get(&format!("/v1/rollouts/{id}"));
        if r["state"] == "rolled_back" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["kind"], "rollback");
    assert_eq!(active["version"], 3);
    cp.stop();
}

#[test]
fn a_non_moving_map_is_applied_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cp = start(dir.path());
    let url = "/v1/maps";
    let map = json!({"map": {"default": "dtable-server",
                             "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]},
                     "comment": "admin to server 2", "author": "alice"});
    let (status, body) = cp.post(url, &map);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["applied"], true);
    assert_eq!(body["plan"]["paths_changed"], true);
    let ecds = cp.plane.snapshot().ecds.version.clone();
    assert_eq!(control_plane::resources::ecds_map_version(&ecds), Some(2));
    // The same map again: nothing to do, no new version.
    let (status, body) = cp.post(url, &map);
    assert_eq!((status, body["unchanged"].as_bool()), (200, Some(true)));
    assert_eq!(body["version"], 2);
    let (_, one) = cp.get("/v1/maps/2");
    assert_eq!(one["author"], "alice");
    assert_eq!(one["comment"], "admin to server 2");
    let (status, _) = cp.get("/v1/maps/9");
    assert_eq!(status, 404);
    cp.stop();

    let cp = start(dir.path());
    assert_eq!(cp.plane.snapshot().ecds.version, ecds);
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["version"], 2);
    assert_eq!(active["map"]["paths"][0]["server"], "dtable-server-2");
    let (_, audit) = cp.get("/v1/audit");
    assert_eq!(audit["entries"][0]["actor"], "alice");
    cp.stop();
}

#[test]
fn rest_xds_answers_304_when_current() {
    let (_dir, cp) = fresh();
    let url = "/v3/discovery:extension_configs";
    let req = |version: &str| {
        json!({"version_info": version, "node": {"id": "rest-1", "cluster": "edge"},
               "resource_names": ["seashard.base_router"],
               "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"})
    };
    let (status, body) = cp.call("POST", url, None, Some(&req("")));
    assert_eq!(status, 200, "{body}");
    let version = body["version_info"].as_str().unwrap().to_owned();
    assert_eq!(
        control_plane::resources::ecds_map_version(&version),
        Some(1)
    );
    let r = &body["resources"][0];
    assert_eq!(r["name"], "seashard.base_router");
    let conf = r["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(conf).unwrap()["map"]["default"],
        "dtable-server"
    );
    let (status, _) = cp.call("POST", url, None, Some(&req(&version)));
    assert_eq!(status, 304);
    let (_, node) = cp.get("/v1/nodes/rest-1");
    assert_eq!(node["transport"], "rest");
    assert_eq!(node["types"]["ecds"]["acked_version"], version.as_str());
    assert_eq!(node["state"]["ecds"], "current");
    // Clusters.
    let (status, body) = cp.call(
        "POST",
        "/v3/discovery:clusters",
        None,
        Some(&json!({"node": {"id": "rest-1"}})),
    );
    assert_eq!(status, 200);
    assert_eq!(body["resources"].as_array().unwrap().len(), 2);
    assert_eq!(body["resources"][1]["name"], "dtable-server-2");
    cp.stop();
}

#[test]
fn health_metrics_and_servers() {
    let dir = tempfile::tempdir().unwrap();
    // A dtable-server that answers pong.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ping = format!("http://{}/ping/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in listener.incoming().flatten().take(4) {
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npong");
        }
    });
    let cp = Served::start(config(dir.path(), &ping));
    let (status, body) = cp.call("GET", "/healthz", None, None);
    assert_eq!((status, &body["ok"]), (200, &json!(true)));
    let (status, body) = cp.get("/v1/servers");
    assert_eq!(status, 200);
    let servers = body["servers"].as_array().unwrap();
    assert_eq!(servers[0]["health"]["up"], true, "{body}");
    assert_eq!(servers[0]["assigned"]["default"], true);
    assert_eq!(servers[1]["health"]["up"], false);
    assert_eq!(servers[1]["restart"]["kind"], "manual");
    let metrics = cp.metrics();
    assert!(metrics.contains("seashard_map_version 1"), "{metrics}");
    assert!(metrics.contains("seashard_nodes{state=\"connected\"} 0"));
    let (status, body) = cp.get("/v1/status");
    assert_eq!(status, 200);
    assert_eq!(body["version"], 1);
    assert_eq!(
        control_plane::resources::ecds_map_version(body["ecds_version"].as_str().unwrap()),
        Some(1)
    );
    cp.stop();
}

#[test]
fn every_v1_endpoint_needs_a_token_and_only_the_change_token_changes() {
    let (_dir, cp) = fresh();
    let reads = [
        "/v1/status",
        "/v1/map",
        "/v1/maps",
        "/v1/maps/1",
        "/v1/nodes",
        "/v1/nodes/x",
        "/v1/servers",
        "/v1/rollouts",
        "/v1/rollouts/1",
        "/v1/audit",
    ];
    for path in reads {
        for token in [None, Some("wrong-token-0000")] {
            let (status, body) = cp.call("GET", path, token, None);
            assert_eq!(status, 401, "GET {path} with {token:?}: {body}");
            assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        }
        for token in [READ_TOKEN, TOKEN] {
            let (status, body) = cp.call("GET", path, Some(token), None);
            assert_ne!(status, 401, "GET {path}: {body}");
        }
    }
    // The read-only token changes nothing.
    let map = json!({"map": {"default": "dtable-server",
        "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server-2"}]}});
    let url = "/v1/maps";
    let (status, _) = cp.call("POST", url, Some(READ_TOKEN), Some(&map));
    assert_eq!(status, 401);
    let (status, _) = cp.call("POST", url, None, Some(&map));
    assert_eq!(status, 401);
    let (_, active) = cp.call("GET", "/v1/map", Some(READ_TOKEN), None);
    assert_eq!(active["version"], 1, "{active}");
    let (status, body) = cp.post(url, &map);
    assert_eq!(status, 200, "{body}");
    // Health and metrics stay open, and carry no map.
    let (status, _) = cp.call("GET", "/healthz", None, None);
    assert_eq!(status, 200);
    let metrics = cp.metrics();
    assert!(!metrics.contains("dtable-server-2"), "{metrics}");
    cp.stop();
}

#[test]
fn a_key_given_twice_is_refused_naming_it_and_nothing_changes() {
    let (_dir, cp) = fresh();
    for body in [
        r#"{"map": {"default": "dtable-server", "slots": {"0-f": "dtable-server", "0-f": "dtable-server-2"}}}"#,
        r#"{"default": "dtable-server", "default": "dtable-server-2"}"#,
        r#"{"map": {"default": "dtable-server"}, "comment": "a", "comment": "b"}"#,
    ] {
        let (status, text) = cp.send("/v1/maps", "application/json", body.as_bytes());
        assert_eq!(status, 422, "{body}: {text}");
        assert!(text.contains("is given twice"), "{text}");
    }
    let (_, active) = cp.get("/v1/map");
    assert_eq!(active["version"], 1);
    cp.stop();
}

#[test]
fn hostile_bodies_get_a_clear_error_and_the_api_keeps_serving() {
    let (_dir, cp) = fresh();
    let send = |content_type: &str, body: Vec<u8>| -> (u16, Value) {
        let (status, text) = cp.send("/v1/maps", content_type, &body);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    };
    // Over the size limit (64 KiB here; small enough to be sent whole before the
    // answer): 413, as JSON.
    let mut big = br#"{"map": {"default": "dtable-server"}, "comment": ""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 70 * 1024));
    big.extend(br#""}"#);
    let (status, body) = send("application/json", big);
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("max_body"),
        "{body}"
    );
    // Not JSON by its content type: 415.
    let (status, body) = send("text/plain", br#"{"default": "dtable-server"}"#.to_vec());
    assert_eq!(status, 415, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("text/plain"),
        "{body}"
    );
    // Malformed, deeply nested, wrong types: 422 saying why.
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    for (bad, why) in [
        (br#"{"map": {"default": "#.to_vec(), "not JSON"),
        (deep.into_bytes(), "recursion limit"),
        (br#"{"map": {"default": 7}}"#.to_vec(), "invalid type"),
        (
            br#"{"map": {"default": "dtable-server", "slots": ["0-f"]}}"#.to_vec(),
            "invalid type",
        ),
        (
            br#"{"map": {"default": "dtable-server"}, "base_version": "one"}"#.to_vec(),
            "invalid type",
        ),
    ] {
        let (status, body) = send("application/json", bad);
        assert_eq!(status, 422, "{why}: {body}");
        assert!(body.to_string().contains(why), "{why}: {body}");
    }
    // Still serving, nothing changed.
    let (status, active) = cp.get("/v1/map");
    assert_eq!((status, &active["version"]), (200, &json!(1)), "{active}");
    cp.stop();
}

/// One REST xDS poll of ECDS by node `id` from the loopback address `source`, as an
/// Envoy on another host polls: `(status, body)`.
fn rest_poll_from(cp: &Served, source: [u8; 4], id: &str, version: &str) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = json!({"version_info": version, "node": {"id": id, "cluster": "edge"},
                      "resource_names": ["seashard.base_router"],
                      "type_url": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"})
    .to_string();
    let target: std::net::SocketAddr = cp.base.trim_start_matches("http://").parse().unwrap();
    let text = cp.rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((source, 0).into()).unwrap();
        let mut s = tokio::time::timeout(Duration::from_secs(5), socket.connect(target))
            .await
            .unwrap()
            .unwrap();
        let head = format!(
            "POST /v3/discovery:extension_configs HTTP/1.1\r\nhost: {target}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    });
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    let json = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

fn rest_instances(cp: &Served) -> Value {
    cp.get("/v1/nodes").1
}

#[test]
fn rest_pollers_of_one_id_from_two_addresses_are_two_instances_and_a_moving_push_gets_409() {
    let (_dir, cp) = fresh();
    let (status, first) = rest_poll_from(&cp, [127, 0, 0, 2], "rest-1", "");
    assert_eq!(status, 200, "{first}");
    let version = first["version_info"].as_str().unwrap().to_owned();
    assert_eq!(
        rest_poll_from(&cp, [127, 0, 0, 2], "rest-1", &version).0,
        304
    );
    assert!(
        rest_instances(&cp)["conflicts"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A second Envoy with the same node id polls from another host.
    assert_eq!(rest_poll_from(&cp, [127, 0, 0, 3], "rest-1", "").0, 200);
    let nodes = rest_instances(&cp);
    let keys: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["instance"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["rest-1@rest:127.0.0.2", "rest-1@rest:127.0.0.3"]);
    assert_eq!(nodes["nodes"][1]["peer"], "127.0.0.3");
    assert_eq!(nodes["nodes"][1]["transport"], "rest");
    assert_eq!(nodes["conflicts"][0]["id"], "rest-1", "{nodes}");
    // A map that moves bases would wait for both: refused, naming them.
    let (status, body) = cp.post("/v1/maps", &moving_map());
    assert_eq!(status, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`rest-1`") && error.contains("rest-1@rest:127.0.0.3"),
        "{body}"
    );
    let (_, status) = cp.get("/v1/status");
    assert_eq!(status["conflicts"][0]["id"], "rest-1", "{status}");
    let metrics = cp.metrics();
    assert!(
        metrics.contains("seashard_node_id_conflicts 1"),
        "{metrics}"
    );
    assert_eq!(cp.plane.active().unwrap().version, 1);
    cp.stop();
}

#[test]
fn a_rest_poller_of_a_waited_id_appearing_during_the_fence_rolls_the_rollout_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), DOWN);
    // Far beyond the test's wait: only the conflict can end the fence in time.
    config.rollout.ack_timeout = Duration::from_secs(120);
    let cp = Served::start(config);
    let (_, first) = rest_poll_from(&cp, [127, 0, 0, 2], "rest-1", "");
    let version = first["version_info"].as_str().unwrap().to_owned();
    assert_eq!(
        rest_poll_from(&cp, [127, 0, 0, 2], "rest-1", &version).0,
        304
    );
    let (status, body) = cp.post("/v1/maps", &moving_map());
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().unwrap();
    // The fence waits for rest-1's ACK; another Envoy with that id polls meanwhile.
    let (_, r) = cp.get(&format!("/v1/rollouts/{id}"));
    assert_eq!(r["state"], "fence", "{r}");
    assert_eq!(rest_poll_from(&cp, [127, 0, 0, 3], "rest-1", "").0, 200);
    let rollout = |want: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (_, r) = cp.get(&format!("/v1/rollouts/{id}"));
            if r["state"] == want {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "{r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let r = rollout("rolling_back");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("`rest-1`") && reason.contains("rest-1@rest:127.0.0.3"),
        "{r}"
    );
    // Both apply the old map again: rolled back.
    for source in [[127, 0, 0, 2], [127, 0, 0, 3]] {
        let (status, back) = rest_poll_from(&cp, source, "rest-1", &version);
        assert_eq!(status, 200, "{back}");
        let back = back["version_info"].as_str().unwrap();
        assert_eq!(rest_poll_from(&cp, source, "rest-1", back).0, 304);
    }
    rollout("rolled_back");
    assert_eq!(cp.plane.active().unwrap().fence, Default::default());
    cp.stop();
}
