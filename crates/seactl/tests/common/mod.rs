//! What seactl's integration tests share: free ports, a command's output as text and a
//! `seactl serve` killed on drop.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on (yet).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stdout then stderr, as text.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `seactl serve`, killed on drop.
pub struct Serve {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, its API.
    pub url: String,
}

impl Serve {
    /// Spawns `serve` (a `seactl serve` command) and returns once its API listens on
    /// 127.0.0.1:`http`.
    pub fn start(serve: &mut Command, http: u16) -> Serve {
        let s = Serve {
            child: serve.spawn().unwrap(),
            url: format!("http://127.0.0.1:{http}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", http)).is_err() {
            assert!(Instant::now() < deadline, "seactl serve did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
