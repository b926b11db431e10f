//! What seactl's integration tests share, on the workspace's harness
//! (`seashard-tests`): free ports, a command's output as text, a file's lines and a
//! `seactl serve` killed on drop.
// Each test file uses a part of it.
#![allow(dead_code, unused_imports)]

use std::net::TcpStream;
use std::process::{Command, Output};

pub use seashard_tests::{Proc, wait_until};

/// A loopback port nothing listens on (yet): the harness's, below the ephemeral
/// range and handed out once per process.
pub fn free_port() -> u16 {
    seashard_tests::free_port().unwrap()
}

/// The lines of a file; none when it does not exist (yet).
pub use seashard_tests::file_lines;

/// Stdout then stderr, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `seactl serve`, killed with its process group on drop.
pub struct Serve {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`, its API.
    pub url: String,
}

impl Serve {
    /// Spawns `serve` (a `seactl serve` command) and returns once its API listens on
    /// 127.0.0.1:`http`.
    pub fn start(serve: &mut Command, http: u16) -> Serve {
        let mut proc = Proc::spawn(serve, "seactl serve").unwrap();
        wait_until(
            seashard_tests::process::START_TIMEOUT,
            "seactl serve to listen",
            || {
                if let Some(status) = proc.exited() {
                    anyhow::bail!("seactl serve exited: {status}");
                }
                Ok(TcpStream::connect(("127.0.0.1", http))
                    .is_ok()
                    .then_some(()))
            },
        )
        .unwrap();
        Serve {
            proc,
            url: format!("http://127.0.0.1:{http}"),
        }
    }
}

/// Writes a `seactl serve` configuration to `path`: gRPC on a free port, the API on
/// 127.0.0.1:`http`, the store `state.db`, the filter's wasm path, then `rest`
/// (`[api]`, `[[server]]`s, ...).
pub fn write_config(path: &std::path::Path, http: u16, rest: &str) {
    let head = format!(
        "[listen]\ngrpc = \"127.0.0.1:{}\"\nhttp = \"127.0.0.1:{http}\"\n\
         [store]\npath = \"state.db\"\n[filter]\nwasm = \"/opt/seashard/base-router.wasm\"\n",
        free_port()
    );
    std::fs::write(path, head + rest).unwrap();
}

/// [`write_config`] to `dir`/seashard.toml with the API on a free port: (that file,
/// the port).
pub fn config_in(dir: &std::path::Path, rest: &str) -> (std::path::PathBuf, u16) {
    let http = free_port();
    let config = dir.join("seashard.toml");
    write_config(&config, http, rest);
    (config, http)
}
