//! Model-checks the rollout protocol: the correct one is safe (and can finish), the
//! known-bad variants are found unsafe. Each check is an exhaustive BFS.

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use rollout_model::{
    Action, DONE_AFTER_FAULTS, DONE_WITH_STALE_CUT_EDGE, NEW_OWNER_SERVES_B, ROLLOUT_DONE,
    RolloutModel, State, TWO_SERVERS_NEVER_HOLD_B, Variant,
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

/// Searches `model` until the safety property fails; returns the counterexample.
fn counterexample(name: &str, model: RolloutModel) -> Vec<Action> {
    let start = Instant::now();
    let checker = model
        .checker()
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([
            TWO_SERVERS_NEVER_HOLD_B,
        ])))
        .spawn_bfs()
        .join();
    println!(
        "{name}: {} states ({} unique) until the counterexample, {:.2?}",
        checker.state_count(),
        checker.unique_state_count(),
        start.elapsed()
    );
    let path = checker.assert_any_discovery(TWO_SERVERS_NEVER_HOLD_B);
    let last: &State = path.last_state();
    assert!(last.holds[0] && last.holds[1], "{last:?}");
    let actions = path.into_actions();
    println!("{name}: counterexample: {actions:?}");
    actions
}

#[test]
fn correct_without_guards_is_safe_and_can_finish() {
    let model = RolloutModel::new(Variant::Correct, false);
    assert!(model.shared_node_id && model.lossy_network);
    assert!(model.max_crashes > 0 && model.max_cut_offs > 0 && model.max_proxy_restarts > 0);
    let checker = explore("correct, no guards", model);
    checker.assert_no_discovery(TWO_SERVERS_NEVER_HOLD_B);
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
    let checker = explore("correct, guards", model);
    checker.assert_no_discovery(TWO_SERVERS_NEVER_HOLD_B);
    checker.assert_any_discovery(ROLLOUT_DONE);
    checker.assert_any_discovery(NEW_OWNER_SERVES_B);
    checker.assert_any_discovery(DONE_AFTER_FAULTS);
    checker.assert_any_discovery(DONE_WITH_STALE_CUT_EDGE);
}

#[test]
fn no_fence_is_unsafe() {
    let actions = counterexample("no fence", RolloutModel::new(Variant::NoFence, false));
    assert!(actions.contains(&Action::Activate));
}

#[test]
fn acks_per_node_id_with_a_shared_id_are_unsafe() {
    let actions = counterexample(
        "ACKs per node id",
        RolloutModel::new(Variant::AckPerNodeId, false),
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
    let checker = explore("ACKs per node id, distinct ids", model);
    checker.assert_no_discovery(TWO_SERVERS_NEVER_HOLD_B);
}

#[test]
fn guards_activating_before_the_old_owners_guard_acked_is_unsafe() {
    let actions = counterexample(
        "guards, activate early",
        RolloutModel::new(Variant::GuardsActivateEarly, true),
    );
    assert!(actions.contains(&Action::Activate));
}

#[test]
fn a_request_still_on_its_way_to_the_old_owner_across_its_restart_is_unsafe() {
    for guards in [false, true] {
        let model = RolloutModel {
            requests_in_flight: true,
            ..RolloutModel::new(Variant::Correct, guards)
        };
        let actions = counterexample(&format!("in-flight request, guards: {guards}"), model);
        assert!(actions.contains(&Action::Arrive(rollout_model::Server::Old)));
    }
}

#[test]
fn draining_before_the_restart_closes_the_in_flight_gap() {
    for guards in [false, true] {
        let model = RolloutModel {
            requests_in_flight: true,
            drain_before_restart: true,
            ..RolloutModel::new(Variant::Correct, guards)
        };
        let checker = explore(
            &format!("in-flight requests, drain, guards: {guards}"),
            model,
        );
        checker.assert_no_discovery(TWO_SERVERS_NEVER_HOLD_B);
        checker.assert_any_discovery(ROLLOUT_DONE);
    }
}
