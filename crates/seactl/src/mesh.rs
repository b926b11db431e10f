//! `seactl mesh istio`: writes the manifests that put seashard into an Istio mesh
//! (`deploy::istio`), one file per concern, into a directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use control_plane::Config;

#[derive(Debug, clap::Args)]
pub struct MeshArgs {
    #[command(subcommand)]
    pub mesh: Mesh,
}

#[derive(Debug, clap::Subcommand)]
pub enum Mesh {
    /// Istio sidecars as edges (dtable-server's clients) and guards (dtable-server
    /// pods), routing by a VirtualService header match, the control plane in the
    /// cluster.
    Istio(IstioArgs),
}

#[derive(Debug, clap::Args)]
pub struct IstioArgs {
    /// The control plane's configuration as it will run in the cluster (every
    /// server `guarded = true`, secrets by `*_env` only, listening on 0.0.0.0).
    #[arg(long, short = 'c')]
    pub config: PathBuf,
    /// The namespace of SeaTable and seashard.
    #[arg(long, default_value = "seatable")]
    pub namespace: String,
    /// The prefix of every resource's name.
    #[arg(long, default_value = "seashard")]
    pub name: String,
    /// The control plane's image (seactl on its PATH; kubectl too for kubectl hooks).
    #[arg(long)]
    pub image: String,
    /// Control plane replicas (the etcd store; SQLite runs one).
    #[arg(long)]
    pub replicas: Option<u32>,
    /// The base-router module to ship in a ConfigMap.
    #[arg(long, default_value = "/opt/seashard/base-router.wasm")]
    pub wasm: PathBuf,
    /// The Service dtable-server's clients call, HOST:PORT [default: the first
    /// server's address].
    #[arg(long)]
    pub entry: Option<String>,
    /// Labels selecting the edge sidecars, KEY=VALUE[,KEY=VALUE] (repeatable: one
    /// EnvoyFilter each) [default: seashard.io/edge=true].
    #[arg(long = "edge-selector", value_name = "KEY=VALUE[,...]")]
    pub edge_selectors: Vec<String>,
    /// The Secret whose keys become the control plane's environment.
    #[arg(long, default_value = "seashard-secrets")]
    pub secret: String,
    /// The Secret with the sidecars' client certificate for ADS over mutual TLS
    /// (ca.crt, tls.crt, tls.key), with `[listen.tls]`.
    #[arg(long)]
    pub tls_secret: Option<String>,
    /// Where to write the files (created; existing files are replaced).
    #[arg(long, short = 'o')]
    pub output_dir: PathBuf,
}

pub fn mesh(args: MeshArgs) -> Result<ExitCode> {
    match args.mesh {
        Mesh::Istio(a) => istio(a),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn istio(a: IstioArgs) -> Result<ExitCode> {
    let text = read(&a.config)?;
    let config = Config::load(&a.config)?;
    let wasm = std::fs::read(&a.wasm)
        .with_context(|| format!("reading the module {}", a.wasm.display()))?;
    // The initial map ships in the same ConfigMap, so it must be named as a file
    // beside the configuration (as written, before paths are resolved).
    let written = Config::parse(&text)?.initial_map;
    let map = match (&config.initial_map, written) {
        (Some(p), Some(w)) => {
            let name = w
                .to_str()
                .filter(|n| !n.is_empty() && !n.contains('/'))
                .with_context(|| {
                    format!(
                        "initial_map = \"{}\": name a file beside the configuration (it is \
                         shipped in the same ConfigMap)",
                        w.display()
                    )
                })?
                .to_owned();
            Some((name, read(p)?))
        }
        _ => None,
    };
    let edge_selectors = a
        .edge_selectors
        .iter()
        .map(|s| selector(s))
        .collect::<Result<Vec<_>>>()?;
    let storage_sqlite = config.store.kind == control_plane::config::StoreKind::Sqlite;
    let options = deploy::istio::Options {
        config: &config,
        config_text: &text,
        initial_map: map.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        namespace: a.namespace,
        name: a.name,
        image: a.image,
        replicas: a.replicas.unwrap_or(if storage_sqlite { 1 } else { 3 }),
        wasm: &wasm,
        entry: a.entry,
        edge_selectors,
        secret: a.secret,
        tls_secret: a.tls_secret,
    };
    let files = deploy::istio::render(&options)?;
    for m in &files {
        let path = a.output_dir.join(&m.file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, m.to_yaml())
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `KEY=VALUE[,KEY=VALUE]`.
fn selector(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .filter(|(k, v)| !k.trim().is_empty() && !v.trim().is_empty())
            .with_context(|| format!("--edge-selector `{s}`: want KEY=VALUE[,KEY=VALUE]"))?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}
