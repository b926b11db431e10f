//! `seactl agent`: the restart agent on a dtable-server's host (the `agent` crate),
//! from a TOML file, flags, or both (flags win). Runs until SIGINT or SIGTERM; a
//! restart in progress then ends first (a second signal stops at once).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agent::AgentConfig;
use anyhow::{Context, Result};
use daemon::duration::{format_duration, parse_duration};
use daemon::secret::redact_url;
use daemon::tls::ApiTls;

use crate::serve::wait_for_signal;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The agent's configuration file (TOML; see crates/agent/agent.example.toml).
    #[arg(long, short = 'c', env = "SEASHARD_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where to listen, HOST:PORT (e.g. 10.0.0.11:5055).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The environment variable holding the bearer token [default: SEASHARD_AGENT_TOKEN].
    #[arg(long, conflicts_with = "token_file")]
    pub token_env: Option<String>,
    /// A file holding the bearer token (keep it mode 0600).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Longest the command may run before its process group is killed [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub command_timeout: Option<Duration>,
    /// The URL that must answer `pong` after the command [default: http://127.0.0.1:5000/ping/].
    #[arg(long)]
    pub health_url: Option<String>,
    /// How long the server has to answer `pong` after the command [default: 50s].
    #[arg(long, value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// Serve HTTPS only, with this certificate (PEM).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the configuration, the token and the TLS files, then exit.
    #[arg(long)]
    pub check: bool,
    /// The restart command, after `--` (an argv, no shell), e.g.
    /// `-- docker restart dtable-server`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The configuration file, completed and overridden by the flags.
fn settings(args: AgentArgs) -> Result<AgentConfig> {
    let mut c = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(l) = args.listen {
        c.listen = Some(l);
    }
    if let Some(v) = args.token_env {
        c.token_env = Some(v);
        c.token_file = None;
    }
    if let Some(f) = args.token_file {
        c.token_file = Some(f);
        c.token_env = None;
    }
    if let Some(d) = args.command_timeout {
        c.command_timeout = d;
    }
    if let Some(u) = args.health_url {
        c.health_url = u;
    }
    if let Some(d) = args.health_timeout {
        c.health_timeout = d;
    }
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        c.tls = Some(ApiTls { cert, key });
    }
    if !args.command.is_empty() {
        c.command = args.command;
    }
    let source = args
        .config
        .as_ref()
        .map_or_else(|| "the flags".to_owned(), |p| p.display().to_string());
    c.validate().with_context(|| format!("checking {source}"))?;
    Ok(c)
}

pub fn agent(args: AgentArgs) -> Result<ExitCode> {
    crate::init_logging();
    let check = args.check;
    let config = settings(args)?;
    let token = config.token()?;
    if check {
        if let Some(t) = &config.tls {
            daemon::tls::api_server_config(t)?;
        }
        println!(
            "valid: `{}` (at most {}) on POST {}://{}/restart, token from {}; then {} \
             must answer pong within {}",
            config.shown_command(),
            format_duration(config.command_timeout),
            if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            config.listen.map(|l| l.to_string()).unwrap_or_default(),
            config.token_source(),
            redact_url(&config.health_url),
            format_duration(config.health_timeout),
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let running = agent::start(config, token).await?;
        let stop = running.stopper();
        let wait = running.wait();
        tokio::pin!(wait);
        tokio::select! {
            r = &mut wait => return r,
            () = wait_for_signal() => {}
        }
        tracing::info!("stopping (a restart in progress ends first; signal again to stop now)");
        let _ = stop.send(true);
        tokio::select! {
            r = &mut wait => r,
            () = wait_for_signal() => {
                tracing::warn!("stopping now: a running restart command is killed");
                Ok(())
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}
