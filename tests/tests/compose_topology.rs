//! The topology of `deploy/compose` run with the project's binaries on loopback:
//! `seactl serve` with the shipped `seashard.toml` (its servers, guards and HTTP
//! restart hooks, their `headers_env`, its initial `map.json`), the edge and one
//! guard per server bootstrapped with the shipped bootstraps' arguments, a fake
//! dtable-server behind each guard, restarted by its own `seactl agent` configured
//! like the shipped `agent.toml` (its `pong` checked through the guard). Only
//! addresses become loopback ones and the restart command the fake's.
//!
//! A map that moves bases both ways is pushed: the rollout restarts both servers
//! through their agents; before and after, a request for each base reaches its
//! owner through the edge, and one sent straight to the other server's guard
//! gets 421.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::agent::AgentConfig;
use anyhow::{Context, Result, anyhow, bail};
use control_plane::{Config, RestartHook};
use seashard_tests::agent::{self, Ready};
use seashard_tests::compose::{self, bootstrap_args, flag_value, read, without_flags};
use seashard_tests::dtable::Cluster;
use seashard_tests::rollout::{ControlPlaneProcess, TOKEN, start_managed_envoy};
use seashard_tests::{Envoy, Proc, free_port, get, loopback, wait_until, wasm_file};
use serde_json::{Value, json};
use shardmap::{BaseUuid, Router, ShardMap};

/// Bases in every first hex digit: each server owns some under both maps.
const BASES: [&str; 4] = [
    "1a2b3c4d-0000-4000-8000-000000000001",
    "8a2b3c4d-0000-4000-8000-000000000002",
    "aa2b3c4d-0000-4000-8000-000000000003",
    "ea2b3c4d-0000-4000-8000-000000000004",
];

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// One dtable-server of the shipped configuration and what stands for it here.
struct Node {
    name: String,
    guard: SocketAddr,
    agent: SocketAddr,
    /// The agent's token, and the environment variable of the hook's header.
    token: String,
    auth_env: String,
    hook_path: String,
}

/// The shipped `seashard.toml` with loopback addresses: each server's address is
/// its guard's, its hook calls its agent; everything else as shipped.
fn write_serve_config(
    dir: &Path,
    shipped: &Config,
    nodes: &[Node],
    http: SocketAddr,
    grpc: SocketAddr,
) -> Result<PathBuf> {
    let initial = shipped
        .initial_map
        .as_ref()
        .ok_or_else(|| anyhow!("the shipped seashard.toml has no initial_map"))?;
    std::fs::copy(compose::dir().join(initial), dir.join(initial))?;
    let token_env = shipped
        .api
        .token_env
        .as_deref()
        .ok_or_else(|| anyhow!("the shipped [api] has no token_env"))?;
    let r = &shipped.rollout;
    let mut text = format!(
        "initial_map = {:?}\n\
         [listen]\ngrpc = \"{grpc}\"\nhttp = \"{http}\"\n\
         [store]\npath = \"seashard.db\"\n\
         [api]\ntoken_env = {token_env:?}\n\
         [filter]\nwasm = {:?}\nretry_after = 1\n\
         [rollout]\nack_timeout = {:?}\nhealth_timeout = {:?}\nrestart_timeout = {:?}\n\
         drain = \"200ms\"\n",
        initial.display().to_string(),
        wasm_file("base_router.wasm")?,
        ms(r.ack_timeout),
        ms(r.health_timeout),
        ms(r.restart_timeout),
    );
    for (s, node) in shipped.servers.iter().zip(nodes) {
        let RestartHook::Http {
            method, timeout, ..
        } = &s.restart
        else {
            bail!("{}: the shipped hook is not an HTTP hook", s.name);
        };
        text.push_str(&format!(
            "[[server]]\nname = {:?}\naddress = \"{}\"\nguarded = {}\n\
             restart = {{ kind = \"http\", method = {method:?}, url = \"http://{}{}\", \
             headers_env = {{ authorization = {:?} }}, timeout = {:?} }}\n",
            s.name,
            node.guard,
            s.guarded,
            node.agent,
            node.hook_path,
            node.auth_env,
            ms(timeout.unwrap_or(r.restart_timeout)),
        ));
    }
    let path = dir.join("seashard.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `seactl agent` configured like the shipped `agent.toml`, on loopback, restarting
/// the fake server through its hook and checking `pong` through its guard.
fn start_agent(dir: &Path, shipped: &AgentConfig, node: &Node, restart: &[String]) -> Result<Proc> {
    let token_env = shipped
        .token_env
        .as_deref()
        .ok_or_else(|| anyhow!("the shipped agent.toml has no token_env"))?;
    let config = dir.join(format!("agent-{}.toml", node.name));
    std::fs::write(
        &config,
        format!(
            "listen = \"{}\"\ncommand = {}\ncommand_timeout = {:?}\n\
             health_url = \"http://{}/ping/\"\nhealth_timeout = {:?}\ntoken_env = {token_env:?}\n",
            node.agent,
            serde_json::to_string(restart)?,
            ms(shipped.command_timeout),
            node.guard,
            ms(shipped.health_timeout),
        ),
    )?;
    let log = dir.join(format!("agent-{}.log", node.name));
    agent::start(
        [OsStr::new("--config"), config.as_os_str()],
        &[(token_env, node.token.as_str())],
        &log,
        node.agent,
        Ready::Healthz,
    )
}

/// The server `GET` of `base` through `addr` reached, or the refusal's status.
fn served_by(addr: SocketAddr, base: &str) -> Result<std::result::Result<String, (u16, Value)>> {
    let r = get(addr, &format!("/dtable-server/api/v1/dtables/{base}/"), &[])?;
    if r.status == 200 {
        let v = r.json()?;
        Ok(Ok(v["server"]
            .as_str()
            .ok_or_else(|| anyhow!("no server in {v}"))?
            .to_owned()))
    } else {
        Ok(Err((r.status, r.json().unwrap_or(Value::Null))))
    }
}

/// Every base reaches its owner under `map` through the edge, and the other
/// guards refuse it with 421 naming that owner.
fn check_routing(
    edge: &Envoy,
    guards: &BTreeMap<String, SocketAddr>,
    map: &ShardMap,
) -> Result<()> {
    let router = Router::new(map).map_err(|e| anyhow!("{e:?}"))?;
    for base in BASES {
        let owner = router.owner_of(&BaseUuid::parse(base).ok_or_else(|| anyhow!("{base}"))?);
        let got = served_by(edge.listener_addr, base)?;
        if got.as_deref() != Ok(owner) {
            bail!("{base} through the edge: {got:?}, its owner is {owner}");
        }
        for (name, guard) in guards.iter().filter(|(n, _)| *n != owner) {
            match served_by(*guard, base)? {
                Err((421, body)) if body.to_string().contains(owner) => {}
                other => bail!("{base} straight to {name}'s guard: {other:?}, want 421"),
            }
        }
    }
    Ok(())
}

#[test]
fn the_compose_topology_rolls_out_through_its_agents_and_guards() {
    let shipped = Config::parse(&read(&compose::dir().join("seashard.toml")).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let shipped_agent = AgentConfig::parse(&read(&compose::dir().join("agent.toml")).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let initial: ShardMap = ShardMap::from_json(
        &read(&compose::dir().join(shipped.initial_map.as_ref().unwrap())).unwrap(),
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let names: Vec<&str> = shipped.servers.iter().map(|s| s.name.as_str()).collect();
    let dir = tempfile::Builder::new()
        .prefix("seashard-compose-")
        .tempdir()
        .unwrap();

    // Bases move both ways between the first two servers.
    let (a, b) = (names[0], names[1]);
    let moved = ShardMap::from_json(
        &json!({"default": initial.default, "slots": {"0-7": a, "8-f": b}}).to_string(),
    )
    .unwrap();
    let plan = shardmap::diff(&initial, &moved).unwrap();
    assert!(
        plan.slots.len() >= 2,
        "the new map must move bases: {plan:?}"
    );

    let mut cluster = Cluster::start(&names, Duration::from_secs(3600)).unwrap();
    let nodes: Vec<Node> = shipped
        .servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let RestartHook::Http {
                url, headers_env, ..
            } = &s.restart
            else {
                panic!("{}: not an HTTP hook", s.name);
            };
            let path = url
                .split_once("://")
                .and_then(|(_, r)| r.find('/').map(|i| &r[i..]));
            Node {
                name: s.name.clone(),
                guard: loopback(free_port().unwrap()),
                agent: loopback(free_port().unwrap()),
                token: format!("compose-topology-agent-token-{i}-5f1e"),
                auth_env: headers_env["authorization"].clone(),
                hook_path: path.unwrap_or("/").to_owned(),
            }
        })
        .collect();
    let (http, grpc) = (
        loopback(free_port().unwrap()),
        loopback(free_port().unwrap()),
    );
    let config = write_serve_config(dir.path(), &shipped, &nodes, http, grpc).unwrap();
    let mut env: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.auth_env.clone(), format!("Bearer {}", n.token)))
        .collect();
    env.push((shipped.api.token_env.clone().unwrap(), TOKEN.to_owned()));
    let cp = ControlPlaneProcess::start_with_env(&config, http, grpc, &env).unwrap();

    // The guards and the edge, with the shipped bootstraps' arguments.
    let mut node_ids = Vec::new();
    let mut envoys = Vec::new();
    let mut guards = BTreeMap::new();
    for node in &nodes {
        let args = bootstrap_args(&format!("guard-{}.yaml", node.name)).unwrap();
        assert_eq!(flag_value(&args, "--server"), Some(node.name.as_str()));
        node_ids.push(flag_value(&args, "--node-id").unwrap().to_owned());
        let mut args = without_flags(&args, &["--control-plane", "--upstream"]);
        let upstream = cluster.server(&node.name).addr.to_string();
        args.extend(["--upstream".to_owned(), upstream]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        envoys.push(start_managed_envoy(&args, grpc, node.guard).unwrap());
        guards.insert(node.name.clone(), node.guard);
    }
    let edge_args = bootstrap_args("edge.yaml").unwrap();
    node_ids.push(flag_value(&edge_args, "--node-id").unwrap().to_owned());
    let edge_args = without_flags(&edge_args, &["--control-plane"]);
    let edge_args: Vec<&str> = edge_args.iter().map(String::as_str).collect();
    let edge = start_managed_envoy(&edge_args, grpc, loopback(0)).unwrap();

    let agents: Vec<Proc> = nodes
        .iter()
        .map(|n| {
            let hook = cluster.server(&n.name).restart_hook().unwrap();
            start_agent(dir.path(), &shipped_agent, n, &hook).unwrap()
        })
        .collect();
    let ids: Vec<&str> = node_ids.iter().map(String::as_str).collect();
    cp.wait_current(&ids).with_context(|| cp.logs()).unwrap();

    check_routing(&edge, &guards, &initial).unwrap_or_else(|e| panic!("{e:#}"));
    let pids: Vec<Option<u32>> = names.iter().map(|n| cluster.server(n).pid()).collect();

    let rollout = cp
        .push_and_wait(&json!(moved), "compose topology", Duration::from_secs(60))
        .unwrap();
    let log = |name: &str| read(&dir.path().join(name)).unwrap_or_default();
    assert_eq!(
        rollout["state"],
        "done",
        "{rollout}\n{}\n{}",
        cp.logs(),
        log("agent-dtable-server.log")
    );

    // Each server restarted once, by its agent: a new process, one stop.
    for (name, before) in names.iter().zip(&pids) {
        let server = cluster.server(name);
        assert_ne!(server.pid(), *before, "{name} was not restarted");
        let stops = server
            .log_events()
            .unwrap()
            .iter()
            .filter(|e| e.event == "stop")
            .count();
        assert_eq!(stops, 1, "{name}");
        assert!(
            log(&format!("agent-{name}.log")).contains("restarted and healthy"),
            "{name}'s agent"
        );
    }
    wait_until(WAIT, "every base at its new owner", || {
        Ok(check_routing(&edge, &guards, &moved).ok())
    })
    .unwrap();

    // No token in any log.
    drop(agents);
    let mut logs = cp.logs();
    for n in &nodes {
        logs.push_str(&log(&format!("agent-{}.log", n.name)));
    }
    for secret in nodes.iter().map(|n| n.token.as_str()).chain([TOKEN]) {
        assert!(!logs.contains(secret), "a log holds a token:\n{logs}");
    }
    drop((edge, envoys, cp));
    cluster.stop_all().unwrap();
}
