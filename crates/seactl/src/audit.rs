//! `seactl audit-nginx`: reads SeaTable's nginx proxy config and access logs and
//! reports every base nginx sent to more than one dtable-server, or to a server other
//! than its owner under the imported map. The work is in the `nginx-audit` crate.

use std::collections::BTreeMap;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::client::Output;
use crate::offline::read;

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The nginx configuration (`map $request_uri` and `upstream` blocks).
    pub conf: PathBuf,
    /// Access logs, plain or gzipped, any order (rotated files together): `combined`,
    /// optionally with `$upstream_addr` (quoted or not) appended as the last field.
    #[arg(required = true)]
    pub logs: Vec<PathBuf>,
    /// Name the server of an upstream block: UPSTREAM=NAME (repeatable), as import-nginx.
    #[arg(long = "server", value_name = "UPSTREAM=NAME")]
    pub servers: Vec<String>,
    /// Name the server of a logged `$upstream_addr`: ADDR=NAME (repeatable), for
    /// addresses the config names by a host this machine does not resolve the same.
    #[arg(long = "upstream", value_name = "ADDR=NAME")]
    pub upstreams: Vec<String>,
    /// Do not resolve the host names of the upstream blocks (DNS).
    #[arg(long)]
    pub no_resolve: bool,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

fn pairs(flag: &str, items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok((a.to_owned(), b.to_owned())),
            _ => bail!("{flag} takes KEY=NAME, got `{s}`"),
        })
        .collect()
}

/// Exit 0 when no base is at risk, 1 when some are, 2 on errors.
pub fn audit_nginx(args: AuditArgs) -> Result<ExitCode> {
    let names: BTreeMap<String, String> = pairs("--server", &args.servers)?.into_iter().collect();
    let conf = read(&args.conf)?;
    let problems =
        |p: shardmap::Problems| anyhow::anyhow!("{}: cannot import:\n{p}", args.conf.display());
    let import = shardmap::nginx::import(&conf, &names).map_err(problems)?;
    let nginx = shardmap::nginx::nginx_map(&conf, &names).map_err(problems)?;
    // nginx resolves `server host:port` once at start; $upstream_addr logs the address.
    let resolve = |u: &shardmap::nginx::UpstreamBlock, a: &str| -> Vec<String> {
        if args.no_resolve {
            return Vec::new();
        }
        let with_port = if a
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            a.to_owned()
        } else {
            format!("{a}:80")
        };
        match with_port.to_socket_addrs() {
            Ok(resolved) => resolved.map(|r| r.to_string()).collect(),
            Err(e) => {
                eprintln!(
                    "warning: upstream {} server {a} does not resolve here ({e}); name its logged address with --upstream ADDR={}",
                    u.name, u.server
                );
                Vec::new()
            }
        }
    };
    let named = pairs("--upstream", &args.upstreams)?;
    let mut audit = nginx_audit::Audit::new(&import.map, &nginx, resolve, &named)?;
    for log in &args.logs {
        let file =
            std::fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
        nginx_audit::feed(&mut audit, file)
            .with_context(|| format!("reading {}", log.display()))?;
    }
    let mut report = audit.report();
    for w in import.warnings {
        report.warnings.push(format!("import: {w}"));
    }
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.bases_at_risk == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
