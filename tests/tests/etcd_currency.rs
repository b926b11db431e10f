//! A replica that cannot show it is current hands no map: a control plane
//! (in-process) on a real etcd reached through a relay, with a real Envoy on its
//! ADS stream. Once the relay silently stops passing bytes, the replica ends the
//! Envoy's stream (the Envoy keeps its map) and answers REST polls `503
//! not_current`; once etcd answers again it serves again.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use anyhow::{Result, anyhow};
use control_plane::Config;
use seashard_tests::etcd::EtcdCluster;
use seashard_tests::relay::Relay;
use seashard_tests::replicas::envoy_map_version;
use seashard_tests::rollout::start_managed_envoy;
use seashard_tests::{loopback, wait_until};
use serde_json::{Value, json};

mod common;

use common::Cp;

/// Longer than a lease (`lease_ttl` 2 s) and a loaded machine.
const WAIT: Duration = Duration::from_secs(15);

fn config(endpoint: &str) -> Result<Config> {
    Ok(Config::parse(&format!(
        r#"
        [listen]
        grpc = "127.0.0.1:0"
        http = "127.0.0.1:0"
        [store]
        kind = "etcd"
        endpoints = ["{endpoint}"]
        prefix = "/currency-test"
        replica = "r0"
        lease_ttl = "2s"
        timeout = "1s"
        [api]
        token = "{token}"
        [filter]
        wasm = {wasm:?}
        [[server]]
        name = "dtable-server"
        address = "127.0.0.1:9"
        restart = {{ kind = "manual" }}
        "#,
        token = common::TOKEN,
        wasm = seashard_tests::wasm_file("base_router.wasm")?.to_string_lossy(),
    ))?)
}

/// One REST poll of ECDS: the HTTP status and the JSON body.
fn poll(cp: &Cp) -> Result<(u16, Value)> {
    let body = json!({"version_info": "", "node": {"id": "rest-1", "cluster": "edge"},
                      "resource_names": ["seashard.base_router"]})
    .to_string();
    let mut s = std::net::TcpStream::connect(cp.http)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "POST /v3/discovery:extension_configs HTTP/1.1\r\nhost: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        cp.http,
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or_default();
    Ok((status, body))
}

fn connected(cp: &Cp, id: &str) -> bool {
    cp.plane.registry().node(id).is_some_and(|n| n.connected)
}

#[test]
fn a_replica_cut_off_from_etcd_ends_its_streams_and_refuses_polls_until_etcd_answers() {
    let etcd = EtcdCluster::start(1).unwrap();
    let relay = Relay::start(etcd.client_addr(0), [127, 0, 0, 1].into()).unwrap();
    let cp = Cp::start(config(&format!("http://{}", relay.addr)).unwrap()).unwrap();
    let envoy = start_managed_envoy(
        &["--kind", "edge", "--node-id", "edge-currency"],
        cp.grpc,
        loopback(0),
    )
    .unwrap();
    let version = cp.plane.snapshot().map_version;
    wait_until(WAIT, "the Envoy to apply the map", || {
        Ok((envoy_map_version(&envoy)? == Some(version)).then_some(()))
    })
    .unwrap();
    assert_eq!(poll(&cp).unwrap().0, 200);

    relay.cut();
    let (status, body) = wait_until(WAIT, "a REST poll to be refused", || {
        let (status, body) = poll(&cp)?;
        Ok((status != 200 && status != 304).then_some((status, body)))
    })
    .unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "not_current", "{body}");
    wait_until(WAIT, "the Envoy's stream to end", || {
        Ok((!connected(&cp, "edge-currency")).then_some(()))
    })
    .unwrap();
    // It keeps the map it runs, and is not let back while etcd is silent.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(envoy_map_version(&envoy).unwrap(), Some(version));
    assert!(!connected(&cp, "edge-currency"));
    assert_eq!(poll(&cp).unwrap().0, 503);

    relay.heal();
    wait_until(WAIT, "REST polls to be answered again", || {
        Ok((poll(&cp)?.0 == 200).then_some(()))
    })
    .unwrap();
    wait_until(Duration::from_secs(30), "the Envoy to be back", || {
        Ok(connected(&cp, "edge-currency").then_some(()))
    })
    .unwrap();
    cp.kill();
}
