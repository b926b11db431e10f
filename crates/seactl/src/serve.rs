//! `seactl serve --config FILE`: runs the control plane until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use control_plane::{Config, ControlPlane};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (TOML).
    #[arg(long, short = 'c', env = "SEASHARD_CONFIG")]
    pub config: PathBuf,
    /// Check the configuration and the store, then exit.
    #[arg(long)]
    pub check: bool,
    /// etcd: this replica's name, over `[store] replica` (in Kubernetes, the pod's).
    #[arg(long, env = "SEASHARD_REPLICA")]
    pub replica: Option<String>,
    /// etcd: this replica's API URL as the other replicas reach it, over `[store]
    /// advertise` (in Kubernetes, from the pod's IP).
    #[arg(long, env = "SEASHARD_ADVERTISE")]
    pub advertise: Option<String>,
}

pub fn serve(args: ServeArgs) -> Result<ExitCode> {
    crate::init_logging();
    let mut config = Config::load(&args.config)?;
    if let Some(r) = args.replica.filter(|r| !r.trim().is_empty()) {
        config.store.replica = Some(r);
    }
    if let Some(a) = args.advertise.filter(|a| !a.trim().is_empty()) {
        if !(a.starts_with("http://") || a.starts_with("https://")) {
            anyhow::bail!("--advertise `{a}` is not an http(s):// URL");
        }
        config.store.advertise = Some(a);
    }
    let token = config.api_token()?;
    let plane = ControlPlane::open(config)
        .with_context(|| format!("starting from {}", args.config.display()))?;
    if args.check {
        control_plane::tls::check(plane.config())?;
        // Opening the store proved it answers: etcd with a majority, or the file.
        let active = plane.active()?;
        let store = plane.store().info();
        println!(
            "{}: valid; active map version {} ({} servers); store: {} {}{}",
            args.config.display(),
            active.version,
            plane.config().servers.len(),
            store.kind,
            store.location,
            store
                .replica
                .map(|r| format!(" (this replica: {r})"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let running = control_plane::start(plane, &token).await?;
        let stop = running.stopper();
        let signalled = tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("stopping");
            let _ = stop.send(true);
        });
        let result = running.wait().await;
        signalled.abort();
        result
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn wait_for_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
