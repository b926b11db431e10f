//! The fault campaign of issue 16 (see `seashard_tests::campaign` and RELIABILITY.md):
//! seeded schedules of faults against 3 replicas on a 3-member etcd, gRPC and REST
//! edges, writers counted against storage.
//!
//! ```text
//! fault-campaign [--seeds N] [--first S] [--seed S] [--guards | --mixed] [--steps K]
//!                [--kinds a,b,..] [--out FILE] [--plan]
//! ```
//! `--seeds N` runs seeds `S..S+N` (`--first`, default 1); `--seed S[,S..]` replays some;
//! `--mixed` guards the odd seeds; `--plan` prints the
//! schedules without running them. Exit status 1 when a schedule failed the checker,
//! 2 on a harness error.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use seashard_tests::campaign::{self, FaultKind, Schedule};

struct Args {
    seeds: Vec<u64>,
    guards: Option<bool>,
    steps: usize,
    kinds: Vec<FaultKind>,
    out: Option<String>,
    /// Print the schedules only.
    plan: bool,
}

fn parse() -> Result<Args> {
    let mut a = Args {
        seeds: Vec::new(),
        guards: Some(false),
        steps: 8,
        kinds: FaultKind::ALL.to_vec(),
        out: None,
        plan: false,
    };
    let (mut n, mut first, mut one) = (None, 1u64, None);
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--seeds" => n = Some(value()?.parse::<u64>()?),
            "--first" => first = value()?.parse()?,
            "--seed" => {
                one = Some(
                    value()?
                        .split(',')
                        .map(str::parse::<u64>)
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            "--guards" => a.guards = Some(true),
            "--mixed" => a.guards = None,
            "--steps" => a.steps = value()?.parse()?,
            "--out" => a.out = Some(value()?),
            "--plan" => a.plan = true,
            "--kinds" => {
                a.kinds = value()?
                    .split(',')
                    .map(|k| FaultKind::parse(k).with_context(|| format!("no fault kind {k}")))
                    .collect::<Result<_>>()?
            }
            "-h" | "--help" => {
                let kinds: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                println!(
                    "fault-campaign [--seeds N] [--first S] [--seed S] [--guards | --mixed] \
                     [--steps K] [--kinds {}] [--out FILE] [--plan]",
                    kinds.join(",")
                );
                std::process::exit(0);
            }
            _ => bail!("unknown argument {arg} (see --help)"),
        }
    }
    a.seeds = match (one, n) {
        (Some(s), _) => s,
        (None, Some(n)) => (first..first + n).collect(),
        (None, None) => vec![first],
    };
    Ok(a)
}

fn main() -> Result<ExitCode> {
    let args = parse()?;
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for &seed in &args.seeds {
        let guards = args.guards.unwrap_or(seed % 2 == 1);
        let schedule = Schedule::generate(seed, guards, args.steps, &args.kinds);
        print!("{}", schedule.describe());
        if args.plan {
            let counts: Vec<String> = schedule
                .counts()
                .iter()
                .map(|(k, n)| format!("{}×{n}", k.name()))
                .collect();
            println!("  faults: {}", counts.join(" "));
            continue;
        }
        match campaign::run(&schedule) {
            Ok(r) => {
                println!("{}", r.line());
                if !r.violations().is_empty() {
                    for t in &r.timeline {
                        println!("    {t}");
                    }
                    for n in &r.notes {
                        println!("    note: {n}");
                    }
                }
                reports.push(r);
            }
            Err(e) => {
                println!("seed {seed} guards={guards}: HARNESS ERROR: {e:#}");
                errors.push((seed, format!("{e:#}")));
            }
        }
    }
    let (text, mut json) = campaign::summary(&reports, &errors);
    println!("summary: {text}");
    if let Some(out) = &args.out {
        json["commit"] = serde_json::json!(commit());
        json["steps"] = serde_json::json!(args.steps);
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("write {out}"))?;
        println!("results: {out}");
    }
    Ok(if !errors.is_empty() {
        ExitCode::from(2)
    } else if reports.iter().any(|r| !r.violations().is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `git rev-parse HEAD` of the workspace, when git answers.
fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(seashard_tests::workspace_dir())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
