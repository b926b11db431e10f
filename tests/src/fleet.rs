//! Fleet safety: a rollout while one edge Envoy is cut off from the control plane and
//! keeps serving writers, with or without guards, with its own node id or sharing
//! one with the other edge (a copied bootstrap).
//!
//! ```text
//! writers ──▶ edge A (own link) ─────────────────────────────▶ seactl serve
//! writers ──▶ edge B ──▶ relay (cut: swallows every byte) ────▶     │
//!                │  ╲                                          ECDS to guards
//!                ▼   ╲                                              │
//!   [guard of dtable-server]   [guard of dtable-server-2]   ◀───────┘
//!                ▼                         ▼
//!         dtable-server             dtable-server-2          (fake, saving every 2 s)
//! ```
//!
//! The map change moves bases 4-7 from the first server to the second. Counting
//! acknowledged writes against storage (as the lost-write experiment does) tells
//! whether any base was open on two servers.
//!
//! Every Envoy takes its configuration over ADS (gRPC) or by REST polling
//! ([`Xds`]): the REST run is the same experiment with B's polls (not a stream)
//! going through the relay, from 127.0.0.2.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;

use crate::dtable::{Cluster, WriteLog, spread_bases};
use crate::lost_writes::{
    BASES, ENVOY_SERVERS, Outcome, SAVE_INTERVAL, WAIT, wait_until_a_moved_base_is_loaded_by,
    write_then_cut,
};
use crate::relay::Relay;
use crate::rollout::{
    ControlPlaneProcess, ServeConfig, new_map, old_map, server_table, slow_hook, start_guard,
    start_managed_envoy,
};
use crate::{Envoy, free_port, loopback, wait_until};

/// How long the control plane waits for ACKs before rolling back.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(6);

/// One case of the experiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    /// The cut-off edge uses the other edge's node id.
    pub shared_id: bool,
    /// A guard in front of each dtable-server, every server `guarded`.
    pub guards: bool,
}

/// How every Envoy of a run takes its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xds {
    /// One ADS stream (gRPC) to the control plane's gRPC port.
    Grpc,
    /// REST-JSON polling of the control plane's HTTP API.
    Rest,
}

/// What one run did.
#[derive(Debug)]
pub struct Run {
    /// `done`, `rolled_back`, or `refused` (the push answered 409).
    pub state: String,
    /// Why it was refused or rolled back.
    pub reason: Option<String>,
    /// From the push to the rollout's end (or the refusal).
    pub elapsed: Duration,
    pub outcome: Outcome,
    /// The writes through the cut-off edge that were refused, by HTTP status.
    pub cut_off_refused: std::collections::BTreeMap<u16, usize>,
}

/// The control plane's configuration: servers reached through their guards when
/// `guards` holds the guards' listen addresses.
pub fn write_config(
    dir: &Path,
    cluster: &Cluster,
    http: SocketAddr,
    grpc: SocketAddr,
    guards: Option<&[SocketAddr]>,
) -> Result<PathBuf> {
    let mut servers = String::new();
    for (i, s) in cluster.servers.iter().enumerate() {
        let address = match guards {
            Some(g) => *g.get(i).ok_or_else(|| anyhow!("no guard for {}", s.name))?,
            None => s.addr,
        };
        let guarded = format!("guarded = {}\n", guards.is_some());
        servers += &server_table(&s.name, address, &guarded, &slow_hook(s.restart_hook()?))?;
    }
    ServeConfig {
        initial_map: old_map(),
        listen: "keepalive_interval = \"2s\"\nkeepalive_timeout = \"2s\"\n",
        store: "path = \"seashard.db\"\n",
        rollout: &format!(
            "ack_timeout = \"{}s\"\nhealth_timeout = \"15s\"\nrestart_timeout = \"30s\"\n",
            ACK_TIMEOUT.as_secs()
        ),
        servers,
    }
    .write(dir, http, grpc)
}

/// The connected instances and their ECDS state, from `/v1/nodes`.
fn instances(cp: &ControlPlaneProcess) -> Result<Vec<(String, String)>> {
    let nodes = cp.get_json("/v1/nodes")?;
    Ok(nodes["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["connected"] == true)
        .map(|n| {
            (
                n["instance"].as_str().unwrap_or_default().to_owned(),
                n["state"]["ecds"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// Runs one case over ADS: see the module doc.
pub fn run(case: Case) -> Result<Run> {
    run_with(case, Xds::Grpc)
}

/// Runs one case, every Envoy configured over `xds`: see the module doc.
pub fn run_with(case: Case, xds: Xds) -> Result<Run> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-fleet-")
        .tempdir()?;
    let mut cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    let guard_addrs: Vec<SocketAddr> = if case.guards {
        (0..cluster.servers.len())
            .map(|_| free_port().map(loopback))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let config = write_config(
        dir.path(),
        &cluster,
        http,
        grpc,
        case.guards.then_some(guard_addrs.as_slice()),
    )?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    // Where Envoys get their configuration, and how they are told to.
    let (source, over): (SocketAddr, &[&str]) = match xds {
        Xds::Grpc => (grpc, &[]),
        Xds::Rest => (http, &["--xds", "rest"]),
    };
    let edge = |node_id: &str, cp: SocketAddr| {
        let mut args = vec!["--kind", "edge", "--node-id", node_id];
        args.extend(over);
        start_managed_envoy(&args, cp, loopback(0))
    };
    let mut envoys: Vec<Envoy> = Vec::new();
    for (s, listen) in cluster.servers.iter().zip(&guard_addrs) {
        envoys.push(start_guard(s, over, source, *listen)?);
    }
    let edge_a = edge("edge-a", source)?;
    // B reaches the control plane through the relay, from 127.0.0.2: another host.
    let relay = Relay::start(source, [127, 0, 0, 2].into())?;
    let edge_b = edge(if case.shared_id { "edge-a" } else { "edge-b" }, relay.addr)?;
    let expected = 2 + guard_addrs.len();
    wait_until(WAIT, &format!("{expected} Envoys to be current"), || {
        let i = instances(&cp)?;
        Ok((i.len() == expected && i.iter().all(|(_, s)| s == "current")).then_some(()))
    })
    .with_context(|| cp.logs())?;

    // B's link dies silently; B keeps serving its writers with the map it has.
    let (writers_a, writers_b) = write_then_cut(
        &cluster,
        edge_a.listener_addr,
        edge_b.listener_addr,
        &spread_bases(BASES),
        &relay,
    )?;

    let began = Instant::now();
    let (status, body) = cp.post(
        "/v1/maps",
        &json!({"map": new_map(), "comment": "fleet safety experiment"}),
    )?;
    let (state, reason) = match status {
        202 => {
            let id = body["rollout"]
                .as_u64()
                .ok_or_else(|| anyhow!("no rollout id in {body}"))?;
            let r = cp.wait_rollout(id, Duration::from_secs(90))?;
            (
                r["state"].as_str().unwrap_or_default().to_owned(),
                r["reason"].as_str().map(str::to_owned),
            )
        }
        409 => (
            "refused".to_owned(),
            body["error"].as_str().map(str::to_owned),
        ),
        _ => bail!("POST /v1/maps: {status} {body}"),
    };
    let elapsed = began.elapsed();
    if state == "done" {
        wait_until_a_moved_base_is_loaded_by(&cluster, ENVOY_SERVERS[1])?;
    }
    writers_a.wait_for_more(200, WAIT)?;
    // B keeps trying for a while after the end, with whatever map it holds.
    std::thread::sleep(Duration::from_millis(1500));
    let log_b: WriteLog = writers_b.stop();
    let log_a = writers_a.stop();
    let cut_off_refused = log_b.refused.clone();
    drop((edge_a, edge_b, envoys, relay));
    let outcome = Outcome::from_logs(&mut cluster, vec![log_a, log_b])?;
    drop(cp);
    Ok(Run {
        state,
        reason,
        elapsed,
        outcome,
        cut_off_refused,
    })
}
