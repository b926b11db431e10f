//! shardmap against a real nginx running SeaTable's documented proxy config.
//!
//! For every base addressed with its dashed uuid, the imported map must decide exactly
//! as nginx does. For the 32-hex form (in the path or in `dtable_uuid`) nginx's regexes
//! do not match and the base falls to `default`: a second owner, which is how edits are
//! lost. shardmap must send every form of a base to its one owner.

use std::collections::BTreeMap;

use seashard_tests::seatable_nginx::{self, served_by};
use seashard_tests::{Connection, Upstream, random_uuid, xorshift};
use shardmap::Router;

/// SeaTable's documented `nginx-proxy.conf` (routing part), with `{A}` and `{B}` for the
/// addresses of the two dtable-servers (see [`seatable_nginx::conf`]).
const SEATABLE_CONF: &str = r#"
worker_processes 1;
events { worker_connections 256; }
http {
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
{ROUTING}
    server {
        listen {LISTEN};
        keepalive_requests 100000;
        location / {
            proxy_pass http://$dtable_upstream;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection upgrade;
        }
    }
}
"#;

/// Deterministic uuids: a xorshift stream, plus the pinned base and near misses of it.
fn uuids(n: usize) -> Vec<String> {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let mut out: Vec<String> = (0..n).map(|_| random_uuid(&mut next).dashed()).collect();
    out.push("ff84e1a1-66e2-4d2c-9b3a-112233445566".into());
    out.push("FF84E1A1-66E2-4D2C-9B3A-112233445566".into());
    out.push("ff84e1a1-66e3-4d2c-9b3a-112233445566".into());
    out
}

#[test]
fn imported_map_decides_as_nginx_for_dashed_uuids_and_fixes_the_other_forms() {
    let a = Upstream::start("dtable-server").unwrap();
    let b = Upstream::start("dtable-server-2").unwrap();
    let (nginx, _) =
        seatable_nginx::start(SEATABLE_CONF, &a.addr.to_string(), &b.addr.to_string()).unwrap();

    // What an operator imports: the same config naming the servers by host.
    let documented = seatable_nginx::conf(
        SEATABLE_CONF,
        "dtable-server:5000",
        "dtable-server-2:5000",
        "5000",
    );
    let import = shardmap::nginx::import(&documented, &BTreeMap::new()).unwrap();
    assert!(import.warnings.is_empty(), "{:?}", import.warnings);
    let router = Router::new(&import.map).unwrap();

    let mut conn = Connection::open(nginx.addr).unwrap();
    let mut via_nginx =
        |uri: &str| served_by(&mut conn, &nginx, uri).unwrap_or_else(|e| panic!("{e:#}"));

    let (mut dashed, mut nginx_split, mut bases_split) = (0, 0, 0);
    for uuid in uuids(300) {
        let hex = uuid.replace('-', "");
        let dashed_forms = [
            format!("/dtable-server/api/v1/dtables/{uuid}/rows/?table_name=Table1"),
            format!("/api/v1/dtables/{}/", uuid.to_uppercase()),
            format!("/socket.io/?dtable_uuid={uuid}&EIO=4&transport=polling"),
        ];
        let owner = router.decide(&dashed_forms[0]).server.to_owned();
        for uri in &dashed_forms {
            assert_eq!(
                via_nginx(uri),
                router.decide(uri).server,
                "nginx and shardmap disagree on {uri}"
            );
            assert_eq!(router.decide(uri).server, owner, "{uri}");
            dashed += 1;
        }
        let other_forms = [
            format!("/api/v1/internal/dtables/{hex}/operations/"),
            format!("/socket.io/?dtable_uuid={hex}&EIO=4&transport=websocket"),
        ];
        let mut split = false;
        for uri in &other_forms {
            assert_eq!(
                router.decide(uri).server,
                owner,
                "shardmap sends {uri} away from its owner"
            );
            if via_nginx(uri) != owner {
                nginx_split += 1;
                split = true;
            }
        }
        bases_split += usize::from(split);
    }
    assert_eq!(dashed, 303 * 3);
    // Every base owned by dtable-server-2 (first digit 0-9, or pinned) reaches nginx's
    // default in its 32-hex forms: many bases, two owners each.
    assert!(bases_split > 100, "only {bases_split} bases split by nginx");
    eprintln!(
        "nginx sent {nginx_split} 32-hex requests ({bases_split} bases of 303) to a server other than the owner; shardmap: 0"
    );
}
