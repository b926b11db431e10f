//! The measured loss of percent-encoded bases, with writers counted against storage:
//! one client names each base two ways, plainly in the path and percent-encoded in
//! the query (`dtable%5Fuuid=` with `%2D` dashes and an encoded hex letter), as a
//! dtable-server (Express) decodes both. Through an edge with a guard in front of
//! each server, every spelling must reach the base's owner: before the filter
//! decoded, the encoded writes of `dtable-server-2`'s bases went to the default
//! server and passed its guard, and the two servers' saves overwrote each other.
//! The fake dtable-servers read bases as dtable-server does (`shardmap::extract`).

use std::net::SocketAddr;

use anyhow::Result;
use seashard_tests::dtable::{Cluster, Spelling, Writers, spread_bases};
use seashard_tests::fleet::write_config;
use seashard_tests::lost_writes::{BASES, ENVOY_SERVERS, Outcome, SAVE_INTERVAL, WAIT};
use seashard_tests::rollout::{ControlPlaneProcess, start_envoy, start_guard};
use seashard_tests::{free_port, loopback};

#[test]
fn encoded_and_plain_writes_of_one_base_reach_one_server_and_lose_nothing() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-encoded-")
        .tempdir()?;
    let mut cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let guards: Vec<SocketAddr> = (0..cluster.servers.len())
        .map(|_| free_port().map(loopback))
        .collect::<Result<_>>()?;
    let config = write_config(dir.path(), &cluster, http, grpc, Some(&guards))?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    let mut envoys = Vec::new();
    for (s, listen) in cluster.servers.iter().zip(&guards) {
        envoys.push(start_guard(s, &[], grpc, *listen)?);
    }
    let edge = start_envoy("edge-encoded", grpc)?;
    cp.wait_current(&[
        "edge-encoded",
        "guard-dtable-server",
        "guard-dtable-server-2",
    ])?;

    let bases = spread_bases(BASES);
    let writers = Writers::start_spelled(
        edge.listener_addr,
        &bases,
        4,
        50_000,
        Spelling::MixedEncoded,
    );
    writers.wait_for_more(2_000, WAIT)?;
    // Long enough for every server to save (every SAVE_INTERVAL) several times.
    std::thread::sleep(SAVE_INTERVAL * 3);
    writers.wait_for_more(500, WAIT)?;
    let log = writers.stop();
    let refused = log.refused.clone();
    drop((edge, envoys));
    let outcome = Outcome::from_logs(&mut cluster, vec![log])?;
    drop(cp);
    eprintln!(
        "encoded writes: {} (refused: {refused:?})",
        outcome.summary()
    );
    assert!(
        outcome.acknowledged >= 2_500,
        "too few writes: {}",
        outcome.summary()
    );
    // Every spelling was read as a base by the filter: nothing was refused.
    assert!(refused.is_empty(), "writes refused: {refused:?}");
    outcome.ensure_nothing_lost()
}
