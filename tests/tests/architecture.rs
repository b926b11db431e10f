//! The dependency direction ARCHITECTURE.md draws, checked: each crate depends only
//! on the crates below it (from `cargo metadata`), and the control plane's modules
//! form no import circle (from their `crate::` paths).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, anyhow, ensure};
use seashard_tests::workspace_dir;
use serde_json::Value;

/// What each workspace crate may depend on (normal and build dependencies; tests
/// and benches may use anything). ARCHITECTURE.md's "Code map" says why.
const ALLOWED: &[(&str, &[&str])] = &[
    ("shardmap", &[]),
    ("base-router", &["shardmap"]),
    ("bench-noop", &[]),
    ("wasm-host", &[]),
    ("rollout-model", &[]),
    ("nginx-audit", &["shardmap"]),
    ("daemon", &[]),
    ("agent", &["daemon"]),
    ("control-plane", &["shardmap", "daemon"]),
    ("deploy", &["shardmap", "control-plane", "daemon"]),
    ("certs", &[]),
    (
        "seactl",
        &[
            "shardmap",
            "nginx-audit",
            "control-plane",
            "daemon",
            "agent",
            "deploy",
            "certs",
        ],
    ),
    ("seashard-tests", &["shardmap"]),
];

fn metadata() -> Result<Value> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_dir())
        .output()?;
    ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[test]
fn crates_depend_only_downward() -> Result<()> {
    let meta = metadata()?;
    let packages = meta["packages"]
        .as_array()
        .ok_or_else(|| anyhow!("no packages in cargo metadata"))?;
    let members: BTreeSet<&str> = packages.iter().filter_map(|p| p["name"].as_str()).collect();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let unlisted: Vec<_> = members
        .iter()
        .filter(|m| !allowed.contains_key(*m))
        .collect();
    ensure!(
        unlisted.is_empty(),
        "crates with no place in the dependency order (add them to ALLOWED and to \
         ARCHITECTURE.md): {unlisted:?}"
    );
    let mut wrong = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default();
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            let dev = d["kind"] == "dev";
            if members.contains(dep) && !dev && !allowed[name].contains(&dep) {
                wrong.push(format!("{name} -> {dep}"));
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "dependencies against the order: {wrong:?}"
    );
    Ok(())
}

/// The modules `src/*.rs` (and `src/*/mod.rs`) of a crate name with `crate::NAME`.
fn module_imports(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(src)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "rs") {
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            files.push((stem, path));
        } else if path.join("mod.rs").exists() {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            for f in walk(&path)? {
                files.push((name.clone(), f));
            }
        }
    }
    let names: BTreeSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        let text = std::fs::read_to_string(path)?;
        // Test code may reach anywhere; comments name without importing.
        let code: String = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let uses = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let target: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if names.contains(&target) && target != *module {
                uses.insert(target);
            }
        }
        // `use crate::{a, b::c}`.
        for (i, _) in code.match_indices("use crate::{") {
            let rest = &code[i + "use crate::{".len()..];
            let list = rest.split('}').next().unwrap_or_default();
            for item in list.split(',') {
                let target = item.trim().split("::").next().unwrap_or_default().trim();
                if names.contains(target) && target != module {
                    uses.insert(target.to_owned());
                }
            }
        }
    }
    Ok(graph)
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    Ok(out)
}

/// A circle in `graph`, if any: the modules along it.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()) {
                Some(1) => {
                    let start = path.iter().position(|p| p == m).unwrap_or(0);
                    let mut c = path[start..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(m, graph, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if !state.contains_key(n.as_str())
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_control_plane_modules_import_no_circle() -> Result<()> {
    let graph = module_imports(&workspace_dir().join("control-plane/src"))
        .context("reading control-plane/src")?;
    ensure!(graph.len() > 10, "too few modules read: {graph:?}");
    if let Some(c) = circle(&graph) {
        anyhow::bail!("an import circle: {}", c.join(" -> "));
    }
    Ok(())
}

#[test]
fn the_circle_check_finds_a_circle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("api", vec!["forward", "config"]),
        ("forward", vec!["api"]),
        ("config", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        circle(&g),
        Some(vec![
            "api".to_owned(),
            "forward".to_owned(),
            "api".to_owned()
        ])
    );
    let mut dag = g.clone();
    dag.insert("forward".into(), BTreeSet::new());
    assert_eq!(circle(&dag), None);
}
