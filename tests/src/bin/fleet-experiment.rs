//! `fleet-experiment [--runs N] [--out FILE]`
//!
//! Issue 8's fleet safety experiment, repeated: a real `seactl serve`, two edge
//! Envoys, one of them cut off from the control plane by a relay that silently
//! swallows every byte while writers go through it, with or without a guard Envoy in
//! front of each fake dtable-server, the cut-off edge with its own node id or sharing
//! the other's. Reports, per case, the outcome of the rollout, the time from the push
//! to its end, the writes the cut-off edge had refused by a guard (421) or a fence
//! (503), and the acknowledged writes lost, as a Markdown table printed and written
//! to `target/bench/fleet.md`.
//!
//! Needs Envoy (`bash .ci/setup`; `ENVOY_BIN`), the built `base_router.wasm`, and
//! `fake-dtable-server` and `seactl` next to this binary:
//! `cargo build --release -p seactl -p seashard-tests --bins`.

use std::fmt::Write as _;
use std::process::ExitCode;

use anyhow::Result;
use seashard_tests::bench::{median, range};
use seashard_tests::cli::{number_and_out, run_main};
use seashard_tests::fleet::{ACK_TIMEOUT, Case, run};
use seashard_tests::workspace_dir;

fn main() -> ExitCode {
    run_main("fleet-experiment", main_)
}

fn main_() -> Result<()> {
    let (runs, out) = number_and_out(
        "--runs",
        3usize,
        workspace_dir().join("target/bench/fleet.md"),
        "fleet-experiment [--runs N] [--out FILE]",
    )?;
    let mut s = String::new();
    writeln!(
        s,
        "# Fleet safety: a rollout with one edge Envoy cut off from the control plane\n\n\
         `fleet-experiment --runs {runs}`: `seactl serve` (ack_timeout {} s, keepalive 2 s + \
         2 s), edge A on its own link, edge B behind a relay that swallows every byte from \
         before the push on; 2 writers through each edge on 32 bases; the map change moves \
         the bases starting 4-7 from the first server to the second. With guards, a guard \
         Envoy stands in front of each fake dtable-server and both are `guarded`.\n",
        ACK_TIMEOUT.as_secs()
    )?;
    writeln!(
        s,
        "| cut-off edge's node id | guards | outcome (runs) | push → end, median (range) | \
         cut-off edge refused: 421 / 503 (median) | acknowledged writes | lost |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|")?;
    for (shared_id, guards) in [(false, false), (true, false), (false, true), (true, true)] {
        let case = Case { shared_id, guards };
        let mut states: Vec<String> = Vec::new();
        let mut ms = Vec::new();
        let (mut r421, mut r503, mut acked, mut lost) = (Vec::new(), Vec::new(), 0usize, 0usize);
        for i in 0..runs {
            let r = run(case)?;
            eprintln!(
                "{case:?} run {}: {} in {:?}; refused {:?}; {}",
                i + 1,
                r.state,
                r.elapsed,
                r.cut_off_refused,
                r.outcome.summary()
            );
            states.push(r.state.clone());
            ms.push(r.elapsed.as_secs_f64() * 1000.0);
            r421.push(r.cut_off_refused.get(&421).copied().unwrap_or(0) as f64);
            r503.push(r.cut_off_refused.get(&503).copied().unwrap_or(0) as f64);
            acked += r.outcome.acknowledged;
            lost += r.outcome.missing.len();
        }
        states.sort();
        states.dedup_by(|a, b| a == b);
        let (lo, hi) = range(&ms);
        writeln!(
            s,
            "| {} | {} | {} | {:.0} ms ({lo:.0}–{hi:.0}) | {:.0} / {:.0} | {acked} | {lost} |",
            if shared_id { "shared" } else { "own" },
            if guards { "yes" } else { "no" },
            states.join(", "),
            median(&ms),
            median(&r421),
            median(&r503),
        )?;
    }
    println!("{s}");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &s)?;
    eprintln!("written to {}", out.display());
    Ok(())
}
