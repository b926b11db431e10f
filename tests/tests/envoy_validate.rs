//! Every Envoy bootstrap shipped in `envoy/` (edge, sidecar, guard) is
//! accepted by Envoy 1.40 (`envoy --mode validate`), and the test variants
//! derived from them are what they claim to be. (That the generated ones are
//! `seactl envoy-bootstrap`'s output is checked by seactl's CLI tests.)
//!
//! Validate mode loads the wasm module and runs the filter's `on_configure`
//! on the inline plugin configuration, so the shipped bootstraps are checked
//! with the built `base_router.wasm` put where they expect
//! `/opt/seashard/base-router.wasm`: the file, the filter and its shipped
//! configuration are proven together.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use seashard_tests::bootstrap::{self, envoy_file};
use seashard_tests::{Proc, envoy_bin, wasm_file, workspace_dir};
use serde_yaml::Value;

/// Where the shipped bootstraps expect the filter.
const SHIPPED_WASM: &str = "/opt/seashard/base-router.wasm";

/// Runs `envoy --mode validate` on `yaml`; the error carries Envoy's output.
fn validate(yaml: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("bootstrap.yaml");
    std::fs::write(&config, yaml)?;
    let out_path = dir.path().join("out.log");
    let mut cmd = Command::new(envoy_bin()?);
    cmd.args([
        "--mode",
        "validate",
        "--disable-hot-restart",
        "-l",
        "warn",
        "-c",
    ])
    .arg(&config)
    .stdin(Stdio::null())
    .stdout(File::create(&out_path)?)
    .stderr(File::create(&out_path)?);
    let status = Proc::run(cmd, "envoy --mode validate", Duration::from_secs(60))?;
    if !status.success() {
        let out = std::fs::read_to_string(&out_path).unwrap_or_default();
        bail!("Envoy rejected the bootstrap ({status}):\n{out}");
    }
    Ok(())
}

/// Replaces every string equal to `from` anywhere in `doc` by `to`; counts them.
fn replace_strings(doc: &mut Value, from: &str, to: &str) -> usize {
    match doc {
        Value::String(s) if s == from => {
            *s = to.to_string();
            1
        }
        Value::Sequence(items) => items.iter_mut().map(|v| replace_strings(v, from, to)).sum(),
        Value::Mapping(m) => m
            .iter_mut()
            .map(|(_, v)| replace_strings(v, from, to))
            .sum(),
        Value::Tagged(t) => replace_strings(&mut t.value, from, to),
        _ => 0,
    }
}

/// A document is an Envoy bootstrap when it has one of the bootstrap's
/// top-level sections; other YAML in `envoy/` (compose files, Istio
/// resources) is not for `envoy --mode validate`.
fn is_bootstrap(doc: &Value) -> bool {
    ["static_resources", "dynamic_resources", "admin", "node"]
        .iter()
        .any(|k| doc.get(*k).is_some())
}

fn shipped_yaml_files() -> Vec<PathBuf> {
    let dir = workspace_dir().join("envoy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn check_shipped(path: &Path, wasm: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(path)?;
    let mut doc: Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    if !is_bootstrap(&doc) {
        return Ok(false);
    }
    replace_strings(&mut doc, SHIPPED_WASM, &wasm.display().to_string());
    validate(&bootstrap::to_yaml(&doc)?).with_context(|| format!("{}", path.display()))?;
    Ok(true)
}

#[test]
fn every_shipped_bootstrap_validates_with_the_built_filter() {
    let wasm = wasm_file("base_router.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for path in shipped_yaml_files() {
        match check_shipped(&path, &wasm) {
            Ok(true) => checked.push(path),
            Ok(false) => eprintln!("skipped (not an Envoy bootstrap): {}", path.display()),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for file in [
        "edge-static.yaml",
        "edge-ads.yaml",
        "sidecar-ads.yaml",
        "guard-ads.yaml",
    ] {
        assert!(
            checked.contains(&envoy_file(file)),
            "{file} was not checked: {checked:?}"
        );
    }
}

/// The generator's bootstraps of every kind, over gRPC and REST, with IP and DNS
/// addresses, validate with the built filter (its `default_config` included).
#[test]
fn generated_bootstraps_of_every_kind_validate() {
    use deploy::bootstrap::{Kind, Options, Xds, render};
    let wasm = wasm_file("base_router.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let guard = || Kind::Guard {
        server: "dtable-server-2".into(),
    };
    let mut failures = Vec::new();
    for (kind, xds, control_plane, upstream) in [
        (Kind::Edge, Xds::Rest, "127.0.0.1:18001", ""),
        (Kind::Sidecar, Xds::Grpc, "127.0.0.1:18000", ""),
        (guard(), Xds::Grpc, "127.0.0.1:18000", "127.0.0.1:5001"),
        (
            guard(),
            Xds::Grpc,
            "control-plane:18000",
            "dtable-server-2:5000",
        ),
        (guard(), Xds::Rest, "127.0.0.1:18001", "[::1]:5001"),
        // Several replicas: every address an endpoint, health-checked.
        (
            Kind::Edge,
            Xds::Grpc,
            "127.0.0.1:18000,127.0.0.2:18000,control-plane-3:18000",
            "",
        ),
        (Kind::Sidecar, Xds::Rest, "127.0.0.1:18001,[::1]:18001", ""),
        (
            guard(),
            Xds::Grpc,
            "cp-1:18000,cp-2:18000",
            "127.0.0.1:5001",
        ),
    ] {
        let what = format!("{} {xds:?} {control_plane} {upstream}", kind.as_str());
        let mut o = Options {
            node_id: format!("{}-test", kind.as_str()),
            control_plane: control_plane.into(),
            xds,
            wasm: wasm.clone(),
            listen_port: 0,
            admin_port: 0,
            ..Options::new(kind)
        };
        if !upstream.is_empty() {
            o.upstream = upstream.into();
        }
        let result = render(&o)
            .map_err(anyhow::Error::from)
            .and_then(|yaml| validate(&yaml));
        if let Err(e) = result {
            failures.push(format!("{what}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Bootstraps with TLS to the control plane (`--tls-ca`, `--tls-cert`,
/// `--tls-key`: an `UpstreamTlsContext` on its cluster), with certificates from
/// the `certs` crate, validate: over gRPC (ALPN h2, mutual TLS) to an address
/// and to a name (SNI), and REST with the CA only.
#[test]
fn generated_bootstraps_with_tls_validate() {
    use deploy::bootstrap::{ControlPlaneTls, Kind, Options, Xds, render};
    let wasm = wasm_file("base_router.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certs::init(d, None, 1, false).unwrap();
    certs::client(d, "edge-1", 1, false).unwrap();
    let mutual = ControlPlaneTls {
        ca: d.join("ca.crt"),
        client: Some((d.join("edge-1.crt"), d.join("edge-1.key"))),
    };
    let ca_only = ControlPlaneTls {
        client: None,
        ..mutual.clone()
    };
    let mut failures = Vec::new();
    for (kind, xds, control_plane, tls) in [
        (Kind::Edge, Xds::Grpc, "127.0.0.1:18000", &mutual),
        (
            Kind::Sidecar,
            Xds::Grpc,
            "control-plane.example:18000",
            &mutual,
        ),
        (
            Kind::Guard {
                server: "dtable-server-2".into(),
            },
            Xds::Grpc,
            "[::1]:18000",
            &mutual,
        ),
        (
            Kind::Edge,
            Xds::Rest,
            "control-plane.example:18080",
            &ca_only,
        ),
        // Several replicas: any one's name or address accepted.
        (
            Kind::Edge,
            Xds::Grpc,
            "127.0.0.1:18000,cp-2.example:18000",
            &mutual,
        ),
        (
            Kind::Sidecar,
            Xds::Rest,
            "cp-1.example:18080,cp-2.example:18080",
            &ca_only,
        ),
    ] {
        let what = format!("{} {xds:?} {control_plane}", kind.as_str());
        let o = Options {
            node_id: "edge-1".into(),
            control_plane: control_plane.into(),
            xds,
            wasm: wasm.clone(),
            listen_port: 0,
            admin_port: 0,
            tls: Some(tls.clone()),
            ..Options::new(kind)
        };
        let result = render(&o).map_err(anyhow::Error::from).and_then(|yaml| {
            assert!(yaml.contains("UpstreamTlsContext"), "{yaml}");
            validate(&yaml)
        });
        if let Err(e) = result {
            failures.push(format!("{what}: {e:#}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // A missing certificate file is Envoy's error too: the check is real.
    let missing = ControlPlaneTls {
        ca: d.join("no-such-ca.crt"),
        client: None,
    };
    let yaml = render(&Options {
        node_id: "edge-1".into(),
        control_plane: "127.0.0.1:18000".into(),
        wasm,
        listen_port: 0,
        admin_port: 0,
        tls: Some(missing),
        ..Options::new(Kind::Edge)
    })
    .unwrap();
    let err = format!("{:#}", validate(&yaml).unwrap_err());
    assert!(err.contains("no-such-ca.crt"), "{err}");
}

/// The Envoy side of `edge-static.yaml` (listener, routes, clusters, wasm
/// plumbing) on its own, with the `bench-noop` filter standing in for the
/// router: a failure here is the bootstrap's, not the filter's.
#[test]
fn edge_static_validates_with_a_stand_in_filter() {
    let wasm = wasm_file("bench_noop.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let mut doc = bootstrap::load("edge-static.yaml").unwrap();
    bootstrap::set_wasm_file(&mut doc, &wasm).unwrap();
    bootstrap::set_plugin_configuration(
        &mut doc,
        &serde_json::json!({"header": "x-dtable-server"}),
    )
    .unwrap();
    validate(&bootstrap::to_yaml(&doc).unwrap()).unwrap_or_else(|e| panic!("{e:#}"));
}

/// The validation above can fail: a bootstrap whose route names no cluster
/// at all is rejected, with Envoy's reason in the error.
#[test]
fn validation_rejects_a_broken_bootstrap() {
    let wasm = wasm_file("bench_noop.wasm").unwrap_or_else(|e| panic!("{e:#}"));
    let mut doc = bootstrap::load("edge-static.yaml").unwrap();
    bootstrap::set_wasm_file(&mut doc, &wasm).unwrap();
    bootstrap::set_plugin_configuration(&mut doc, &serde_json::json!({})).unwrap();
    let mut yaml = bootstrap::to_yaml(&doc).unwrap();
    assert!(yaml.contains("cluster_header: x-dtable-server"));
    yaml = yaml.replace("cluster_header: x-dtable-server", "no_such_field: x");
    let err = format!("{:#}", validate(&yaml).unwrap_err());
    assert!(err.contains("no_such_field"), "{err}");

    // And the stand-in filter's on_configure runs: a configuration it
    // refuses fails validation too.
    bootstrap::set_plugin_configuration(&mut doc, &serde_json::json!({"header": ""})).unwrap();
    assert!(validate(&bootstrap::to_yaml(&doc).unwrap()).is_err());
}

#[test]
fn render_edge_static_points_everything_at_loopback() {
    let a: SocketAddr = "127.0.0.1:10001".parse().unwrap();
    let b: SocketAddr = "127.0.0.1:10002".parse().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let admin: SocketAddr = "127.0.0.1:10003".parse().unwrap();
    let yaml = seashard_tests::render_edge_static(
        Path::new("/x/base_router.wasm"),
        listen,
        admin,
        &[("dtable-server", a), ("dtable-server-2", b)],
    )
    .unwrap();
    let mut doc: Value = serde_yaml::from_str(&yaml).unwrap();

    let sa = |v: &Value| {
        format!(
            "{}:{}",
            v["address"].as_str().unwrap(),
            v["port_value"].as_u64().unwrap()
        )
    };
    assert_eq!(
        sa(&doc["admin"]["address"]["socket_address"]),
        "127.0.0.1:10003"
    );
    let listener = &doc["static_resources"]["listeners"][0];
    assert_eq!(sa(&listener["address"]["socket_address"]), "127.0.0.1:0");
    for (i, (name, addr)) in [("dtable-server", a), ("dtable-server-2", b)]
        .iter()
        .enumerate()
    {
        let c = &doc["static_resources"]["clusters"][i];
        assert_eq!(c["name"].as_str(), Some(*name));
        assert_eq!(c["type"].as_str(), Some("STATIC"));
        let ep = &c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"];
        assert_eq!(sa(&ep["address"]["socket_address"]), addr.to_string());
    }
    let plugin = bootstrap::wasm_plugin(&mut doc).unwrap();
    assert_eq!(
        plugin["vm_config"]["code"]["local"]["filename"].as_str(),
        Some("/x/base_router.wasm")
    );
    assert_eq!(plugin["failure_policy"].as_str(), Some("FAIL_RELOAD"));
    assert_eq!(plugin["root_id"].as_str(), Some("base_router"));

    // The shard map is the shipped one, untouched.
    let shipped =
        bootstrap::plugin_configuration(&mut bootstrap::load("edge-static.yaml").unwrap()).unwrap();
    assert_eq!(bootstrap::plugin_configuration(&mut doc).unwrap(), shipped);
    assert_eq!(shipped["version"], 1);
    assert_eq!(shipped["header"], "x-dtable-server");
    assert_eq!(shipped["map"]["slots"]["0-9"], "dtable-server-2");
    assert_eq!(shipped["map"]["slots"]["a-f"], "dtable-server");
    assert_eq!(shipped["map"]["pins"]["ff84e1a1-66e2"], "dtable-server-2");

    // A cluster the file does not have is an error, not a silent no-op.
    let err = seashard_tests::render_edge_static(
        Path::new("/x.wasm"),
        listen,
        admin,
        &[("dtable-server-3", a)],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("dtable-server-3"), "{err:#}");
}
