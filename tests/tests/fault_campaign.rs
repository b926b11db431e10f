//! A few seeds of the fault campaign (issue 16, section 7; see RELIABILITY.md and
//! `seashard_tests::campaign`): real replicas on a real 3-member etcd, gRPC and REST
//! edges, guards in one schedule, faults drawn from each seed; the checker wants no
//! acknowledged write lost, no base served by two servers at once, every rollout
//! ended after the heal. Longer runs: `cargo run -p seashard-tests --bin
//! fault-campaign -- --seeds N`.

use anyhow::Result;
use seashard_tests::campaign::{self, FaultKind, Report, Schedule};

/// The seeds CI runs (chosen so that, together, they apply every fault kind and push
/// maps meanwhile; see `the_ci_seeds_cover_every_fault_kind`), and whether guards are
/// in front of the servers.
const CI_SEEDS: [(u64, bool); 3] = [(3, false), (5, true), (6, false)];
/// Steps per CI schedule.
const CI_STEPS: usize = 8;

#[test]
fn the_ci_seeds_cover_every_fault_kind() {
    let mut kinds = std::collections::BTreeSet::new();
    for (seed, guards) in CI_SEEDS {
        let s = Schedule::generate(seed, guards, CI_STEPS, &FaultKind::ALL);
        kinds.extend(s.counts().into_keys());
        assert!(
            s.steps.iter().any(|st| st.push.is_some()),
            "{}",
            s.describe()
        );
    }
    let missing: Vec<&str> = FaultKind::ALL
        .iter()
        .filter(|k| !kinds.contains(k))
        .map(|k| k.name())
        .collect();
    assert!(missing.is_empty(), "no CI seed applies {missing:?}");
}

#[test]
fn a_few_seeded_fault_schedules_lose_no_acknowledged_write() -> Result<()> {
    let mut reports = Vec::new();
    for (seed, guards) in CI_SEEDS {
        let schedule = Schedule::generate(seed, guards, CI_STEPS, &FaultKind::ALL);
        eprint!("{}", schedule.describe());
        let r = campaign::run(&schedule)?;
        eprintln!("{}", r.line());
        if !r.violations().is_empty() {
            for t in r.timeline.iter().chain(&r.notes) {
                eprintln!("    {t}");
            }
        }
        assert!(r.acknowledged > 0, "no write acknowledged: {}", r.line());
        reports.push(r);
    }
    let (text, _) = campaign::summary(&reports, &[]);
    eprintln!("summary: {text}");
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.violations().is_empty())
        .map(Report::line)
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    Ok(())
}
