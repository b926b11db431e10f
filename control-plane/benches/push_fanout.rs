//! Push → every node ACKed, with many simulated Envoys in one process: over plain
//! gRPC, then (same run, same numbers) over mutual TLS with a client certificate per
//! node and `require_node_id_match`.
//!
//! `cargo bench -p control-plane --bench push_fanout [-- NODES PUSHES]`
//! (default 500 nodes, 20 pushes). Target: 500 nodes all ACKed within 1 s.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::time::Duration;

fn main() {
    let mut args = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse::<usize>().ok());
    let nodes = args.next().unwrap_or(500);
    let pushes = args.next().unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for mtls in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let tls = mtls.then(|| sim::SimTls::new(&dir.path().join("tls")));
            let running = match &tls {
                Some(tls) => sim::start_mtls(dir.path(), tls, true).await,
                None => sim::start(dir.path()).await,
            };
            let connected =
                sim::connect_all_with(&running, nodes, Duration::from_secs(120), tls.as_ref())
                    .await;
            let mut times = Vec::with_capacity(pushes);
            for i in 0..pushes {
                times.push(sim::push_and_wait(&running.plane, i, Duration::from_secs(30)).await);
            }
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
            running.shutdown().await;
        }
    });
}
