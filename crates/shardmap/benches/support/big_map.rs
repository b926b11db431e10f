//! The big map of the benchmarks, as JSON: 256 four-digit slots and `pins` 12-digit
//! pins, every base on the server the two-slot map gives it (nothing moves).
//!
//! One file, included by path (`#[path = ...] mod big_map;`) by the benches of
//! shardmap, control-plane and wasm-host and by `big-map-push`, so that all of them
//! measure the same map; it needs only `serde_json`, which all of them have (wasm-host
//! cannot depend on shardmap).

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// The two servers of the maps.
pub const SERVERS: [&str; 2] = ["dtable-server", "dtable-server-2"];

/// The server of a base whose first hex digit is `first_digit` in the two-slot map.
fn owner(first_digit: u64) -> &'static str {
    SERVERS[usize::from(first_digit >= 8)]
}

/// The two-slot map: `0-7` on the first server, `8-f` on the second.
pub fn two_slot_map() -> Value {
    json!({"default": SERVERS[0], "slots": {"0-7": SERVERS[0], "8-f": SERVERS[1]}})
}

/// 256 slots of 4 digits (`0000-00ff`, ...) and `pins` 12-digit pins (xorshift), each
/// on the owner the two-slot map gives it: the two-slot map's routing.
pub fn big_map(pins: usize) -> Value {
    let slots: BTreeMap<String, &str> = (0..256u64)
        .map(|i| (format!("{i:02x}00-{i:02x}ff"), owner(i >> 4)))
        .collect();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut pin_map = BTreeMap::new();
    while pin_map.len() < pins {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pin_map.insert(format!("{:012x}", x >> 16), owner(x >> 60));
    }
    json!({"default": SERVERS[0], "slots": slots, "pins": pin_map})
}
