//! `seactl agent` processes for tests: started with given arguments and
//! environment, their log in a file, killed (with their process group) on drop.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::rollout::seactl_bin;
use crate::{Proc, get, wait_until};

/// How long an agent has to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// When an agent counts as started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `GET /healthz` answers 200 (plain HTTP).
    Healthz,
    /// It accepts TCP connections (HTTPS, which the harness' client does not speak).
    Listening,
}

/// `seactl agent ARGS` with `env` (and `RUST_LOG=info`), stderr to `log`; returns
/// once it is `ready` at `addr`.
pub fn start(
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
    env: &[(&str, &str)],
    log: &Path,
    addr: SocketAddr,
    ready: Ready,
) -> Result<Proc> {
    let mut cmd = Command::new(seactl_bin()?);
    cmd.arg("agent")
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    let mut proc = Proc::spawn(cmd, "seactl agent")?;
    wait_until(READY_TIMEOUT, "seactl agent to be ready", || {
        if let Some(status) = proc.exited() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("seactl agent exited: {status}\n{log}");
        }
        let up = match ready {
            Ready::Healthz => get(addr, "/healthz", &[]).is_ok_and(|r| r.status == 200),
            Ready::Listening => TcpStream::connect(addr).is_ok(),
        };
        Ok(up.then_some(()))
    })?;
    Ok(proc)
}
