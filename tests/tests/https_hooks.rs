//! HTTP restart hooks over HTTPS: `seactl serve` calls two real `seactl agent`s
//! serving HTTPS with a certificate from `seactl certs`. The first hook names the
//! CA that signed it (`ca`, relative to the configuration): its agent restarts its
//! fake dtable-server. The second names another CA: the handshake fails, the
//! rollout rolls back with an error that says so and holds no token, and that
//! agent never sees a request.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Result, bail};
use seashard_tests::agent::{self, Ready};
use seashard_tests::dtable::{Cluster, FakeDtableServer};
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, seactl_bin};
use seashard_tests::{Proc, free_port, loopback};
use serde_json::json;

const SERVERS: [&str; 2] = ["dtable-server", "dtable-server-2"];
const AGENT_TOKENS: [&str; 2] = [
    "https-hook-agent-token-1-7d3e",
    "https-hook-agent-token-2-9a41",
];

fn seactl(args: &[&str]) -> Result<String> {
    let o = Command::new(seactl_bin()?)
        .args(args)
        .env_remove("SEASHARD_TOKEN")
        .stdin(Stdio::null())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        bail!("seactl {args:?}: {}\n{text}", o.status);
    }
    Ok(text)
}

/// `seactl agent` over HTTPS (certificate `tls/agent.crt`), restarting `server`
/// through its hook; killed on drop. Returns once it accepts connections.
fn https_agent(dir: &Path, server: &FakeDtableServer, token: &str) -> Result<(Proc, SocketAddr)> {
    let addr = loopback(free_port()?);
    let (listen, health) = (addr.to_string(), server.health_url());
    let tls = dir.join("tls");
    let hook = server.restart_hook()?;
    let mut args: Vec<&OsStr> = ["--listen", listen.as_str(), "--health-url", health.as_str()]
        .into_iter()
        .map(OsStr::new)
        .collect();
    let (cert, key) = (tls.join("agent.crt"), tls.join("agent.key"));
    args.extend([
        OsStr::new("--tls-cert"),
        cert.as_os_str(),
        OsStr::new("--tls-key"),
        key.as_os_str(),
        OsStr::new("--"),
    ]);
    args.extend(hook.iter().map(OsStr::new));
    let log = dir.join(format!("agent-{}.log", server.name));
    let proc = agent::start(
        args,
        &[("SEASHARD_AGENT_TOKEN", token)],
        &log,
        addr,
        Ready::Listening,
    )?;
    Ok((proc, addr))
}

#[test]
fn an_https_hook_reaches_its_agent_and_an_untrusted_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tls = d.join("tls");
    let tls = tls.to_str().unwrap();
    seactl(&["certs", "init", "--dir", tls]).unwrap();
    seactl(&[
        "certs",
        "server",
        "--dir",
        tls,
        "--name",
        "agent",
        "--san",
        "127.0.0.1",
    ])
    .unwrap();
    let other = d.join("other");
    seactl(&["certs", "init", "--dir", other.to_str().unwrap()]).unwrap();

    let mut cluster = Cluster::start(&SERVERS, Duration::from_secs(3600)).unwrap();
    let mut agents = Vec::new();
    for (name, token) in SERVERS.iter().zip(AGENT_TOKENS) {
        agents.push(https_agent(d, cluster.server(name), token).unwrap());
    }

    // The first hook trusts the agents' CA, the second another one.
    let (http, grpc) = (
        loopback(free_port().unwrap()),
        loopback(free_port().unwrap()),
    );
    std::fs::write(
        d.join("map.json"),
        json!({"default": SERVERS[0], "slots": {"0-7": SERVERS[0], "8-f": SERVERS[1]}}).to_string(),
    )
    .unwrap();
    let mut text = format!(
        "initial_map = \"map.json\"\n[listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
         [store]\npath = \"seashard.db\"\n[api]\ntoken = \"{TOKEN}\"\n\
         [filter]\nwasm = \"/opt/seashard/base-router.wasm\"\n\
         [rollout]\nack_timeout = \"5s\"\nhealth_timeout = \"15s\"\ndrain = \"100ms\"\n"
    );
    for (i, ((name, (_, agent)), ca)) in SERVERS
        .iter()
        .zip(&agents)
        .zip(["tls/ca.crt", "other/ca.crt"])
        .enumerate()
    {
        let server = cluster.server(name);
        text.push_str(&format!(
            "[[server]]\nname = \"{name}\"\naddress = \"{}\"\n\
             restart = {{ kind = \"http\", method = \"POST\", url = \"https://{agent}/restart\", \
             ca = \"{ca}\", headers_env = {{ authorization = \"AGENT_AUTH_{i}\" }}, \
             timeout = \"30s\" }}\n",
            server.addr
        ));
    }
    let config = d.join("seashard.toml");
    std::fs::write(&config, text).unwrap();

    // `serve --check` loads both CAs; a missing one is named.
    seactl(&["serve", "--check", "--config", config.to_str().unwrap()]).unwrap();
    let broken = d.join("broken.toml");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("other/ca.crt", "other/none.crt"),
    )
    .unwrap();
    let err = seactl(&["serve", "--check", "--config", broken.to_str().unwrap()]).unwrap_err();
    assert!(format!("{err:#}").contains("none.crt"), "{err:#}");

    let env: Vec<(String, String)> = AGENT_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("AGENT_AUTH_{i}"), format!("Bearer {t}")))
        .collect();
    let cp = ControlPlaneProcess::start_with_env(&config, http, grpc, &env).unwrap();
    let pids: Vec<Option<u32>> = SERVERS.iter().map(|n| cluster.server(n).pid()).collect();

    let moved = json!({"default": SERVERS[0], "slots": {"0-3": SERVERS[0], "4-f": SERVERS[1]}});
    let rollout = cp
        .push_and_wait(&moved, "https hooks", Duration::from_secs(60))
        .unwrap();
    let log = |name: &str| std::fs::read_to_string(d.join(name)).unwrap_or_default();
    let logs = || {
        format!(
            "{}\n{}\n{}",
            cp.logs(),
            log("agent-dtable-server.log"),
            log("agent-dtable-server-2.log")
        )
    };
    assert_eq!(rollout["state"], "rolled_back", "{rollout}\n{}", logs());

    // The trusted agent restarted its server over HTTPS.
    let restarts = rollout["restart"].as_array().unwrap();
    let of = |name: &str| restarts.iter().find(|r| r["server"] == name).unwrap();
    assert_eq!(of(SERVERS[0])["state"], "healthy", "{rollout}");
    assert_ne!(cluster.server(SERVERS[0]).pid(), pids[0]);
    assert!(log("agent-dtable-server.log").contains("restarted and healthy"));

    // The other: refused at the handshake, said clearly, no request sent.
    let error = of(SERVERS[1])["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    for says in [
        "TLS handshake with",
        "invalid peer certificate",
        "other/ca.crt",
    ] {
        assert!(error.contains(says), "{says}: {error}");
    }
    assert_eq!(
        cluster.server(SERVERS[1]).pid(),
        pids[1],
        "restarted anyway"
    );
    assert!(!log("agent-dtable-server-2.log").contains("restart requested"));

    let everything = format!("{rollout}\n{}", logs());
    for secret in AGENT_TOKENS.iter().chain([&TOKEN]) {
        assert!(
            !everything.contains(secret),
            "a token leaked:\n{everything}"
        );
    }
    drop((cp, agents));
    cluster.stop_all().unwrap();
}
