//! The offline commands, run as the binary users run.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn seactl(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_seactl"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// `seactl audit-nginx CONF LOG --no-resolve` then `more`.
fn audit_nginx(conf: &str, log: &str, more: &[&str]) -> Output {
    let mut args = vec!["audit-nginx", conf, log, "--no-resolve"];
    args.extend_from_slice(more);
    seactl(&args, None)
}

const MAP: &str = r#"{"default": "dtable-server", "slots": {"0-9": "dtable-server-2", "a-f": "dtable-server"}, "pins": {"ff84e1a1-66e2": "dtable-server-2"}}"#;

#[test]
fn validate_lists_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let good = file(&dir, "good.json", MAP);
    let out = seactl(&["validate", &good], None);
    assert!(out.status.success());
    let bad = file(
        &dir,
        "bad.json",
        r#"{"slots": {"0-7": "a", "9-f": "b"}, "pins": {"zz": "a"}}"#,
    );
    let out = seactl(&["validate", &bad], None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "3 problem(s)",
        "default: missing",
        "gap: no slot covers 8",
        "pins.\"zz\"",
    ] {
        assert!(err.contains(expected), "{expected} not in {err}");
    }
}

#[test]
fn route_json_from_arguments_and_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let map = file(&dir, "map.json", MAP);
    let uuid = "0abcdef0-1111-4222-8333-444455556666";
    let out = seactl(
        &[
            "route",
            "--map",
            &map,
            "--json",
            &format!("/api/v1/dtables/{uuid}/"),
            "/ping/",
        ],
        None,
    );
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["server"], "dtable-server-2");
    assert_eq!(lines[0]["reason"], "slot");
    assert_eq!(lines[0]["base_uuid"], "0abcdef0111142228333444455556666");
    assert_eq!(lines[1]["base_uuid"], serde_json::Value::Null);
    assert_eq!(lines[1]["reason"], "default");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("{\"uri\":"));

    let stdin = format!(
        "/socket.io/?dtable_uuid=FF84E1A1-66E2-4222-8333-444455556666\n\n/api/v1/dtables/{uuid}/\n"
    );
    let out = seactl(&["route", "--map", &map, "--json"], Some(&stdin));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().next().unwrap().contains("\"reason\":\"pin\""));
}

#[test]
fn diff_and_rebalance_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let one = file(
        &dir,
        "one.json",
        r#"{"default": "s1", "slots": {"0-f": "s1"}}"#,
    );
    let out = seactl(&["rebalance", "--map", &one, "--add", "s2"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("8 of 16 slots"));
    let two = file(&dir, "two.json", &String::from_utf8_lossy(&out.stdout));
    let out = seactl(&["diff", &one, &two], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("8-f") && text.contains("s1 -> s2"), "{text}");
    let out = seactl(&["diff", "--json", &one, &two], None);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["fence"]["slots"][0], "8-f");
    let out = seactl(&["rebalance", "--map", &one, "--remove", "s1"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("default server"));
}

#[test]
fn import_nginx_prints_the_map_and_warns_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let conf = file(
        &dir,
        "nginx.conf",
        r#"http {
  upstream dtable_server_a_z { server dtable-server:5000; }
  upstream dtable_server_0_9 { server dtable-server-2:5000; }
  map $request_uri $dtable_upstream {
    default dtable_server_a_z;
    "~*ff84e1a1-66e2" dtable_server_0_9;
    "~*^/api/v1/admin/" dtable_server_0_9;
    "~*([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_a_z;
    "~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_0_9;
  }
}"#,
    );
    let out = seactl(
        &["import-nginx", &conf, "--server", "dtable_server_0_9=ds2"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(map["slots"]["0-9"], "ds2");
    assert_eq!(map["pins"]["ff84e1a166e2"], "ds2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: line 7"));
}

/// Two dtable-servers on one host, nginx picking by port (shardmap's own fixture).
const ONE_HOST: &str = include_str!("../../shardmap/tests/fixtures/one-host.nginx.conf");

#[test]
fn import_nginx_keeps_two_upstreams_on_one_host_apart() {
    let dir = tempfile::tempdir().unwrap();
    let conf = file(&dir, "nginx.conf", ONE_HOST);
    let out = seactl(&["import-nginx", &conf], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(map["default"], "dtable_server_a_z");
    assert_eq!(map["slots"]["0-9"], "dtable_server_0_9");
    assert_eq!(map["slots"]["a-f"], "dtable_server_a_z");
    assert!(
        err.contains("warning: upstream `dtable_server_a_z` (10.0.0.4:5000) shares its host")
            && err.contains("`dtable_server_0_9` (10.0.0.4:5001)"),
        "{err}"
    );
    // Merging them is the operator's to say, and said loudly.
    let out = seactl(
        &[
            "import-nginx",
            &conf,
            "--server",
            "dtable_server_a_z=ds",
            "--server",
            "dtable_server_0_9=ds",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("warning: MERGED by --server"), "{err}");
    // A name that leaves one of them no name of its own: an error naming both.
    let out = seactl(
        &[
            "import-nginx",
            &conf,
            "--server",
            "dtable_server_0_9=dtable_server_a_z",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`dtable_server_a_z` (10.0.0.4:5000) and `dtable_server_0_9` (10.0.0.4:5001)"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn audit_nginx_finds_bases_split_over_two_upstreams_on_one_host() {
    let dir = tempfile::tempdir().unwrap();
    let conf = file(&dir, "nginx.conf", ONE_HOST);
    // 80 bases reached both servers (the dashed form by the digit rule, the 32-hex
    // form by `default`), 20 only their owner.
    let mut log = String::new();
    for i in 0..100u32 {
        let uuid = format!("{i:08}-4b5a-4968-8776-655443322110");
        let mut entry = |target: &str, addr: &str| {
            log.push_str(&format!(
                "10.0.0.9 - - [01/Dec/2026:10:00:00 +0000] \"GET {target} HTTP/1.1\" 200 12 \"-\" \"ua\" \"{addr}\"\n"
            ))
        };
        entry(&format!("/api/v1/dtables/{uuid}/"), "10.0.0.4:5001");
        if i < 80 {
            let hex = uuid.replace('-', "");
            entry(&format!("/api/v1/internal/dtables/{hex}/"), "10.0.0.4:5000");
        }
    }
    let log = file(&dir, "access.log", &log);
    let out = audit_nginx(&conf, &log, &["--output", "json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["bases"], 100);
    assert_eq!(r["bases_at_risk"], 80);
    assert_eq!(r["requests_off_owner"], 80);
    assert_eq!(r["unknown_upstream_addrs"], serde_json::json!({}));
    let b = &r["at_risk"][0];
    assert_eq!(b["owner"], "dtable_server_0_9");
    assert_eq!(b["split"], true);
    assert_eq!(b["servers"][1]["server"], "dtable_server_a_z");
    assert_eq!(b["servers"][1]["addresses"]["10.0.0.4:5000"], 1);
    // Named alike on purpose, the two addresses still count as two dtable-servers.
    let out = audit_nginx(
        &conf,
        &log,
        &[
            "--server",
            "dtable_server_a_z=ds",
            "--server",
            "dtable_server_0_9=ds",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("100 bases; 80 at risk"), "{text}");
    assert!(
        text.contains("warning: import: MERGED by --server"),
        "{text}"
    );
    assert!(
        text.contains("at 10.0.0.4:5000 1, 10.0.0.4:5001 1"),
        "{text}"
    );
}

/// `envoy-bootstrap` run with `env`, its node id and exit status.
fn bootstrap_node_id(args: &[&str], env: &[(&str, Option<&str>)]) -> (Option<String>, Output) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_seactl"));
    cmd.arg("envoy-bootstrap").args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = yaml
        .lines()
        .find_map(|l| l.strip_prefix("  id: "))
        .map(str::to_owned);
    (id, out)
}

#[test]
fn envoy_bootstrap_derives_the_node_id_from_the_host_name() {
    let host = [("HOSTNAME", Some("Web_1.Example.com"))];
    for (args, want) in [
        (&["--kind", "edge"][..], "edge-web-1.example.com"),
        (&["--kind", "sidecar"][..], "sidecar-web-1.example.com"),
        (
            &["--kind", "guard", "--server", "dtable-server-2"][..],
            "guard-dtable-server-2-web-1.example.com",
        ),
        (&["--node-id", "edge-a"][..], "edge-a"),
    ] {
        let (id, out) = bootstrap_node_id(args, &host);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert_eq!(id.as_deref(), Some(want), "{args:?}");
    }
    // Without $HOSTNAME: the kernel's host name.
    let kernel = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let (id, out) = bootstrap_node_id(&[], &[("HOSTNAME", None)]);
    assert!(out.status.success(), "{out:?}");
    let id = id.unwrap();
    assert!(id.starts_with("edge-"), "{id}");
    assert_eq!(
        id.trim_start_matches("edge-"),
        kernel.trim().to_ascii_lowercase().replace('_', "-")
    );
    // A host name with nothing usable falls through to the next source, never to a
    // shared default.
    let (id, _) = bootstrap_node_id(&[], &[("HOSTNAME", Some("___"))]);
    assert_ne!(id.as_deref(), Some("edge-1"));
}

#[test]
fn envoy_bootstrap_of_a_guard_needs_its_server() {
    let (_, out) = bootstrap_node_id(&["--kind", "guard", "--node-id", "g"], &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
    // --server and --upstream belong to a guard.
    for args in [
        &["--server", "dtable-server-2", "--node-id", "e"][..],
        &["--upstream", "127.0.0.1:5001", "--node-id", "e"][..],
    ] {
        let (_, out) = bootstrap_node_id(args, &[]);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--kind guard"),
            "{out:?}"
        );
    }
    let (_, out) = bootstrap_node_id(
        &[
            "--kind",
            "guard",
            "--server",
            "dtable-server-2",
            "--node-id",
            "g",
            "--upstream",
            "10.0.0.7:5000",
            "--listen-port",
            "5000",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("- name: seashard.base_router.guard.dtable-server-2\n"));
    assert!(yaml.contains("socket_address: { address: 10.0.0.7, port_value: 5000 }"));
    assert!(!yaml.contains("cds_config"));
}
