//! The SeaTable compose files of `deploy/compose`, checked as CI can without a
//! Docker daemon: Debian's `docker-compose config` (1.29) accepts each one with
//! `.env.example` (and refuses it without a required secret); its normalized
//! output wires what seashard's configurations expect (each dtable-server
//! reachable only through its guard, the control plane's and the agents' ports
//! and names); no secret is written in a shipped file; and the Envoy bootstraps
//! are `seactl envoy-bootstrap`'s output.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use agent::AgentConfig;
use anyhow::{Context, Result, anyhow, bail, ensure};
use control_plane::{Config, RestartHook};
use seashard_tests::Proc;
use seashard_tests::compose::{self, BOOTSTRAPS, Service, host_port, read};
use seashard_tests::rollout::seactl_bin;
use serde_yaml::Value;

/// `docker-compose --env-file ENV -f deploy/compose/FILE ARGS` for the node of
/// `server`, in an environment of nothing but PATH (so that no variable of the
/// caller's fills a gap of `env`); `Ok(stdout)` or an error with its stderr.
fn docker_compose(file: &str, server: &str, env: &Path, args: &[&str]) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(compose::docker_compose_bin()?);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SEASHARD_SERVER", server)
        .current_dir(dir.path())
        .arg("--env-file")
        .arg(env)
        .arg("-f")
        .arg(compose::dir().join(file))
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out)?)
        .stderr(File::create(&err)?);
    let status = Proc::run(cmd, "docker-compose", Duration::from_secs(60))?;
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    if !status.success() {
        bail!("docker-compose -f {file} {args:?} ({server}): {status}\n{stderr}");
    }
    Ok(std::fs::read_to_string(&out)?)
}

fn env_example() -> PathBuf {
    compose::dir().join(".env.example")
}

/// `NAME=value` lines of `.env.example`.
fn env_example_vars() -> Result<Vec<(String, String)>> {
    Ok(read(&env_example())?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn seashard_config() -> Result<Config> {
    Config::parse(&read(&compose::dir().join("seashard.toml"))?).map_err(|e| anyhow!("{e}"))
}

/// The normalized compose document of `file` for the node of `server`.
fn normalized(file: &str, server: &str) -> Result<Value> {
    let yaml = docker_compose(file, server, &env_example(), &["config"])?;
    serde_yaml::from_str(&yaml).with_context(|| format!("{file}: config printed no YAML"))
}

/// The compose file's source of the file mounted at `target`, as a shipped file.
fn mounted_file(s: &Service, target: &str) -> Result<PathBuf> {
    let source = s.mounted_at(target)?;
    ensure!(
        source.parent() == Some(compose::dir().as_path()),
        "{} mounts {} from outside deploy/compose",
        s.name,
        source.display()
    );
    ensure!(
        source.is_file(),
        "{} is not a shipped file",
        source.display()
    );
    Ok(source)
}

/// The bootstrap a service runs: `--config-path FILE` of its command, mounted
/// from deploy/compose.
fn bootstrap_of(s: &Service) -> Result<(PathBuf, Value)> {
    let command = s.command();
    let at = compose::flag_value(&command, "--config-path")
        .ok_or_else(|| anyhow!("{} runs Envoy without --config-path: {command:?}", s.name))?;
    let path = mounted_file(s, at)?;
    let doc = serde_yaml::from_str(&read(&path)?)?;
    Ok((path, doc))
}

fn socket_address(v: &Value) -> Result<(String, u16)> {
    let sa = &v["socket_address"];
    Ok((
        sa["address"]
            .as_str()
            .ok_or_else(|| anyhow!("no address in {v:?}"))?
            .to_owned(),
        sa["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| anyhow!("no port in {v:?}"))?,
    ))
}

/// The only endpoint of the static cluster `name` of a bootstrap.
fn cluster_endpoint(bootstrap: &Value, name: &str) -> Result<(String, u16)> {
    let cluster = bootstrap["static_resources"]["clusters"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|c| c["name"].as_str() == Some(name))
        .ok_or_else(|| anyhow!("no cluster {name}"))?;
    socket_address(
        &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"],
    )
}

fn listener_port(bootstrap: &Value) -> Result<u16> {
    Ok(socket_address(&bootstrap["static_resources"]["listeners"][0]["address"])?.1)
}

/// The control plane a bootstrap reaches: `seashard-control-plane` of the
/// dtable-web node at its ADS port. Returns that host name.
fn check_control_plane(s: &Service, bootstrap: &Value, web: &Value, grpc: u16) -> Result<String> {
    let (host, port) = cluster_endpoint(bootstrap, "seashard_control_plane")?;
    ensure!(
        port == grpc,
        "{}: control plane port {port}, not {grpc}",
        s.name
    );
    compose::service(web, &host).with_context(|| format!("{}'s control plane `{host}`", s.name))?;
    Ok(host)
}

#[test]
fn every_compose_file_passes_docker_compose_config() {
    let config = seashard_config().unwrap();
    let first = config.servers[0].name.as_str();
    let nodes = config
        .servers
        .iter()
        .map(|s| ("dtable-server.yml", s.name.as_str()));
    for (file, server) in [("dtable-web.yml", first)].into_iter().chain(nodes) {
        docker_compose(file, server, &env_example(), &["config", "-q"])
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    // The check can fail: without a secret the YAML requires, config refuses and
    // names it.
    let dir = tempfile::tempdir().unwrap();
    let partial = dir.path().join("partial.env");
    let kept: Vec<String> = env_example_vars()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k != "SEASHARD_TOKEN")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    std::fs::write(&partial, kept.join("\n")).unwrap();
    let err = docker_compose(
        "dtable-web.yml",
        "dtable-server",
        &partial,
        &["config", "-q"],
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("SEASHARD_TOKEN"), "{err:#}");
}

#[test]
fn the_dtable_web_node_wires_edge_and_control_plane_as_seashard_toml_says() {
    let config = seashard_config().unwrap();
    let web = normalized("dtable-web.yml", "dtable-server").unwrap();
    let grpc = config.listen.grpc.port();
    let http = config.listen.http.port();

    let cp = compose::service(&web, "seashard-control-plane").unwrap();
    let toml = mounted_file(&cp, "/etc/seashard/seashard.toml").unwrap();
    assert_eq!(toml, compose::dir().join("seashard.toml"));
    assert_eq!(
        compose::flag_value(&cp.command(), "--config"),
        Some("/etc/seashard/seashard.toml")
    );
    let initial = config.initial_map.as_ref().unwrap();
    let map_path = mounted_file(&cp, &format!("/etc/seashard/{}", initial.display())).unwrap();
    assert!(
        cp.published(grpc).unwrap().host_ip.is_some(),
        "ADS on every address"
    );
    assert_eq!(
        cp.published(http).unwrap().host_ip.as_deref(),
        Some("127.0.0.1"),
        "the API is published on loopback only"
    );
    assert!(
        cp.mounted_at("/var/lib/seashard").is_ok(),
        "the store is not on a volume"
    );
    assert!(cp.env(config.api.token_env.as_deref().unwrap()).is_some());

    // The initial map names only configured servers, and is valid.
    let map = shardmap::ShardMap::from_json(&read(&map_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e:?}", map_path.display()));
    let names: Vec<&str> = config.servers.iter().map(|s| s.name.as_str()).collect();
    for s in map.servers() {
        assert!(names.contains(&s), "the map names {s}, not a [[server]]");
    }

    // Every server: reached by its name (extra_hosts of the control plane and the
    // edge, whose CDS clusters use the same address) at its node's guard and agent.
    let node = normalized("dtable-server.yml", "dtable-server").unwrap();
    let guard = compose::service(&node, "seashard-guard").unwrap();
    let agent = compose::service(&node, "seashard-agent").unwrap();
    let agent_config = AgentConfig::parse(&read(&compose::dir().join("agent.toml")).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let agent_port = agent_config.listen.unwrap().port();
    let edge = compose::service(&web, "seashard-edge").unwrap();
    for s in &config.servers {
        assert!(s.guarded, "{} is not guarded", s.name);
        let (host, port) = host_port(&s.address).unwrap();
        assert_eq!(
            guard
                .published(listener_port(&bootstrap_of(&guard).unwrap().1).unwrap())
                .unwrap()
                .published,
            port,
            "{}'s address is not its guard's published port",
            s.name
        );
        for svc in [&cp, &edge] {
            assert!(
                svc.extra_hosts().iter().any(|(n, _)| n == host),
                "{} cannot resolve {host}",
                svc.name
            );
        }
        let RestartHook::Http {
            url, headers_env, ..
        } = &s.restart
        else {
            panic!("{}: not an HTTP hook to its agent", s.name);
        };
        let authority = url
            .strip_prefix("http://")
            .and_then(|r| r.strip_suffix("/restart"))
            .unwrap_or_else(|| panic!("{url} is not http://HOST:PORT/restart"));
        let (hook_host, hook_port) = host_port(authority).unwrap();
        assert_eq!(hook_host, host, "{url} is not {}'s node", s.name);
        assert_eq!(
            agent.published(agent_port).unwrap().published,
            hook_port,
            "{url}: not the agent's published port"
        );
        for var in headers_env.values() {
            let value = cp.env(var).unwrap_or_else(|| panic!("{var} is not set"));
            assert!(value.starts_with("Bearer "), "{var}");
        }
    }

    // The edge: where dtable-server-proxy listened, ADS from this control plane.
    let (edge_file, edge_bootstrap) = bootstrap_of(&edge).unwrap();
    assert_eq!(edge_file, compose::dir().join("edge.yaml"));
    let listen = listener_port(&edge_bootstrap).unwrap();
    assert_eq!(edge.published(listen).unwrap().published, 5000);
    check_control_plane(&edge, &edge_bootstrap, &web, grpc).unwrap();
}

#[test]
fn each_dtable_server_node_is_reachable_only_through_its_guard() {
    let config = seashard_config().unwrap();
    let web = normalized("dtable-web.yml", "dtable-server").unwrap();
    let grpc = config.listen.grpc.port();
    for server in &config.servers {
        let node = normalized("dtable-server.yml", &server.name).unwrap();
        let seatable = compose::service(&node, "seatable-server").unwrap();
        let guard = compose::service(&node, "seashard-guard").unwrap();
        let agent = compose::service(&node, "seashard-agent").unwrap();
        let at = &server.name;

        // SeaTable's image, dtable-server only, no port of its own.
        let image = seatable.doc["image"].as_str().unwrap();
        assert!(
            image.starts_with("seatable/seatable-enterprise:"),
            "{image}"
        );
        assert_eq!(
            seatable.env("ENABLE_DTABLE_SERVER").as_deref(),
            Some("true")
        );
        for other in [
            "ENABLE_DTABLE_WEB",
            "ENABLE_DTABLE_DB",
            "ENABLE_API_GATEWAY",
        ] {
            assert_eq!(seatable.env(other).as_deref(), Some("false"), "{other}");
        }
        assert!(
            seatable.ports().unwrap().is_empty(),
            "{at}: dtable-server publishes a port"
        );
        for key in ["network_mode", "expose"] {
            assert!(seatable.doc.get(key).is_none(), "{at}: {key}");
        }
        // Only the guard and the agent publish anything.
        for s in compose::services(&node).unwrap() {
            if !s.ports().unwrap().is_empty() {
                assert!(["seashard-guard", "seashard-agent"].contains(&s.name.as_str()));
            }
        }

        // The guard: this server's bootstrap, its upstream the dtable-server's
        // service, listening where the control plane (and the edge) reach it.
        let (file, bootstrap) = bootstrap_of(&guard).unwrap();
        assert_eq!(file, compose::dir().join(format!("guard-{at}.yaml")));
        let filter = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            [0]["typed_config"]["http_filters"][0]["name"];
        assert_eq!(
            filter.as_str(),
            Some(format!("seashard.base_router.guard.{at}").as_str())
        );
        let (upstream, upstream_port) =
            cluster_endpoint(&bootstrap, "local_dtable_server").unwrap();
        assert_eq!(upstream, seatable.name, "{at}: the guard's upstream");
        assert_eq!(upstream_port, 5000, "dtable-server listens on 5000");
        let (_, address_port) = host_port(&server.address).unwrap();
        let listen = listener_port(&bootstrap).unwrap();
        assert_eq!(guard.published(listen).unwrap().published, address_port);
        // On another host: by extra_hosts, to the port the control plane publishes.
        let cp_host = check_control_plane(&guard, &bootstrap, &web, grpc).unwrap();
        assert!(guard.extra_hosts().iter().any(|(n, _)| *n == cp_host));
        let cp = compose::service(&web, &cp_host).unwrap();
        assert_eq!(cp.published(grpc).unwrap().published, grpc);

        // The agent: restarts this node's SeaTable container, checks `pong`
        // through the guard, its token from the environment.
        let agent_config = AgentConfig::parse(
            &read(&mounted_file(&agent, "/etc/seashard/agent.toml").unwrap()).unwrap(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let container = seatable.doc["container_name"].as_str().unwrap();
        assert!(
            agent_config
                .command
                .iter()
                .any(|a| a.contains(&format!("/containers/{container}/restart"))),
            "{:?}",
            agent_config.command
        );
        assert!(agent.mounted_at("/var/run/docker.sock").is_ok());
        let health = agent_config
            .health_url
            .strip_prefix("http://")
            .and_then(|r| r.strip_suffix("/ping/"))
            .unwrap();
        assert_eq!(host_port(health).unwrap(), (guard.name.as_str(), listen));
        let token_env = agent_config.token_env.as_deref().unwrap();
        assert!(agent.env(token_env).is_some_and(|t| t.len() >= 16));
    }
}

#[test]
fn no_secret_is_written_in_a_shipped_file() {
    let secrets: Vec<(String, String)> = env_example_vars()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| ["TOKEN", "PASSWORD", "KEY"].iter().any(|m| k.contains(m)))
        .collect();
    assert!(secrets.len() >= 6, "{secrets:?}");
    for entry in std::fs::read_dir(compose::dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().is_some_and(|n| n == ".env.example") || !path.is_file() {
            continue;
        }
        let text = read(&path).unwrap();
        for (name, value) in &secrets {
            assert!(
                !text.contains(value.as_str()),
                "{} holds the value of {name}",
                path.display()
            );
        }
    }
}

#[test]
fn the_shipped_bootstraps_are_the_generators_output() {
    let seactl = seactl_bin().unwrap();
    for (file, args) in BOOTSTRAPS {
        let o = Command::new(&seactl)
            .arg("envoy-bootstrap")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let shipped = read(&compose::dir().join(file)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            shipped,
            "deploy/compose/{file} is stale: regenerate it with \
             `seactl envoy-bootstrap {} -o deploy/compose/{file}`",
            args.join(" ")
        );
    }
}
