//! `seactl envoy-bootstrap`: prints an Envoy bootstrap managed by the control plane.
//! Every flag left out takes the generator's default (`control_plane::bootstrap`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use control_plane::bootstrap::{Kind, Options, Xds, render};
use control_plane::config::parse_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Replaces SeaTable's dtable-server-proxy: listens on all interfaces.
    Edge,
    /// Next to one client of dtable-server: listens on 127.0.0.1.
    Sidecar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdsArg {
    /// ADS over gRPC: `--control-plane` is the control plane's gRPC address.
    Grpc,
    /// REST-JSON polling, where gRPC cannot pass: `--control-plane` is its HTTP address.
    Rest,
}

#[derive(Debug, clap::Args)]
pub struct BootstrapArgs {
    #[arg(long, value_enum, default_value = "edge")]
    pub kind: KindArg,
    /// This Envoy's node id, unique per Envoy [default: edge-1 / sidecar-1].
    #[arg(long)]
    pub node_id: Option<String>,
    /// A group name for `status` [default: seashard-edge / seashard-sidecar].
    #[arg(long)]
    pub node_cluster: Option<String>,
    /// The control plane's ADS address, HOST:PORT [default: seashard-control-plane:18000].
    #[arg(long)]
    pub control_plane: Option<String>,
    /// How Envoy reaches the control plane.
    #[arg(long, value_enum, default_value = "grpc")]
    pub xds: XdsArg,
    /// How often a REST poller asks, e.g. `1s` (with `--xds rest`) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub refresh_delay: Option<std::time::Duration>,
    /// The listener's port [default: 5000].
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// The admin interface's port, on 127.0.0.1 [default: 9901].
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// The base-router .wasm on the Envoy host [default: /opt/seashard/base-router.wasm].
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// The HttpFilter's name (the ECDS resource) [default: seashard.base_router].
    #[arg(long)]
    pub filter_name: Option<String>,
    /// The routing header [default: x-dtable-server].
    #[arg(long)]
    pub header: Option<String>,
    /// Requests go here until the first map arrives [default: dtable-server].
    #[arg(long)]
    pub default_server: Option<String>,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

impl BootstrapArgs {
    /// The generator's options: defaults, overridden by the flags given.
    pub fn options(&self) -> Options {
        let kind = match self.kind {
            KindArg::Edge => Kind::Edge,
            KindArg::Sidecar => Kind::Sidecar,
        };
        let d = Options::new(kind);
        Options {
            kind,
            node_id: self.node_id.clone().unwrap_or(d.node_id),
            node_cluster: self.node_cluster.clone().unwrap_or(d.node_cluster),
            control_plane: self.control_plane.clone().unwrap_or(d.control_plane),
            xds: match self.xds {
                XdsArg::Grpc => Xds::Grpc,
                XdsArg::Rest => Xds::Rest,
            },
            refresh_delay: self.refresh_delay.unwrap_or(d.refresh_delay),
            listen_port: self.listen_port.unwrap_or(d.listen_port),
            admin_port: self.admin_port.unwrap_or(d.admin_port),
            wasm: self.wasm.clone().unwrap_or(d.wasm),
            filter_name: self.filter_name.clone().unwrap_or(d.filter_name),
            header: self.header.clone().unwrap_or(d.header),
            default_server: self.default_server.clone().unwrap_or(d.default_server),
        }
    }
}

pub fn envoy_bootstrap(args: BootstrapArgs) -> Result<ExitCode> {
    let yaml = render(&args.options())?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, &yaml).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{yaml}"),
    }
    Ok(ExitCode::SUCCESS)
}
