//! Where the time of pushing a big map goes, on the control plane's side: the plan
//! (`shardmap::diff`), the store (one version appended to SQLite, WAL, on disk), and
//! the ECDS encoding (the snapshot: every Envoy's filter configuration, the guards'
//! too). The map: 256 four-digit slots and 1 000 or 10 000 pins moving no base; the
//! Envoy's share (`on_configure`) is `cargo bench -p wasm-host --bench configure`.
//!
//! `cargo bench -p control-plane --bench big_map`

use std::time::{Duration, Instant};

use control_plane::store::NewVersion;
use control_plane::{Config, Snapshot, SqliteStore, Store, VersionKind};
use shardmap::{RouterConfig, ShardMap, diff};

#[path = "../../crates/shardmap/benches/support/big_map.rs"]
mod big_map;

fn old_map() -> ShardMap {
    serde_json::from_value(big_map::two_slot_map()).expect("the two-slot map")
}

/// [`big_map::big_map`]: 256 four-digit slots, `pins` pins, the old map's routing.
fn new_map(pins: usize) -> ShardMap {
    serde_json::from_value(big_map::big_map(pins)).expect("the big map")
}

/// The median of `runs` timings of `f`.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut t: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("seashard.toml");
    std::fs::write(
        &path,
        "[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[store]\npath = \"s.db\"\n\
         [api]\ntoken = \"bench-token-0123\"\n[filter]\nwasm = \"/opt/b.wasm\"\n\
         [[server]]\nname = \"dtable-server\"\naddress = \"127.0.0.1:1\"\n\
         [[server]]\nname = \"dtable-server-2\"\naddress = \"127.0.0.1:2\"\n",
    )
    .expect("config");
    let config = Config::load(&path).expect("config");
    let old = old_map();
    for pins in [1_000, 10_000] {
        let new = new_map(pins);
        let json = serde_json::to_string(&new).expect("json");
        let plan_t = median(9, || {
            let plan = diff(&old, &new).expect("valid");
            assert!(!plan.moves_bases());
        });
        let store = SqliteStore::open(&dir.path().join(format!("store-{pins}.db"))).expect("store");
        let mut expected = 0;
        let store_t = median(9, || {
            expected = store
                .append_version(
                    expected,
                    &NewVersion::unfenced(VersionKind::Map, &new, "bench", ""),
                )
                .expect("append");
        });
        let rc = RouterConfig::new(2, new.clone());
        let encode_t = median(9, || {
            let s = Snapshot::build(&rc, &config.filter, &config.servers);
            assert_eq!(s.ecds.resources.len(), 1 + config.servers.len());
        });
        println!(
            "big_map: {pins} pins ({} KB): plan {plan_t:.2?}, store {store_t:.2?}, \
             ECDS encode (edge + {} guards) {encode_t:.2?}",
            json.len() / 1000,
            config.servers.len()
        );
    }
}
