//! `seactl audit-nginx` against a real nginx running SeaTable's documented proxy
//! config, with `$upstream_addr` appended to the `combined` log format.
//!
//! Generated traffic (dashed uuid in the path, 32-hex in the path, `dtable_uuid` in
//! the query, dashed and not) for a set of bases goes through nginx to two echo
//! upstreams; each answer says which upstream served it. The audit of nginx's access
//! log must report exactly the bases that reached two servers, or a server other
//! than their owner, with the counts the upstreams saw; so must a gzipped copy, the
//! log rotated into three files given in any order, a copy with malformed lines
//! (counted and skipped), and the log without `$upstream_addr` (predicted from the
//! map, which for these rules is what nginx did).
//!
//! All upstreams listen on 127.0.0.1, so named by no `--server` they share a host:
//! the audit must still tell them apart by port, and see a block balancing over two
//! of them as two dtable-servers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use seashard_tests::rollout::seactl_bin;
use seashard_tests::seatable_nginx::{self, served_by};
use seashard_tests::{Connection, Nginx, Upstream, random_uuid, wait_until, xorshift};
use serde_json::Value;
use shardmap::Router;
use tempfile::TempDir;

const CONF: &str = r#"
worker_processes 1;
events { worker_connections 256; }
http {
    log_format seatable '$remote_addr - $remote_user [$time_local] "$request" '
                        '$status $body_bytes_sent "$http_referer" "$http_user_agent" "$upstream_addr"';
    access_log logs/access.log seatable;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
{ROUTING}
    server {
        listen {LISTEN};
        location / {
            proxy_pass http://$dtable_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
"#;

const NAMES: [&str; 4] = [
    "--server",
    "dtable_server_a_z=dtable-server",
    "--server",
    "dtable_server_0_9=dtable-server-2",
];

fn uuids(n: usize) -> Vec<String> {
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut out: Vec<String> = (0..n).map(|_| random_uuid(&mut next).dashed()).collect();
    out.push("ff84e1a1-66e2-4d2c-9b3a-112233445566".into());
    out
}

fn audit(conf: &Path, logs: &[&Path]) -> Value {
    audit_named(conf, logs, &NAMES).0
}

/// The JSON report and the exit code of `seactl audit-nginx` with `names` flags.
fn audit_named(conf: &Path, logs: &[&Path], names: &[&str]) -> (Value, i32) {
    let out = Command::new(seactl_bin().unwrap())
        .arg("audit-nginx")
        .arg(conf)
        .args(logs)
        .args(names)
        .args(["--output", "json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 1)),
        "seactl audit-nginx: {:?}\n{stderr}",
        out.status
    );
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{stderr}", String::from_utf8_lossy(&out.stdout)));
    (report, code.unwrap_or(2))
}

/// SeaTable's nginx (with the servers `a` and `b` of each upstream) logging to
/// `logs/access.log`; its config text, also written to `nginx-proxy.conf` in a new
/// directory for `seactl audit-nginx`.
fn start_nginx(a: &str, b: &str) -> (Nginx, String, TempDir, PathBuf) {
    let (nginx, conf) = seatable_nginx::start(CONF, a, b).unwrap();
    let work = tempfile::tempdir().unwrap();
    let conf_path = work.path().join("nginx-proxy.conf");
    std::fs::write(&conf_path, &conf).unwrap();
    (nginx, conf, work, conf_path)
}

/// The name of the echo upstream that answered `uri` through nginx (200).
fn via_nginx(conn: &mut Connection, nginx: &Nginx, uri: &str) -> String {
    served_by(conn, nginx, uri).unwrap_or_else(|e| panic!("{e:#}"))
}

/// nginx's access log, once it has `requests` lines: its path and text.
fn access_log(nginx: &Nginx, requests: u64) -> (PathBuf, String) {
    let log = nginx.dir().join("logs/access.log");
    let text = wait_until(Duration::from_secs(10), "the access log", || {
        let t = std::fs::read_to_string(&log).unwrap_or_default();
        Ok((t.lines().count() as u64 == requests).then_some(t))
    })
    .unwrap();
    (log, text)
}

/// The report without what depends on the lines read rather than the requests.
fn requests_part(r: &Value) -> Value {
    let mut r = r.clone();
    for k in ["lines", "malformed", "malformed_total", "share_of_traffic"] {
        r.as_object_mut().unwrap().remove(k);
    }
    r
}

/// The requests for the base `uuid` (dashed), each with its shape (0: a dashed
/// path, 1: a 32-hex path, 2: socket.io): its rows and a socket.io poll, then, with
/// `hex`, its operations in the 32-hex form.
fn request_forms(uuid: &str, hex: bool) -> Vec<(usize, String)> {
    let mut forms = vec![
        (
            0,
            format!("/dtable-server/api/v1/dtables/{uuid}/rows/?table_name=T"),
        ),
        (
            2,
            format!("/socket.io/?dtable_uuid={uuid}&EIO=4&transport=polling"),
        ),
    ];
    if hex {
        let hex = uuid.replace('-', "");
        forms.push((1, format!("/api/v1/internal/dtables/{hex}/operations/")));
    }
    forms
}

#[test]
fn audit_matches_what_the_upstreams_served() {
    let a = Upstream::start("dtable-server").unwrap();
    let b = Upstream::start("dtable-server-2").unwrap();
    let (nginx, conf, work, conf_path) = start_nginx(&a.addr.to_string(), &b.addr.to_string());

    let names: BTreeMap<String, String> = BTreeMap::from([
        ("dtable_server_a_z".into(), "dtable-server".into()),
        ("dtable_server_0_9".into(), "dtable-server-2".into()),
    ]);
    let router = Router::new(&shardmap::nginx::import(&conf, &names).unwrap().map).unwrap();

    // Ground truth: base → server → (requests by shape), from the upstreams' answers.
    let mut truth: BTreeMap<String, BTreeMap<String, [u64; 3]>> = BTreeMap::new();
    let mut conn = Connection::open(nginx.addr).unwrap();
    let mut requests = 0u64;
    for (i, uuid) in uuids(40).iter().enumerate() {
        // Only some bases are ever addressed in the 32-hex forms.
        let mut forms = request_forms(uuid, i % 3 != 0);
        if i % 4 == 1 {
            let hex = uuid.replace('-', "");
            forms.push((2, format!("/socket.io/?EIO=4&dtable_uuid={hex}")));
        }
        for (shape, uri) in forms {
            let server = via_nginx(&mut conn, &nginx, &uri);
            truth
                .entry(uuid.clone())
                .or_default()
                .entry(server)
                .or_default()[shape] += 1;
            requests += 1;
        }
    }
    for _ in 0..5 {
        assert_eq!(conn.get("/ping/", &[]).unwrap().status, 200);
        requests += 1;
    }

    let (log, text) = access_log(&nginx, requests);

    // What the report must say.
    let mut at_risk = BTreeSet::new();
    let mut affected = 0;
    for (base, servers) in &truth {
        let owner = router.owner_of(&shardmap::BaseUuid::parse(base).unwrap());
        if servers.len() > 1 || servers.keys().any(|s| s != owner) {
            at_risk.insert(base.clone());
            affected += servers.values().flatten().sum::<u64>();
        }
    }
    assert!(
        at_risk.len() > 10,
        "too few bases at risk: {}",
        at_risk.len()
    );
    eprintln!(
        "{} of {} bases at risk, {affected} requests",
        at_risk.len(),
        truth.len()
    );

    let report = audit(&conf_path, &[&log]);
    assert_eq!(report["mode"], "observed");
    assert_eq!(report["requests"], requests);
    assert_eq!(report["malformed_total"], 0);
    assert_eq!(report["without_base"], 5);
    assert_eq!(report["bases"], truth.len());
    assert_eq!(report["bases_at_risk"], at_risk.len());
    assert_eq!(report["requests_affected"], affected);
    assert_eq!(report["unknown_upstream_addrs"], serde_json::json!({}));
    for b in report["at_risk"].as_array().unwrap() {
        let base = b["base"].as_str().unwrap();
        assert!(at_risk.contains(base), "{base} reported, not at risk");
        let want = &truth[base];
        let got: BTreeMap<String, [u64; 3]> = b["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let sh = &s["shapes"];
                let n = |k: &str| sh[k].as_u64().unwrap();
                assert_eq!(n("other"), 0);
                assert!(s["first"].as_str().unwrap() <= s["last"].as_str().unwrap());
                (
                    s["server"].as_str().unwrap().to_owned(),
                    [n("path-dashed"), n("path-hex32"), n("query-dtable_uuid")],
                )
            })
            .collect();
        assert_eq!(&got, want, "{base}");
    }

    // Gzipped.
    let gz = work.path().join("access.log.gz");
    let status = Command::new("gzip")
        .arg("-c")
        .arg(&log)
        .stdout(std::fs::File::create(&gz).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(audit(&conf_path, &[&gz]), report, "gzipped");

    // Rotated into three files (the oldest gzipped), given in any order.
    let lines: Vec<&str> = text.lines().collect();
    let third = lines.len() / 3;
    let part = |name: &str, ls: &[&str]| {
        let p = work.path().join(name);
        std::fs::write(&p, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        p
    };
    let old = part("access.log.2", &lines[..third]);
    let status = Command::new("gzip").arg(&old).status().unwrap();
    assert!(status.success());
    let old = work.path().join("access.log.2.gz");
    let mid = part("access.log.1", &lines[third..2 * third]);
    let new = part("access.log", &lines[2 * third..]);
    assert_eq!(audit(&conf_path, &[&mid, &old, &new]), report, "rotated");

    // Malformed lines: counted and skipped.
    let mut bad = lines.clone();
    bad.insert(3, "garbage");
    bad.insert(
        10,
        "127.0.0.1 - - [01/Dec/2026:10:00:00 +0000] \"\\x16\\x03\\x01\" 400 0 \"-\" \"-\" \"-\"",
    );
    bad.insert(20, "");
    bad.push("127.0.0.1 - - [01/Dec/2026:10:00");
    let with_bad = part("access.bad.log", &bad);
    let r = audit(&conf_path, &[&with_bad]);
    assert_eq!(r["malformed_total"], 3);
    assert_eq!(r["lines"], requests + 3);
    assert_eq!(requests_part(&r), requests_part(&report), "malformed");

    // Without $upstream_addr the report is a prediction from nginx's map: for these
    // rules the same as what nginx did.
    let plain: Vec<String> = lines
        .iter()
        .map(|l| l.rsplit_once(" \"").unwrap().0.to_owned())
        .collect();
    let plain_refs: Vec<&str> = plain.iter().map(String::as_str).collect();
    let predicted = audit(&conf_path, &[&part("access.combined.log", &plain_refs)]);
    assert_eq!(predicted["mode"], "predicted");
    let mut p = requests_part(&predicted);
    let mut o = requests_part(&report);
    for v in [&mut p, &mut o] {
        let m = v.as_object_mut().unwrap();
        m.remove("mode");
        m.remove("observed");
        m.remove("predicted");
        // A prediction names servers, not their addresses.
        for b in m["at_risk"].as_array_mut().unwrap() {
            for sv in b["servers"].as_array_mut().unwrap() {
                sv.as_object_mut().unwrap().remove("addresses");
            }
        }
    }
    assert_eq!(p, o, "predicted");
}

#[test]
fn upstreams_on_one_host_and_a_balancing_block_are_told_apart() {
    let a = Upstream::start("dtable-server").unwrap();
    let b = Upstream::start("dtable-server-2").unwrap();
    let c = Upstream::start("dtable-server-3").unwrap();
    for u in [&b, &c] {
        assert_eq!(u.addr.ip(), a.addr.ip(), "one host");
    }
    // nginx balances `dtable_server_0_9` round robin over b and c.
    let (nginx, conf, _work, conf_path) = start_nginx(
        &a.addr.to_string(),
        &format!("{}; server {}", b.addr, c.addr),
    );

    // Named by no --server: each block by its own name (they share their host).
    let import = shardmap::nginx::import(&conf, &BTreeMap::new()).unwrap();
    let router = Router::new(&import.map).unwrap();
    let block_of: BTreeMap<String, (&str, String)> = BTreeMap::from([
        (a.name.clone(), ("dtable_server_a_z", a.addr.to_string())),
        (b.name.clone(), ("dtable_server_0_9", b.addr.to_string())),
        (c.name.clone(), ("dtable_server_0_9", c.addr.to_string())),
    ]);

    // Ground truth: base → server → address → requests, from the upstreams' answers.
    let mut truth: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> = BTreeMap::new();
    let mut conn = Connection::open(nginx.addr).unwrap();
    let mut requests = 0u64;
    for (i, uuid) in uuids(40).iter().enumerate() {
        for (_, uri) in request_forms(uuid, i % 2 == 0) {
            let (server, addr) = &block_of[&via_nginx(&mut conn, &nginx, &uri)];
            *truth
                .entry(uuid.clone())
                .or_default()
                .entry(server.to_string())
                .or_default()
                .entry(addr.clone())
                .or_default() += 1;
            requests += 1;
        }
    }
    let (log, _) = access_log(&nginx, requests);

    let (mut split, mut balanced) = (BTreeSet::new(), BTreeSet::new());
    for (base, servers) in &truth {
        let owner = router.owner_of(&shardmap::BaseUuid::parse(base).unwrap());
        if servers.values().any(|addrs| addrs.len() > 1) {
            balanced.insert(base.clone());
        }
        if servers.len() > 1 || servers.keys().any(|s| s != owner) {
            split.insert(base.clone());
        }
    }
    eprintln!(
        "{} bases: {} on two blocks of one host or off their owner, {} balanced over two servers of one block",
        truth.len(),
        split.len(),
        balanced.len()
    );
    assert!(
        split.len() > 5 && balanced.len() > 5,
        "{split:?} {balanced:?}"
    );

    let (report, code) = audit_named(&conf_path, &[&log], &[]);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["mode"], "observed");
    assert_eq!(report["unknown_upstream_addrs"], serde_json::json!({}));
    assert_eq!(report["bases"], truth.len());
    let at_risk: BTreeSet<String> = split.union(&balanced).cloned().collect();
    assert_eq!(report["bases_at_risk"], at_risk.len(), "{report:#}");
    assert_eq!(report["bases_balanced"], balanced.len());
    for r in report["at_risk"].as_array().unwrap() {
        let base = r["base"].as_str().unwrap();
        assert_eq!(r["balanced"], balanced.contains(base), "{base}");
        let got: BTreeMap<String, BTreeMap<String, u64>> = r["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["server"].as_str().unwrap().to_owned(),
                    serde_json::from_value(s["addresses"].clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(got, truth[base], "{base}");
    }
    // Named one server on purpose, the two blocks still count as their addresses.
    let (merged, code) = audit_named(
        &conf_path,
        &[&log],
        &[
            "--server",
            "dtable_server_a_z=ds",
            "--server",
            "dtable_server_0_9=ds",
        ],
    );
    assert_eq!(code, 1);
    assert!(
        merged["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("MERGED")),
        "{merged:#}"
    );
    let reached_two = truth
        .values()
        .filter(|servers| servers.values().map(BTreeMap::len).sum::<usize>() > 1)
        .count();
    assert_eq!(merged["bases_at_risk"], reached_two, "{merged:#}");
}
