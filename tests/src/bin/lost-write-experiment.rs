//! `lost-write-experiment [--runs N] [--proxy nginx|envoy|both|seashard|all] [--seed N] [--out FILE]`
//!
//! Issue 5's lost-write experiment, repeated: fake dtable-servers on one storage
//! behind a proxy, 4 writers on 32 bases, and (a) SeaTable's documented procedure
//! for a map change that moves bases (change the proxy's map, then restart both
//! servers), next to the control (the same restarts, no map change); (b) the same
//! change rolled out by `seactl serve`, undisturbed and with the control plane
//! SIGKILLed at a random step and started again. Reports how often acknowledged
//! writes were lost and how many, as a Markdown table printed and written to
//! `target/bench/lost-writes.md`.
//!
//! Needs nginx and Envoy (`bash .ci/setup`; `ENVOY_BIN`), the built
//! `base_router.wasm`, and `fake-dtable-server` and `seactl` next to this binary:
//! `cargo build --release -p seactl -p seashard-tests --bins`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use seashard_tests::bench::{median, range};
use seashard_tests::cli::{Flags, run_main};
use seashard_tests::lost_writes::{
    BASES, Outcome, SAVE_INTERVAL, WRITERS, envoy_experiment, nginx_experiment,
};
use seashard_tests::rollout::{Kill, RolloutReport, seashard_experiment};
use seashard_tests::workspace_dir;

fn main() -> ExitCode {
    run_main("lost-write-experiment", run)
}

fn run() -> Result<()> {
    let (mut runs, mut proxy, mut out) = (
        5usize,
        "all".to_string(),
        workspace_dir().join("target/bench/lost-writes.md"),
    );
    let mut seed: u64 = 1;
    let mut notes: Vec<String> = Vec::new();
    let mut flags = Flags::from_env();
    while let Some(a) = flags.next_flag() {
        match a.as_str() {
            "--runs" => runs = flags.parse(&a)?,
            "--proxy" => proxy = flags.value(&a)?,
            "--out" => out = PathBuf::from(flags.value(&a)?),
            "--seed" => seed = flags.parse(&a)?,
            _ => bail!(
                "usage: lost-write-experiment [--runs N] [--proxy nginx|envoy|both|seashard|all] [--seed N] [--out FILE]"
            ),
        }
    }
    let proxies: Vec<&str> = match proxy.as_str() {
        "all" => vec!["nginx", "envoy", "seashard"],
        "both" => vec!["nginx", "envoy"],
        "seashard" => vec!["seashard"],
        "nginx" => vec!["nginx"],
        "envoy" => vec!["envoy"],
        other => bail!("unknown proxy {other:?}"),
    };
    let mut s = String::new();
    writeln!(
        s,
        "# Lost-write experiment: SeaTable's documented procedure (a) and seashard's rollout (b)\n\n\
         `lost-write-experiment --runs {runs} --proxy {proxy}`: 2 fake dtable-servers on one \
         storage (save every {} ms and on SIGTERM), {WRITERS} writers on {BASES} bases through \
         the proxy; the map change moves the bases starting 4-7 (8 of {BASES}) from the first \
         server to the second; the operator then restarts the first server, then the second. \
         Control: the same restarts without a map change. (b): the same change proposed to \
         `seactl serve`, which fences, restarts through `fake-dtable-ctl` and activates.\n",
        SAVE_INTERVAL.as_millis()
    )?;
    writeln!(
        s,
        "| proxy | procedure | runs | runs that lost writes | acknowledged writes, median | \
         lost writes, median (min – max) | bases held by two servers, median |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    type Run = Box<dyn Fn(usize) -> Result<(Outcome, Option<RolloutReport>)>>;
    let mut rows: Vec<(&str, &str, Run)> = Vec::new();
    for p in &proxies {
        for change in [true, false] {
            let procedure = if change {
                "map change, then restart both"
            } else {
                "restart both, no map change"
            };
            let run: Run = match *p {
                "nginx" => Box::new(move |_| Ok((nginx_experiment(change)?, None))),
                "envoy" => Box::new(move |_| Ok((envoy_experiment(change)?, None))),
                _ => continue,
            };
            let label = if *p == "nginx" {
                "nginx, SeaTable's map"
            } else {
                "Envoy + base-router (static)"
            };
            rows.push((label, procedure, run));
        }
        if *p == "seashard" {
            let label = "Envoy + base-router + seactl serve";
            rows.push((
                label,
                "seashard rollout",
                Box::new(|_| {
                    let (o, r) = seashard_experiment(None)?;
                    Ok((o, Some(r)))
                }),
            ));
            let seed = seed;
            rows.push((
                label,
                "seashard rollout, control plane SIGKILLed at a random step and restarted",
                Box::new(move |i| {
                    let (o, r) = seashard_experiment(Some(Kill::random(seed + i as u64)))?;
                    Ok((o, Some(r)))
                }),
            ));
        }
    }
    for (label, procedure, run) in rows {
        let mut outcomes: Vec<Outcome> = Vec::new();
        let mut reports: Vec<RolloutReport> = Vec::new();
        for i in 0..runs {
            let (o, r) = run(i)?;
            eprintln!("{label} / {procedure} run {}: {} {r:?}", i + 1, o.summary());
            outcomes.push(o);
            reports.extend(r);
        }
        let f = |g: fn(&Outcome) -> usize| -> Vec<f64> {
            outcomes.iter().map(|o| g(o) as f64).collect()
        };
        let lost = f(|o| o.missing.len());
        let (lo, hi) = range(&lost);
        writeln!(
            s,
            "| {label} | {procedure} | {runs} | {} | {:.0} | {:.0} ({lo:.0} – {hi:.0}) | {:.0} |",
            outcomes.iter().filter(|o| !o.missing.is_empty()).count(),
            median(&f(|o| o.acknowledged)),
            median(&lost),
            median(&f(|o| o.double.len())),
        )?;
        if !reports.is_empty() {
            let killed: Vec<String> = reports
                .iter()
                .filter_map(|r| {
                    r.killed_at
                        .as_ref()
                        .map(|k| format!("{k} (resumed {})", r.resumed))
                })
                .collect();
            let overhead: Vec<f64> = reports
                .iter()
                .filter_map(|r| r.overhead_ms)
                .map(|m| m as f64)
                .collect();
            notes.push(format!(
                "- {procedure}: rollouts ended {}; overhead beyond the restarts median {:.0} ms{}",
                reports
                    .iter()
                    .map(|r| r.state.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                median(&overhead),
                if killed.is_empty() {
                    String::new()
                } else {
                    format!("; killed at: {}", killed.join(", "))
                }
            ));
        }
    }
    if !notes.is_empty() {
        writeln!(s, "\n{}", notes.join("\n"))?;
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &s)?;
    println!("{s}");
    eprintln!("lost-write-experiment: wrote {}", out.display());
    Ok(())
}
