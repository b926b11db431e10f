//! Push → every node ACKed, with many simulated Envoys in one process: over plain
//! gRPC for each fleet size, then (same run) the first size over mutual TLS with a
//! client certificate per node and `require_node_id_match`.
//!
//! `cargo bench -p control-plane --bench push_fanout [-- NODES...]`
//! (default 500, 2000 and 5000 nodes; 20 pushes each). Targets: 500 nodes all ACKed
//! within 1 s; 5 000 within 1 s and within 10× the 500 p50 (linear).
//!
//! Also printed per size: the process's resident memory per connected node and its
//! CPU per push per node. The simulated Envoys live in the same process, so both
//! are upper bounds of the control plane's share.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::Duration;

fn main() {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse::<usize>().ok())
        .collect();
    if sizes.is_empty() {
        sizes = vec![500, 2000, 5000];
    }
    let pushes = 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let runs = sizes
            .iter()
            .map(|n| (*n, false))
            .chain(std::iter::once((sizes[0], true)));
        for (nodes, mtls) in runs {
            let rss_before = rss_kib();
            let dir = tempfile::tempdir().expect("tempdir");
            let tls = mtls.then(|| sim::SimTls::new(&dir.path().join("tls")));
            let running = match &tls {
                Some(tls) => sim::start_mtls(dir.path(), tls, true).await,
                None => sim::start(dir.path()).await,
            };
            let connected =
                sim::connect_all_with(&running, nodes, Duration::from_secs(120), tls.as_ref())
                    .await;
            let rss_after = rss_kib();
            let cpu_before = cpu_secs();
            let mut times = Vec::with_capacity(pushes);
            for i in 0..pushes {
                times.push(sim::push_and_wait(&running.plane, i, Duration::from_secs(30)).await);
            }
            let cpu = cpu_secs() - cpu_before;
            times.sort();
            let pct = |p: usize| times[(times.len() - 1) * p / 100];
            println!(
                "push_fanout ({}): {nodes} ADS clients (one connection each), {pushes} pushes; \
                 all connected and current in {connected:.2?}; push → all ACKed: \
                 p50 {:.2?}, p90 {:.2?}, max {:.2?}",
                if mtls {
                    "mutual TLS, node ids bound to certificates"
                } else {
                    "plain gRPC"
                },
                pct(50),
                pct(90),
                pct(100)
            );
            println!(
                "  {:.1} KiB resident per connected node; {:.1} µs CPU per push per node \
                 (whole process: control plane and simulated Envoys)",
                rss_after.saturating_sub(rss_before) as f64 / nodes as f64,
                cpu * 1e6 / (pushes * nodes) as f64
            );
            running.shutdown().await;
        }
    });
}

/// This process's resident memory, KiB (`/proc/self/status`).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// This process's CPU time (user + system), seconds (`/proc/self/stat`; 100 Hz).
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}
