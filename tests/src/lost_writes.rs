//! The lost-write experiment of issue 5, as reusable steps: fake
//! dtable-servers on one storage ([`Cluster`]) behind a proxy, writers
//! through it ([`Writers`]), a map change that moves bases, restarts, and
//! the count of acknowledged writes missing from storage at the end.
//!
//! Part (a) is SeaTable's documented procedure ([`naive_procedure`]: change
//! the proxy's map, then restart the servers), behind nginx
//! ([`nginx_experiment`]) or Envoy + base-router ([`envoy_experiment`]).
//! Part (b), a seashard rollout, reuses [`Cluster`], [`Writers`],
//! [`Outcome::collect`] and [`spread_bases`] with the control plane in the
//! proxy's place.
//!
//! The map change of these experiments moves the bases whose first hex digit
//! is 4-7 from the first server to the second ([`moved`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::json;
use shardmap::BaseUuid;

pub use crate::dtable::spread_bases;
use crate::dtable::{Cluster, DoubleService, Writers, double_service, seatable_nginx_conf};
use crate::relay::Relay;
use crate::{Envoy, Nginx, bootstrap, free_port, loopback, render_edge_static, wait_until};

/// Long enough that a base moved off a server always has unsaved writes on
/// it (SeaTable's default is 300 s).
pub const SAVE_INTERVAL: Duration = Duration::from_millis(2000);
/// Bases written to (first hex digits cycle through 0-f).
pub const BASES: usize = 32;
/// Writer threads.
pub const WRITERS: usize = 4;
/// A bound on each writer (runs end long before).
pub const MAX_WRITES_PER_THREAD: usize = 50_000;
/// The bound of every wait of the experiment.
pub const WAIT: Duration = Duration::from_secs(30);

/// The two servers behind nginx (nginx upstream names).
pub const NGINX_SERVERS: [&str; 2] = ["dtable_server_1", "dtable_server_2"];
/// The two servers behind Envoy (the cluster names of `edge-static.yaml`).
pub const ENVOY_SERVERS: [&str; 2] = ["dtable-server", "dtable-server-2"];

/// True for the bases the map change moves: first hex digit 4-7 (32
/// lowercase hex), from the first server to the second.
pub fn moved(base: &str) -> bool {
    matches!(base.as_bytes().first(), Some(b'4'..=b'7'))
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub acknowledged: usize,
    /// Writes that got no acknowledgement (during restarts).
    pub failed: usize,
    /// The unacknowledged writes answered with an HTTP status, by status.
    pub refused: std::collections::BTreeMap<u16, usize>,
    /// Acknowledged `(base, write_id)` absent from storage at the end.
    pub missing: Vec<(String, String)>,
    /// Bases held in memory by two servers at once (from the servers' logs).
    pub double: Vec<DoubleService>,
}

impl Outcome {
    /// Stops the writers, stops every server gracefully (final saves), then
    /// reads storage and the servers' logs.
    pub fn collect(cluster: &mut Cluster, writers: Writers) -> Result<Outcome> {
        Outcome::from_logs(cluster, vec![writers.stop()])
    }

    /// As [`Outcome::collect`], from the logs of writers already stopped (through
    /// several proxies).
    pub fn from_logs(cluster: &mut Cluster, logs: Vec<crate::dtable::WriteLog>) -> Result<Outcome> {
        let mut log = crate::dtable::WriteLog::default();
        for l in logs {
            log.absorb(l);
        }
        cluster.stop_all()?;
        let acked = log.acknowledged();
        Ok(Outcome {
            refused: log.refused,
            acknowledged: acked.len(),
            failed: log.failed,
            missing: cluster.missing(&acked)?,
            double: double_service(&cluster.events()?),
        })
    }

    /// One line: the counts.
    pub fn summary(&self) -> String {
        format!(
            "{} acknowledged writes, {} missing from storage, {} unacknowledged, \
             {} bases held by two servers at once",
            self.acknowledged,
            self.missing.len(),
            self.failed,
            self.double.len()
        )
    }

    /// An error when an acknowledged write is missing from storage or a base was
    /// held by two servers at once: the counts, the first missing writes, the bases.
    pub fn ensure_nothing_lost(&self) -> Result<()> {
        ensure!(
            self.missing.is_empty() && self.double.is_empty(),
            "acknowledged writes lost: {}\nmissing: {:?}\ndouble: {:?}",
            self.summary(),
            self.missing.iter().take(10).collect::<Vec<_>>(),
            self.double
        );
        Ok(())
    }
}

/// Waits until `server` has loaded a moved base: the new map is live.
pub fn wait_until_a_moved_base_is_loaded_by(cluster: &Cluster, server: &str) -> Result<()> {
    wait_until(WAIT, &format!("{server} to load a moved base"), || {
        Ok(cluster
            .events()?
            .iter()
            .any(|e| {
                e.server == server && e.event == "load" && e.base.as_deref().is_some_and(moved)
            })
            .then_some(()))
    })
}

/// Writers through `kept` and through `cut_off`, 2 threads each on `bases`; once
/// both have 200 writes and the first server has loaded a moved base, `relay` (the
/// cut-off proxy's link to the control plane) dies silently and the cut-off proxy
/// serves 100 more writes with the map it has.
pub fn write_then_cut(
    cluster: &Cluster,
    kept: SocketAddr,
    cut_off: SocketAddr,
    bases: &[BaseUuid],
    relay: &Relay,
) -> Result<(Writers, Writers)> {
    let writers_kept = Writers::start(kept, bases, 2, MAX_WRITES_PER_THREAD);
    let writers_cut = Writers::start(cut_off, bases, 2, MAX_WRITES_PER_THREAD);
    writers_kept.wait_for_more(200, WAIT)?;
    writers_cut.wait_for_more(200, WAIT)?;
    wait_until_a_moved_base_is_loaded_by(cluster, ENVOY_SERVERS[0])?;
    relay.cut();
    writers_cut.wait_for_more(100, WAIT)?;
    Ok((writers_kept, writers_cut))
}

/// A map change: makes the proxy route by the new map (it may retarget the
/// writers to a new proxy).
pub type MapChange<'a> = &'a mut dyn FnMut(&Writers) -> Result<()>;

/// SeaTable's documented procedure, with writers running: change the proxy's
/// map (`change_map`; `None` = restarts only, the control), then restart the
/// first server and then the second as an operator would, with writes
/// acknowledged between every step; then [`Outcome::collect`].
pub fn naive_procedure(
    cluster: &mut Cluster,
    writers: Writers,
    names: [&str; 2],
    change_map: Option<MapChange<'_>>,
) -> Result<Outcome> {
    // Every base loaded on its old owner, writes acknowledged.
    writers.wait_for_more(500, WAIT)?;
    if let Some(change) = change_map {
        change(&writers)?;
        // The new map is live (the second server loaded a moved base); some
        // writes land before the operator gets to the restarts.
        wait_until_a_moved_base_is_loaded_by(cluster, names[1])?;
    }
    writers.wait_for_more(200, WAIT)?;
    cluster.server(names[0]).restart()?;
    writers.wait_for_more(200, WAIT)?;
    cluster.server(names[1]).restart()?;
    writers.wait_for_more(200, WAIT)?;
    Outcome::collect(cluster, writers)
}

/// SeaTable's style of nginx config for the experiment's servers: bases
/// starting `to_first` go to the first server, `to_second` to the second
/// (character classes, e.g. `0-7` and `89a-f`).
pub fn nginx_conf(
    cluster: &Cluster,
    listen: SocketAddr,
    to_first: &str,
    to_second: &str,
) -> String {
    let tail = "([0-9a-f]{7}-[0-9a-f]{4})";
    let rules = [
        (format!("([{to_first}]){tail}"), NGINX_SERVERS[0]),
        (format!("([{to_second}]){tail}"), NGINX_SERVERS[1]),
    ];
    let rules: Vec<(&str, &str)> = rules.iter().map(|(r, s)| (r.as_str(), *s)).collect();
    seatable_nginx_conf(listen, &cluster.addrs(), NGINX_SERVERS[0], &rules)
}

/// Part (a) behind nginx with SeaTable's map: with `change`, the map moves
/// bases 4-7 (nginx reload with the new map, as documented), then both
/// servers restart; without, only the restarts.
pub fn nginx_experiment(change: bool) -> Result<Outcome> {
    let mut cluster = Cluster::start(&NGINX_SERVERS, SAVE_INTERVAL)?;
    let listen = loopback(free_port()?);
    let old = nginx_conf(&cluster, listen, "0-7", "89a-f");
    let new = nginx_conf(&cluster, listen, "0-3", "4-9a-f");
    let nginx = Nginx::start(&old, listen)?;
    let writers = Writers::start(listen, &spread_bases(BASES), WRITERS, MAX_WRITES_PER_THREAD);
    let mut reload = |_: &Writers| nginx.reload(&new);
    naive_procedure(
        &mut cluster,
        writers,
        NGINX_SERVERS,
        change.then_some(&mut reload as MapChange<'_>),
    )
}

/// `envoy/edge-static.yaml` with base-router configured with `slots` (the
/// default: the first server), its clusters pointed at the experiment's
/// servers (whose addresses survive restarts).
pub fn envoy_yaml(cluster: &Cluster, version: u64, slots: serde_json::Value) -> Result<String> {
    let wasm = crate::wasm_file("base_router.wasm")?;
    let addrs = cluster.addrs();
    let clusters: Vec<(&str, SocketAddr)> = addrs.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    let yaml = render_edge_static(&wasm, loopback(0), loopback(0), &clusters)?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml)?;
    let config = json!({
        "version": version,
        "map": {"default": ENVOY_SERVERS[0], "slots": slots, "pins": {}, "paths": []}
    });
    bootstrap::set_plugin_configuration(&mut doc, &config)?;
    bootstrap::to_yaml(&doc)
}

/// Part (a) behind Envoy + base-router: with `change`, the new map (bases 4-7
/// to the second server) arrives the only way a static bootstrap allows: an
/// Envoy started with it takes the clients over and the old one stops; then
/// both servers restart. Without, only the restarts.
pub fn envoy_experiment(change: bool) -> Result<Outcome> {
    let [a, b] = ENVOY_SERVERS;
    let mut cluster = Cluster::start(&ENVOY_SERVERS, SAVE_INTERVAL)?;
    let old_yaml = envoy_yaml(&cluster, 1, json!({"0-7": a, "8-f": b}))?;
    let new_yaml = envoy_yaml(&cluster, 2, json!({"0-3": a, "4-f": b}))?;
    let old = Envoy::start(&old_yaml).context("start the Envoy with the old map")?;
    let writers = Writers::start(
        old.listener_addr,
        &spread_bases(BASES),
        WRITERS,
        MAX_WRITES_PER_THREAD,
    );
    let mut old = Some(old);
    let mut new: Option<Envoy> = None;
    let mut change_map = |w: &Writers| -> Result<()> {
        let e = Envoy::start(&new_yaml).context("start the Envoy with the new map")?;
        w.retarget(e.listener_addr);
        new = Some(e);
        old = None; // the clients have moved
        Ok(())
    };
    let outcome = naive_procedure(
        &mut cluster,
        writers,
        ENVOY_SERVERS,
        change.then_some(&mut change_map as MapChange<'_>),
    );
    drop((old, new));
    outcome
}
