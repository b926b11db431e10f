//! `envoy-load-bench [--rounds N] [--duration 5s] [--warmup 2s] [--threads 2]
//! [--connections 32] [--bases 60] [--diagnose] [--guards] [--others]
//! [--compare-wasm FILE] [--out FILE]`
//!
//! Proxy CPU per request of Envoys (one worker each, `--concurrency 1`), all
//! built from `envoy/edge-static.yaml` on loopback, and with `--others` of nginx:
//!   1. passthrough: the wasm filter removed, the fallback route to `dtable-server`;
//!   2. with `bench_noop.wasm`, a filter that only sets `x-dtable-server`;
//!   3. with `base_router.wasm` and the shipped shard map;
//!   4. the same with `version_header: false` (the routing header only);
//!   5. with `--diagnose`: `base_router.wasm` with a map that sends every base
//!      to `dtable-server` (the empty filter's routing): the filter's own cost
//!      apart from routing to two clusters;
//!   6. with `--guards`: 3., its two clusters each behind a guard Envoy (from
//!      `seactl envoy-bootstrap --kind guard`, the shipped map inline) in front of
//!      the upstream: the CPU of the edge and both guards, i.e. the cost of a guard
//!      hop beside the edge alone (3.). Needs `seactl` next to this binary.
//!   7. with `--others`, nginx (Debian's `nginx-light`, `worker_processes 1`)
//!      with SeaTable's documented `map $request_uri` (a pin, then the a-z and
//!      0-9 regexes): the CPU of its master and worker;
//!   8. with `--others`, Envoy with the wasm filter replaced by an
//!      `envoy.filters.http.lua` filter matching the same three rules as Lua
//!      patterns over `:path`, setting `x-dtable-server` for the same
//!      `cluster_header` route.
//!   9. with `--compare-wasm FILE`: 3. with another build of `base_router.wasm`
//!      (e.g. built with another `opt-level`).
//!
//! Over several rounds, interleaved (the order rotates each round), `wrk` drives
//! each one with keep-alive connections cycling through a fixed set of SeaTable
//! request targets; the proxy's utime+stime over the run (from `/proc/PID/stat`:
//! the Envoy process, or nginx's master and worker) divided by the requests wrk
//! completed is its CPU per request. Before measuring, each one must route a
//! base of slot 0-9, a base of slot a-f and the pinned base as intended; every
//! answer under load must be a 2xx. Reports per configuration the median and
//! range across rounds and the ratio to passthrough (median and range of the
//! per-round ratios), as a Markdown table printed and written to
//! `target/bench/envoy-load.md`.
//!
//! Needs `wrk`, Envoy and nginx (`bash .ci/setup`; set `ENVOY_BIN` to the real
//! binary) and the two filters:
//! `cargo build -p base-router -p bench-noop --target wasm32-wasip1 --profile wasm`.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use seashard_tests::bench::{self, Variant};
use seashard_tests::cli::{Flags, run_main};
use seashard_tests::{
    Connection, Envoy, Nginx, envoy_bin, free_port, loopback, nginx_bin, wasm_file, workspace_dir,
};

struct Args {
    rounds: usize,
    duration: Duration,
    warmup: Duration,
    threads: u32,
    connections: u32,
    bases: usize,
    diagnose: bool,
    guards: bool,
    others: bool,
    compare_wasm: Option<PathBuf>,
    out: PathBuf,
}

const USAGE: &str = "usage: envoy-load-bench [--rounds N] [--duration 5s] [--warmup 2s] \
                     [--threads 2] [--connections 32] [--bases 60] [--diagnose] [--guards] \
                     [--others] [--compare-wasm FILE] [--out FILE]";

/// Whole seconds, `5s` or `5` (wrk's own resolution).
fn parse_duration(s: &str) -> Result<Duration> {
    let n: u64 = s
        .strip_suffix('s')
        .unwrap_or(s)
        .parse()
        .with_context(|| format!("duration {s:?}: whole seconds, e.g. 5s"))?;
    Ok(Duration::from_secs(n))
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        rounds: 5,
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(2),
        threads: 2,
        connections: 32,
        bases: 60,
        diagnose: false,
        guards: false,
        others: false,
        compare_wasm: None,
        out: workspace_dir().join("target/bench/envoy-load.md"),
    };
    let mut flags = Flags::from_env();
    while let Some(arg) = flags.next_flag() {
        match arg.as_str() {
            "--rounds" => a.rounds = flags.parse(&arg)?,
            "--duration" => a.duration = parse_duration(&flags.value(&arg)?)?,
            "--warmup" => a.warmup = parse_duration(&flags.value(&arg)?)?,
            "--threads" => a.threads = flags.parse(&arg)?,
            "--connections" => a.connections = flags.parse(&arg)?,
            "--bases" => a.bases = flags.parse(&arg)?,
            "--out" => a.out = PathBuf::from(flags.value(&arg)?),
            "--diagnose" => a.diagnose = true,
            "--guards" => a.guards = true,
            "--others" => a.others = true,
            "--compare-wasm" => a.compare_wasm = Some(PathBuf::from(flags.value(&arg)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if a.rounds == 0 || a.duration.is_zero() {
        bail!("--rounds and --duration must be positive");
    }
    Ok(Some(a))
}

/// An echo upstream in this process (its CPU is not Envoy's, which is all
/// that is measured).
fn echo_upstream(name: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || seashard_tests::echo::serve(name, listener));
    Ok(addr)
}

struct Run {
    cpu_us_per_req: f64,
    rps: f64,
}

/// The proxy wrk drives.
enum Proxy {
    Envoy(Envoy),
    Nginx(Nginx),
}

impl Proxy {
    fn addr(&self) -> SocketAddr {
        match self {
            Proxy::Envoy(e) => e.listener_addr,
            Proxy::Nginx(n) => n.addr,
        }
    }

    fn logs(&self) -> String {
        match self {
            Proxy::Envoy(e) => format!("Envoy log:\n{}", e.logs()),
            Proxy::Nginx(n) => format!("nginx log:\n{}", n.logs()),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Proxy::Nginx(n) = self {
            // Its master reaps its worker (a killed group may leave it a zombie).
            n.stop();
        }
    }
}

/// One configuration under load: the proxy wrk drives, and every process whose
/// CPU counts (it, nginx's worker, or the guards behind it).
struct Measured {
    variant: Variant,
    proxy: Proxy,
    pids: Vec<u32>,
    _guards: Vec<Envoy>,
}

/// nginx with SeaTable's documented map in front of `ups`, and the pids whose CPU
/// counts: its master and its one worker.
fn start_nginx(ups: [SocketAddr; 2]) -> Result<(Nginx, Vec<u32>)> {
    let listen = loopback(free_port()?);
    let mut nginx = Nginx::start(&bench::nginx_conf(listen, ups), listen).context("start nginx")?;
    let master = nginx.process().pid();
    let workers = bench::child_pids(master)?;
    if workers.len() != 1 {
        bail!(
            "nginx (master {master}) has workers {workers:?}, expected one; its log:\n{}",
            nginx.logs()
        );
    }
    Ok((nginx, [vec![master], workers].concat()))
}

fn cpu_ticks(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|p| bench::cpu_ticks(*p)).sum()
}

fn measure(m: &Measured, args: &Args, script: &std::path::Path, d: Duration) -> Result<Run> {
    let pids = m.pids.as_slice();
    let before = cpu_ticks(pids)?;
    let r = bench::run_wrk(m.proxy.addr(), args.threads, args.connections, d, script)?;
    let after = cpu_ticks(pids)?;
    if r.non_2xx > 0 || r.requests == 0 {
        bail!(
            "{}: wrk got {} non-2xx answers of {} requests; {}",
            m.variant.label(),
            r.non_2xx,
            r.requests,
            m.proxy.logs()
        );
    }
    let secs = (after - before) as f64 / bench::clock_ticks_per_sec() as f64;
    Ok(Run {
        cpu_us_per_req: secs * 1e6 / r.requests as f64,
        rps: r.requests as f64 / r.seconds,
    })
}

fn main() -> ExitCode {
    run_main("envoy-load-bench", run)
}

fn run() -> Result<()> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    let noop = wasm_file("bench_noop.wasm")?;
    let router = wasm_file("base_router.wasm")?;
    let ups = [
        echo_upstream("dtable-server")?,
        echo_upstream("dtable-server-2")?,
    ];

    let out_dir = args
        .out
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&out_dir)?;
    let mix = bench::request_mix(args.bases);
    let script = out_dir.join("envoy-load-requests.lua");
    std::fs::write(&script, bench::wrk_script(&mix))?;

    let mut envoys = Vec::new();
    let mut variants = Variant::ALL.to_vec();
    if args.diagnose {
        variants.push(Variant::BaseRouterOneServer);
    }
    if args.guards {
        variants.push(Variant::BaseRouterGuarded);
    }
    if args.others {
        variants.extend([Variant::Nginx, Variant::EnvoyLua]);
    }
    if args.compare_wasm.is_some() {
        variants.push(Variant::BaseRouterOtherBuild);
    }
    for v in variants {
        let mut guards = Vec::new();
        let mut targets = ups;
        if v == Variant::BaseRouterGuarded {
            for (i, name) in ["dtable-server", "dtable-server-2"].into_iter().enumerate() {
                let yaml = bench::guard_bootstrap(name, ups[i], &router)?;
                let guard =
                    Envoy::start(&yaml).with_context(|| format!("start guard of {name}"))?;
                targets[i] = guard.listener_addr;
                guards.push(guard);
            }
        }
        let (proxy, pids) = if v == Variant::Nginx {
            let (nginx, pids) = start_nginx(ups)?;
            (Proxy::Nginx(nginx), pids)
        } else {
            let wasm = match (&args.compare_wasm, v) {
                (Some(other), Variant::BaseRouterOtherBuild) => other,
                _ => &router,
            };
            let yaml = bench::bootstrap_for(v, &noop, wasm, targets)?;
            let mut envoy = Envoy::start(&yaml).with_context(|| format!("start {}", v.label()))?;
            let mut pids = vec![envoy.process().pid()];
            for g in &mut guards {
                pids.push(g.process().pid());
            }
            (Proxy::Envoy(envoy), pids)
        };
        // Routed as intended: a base of slot 0-9 and the pinned base (which
        // starts with a letter) reach dtable-server-2, a base of slot a-f
        // dtable-server, through every configuration that routes by base; the
        // others send everything to dtable-server.
        for (path, routed) in [
            (
                "/api/v1/dtables/5f3e2d1c-0b9a-4876-9543-210fedcba987/",
                "dtable-server-2",
            ),
            (
                "/api/v1/dtables/ff84e1a1-66e2-4d0c-9b1e-7a3c5e9f2b41/",
                "dtable-server-2",
            ),
            (
                "/api/v1/dtables/c0ffee00-0b9a-4876-9543-210fedcba987/",
                "dtable-server",
            ),
        ] {
            let r = Connection::open(proxy.addr())?.get(path, &[])?;
            let want = if v.routes_by_base() {
                routed
            } else {
                "dtable-server"
            };
            if r.status != 200 || r.header("x-served-by") != Some(want) {
                bail!(
                    "{}: {path}: expected 200 from {want}, got {} {:?}; {}",
                    v.label(),
                    r.status,
                    r.header("x-served-by"),
                    proxy.logs()
                );
            }
        }
        envoys.push(Measured {
            variant: v,
            proxy,
            pids,
            _guards: guards,
        });
    }

    eprintln!(
        "envoy-load-bench: {} rounds x {} configurations x {:?} (warm-up {:?}), wrk -t{} -c{}, {} request targets",
        args.rounds,
        envoys.len(),
        args.duration,
        args.warmup,
        args.threads,
        args.connections,
        mix.len()
    );
    if !args.warmup.is_zero() {
        for m in &envoys {
            measure(m, &args, &script, args.warmup)?;
        }
    }

    // runs[variant][round]
    let mut runs: Vec<Vec<Run>> = (0..envoys.len()).map(|_| Vec::new()).collect();
    for round in 0..args.rounds {
        for k in 0..envoys.len() {
            let i = (round + k) % envoys.len();
            let run = measure(&envoys[i], &args, &script, args.duration)?;
            eprintln!(
                "  round {} {:<45} {:>7.2} us/request {:>9.0} req/s",
                round + 1,
                envoys[i].variant.label(),
                run.cpu_us_per_req,
                run.rps
            );
            runs[i].push(run);
        }
    }

    let mut report = render(&args, &envoys, &runs, mix.len())?;
    for w in [Some(&noop), Some(&router), args.compare_wasm.as_ref()]
        .into_iter()
        .flatten()
    {
        let size = std::fs::metadata(w).map(|m| m.len()).unwrap_or(0);
        writeln!(report, "Filter: {} ({size} bytes).", w.display())?;
    }
    let head = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(workspace_dir())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    writeln!(report, "Source: git {head}.")?;
    std::fs::write(&args.out, &report).with_context(|| format!("write {}", args.out.display()))?;
    println!("{report}");
    eprintln!("envoy-load-bench: wrote {}", args.out.display());
    Ok(())
}

fn render(args: &Args, envoys: &[Measured], runs: &[Vec<Run>], n_targets: usize) -> Result<String> {
    let base: Vec<f64> = runs[0].iter().map(|r| r.cpu_us_per_req).collect();
    let mut s = String::new();
    writeln!(s, "# Envoy load benchmark: proxy CPU per request\n")?;
    writeln!(
        s,
        "`envoy-load-bench --rounds {} --duration {}s`: {} rounds, configurations interleaved \
         (order rotated each round), {} s each after a {} s warm-up; wrk -t{} -c{} keep-alive, \
         {} SeaTable request targets in turn; Envoy `--concurrency 1`, nginx \
         `worker_processes 1`; CPU = utime+stime of the proxy (the Envoy process, or nginx's \
         master and worker) / requests completed.\n",
        args.rounds,
        args.duration.as_secs(),
        args.rounds,
        args.duration.as_secs(),
        args.warmup.as_secs(),
        args.threads,
        args.connections,
        n_targets
    )?;
    writeln!(
        s,
        "| configuration | CPU µs/request, median | range | ratio to passthrough, median | ratio range | req/s, median |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|")?;
    for (i, v) in envoys.iter().map(|m| m.variant).enumerate() {
        let cpu: Vec<f64> = runs[i].iter().map(|r| r.cpu_us_per_req).collect();
        let rps: Vec<f64> = runs[i].iter().map(|r| r.rps).collect();
        let ratios: Vec<f64> = cpu.iter().zip(&base).map(|(c, b)| c / b).collect();
        let (lo, hi) = bench::range(&cpu);
        let (rlo, rhi) = bench::range(&ratios);
        writeln!(
            s,
            "| {} | {:.2} | {:.2} – {:.2} | {:.2}× | {:.2} – {:.2} | {:.0} |",
            v.label(),
            bench::median(&cpu),
            lo,
            hi,
            bench::median(&ratios),
            rlo,
            rhi,
            bench::median(&rps)
        )?;
    }
    // base-router relative to the empty filter, per round; and to the others.
    let position = |v: Variant| envoys.iter().position(|m| m.variant == v);
    let mut pairs = Vec::new();
    for (i, v) in envoys.iter().map(|m| m.variant).enumerate().skip(2) {
        if v.runs_base_router() {
            pairs.push((i, 1, "empty filter"));
        }
    }
    if let (Some(b), Some(o)) = (
        position(Variant::BaseRouter),
        position(Variant::BaseRouterOtherBuild),
    ) {
        pairs.push((o, b, "base_router.wasm as built"));
    }
    for (other, name) in [(Variant::EnvoyLua, "Lua filter"), (Variant::Nginx, "nginx")] {
        if let (Some(b), Some(o)) = (position(Variant::BaseRouter), position(other)) {
            pairs.push((b, o, name));
        }
    }
    writeln!(s)?;
    for (i, j, name) in pairs {
        let per_round: Vec<f64> = runs[i]
            .iter()
            .zip(&runs[j])
            .map(|(a, b)| a.cpu_us_per_req / b.cpu_us_per_req)
            .collect();
        let (lo, hi) = bench::range(&per_round);
        writeln!(
            s,
            "- {} / {name}, per round: median {:.2}× (range {:.2} – {:.2}).",
            envoys[i].variant.label(),
            bench::median(&per_round),
            lo,
            hi
        )?;
    }
    // The guard hop beside the edge alone (base-router, shipped map), per round.
    if let Some(g) = envoys
        .iter()
        .position(|m| m.variant == Variant::BaseRouterGuarded)
    {
        let edge: Vec<f64> = runs[2].iter().map(|r| r.cpu_us_per_req).collect();
        let added: Vec<f64> = runs[g]
            .iter()
            .zip(&edge)
            .map(|(r, e)| r.cpu_us_per_req - e)
            .collect();
        let ratio: Vec<f64> = runs[g]
            .iter()
            .zip(&edge)
            .map(|(r, e)| r.cpu_us_per_req / e)
            .collect();
        let (alo, ahi) = bench::range(&added);
        let (rlo, rhi) = bench::range(&ratio);
        writeln!(
            s,
            "- a guard hop adds, per round: median {:.2} µs/request (range {:.2} – {:.2}); \
             edge + guard / edge alone: median {:.2}× (range {:.2} – {:.2}).",
            bench::median(&added),
            alo,
            ahi,
            bench::median(&ratio),
            rlo,
            rhi
        )?;
    }
    writeln!(s)?;
    writeln!(s, "Per round, CPU µs/request:\n")?;
    for (i, v) in envoys.iter().map(|m| m.variant).enumerate() {
        let vals: Vec<String> = runs[i]
            .iter()
            .map(|r| format!("{:.2}", r.cpu_us_per_req))
            .collect();
        writeln!(s, "- {}: {}", v.label(), vals.join(", "))?;
    }
    let envoy = envoy_bin()?;
    let version = std::process::Command::new(&envoy)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    writeln!(
        s,
        "\nMachine: {cores} cores (shared with wrk and the upstreams), clock ticks {} Hz.\n{}",
        bench::clock_ticks_per_sec(),
        version
            .lines()
            .find(|l| l.contains("version"))
            .unwrap_or("")
    )?;
    if envoys.iter().any(|m| m.variant == Variant::Nginx) {
        // `nginx -v` writes to stderr.
        let nginx = std::process::Command::new(nginx_bin()?)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default();
        writeln!(s, "{nginx}")?;
    }
    Ok(s)
}
