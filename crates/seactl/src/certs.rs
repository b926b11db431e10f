//! `seactl certs`: a small CA, the control plane's server certificate and one client
//! certificate per Envoy, for installs without a PKI (the `certs` crate).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use certs::{DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS, Written};

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Create the CA: DIR/ca.crt and DIR/ca.key (keep ca.key on this host only).
    Init {
        #[command(flatten)]
        common: Common,
        /// The CA's name (its certificate's CN) [default: seashard CA and a random suffix].
        #[arg(long)]
        name: Option<String>,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// The control plane's certificate, DIR/NAME.crt and DIR/NAME.key: for
    /// `[api.tls]` and `[listen.tls]`.
    Server {
        #[command(flatten)]
        common: Common,
        /// The certificate's name (CN and file names).
        #[arg(long, default_value = "control-plane")]
        name: String,
        /// A DNS name or IP address Envoys and seactl reach the control plane by
        /// (repeatable; at least one).
        #[arg(long = "san", value_name = "NAME_OR_IP", required = true)]
        sans: Vec<String>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
    },
    /// One Envoy's client certificate, DIR/NODE_ID.crt and DIR/NODE_ID.key: CN and DNS
    /// name are the node id (`[listen.tls] require_node_id_match`).
    Client {
        #[command(flatten)]
        common: Common,
        /// The Envoy's node id (as `envoy-bootstrap --node-id`).
        #[arg(long)]
        node_id: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS)]
        days: u32,
    },
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// The directory of the CA and the certificates (created with mode 0700).
    #[arg(long)]
    pub dir: PathBuf,
    /// Replace existing files (whatever uses the old ones stops working).
    #[arg(long)]
    pub force: bool,
}

pub fn certs(args: CertsArgs) -> Result<ExitCode> {
    let (written, hint) = match args.command {
        CertsCommand::Init { common, name, days } => (
            certs::init(&common.dir, name.as_deref(), days, common.force)?,
            format!(
                "Next: `seactl certs server --dir {0} --san HOST` and `seactl certs client \
                 --dir {0} --node-id ID` per Envoy.",
                common.dir.display()
            ),
        ),
        CertsCommand::Server {
            common,
            name,
            sans,
            days,
        } => (
            certs::server(&common.dir, &name, &sans, days, common.force)?,
            "Use it as `cert`/`key` of [listen.tls] and [api.tls]; ca.crt is \
             [listen.tls] client_ca, `envoy-bootstrap --tls-ca` and `seactl --ca`."
                .to_owned(),
        ),
        CertsCommand::Client {
            common,
            node_id,
            days,
        } => (
            certs::client(&common.dir, &node_id, days, common.force)?,
            format!(
                "Copy it, its key and ca.crt to the Envoy host: `seactl envoy-bootstrap \
                 --node-id {node_id} --tls-ca ca.crt --tls-cert {node_id}.crt --tls-key \
                 {node_id}.key` (absolute paths on that host)."
            ),
        ),
    };
    print_written(&written);
    println!("{hint}");
    Ok(ExitCode::SUCCESS)
}

fn print_written(w: &Written) {
    println!(
        "Wrote {} (valid until {}) and {} (private key, mode 0600).",
        w.cert.display(),
        w.not_after,
        w.key.display()
    );
}
