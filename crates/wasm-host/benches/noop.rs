//! One request through the `bench-noop` filter: the baseline that filter
//! benchmarks (e.g. base-router's) are compared with, in the same run.
//!
//! `cargo bench -p wasm-host --bench noop`

use std::hint::black_box;

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

/// A started and configured VM of `package`.
fn vm(package: &str, plugin_configuration: &[u8]) -> Result<Vm, HostError> {
    let mut vm = Host::load(built_filter(package)?)?.instantiate()?;
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

fn request(c: &mut Criterion) {
    let mut group = c.benchmark_group("request");
    let mut noop = vm("bench-noop", b"").unwrap();
    group.bench_function("bench-noop", |b| b.iter(|| one_request(&mut noop).unwrap()));
    group.finish();
}

criterion_group!(benches, request);
criterion_main!(benches);
