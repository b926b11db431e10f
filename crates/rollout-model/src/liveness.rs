//! Liveness under fairness, checked on the whole state graph.
//!
//! **Why not stateright's `Property::eventually`.** In stateright 0.31 (read in
//! `src/checker/bfs.rs` and `dfs.rs`) an `eventually` property is reported only at a
//! *terminal* state, one where no action yields a state within the boundary: a path
//! that reaches an already-visited state is never terminal (the comments there say
//! so), and the bits that track "not yet satisfied" are not part of the
//! fingerprint, so a join of two paths can hide a counterexample. Any cycle that
//! avoids the goal is therefore accepted, and there is no notion of fairness: it
//! proves only that every *deadlocked* path met the goal, i.e. "can finish".
//!
//! **What [`check`] proves.** It builds the full reachable graph of a finite model
//! and looks for a *fair lasso* avoiding the goal: a reachable state that is not a
//! goal and enables no fair action (a run may stay there: the environment is never
//! forced to act), or a strongly connected set `C` of
//! non-goal states such that every fair action enabled in some state of `C` is
//! taken by an edge that stays in `C` (the Emerson–Lei refinement: states enabling
//! a fair action that `C` never takes are removed and the SCCs recomputed). Such a
//! set is exactly an infinite run that avoids the goal forever while treating every
//! fair action with *strong fairness* (an action enabled infinitely often is taken
//! infinitely often). So `None` proves: in this model, every run that is strongly
//! fair to each fair action (each [`Action`](crate::Action) value is its own class)
//! reaches the goal; unfair actions (faults, losses, clients) may happen any number
//! of times the model allows. With the faults bounded by counters in the state, a
//! run has only finitely many of them.
//!
//! What it does not prove: anything about time (how soon), runs that are not
//! strongly fair (e.g. a store that fails forever, or a timeout that never fires),
//! or bounds larger than the model's.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use stateright::Model;

/// The outcome of [`check`].
#[derive(Debug)]
pub struct Report<A> {
    /// Reachable states.
    pub states: usize,
    /// Transitions.
    pub edges: usize,
    /// A fair run that never reaches the goal, if any.
    pub violation: Option<Lasso<A>>,
}

/// A fair run avoiding the goal: a path to a state on a fair cycle (or to a
/// deadlock), and the actions taken on the cycle.
#[derive(Debug)]
pub struct Lasso<A> {
    /// The actions from an initial state to the cycle (or deadlock).
    pub prefix: Vec<A>,
    /// The number of states in the fair strongly connected set (0: a state that
    /// enables no fair action).
    pub cycle_states: usize,
    /// The distinct actions taken inside that set.
    pub cycle_actions: Vec<A>,
}

/// Explores every reachable state of `model` and searches for a run that is
/// strongly fair to every action `fair` accepts and never reaches a state
/// satisfying `goal`. Panics past `max_states` (a model too large to check this way).
pub fn check<M>(
    model: &M,
    fair: impl Fn(&M::Action) -> bool,
    goal: impl Fn(&M::State) -> bool,
    max_states: usize,
) -> Report<M::Action>
where
    M: Model,
    M::State: Hash + Eq + Clone,
    M::Action: Hash + Eq + Clone,
{
    // The graph: CSR arrays; an edge's class is its action's index among the fair
    // actions seen (u32::MAX: not fair).
    let mut index: HashMap<M::State, u32> = HashMap::new();
    let mut states: Vec<M::State> = Vec::new();
    let mut parent: Vec<(u32, u32)> = Vec::new();
    let mut classes: HashMap<M::Action, u32> = HashMap::new();
    let mut class_actions: Vec<M::Action> = Vec::new();
    let mut all_actions: HashMap<M::Action, u32> = HashMap::new();
    let mut all_action_list: Vec<M::Action> = Vec::new();
    let mut offsets: Vec<u32> = vec![0];
    let mut targets: Vec<u32> = Vec::new();
    let mut edge_class: Vec<u32> = Vec::new();
    let mut queue = VecDeque::new();
    for s in model.init_states() {
        if !index.contains_key(&s) {
            index.insert(s.clone(), states.len() as u32);
            parent.push((u32::MAX, u32::MAX));
            queue.push_back(states.len() as u32);
            states.push(s);
        }
    }
    let mut actions = Vec::new();
    // BFS order = index order, so the CSR rows are filled in order.
    let mut next = 0usize;
    while next < states.len() {
        assert!(
            states.len() <= max_states,
            "more than {max_states} states: the model is too large for the liveness check"
        );
        let id = next as u32;
        next += 1;
        let state = states[id as usize].clone();
        actions.clear();
        model.actions(&state, &mut actions);
        for a in actions.drain(..) {
            let Some(ns) = model.next_state(&state, a.clone()) else {
                continue;
            };
            if !model.within_boundary(&ns) {
                continue;
            }
            let target = match index.get(&ns) {
                Some(t) => *t,
                None => {
                    let t = states.len() as u32;
                    index.insert(ns.clone(), t);
                    states.push(ns);
                    let ai = *all_actions.entry(a.clone()).or_insert_with(|| {
                        all_action_list.push(a.clone());
                        all_action_list.len() as u32 - 1
                    });
                    parent.push((id, ai));
                    t
                }
            };
            let class = if fair(&a) {
                *classes.entry(a.clone()).or_insert_with(|| {
                    class_actions.push(a.clone());
                    class_actions.len() as u32 - 1
                })
            } else {
                u32::MAX
            };
            targets.push(target);
            edge_class.push(class);
        }
        offsets.push(targets.len() as u32);
    }
    drop(index);
    let graph = Graph {
        offsets,
        targets,
        edge_class,
    };
    let candidates: Vec<u32> = (0..states.len() as u32)
        .filter(|i| !goal(&states[*i as usize]))
        .collect();
    let path_to = |mut i: u32| {
        let mut path = Vec::new();
        while parent[i as usize].0 != u32::MAX {
            let (p, a) = parent[i as usize];
            path.push(all_action_list[a as usize].clone());
            i = p;
        }
        path.reverse();
        path
    };
    // A state where no fair action is enabled: a run may stay there for ever (the
    // environment is never forced to act).
    let stuck = candidates
        .iter()
        .find(|i| graph.out(**i).iter().all(|(_, c)| *c == u32::MAX));
    let violation = if let Some(dead) = stuck {
        Some(Lasso {
            prefix: path_to(*dead),
            cycle_states: 0,
            cycle_actions: Vec::new(),
        })
    } else {
        graph.fair_scc(candidates).map(|scc| {
            let inside: HashSet<u32> = scc.iter().copied().collect();
            let mut taken = HashSet::new();
            let mut cycle_actions = Vec::new();
            for u in &scc {
                for (t, c) in graph.out(*u) {
                    if c != u32::MAX && inside.contains(&t) && taken.insert(c) {
                        cycle_actions.push(class_actions[c as usize].clone());
                    }
                }
            }
            let entry = scc.iter().copied().min().unwrap_or(0);
            Lasso {
                prefix: path_to(entry),
                cycle_states: scc.len(),
                cycle_actions,
            }
        })
    };
    Report {
        states: states.len(),
        edges: graph.targets.len(),
        violation,
    }
}

struct Graph {
    offsets: Vec<u32>,
    targets: Vec<u32>,
    edge_class: Vec<u32>,
}

impl Graph {
    fn out(&self, u: u32) -> Vec<(u32, u32)> {
        let (a, b) = (
            self.offsets[u as usize] as usize,
            self.offsets[u as usize + 1] as usize,
        );
        (a..b)
            .map(|e| (self.targets[e], self.edge_class[e]))
            .collect()
    }

    /// A strongly connected set of `set`'s states that is fair (Emerson–Lei).
    fn fair_scc(&self, set: Vec<u32>) -> Option<Vec<u32>> {
        let n = self.offsets.len() - 1;
        let mut member = vec![false; n];
        let mut work = vec![set];
        while let Some(set) = work.pop() {
            for u in &set {
                member[*u as usize] = true;
            }
            let sccs = self.sccs(&set, &member);
            for u in &set {
                member[*u as usize] = false;
            }
            for scc in sccs {
                for u in &scc {
                    member[*u as usize] = true;
                }
                let mut taken = HashSet::new();
                let mut internal = false;
                for u in &scc {
                    for (t, c) in self.out(*u) {
                        if member[t as usize] {
                            internal = true;
                            taken.insert(c);
                        }
                    }
                }
                let unfair: Vec<bool> = scc
                    .iter()
                    .map(|u| {
                        self.out(*u)
                            .iter()
                            .any(|(_, c)| *c != u32::MAX && !taken.contains(c))
                    })
                    .collect();
                for u in &scc {
                    member[*u as usize] = false;
                }
                if !internal {
                    continue;
                }
                if !unfair.contains(&true) {
                    return Some(scc);
                }
                let rest: Vec<u32> = scc
                    .iter()
                    .zip(&unfair)
                    .filter(|(_, bad)| !**bad)
                    .map(|(u, _)| *u)
                    .collect();
                if !rest.is_empty() {
                    work.push(rest);
                }
            }
        }
        None
    }

    /// Tarjan's SCCs of the subgraph induced by `set` (iterative).
    fn sccs(&self, set: &[u32], member: &[bool]) -> Vec<Vec<u32>> {
        let mut idx: HashMap<u32, (u32, u32, bool)> = HashMap::with_capacity(set.len());
        let mut stack = Vec::new();
        let mut out = Vec::new();
        let mut counter = 0u32;
        for &root in set {
            if idx.contains_key(&root) {
                continue;
            }
            // (node, next edge position)
            let mut call: Vec<(u32, usize)> = vec![(root, self.offsets[root as usize] as usize)];
            idx.insert(root, (counter, counter, true));
            counter += 1;
            stack.push(root);
            while let Some(&mut (u, ref mut e)) = call.last_mut() {
                let end = self.offsets[u as usize + 1] as usize;
                if *e < end {
                    let t = self.targets[*e];
                    *e += 1;
                    if !member[t as usize] {
                        continue;
                    }
                    match idx.get(&t) {
                        None => {
                            idx.insert(t, (counter, counter, true));
                            counter += 1;
                            stack.push(t);
                            call.push((t, self.offsets[t as usize] as usize));
                        }
                        Some(&(ti, _, true)) => {
                            if let Some(x) = idx.get_mut(&u) {
                                x.1 = x.1.min(ti);
                            }
                        }
                        Some(_) => {}
                    }
                } else {
                    call.pop();
                    let (ui, ul, _) = idx[&u];
                    if let Some(&(p, _)) = call.last()
                        && let Some(x) = idx.get_mut(&p)
                    {
                        x.1 = x.1.min(ul);
                    }
                    if ui == ul {
                        let mut scc = Vec::new();
                        while let Some(w) = stack.pop() {
                            if let Some(x) = idx.get_mut(&w) {
                                x.2 = false;
                            }
                            scc.push(w);
                            if w == u {
                                break;
                            }
                        }
                        out.push(scc);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stateright::Property;

    /// 0 ⇄ 1 by the fair actions `a`, `b`; from 1, action `c` reaches the goal 2.
    struct Loop {
        c_fair: bool,
    }

    impl Model for Loop {
        type State = u8;
        type Action = char;
        fn init_states(&self) -> Vec<u8> {
            vec![0]
        }
        fn actions(&self, s: &u8, actions: &mut Vec<char>) {
            match s {
                0 => actions.push('a'),
                1 => actions.extend(['b', 'c']),
                _ => {}
            }
        }
        fn next_state(&self, s: &u8, a: char) -> Option<u8> {
            Some(match (s, a) {
                (0, 'a') => 1,
                (1, 'b') => 0,
                (1, 'c') => 2,
                _ => return None,
            })
        }
        fn properties(&self) -> Vec<Property<Self>> {
            Vec::new()
        }
    }

    #[test]
    fn a_fair_exit_from_a_cycle_is_taken_and_an_unfair_one_need_not_be() {
        let live = Loop { c_fair: true };
        let r = check(&live, |a| *a != 'c' || live.c_fair, |s| *s == 2, 10);
        assert!(r.violation.is_none(), "{r:?}");
        let not = Loop { c_fair: false };
        let r = check(&not, |a| *a != 'c' || not.c_fair, |s| *s == 2, 10);
        let lasso = r.violation.expect("the 0-1 cycle avoids the goal fairly");
        assert_eq!(lasso.cycle_states, 2);
        let mut taken = lasso.cycle_actions.clone();
        taken.sort();
        assert_eq!(taken, vec!['a', 'b']);
    }

    #[test]
    fn a_state_where_only_the_environment_can_act_is_a_violation() {
        let m = Loop { c_fair: false };
        // Only `c` (unfair) leaves state 1 when `b` is unfair too.
        let r = check(&m, |a| *a == 'a', |s| *s == 2, 10);
        let lasso = r.violation.expect("state 1 enables no fair action");
        assert_eq!(lasso.cycle_states, 0);
        assert_eq!(lasso.prefix, vec!['a']);
    }
}
