//! The lost-write experiment, part (b): the same writes and map change as part (a)
//! (`fake_dtable.rs`), rolled out by a real `seactl serve` to a real Envoy, once
//! undisturbed and once with the control plane SIGKILLed mid-rollout and started
//! again. No acknowledged write may be lost and no base held by two servers.

use std::time::{SystemTime, UNIX_EPOCH};

use seashard_tests::rollout::{Kill, seashard_experiment};

fn check(kill: Option<Kill>) -> seashard_tests::rollout::RolloutReport {
    let (outcome, report) = seashard_experiment(kill).unwrap();
    eprintln!("{report:?}: {}", outcome.summary());
    assert_eq!(report.state, "done", "{report:?}");
    assert!(outcome.acknowledged > 700, "{}", outcome.summary());
    assert!(outcome.missing.is_empty(), "lost: {:?}", outcome.missing);
    assert!(
        outcome.double.is_empty(),
        "held twice: {:#?}",
        outcome.double
    );
    report
}

#[test]
fn a_seashard_rollout_loses_no_write() {
    let report = check(None);
    assert_eq!(report.resumed, 0);
}

#[test]
fn a_control_plane_sigkilled_while_servers_restart_resumes_and_loses_no_write() {
    let report = check(Some(Kill {
        step: "restart",
        extra: std::time::Duration::from_millis(100),
    }));
    assert_eq!(report.killed_at.as_deref(), Some("restart"));
    assert_eq!(report.resumed, 1, "{report:?}");
}

#[test]
fn a_seashard_rollout_with_the_control_plane_sigkilled_loses_no_write() {
    // A different step each run; printed so a failure can be replayed.
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    let kill = Kill::random(seed);
    eprintln!("seed {seed}: SIGKILL at {kill:?}");
    let _ = check(Some(kill));
}
