use std::collections::BTreeMap;
use std::io::Write;

use super::*;

/// SeaTable's documented `map $request_uri` (in `seatable-map.conf`, shared with the
/// bench) behind two upstreams.
const CONF: &str = concat!(
    "\nhttp {\n",
    "    upstream dtable_server_a_z { server dtable-server:5000; keepalive 15; }\n",
    "    upstream dtable_server_0_9 { server 10.0.0.5:5000; server [2001:db8::5]:5000; }\n",
    include_str!("seatable-map.conf"),
    "}\n",
);

const DIGIT: &str = "0f1e2d3c-4b5a-4968-8776-655443322110";
const LETTER: &str = "a1b2c3d4-5e6f-4a0b-8c9d-0e1f2a3b4c5d";
const PIN: &str = "ff84e1a1-66e2-4d2c-9b3a-112233445566";

/// The audit of `conf` with `names` (`--server`), `resolve` and `extra` (`--upstream`).
fn audit_of(
    conf: &str,
    names: &BTreeMap<String, String>,
    resolve: impl FnMut(&shardmap::nginx::UpstreamBlock, &str) -> Vec<String>,
    extra: &[(String, String)],
) -> Audit {
    let imported = shardmap::nginx::import(conf, names).unwrap().map;
    let nginx = shardmap::nginx::nginx_map(conf, names).unwrap();
    Audit::new(&imported, &nginx, resolve, extra).unwrap()
}

fn audit() -> Audit {
    let names = BTreeMap::from([(
        "dtable_server_0_9".to_string(),
        "dtable-server-2".to_string(),
    )]);
    let extra = [("10.0.0.4:5000".to_string(), "dtable-server".to_string())];
    audit_of(CONF, &names, |_, _| Vec::new(), &extra)
}

fn line(second: u32, target: &str, upstream: &str) -> String {
    format!(
        r#"10.0.0.9 - - [01/Dec/2026:10:00:{second:02} +0000] "GET {target} HTTP/1.1" 200 12 "-" "ua"{upstream}"#
    )
}

/// Feeds `a` a log line for each (second, target, upstream).
fn log_lines(a: &mut Audit, requests: &[(u32, String, &str)]) {
    for (second, target, upstream) in requests {
        a.line(&line(*second, target, upstream));
    }
}

#[test]
fn shapes() {
    let hex = DIGIT.replace('-', "");
    let s = |t: &str| base_and_shape(t).map(|(_, s)| s);
    assert_eq!(
        s(&format!("/api/v1/dtables/{DIGIT}/rows/")),
        Some(Shape::PathDashed)
    );
    assert_eq!(
        s(&format!("/api/v1/internal/dtables/{hex}/operations/")),
        Some(Shape::PathHex32)
    );
    assert_eq!(
        s(&format!("/socket.io/?EIO=4&dtable_uuid={DIGIT}")),
        Some(Shape::QueryOnly)
    );
    assert_eq!(s("/ping/"), None);
}

#[test]
fn predicted_split_from_the_32_hex_form() {
    let mut a = audit();
    let hex = DIGIT.replace('-', "");
    a.line(&line(1, &format!("/api/v1/dtables/{DIGIT}/"), ""));
    a.line(&line(2, &format!("/socket.io/?dtable_uuid={DIGIT}"), ""));
    a.line(&line(
        3,
        &format!("/api/v1/internal/dtables/{hex}/ops/"),
        "",
    ));
    a.line(&line(4, &format!("/api/v1/dtables/{LETTER}/"), ""));
    a.line(&line(5, &format!("/x/{}/", LETTER.replace('-', "")), ""));
    a.line(&line(6, "/ping/", ""));
    a.line("not a log line");
    let r = a.report();
    assert_eq!(r.mode, "predicted");
    assert_eq!((r.lines, r.requests, r.malformed_total), (7, 6, 1));
    assert_eq!((r.without_base, r.bases, r.bases_at_risk), (1, 2, 1));
    assert_eq!((r.requests_affected, r.requests_off_owner), (3, 1));
    assert!((r.share_of_traffic - 0.5).abs() < 1e-9);
    let b = &r.at_risk[0];
    assert_eq!(b.base, DIGIT);
    assert_eq!(b.owner, "dtable-server-2");
    assert!(b.split);
    assert_eq!(b.causes.path_hex32, 1);
    assert_eq!(b.servers[0].server, "dtable-server-2");
    assert_eq!(b.servers[0].requests, 2);
    assert_eq!(b.servers[0].shapes.query_only, 1);
    assert_eq!(b.servers[1].server, "dtable-server");
    assert_eq!(b.first.to_string(), "2026-12-01T10:00:01+00:00");
    assert_eq!(b.last.to_string(), "2026-12-01T10:00:03+00:00");
}

#[test]
fn observed_upstreams_ipv6_dash_and_unknown() {
    let mut a = audit();
    a.line(&line(
        9,
        &format!("/api/v1/dtables/{PIN}/"),
        " [2001:db8::5]:5000",
    ));
    a.line(&line(
        1,
        &format!("/api/v1/dtables/{PIN}/"),
        " \"10.0.0.4:5000\"",
    ));
    a.line(&line(
        2,
        &format!("/api/v1/dtables/{LETTER}/"),
        " 10.0.0.4:5000",
    ));
    a.line(&line(3, &format!("/api/v1/dtables/{LETTER}/"), " -"));
    // A retry: both servers saw the request.
    a.line(&line(
        4,
        &format!("/api/v1/dtables/{DIGIT}/"),
        " \"10.0.0.4:5000, 10.0.0.5:5000\"",
    ));
    a.line(&line(
        5,
        &format!("/api/v1/dtables/{LETTER}/"),
        " 192.0.2.1:5000",
    ));
    let r = a.report();
    assert_eq!(r.mode, "observed");
    assert_eq!((r.requests, r.observed, r.no_upstream), (6, 5, 1));
    assert_eq!(r.unknown_upstream_addrs.get("192.0.2.1:5000"), Some(&1));
    assert_eq!(r.bases_at_risk, 3);
    let by: BTreeMap<_, _> = r.at_risk.iter().map(|b| (b.base.as_str(), b)).collect();
    let pin = by[PIN];
    assert_eq!(pin.owner, "dtable-server-2");
    assert_eq!(pin.first.to_string(), "2026-12-01T10:00:01+00:00");
    assert_eq!(pin.last.to_string(), "2026-12-01T10:00:09+00:00");
    assert_eq!(by[DIGIT].servers.len(), 2);
    let letter: Vec<_> = by[LETTER]
        .servers
        .iter()
        .map(|s| s.server.as_str())
        .collect();
    assert_eq!(letter, ["192.0.2.1:5000", "dtable-server"]);
    assert_eq!(by[LETTER].off_owner, 1);
    assert!(r.to_text().contains("--upstream 192.0.2.1:5000=SERVER"));
}

#[test]
fn a_base_on_its_owner_only_is_not_at_risk() {
    let mut a = audit();
    for i in 0..5 {
        a.line(&line(
            i,
            &format!("/api/v1/dtables/{DIGIT}/"),
            " 10.0.0.5:5000",
        ));
    }
    let r = a.report();
    assert_eq!((r.bases, r.bases_at_risk, r.requests_affected), (1, 0, 0));
}

#[test]
fn feed_reads_plain_gzip_long_and_binary_lines_alike() {
    let mut log = String::new();
    for i in 0..10 {
        log.push_str(&line(
            i,
            &format!("/api/v1/dtables/{DIGIT}/"),
            " 10.0.0.4:5000",
        ));
        log.push('\n');
    }
    let mut bytes = log.clone().into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
    bytes.extend(b"\n\xff\xfe\n\n");
    bytes.extend(line(30, &format!("/api/v1/dtables/{DIGIT}/"), " 10.0.0.5:5000").as_bytes());
    let mut plain = audit();
    feed(&mut plain, bytes.as_slice()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&bytes).unwrap();
    let gz = gz.finish().unwrap();
    let mut zipped = audit();
    feed(&mut zipped, gz.as_slice()).unwrap();
    let r = plain.report();
    assert_eq!(r, zipped.report());
    assert_eq!((r.lines, r.requests, r.malformed_total), (13, 11, 2));
    assert_eq!(r.bases_at_risk, 1);
    assert_eq!(r.at_risk[0].off_owner, 10);
}

#[test]
fn map_on_uri_and_exact_keys() {
    let conf =
        r#"map $uri $u { default a; "/Exact/0f1e2d3c-4b5a-4968-8776-655443322110/" b; "~^/q" c; }"#;
    let nginx = shardmap::nginx::nginx_map(conf, &BTreeMap::new()).unwrap();
    let (p, warnings) = Predictor::new(&nginx);
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        p.server("/exact/0F1E2D3C-4b5a-4968-8776-655443322110/?x=1"),
        "b"
    );
    assert_eq!(p.server("/q?x"), "c");
    assert_eq!(p.server("/Q"), "a");
}

/// Two dtable-servers on one host (nginx picks by port), and a block balancing over two.
const ONE_HOST: &str = r#"
http {
    upstream dtable_server_a_z { server 10.0.0.4:5000; }
    upstream dtable_server_0_9 { server 10.0.0.4:5001; }
    upstream dtable_server_ff { server 10.0.0.6:5000; server 10.0.0.7:5000; }
    map $request_uri $dtable_upstream {
        default dtable_server_a_z;
        "~*ff84e1a1-66e2" dtable_server_ff;
        "~*([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_a_z;
        "~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_0_9;
    }
}
"#;

fn one_host_audit(names: &[(&str, &str)]) -> Audit {
    let names: BTreeMap<String, String> = names
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    audit_of(ONE_HOST, &names, |_, _| Vec::new(), &[])
}

#[test]
fn two_upstreams_on_one_host_are_two_servers() {
    let mut a = one_host_audit(&[]);
    let hex = DIGIT.replace('-', "");
    log_lines(
        &mut a,
        &[
            (1, format!("/api/v1/dtables/{DIGIT}/"), " 10.0.0.4:5001"),
            (
                2,
                format!("/api/v1/internal/dtables/{hex}/"),
                " 10.0.0.4:5000",
            ),
            (3, format!("/api/v1/dtables/{LETTER}/"), " 10.0.0.4:5000"),
        ],
    );
    let r = a.report();
    assert_eq!(r.unknown_upstream_addrs, BTreeMap::new());
    assert_eq!((r.bases, r.bases_at_risk), (2, 1), "{}", r.to_text());
    let b = &r.at_risk[0];
    assert_eq!(b.base, DIGIT);
    assert!(b.split && !b.balanced);
    assert_eq!(b.owner, "dtable_server_0_9");
    let servers: Vec<_> = b.servers.iter().map(|s| s.server.as_str()).collect();
    assert_eq!(servers, ["dtable_server_0_9", "dtable_server_a_z"]);
    assert_eq!(
        b.servers[1].addresses,
        BTreeMap::from([("10.0.0.4:5000".to_string(), 1)])
    );
}

#[test]
fn a_base_on_several_addresses_of_one_block_is_split() {
    let mut a = one_host_audit(&[]);
    for (i, addr) in ["10.0.0.6:5000", "10.0.0.7:5000", "10.0.0.6:5000"]
        .iter()
        .enumerate()
    {
        a.line(&line(
            i as u32,
            &format!("/api/v1/dtables/{PIN}/"),
            &format!(" {addr}"),
        ));
    }
    // Another base of that block, on one of its addresses only: not at risk.
    let other = "ff84e1a1-66e2-4000-8000-000000000001";
    a.line(&line(
        9,
        &format!("/api/v1/dtables/{other}/"),
        " 10.0.0.7:5000",
    ));
    let r = a.report();
    assert_eq!(
        (r.bases, r.bases_at_risk, r.bases_balanced),
        (2, 1, 1),
        "{}",
        r.to_text()
    );
    let b = &r.at_risk[0];
    assert_eq!(b.base, PIN);
    assert!(b.split && b.balanced);
    assert_eq!(b.off_owner, 0);
    assert_eq!(b.servers.len(), 1);
    assert_eq!(
        b.servers[0].addresses,
        BTreeMap::from([
            ("10.0.0.6:5000".to_string(), 2),
            ("10.0.0.7:5000".to_string(), 1)
        ])
    );
    let text = r.to_text();
    assert!(text.contains("10.0.0.6:5000 2, 10.0.0.7:5000 1"), "{text}");
    assert!(text.contains("several addresses of one server"), "{text}");
}

#[test]
fn upstreams_merged_by_server_names_are_still_counted_apart() {
    let mut a = one_host_audit(&[("dtable_server_a_z", "ds"), ("dtable_server_0_9", "ds")]);
    log_lines(
        &mut a,
        &[
            (1, format!("/api/v1/dtables/{DIGIT}/"), " 10.0.0.4:5001"),
            (2, format!("/api/v1/dtables/{DIGIT}/"), " 10.0.0.4:5000"),
        ],
    );
    let r = a.report();
    assert_eq!(
        (r.bases_at_risk, r.bases_balanced),
        (1, 1),
        "{}",
        r.to_text()
    );
    assert_eq!(r.at_risk[0].servers[0].server, "ds");
    assert_eq!(r.at_risk[0].servers[0].addresses.len(), 2);
}

#[test]
fn resolved_host_names_count_as_their_server_line() {
    let conf = ONE_HOST
        .replace("10.0.0.4:5000", "dtable-server:5000")
        .replace("10.0.0.4:5001", "dtable-server:5001");
    let resolve = |_: &shardmap::nginx::UpstreamBlock, a: &str| match a {
        "dtable-server:5000" => vec!["172.18.0.3:5000".to_string(), "[fd00::3]:5000".to_string()],
        "dtable-server:5001" => vec!["172.18.0.3:5001".to_string()],
        _ => Vec::new(),
    };
    let mut a = audit_of(&conf, &BTreeMap::new(), resolve, &[]);
    log_lines(
        &mut a,
        &[
            (1, format!("/api/v1/dtables/{LETTER}/"), " 172.18.0.3:5000"),
            (2, format!("/api/v1/dtables/{LETTER}/"), " [fd00::3]:5000"),
            (
                3,
                format!("/api/v1/dtables/{DIGIT}/"),
                " 172.18.0.3:5000, 172.18.0.3:5001",
            ),
        ],
    );
    let r = a.report();
    assert_eq!(r.unknown_upstream_addrs, BTreeMap::new());
    assert_eq!(r.bases_at_risk, 1, "{}", r.to_text());
    assert_eq!(r.at_risk[0].base, DIGIT);
    let servers: Vec<_> = r.at_risk[0]
        .servers
        .iter()
        .map(|s| s.server.as_str())
        .collect();
    assert_eq!(servers, ["dtable_server_0_9", "dtable_server_a_z"]);
}

#[test]
fn one_address_in_two_blocks_of_different_names_is_warned_about() {
    let names = BTreeMap::from([("dtable_server_0_9".to_string(), "b".to_string())]);
    let conf = ONE_HOST.replace("10.0.0.4:5001", "10.0.0.4:5000");
    let a = audit_of(&conf, &names, |_, _| Vec::new(), &[]);
    assert_eq!(
        a.report().warnings,
        [
            "10.0.0.4:5000 is a server of upstreams `dtable_server_a_z` (server `10.0.0.4`) and `dtable_server_0_9` (server `b`): counted under `10.0.0.4`"
        ]
    );
    // Without names they are one server, listed twice: nothing to say.
    let a = audit_of(&conf, &BTreeMap::new(), |_, _| Vec::new(), &[]);
    assert_eq!(a.report().warnings, Vec::<String>::new());
}
