//! The host driving the real `bench-noop` filter.

use std::sync::OnceLock;

use wasm_host::{Action, ContextId, Host, HostError, LogLevel, Trap, Val, Vm, built_filter};

/// Compiling is the slow part: once per test binary.
fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| Host::load(built_filter("bench-noop").unwrap()).unwrap())
}

fn vm(plugin_configuration: &str) -> Vm {
    let mut vm = host().instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    assert!(vm.configure(plugin_configuration.as_bytes()).unwrap());
    vm
}

fn request(vm: &mut Vm, headers: &[(&str, &str)]) -> ContextId {
    let context = vm.new_http_context().unwrap();
    let action = vm.request_headers(context, headers, true).unwrap();
    assert_eq!(action, Action::Continue);
    context
}

const REQUEST: &[(&str, &str)] = &[
    (":method", "GET"),
    (
        ":path",
        "/dtable-server/api/v1/dtables/0b43d4d4-3c3d-4d4e-9a9b-1c2d3e4f5a6b/",
    ),
    (":authority", "cloud.seatable.io"),
];

#[test]
fn sets_the_header_and_keeps_the_others() {
    let mut vm = vm("");
    let context = request(&mut vm, REQUEST);
    let mut expected: Vec<(String, String)> = REQUEST
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    expected.push(("x-dtable-server".to_owned(), "dtable-server".to_owned()));
    assert_eq!(vm.request_headers_of(context).unwrap(), expected);
    assert!(vm.local_response(context).is_none());
    vm.finish(context).unwrap();
    assert!(vm.request_headers_of(context).is_none());
    assert!(matches!(
        vm.request_headers(context, REQUEST, true),
        Err(HostError::UnknownContext(_))
    ));
}

#[test]
fn overwrites_what_the_client_sent() {
    let mut vm = vm("{}");
    let context = request(
        &mut vm,
        &[
            (":path", "/"),
            ("X-Dtable-Server", "evil"),
            ("accept", "*/*"),
            ("x-dtable-server", "evil too"),
        ],
    );
    assert_eq!(
        vm.request_headers_of(context).unwrap(),
        [
            (":path".to_owned(), "/".to_owned()),
            ("X-Dtable-Server".to_owned(), "dtable-server".to_owned()),
            ("accept".to_owned(), "*/*".to_owned()),
        ]
    );
}

#[test]
fn configuration_renames_the_header() {
    let mut vm = vm(r#"{"header": "X-Foo"}"#);
    let context = request(&mut vm, REQUEST);
    assert_eq!(vm.request_header(context, "x-foo"), Some("dtable-server"));
    assert_eq!(vm.request_header(context, "x-dtable-server"), None);
}

#[test]
fn a_bad_configuration_is_refused_and_logged() {
    let mut vm = host().instantiate().unwrap();
    assert!(vm.start(b"").unwrap());
    assert!(!vm.configure(br#"{"header": ""}"#).unwrap());
    let errors: Vec<&str> = vm.logs_at_least(LogLevel::Error).collect();
    assert_eq!(errors.len(), 1, "{:?}", vm.logs());
    assert!(errors[0].contains("must not be empty"), "{errors:?}");
    assert_eq!(vm.logs()[0].level, LogLevel::Error);
    vm.clear_records();
    assert!(vm.logs().is_empty());
    // The VM is still usable: a good configuration is accepted.
    assert!(vm.configure(br#"{"header": "x-bar"}"#).unwrap());
}

#[test]
fn non_ascii_and_empty_values_pass_through() {
    let mut vm = vm("");
    let headers = [
        (":path", "/dtable-server/ä/🦀"),
        ("x-empty", ""),
        ("x-latin", "Größe ✓"),
    ];
    let context = request(&mut vm, &headers);
    let got = vm.request_headers_of(context).unwrap();
    assert_eq!(got.len(), 4);
    for (pair, (k, v)) in got.iter().zip(headers) {
        assert_eq!((pair.0.as_str(), pair.1.as_str()), (k, v));
    }
}

#[test]
fn many_requests_on_one_vm() {
    let mut vm = vm("");
    let contexts: Vec<ContextId> = (0..3).map(|_| request(&mut vm, REQUEST)).collect();
    for &context in &contexts {
        assert_eq!(
            vm.request_header(context, "x-dtable-server"),
            Some("dtable-server")
        );
        assert!(vm.done(context).unwrap());
        vm.delete(context).unwrap();
    }
    for _ in 0..100 {
        let context = request(&mut vm, REQUEST);
        vm.finish(context).unwrap();
    }
}

#[test]
fn lifecycle_misuse_is_an_error() {
    let mut vm = host().instantiate().unwrap();
    assert!(matches!(vm.new_http_context(), Err(HostError::NotStarted)));
    assert!(matches!(vm.configure(b""), Err(HostError::NotStarted)));
    vm.start(b"").unwrap();
    assert!(matches!(vm.start(b""), Err(HostError::AlreadyStarted)));
}

#[test]
fn a_panic_in_the_filter_is_a_trap() {
    let mut vm = vm("");
    // The SDK panics on a context it never created.
    let error = vm
        .call_export(
            "proxy_on_request_headers",
            &[Val::I32(999), Val::I32(0), Val::I32(1)],
        )
        .unwrap_err();
    match &error {
        HostError::Trap {
            function,
            trap,
            guest_output,
        } => {
            assert_eq!(function, "proxy_on_request_headers");
            assert_eq!(*trap, Trap::UnreachableCodeReached);
            assert!(
                guest_output.contains("invalid context_id"),
                "{guest_output}"
            );
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(error.to_string().contains("invalid context_id"), "{error}");
    // The panic hook logged it at Critical.
    assert_eq!(vm.logs_at_least(LogLevel::Critical).count(), 1);
    // The VM is poisoned; another one is fine.
    assert!(matches!(vm.new_http_context(), Err(HostError::Poisoned)));
    let mut fresh = self::vm("");
    request(&mut fresh, REQUEST);
}

#[test]
fn unknown_exports_and_bad_files_are_errors() {
    let mut vm = vm("");
    assert!(matches!(
        vm.call_export("no_such_export", &[]),
        Err(HostError::MissingExport(name)) if name == "no_such_export"
    ));
    assert!(matches!(
        Host::load("/nonexistent.wasm"),
        Err(HostError::Read { .. })
    ));
    assert!(matches!(
        Host::from_bytes(b"not wasm"),
        Err(HostError::Compile(_))
    ));
}
