//! One request through base-router beside the `bench-noop` baseline (a filter that only
//! sets a header), in one run: the whole request (context, headers, done/log/delete)
//! and the request-headers call alone.
//!
//! `cargo bench -p wasm-host --bench request`
//!
//! `SEASHARD_COMPARE_WASM=a.wasm:b.wasm` adds other builds of base-router to the same
//! run, configured alike (e.g. one built with another `opt-level`:
//! `CARGO_TARGET_DIR=/tmp/o3 CARGO_PROFILE_WASM_OPT_LEVEL=3 cargo build -p base-router
//! --target wasm32-wasip1 --profile wasm`, then `/tmp/o3/wasm32-wasip1/wasm/base_router.wasm`).

use std::hint::black_box;
use std::path::{Path, PathBuf};

use criterion::{Criterion, criterion_group, criterion_main};
use wasm_host::{Action, Host, HostError, Vm, built_filter};

/// Typical request headers of a SeaTable client, as Envoy hands them over.
const HEADERS: &[(&str, &str)] = &[
    (":method", "GET"),
    (":scheme", "https"),
    (":authority", "cloud.seatable.io"),
    (
        ":path",
        "/dtable-server/api/v1/dtables/0b43d4d4-3c3d-4d4e-9a9b-1c2d3e4f5a6b/rows/?table_name=Table1",
    ),
    ("user-agent", "python-requests/2.32.3"),
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    (
        "authorization",
        "Token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJleHAiOjE3MDAwMDAwMDB9.c2lnbmF0dXJl",
    ),
];

/// A started and configured VM of the filter at `wasm`.
fn vm(wasm: &Path, plugin_configuration: &[u8]) -> Result<Vm, HostError> {
    let mut vm = Host::load(wasm)?.instantiate()?;
    assert!(vm.start(b"")?);
    assert!(vm.configure(plugin_configuration)?);
    Ok(vm)
}

/// A whole request: new context, request headers, done/log/delete.
fn one_request(vm: &mut Vm) -> Result<(), HostError> {
    let context = vm.new_http_context()?;
    let action = vm.request_headers(context, black_box(HEADERS), true)?;
    assert_eq!(action, Action::Continue);
    vm.finish(context)
}

/// base-router's configuration: the sample map with a pin, two-digit slots, a path rule.
const BASE_ROUTER_CONFIG: &str = r#"{"version": 1, "map": {"default": "dtable-server",
    "slots": {"00-7f": "dtable-server-2", "80-ff": "dtable-server"},
    "pins": {"ff84e1a1-66e2": "dtable-server-2"},
    "paths": [{"prefix": "/api/v1/admin/", "server": "dtable-server"}]}}"#;

/// The filters compared: (name, wasm file, plugin configuration).
fn filters() -> Vec<(String, PathBuf, &'static str)> {
    let mut filters = vec![
        (
            "bench-noop".to_owned(),
            built_filter("bench-noop").unwrap(),
            "",
        ),
        (
            "base-router".to_owned(),
            built_filter("base-router").unwrap(),
            BASE_ROUTER_CONFIG,
        ),
    ];
    for path in std::env::var("SEASHARD_COMPARE_WASM")
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
    {
        filters.push((
            format!("base-router @ {path}"),
            PathBuf::from(path),
            BASE_ROUTER_CONFIG,
        ));
    }
    filters
}

fn request(c: &mut Criterion) {
    let filters = filters();
    let mut group = c.benchmark_group("request");
    for (name, wasm, config) in &filters {
        let mut vm = vm(wasm, config.as_bytes()).unwrap();
        group.bench_function(name, |b| b.iter(|| one_request(&mut vm).unwrap()));
    }
    group.finish();

    // The request-headers call alone: what the filter does per request, host calls included.
    let mut group = c.benchmark_group("request_headers");
    for (name, wasm, config) in &filters {
        let mut vm = vm(wasm, config.as_bytes()).unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = std::time::Duration::ZERO;
                for _ in 0..iters {
                    let context = vm.new_http_context().unwrap();
                    let start = std::time::Instant::now();
                    let action = vm
                        .request_headers(context, black_box(HEADERS), true)
                        .unwrap();
                    total += start.elapsed();
                    assert_eq!(action, Action::Continue);
                    vm.finish(context).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, request);
criterion_main!(benches);
