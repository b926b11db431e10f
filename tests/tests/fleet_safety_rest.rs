//! Fleet safety over REST xDS, with real processes: `fleet_safety` again with every
//! Envoy polling the control plane's HTTP API (`api_type: REST`) instead of holding
//! an ADS stream. Edge B polls through a relay from 127.0.0.2 and is cut off while
//! writers keep going through it; acknowledged writes are counted against storage.
//! Two pollers of one node id from two addresses are two instances: a conflict.

use seashard_tests::fleet::{Case, Run, Xds, run_with};

fn check(case: Case) -> Run {
    let r = run_with(case, Xds::Rest).unwrap();
    eprintln!(
        "REST {case:?}: {} in {:?} ({:?}); cut-off edge refused {:?}; {}",
        r.state,
        r.elapsed,
        r.reason,
        r.cut_off_refused,
        r.outcome.summary()
    );
    assert!(r.outcome.acknowledged > 500, "{}", r.outcome.summary());
    assert!(
        r.outcome.missing.is_empty(),
        "lost: {:?}",
        r.outcome.missing
    );
    assert!(
        r.outcome.double.is_empty(),
        "held twice: {:#?}",
        r.outcome.double
    );
    r
}

#[test]
fn rest_own_id_without_guards_the_cut_off_poller_rolls_the_rollout_back() {
    let r = check(Case {
        shared_id: false,
        guards: false,
    });
    assert_eq!(r.state, "rolled_back", "{r:?}");
    let reason = r.reason.unwrap_or_default();
    assert!(reason.contains("edge-b@rest:127.0.0.2"), "{reason}");
}

#[test]
fn rest_shared_id_without_guards_the_push_is_refused() {
    let r = check(Case {
        shared_id: true,
        guards: false,
    });
    assert_eq!(r.state, "refused", "{r:?}");
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("`edge-a`") && reason.contains("edge-a@rest:127.0.0.2"),
        "{reason}"
    );
}

/// With REST guards (known as guards by the resource they poll) the rollout
/// completes, and the cut-off poller's requests for moved bases are refused by the
/// old owner's guard.
fn completes_with_guards(shared_id: bool) {
    let r = check(Case {
        shared_id,
        guards: true,
    });
    assert_eq!(r.state, "done", "{r:?}");
    assert!(
        r.cut_off_refused.get(&421).copied().unwrap_or(0) > 0,
        "no 421 from a guard: {:?}",
        r.cut_off_refused
    );
}

#[test]
fn rest_own_id_with_guards_the_rollout_completes_and_a_guard_refuses_the_stale_poller() {
    completes_with_guards(false);
}

#[test]
fn rest_shared_id_with_guards_the_rollout_completes() {
    completes_with_guards(true);
}
