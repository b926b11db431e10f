//! Every manifest `seactl mesh istio` writes, validated against the schemas a
//! cluster would check them with: Kubernetes' own (PyPI `kubernetes-validate`,
//! strict: an unknown field is an error) and Istio's CRDs (npm
//! `@kubernetes-models/istio`: types, enums, required fields; it accepts unknown
//! field names, so the EnvoyFilters' Envoy part is proven by `mesh_istio.rs`,
//! where a real Envoy runs it). `.ci/setup` installs both, pinned. The pod patches
//! are validated merged into a StatefulSet, as `kubectl patch` would merge them.
//!
//! Each validator is also shown to refuse a broken manifest, so that a green run
//! means the manifests passed, not that nothing was checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, ensure};
use seashard_tests::mesh::Manifests;
use seashard_tests::{wasm_file, workspace_dir};
use serde_json::{Value, json};

/// The oldest Kubernetes the manifests are for, and the newest schemas shipped.
const KUBERNETES: [&str; 2] = ["1.29.0", "1.37.0"];

fn kubernetes_validate() -> Result<PathBuf> {
    let p = workspace_dir().join("target/mesh-venv/bin/kubernetes-validate");
    ensure!(
        p.exists(),
        "{} is missing: run `bash .ci/setup` (it installs the manifest validators)",
        p.display()
    );
    Ok(p)
}

fn istio_validator() -> Result<PathBuf> {
    let dir = workspace_dir().join("deploy/mesh/validate");
    ensure!(
        dir.join("node_modules/@kubernetes-models/istio").exists(),
        "Istio's schemas are not installed in {}: run `bash .ci/setup`",
        dir.display()
    );
    Ok(dir.join("validate.mjs"))
}

/// Runs both validators on `files`: Ok with the number of objects each accepted,
/// Err with their output when either refused one.
fn validate(files: &[PathBuf]) -> Result<(usize, usize)> {
    let mut core = usize::MAX;
    for version in KUBERNETES {
        let k = Command::new(kubernetes_validate()?)
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()?;
        let k_out =
            String::from_utf8_lossy(&k.stdout).into_owned() + &String::from_utf8_lossy(&k.stderr);
        ensure!(
            k.status.success() && !k_out.contains("ERROR"),
            "kubernetes-validate (Kubernetes {version}) refused:\n{k_out}"
        );
        let passed = k_out
            .lines()
            .filter(|l| l.contains(" passed for resource "))
            .count();
        core = core.min(passed);
    }
    let i = Command::new("node")
        .arg(istio_validator()?)
        .args(files)
        .output()?;
    let i_out =
        String::from_utf8_lossy(&i.stdout).into_owned() + &String::from_utf8_lossy(&i.stderr);
    let istio = i_out.lines().filter(|l| l.starts_with("ok ")).count();
    ensure!(i.status.success(), "the Istio schemas refused:\n{i_out}");
    Ok((core, istio))
}

/// `seactl mesh istio` on `config` (with `args`), every file validated; the
/// objects by kind.
fn generate_and_validate(dir: &Path, config: &Path, args: &[&str]) -> Result<Manifests> {
    let out = dir.join("out");
    let m = Manifests::generate(config, &wasm_file("base_router.wasm")?, &out, args)?;
    let mut files = Vec::new();
    let (mut core_expected, mut istio_expected) = (0, 0);
    for (name, docs) in &m.files {
        if let Some(server) = name.strip_prefix("pod-patches/") {
            // A patch, merged into a workload the way `kubectl patch` merges it.
            ensure!(docs.len() == 1, "{name}: one patch expected");
            let merged = dir.join(format!("merged-{}", server.replace('/', "-")));
            std::fs::write(
                &merged,
                serde_json::to_string(&patched_workload(&docs[0])?)?,
            )?;
            files.push(merged);
            core_expected += 1;
            continue;
        }
        for d in docs {
            if d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.contains("istio.io/"))
            {
                istio_expected += 1;
            } else {
                core_expected += 1;
            }
        }
        files.push(out.join(name));
    }
    let (core, istio) = validate(&files)?;
    ensure!(
        (core, istio) == (core_expected, istio_expected),
        "validated {core} Kubernetes and {istio} Istio objects, want {core_expected} and {istio_expected}"
    );
    Ok(m)
}

/// A StatefulSet of a dtable-server with `patch` merged into its pod template's
/// metadata (labels and annotations: maps, merged key by key).
fn patched_workload(patch: &Value) -> Result<Value> {
    let mut w = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "dtable-server-2", "namespace": "seatable"},
        "spec": {
            "serviceName": "dtable-server-2",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "dtable-server-2"}},
            "template": {
                "metadata": {"labels": {"app": "dtable-server-2"}, "annotations": {}},
                "spec": {"containers": [{"name": "dtable-server", "image": "seatable/seatable-enterprise:latest"}]},
            },
        },
    });
    let meta = &patch["spec"]["template"]["metadata"];
    ensure!(
        patch.as_object().is_some_and(|o| o.len() == 1) && meta.is_object(),
        "a patch must change the pod template's metadata only: {patch}"
    );
    for part in ["labels", "annotations"] {
        let target = w["spec"]["template"]["metadata"][part]
            .as_object_mut()
            .ok_or_else(|| anyhow!("no {part}"))?;
        for (k, v) in meta[part].as_object().into_iter().flatten() {
            ensure!(v.is_string(), "{part}.{k} is not a string: {v}");
            target.insert(k.clone(), v.clone());
        }
    }
    Ok(w)
}

fn shipped_example() -> PathBuf {
    workspace_dir().join("deploy/mesh/seashard.toml")
}

#[test]
fn the_shipped_example_etcd_three_replicas_validates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = generate_and_validate(dir.path(), &shipped_example(), &[])?;
    let d = m.object("Deployment", "seashard")?;
    ensure!(d["spec"]["replicas"] == 3, "{d}");
    let pdb = m.object("PodDisruptionBudget", "seashard")?;
    ensure!(pdb["spec"]["maxUnavailable"] == 1, "{pdb}");
    let probe = &d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"];
    ensure!(probe["path"] == "/healthz", "{probe}");
    // The token comes from the Secret; nothing secret is in any manifest.
    let all = serde_json::to_string(&m.files)?;
    ensure!(
        all.contains("\"secretRef\":{\"name\":\"seashard-secrets\"}"),
        "no secretRef"
    );
    Ok(())
}

#[test]
fn sqlite_one_replica_with_mutual_tls_and_two_edge_selectors_validates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let text = std::fs::read_to_string(shipped_example())?;
    let store = text
        .find("[store]")
        .zip(text.find("[api]"))
        .ok_or_else(|| anyhow!("no [store] or [api] in the example"))?;
    let text = format!(
        "{}[store]\npath = \"/var/lib/seashard/seashard.db\"\n\n\
         [listen.tls]\ncert = \"tls/cp.crt\"\nkey = \"tls/cp.key\"\nclient_ca = \"tls/ca.crt\"\n\
         require_node_id_match = false\n\n{}",
        &text[..store.0],
        &text[store.1..]
    );
    let config = dir.path().join("seashard.toml");
    std::fs::write(&config, text)?;
    std::fs::copy(
        shipped_example().with_file_name("map.json"),
        dir.path().join("map.json"),
    )?;
    let m = generate_and_validate(
        dir.path(),
        &config,
        &[
            "--tls-secret",
            "seashard-sidecar-tls",
            "--edge-selector",
            "app=dtable-web",
            "--edge-selector",
            "app=dtable-db,tier=backend",
        ],
    )?;
    let s = m.object("StatefulSet", "seashard")?;
    ensure!(s["spec"]["replicas"] == 1, "{s}");
    ensure!(
        s["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data",
        "no volume for SQLite: {s}"
    );
    m.object("EnvoyFilter", "seashard-edge-1")?;
    let e2 = m.object("EnvoyFilter", "seashard-edge-2")?;
    ensure!(
        e2["spec"]["workloadSelector"]["labels"] == json!({"app": "dtable-db", "tier": "backend"}),
        "{e2}"
    );
    let cm = m.object("ConfigMap", "seashard-bootstrap")?;
    let over: Value = serde_json::from_str(
        cm["data"]["custom_bootstrap.json"]
            .as_str()
            .context("no custom_bootstrap.json")?,
    )?;
    ensure!(
        over["static_resources"]["clusters"][0]["transport_socket"]["name"]
            == "envoy.transport_sockets.tls",
        "no TLS to the control plane: {over}"
    );
    Ok(())
}

#[test]
fn the_validators_refuse_broken_manifests() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let m = Manifests::generate(
        &shipped_example(),
        &wasm_file("base_router.wasm")?,
        &dir.path().join("out"),
        &[],
    )?;
    // An Istio enum misspelt.
    let mut filter = m.object("EnvoyFilter", "seashard-edge")?.clone();
    filter["spec"]["configPatches"][0]["applyTo"] = json!("HTTP_FILTERS");
    // A Kubernetes field that does not exist.
    let mut deployment = m.object("Deployment", "seashard")?.clone();
    deployment["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = json!({});
    for (name, doc) in [("filter.json", filter), ("deployment.json", deployment)] {
        let path = dir.path().join(name);
        std::fs::write(&path, doc.to_string())?;
        let err = validate(&[path])
            .err()
            .ok_or_else(|| anyhow!("{name} was accepted"))?;
        let text = format!("{err:#}");
        ensure!(
            text.contains("HTTP_FILTERS")
                || text.contains("allowed values")
                || text.contains("readynessProbe"),
            "{name} refused for another reason: {text}"
        );
    }
    Ok(())
}
