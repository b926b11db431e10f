//! `lost-write-experiment [--runs N] [--proxy nginx|envoy|both] [--out FILE]`
//!
//! Part (a) of issue 5's lost-write experiment, repeated: fake dtable-servers on
//! one storage behind a proxy, 4 writers on 32 bases, and SeaTable's documented
//! procedure for a map change that moves bases (change the proxy's map, then
//! restart both servers), next to the control (the same restarts, no map
//! change). Reports how often acknowledged writes were lost and how many, as a
//! Markdown table printed and written to `target/bench/lost-writes.md`.
//!
//! Needs nginx and Envoy (`bash .ci/setup`; `ENVOY_BIN`), the built
//! `base_router.wasm`, and the `fake-dtable-server` binary next to this one:
//! `cargo build --release -p seashard-tests --bins`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use seashard_tests::bench::{median, range};
use seashard_tests::lost_writes::{
    BASES, Outcome, SAVE_INTERVAL, WRITERS, envoy_experiment, nginx_experiment,
};
use seashard_tests::workspace_dir;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lost-write-experiment: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let (mut runs, mut proxy, mut out) = (
        5usize,
        "both".to_string(),
        workspace_dir().join("target/bench/lost-writes.md"),
    );
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--runs" => runs = val()?.parse()?,
            "--proxy" => proxy = val()?,
            "--out" => out = PathBuf::from(val()?),
            _ => bail!(
                "usage: lost-write-experiment [--runs N] [--proxy nginx|envoy|both] [--out FILE]"
            ),
        }
    }
    let proxies: Vec<&str> = match proxy.as_str() {
        "both" => vec!["nginx", "envoy"],
        "nginx" => vec!["nginx"],
        "envoy" => vec!["envoy"],
        other => bail!("unknown proxy {other:?}"),
    };
    let mut s = String::new();
    writeln!(
        s,
        "# Lost-write experiment, part (a): SeaTable's documented procedure\n\n\
         `lost-write-experiment --runs {runs} --proxy {proxy}`: 2 fake dtable-servers on one \
         storage (save every {} ms and on SIGTERM), {WRITERS} writers on {BASES} bases through \
         the proxy; the map change moves the bases starting 4-7 (8 of {BASES}) from the first \
         server to the second; the operator then restarts the first server, then the second. \
         Control: the same restarts without a map change.\n",
        SAVE_INTERVAL.as_millis()
    )?;
    writeln!(
        s,
        "| proxy | procedure | runs | runs that lost writes | acknowledged writes, median | \
         lost writes, median (min – max) | bases held by two servers, median |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    for p in proxies {
        for change in [true, false] {
            let mut outcomes: Vec<Outcome> = Vec::new();
            for i in 0..runs {
                let o = if p == "nginx" {
                    nginx_experiment(change)?
                } else {
                    envoy_experiment(change)?
                };
                eprintln!("{p} change={change} run {}: {}", i + 1, o.summary());
                outcomes.push(o);
            }
            let f = |g: fn(&Outcome) -> usize| -> Vec<f64> {
                outcomes.iter().map(|o| g(o) as f64).collect()
            };
            let lost = f(|o| o.missing.len());
            let (lo, hi) = range(&lost);
            writeln!(
                s,
                "| {} | {} | {runs} | {} | {:.0} | {:.0} ({lo:.0} – {hi:.0}) | {:.0} |",
                if p == "nginx" {
                    "nginx, SeaTable's map"
                } else {
                    "Envoy + base-router (static)"
                },
                if change {
                    "map change, then restart both"
                } else {
                    "restart both, no map change"
                },
                outcomes.iter().filter(|o| !o.missing.is_empty()).count(),
                median(&f(|o| o.acknowledged)),
                median(&lost),
                median(&f(|o| o.double.len())),
            )?;
        }
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &s)?;
    println!("{s}");
    eprintln!("lost-write-experiment: wrote {}", out.display());
    Ok(())
}
