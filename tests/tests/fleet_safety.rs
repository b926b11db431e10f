//! Fleet safety with real processes: a real `seactl serve`, two real edge Envoys (one
//! cut off from the control plane by a relay that silently swallows every byte while
//! writers keep going through it), optionally a real guard Envoy in front of each
//! fake dtable-server. Each case counts acknowledged writes against storage, once
//! with every Envoy on an ADS stream and once with every Envoy polling REST xDS
//! (`api_type: REST`): two pollers of one node id from two addresses are two
//! instances, a conflict, as two streams are.

use seashard_tests::fleet::{Case, Run, Xds, run_with};

/// Runs the case over `xds`: enough writes, none lost, none served twice, and the
/// rollout ends `state`.
fn check(shared_id: bool, guards: bool, xds: Xds, state: &str) -> Run {
    let case = Case { shared_id, guards };
    let r = run_with(case, xds).unwrap();
    eprintln!(
        "{xds:?} {case:?}: {} in {:?} ({:?}); cut-off edge refused {:?}; {}",
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
    assert_eq!(r.state, state, "{r:?}");
    r
}

/// The instance key of node `id` reaching the control plane from 127.0.0.2 (the
/// cut-off edge's address).
fn cut_off_instance(xds: Xds, id: &str) -> String {
    match xds {
        Xds::Grpc => format!("{id}@127.0.0.2"),
        Xds::Rest => format!("{id}@rest:127.0.0.2"),
    }
}

/// Without guards, an edge with its own id that never ACKs rolls the rollout back.
fn own_id_without_guards_rolls_back(xds: Xds) {
    let reason = check(false, false, xds, "rolled_back")
        .reason
        .unwrap_or_default();
    assert!(
        reason.contains(&cut_off_instance(xds, "edge-b")),
        "{reason}"
    );
}

/// Without guards, two edges with one id are a conflict: the push is refused.
fn shared_id_without_guards_is_refused(xds: Xds) {
    let reason = check(true, false, xds, "refused")
        .reason
        .unwrap_or_default();
    assert!(
        reason.contains("`edge-a`") && reason.contains(&cut_off_instance(xds, "edge-a")),
        "{reason}"
    );
}

/// With guards the rollout completes, and the cut-off edge's requests for moved
/// bases are refused by the old owner's guard.
fn completes_with_guards(shared_id: bool, xds: Xds) {
    let r = check(shared_id, true, xds, "done");
    assert!(
        r.cut_off_refused.get(&421).copied().unwrap_or(0) > 0,
        "no 421 from a guard: {:?}",
        r.cut_off_refused
    );
}

/// Each row is two `#[test]`s of one check: the first name over ADS streams
/// ([`Xds::Grpc`]), the second over REST polling ([`Xds::Rest`]).
macro_rules! over_both_transports {
    ($($grpc:ident, $rest:ident => $check:expr;)*) => {
        $(
            #[test]
            fn $grpc() {
                ($check)(Xds::Grpc);
            }

            #[test]
            fn $rest() {
                ($check)(Xds::Rest);
            }
        )*
    };
}

over_both_transports! {
    own_id_without_guards_the_cut_off_edge_rolls_the_rollout_back,
    rest_own_id_without_guards_the_cut_off_poller_rolls_the_rollout_back =>
        own_id_without_guards_rolls_back;
    shared_id_without_guards_the_push_is_refused,
    rest_shared_id_without_guards_the_push_is_refused => shared_id_without_guards_is_refused;
    // REST guards are known as guards by the resource they poll.
    own_id_with_guards_the_rollout_completes_and_a_guard_refuses_the_stale_edge,
    rest_own_id_with_guards_the_rollout_completes_and_a_guard_refuses_the_stale_poller =>
        |xds| completes_with_guards(false, xds);
    shared_id_with_guards_the_rollout_completes,
    rest_shared_id_with_guards_the_rollout_completes => |xds| completes_with_guards(true, xds);
}
