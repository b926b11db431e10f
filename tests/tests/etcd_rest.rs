//! REST pollers on two control plane replicas sharing one etcd, in-process on
//! loopback: a poller's records reach the other replica through the store, one
//! poller whose polls are spread over both replicas is one instance (no conflict),
//! and a second poller of its node id from another address, polling only the
//! follower, is a conflict the leader sees: a moving push gets `409`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use control_plane::Config;
use seashard_tests::etcd::EtcdCluster;
use seashard_tests::wait_until;
use serde_json::{Value, json};

mod common;

use common::{Cp, rest_poll};

fn config(endpoints: &[String], replica: &str) -> Result<Config> {
    Ok(Config::parse(&common::etcd_config(
        endpoints,
        "/rest-test",
        replica,
        "1s",
        "/opt/seashard/base-router.wasm",
        common::SERVERS_A_B,
    ))?)
}

/// One REST poll of ECDS by `id` from `source`: the HTTP status and the version
/// answered, if any.
fn poll(cp: &Cp, source: [u8; 4], id: &str, running: &str) -> Result<(u16, Option<String>)> {
    let (status, body) = rest_poll(cp, source, id, running)?;
    Ok((status, body["version_info"].as_str().map(str::to_owned)))
}

/// Polls until current: returns the version it runs.
fn poll_to_current(cp: &Cp, source: [u8; 4], id: &str, running: &str) -> Result<String> {
    let (status, sent) = poll(cp, source, id, running)?;
    let version = match (status, sent) {
        (200, Some(v)) => v,
        (304, _) => return Ok(running.to_owned()),
        other => return Err(anyhow!("poll answered {other:?}")),
    };
    let (status, _) = poll(cp, source, id, &version)?;
    anyhow::ensure!(status == 304, "an ACKed poll answered {status}");
    Ok(version)
}

fn conflicts(cp: &Cp) -> Result<Vec<Value>> {
    Ok(cp.get_json("/v1/nodes")?["conflicts"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

#[test]
fn rest_pollers_are_instances_across_replicas_and_a_second_one_on_the_follower_refuses_a_push()
-> Result<()> {
    let etcd = EtcdCluster::start(1)?;
    let a = Cp::start(config(&etcd.endpoints(), "a")?)?;
    wait_until(Duration::from_secs(10), "a to lead", || {
        Ok((a.status()?["leadership"]["role"] == "leader").then_some(()))
    })?;
    let b = Cp::start(config(&etcd.endpoints(), "b")?)?;
    wait_until(Duration::from_secs(10), "b to follow a", || {
        Ok((b.status()?["leadership"]["leader"]["replica"] == "a").then_some(()))
    })?;
    // One Envoy from 127.0.0.2 whose polls go to both replicas.
    let v = poll_to_current(&a, [127, 0, 0, 2], "rest-1", "")?;
    std::thread::sleep(Duration::from_millis(50));
    poll_to_current(&b, [127, 0, 0, 2], "rest-1", &v)?;
    let key = "rest-1@rest:127.0.0.2";
    wait_until(Duration::from_secs(10), "a to see b's record of it", || {
        let n = a.get_json(&format!("/v1/nodes/{key}"))?;
        Ok((n["replica"] == "b").then_some(()))
    })
    .context("b's REST record never reached a")?;
    assert!(conflicts(&a)?.is_empty(), "{:?}", conflicts(&a)?);
    assert!(conflicts(&b)?.is_empty(), "{:?}", conflicts(&b)?);

    // A second Envoy with that id polls only the follower, from 127.0.0.3.
    poll_to_current(&b, [127, 0, 0, 3], "rest-1", "")?;
    let c = wait_until(
        Duration::from_secs(10),
        "the leader to see the conflict",
        || {
            let c = conflicts(&a)?;
            Ok((!c.is_empty()).then_some(c))
        },
    )?;
    assert_eq!(c[0]["id"], "rest-1", "{c:?}");
    let (code, body) = a.post("/v1/maps", &json!({"map": {"default": "b"}}))?;
    assert_eq!(code, 409, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("rest-1@rest:127.0.0.3"), "{body}");
    assert!(error.contains(key), "{body}");
    a.kill();
    b.kill();
    Ok(())
}
