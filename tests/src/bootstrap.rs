//! Test variants of the checked-in Envoy bootstraps in `envoy/`.
//!
//! A test never carries its own copy of a bootstrap: it loads the shipped
//! file, edits its structure (addresses, the wasm path) and runs that, so
//! the example an operator deploys is the one the tests prove. Every edit
//! looks its target up by name and fails loudly when the file's shape
//! changed, instead of silently testing something else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml::Value;

/// The name of the wasm HttpFilter in the bootstraps.
pub const FILTER_NAME: &str = "seashard.base_router";

/// `<workspace>/envoy/NAME`.
pub fn envoy_file(name: &str) -> PathBuf {
    crate::workspace_dir().join("envoy").join(name)
}

/// Parses the checked-in `envoy/NAME`.
pub fn load(name: &str) -> Result<Value> {
    let path = envoy_file(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

/// `envoy/edge-static.yaml` made runnable on loopback: the listener on
/// `listen`, the admin interface on `admin` (port 0 is fine for both),
/// the filter's code from `wasm_path`, and each named cluster pointed at a
/// static loopback address. Every name in `clusters` must be a cluster of
/// the file. The plugin configuration (the shard map) is the shipped one.
pub fn render_edge_static(
    wasm_path: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    clusters: &[(&str, SocketAddr)],
) -> Result<String> {
    let mut doc = load("edge-static.yaml")?;
    set_admin(&mut doc, admin)?;
    set_listener(&mut doc, 0, listen)?;
    set_wasm_file(&mut doc, wasm_path)?;
    for (name, addr) in clusters {
        set_cluster_static(&mut doc, name, *addr)?;
    }
    to_yaml(&doc)
}

/// Serializes a bootstrap back to YAML text.
pub fn to_yaml(doc: &Value) -> Result<String> {
    Ok(serde_yaml::to_string(doc)?)
}

/// `doc[k1][k2]...` for mapping keys, or an error naming the missing step.
pub fn at<'a>(doc: &'a mut Value, path: &[&str]) -> Result<&'a mut Value> {
    let mut cur = doc;
    for (i, key) in path.iter().enumerate() {
        cur = cur
            .get_mut(*key)
            .ok_or_else(|| anyhow!("bootstrap has no {}", path[..=i].join(".")))?;
    }
    Ok(cur)
}

fn socket_address(addr: SocketAddr) -> Value {
    let mut m = serde_yaml::Mapping::new();
    m.insert("address".into(), addr.ip().to_string().into());
    m.insert("port_value".into(), u64::from(addr.port()).into());
    Value::Mapping(m)
}

/// Sets `admin.address.socket_address`.
pub fn set_admin(doc: &mut Value, admin: SocketAddr) -> Result<()> {
    *at(doc, &["admin", "address", "socket_address"])? = socket_address(admin);
    Ok(())
}

fn listeners(doc: &mut Value) -> Result<&mut Vec<Value>> {
    at(doc, &["static_resources", "listeners"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("static_resources.listeners is not a list"))
}

/// Sets the address of the `index`-th static listener.
pub fn set_listener(doc: &mut Value, index: usize, listen: SocketAddr) -> Result<()> {
    let l = listeners(doc)?
        .get_mut(index)
        .ok_or_else(|| anyhow!("bootstrap has no listener #{index}"))?;
    *at(l, &["address", "socket_address"])? = socket_address(listen);
    Ok(())
}

/// Every HTTP filter of every HTTP connection manager of the static listeners.
fn http_filters(doc: &mut Value) -> Result<Vec<&mut Value>> {
    let mut out = Vec::new();
    for l in listeners(doc)? {
        for hf in http_filter_lists(l)? {
            out.extend(hf.iter_mut());
        }
    }
    Ok(out)
}

/// The `http_filters` list of every HTTP connection manager of `listener`.
pub(crate) fn http_filter_lists(listener: &mut Value) -> Result<Vec<&mut Vec<Value>>> {
    let chains = at(listener, &["filter_chains"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("filter_chains is not a list"))?;
    let mut out = Vec::new();
    for chain in chains {
        let Some(filters) = chain.get_mut("filters").and_then(Value::as_sequence_mut) else {
            continue;
        };
        for f in filters {
            if let Some(hf) = f
                .get_mut("typed_config")
                .and_then(|t| t.get_mut("http_filters"))
                .and_then(Value::as_sequence_mut)
            {
                out.push(hf);
            }
        }
    }
    Ok(out)
}

/// The wasm plugin config (`typed_config.config`) of the filter [`FILTER_NAME`].
pub fn wasm_plugin(doc: &mut Value) -> Result<&mut Value> {
    let filter = http_filters(doc)?
        .into_iter()
        .find(|f| f.get("name").and_then(Value::as_str) == Some(FILTER_NAME))
        .ok_or_else(|| anyhow!("bootstrap has no http filter named {FILTER_NAME}"))?;
    at(filter, &["typed_config", "config"])
}

/// The plugin config (`config_discovery.default_config.config`) an ECDS-configured
/// filter runs until the control plane answers: the generated bootstraps' only
/// HttpFilter with `config_discovery` (its name is the ECDS resource, e.g.
/// `seashard.base_router.guard.dtable-server-2` for a guard).
pub fn ecds_default_plugin(doc: &mut Value) -> Result<&mut Value> {
    let filter = http_filters(doc)?
        .into_iter()
        .find(|f| f.get("config_discovery").is_some())
        .ok_or_else(|| anyhow!("bootstrap has no http filter with config_discovery"))?;
    at(filter, &["config_discovery", "default_config", "config"])
}

/// Points the filter's `vm_config.code.local.filename` at `wasm_path`.
pub fn set_wasm_file(doc: &mut Value, wasm_path: &Path) -> Result<()> {
    let file = at(
        wasm_plugin(doc)?,
        &["vm_config", "code", "local", "filename"],
    )?;
    *file = wasm_path.display().to_string().into();
    Ok(())
}

/// The filter's plugin configuration (the JSON string inside the
/// `google.protobuf.StringValue`), parsed.
pub fn plugin_configuration(doc: &mut Value) -> Result<serde_json::Value> {
    let value = at(wasm_plugin(doc)?, &["configuration", "value"])?
        .as_str()
        .ok_or_else(|| anyhow!("configuration.value is not a string"))?;
    serde_json::from_str(value).context("the filter's configuration is not JSON")
}

/// Replaces the filter's plugin configuration with `config` (as JSON text).
pub fn set_plugin_configuration(doc: &mut Value, config: &serde_json::Value) -> Result<()> {
    *at(wasm_plugin(doc)?, &["configuration", "value"])? = config.to_string().into();
    Ok(())
}

/// Makes cluster `name` a STATIC cluster with the single endpoint `addr`.
pub fn set_cluster_static(doc: &mut Value, name: &str, addr: SocketAddr) -> Result<()> {
    let clusters = at(doc, &["static_resources", "clusters"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("static_resources.clusters is not a list"))?;
    let cluster = clusters
        .iter_mut()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .ok_or_else(|| anyhow!("bootstrap has no cluster named {name:?}"))?;
    cluster["type"] = "STATIC".into();
    let endpoints = at(cluster, &["load_assignment", "endpoints"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("cluster {name}: endpoints is not a list"))?;
    if endpoints.len() != 1 {
        bail!(
            "cluster {name}: expected one locality, found {}",
            endpoints.len()
        );
    }
    let lb = at(&mut endpoints[0], &["lb_endpoints"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("cluster {name}: lb_endpoints is not a list"))?;
    if lb.len() != 1 {
        bail!("cluster {name}: expected one endpoint, found {}", lb.len());
    }
    *at(&mut lb[0], &["endpoint", "address", "socket_address"])? = socket_address(addr);
    Ok(())
}
