//! Fleet safety with real processes: a real `seactl serve`, two real edge Envoys (one
//! cut off from the control plane by a relay that silently swallows every byte while
//! writers keep going through it), optionally a real guard Envoy in front of each
//! fake dtable-server. Each case counts acknowledged writes against storage.

use seashard_tests::fleet::{Case, Run, run};

fn check(case: Case) -> Run {
    let r = run(case).unwrap();
    eprintln!(
        "{case:?}: {} in {:?} ({:?}); cut-off edge refused {:?}; {}",
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
fn own_id_without_guards_the_cut_off_edge_rolls_the_rollout_back() {
    let r = check(Case {
        shared_id: false,
        guards: false,
    });
    assert_eq!(r.state, "rolled_back", "{r:?}");
    let reason = r.reason.unwrap_or_default();
    assert!(reason.contains("edge-b@127.0.0.2"), "{reason}");
}

#[test]
fn shared_id_without_guards_the_push_is_refused() {
    let r = check(Case {
        shared_id: true,
        guards: false,
    });
    assert_eq!(r.state, "refused", "{r:?}");
    let reason = r.reason.unwrap_or_default();
    assert!(
        reason.contains("`edge-a`") && reason.contains("edge-a@127.0.0.2"),
        "{reason}"
    );
}

/// With guards the rollout completes, and the cut-off edge's requests for moved
/// bases are refused by the old owner's guard.
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
fn own_id_with_guards_the_rollout_completes_and_a_guard_refuses_the_stale_edge() {
    completes_with_guards(false);
}

#[test]
fn shared_id_with_guards_the_rollout_completes() {
    completes_with_guards(true);
}
