//! A few seeds of the fault campaign (issue 16, section 7; see RELIABILITY.md and
//! `seashard_tests::campaign`): real replicas on a real 3-member etcd, gRPC and REST
//! edges, guards in one schedule, faults drawn from each seed; the checker wants no
//! acknowledged write lost, no base served by two servers at once, every rollout
//! ended after the heal. Longer runs: `cargo run -p seashard-tests --bin
//! fault-campaign -- --seeds N`.

use anyhow::Result;
use seashard_tests::campaign::{self, FaultKind, Report, Schedule};

/// The schedules CI runs: `(seed, guards, kinds)`, `kinds` empty for every kind. The
/// first three together apply every fault kind and push maps meanwhile (see
/// `the_ci_seeds_cover_every_fault_kind`); the last draws only replica etcd cuts and
/// kills, the stale-replica seam (it lost 3 952 acknowledged writes on 7a725ce: a
/// replica cut off from etcd answered a REST poller with an older map, the filter's
/// refusal failed its VM and requests went to the default server).
const CI_SCHEDULES: [(u64, bool, &[FaultKind]); 4] = [
    (3, false, &[]),
    (5, true, &[]),
    (6, false, &[]),
    (
        10,
        false,
        &[FaultKind::ReplicaEtcdCut, FaultKind::ReplicaKill],
    ),
];
/// Steps per CI schedule.
const CI_STEPS: usize = 8;

fn schedule(seed: u64, guards: bool, kinds: &[FaultKind]) -> Schedule {
    if kinds.is_empty() {
        Schedule::generate(seed, guards, CI_STEPS, &FaultKind::ALL)
    } else {
        Schedule::generate(seed, guards, 10, kinds)
    }
}

#[test]
fn the_ci_seeds_cover_every_fault_kind() {
    let mut kinds = std::collections::BTreeSet::new();
    for (seed, guards, only) in CI_SCHEDULES {
        let s = schedule(seed, guards, only);
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
    for (seed, guards, only) in CI_SCHEDULES {
        let schedule = schedule(seed, guards, only);
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
