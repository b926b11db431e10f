//! `on_configure` of the built base-router with a big map: 256 four-digit slots and
//! 1 000 or 10 000 pins (what a push of such a map costs inside each Envoy, here on
//! wasmtime rather than Envoy's V8).
//!
//! `cargo bench -p wasm-host --bench configure`

use std::collections::BTreeMap;

use criterion::{Criterion, criterion_group, criterion_main};
use wasm_host::{Host, built_filter};

/// The plugin configuration of a map with 256 four-digit slots and `pins` pins.
fn big_config(pins: usize) -> String {
    let servers = ["dtable-server", "dtable-server-2"];
    let slots: BTreeMap<String, &str> = (0..256u64)
        .map(|i| {
            (
                format!("{i:02x}00-{i:02x}ff"),
                servers[usize::from(i >= 128)],
            )
        })
        .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut pin_map = BTreeMap::new();
    while pin_map.len() < pins {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pin_map.insert(
            format!("{:012x}", x >> 16),
            servers[usize::from(x >> 63 == 1)],
        );
    }
    serde_json::json!({"version": 2, "map": {"default": servers[0], "slots": slots, "pins": pin_map}})
        .to_string()
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
