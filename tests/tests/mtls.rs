//! ADS over mutual TLS with real processes: `seactl certs` makes the CA and the
//! certificates, `seactl serve` requires client certificates (`[listen.tls]`,
//! node ids bound to them), Envoys 1.40 bootstrapped by `seactl envoy-bootstrap
//! --tls-ca --tls-cert --tls-key` get their maps and ACK; Envoys with another CA's
//! certificate, with none, or with another node's are refused, never counted, and a
//! rollout completes without them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, seactl_bin};
use seashard_tests::{Envoy, Upstream, bootstrap, free_port, loopback, wait_until, wasm_file};
use serde_json::{Value, json};

const A: &str = "dtable-server";
const B: &str = "dtable-server-2";
const WAIT: Duration = Duration::from_secs(30);

/// `seactl ARGS`, which must succeed; its stdout.
fn seactl(args: &[&str]) -> Result<String> {
    let out = Command::new(seactl_bin()?).args(args).output()?;
    if !out.status.success() {
        bail!(
            "seactl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A CA in `dir` with the control plane's certificate and the client certificates
/// of `node_ids`.
fn make_certs(dir: &Path, node_ids: &[&str]) -> Result<()> {
    let d = dir.to_str().context("utf-8 path")?;
    seactl(&["certs", "init", "--dir", d])?;
    seactl(&[
        "certs",
        "server",
        "--dir",
        d,
        "--name",
        "control-plane",
        "--san",
        "127.0.0.1",
    ])?;
    for id in node_ids {
        seactl(&["certs", "client", "--dir", d, "--node-id", id])?;
    }
    Ok(())
}

/// A control plane over two echo servers (restart hook `true`, health `/ping/`),
/// ADS over mutual TLS with node ids bound to certificates.
struct Setup {
    dir: tempfile::TempDir,
    tls: PathBuf,
    cp: ControlPlaneProcess,
    _servers: Vec<Upstream>,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::Builder::new()
        .prefix("seashard-mtls-")
        .tempdir()?;
    let tls = dir.path().join("tls");
    make_certs(&tls, &["edge-1", "edge-2", "edge-9"])?;
    let servers = vec![Upstream::start(A)?, Upstream::start(B)?];
    let (http, grpc) = (loopback(free_port()?), loopback(free_port()?));
    std::fs::write(
        dir.path().join("initial.json"),
        json!({"default": A, "slots": {"0-7": A, "8-f": B}}).to_string(),
    )?;
    let wasm = wasm_file("base_router.wasm")?;
    let mut text = format!(
        "initial_map = \"initial.json\"\n\
         [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
         [listen.tls]\ncert = \"tls/control-plane.crt\"\nkey = \"tls/control-plane.key\"\n\
         client_ca = \"tls/ca.crt\"\nrequire_node_id_match = true\n\
         [store]\npath = \"seashard.db\"\n\
         [api]\ntoken = \"{TOKEN}\"\n\
         [filter]\nwasm = {wasm:?}\nretry_after = 1\n\
         [rollout]\nack_timeout = \"10s\"\nhealth_timeout = \"10s\"\nrestart_timeout = \"10s\"\n\
         drain = \"100ms\"\n"
    );
    for s in &servers {
        text.push_str(&format!(
            "[[server]]\nname = \"{}\"\naddress = \"{}\"\nrestart = {{ kind = \"command\", argv = [\"true\"] }}\n",
            s.name, s.addr
        ));
    }
    let config = dir.path().join("seashard.toml");
    std::fs::write(&config, text)?;
    let cp = ControlPlaneProcess::start(&config, http, grpc)?;
    Ok(Setup {
        dir,
        tls,
        cp,
        _servers: servers,
    })
}

/// An edge Envoy `node_id` over TLS to `grpc`: `--tls-ca CA`, and with
/// `client = Some((cert, key))` its client certificate. The CDS initial fetch gives
/// up after 1 s, so a refused Envoy still starts (and keeps retrying).
fn start_envoy(
    node_id: &str,
    grpc: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Envoy> {
    let wasm = wasm_file("base_router.wasm")?;
    let mut cmd = Command::new(seactl_bin()?);
    cmd.args(["envoy-bootstrap", "--kind", "edge", "--node-id", node_id])
        .args(["--control-plane", &grpc.to_string()])
        .args(["--listen-port", "0", "--admin-port", "0"])
        .arg("--wasm")
        .arg(&wasm)
        .arg("--tls-ca")
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "seactl envoy-bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut doc: serde_yaml::Value = serde_yaml::from_slice(&out.stdout)?;
    bootstrap::set_listener(&mut doc, 0, loopback(0))?;
    bootstrap::at(&mut doc, &["dynamic_resources", "cds_config"])?
        .as_mapping_mut()
        .context("cds_config is a mapping")?
        .insert("initial_fetch_timeout".into(), "1s".into());
    Envoy::start(&bootstrap::to_yaml(&doc)?)
}

fn node_ids(cp: &ControlPlaneProcess) -> Result<Vec<String>> {
    let nodes = cp.get_json("/v1/nodes")?;
    let list = nodes
        .as_array()
        .or_else(|| nodes["nodes"].as_array())
        .context("no node list")?;
    Ok(list
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_owned))
        .collect())
}

fn metric(cp: &ControlPlaneProcess, name: &str) -> Result<u64> {
    let auth = format!("Bearer {TOKEN}");
    let text =
        seashard_tests::get(cp.http, "/metrics", &[("authorization", auth.as_str())])?.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .with_context(|| format!("{name} not in /metrics:\n{text}"))
}

#[test]
fn two_envoys_over_mutual_tls_get_every_map_and_ack() -> Result<()> {
    let s = setup()?;
    let ca = s.tls.join("ca.crt");
    let envoys = ["edge-1", "edge-2"]
        .iter()
        .map(|id| {
            let (cert, key) = (
                s.tls.join(format!("{id}.crt")),
                s.tls.join(format!("{id}.key")),
            );
            start_envoy(id, s.cp.grpc, &ca, Some((&cert, &key)))
        })
        .collect::<Result<Vec<_>>>()?;
    s.cp.wait_current(&["edge-1", "edge-2"])
        .with_context(|| s.cp.logs())?;
    // A new map (a path rule: nothing moves) reaches both and both ACK it.
    let (status, body) = s.cp.post(
        "/v1/maps",
        &json!({"map": {"default": A, "slots": {"0-7": A, "8-f": B},
                        "paths": [{"prefix": "/api/v1/admin/", "server": B}]}}),
    )?;
    assert_eq!(status, 200, "{body}");
    s.cp.wait_current(&["edge-1", "edge-2"])?;
    let status = s.cp.get_json("/v1/status")?;
    assert_eq!(status["version"], 2, "{status}");
    for e in &envoys {
        assert_eq!(e.stat("control_plane.connected_state")?, Some(1));
        assert!(
            e.stat("cluster.seashard_control_plane.ssl.handshake")? >= Some(1),
            "over TLS"
        );
    }
    drop(envoys);
    drop(s.dir);
    Ok(())
}

#[test]
fn refused_envoys_are_never_nodes_and_never_hold_a_rollout() -> Result<()> {
    let s = setup()?;
    let ca = s.tls.join("ca.crt");
    let other = s.dir.path().join("other");
    make_certs(&other, &["edge-3"])?;
    let cert = |d: &Path, id: &str| (d.join(format!("{id}.crt")), d.join(format!("{id}.key")));

    let (c1, k1) = cert(&s.tls, "edge-1");
    let good = start_envoy("edge-1", s.cp.grpc, &ca, Some((&c1, &k1)))?;
    s.cp.wait_current(&["edge-1"])?;
    // A certificate of another CA; none at all; edge-9's certificate naming edge-2.
    let (c3, k3) = cert(&other, "edge-3");
    let (c9, k9) = cert(&s.tls, "edge-9");
    let refused = [
        start_envoy("edge-3", s.cp.grpc, &ca, Some((&c3, &k3)))?,
        start_envoy("edge-4", s.cp.grpc, &ca, None)?,
        start_envoy("edge-2", s.cp.grpc, &ca, Some((&c9, &k9)))?,
    ];
    // Each has tried: two handshakes refused, one stream ended PERMISSION_DENIED.
    wait_until(WAIT, "the refusals", || {
        let handshakes = metric(
            &s.cp,
            "seashard_tls_handshake_failures_total{listener=\"ads\"}",
        )?;
        let denied = metric(&s.cp, "seashard_ads_node_id_refused_total")?;
        Ok((handshakes >= 2 && denied >= 1).then_some(()))
    })
    .with_context(|| s.cp.logs())?;
    let logs = s.cp.logs();
    assert!(logs.contains("TLS handshake refused"), "{logs}");
    assert!(
        logs.contains("PermissionDenied") && logs.contains("node id `edge-2` refused"),
        "{logs}"
    );
    assert!(
        refused[2].logs().contains("closed: 7"),
        "Envoy was told PERMISSION_DENIED (gRPC 7): {}",
        refused[2].logs()
    );
    // Refused at the handshake, or its stream ended at once (PERMISSION_DENIED):
    // not connected, but the latter re-opens a stream on its backoff, so its
    // state is 1 for the moment each attempt lasts.
    for e in &refused {
        wait_until(
            Duration::from_secs(10),
            "a refused Envoy to be disconnected",
            || Ok((e.stat("control_plane.connected_state")? == Some(0)).then_some(())),
        )?;
    }
    assert_eq!(node_ids(&s.cp)?, ["edge-1"]);

    // A rollout that moves bases 4-7 from A to B: fence, restart, activate, done,
    // waiting for edge-1 only (ack_timeout is 10 s: waiting for a refused Envoy
    // would roll it back).
    let began = Instant::now();
    let (status, body) = s.cp.post(
        "/v1/maps",
        &json!({"map": {"default": A, "slots": {"0-3": A, "4-f": B}}, "comment": "mtls"}),
    )?;
    assert_eq!(status, 202, "{body}");
    let id = body["rollout"].as_u64().context("rollout id")?;
    let rollout: Value = wait_until(Duration::from_secs(60), "the rollout to end", || {
        let r = s.cp.get_json(&format!("/v1/rollouts/{id}"))?;
        Ok(matches!(r["state"].as_str(), Some("done" | "rolled_back")).then_some(r))
    })
    .with_context(|| s.cp.logs())?;
    assert_eq!(rollout["state"], "done", "{rollout}\n{}", s.cp.logs());
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "{:?}",
        began.elapsed()
    );
    s.cp.wait_current(&["edge-1"])?;
    assert_eq!(node_ids(&s.cp)?, ["edge-1"]);
    drop(refused);
    drop(good);
    Ok(())
}
