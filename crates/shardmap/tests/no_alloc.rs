//! The fast path stays fast: reading the base of a target with no `%` in its path and
//! no `%` or `+` in its query keys allocates nothing when routed or passed, edge or
//! guard (counted by a
//! global allocator; this file holds one test so that nothing else allocates
//! meanwhile).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use shardmap::{RouterConfig, ShardMap, Verdict};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn plain_requests_allocate_nothing_and_encoded_ones_do() {
    let map = ShardMap::from_json(
        r#"{"default": "a", "slots": {"0-7": "b", "8-f": "a"},
            "paths": [{"prefix": "/api/v1/admin/", "server": "b"}]}"#,
    )
    .unwrap();
    let edge = RouterConfig::new(3, map.clone()).compile_gate().unwrap();
    let guard = RouterConfig {
        guard: Some("a".into()),
        ..RouterConfig::new(3, map)
    }
    .compile_gate()
    .unwrap();
    let plain = [
        "/dtable-server/api/v1/dtables/0abcdef0-1111-4222-8333-444455556666/rows/?table_name=T%20x&v=a+b",
        "/api/v1/internal/dtables/A1B2C3D40000400080000000000000FF/operations/",
        "/socket.io/?EIO=4&transport=websocket&dtable_uuid=a1b2c3d4-0000-4000-8000-0000000000ff",
        "/socket.io/?EIO=4&t=a+b",
        "/api/v1/admin/sys-info/",
        "/ping/",
    ];
    // A refusal allocates its JSON body; routing and passing allocate nothing.
    let mut answered = 0;
    for _ in 0..100 {
        for t in plain {
            for gate in [&edge, &guard] {
                let before = ALLOCS.load(Ordering::Relaxed);
                let verdict = gate.verdict(t);
                let allocs = ALLOCS.load(Ordering::Relaxed) - before;
                if !matches!(verdict, Verdict::Refuse(_)) {
                    assert_eq!(allocs, 0, "{t} {verdict:?}");
                    answered += 1;
                }
            }
        }
    }
    // Every target routed by the edge; the guard passes all but the base of `b`.
    assert_eq!(answered, 1100);
    // The counter counts: an encoded target does allocate (it is decoded).
    let before = ALLOCS.load(Ordering::Relaxed);
    let _ = edge.verdict("/api/v1/dtables/0abcdef0%2D1111-4222-8333-444455556666/");
    assert!(ALLOCS.load(Ordering::Relaxed) > before);
}
