//! The harness itself, checked for real: the fake dtable-server, the HTTP
//! client, websocket upgrades, nginx and Envoy processes.

use std::time::Duration;

use seashard_tests::{Connection, Envoy, Nginx, Upstream, free_port, get, loopback};

/// A websocket through `proxy` reaches `dtable-server`, which echoes `line`.
fn assert_websocket_echoes(proxy: std::net::SocketAddr, line: &str) {
    let (_, mut ws) = Connection::open(proxy)
        .unwrap()
        .upgrade_websocket("/socket.io/?transport=websocket", &[])
        .unwrap();
    assert_eq!(ws.read_line().unwrap(), "dtable-server");
    ws.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(ws.read_line().unwrap(), line);
}

#[test]
fn echo_upstream_answers_ping_and_echoes_requests() {
    let up = Upstream::start("dtable-server").unwrap();
    assert!(up.addr.ip().is_loopback());

    let pong = get(up.addr, "/ping/", &[]).unwrap();
    assert_eq!(pong.status, 200);
    assert_eq!(pong.text(), "pong");
    assert_eq!(pong.header("x-served-by"), Some("dtable-server"));

    let path = "/dtable-server/api/v1/dtables/4a2c0b0e-1c1d-4f0a-9a57-0b6e4e1c2d3f/rows/?limit=5";
    let r = get(up.addr, path, &[("X-Test", "one"), ("x-test", "two")]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Served-By"), Some("dtable-server"));
    let j = r.json().unwrap();
    assert_eq!(j["server"], "dtable-server");
    assert_eq!(j["method"], "GET");
    assert_eq!(j["path"], path, "the request target, query included");
    assert_eq!(j["headers"]["x-test"], "one, two");
    assert_eq!(j["headers"]["host"], up.addr.to_string());
}

#[test]
fn echo_upstream_reads_bodies() {
    let up = Upstream::start("s").unwrap();
    let mut c = Connection::open(up.addr).unwrap();
    let r = c.request("POST", "/api/v1/x/", &[], b"{\"a\": 1}").unwrap();
    let j = r.json().unwrap();
    assert_eq!(
        (j["method"].as_str(), j["body"].as_str()),
        (Some("POST"), Some("{\"a\": 1}"))
    );
    // A chunked body, then another request on the same connection: the
    // framing was consumed exactly.
    let r = c
        .request(
            "PUT",
            "/chunked",
            &[("Transfer-Encoding", "chunked")],
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
    assert_eq!(r.json().unwrap()["body"], "abcde");
    assert_eq!(
        c.get("/after", &[]).unwrap().json().unwrap()["path"],
        "/after"
    );
}

#[test]
fn keep_alive_connection_is_reused() {
    let up = Upstream::start("s").unwrap();
    let mut c = Connection::open(up.addr).unwrap();
    let local = c.local_addr().unwrap().to_string();
    for i in 0..5 {
        let r = c.get(&format!("/r/{i}"), &[]).unwrap();
        let j = r.json().unwrap();
        assert_eq!(j["path"], format!("/r/{i}"));
        assert_eq!(j["peer"], local, "request {i} came on another connection");
    }
    assert_eq!(c.requests, 5);
    // A second connection is seen as another peer.
    let other = get(up.addr, "/", &[]).unwrap().json().unwrap();
    assert_ne!(other["peer"], local);
}

#[test]
fn connection_close_is_honoured() {
    let up = Upstream::start("s").unwrap();
    let mut c = Connection::open(up.addr).unwrap();
    let r = c.get("/", &[("Connection", "close")]).unwrap();
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.get("/", &[]).is_err(), "the server closed the connection");
}

#[test]
fn websocket_upgrade_then_echo() {
    let up = Upstream::start("dtable-server-2").unwrap();
    let (resp, mut ws) = Connection::open(up.addr)
        .unwrap()
        .upgrade_websocket("/socket.io/?dtable_uuid=x&transport=websocket", &[])
        .unwrap();
    assert_eq!(resp.status, 101);
    assert_eq!(resp.header("x-served-by"), Some("dtable-server-2"));
    assert_eq!(ws.read_line().unwrap(), "dtable-server-2");
    ws.write_all(b"hello\n").unwrap();
    assert_eq!(ws.read_line().unwrap(), "hello");
    ws.write_all(&[0, 1, 2, 255]).unwrap();
    assert_eq!(ws.read_exact(4).unwrap(), vec![0, 1, 2, 255]);
}

#[test]
fn stopped_upstream_refuses_connections() {
    let mut up = Upstream::start("s").unwrap();
    assert_eq!(get(up.addr, "/ping/", &[]).unwrap().text(), "pong");
    up.stop();
    assert!(get(up.addr, "/ping/", &[]).is_err());
    // ... and can be started again on the same address (a restarted server).
    let again = Upstream::start_on("s", up.addr).unwrap();
    assert_eq!(again.addr, up.addr);
    assert_eq!(get(again.addr, "/ping/", &[]).unwrap().text(), "pong");
}

fn nginx_conf(listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    upstream dtable_server {{ server {upstream}; keepalive 4; }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://dtable_server;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection upgrade;
            proxy_set_header X-Upstream-Server dtable_server;
        }}
    }}
}}
"#
    )
}

#[test]
fn nginx_proxies_to_an_echo_upstream() {
    let up = Upstream::start("dtable-server").unwrap();
    let listen = loopback(free_port().unwrap());
    let nginx =
        Nginx::start(&nginx_conf(listen, up.addr), listen).unwrap_or_else(|e| panic!("{e:#}"));

    let r = get(nginx.addr, "/api/v1/dtables/abc/?x=1", &[]).unwrap();
    assert_eq!(r.status, 200, "{}", nginx.logs());
    assert_eq!(r.header("x-served-by"), Some("dtable-server"));
    let j = r.json().unwrap();
    assert_eq!(j["path"], "/api/v1/dtables/abc/?x=1");
    assert_eq!(j["headers"]["x-upstream-server"], "dtable_server");

    assert_websocket_echoes(nginx.addr, "through nginx");
}

#[test]
fn nginx_with_a_bad_config_fails_with_its_error() {
    let listen = loopback(free_port().unwrap());
    let err = match Nginx::start("events {} http { no_such_directive on; }", listen) {
        Ok(_) => panic!("nginx accepted an invalid configuration"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no_such_directive"), "{err}");
}

fn passthrough_bootstrap(upstream: std::net::SocketAddr) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: plain
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          upgrade_configs: [{{ upgrade_type: websocket }}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: up, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: up
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: up
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
"#,
        ip = upstream.ip(),
        port = upstream.port()
    )
}

#[test]
fn envoy_starts_and_proxies_with_keep_alive_and_websockets() {
    let up = Upstream::start("dtable-server").unwrap();
    let envoy = Envoy::start(&passthrough_bootstrap(up.addr)).unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(envoy.listener_addr.port(), 0);
    assert_ne!(envoy.admin_addr.port(), 0);
    assert_eq!(envoy.admin_get("/ready").unwrap().text().trim(), "LIVE");

    let mut c = Connection::open(envoy.listener_addr).unwrap();
    for i in 0..3 {
        let r = c.get(&format!("/ping/{i}"), &[]).unwrap();
        assert_eq!(r.status, 200, "{}", envoy.logs());
        assert_eq!(r.header("x-served-by"), Some("dtable-server"));
    }
    assert_eq!(c.requests, 3);
    assert_eq!(
        envoy.stat("http.plain.downstream_cx_total").unwrap(),
        Some(1),
        "three requests, one downstream connection"
    );
    assert_eq!(envoy.stat("cluster.up.upstream_rq_200").unwrap(), Some(3));
    assert_eq!(envoy.stat("no.such.stat").unwrap(), None);

    assert_websocket_echoes(envoy.listener_addr, "through envoy");
}

#[test]
fn envoy_with_a_bad_bootstrap_fails_with_its_log() {
    let started = std::time::Instant::now();
    let err = match Envoy::start("static_resources: { no_such_field: 1 }\n") {
        Ok(_) => panic!("Envoy accepted an invalid bootstrap"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("no_such_field"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failure detected late"
    );
}
