//! Push → every simulated Envoy ACKed, with the Envoys spread over three control
//! plane replicas on one etcd: the leader publishes, each replica serves its own
//! Envoys from its watch and writes their ACKs to etcd, and the leader waits on
//! them all. Issue 9's target: 500 Envoys all ACKed within 2 s (p50).
//!
//! `cargo bench -p control-plane --bench replicas_fanout [-- NODES]` (default 500;
//! 20 pushes). Needs etcd (`$ETCD_BIN`, else `/usr/bin/etcd`): one member on a
//! loopback port, its data in a temporary directory, killed at the end.

#[path = "../tests/sim/mod.rs"]
mod sim;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use control_plane::ResourceType;

const REPLICAS: usize = 3;

/// The etcd member, killed when dropped.
struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn main() {
    let nodes: usize = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .find_map(|a| a.parse().ok())
        .unwrap_or(500);
    let pushes = 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let (client, peer) = (free_port(), free_port());
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into());
    let _etcd = Etcd(
        Command::new(bin)
            .args([
                "--name",
                "bench",
                "--data-dir",
                &dir.path().join("etcd").display().to_string(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (install Debian's etcd-server or set ETCD_BIN)"),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut replicas = Vec::new();
        for r in 0..REPLICAS {
            let d = dir.path().join(format!("r{r}"));
            std::fs::create_dir_all(&d).expect("dir");
            let store = format!(
                "kind = \"etcd\"\nendpoints = [\"http://127.0.0.1:{client}\"]\n\
                 prefix = \"/bench\"\nreplica = \"r{r}\""
            );
            replicas.push(sim::start_config(&d, "", "", &store).await);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let leader = loop {
            if let Some(l) = replicas.iter().find(|r| r.plane.leader_term().is_some()) {
                break l;
            }
            assert!(Instant::now() < deadline, "no replica leads");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let start = Instant::now();
        for i in 0..nodes {
            tokio::spawn(sim::envoy(
                replicas[i % REPLICAS].grpc_addr,
                sim::node_id(i),
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = leader.plane.snapshot().ecds.version.clone();
            let (acked, _, _) = leader.plane.registry().tally(ResourceType::Ecds, &v);
            if acked == nodes {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {acked} of {nodes} Envoys are current at the leader"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let connected = start.elapsed();
        let mut times = Vec::with_capacity(pushes);
        for i in 0..pushes {
            times.push(sim::push_and_wait(&leader.plane, i, Duration::from_secs(30)).await);
        }
        times.sort();
        let pct = |p: usize| times[(times.len() - 1) * p / 100];
        println!(
            "replicas_fanout: {nodes} ADS clients over {REPLICAS} replicas on one etcd member, \
             {pushes} pushes; all current at the leader in {connected:.2?}; push → all ACKed \
             (as the leader sees it): p50 {:.2?}, p90 {:.2?}, max {:.2?}",
            pct(50),
            pct(90),
            pct(100)
        );
        for r in replicas {
            r.shutdown().await;
        }
    });
}
