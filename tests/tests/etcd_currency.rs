//! A replica that cannot show it is current hands no map: a control plane
//! (in-process) on a real etcd reached through a relay, with a real Envoy on its
//! ADS stream. Once the relay silently stops passing bytes, the replica ends the
//! Envoy's stream (the Envoy keeps its map) and answers REST polls `503
//! not_current`; once etcd answers again it serves again.

use std::time::Duration;

use anyhow::Result;
use control_plane::Config;
use seashard_tests::etcd::EtcdCluster;
use seashard_tests::relay::Relay;
use seashard_tests::replicas::envoy_map_version;
use seashard_tests::rollout::start_managed_envoy;
use seashard_tests::{loopback, wait_until};

mod common;

use common::{Cp, rest_poll};

/// Longer than a lease (`lease_ttl` 2 s) and a loaded machine.
const WAIT: Duration = Duration::from_secs(15);

fn config(endpoint: &str) -> Result<Config> {
    Ok(Config::parse(&common::etcd_config(
        &[endpoint.to_owned()],
        "/currency-test",
        "r0",
        "1s",
        &seashard_tests::wasm_file("base_router.wasm")?.to_string_lossy(),
        r#"
        [[server]]
        name = "dtable-server"
        address = "127.0.0.1:9"
        restart = { kind = "manual" }
        "#,
    ))?)
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
    assert_eq!(rest_poll(&cp, [127, 0, 0, 1], "rest-1", "").unwrap().0, 200);

    relay.cut();
    let (status, body) = wait_until(WAIT, "a REST poll to be refused", || {
        let (status, body) = rest_poll(&cp, [127, 0, 0, 1], "rest-1", "")?;
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
    assert_eq!(rest_poll(&cp, [127, 0, 0, 1], "rest-1", "").unwrap().0, 503);

    relay.heal();
    wait_until(WAIT, "REST polls to be answered again", || {
        Ok((rest_poll(&cp, [127, 0, 0, 1], "rest-1", "")?.0 == 200).then_some(()))
    })
    .unwrap();
    wait_until(Duration::from_secs(30), "the Envoy to be back", || {
        Ok(connected(&cp, "edge-currency").then_some(()))
    })
    .unwrap();
    cp.kill();
}
