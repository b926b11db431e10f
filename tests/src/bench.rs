//! Support of the Envoy load benchmark (`envoy-load-bench`): the bootstraps
//! compared, SeaTable's documented map as an nginx configuration and as an
//! Envoy Lua filter, the request mix, `wrk` driving and parsing, the CPU time
//! of a process from `/proc`, and robust statistics (median, range).
//!
//! The measure is the proxy's CPU time per request: utime + stime of the
//! proxy's processes (Envoy; nginx's master and worker) over a `wrk` run,
//! divided by the requests `wrk` completed. Everything else on the machine
//! (wrk, the upstreams) is not counted.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_yaml::Value;

use crate::bootstrap::{self, FILTER_NAME};

/// The configurations compared, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// No wasm filter: the fallback route sends everything to `dtable-server`.
    Passthrough,
    /// `bench_noop.wasm`: a wasm filter that only sets `x-dtable-server`.
    NoopWasm,
    /// `base_router.wasm` with the shipped shard map.
    BaseRouter,
    /// `base_router.wasm` with the shipped shard map, `version_header: false`: the
    /// routing header only.
    BaseRouterNoVersionHeader,
    /// Diagnostic: `base_router.wasm` with a map sending every base to
    /// `dtable-server`, i.e. the routing of the empty filter: separates the
    /// filter's own cost from the cost of routing to two clusters.
    BaseRouterOneServer,
    /// `base_router.wasm` at the edge, each server behind a guard Envoy running
    /// `base_router.wasm` in guard mode: the CPU of the edge and both guards.
    BaseRouterGuarded,
    /// [`Variant::BaseRouter`] with another build of `base_router.wasm` (e.g. another
    /// `opt-level`), passed to [`bootstrap_for`] as the router.
    BaseRouterOtherBuild,
    /// Not Envoy: nginx (one worker) with SeaTable's documented `map
    /// $request_uri` ([`DOCUMENTED_MAP`], [`nginx_conf`]).
    Nginx,
    /// The wasm filter replaced by an `envoy.filters.http.lua` filter matching
    /// [`DOCUMENTED_MAP`] as Lua patterns over `:path` ([`LUA_DOCUMENTED_MAP`]).
    EnvoyLua,
}

impl Variant {
    pub const ALL: [Variant; 4] = [
        Variant::Passthrough,
        Variant::NoopWasm,
        Variant::BaseRouter,
        Variant::BaseRouterNoVersionHeader,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Variant::Passthrough => "Envoy passthrough (no filter)",
            Variant::NoopWasm => "Envoy + bench_noop.wasm (sets one header)",
            Variant::BaseRouter => "Envoy + base_router.wasm (shipped map)",
            Variant::BaseRouterNoVersionHeader => {
                "Envoy + base_router.wasm (shipped map, no version header)"
            }
            Variant::BaseRouterOneServer => "Envoy + base_router.wasm (one-server map)",
            Variant::BaseRouterGuarded => {
                "Envoy + base_router.wasm, then a guard hop (edge + guards' CPU)"
            }
            Variant::BaseRouterOtherBuild => {
                "Envoy + base_router.wasm, the --compare-wasm build (shipped map)"
            }
            Variant::Nginx => "nginx, SeaTable's documented map (1 worker)",
            Variant::EnvoyLua => "Envoy + Lua filter (documented map as Lua patterns)",
        }
    }

    /// Whether this configuration runs `base_router.wasm`.
    pub fn runs_base_router(self) -> bool {
        matches!(
            self,
            Variant::BaseRouter
                | Variant::BaseRouterNoVersionHeader
                | Variant::BaseRouterOneServer
                | Variant::BaseRouterGuarded
                | Variant::BaseRouterOtherBuild
        )
    }

    /// Whether this configuration sends a base of slot 0-9 to `dtable-server-2`
    /// (every one but passthrough, the empty filter and the one-server map).
    pub fn routes_by_base(self) -> bool {
        !matches!(
            self,
            Variant::Passthrough | Variant::NoopWasm | Variant::BaseRouterOneServer
        )
    }
}

/// SeaTable's documented `map $request_uri` for two servers: `(regex, server)`,
/// case-insensitive (`~*`), first match wins, else `dtable-server`. A pin (the
/// shipped map's `ff84e1a1-66e2`), then the bases whose dashed uuid starts with a
/// letter, then those starting with a digit. A 32-hex uuid (no dashes) matches
/// none of them and goes to the default, as it does behind SeaTable's nginx.
pub const DOCUMENTED_MAP: [(&str, &str); 3] = [
    ("ff84e1a1-66e2", "dtable-server-2"),
    ("([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})", "dtable-server"),
    ("([0-9])([0-9a-f]{7}-[0-9a-f]{4})", "dtable-server-2"),
];

/// The server of a request when no rule of [`DOCUMENTED_MAP`] matches.
pub const DOCUMENTED_DEFAULT: &str = "dtable-server";

/// [`DOCUMENTED_MAP`] in Lua for Envoy's Lua filter: the same three rules as Lua
/// patterns over `:path` (`%x` is `[0-9a-fA-F]`, i.e. `[0-9a-f]` under `~*`;
/// `%-` a literal dash), first match wins, setting `x-dtable-server` (a
/// client-sent value is replaced) for the route's `cluster_header`.
pub const LUA_DOCUMENTED_MAP: &str = r#"local tail = "%x%x%x%x%x%x%x%-%x%x%x%x"
local rules = {
  { "[fF][fF]84[eE]1[aA]1%-66[eE]2", "dtable-server-2" },
  { "[a-zA-Z]" .. tail, "dtable-server" },
  { "[0-9]" .. tail, "dtable-server-2" },
}
local find = string.find

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local path = headers:get(":path") or ""
  local server = "dtable-server"
  for i = 1, #rules do
    if find(path, rules[i][1]) then
      server = rules[i][2]
      break
    end
  end
  headers:replace("x-dtable-server", server)
end
"#;

/// The HTTP filter running [`LUA_DOCUMENTED_MAP`].
pub fn lua_filter() -> Value {
    let mut source = serde_yaml::Mapping::new();
    source.insert("inline_string".into(), LUA_DOCUMENTED_MAP.into());
    let mut typed = serde_yaml::Mapping::new();
    typed.insert(
        "@type".into(),
        "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua".into(),
    );
    typed.insert("default_source_code".into(), Value::Mapping(source));
    let mut filter = serde_yaml::Mapping::new();
    filter.insert("name".into(), "envoy.filters.http.lua".into());
    filter.insert("typed_config".into(), Value::Mapping(typed));
    Value::Mapping(filter)
}

/// nginx in the style of SeaTable's `dtable-server-proxy`
/// ([`crate::dtable::seatable_nginx_conf`]: `worker_processes 1`, keep-alive to
/// the upstreams, no access log) with [`DOCUMENTED_MAP`], listening on `listen`,
/// `dtable-server` and `dtable-server-2` at `upstreams`.
pub fn nginx_conf(listen: SocketAddr, upstreams: [SocketAddr; 2]) -> String {
    let servers = [
        ("dtable-server".to_string(), upstreams[0]),
        ("dtable-server-2".to_string(), upstreams[1]),
    ];
    crate::dtable::seatable_nginx_conf(listen, &servers, DOCUMENTED_DEFAULT, &DOCUMENTED_MAP)
}

/// The edge bootstrap (`envoy/edge-static.yaml`) for `variant`, on loopback,
/// with both clusters pointed at `upstreams` (`dtable-server`,
/// `dtable-server-2`). The noop filter gets an empty configuration (it sets
/// `x-dtable-server: dtable-server`); passthrough has the wasm filter removed;
/// Lua has it replaced by [`lua_filter`]. [`Variant::Nginx`] is not an Envoy.
pub fn bootstrap_for(
    variant: Variant,
    noop_wasm: &Path,
    router_wasm: &Path,
    upstreams: [SocketAddr; 2],
) -> Result<String> {
    let wasm = match variant {
        Variant::NoopWasm => noop_wasm,
        _ => router_wasm,
    };
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let yaml = crate::render_edge_static(
        wasm,
        listen,
        listen,
        &[
            ("dtable-server", upstreams[0]),
            ("dtable-server-2", upstreams[1]),
        ],
    )?;
    let mut doc: Value = serde_yaml::from_str(&yaml)?;
    match variant {
        Variant::BaseRouter | Variant::BaseRouterGuarded | Variant::BaseRouterOtherBuild => {}
        Variant::BaseRouterNoVersionHeader => {
            let mut config = bootstrap::plugin_configuration(&mut doc)?;
            config["version_header"] = false.into();
            bootstrap::set_plugin_configuration(&mut doc, &config)?;
        }
        Variant::BaseRouterOneServer => {
            let config = serde_json::json!({
                "version": 1,
                "map": {"default": "dtable-server", "slots": {"0-f": "dtable-server"},
                        "pins": {}, "paths": []}
            });
            bootstrap::set_plugin_configuration(&mut doc, &config)?;
        }
        Variant::NoopWasm => {
            bootstrap::set_plugin_configuration(&mut doc, &serde_json::json!({}))?;
        }
        Variant::Passthrough => remove_http_filter(&mut doc, FILTER_NAME)?,
        Variant::EnvoyLua => replace_http_filter(&mut doc, FILTER_NAME, Some(lua_filter()))?,
        Variant::Nginx => bail!("nginx has no Envoy bootstrap (see nginx_conf)"),
    }
    bootstrap::to_yaml(&doc)
}

/// A guard of `server` in front of `upstream`, on loopback, from `seactl
/// envoy-bootstrap --kind guard`, its filter running `config` (the shipped map of
/// `envoy/edge-static.yaml` with `guard` set) inline as the bootstrap's default: its
/// control plane is a port nothing listens on.
pub fn guard_bootstrap(server: &str, upstream: SocketAddr, router_wasm: &Path) -> Result<String> {
    let out = std::process::Command::new(crate::rollout::seactl_bin()?)
        .args(["envoy-bootstrap", "--kind", "guard", "--server", server])
        .args(["--upstream", &upstream.to_string()])
        .args(["--node-id", &format!("bench-guard-{server}")])
        .args(["--control-plane", "127.0.0.1:1"])
        .args(["--listen-port", "0", "--admin-port", "0"])
        .arg("--wasm")
        .arg(router_wasm)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "seactl envoy-bootstrap --kind guard: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut doc: Value = serde_yaml::from_slice(&out.stdout)?;
    let mut config = bootstrap::plugin_configuration(&mut bootstrap::load("edge-static.yaml")?)?;
    config["guard"] = server.into();
    let plugin = bootstrap::ecds_default_plugin(&mut doc)?;
    *bootstrap::at(plugin, &["configuration", "value"])? = config.to_string().into();
    bootstrap::set_listener(&mut doc, 0, "127.0.0.1:0".parse().expect("valid address"))?;
    bootstrap::to_yaml(&doc)
}

/// Removes the HTTP filter `name` from the connection manager of the first
/// listener; fails if it is not there.
pub fn remove_http_filter(doc: &mut Value, name: &str) -> Result<()> {
    replace_http_filter(doc, name, None)
}

/// Replaces the HTTP filter `name` of the connection manager of the first
/// listener with `with` in its place (`None`: removes it); fails unless there
/// is exactly one.
pub fn replace_http_filter(doc: &mut Value, name: &str, with: Option<Value>) -> Result<()> {
    let listeners = bootstrap::at(doc, &["static_resources", "listeners"])?
        .as_sequence_mut()
        .ok_or_else(|| anyhow!("listeners is not a list"))?;
    let listener = listeners
        .first_mut()
        .ok_or_else(|| anyhow!("bootstrap has no listener"))?;
    let mut removed = 0;
    for hf in bootstrap::http_filter_lists(listener)? {
        let is_it = |f: &Value| f.get("name").and_then(Value::as_str) == Some(name);
        let before = hf.len();
        let place = hf.iter().position(is_it);
        hf.retain(|f| !is_it(f));
        removed += before - hf.len();
        if let (Some(i), Some(new)) = (place, &with) {
            hf.insert(i, new.clone());
        }
    }
    if removed != 1 {
        bail!("expected one http filter named {name}, found {removed}");
    }
    Ok(())
}

/// The request mix: SeaTable request targets of every shape the filter
/// handles (dashed and 32-hex uuids in the path, `dtable_uuid` in the query,
/// the pinned base, a uuid-less `/ping/`), over `n_bases` deterministic bases.
pub fn request_mix(n_bases: usize) -> Vec<String> {
    let mut next = crate::xorshift(0x2545_f491_4f6c_dd1d);
    let mut out = Vec::new();
    for i in 0..n_bases {
        let uuid = crate::random_uuid(&mut next);
        let (hex, dashed) = (uuid.as_str(), uuid.dashed());
        out.push(match i % 6 {
            0 => format!("/dtable-server/api/v1/dtables/{dashed}/rows/?table_name=Table1"),
            1 => format!("/api/v1/dtables/{dashed}/"),
            2 => format!("/api-gateway/api/v2/dtables/{hex}/rows/"),
            3 => format!("/socket.io/?dtable_uuid={dashed}&EIO=4&transport=polling"),
            4 => format!("/api/v1/internal/dtables/{}/", dashed.to_uppercase()),
            _ => format!("/dtable-db/api/v1/query/{dashed}/"),
        });
    }
    out.push("/api/v1/dtables/ff84e1a1-66e2-4d0c-9b1e-7a3c5e9f2b41/".to_string());
    out.push("/ping/".to_string());
    out
}

/// A wrk Lua script that sends `paths` in turn (each wrk thread cycles
/// through the whole list from its own start).
pub fn wrk_script(paths: &[String]) -> String {
    let mut s = String::from("local paths = {\n");
    for p in paths {
        s.push_str(&format!("  {:?},\n", p));
    }
    s.push_str(
        "}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  if i > #paths then i = 1 end\n  \
         return wrk.format(\"GET\", paths[i])\nend\n",
    );
    s
}

/// What one `wrk` run reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub seconds: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

/// Parses wrk's text report (`N requests in 5.00s, ...`, `Non-2xx or 3xx
/// responses: N`, `Socket errors: connect a, read b, write c, timeout d`).
pub fn parse_wrk(out: &str) -> Result<WrkReport> {
    let mut r = WrkReport::default();
    let mut found = false;
    for line in out.lines().map(str::trim) {
        if let Some((n, rest)) = line.split_once(" requests in ") {
            r.requests = n.trim().parse().context("request count")?;
            let dur = rest.split(',').next().unwrap_or_default().trim();
            r.seconds = parse_duration_secs(dur)?;
            found = true;
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = n.trim().parse().context("non-2xx count")?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let n = part.split_whitespace().last().unwrap_or("0");
                r.socket_errors += n.parse::<u64>().context("socket error count")?;
            }
        }
    }
    if !found {
        bail!("no `N requests in T` line in wrk's output:\n{out}");
    }
    Ok(r)
}

/// `5.00s`, `250.00ms`, `1.00m` → seconds.
fn parse_duration_secs(s: &str) -> Result<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        bail!("unknown duration {s:?}");
    };
    Ok(num
        .parse::<f64>()
        .with_context(|| format!("duration {s:?}"))?
        * mult)
}

/// Runs `wrk` against `addr` for `duration` with `script`, keep-alive (wrk's
/// default), and returns its parsed report.
pub fn run_wrk(
    addr: SocketAddr,
    threads: u32,
    connections: u32,
    duration: Duration,
    script: &Path,
) -> Result<WrkReport> {
    let out = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        // wrk takes whole seconds (`2s`), not milliseconds.
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(script)
        .arg(format!("http://{addr}/"))
        .output()
        .context("run wrk (Debian package `wrk`, installed by .ci/setup)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout)
}

/// utime + stime of process `pid` (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    parse_stat_cpu(&stat)
}

/// The processes whose parent is `pid` (e.g. nginx's workers), from `/proc`.
pub fn child_pids(pid: u32) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").context("read /proc")? {
        let Some(child) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        if parse_stat_ppid(&stat)? == pid {
            out.push(child);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The parent pid (field 4) of a `/proc/PID/stat` line.
fn parse_stat_ppid(stat: &str) -> Result<u32> {
    stat.rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("malformed stat line {stat:?}"))
}

/// utime (field 14) + stime (field 15) of a `/proc/PID/stat` line. The
/// command name (field 2) may hold spaces and parentheses: fields are
/// counted after its last `)`.
pub fn parse_stat_cpu(stat: &str) -> Result<u64> {
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| anyhow!("malformed stat line {stat:?}"))?;
    // After ")": field 3 (state) is index 0, so utime (14) is index 11.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .ok_or_else(|| anyhow!("stat line too short: {stat:?}"))?
            .parse::<u64>()
            .with_context(|| format!("stat field {} of {stat:?}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// The median of `v` (mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// (min, max) of `v`.
pub fn range(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 5s test @ http://127.0.0.1:1234/\n  2 threads and 32 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency     1.20ms  300.00us   9.00ms   80.00%\n\
            \x20 123456 requests in 5.00s, 80.12MB read\n\
            \x20 Socket errors: connect 0, read 2, write 1, timeout 3\n\
            \x20 Non-2xx or 3xx responses: 7\nRequests/sec:  24691.20\nTransfer/sec:     16.02MB\n";
        assert_eq!(
            parse_wrk(out).unwrap(),
            WrkReport {
                requests: 123456,
                seconds: 5.0,
                non_2xx: 7,
                socket_errors: 6
            }
        );
        let ms = "  99 requests in 250.00ms, 1.00KB read\n";
        assert_eq!(parse_wrk(ms).unwrap().seconds, 0.25);
        assert!(parse_wrk("garbage").is_err());
    }

    #[test]
    fn parses_proc_stat_with_odd_command_names() {
        let stat = "4242 (env (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(parse_stat_cpu(stat).unwrap(), 1234 + 567);
        // Our own process has a stat line we can read.
        let own = cpu_ticks(std::process::id()).unwrap();
        assert!(own < 1_000_000_000);
        assert!(parse_stat_cpu("no paren").is_err());
        assert_eq!(parse_stat_ppid(stat).unwrap(), 1);
        assert!(parse_stat_ppid("no paren").is_err());
    }

    #[test]
    fn finds_child_processes() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let found = child_pids(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.unwrap().contains(&child.id()));
    }

    #[test]
    fn median_and_range() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(range(&[2.0, 5.0, 1.0]), (1.0, 5.0));
    }

    #[test]
    fn request_mix_names_bases_shardmap_finds() {
        let mix = request_mix(60);
        assert_eq!(mix.len(), 62);
        let with_base = mix
            .iter()
            .filter(|p| shardmap::extract(p).is_some())
            .count();
        assert_eq!(with_base, 61, "every path but /ping/ carries a base");
        let script = wrk_script(&mix[..2]);
        assert!(script.contains(&format!("{:?}", mix[0])));
        assert!(script.contains("request = function()"));
    }

    /// A placeholder server address.
    const ADDR: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    /// [`bootstrap_for`] `variant`, with placeholder filters and servers.
    fn placeholder_bootstrap(variant: Variant) -> Result<String> {
        let w = Path::new("/x.wasm");
        bootstrap_for(variant, w, w, [ADDR, ADDR])
    }

    #[test]
    fn passthrough_has_no_wasm_filter_and_others_keep_it() {
        let pass = placeholder_bootstrap(Variant::Passthrough).unwrap();
        assert!(!pass.contains(FILTER_NAME), "{pass}");
        assert!(pass.contains("envoy.filters.http.router"));
        for v in [
            Variant::NoopWasm,
            Variant::BaseRouter,
            Variant::BaseRouterOneServer,
        ] {
            assert!(placeholder_bootstrap(v).unwrap().contains(FILTER_NAME));
        }
        let mut doc: Value = serde_yaml::from_str(&pass).unwrap();
        assert!(remove_http_filter(&mut doc, FILTER_NAME).is_err());
    }

    #[test]
    fn lua_takes_the_wasm_filters_place_and_nginx_has_the_documented_map() {
        let lua = placeholder_bootstrap(Variant::EnvoyLua).unwrap();
        assert!(!lua.contains(FILTER_NAME), "{lua}");
        let doc: Value = serde_yaml::from_str(&lua).unwrap();
        let hcm = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
        let names: Vec<&str> = hcm["typed_config"]["http_filters"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["envoy.filters.http.lua", "envoy.filters.http.router"]
        );
        assert!(lua.contains("envoy_on_request"));
        assert!(placeholder_bootstrap(Variant::Nginx).is_err());

        let conf = nginx_conf(ADDR, [ADDR, ADDR]);
        assert!(conf.contains("worker_processes 1;"), "{conf}");
        for (re, server) in DOCUMENTED_MAP {
            assert!(conf.contains(&format!("\"~*{re}\" {server};")), "{conf}");
        }
    }
}
