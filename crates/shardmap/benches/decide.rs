//! `Router::decide` over a mix of SeaTable URIs, beside the documented nginx regexes run
//! with regex-lite (what a regex-based router costs), so both are measured in one run.
//!
//! `cargo bench -p shardmap --bench decide`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shardmap::{Router, ShardMap};

const MAP: &str = r#"{"default": "dtable-server",
    "slots": {"0-9": "dtable-server-2", "a-f": "dtable-server"},
    "pins": {"ff84e1a1-66e2": "dtable-server-2", "0abc": "dtable-server"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server"}]}"#;

/// SeaTable requests that carry a base, in every shape seen in the wild.
fn uuid_uris() -> Vec<String> {
    let uuids = [
        "a1b2c3d4-5e6f-4a0b-8c9d-0e1f2a3b4c5d",
        "0f1e2d3c-4b5a-4968-8776-655443322110",
        "ff84e1a1-66e2-4d2c-9b3a-112233445566",
        "0abcdef0-1111-4222-8333-444455556666",
    ];
    let mut out = Vec::new();
    for u in uuids {
        let hex = u.replace('-', "");
        out.push(format!(
            "/dtable-server/api/v1/dtables/{u}/rows/?table_name=Table1&view_name=Default"
        ));
        out.push(format!("/api/v1/dtables/{u}/"));
        out.push(format!("/api/v1/internal/dtables/{hex}/operations/"));
        out.push(format!(
            "/api-gateway/api/v2/dtables/{}/rows/",
            u.to_uppercase()
        ));
        out.push(format!("/dtable-db/api/v1/query/{u}/"));
        out.push(format!(
            "/socket.io/?EIO=4&transport=websocket&dtable_uuid={u}"
        ));
    }
    out
}

fn bench(c: &mut Criterion) {
    let router = Router::new(&ShardMap::from_json(MAP).unwrap()).unwrap();
    let uris = uuid_uris();
    let plain = [
        "/ping/",
        "/api/v1/admin/sys-info/",
        "/socket.io/?EIO=4&transport=polling",
    ];

    let mut g = c.benchmark_group("decide");
    g.throughput(Throughput::Elements(uris.len() as u64));
    g.bench_function("uuid_uris", |b| {
        b.iter(|| {
            for u in &uris {
                black_box(router.decide(black_box(u)));
            }
        })
    });
    g.bench_function("extract_only", |b| {
        b.iter(|| {
            for u in &uris {
                black_box(shardmap::extract(black_box(u)));
            }
        })
    });
    g.throughput(Throughput::Elements(plain.len() as u64));
    g.bench_function("uuid_less_uris", |b| {
        b.iter(|| {
            for u in &plain {
                black_box(router.decide(black_box(u)));
            }
        })
    });

    // SeaTable's documented nginx map, as regex-lite would run it: first match wins.
    let regexes: Vec<regex_lite::Regex> = [
        "(?i)ff84e1a1-66e2",
        "(?i)([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})",
        "(?i)([0-9])([0-9a-f]{7}-[0-9a-f]{4})",
    ]
    .iter()
    .map(|r| regex_lite::Regex::new(r).unwrap())
    .collect();
    g.throughput(Throughput::Elements(uris.len() as u64));
    g.bench_function("nginx_regexes_regex_lite", |b| {
        b.iter(|| {
            for u in &uris {
                black_box(regexes.iter().position(|r| r.is_match(black_box(u))));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
