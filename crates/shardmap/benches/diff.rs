//! `diff` of big maps: from the two-slot map to 256 four-digit slots and N pins, none
//! of them moving a base (each pin names the owner its slot already gives), at 1 000
//! and 10 000 pins; and `owners_within` of a fence over such a map.
//!
//! `cargo bench -p shardmap --bench diff`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use shardmap::{Fence, ShardMap, diff, owners_within};

#[path = "support/big_map.rs"]
mod big_map;

fn old_map() -> ShardMap {
    serde_json::from_value(big_map::two_slot_map()).expect("the two-slot map")
}

/// [`big_map::big_map`]: the same routing as `old_map`.
fn new_map(pins: usize) -> ShardMap {
    serde_json::from_value(big_map::big_map(pins)).expect("the big map")
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
