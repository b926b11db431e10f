//! Model-checks the rollout protocol: the fixed protocol is safe and every rollout
//! ends under fairness; today's behaviours at the seams and the known-bad protocol
//! variants are found unsafe (or, for the orphan, never ending). Each safety check is
//! an exhaustive BFS (stateright); each liveness check builds the whole graph
//! ([`rollout_model::liveness`]).

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use rollout_model::{
    Action, Bugs, DONE_AFTER_FAULTS, DONE_SKIPPING_A_RESTART, DONE_WITH_STALE_CUT_EDGE,
    NEW_OWNER_SERVES_B, NO_PROXY_GOES_BACK, Proxy, ROLLOUT_DONE, RolloutModel, SECOND_DONE, Server,
    State, TWO_SERVERS_NEVER_HOLD_B, Variant, liveness,
};
use stateright::{Checker, HasDiscoveries, Model};

/// Explores every state of `model` and returns the checker.
fn explore(name: &str, model: RolloutModel) -> impl Checker<RolloutModel> + use<> {
    let start = Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{name}: {} states ({} unique), max depth {}, {:.2?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        start.elapsed()
    );
    checker
}

/// Explores `model` and asserts both safety properties hold.
fn safe(name: &str, model: RolloutModel) -> impl Checker<RolloutModel> + use<> {
    let checker = explore(name, model);
    checker.assert_no_discovery(TWO_SERVERS_NEVER_HOLD_B);
    checker.assert_no_discovery(NO_PROXY_GOES_BACK);
    checker
}

/// Searches `model` until `property` fails; returns the counterexample.
fn counterexample(name: &str, model: RolloutModel, property: &'static str) -> Vec<Action> {
    let start = Instant::now();
    let checker = model
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([property])))
        .spawn_bfs()
        .join();
    println!(
        "{name}: {} states ({} unique) until the counterexample, {:.2?}",
        checker.state_count(),
        checker.unique_state_count(),
        start.elapsed()
    );
    let path = checker.assert_any_discovery(property);
    let last: &State = path.last_state();
    if property == TWO_SERVERS_NEVER_HOLD_B {
        assert!(last.holds[0] && last.holds[1], "{last:?}");
    } else {
        assert!(last.went_back, "{last:?}");
    }
    let actions = path.into_actions();
    println!("{name}: counterexample: {actions:?}");
    actions
}

/// Checks that every rollout begun ends under fairness; returns the report.
fn liveness(name: &str, model: &RolloutModel) -> liveness::Report<Action> {
    let start = Instant::now();
    let report = liveness::check(model, |a| model.fair(a), State::rollouts_ended, 3_000_000);
    println!(
        "{name}: liveness over {} states, {} edges, {:.2?}: {}",
        report.states,
        report.edges,
        start.elapsed(),
        match &report.violation {
            None => "every fair run ends every rollout".to_owned(),
            Some(l) => format!(
                "a fair run never ends: {:?} then a cycle of {} states taking {:?}",
                l.prefix, l.cycle_states, l.cycle_actions
            ),
        }
    );
    report
}

/// [`safe`] for `model` without guards, then with (`name, guards: ...`): each checker
/// in turn.
fn safe_both(
    name: &str,
    model: impl Fn(bool) -> RolloutModel,
) -> impl Iterator<Item = impl Checker<RolloutModel>> {
    [false, true]
        .into_iter()
        .map(move |guards| safe(&format!("{name}, guards: {guards}"), model(guards)))
}

/// [`counterexample`] of `property` in `model` without guards, then with (`name,
/// guards: ...`): each one in turn.
fn counterexamples(
    name: &str,
    model: impl Fn(bool) -> RolloutModel,
    property: &'static str,
) -> impl Iterator<Item = Vec<Action>> {
    [false, true].into_iter().map(move |guards| {
        counterexample(
            &format!("{name}, guards: {guards}"),
            model(guards),
            property,
        )
    })
}

fn bugs(f: impl FnOnce(&mut Bugs)) -> Bugs {
    let mut b = Bugs::NONE;
    f(&mut b);
    b
}

// ---- the first model's protocol variants (one replica, one rollout) ----

#[test]
fn correct_without_guards_is_safe_and_can_finish() {
    let model = RolloutModel::new(Variant::Correct, false);
    assert!(model.shared_node_id && model.lossy_network);
    assert!(model.max_crashes > 0 && model.max_cut_offs > 0 && model.max_proxy_restarts > 0);
    let checker = safe("correct, no guards", model);
    checker.assert_any_discovery(ROLLOUT_DONE);
    checker.assert_any_discovery(NEW_OWNER_SERVES_B);
    checker.assert_any_discovery(DONE_AFTER_FAULTS);
    // Without guards a cut-off edge that never saw the fence blocks every rollout.
    assert!(checker.discovery(DONE_WITH_STALE_CUT_EDGE).is_none());
}

#[test]
fn correct_with_guards_is_safe_and_finishes_despite_a_cut_off_edge() {
    let model = RolloutModel::new(Variant::Correct, true);
    assert!(model.shared_node_id && model.max_cut_offs > 0);
    let checker = safe("correct, guards", model);
    checker.assert_any_discovery(ROLLOUT_DONE);
    checker.assert_any_discovery(NEW_OWNER_SERVES_B);
    checker.assert_any_discovery(DONE_AFTER_FAULTS);
    checker.assert_any_discovery(DONE_WITH_STALE_CUT_EDGE);
}

#[test]
fn no_fence_is_unsafe() {
    let actions = counterexample(
        "no fence",
        RolloutModel::new(Variant::NoFence, false),
        TWO_SERVERS_NEVER_HOLD_B,
    );
    assert!(actions.contains(&Action::Activate));
}

#[test]
fn acks_per_node_id_with_a_shared_id_are_unsafe() {
    let actions = counterexample(
        "ACKs per node id",
        RolloutModel::new(Variant::AckPerNodeId, false),
        TWO_SERVERS_NEVER_HOLD_B,
    );
    // The rollout went on with the fence ACKed by one of the two edges only.
    let acked = actions
        .iter()
        .take_while(|a| **a != Action::FenceAcked)
        .filter(|a| matches!(a, Action::Ack(_)))
        .collect::<HashSet<_>>();
    assert_eq!(acked.len(), 1, "{actions:?}");
}

#[test]
fn acks_per_node_id_without_a_shared_id_are_safe() {
    let model = RolloutModel {
        shared_node_id: false,
        ..RolloutModel::new(Variant::AckPerNodeId, false)
    };
    safe("ACKs per node id, distinct ids", model);
}

#[test]
fn guards_activating_before_the_old_owners_guard_acked_is_unsafe() {
    let actions = counterexample(
        "guards, activate early",
        RolloutModel::new(Variant::GuardsActivateEarly, true),
        TWO_SERVERS_NEVER_HOLD_B,
    );
    assert!(actions.contains(&Action::Activate));
}

#[test]
fn a_request_still_on_its_way_to_the_old_owner_across_its_restart_is_unsafe() {
    let model = |guards| RolloutModel {
        requests_in_flight: true,
        ..RolloutModel::new(Variant::Correct, guards)
    };
    for actions in counterexamples("in-flight request", model, TWO_SERVERS_NEVER_HOLD_B) {
        assert!(actions.contains(&Action::Arrive(Server::Old)));
    }
}

#[test]
fn draining_before_the_restart_closes_the_in_flight_gap() {
    let model = |guards| RolloutModel {
        requests_in_flight: true,
        drain_before_restart: true,
        ..RolloutModel::new(Variant::Correct, guards)
    };
    for checker in safe_both("in-flight requests, drain", model) {
        checker.assert_any_discovery(ROLLOUT_DONE);
    }
}

// ---- several replicas: a stale one, watch lag, Envoys failing over ----

/// Two replicas: the leader may crash once (its Envoys fail over to the other), the
/// other may be cut off from the store (it keeps serving its snapshot) and its
/// watch lags; a proxy may restart once. Faults go on after the rollout ended.
/// With guards, one edge (the guards are what must hold).
fn replicas(bugs: Bugs, guards: bool) -> RolloutModel {
    RolloutModel {
        replicas: 2,
        edges: if guards { 1 } else { 2 },
        max_crashes: 1,
        max_store_cuts: 1,
        max_proxy_restarts: 1,
        faults_after_end: true,
        ..RolloutModel::quiet(bugs, guards)
    }
}

#[test]
fn today_a_stale_replica_sends_its_old_map_to_envoys_that_fail_over_to_it() {
    let model = |guards| {
        replicas(
            bugs(|b| {
                b.stale_replica_sends = true;
                b.filter_goes_back = true;
            }),
            guards,
        )
    };
    let name = "stale replica today";
    for actions in counterexamples(name, model, TWO_SERVERS_NEVER_HOLD_B) {
        // Failed over to the replica that is cut off or whose watch lags.
        assert!(
            actions.iter().any(|a| matches!(a, Action::Subscribe(_, 1))),
            "{actions:?}"
        );
    }
    for actions in counterexamples(name, model, NO_PROXY_GOES_BACK) {
        assert!(
            actions.iter().any(|a| matches!(a, Action::Subscribe(..))),
            "{actions:?}"
        );
    }
}

#[test]
fn a_filter_that_refuses_older_maps_is_not_enough_when_a_stale_replica_serves_a_restarted_envoy() {
    let model = |guards| replicas(bugs(|b| b.stale_replica_sends = true), guards);
    let name = "stale replica, filter fixed";
    for actions in counterexamples(name, model, TWO_SERVERS_NEVER_HOLD_B) {
        assert!(
            actions.iter().any(|a| matches!(a, Action::RestartProxy(_))),
            "{actions:?}"
        );
    }
}

#[test]
fn fixed_replicas_never_send_an_older_or_stale_map() {
    for checker in safe_both("replicas fixed", |guards| replicas(Bugs::NONE, guards)) {
        checker.assert_any_discovery(ROLLOUT_DONE);
        checker.assert_any_discovery(NEW_OWNER_SERVES_B);
    }
}

// ---- REST pollers ----

/// REST edges sharing one node id; one edge may be cut off.
fn rest(bugs: Bugs) -> RolloutModel {
    RolloutModel {
        rest_edges: true,
        shared_node_id: true,
        max_cut_offs: 1,
        ..RolloutModel::quiet(bugs, false)
    }
}

#[test]
fn today_two_rest_pollers_with_one_id_are_one_record_and_unsafe() {
    let actions = counterexample(
        "REST merged",
        rest(bugs(|b| b.rest_merge = true)),
        TWO_SERVERS_NEVER_HOLD_B,
    );
    assert!(
        actions.contains(&Action::CutOff(Proxy::E2))
            || actions.contains(&Action::CutOff(Proxy::E1))
    );
}

#[test]
fn rest_pollers_as_instances_are_safe() {
    let checker = safe("REST instances", rest(Bugs::NONE));
    checker.assert_any_discovery(ROLLOUT_DONE);
}

// ---- requests whose base is percent-encoded ----

fn encoded(bugs: Bugs, guards: bool) -> RolloutModel {
    RolloutModel {
        encoded_requests: true,
        ..RolloutModel::quiet(bugs, guards)
    }
}

#[test]
fn today_an_encoded_base_goes_to_the_default_and_passes_a_guard() {
    let model = |guards| {
        encoded(
            bugs(|b| {
                b.edge_reads_no_encoded_base = true;
                b.guard_passes_unreadable = true;
            }),
            guards,
        )
    };
    for actions in counterexamples("encoded base today", model, TWO_SERVERS_NEVER_HOLD_B) {
        assert!(
            actions
                .iter()
                .any(|a| matches!(a, Action::RequestEncoded(..))),
            "{actions:?}"
        );
    }
}

#[test]
fn a_guard_that_refuses_what_it_cannot_read_stops_todays_edges() {
    let model = encoded(bugs(|b| b.edge_reads_no_encoded_base = true), true);
    let checker = safe("encoded base, today's edges, fixed guards", model);
    checker.assert_any_discovery(ROLLOUT_DONE);
}

#[test]
fn fixed_filters_read_the_encoded_base() {
    for _checker in safe_both("encoded base fixed", |guards| encoded(Bugs::NONE, guards)) {}
}

// ---- two rollouts, may_hold, an orphan ----

/// Two rollouts in a row (B to N, then back to O); the store may fail once.
fn two_rollouts(bugs: Bugs) -> RolloutModel {
    RolloutModel {
        rollouts: 2,
        max_store_errors: 1,
        ..RolloutModel::quiet(bugs, false)
    }
}

#[test]
fn today_an_orphaned_rollout_lets_the_next_one_skip_a_server_that_holds_a_moved_base() {
    let actions = counterexample(
        "orphan today",
        two_rollouts(bugs(|b| b.orphans = true)),
        TWO_SERVERS_NEVER_HOLD_B,
    );
    assert!(actions.contains(&Action::GiveUp), "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == Action::Begin).count(), 2);
}

#[test]
fn today_an_orphaned_rollout_never_ends() {
    // Only a control plane restart (a fault: nobody is forced to do it) resumes it.
    let model = RolloutModel {
        rollouts: 1,
        max_crashes: 1,
        ..two_rollouts(bugs(|b| b.orphans = true))
    };
    let report = liveness("orphan today", &model);
    let lasso = report.violation.expect("the orphan is found");
    assert!(lasso.prefix.contains(&Action::GiveUp), "{lasso:?}");
    // The same model without today's driver: every rollout ends.
    let fixed = RolloutModel {
        bugs: Bugs::NONE,
        ..model
    };
    assert!(liveness("orphan fixed", &fixed).violation.is_none());
}

#[test]
fn fixed_two_rollouts_in_a_row_are_safe_and_plan_restarts_from_may_hold() {
    let checker = safe("two rollouts fixed", two_rollouts(Bugs::NONE));
    checker.assert_any_discovery(SECOND_DONE);
    checker.assert_any_discovery(DONE_SKIPPING_A_RESTART);
}

// ---- liveness of the fixed protocol ----

#[test]
fn every_rollout_ends_under_fairness() {
    for (name, model) in [
        ("live: replicas", replicas(Bugs::NONE, false)),
        ("live: REST", rest(Bugs::NONE)),
        ("live: two rollouts, store errors", two_rollouts(Bugs::NONE)),
    ] {
        let report = liveness(name, &model);
        assert!(report.violation.is_none(), "{name}: {:?}", report.violation);
    }
}

// ---- everything at once, fixed ----

/// Every seam at once: two replicas (stale follower, watch lag, a crash), REST edges
/// sharing an id, percent-encoded requests, two rollouts with a store failure between.
fn everything(bugs: Bugs) -> RolloutModel {
    RolloutModel {
        rest_edges: true,
        encoded_requests: true,
        rollouts: 2,
        max_store_errors: 1,
        max_cut_offs: 1,
        max_proxy_restarts: 0,
        ..replicas(bugs, false)
    }
}

#[test]
fn the_fixed_protocol_is_safe_and_live_with_every_seam_at_once() {
    let model = everything(Bugs::NONE);
    let checker = safe("everything, fixed", model.clone());
    checker.assert_any_discovery(SECOND_DONE);
    let report = liveness("everything, fixed", &model);
    assert!(report.violation.is_none(), "{:?}", report.violation);
}

#[test]
fn everything_at_once_today_is_unsafe() {
    counterexample(
        "everything, today",
        everything(Bugs::TODAY),
        TWO_SERVERS_NEVER_HOLD_B,
    );
}
