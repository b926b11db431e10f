//! seactl: the one binary of seashard. `seactl serve` runs the control plane; every
//! other command is a thin shell over the libraries: parse arguments, call, print.

mod agent;
mod audit;
mod bootstrap;
mod certs;
mod client;
mod demo;
mod generate;
mod mesh;
mod offline;
mod serve;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Route SeaTable bases to their dtable-server through Envoy, and change the shard map safely.
#[derive(Parser)]
#[command(name = "seactl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a shard map: exit 0 when valid, else print every problem.
    Validate {
        /// The shard map (JSON); `-` for stdin.
        map: PathBuf,
    },
    /// Show where requests go: URIs from the arguments, or one per line from stdin.
    Route {
        /// The shard map (JSON).
        #[arg(long)]
        map: PathBuf,
        /// One JSON object per line: {"uri", "base_uuid", "server", "reason"}.
        #[arg(long)]
        json: bool,
        /// Request URIs (path and query), e.g. /api/v1/dtables/<uuid>/rows/.
        uris: Vec<String>,
    },
    /// Show what changes from one map to another: moved slots and pins, and the fence.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Translate SeaTable's nginx proxy config (`map $request_uri`) into a shard map.
    ImportNginx {
        /// The nginx configuration file.
        conf: PathBuf,
        /// Name the server of an upstream block: UPSTREAM=NAME (repeatable).
        #[arg(long = "server", value_name = "UPSTREAM=NAME")]
        servers: Vec<String>,
    },
    /// Did nginx's map open bases on two servers? Read its config and access logs;
    /// exit 1 when a base reached several servers or one other than its owner.
    AuditNginx(audit::AuditArgs),
    /// Add or remove a server and even out the slots, moving the fewest.
    Rebalance {
        #[arg(long)]
        map: PathBuf,
        /// The server to add.
        #[arg(long, conflicts_with = "remove", required_unless_present = "remove")]
        add: Option<String>,
        /// The server to remove.
        #[arg(long)]
        remove: Option<String>,
        /// Slot digits of the result (1 to 4); default: the map's own, or what the servers need.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4))]
        digits: Option<u32>,
    },
    /// Run the control plane: ADS (ECDS + CDS) for the Envoys, the HTTP API.
    Serve(serve::ServeArgs),
    /// Print an Envoy bootstrap (edge, sidecar or guard) that takes its map from the control plane.
    EnvoyBootstrap(Box<bootstrap::BootstrapArgs>),
    /// Make a small CA and the certificates for TLS (API) and mutual TLS (ADS), for
    /// installs without a PKI.
    Certs(certs::CertsArgs),
    /// Propose a map: show the plan, apply (a rollout when bases move), follow it to the end.
    PushMap(client::PushMapArgs),
    /// Show the active map version, each Envoy's ACK/NACK and each server's health.
    Status(client::StatusArgs),
    /// Steer the running rollout: confirm a manual restart, abort, follow, list.
    Rollout(client::RolloutArgs),
    /// Run the restart agent on a dtable-server's host: `POST /restart` runs one
    /// command, then waits for `pong` (the control plane's HTTP restart hook calls it).
    Agent(agent::AgentArgs),
    /// Write the manifests that run seashard in a service mesh (Istio).
    Mesh(mesh::MeshArgs),
    /// Show seashard at work on sample SeaTable requests.
    Demo {
        /// Only route sample requests with a sample map; start no process.
        #[arg(long)]
        offline: bool,
    },
    /// Write shell completions or man pages (for packaging).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { map } => offline::validate(&map),
        Command::Route { map, json, uris } => offline::route(&map, json, uris),
        Command::Diff { old, new, json } => offline::diff(&old, &new, json),
        Command::ImportNginx { conf, servers } => offline::import_nginx(&conf, &servers),
        Command::AuditNginx(args) => audit::audit_nginx(args),
        Command::Rebalance {
            map,
            add,
            remove,
            digits,
        } => offline::rebalance(&map, add, remove, digits),
        Command::Demo { offline: true } => offline::demo(),
        Command::Demo { offline: false } => demo::live(),
        Command::Serve(args) => serve::serve(args),
        Command::Agent(args) => agent::agent(args),
        Command::EnvoyBootstrap(args) => bootstrap::envoy_bootstrap(*args),
        Command::Certs(args) => certs::certs(args),
        Command::Mesh(args) => mesh::mesh(args),
        Command::PushMap(args) => client::push_map(args),
        Command::Status(args) => client::status(args),
        Command::Rollout(args) => client::rollout(args),
        Command::Generate(args) => generate::generate(args, Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("seactl: {e:#}");
            if let Some(hint) = client::tls_hint(&e) {
                eprintln!("seactl: {hint}");
            }
            ExitCode::from(2)
        }
    }
}

/// The daemons' logs (`serve`, `agent`): to stderr, `RUST_LOG` or `info`, colours
/// only on a terminal.
fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The daemons' async runtime.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context as _;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}
