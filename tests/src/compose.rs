//! The SeaTable compose files of `deploy/compose`: where they are, the
//! `seactl envoy-bootstrap` arguments of the bootstraps they mount, and the
//! services of `docker-compose config`'s normalized output.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml::Value;

use crate::workspace_dir;

/// The control plane's ADS address as the bootstraps name it: the service of
/// `dtable-web.yml`, a host name (`extra_hosts`) on the dtable-server nodes.
pub const CONTROL_PLANE: &str = "seashard-control-plane:18000";

/// Each Envoy bootstrap in `deploy/compose` and the `seactl envoy-bootstrap`
/// arguments that generate it (`-o deploy/compose/FILE`).
pub const BOOTSTRAPS: [(&str, &[&str]); 3] = [
    (
        "edge.yaml",
        &[
            "--kind",
            "edge",
            "--node-id",
            "edge-dtable-web",
            "--control-plane",
            CONTROL_PLANE,
        ],
    ),
    (
        "guard-dtable-server.yaml",
        &[
            "--kind",
            "guard",
            "--server",
            "dtable-server",
            "--upstream",
            "seatable-server:5000",
            "--node-id",
            "guard-dtable-server",
            "--control-plane",
            CONTROL_PLANE,
        ],
    ),
    (
        "guard-dtable-server-2.yaml",
        &[
            "--kind",
            "guard",
            "--server",
            "dtable-server-2",
            "--upstream",
            "seatable-server:5000",
            "--node-id",
            "guard-dtable-server-2",
            "--control-plane",
            CONTROL_PLANE,
        ],
    ),
];

/// Debian's docker-compose 1.29 (`.ci/setup`), or `$DOCKER_COMPOSE_BIN`.
pub fn docker_compose_bin() -> Result<PathBuf> {
    crate::process::find_binary(
        "DOCKER_COMPOSE_BIN",
        &[PathBuf::from("/usr/bin/docker-compose")],
        "run `bash .ci/setup` to install Debian's docker-compose, or set DOCKER_COMPOSE_BIN",
    )
}

/// `deploy/compose`.
pub fn dir() -> PathBuf {
    workspace_dir().join("deploy").join("compose")
}

/// The generator's arguments of the shipped bootstrap `file`.
pub fn bootstrap_args(file: &str) -> Result<Vec<String>> {
    BOOTSTRAPS
        .iter()
        .find(|(f, _)| *f == file)
        .map(|(_, args)| args.iter().map(|a| a.to_string()).collect())
        .ok_or_else(|| anyhow!("deploy/compose has no bootstrap {file}"))
}

/// `args` with the value of each flag in `drop` removed (flag and value).
pub fn without_flags(args: &[String], drop: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if drop.contains(&a.as_str()) {
            it.next();
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// The value following `flag` in `args`.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// `HOST:PORT` split (no IPv6 brackets: the compose files use names and IPv4).
pub fn host_port(addr: &str) -> Result<(&str, u16)> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("`{addr}` is not HOST:PORT"))?;
    Ok((
        host,
        port.parse().with_context(|| format!("port of `{addr}`"))?,
    ))
}

/// One published port of a service: `[HOST_IP:]PUBLISHED:TARGET[/PROTO]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub host_ip: Option<String>,
    pub published: u16,
    pub target: u16,
}

/// One service of `docker-compose config`'s output.
pub struct Service<'a> {
    pub name: String,
    pub doc: &'a Value,
}

/// The services of a normalized compose document.
pub fn services(doc: &Value) -> Result<Vec<Service<'_>>> {
    let map = doc["services"]
        .as_mapping()
        .ok_or_else(|| anyhow!("no services in {doc:?}"))?;
    map.iter()
        .map(|(k, v)| {
            Ok(Service {
                name: k
                    .as_str()
                    .ok_or_else(|| anyhow!("service name {k:?}"))?
                    .to_owned(),
                doc: v,
            })
        })
        .collect()
}

/// The service `name` of `doc`.
pub fn service<'a>(doc: &'a Value, name: &str) -> Result<Service<'a>> {
    services(doc)?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| anyhow!("no service {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_owned))
        .collect()
}

impl Service<'_> {
    /// Its published ports (compose 1.29 prints them as maps, or as strings when
    /// a host address is given).
    pub fn ports(&self) -> Result<Vec<Published>> {
        let mut out = Vec::new();
        for p in self.doc["ports"].as_sequence().into_iter().flatten() {
            let port = |v: &Value| -> Result<u16> {
                match v {
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| anyhow!("port {n}")),
                    Value::String(s) => Ok(s.parse()?),
                    other => bail!("port {other:?}"),
                }
            };
            out.push(match p {
                Value::String(s) => {
                    let s = s.split('/').next().unwrap_or_default();
                    let parts: Vec<&str> = s.split(':').collect();
                    let (host_ip, published, target) = match parts.as_slice() {
                        [ip, p, t] => (Some(ip.to_string()), *p, *t),
                        [p, t] => (None, *p, *t),
                        _ => bail!("{}: port `{s}`", self.name),
                    };
                    Published {
                        host_ip,
                        published: published.parse()?,
                        target: target.parse()?,
                    }
                }
                Value::Mapping(_) => Published {
                    host_ip: p["host_ip"].as_str().map(str::to_owned),
                    published: port(&p["published"])?,
                    target: port(&p["target"])?,
                },
                other => bail!("{}: port {other:?}", self.name),
            });
        }
        Ok(out)
    }

    /// The host port that publishes container port `target`.
    pub fn published(&self, target: u16) -> Result<Published> {
        self.ports()?
            .into_iter()
            .find(|p| p.target == target)
            .ok_or_else(|| anyhow!("{} does not publish its port {target}", self.name))
    }

    /// Its bind mounts and volumes as (source, target).
    pub fn volumes(&self) -> Vec<(String, String)> {
        self.doc["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| match v {
                Value::String(s) => {
                    let mut parts = s.split(':');
                    Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
                }
                Value::Mapping(_) => Some((
                    v["source"].as_str()?.to_owned(),
                    v["target"].as_str()?.to_owned(),
                )),
                _ => None,
            })
            .collect()
    }

    /// The source mounted at `target`.
    pub fn mounted_at(&self, target: &str) -> Result<PathBuf> {
        self.volumes()
            .into_iter()
            .find(|(_, t)| t == target)
            .map(|(s, _)| PathBuf::from(s))
            .ok_or_else(|| anyhow!("{} mounts nothing at {target}", self.name))
    }

    /// `extra_hosts` as (name, address).
    pub fn extra_hosts(&self) -> Vec<(String, String)> {
        strings(&self.doc["extra_hosts"])
            .into_iter()
            .filter_map(|h| {
                let (n, a) = h.split_once(':')?;
                Some((n.to_owned(), a.to_owned()))
            })
            .collect()
    }

    /// The environment variable `name`.
    pub fn env(&self, name: &str) -> Option<String> {
        match &self.doc["environment"][name] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// Its command, an argv.
    pub fn command(&self) -> Vec<String> {
        strings(&self.doc["command"])
    }
}

/// Reads `path` (a shipped file) as text.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
}
