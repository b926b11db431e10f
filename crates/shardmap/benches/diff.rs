//! `diff` of big maps: from the two-slot map to 256 four-digit slots and N pins, none
//! of them moving a base (each pin names the owner its slot already gives), at 1 000
//! and 10 000 pins; and `owners_within` of a fence over such a map.
//!
//! `cargo bench -p shardmap --bench diff`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use shardmap::{Fence, ShardMap, diff, owners_within};

const SERVERS: [&str; 2] = ["dtable-server", "dtable-server-2"];

fn old_map() -> ShardMap {
    ShardMap {
        default: SERVERS[0].into(),
        slots: [("0-7", SERVERS[0]), ("8-f", SERVERS[1])]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect(),
        ..ShardMap::default()
    }
}

/// 256 slots of 4 digits (`0000-00ff`, ...) with the old map's owners, and `pins`
/// 12-digit pins (xorshift), each on its slot's owner: the same routing as `old_map`.
fn new_map(pins: usize) -> ShardMap {
    let owner = |first_digit: u64| SERVERS[usize::from(first_digit >= 8)];
    let slots: BTreeMap<String, String> = (0..256u64)
        .map(|i| (format!("{i:02x}00-{i:02x}ff"), owner(i >> 4).to_owned()))
        .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut pin_map = BTreeMap::new();
    while pin_map.len() < pins {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = format!("{:012x}", x >> 16);
        pin_map.insert(p, owner(x >> 60).to_owned());
    }
    ShardMap {
        default: SERVERS[0].into(),
        slots,
        pins: pin_map,
        ..ShardMap::default()
    }
}

fn bench(c: &mut Criterion) {
    let old = old_map();
    for n in [1_000, 10_000] {
        let new = new_map(n);
        let plan = diff(&old, &new).expect("valid maps");
        assert!(!plan.moves_bases(), "the pins move nothing");
        c.bench_function(&format!("diff, {n} pins"), |b| {
            b.iter(|| diff(black_box(&old), black_box(&new)))
        });
    }
    let new = new_map(10_000);
    let fence = Fence {
        slots: vec!["4-7".into()],
        pins: vec![],
    };
    c.bench_function("owners_within 4-7, 10 000 pins", |b| {
        b.iter(|| owners_within(black_box(&new), black_box(&fence)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
