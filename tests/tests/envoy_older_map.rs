//! A map version never goes back, in a real Envoy: a guard polling REST xDS from a
//! scripted control plane applies map 8, is then offered map 7 (older, under a new
//! version string, as a stale replica of the old code sent it) and must refuse it
//! (the filter's `on_configure` fails in Envoy's configuration canary, so Envoy
//! rejects the update) and keep routing with 8; a newer map 9 is applied after.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control_plane::Config;
use control_plane::resources::{ecds_resource, ecds_version, guard_resource_name};
use seashard_tests::replicas::envoy_map_version;
use seashard_tests::rollout::start_managed_envoy;
use seashard_tests::{Upstream, get, loopback, wait_until, wasm_file};
use serde_json::{Value, json};
use shardmap::{RouterConfig, ShardMap};

const SERVER: &str = "dtable-server-2";
const WAIT: Duration = Duration::from_secs(20);
/// Owned by `SERVER` under maps 8 and 9, not under map 7.
const MOVED: &str = "/dtable-server/api/v1/dtables/45678901-1234-1234-1234-123456789abc/rows/";
/// Owned by `dtable-server` under every map: the guard of `SERVER` refuses it (421).
/// A filter that was bypassed (a plugin Envoy failed to configure) would pass it.
const OTHERS: &str = "/dtable-server/api/v1/dtables/01234567-1234-1234-1234-123456789abc/rows/";

/// What the scripted control plane serves, and the polls it got: `(version_info,
/// error_detail)`.
#[derive(Default)]
struct Script {
    version: String,
    resource: Value,
    polls: Vec<(String, Option<String>)>,
}

/// A REST xDS endpoint answering every ECDS poll with the scripted resource (`304`
/// when the poller reports its version).
struct ScriptedXds {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: Arc<AtomicBool>,
}

impl ScriptedXds {
    fn start() -> ScriptedXds {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (script.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        std::thread::spawn(move || serve(conn, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        ScriptedXds { addr, script, stop }
    }

    fn set(&self, version: String, resource: Value) {
        let mut s = self.script.lock().unwrap();
        s.version = version;
        s.resource = resource;
    }

    fn polls(&self) -> Vec<(String, Option<String>)> {
        self.script.lock().unwrap().polls.clone()
    }
}

impl Drop for ScriptedXds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
fn serve(conn: TcpStream, script: &Mutex<Script>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        let mut first = true;
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if first {
                first = false;
                continue;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req: Value = serde_json::from_slice(&body).unwrap_or_default();
        let running = req["version_info"].as_str().unwrap_or_default().to_owned();
        let error = req["error_detail"]["message"].as_str().map(str::to_owned);
        let answer = {
            let mut s = script.lock().unwrap();
            s.polls.push((running.clone(), error));
            (running != s.version).then(|| {
                json!({
                    "version_info": s.version,
                    "resources": [s.resource],
                    "type_url": control_plane::resources::ECDS_TYPE_URL,
                })
                .to_string()
            })
        };
        let response = match answer {
            Some(b) => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
                b.len()
            ),
            None => "HTTP/1.1 304 Not Modified\r\ncontent-length: 0\r\n\r\n".to_owned(),
        };
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// The guard's filter configuration of map `version`, and its version string.
fn guard_config(config: &Config, version: u64, slots: Value) -> (String, Value) {
    let map = ShardMap::from_json(&json!({"default": "dtable-server", "slots": slots}).to_string())
        .unwrap();
    let rc = RouterConfig {
        guard: Some(SERVER.into()),
        ..RouterConfig::new(version, map)
    };
    let name = guard_resource_name(&config.filter.name, SERVER);
    let r = ecds_resource(&rc, &config.filter, &name);
    (ecds_version(version, version as u32), r.json)
}

/// The control plane's configuration (for the resources' filter settings), the
/// guarded server (an echo upstream) and the scripted REST xDS.
fn scripted() -> (Config, Upstream, ScriptedXds) {
    let wasm = wasm_file("base_router.wasm").unwrap();
    let config = Config::parse(&format!(
        "[listen]\ngrpc = \"127.0.0.1:1\"\nhttp = \"127.0.0.1:2\"\n[store]\npath = \"x.db\"\n\
         [api]\ntoken = \"01234567\"\n[filter]\nwasm = {:?}\n\
         [[server]]\nname = \"dtable-server\"\naddress = \"127.0.0.1:3\"\n\
         [[server]]\nname = \"{SERVER}\"\naddress = \"127.0.0.1:4\"\n",
        wasm.to_string_lossy()
    ))
    .unwrap();
    (
        config,
        Upstream::start(SERVER).unwrap(),
        ScriptedXds::start(),
    )
}

/// A guard of `SERVER` in front of `upstream`, polling `xds` (REST) as `node_id`.
fn start_guard(upstream: &Upstream, xds: &ScriptedXds, node_id: &str) -> seashard_tests::Envoy {
    let up = upstream.addr.to_string();
    let args = [
        "--kind",
        "guard",
        "--server",
        SERVER,
        "--upstream",
        &up,
        "--node-id",
        node_id,
        "--xds",
        "rest",
    ];
    start_managed_envoy(&args, xds.addr, loopback(0)).unwrap()
}

#[test]
fn a_real_envoy_refuses_an_older_map_and_keeps_the_newer() {
    let (config, upstream, xds) = scripted();
    let new_slots = json!({"0-3": "dtable-server", "4-f": SERVER});
    let (v8, r8) = guard_config(&config, 8, new_slots.clone());
    xds.set(v8.clone(), r8);
    let guard = start_guard(&upstream, &xds, "guard-older");
    let gauge = || envoy_map_version(&guard).ok().flatten();
    wait_until(WAIT, "the guard to apply map 8", || {
        Ok((gauge() == Some(8)).then_some(()))
    })
    .unwrap();
    let passes = || get(guard.listener_addr, MOVED, &[]).map(|r| r.status);
    assert_eq!(
        passes().unwrap(),
        200,
        "map 8: the moved base is the guard's"
    );
    let others = || get(guard.listener_addr, OTHERS, &[]).map(|r| r.status);
    assert_eq!(others().unwrap(), 421, "map 8: another server's base");

    // Map 7, older, under a version string of its own: refused (the next poll
    // still reports 8, with Envoy's NACK detail), 8 kept.
    let (v7, r7) = guard_config(&config, 7, json!({"0-7": "dtable-server", "8-f": SERVER}));
    let asked = xds.polls().len();
    xds.set(v7.clone(), r7);
    // Envoy's REST subscription logs the rejection (REST carries no NACK detail,
    // and its next poll may report the refused version: see ARCHITECTURE).
    wait_until(WAIT, "the guard to answer map 7", || {
        Ok(
            (gauge() == Some(7) || guard.logs().contains("extension_configs rejected"))
                .then_some(()),
        )
    })
    .unwrap();
    let logs = guard.logs();
    let tail: Vec<&str> = logs.lines().rev().take(8).collect();
    assert_eq!(
        gauge(),
        Some(8),
        "the guard applied the older map\n{}",
        tail.join("\n")
    );
    assert!(
        logs.contains("map version 7 is older than version 8"),
        "{}",
        tail.join("\n")
    );
    assert!(xds.polls().len() > asked);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(gauge(), Some(8));
    assert_eq!(passes().unwrap(), 200, "map 8 is no longer applied");
    // Still checked: the refusal must not leave the guard without its filter.
    for _ in 0..20 {
        assert_eq!(
            others().unwrap(),
            421,
            "after the older map, another server's base passed the guard\n{}",
            guard
                .logs()
                .lines()
                .rev()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // A newer map is applied as usual.
    let (v9, r9) = guard_config(&config, 9, new_slots);
    xds.set(v9, r9);
    wait_until(WAIT, "the guard to apply map 9", || {
        Ok((gauge() == Some(9)).then_some(()))
    })
    .unwrap();
    assert_eq!(passes().unwrap(), 200);
}

/// Map 7 offered again after 8, as a stale replica of the old code re-sent the map
/// an Envoy had run before: Envoy caches its canary's verdict per configuration, so
/// the older map reaches the workers' VMs, which must keep 8 (the fault campaign saw
/// a refusal there leave the Envoy without the filter: every request passed).
#[test]
fn a_real_envoy_offered_again_a_map_it_ran_before_keeps_the_newer() {
    let (config, upstream, xds) = scripted();
    let (v7, r7) = guard_config(&config, 7, json!({"0-7": "dtable-server", "8-f": SERVER}));
    xds.set(v7.clone(), r7.clone());
    let guard = start_guard(&upstream, &xds, "guard-again");
    let gauge = || envoy_map_version(&guard).ok().flatten();
    let status = |path: &str| get(guard.listener_addr, path, &[]).unwrap().status;
    wait_until(WAIT, "the guard to apply map 7", || {
        Ok((gauge() == Some(7)).then_some(()))
    })
    .unwrap();
    assert_eq!((status(MOVED), status(OTHERS)), (421, 421), "map 7");
    let (v8, r8) = guard_config(&config, 8, json!({"0-3": "dtable-server", "4-f": SERVER}));
    xds.set(v8, r8);
    wait_until(WAIT, "the guard to apply map 8", || {
        Ok((gauge() == Some(8)).then_some(()))
    })
    .unwrap();
    assert_eq!((status(MOVED), status(OTHERS)), (200, 421), "map 8");

    let asked = xds.polls().len();
    xds.set(v7, r7);
    wait_until(WAIT, "two polls after map 7 was offered again", || {
        Ok((xds.polls().len() >= asked + 2).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..20 {
        assert_eq!(
            (status(MOVED), status(OTHERS)),
            (200, 421),
            "map 8 is not what the guard runs after map 7 came again (gauge {:?})\n{}",
            gauge(),
            guard
                .logs()
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(gauge(), Some(8));
}
