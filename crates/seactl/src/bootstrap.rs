//! `seactl envoy-bootstrap`: prints an Envoy bootstrap managed by the control plane.
//! Every flag left out takes the generator's default (`deploy::bootstrap`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use daemon::duration::parse_duration;
use deploy::bootstrap::{
    ControlPlaneTls, Kind, Options, Xds, control_plane_addresses, default_node_id,
    guard_resource_name, local_hostname, render,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// Replaces SeaTable's dtable-server-proxy: listens on all interfaces.
    Edge,
    /// Next to one client of dtable-server: listens on 127.0.0.1.
    Sidecar,
    /// In front of one dtable-server (--server), the only way in: passes only the
    /// requests for bases that server owns (421 for another's, 503 while fenced).
    Guard,
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
    /// The dtable-server a guard stands in front of, by its name in the shard map
    /// (with `--kind guard`).
    #[arg(long, required_if_eq("kind", "guard"))]
    pub server: Option<String>,
    /// The guarded dtable-server's own address, HOST:PORT, reachable only through the
    /// guard (with `--kind guard`) [default: 127.0.0.1:5001].
    #[arg(long)]
    pub upstream: Option<String>,
    /// This Envoy's node id. Each Envoy must have its own: two Envoys with one id are
    /// counted as one, and a rollout could then proceed while one of them never saw
    /// the fence [default: KIND-HOSTNAME, guard-SERVER-HOSTNAME for a guard].
    #[arg(long)]
    pub node_id: Option<String>,
    /// A group name for `status` [default: seashard-KIND].
    #[arg(long)]
    pub node_cluster: Option<String>,
    /// The control plane's ADS address, HOST:PORT (with `--xds rest`, its HTTP
    /// address). Replicas: several, comma-separated or the flag repeated; Envoy keeps
    /// one stream to a live one and moves to another when it dies
    /// [default: seashard-control-plane:18000].
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub control_plane: Vec<String>,
    /// How Envoy reaches the control plane.
    #[arg(long, value_enum, default_value = "grpc")]
    pub xds: XdsArg,
    /// How often a REST poller asks, e.g. `1s` (with `--xds rest`) [default: 1s].
    #[arg(long, value_parser = parse_duration)]
    pub refresh_delay: Option<std::time::Duration>,
    /// The listener's port (a guard's: where clients expected the dtable-server)
    /// [default: 5000].
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// The admin interface's port, on 127.0.0.1 [default: 9901].
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// The base-router .wasm on the Envoy host [default: /opt/seashard/base-router.wasm].
    #[arg(long)]
    pub wasm: Option<PathBuf>,
    /// The filter's name; the ECDS resource of an edge or sidecar, FILTER.guard.SERVER
    /// of a guard [default: seashard.base_router].
    #[arg(long)]
    pub filter_name: Option<String>,
    /// The routing header [default: x-dtable-server].
    #[arg(long)]
    pub header: Option<String>,
    /// Uuid-less requests go here until the first map arrives (edge and sidecar)
    /// [default: dtable-server].
    #[arg(long)]
    pub default_server: Option<String>,
    /// Reach the control plane over TLS: the CA (PEM, a path on the Envoy host) that
    /// signed its certificate, which must name the host of --control-plane.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This Envoy's client certificate (PEM), for ADS over mutual TLS
    /// (`[listen.tls]`); its CN should be the node id (`seactl certs client`).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// Write to this file instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

impl BootstrapArgs {
    /// The generator's options: defaults, overridden by the flags given. Without
    /// `--node-id`, the id is derived from the kind and this host's name.
    pub fn options(&self) -> Result<Options> {
        let kind = match (self.kind, &self.server) {
            (KindArg::Edge, None) => Kind::Edge,
            (KindArg::Sidecar, None) => Kind::Sidecar,
            (KindArg::Guard, Some(server)) => Kind::Guard {
                server: server.clone(),
            },
            (KindArg::Guard, None) => bail!("a guard needs --server: the dtable-server it guards"),
            (_, Some(_)) => bail!("--server names the server of a guard: use it with --kind guard"),
        };
        if self.upstream.is_some() && kind.guarded().is_none() {
            bail!("--upstream is a guard's dtable-server: use it with --kind guard");
        }
        let node_id = match &self.node_id {
            Some(id) => id.clone(),
            None => default_node_id(&kind, &local_hostname().unwrap_or_default())?,
        };
        let d = Options::new(kind);
        let control_plane = if self.control_plane.is_empty() {
            d.control_plane
        } else {
            self.control_plane.join(",")
        };
        // Refused here, before anything else, with the address at fault.
        control_plane_addresses(&control_plane)?;
        Ok(Options {
            node_id,
            node_cluster: self.node_cluster.clone().unwrap_or(d.node_cluster),
            control_plane,
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
            upstream: self.upstream.clone().unwrap_or(d.upstream),
            tls: self.tls_ca.clone().map(|ca| ControlPlaneTls {
                ca,
                client: self.tls_cert.clone().zip(self.tls_key.clone()),
            }),
            kind: d.kind,
        })
    }
}

pub fn envoy_bootstrap(args: BootstrapArgs) -> Result<ExitCode> {
    let options = args.options()?;
    let yaml = render(&options)?;
    // Where the output goes to a file, say what this Envoy will be known as.
    if let Some(path) = &args.output {
        let resource = match options.kind.guarded() {
            Some(server) => guard_resource_name(&options.filter_name, server),
            None => options.filter_name.clone(),
        };
        eprintln!(
            "{}: node id {}, filter configuration {resource}",
            path.display(),
            options.node_id
        );
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, &yaml).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{yaml}"),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: BootstrapArgs,
    }

    fn options(args: &[&str]) -> Result<Options> {
        let mut argv = vec!["envoy-bootstrap", "--node-id", "edge-1"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.args.options()
    }

    #[test]
    fn one_control_plane_as_before() {
        let o = options(&["--control-plane", "127.0.0.1:18000"]).unwrap();
        assert_eq!(o.control_plane, "127.0.0.1:18000");
        let o = options(&[]).unwrap();
        assert_eq!(o.control_plane, "seashard-control-plane:18000");
    }

    #[test]
    fn several_control_planes_by_commas_or_repeated() {
        for args in [
            &[
                "--control-plane",
                "10.0.0.1:18000,cp-2.example:18000,[::1]:18000",
            ][..],
            &[
                "--control-plane",
                "10.0.0.1:18000",
                "--control-plane",
                "cp-2.example:18000, [::1]:18000",
            ],
        ] {
            let o = options(args).unwrap();
            let cps = control_plane_addresses(&o.control_plane).unwrap();
            assert_eq!(
                cps,
                [("10.0.0.1", 18000), ("cp-2.example", 18000), ("::1", 18000)],
                "{args:?}"
            );
            let y = render(&o).unwrap();
            assert_eq!(y.matches("        - endpoint:").count(), 3, "{y}");
        }
    }

    #[test]
    fn refuses_empty_duplicate_and_bad_addresses() {
        for (args, says) in [
            (&["--control-plane", ""][..], "empty"),
            (&["--control-plane", "a:1,,b:2"], "empty"),
            (&["--control-plane", "a:1,"], "empty"),
            (&["--control-plane", "a:1,b:2,A:1"], "`A:1` is given twice"),
            (
                &["--control-plane", "a:1", "--control-plane", "a:1"],
                "given twice",
            ),
            (
                &["--control-plane", "a:1,nowhere"],
                "`nowhere` is not HOST:PORT",
            ),
            (&["--control-plane", "a:0"], "not HOST:PORT"),
            (&["--control-plane", "a:70000"], "not HOST:PORT"),
            (&["--control-plane", "a b:18000"], "not HOST:PORT"),
            (&["--control-plane", "http://a:18000"], "not HOST:PORT"),
        ] {
            let err = options(args).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{args:?}: {err:#}");
        }
    }
}
