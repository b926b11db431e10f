//! The host functions through the real ABI, with a small hand-written guest.

use wasm_host::{Action, Host, LocalResponse, LogLevel, MetricKind, Val, Vm};

/// On request headers: reads the whole request header map and writes it back
/// (a round trip of the map encoding), counts requests in a counter, logs
/// "seen", and if there is an `x-reply` header replies 403 with its value as
/// the body. On VM start it calls `proxy_http_call`, which this host does not
/// implement, and keeps the status.
const GUEST: &str = r#"
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_context (param i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment_metric (param i32 i64) (result i32)))
  (import "env" "proxy_http_call"
    (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; 0..12: return slots (pointer, size, metric id); 64..: constants; heap from 4096.
  (data (i32.const 64) "x-reply")
  (data (i32.const 80) "denied")
  (data (i32.const 96) "requests")
  (data (i32.const 112) "seen")
  (data (i32.const 128) "\01\00\00\00\05\00\00\00\04\00\00\00x-why\00test\00")
  (global $heap (mut i32) (i32.const 4096))
  (global $http_call_status (mut i32) (i32.const -1))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (global.get $heap)
    (global.set $heap (i32.add (global.get $heap) (local.get $size))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (global.set $http_call_status
      (call $http_call (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                       (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.const 1))
  (func (export "http_call_status") (result i32) (global.get $http_call_status))
  (func (export "proxy_on_request_headers") (param $context i32) (param i32 i32) (result i32)
    (if (call $set_context (local.get $context)) (then unreachable))
    (if (call $get_pairs (i32.const 0) (i32.const 0) (i32.const 4)) (then unreachable))
    (if (call $set_pairs (i32.const 0) (i32.load (i32.const 0)) (i32.load (i32.const 4)))
      (then unreachable))
    (if (call $define_metric (i32.const 0) (i32.const 96) (i32.const 8) (i32.const 8))
      (then unreachable))
    (if (call $increment_metric (i32.load (i32.const 8)) (i64.const 1)) (then unreachable))
    (if (call $log (i32.const 2) (i32.const 112) (i32.const 4)) (then unreachable))
    (if (call $get_value (i32.const 0) (i32.const 64) (i32.const 7) (i32.const 0) (i32.const 4))
      (then (return (i32.const 0))))
    (if (call $reply (i32.const 403) (i32.const 80) (i32.const 6)
                     (i32.load (i32.const 0)) (i32.load (i32.const 4))
                     (i32.const 128) (i32.const 23) (i32.const -1))
      (then unreachable))
    (i32.const 1)))
"#;

fn vm() -> Vm {
    let host = Host::from_bytes(&wat::parse_str(GUEST).unwrap()).unwrap();
    let mut vm = host.instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    // The guest has no proxy_on_configure: accepted, as Envoy does.
    assert!(vm.configure(b"anything").unwrap());
    vm
}

#[test]
fn header_map_round_trips_through_the_guest() {
    let mut vm = vm();
    let headers = [
        (":path", "/dtable-server/ä/🦀?q=✓"),
        ("x-empty", ""),
        ("", "empty name"),
        ("x-twice", "1"),
        ("x-twice", "2"),
    ];
    let context = vm.new_http_context().unwrap();
    assert_eq!(
        vm.request_headers(context, &headers, false).unwrap(),
        Action::Continue
    );
    let got: Vec<(&str, &str)> = vm
        .request_headers_of(context)
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(got, headers);
    assert!(vm.local_response(context).is_none());
    vm.finish(context).unwrap();
}

#[test]
fn local_reply_metrics_and_logs_are_recorded() {
    let mut vm = vm();
    for _ in 0..2 {
        let context = vm.new_http_context().unwrap();
        vm.request_headers(context, &[(":path", "/")], true)
            .unwrap();
        vm.finish(context).unwrap();
    }
    let context = vm.new_http_context().unwrap();
    let action = vm
        .request_headers(context, &[(":path", "/"), ("X-Reply", "nope ✓")], true)
        .unwrap();
    assert_eq!(action, Action::Pause);
    assert_eq!(
        vm.local_response(context),
        Some(&LocalResponse {
            status: 403,
            body: "nope ✓".as_bytes().to_vec(),
            headers: vec![("x-why".to_owned(), "test".to_owned())],
            details: "denied".to_owned(),
            grpc_status: -1,
        })
    );
    let requests = vm.metric("requests").unwrap();
    assert_eq!((requests.kind, requests.value), (MetricKind::Counter, 3));
    assert_eq!(vm.metrics().len(), 1);
    assert_eq!(vm.logs().len(), 3);
    assert!(
        vm.logs()
            .iter()
            .all(|entry| entry.level == LogLevel::Info && entry.message == "seen")
    );
}

#[test]
fn unimplemented_imports_return_unimplemented() {
    let mut vm = vm();
    let status = vm.call_export("http_call_status", &[]).unwrap();
    assert!(matches!(status[..], [Val::I32(12)]), "{status:?}");
}
