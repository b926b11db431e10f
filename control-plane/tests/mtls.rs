//! ADS over mutual TLS and the API over HTTPS, in-process: who gets a stream, who is
//! refused and how, and that the refused never count as nodes.

mod sim;

use std::time::Duration;

use control_plane::{ResourceType, Running};
use sim::{SimTls, first_response};
use tempfile::TempDir;

/// A control plane whose ADS requires a client certificate of a new CA (`tls`) and,
/// with `bind`, node ids matching the certificates; in a temporary directory.
async fn with_ca(bind: bool) -> (TempDir, SimTls, Running) {
    let dir = tempfile::tempdir().unwrap();
    let tls = SimTls::new(&dir.path().join("tls"));
    let running = sim::start_mtls(dir.path(), &tls, bind).await;
    (dir, tls, running)
}

/// Another CA's certificates, in `dir`.
fn other_ca(dir: &TempDir) -> SimTls {
    SimTls::new(&dir.path().join("other"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ads_needs_a_client_certificate_of_the_ca_and_a_matching_node_id() {
    let (dir, tls, running) = with_ca(true).await;
    let other = other_ca(&dir);
    let addr = running.grpc_addr;

    // Its own certificate: served.
    first_response(addr, "edge-1", Some(tls.client("edge-1")))
        .await
        .unwrap();
    // Another node's certificate: PERMISSION_DENIED, naming both.
    let err = first_response(addr, "edge-2", Some(tls.client("edge-1")))
        .await
        .unwrap_err();
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert!(
        err.contains("`edge-2`") && err.contains("CN edge-1"),
        "{err}"
    );
    // A certificate of another CA, no certificate, no TLS: the handshake fails.
    for (what, client) in [
        ("another CA", Some(other.client("edge-3"))),
        ("no certificate", Some(tls.anonymous())),
        ("plain gRPC", None),
    ] {
        let r = first_response(addr, "edge-3", client).await;
        assert!(r.is_err(), "{what}: served");
    }

    // Only edge-1 is known; the refusals are counted.
    let nodes: Vec<String> = running
        .plane
        .registry()
        .nodes()
        .iter()
        .map(|n| n.id.clone())
        .collect();
    assert_eq!(nodes, ["edge-1"]);
    let text = sim::metrics(&running);
    assert!(
        text.contains("seashard_ads_node_id_refused_total 1"),
        "{text}"
    );
    // The server counts a failed handshake when its own side of it ends, which may
    // be after the client gave up (TLS 1.3: the client's certificate is judged after
    // the client's handshake finished).
    let failed = || {
        let text = sim::metrics(&running);
        let line = text
            .lines()
            .find(|l| l.starts_with("seashard_tls_handshake_failures_total{listener=\"ads\"}"))
            .map(str::to_owned)
            .unwrap();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while failed() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(failed() >= 3, "{} handshake failures counted", failed());
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_binding_any_certificate_of_the_ca_may_name_any_node() {
    let (_dir, tls, running) = with_ca(false).await;
    let shared = tls.client("fleet");
    for id in ["edge-1", "edge-2"] {
        first_response(running.grpc_addr, id, Some(shared.clone()))
            .await
            .unwrap();
    }
    running.shutdown().await;
}

/// A push reaches Envoys over mutual TLS and every one ACKs; the refused ones are
/// not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_mtls_converges_without_the_refused() {
    let (dir, tls, running) = with_ca(true).await;
    let other = other_ca(&dir);
    // Refused Envoys keep retrying meanwhile.
    let addr = running.grpc_addr;
    let impostor = tls.client("sim-0000");
    let stranger = other.client("sim-9999");
    let retries = tokio::spawn(async move {
        loop {
            let _ = first_response(addr, "sim-0001-impostor", Some(impostor.clone())).await;
            let _ = first_response(addr, "sim-9999", Some(stranger.clone())).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let n = 20;
    sim::connect_all_with(&running, n, Duration::from_secs(30), Some(&tls)).await;
    for i in 0..3 {
        sim::push_and_wait(&running.plane, i, Duration::from_secs(10)).await;
    }
    retries.abort();
    assert_eq!(running.plane.registry().nodes().len(), n);
    let snap = running.plane.snapshot();
    let c = running
        .plane
        .registry()
        .convergence(ResourceType::Ecds, &snap.ecds.version);
    assert_eq!(c.acked.len(), n);
    running.shutdown().await;
}

/// With `[api.tls]` the API answers over HTTPS, verified against the CA, and not
/// over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_over_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let tls = SimTls::new(&dir.path().join("tls"));
    let d = tls.dir.display();
    let running = sim::start_with(
        dir.path(),
        "",
        &format!("[api.tls]\ncert = \"{d}/control-plane.crt\"\nkey = \"{d}/control-plane.key\"\n"),
    )
    .await;
    let port = running.http_addr.port();
    let ca = tls.dir.join("ca.crt");

    let answers = tokio::task::spawn_blocking(move || {
        let trusting: ureq::Agent = seashard_tests::http::https_client(&ca)
            .unwrap()
            .build()
            .into();
        let https = trusting
            .get(format!("https://localhost:{port}/healthz"))
            .call()
            .map(|r| r.status().as_u16());
        let untrusted = ureq::get(format!("https://localhost:{port}/healthz")).call();
        let plain = ureq::get(format!("http://127.0.0.1:{port}/healthz")).call();
        (https, untrusted.is_err(), plain.is_err())
    })
    .await
    .unwrap();
    assert_eq!(answers.0.unwrap(), 200);
    assert!(
        answers.1,
        "a client without the CA must refuse the certificate"
    );
    assert!(answers.2, "no plain HTTP");
    running.shutdown().await;
}

/// REST xDS proves no certificate: with node ids bound to certificates it is
/// refused (403), and no node is made; without the binding it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_xds_is_refused_where_node_ids_are_bound() {
    for bind in [true, false] {
        let (_dir, _tls, running) = with_ca(bind).await;
        let url = format!("http://{}/v3/discovery:clusters", running.http_addr);
        let (status, body) = tokio::task::spawn_blocking(move || {
            let request = r#"{"node": {"id": "edge-1", "cluster": "rest"}, "type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#;
            sim::fetch("POST", &url, None, Some("application/json"), request.as_bytes())
        })
        .await
        .unwrap();
        if bind {
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("require_node_id_match"), "{body}");
            assert!(running.plane.registry().nodes().is_empty());
        } else {
            assert_eq!(status, 200, "{body}");
        }
        running.shutdown().await;
    }
}
