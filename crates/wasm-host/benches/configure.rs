//! `on_configure` of the built base-router with a big map: 256 four-digit slots and
//! 1 000 or 10 000 pins (what a push of such a map costs inside each Envoy, here on
//! wasmtime rather than Envoy's V8).
//!
//! `cargo bench -p wasm-host --bench configure`

use criterion::{Criterion, criterion_group, criterion_main};
use wasm_host::{Host, built_filter};

#[allow(dead_code)]
#[path = "../../shardmap/benches/support/big_map.rs"]
mod big_map;

/// The plugin configuration of [`big_map::big_map`]: 256 four-digit slots and `pins` pins.
fn big_config(pins: usize) -> String {
    serde_json::json!({"version": 2, "map": big_map::big_map(pins)}).to_string()
}

fn configure(c: &mut Criterion) {
    let host = Host::load(built_filter("base-router").unwrap()).unwrap();
    let mut vm = host.instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    let mut group = c.benchmark_group("on_configure");
    group.sample_size(20);
    for pins in [1_000, 10_000] {
        let config = big_config(pins);
        assert!(vm.configure(config.as_bytes()).unwrap());
        group.bench_function(format!("{pins} pins ({} KB)", config.len() / 1000), |b| {
            b.iter(|| assert!(vm.configure(config.as_bytes()).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, configure);
criterion_main!(benches);
