//! `diff`: what changes between two maps, and exactly which bases move.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::hex::{SlotRange, canonical_pin};
use crate::map::ShardMap;
use crate::problem::Problems;
use crate::router::{Fence, Router};
use crate::uuid::BaseUuid;

/// A coalesced range of slots whose owner changes (pins left aside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotMove {
    pub range: String,
    pub from: String,
    pub to: String,
}

/// A pin added, removed or re-pointed (canonical form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinChange {
    pub pin: String,
    /// Its server in the old map, `None` when the pin is new.
    pub before: Option<String>,
    /// Its server in the new map, `None` when the pin is removed.
    pub after: Option<String>,
}

/// Bases move from one server to another.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Move {
    pub from: String,
    pub to: String,
}

/// What a change from one map to another does.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    /// Slot ranges whose owner changes.
    pub slots: Vec<SlotMove>,
    /// Pins that change.
    pub pins: Vec<PinChange>,
    /// Exactly the bases whose owner changes: fence these during the rollout.
    pub fence: Fence,
    /// Which servers hand bases to which.
    pub moves: Vec<Move>,
    /// Servers that lose bases: they may hold a moved base in memory.
    pub losing: Vec<String>,
    /// Servers that gain bases.
    pub gaining: Vec<String>,
    /// The default server changes (uuid-less requests only).
    pub default_changed: bool,
    /// Path rules change (uuid-less requests only: no base moves for them).
    pub paths_changed: bool,
    /// Servers the new map names that the old did not.
    pub servers_added: Vec<String>,
    /// Servers the old map named that the new does not.
    pub servers_removed: Vec<String>,
}

impl Plan {
    /// True when at least one base changes owner: the change needs a rollout.
    pub fn moves_bases(&self) -> bool {
        !self.fence.is_empty()
    }

    /// True when nothing at all changes.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// The plan of going from `old` to `new`; both must be valid.
///
/// Exact for bases: a base is in `plan.fence` if and only if its owner differs between
/// the two maps. Path rules and the default only steer uuid-less requests; their
/// changes are reported, never fenced.
pub fn diff(old: &ShardMap, new: &ShardMap) -> Result<Plan, Problems> {
    let (ro, rn) = match (Router::new(old), Router::new(new)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            let mut p = Problems::default();
            for (which, r) in [("old", a.err()), ("new", b.err())] {
                for e in r.into_iter().flat_map(|x| x.0) {
                    p.push(format!("{which} map: {}", e.at), e.message);
                }
            }
            return Err(p);
        }
    };
    let mut plan = Plan {
        slots: slot_moves(&ro, &rn),
        pins: pin_changes(&ro, &rn),
        default_changed: old.default != new.default,
        paths_changed: old.paths != new.paths,
        ..Plan::default()
    };

    let mut moves = BTreeSet::new();
    let moved = Cells::new(&[&ro, &rn]).select("", &mut |base| {
        let (from, to) = (ro.owner_of(base), rn.owner_of(base));
        if from != to {
            moves.insert(Move {
                from: from.to_owned(),
                to: to.to_owned(),
            });
        }
        from != to
    });
    plan.fence = fence_of(&moved);
    plan.losing = sorted_unique(moves.iter().map(|m| &m.from));
    plan.gaining = sorted_unique(moves.iter().map(|m| &m.to));
    plan.moves = moves.into_iter().collect();

    let before: BTreeSet<&str> = old.servers().into_iter().collect();
    let after: BTreeSet<&str> = new.servers().into_iter().collect();
    plan.servers_added = after.difference(&before).map(|s| s.to_string()).collect();
    plan.servers_removed = before.difference(&after).map(|s| s.to_string()).collect();
    Ok(plan)
}

/// The names, sorted, each once.
fn sorted_unique<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    names
        .collect::<BTreeSet<_>>()
        .into_iter()
        .cloned()
        .collect()
}

/// The servers that own at least one base inside `fence` under `map`: the servers that
/// may have loaded one of those bases while `map` was active.
pub fn owners_within(map: &ShardMap, fence: &Fence) -> Result<BTreeSet<String>, Problems> {
    let router = Router::new(map)?;
    let mut problems = Problems::default();
    let mut prefixes: Vec<String> = Vec::new();
    for (i, s) in fence.slots.iter().enumerate() {
        match SlotRange::parse(s) {
            Ok(r) => {
                let w = r.digits as usize;
                prefixes.extend((r.lo..=r.hi).map(|v| format!("{v:0w$x}")));
            }
            Err(e) => problems.push(format!("fence.slots[{i}]"), e),
        }
    }
    for (i, pin) in fence.pins.iter().enumerate() {
        match canonical_pin(pin) {
            Ok(p) => prefixes.push(p),
            Err(e) => problems.push(format!("fence.pins[{i}]"), e),
        }
    }
    let prefixes = problems.into_result(prefixes)?;
    let cells = Cells::new(&[&router]);
    let mut owners = BTreeSet::new();
    for prefix in &prefixes {
        cells.select(prefix, &mut |base| {
            owners.insert(router.owner_of(base).to_owned());
            false
        });
    }
    Ok(owners)
}

/// The trie of hex prefixes, cut into cells: a prefix is split only where a pin or a
/// slot boundary of one of the routers makes its bases resolve differently.
struct Cells<'a> {
    routers: Vec<&'a Router>,
    /// Every pin of every router, sorted.
    pins: Vec<&'a str>,
}

impl<'a> Cells<'a> {
    fn new(routers: &[&'a Router]) -> Cells<'a> {
        let mut pins: Vec<&str> = routers
            .iter()
            .flat_map(|r| r.compiled().pins.iter().map(|(p, _)| p.as_str()))
            .collect();
        pins.sort_unstable();
        pins.dedup();
        Cells {
            routers: routers.to_vec(),
            pins,
        }
    }

    /// Calls `pick` with a representative base of every cell under `prefix`; returns the
    /// picked cells as disjoint sorted prefixes, with fully picked siblings merged.
    fn select(&self, prefix: &str, pick: &mut impl FnMut(&BaseUuid) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut prefix.to_owned(), &mut out, pick);
        out
    }

    /// True when all of `prefix` was picked.
    fn visit(
        &self,
        prefix: &mut String,
        out: &mut Vec<String>,
        pick: &mut impl FnMut(&BaseUuid) -> bool,
    ) -> bool {
        if self.is_uniform(prefix) {
            let picked = representative(prefix, "").is_some_and(|base| pick(&base));
            if picked {
                out.push(prefix.clone());
            }
            return picked;
        }
        // Below every slot boundary, with one pin `p` under it: two regions, the bases
        // under `p` and the rest, each resolving one way in every router. When both
        // are picked or neither is, no cell needs a split: one step instead of a walk
        // down `p`'s digits (the common case: a pin that moves nothing).
        if let Some(p) = self.lone_pin(prefix) {
            let other = if p.as_bytes()[prefix.len()] == b'0' {
                "1"
            } else {
                "0"
            };
            let rest = representative(prefix, other).is_some_and(|base| pick(&base));
            let under = representative(p, "").is_some_and(|base| pick(&base));
            if rest == under {
                if rest {
                    out.push(prefix.clone());
                }
                return rest;
            }
        }
        let start = out.len();
        let mut all = true;
        for c in "0123456789abcdef".chars() {
            prefix.push(c);
            all &= self.visit(prefix, out, pick);
            prefix.pop();
        }
        if all {
            out.truncate(start);
            out.push(prefix.clone());
        }
        all
    }

    /// The one pin under `prefix`, longer than it, when `prefix` lies below every
    /// router's slot digits (so nothing but that pin splits it).
    fn lone_pin(&self, prefix: &str) -> Option<&'a str> {
        let k = prefix.len();
        if self
            .routers
            .iter()
            .any(|r| r.compiled().slot_digits as usize > k && !r.compiled().slot_table.is_empty())
        {
            return None;
        }
        let first = self.pins.partition_point(|p| *p < prefix);
        let mut under = self.pins[first..]
            .iter()
            .take_while(|p| p.starts_with(prefix));
        match (under.next(), under.next()) {
            (Some(p), None) if p.len() > k => Some(p),
            _ => None,
        }
    }

    /// True when every base under `prefix` resolves the same way in every router.
    fn is_uniform(&self, prefix: &str) -> bool {
        let k = prefix.len();
        let first = self.pins.partition_point(|p| *p < prefix);
        let deeper_pin = self.pins[first..]
            .iter()
            .take_while(|p| p.starts_with(prefix))
            .any(|p| p.len() > k);
        !deeper_pin && self.routers.iter().all(|r| slots_uniform(r, prefix))
    }
}

/// The base `prefix` + `then` + zeros.
fn representative(prefix: &str, then: &str) -> Option<BaseUuid> {
    let mut rep = String::with_capacity(32);
    rep.push_str(prefix);
    rep.push_str(then);
    rep.extend(std::iter::repeat_n('0', 32usize.saturating_sub(rep.len())));
    BaseUuid::parse(&rep)
}

fn slots_uniform(r: &Router, prefix: &str) -> bool {
    let m = r.compiled();
    let (k, d) = (prefix.len() as u32, m.slot_digits);
    if m.slot_table.is_empty() || d <= k {
        return true;
    }
    let v = usize::from_str_radix(prefix, 16).unwrap_or(0);
    let shift = 4 * (d - k);
    let cells = m
        .slot_table
        .get(v << shift..(v + 1) << shift)
        .unwrap_or_default();
    cells.windows(2).all(|w| w[0] == w[1])
}

/// The fence for a sorted list of disjoint moved prefixes: up to 4 digits as slot ranges
/// (adjacent prefixes of one length merged), longer ones as pins.
fn fence_of(moved: &[String]) -> Fence {
    let mut fence = Fence::default();
    let mut run: Option<(usize, usize, usize)> = None; // (digits, lo, hi)
    let flush = |run: &mut Option<(usize, usize, usize)>, fence: &mut Fence| {
        if let Some((d, lo, hi)) = run.take() {
            let r = SlotRange {
                digits: d as u32,
                lo: lo as u32,
                hi: hi as u32,
            };
            fence.slots.push(r.to_string());
        }
    };
    for p in moved {
        if p.len() > 4 || p.is_empty() {
            flush(&mut run, &mut fence);
            if p.is_empty() {
                fence.slots.push("0-f".into());
            } else {
                fence.pins.push(p.clone());
            }
            continue;
        }
        let v = usize::from_str_radix(p, 16).unwrap_or(0);
        match run {
            Some((d, _, ref mut hi)) if d == p.len() && *hi + 1 == v => *hi = v,
            _ => {
                flush(&mut run, &mut fence);
                run = Some((p.len(), v, v));
            }
        }
    }
    flush(&mut run, &mut fence);
    fence
}

fn slot_moves(ro: &Router, rn: &Router) -> Vec<SlotMove> {
    let (mo, mn) = (ro.compiled(), rn.compiled());
    let d = mo.slot_digits.max(mn.slot_digits).max(1);
    fn owner(r: &Router, d: u32, i: usize) -> &str {
        let m = r.compiled();
        let s = if m.slot_table.is_empty() {
            m.default
        } else {
            m.slot_table
                .get(i >> (4 * (d - m.slot_digits)))
                .copied()
                .unwrap_or(m.default)
        };
        m.servers
            .get(usize::from(s))
            .map(String::as_str)
            .unwrap_or_default()
    }
    let mut out: Vec<SlotMove> = Vec::new();
    let mut start = 0;
    let n = 1usize << (4 * d);
    let mut prev: Option<(&str, &str)> = None;
    for i in 0..=n {
        let cur = (i < n)
            .then(|| (owner(ro, d, i), owner(rn, d, i)))
            .filter(|(a, b)| a != b);
        if cur != prev {
            if let Some((from, to)) = prev {
                let range = SlotRange::covering(start, i, d).to_string();
                out.push(SlotMove {
                    range,
                    from: from.to_owned(),
                    to: to.to_owned(),
                });
            }
            start = i;
            prev = cur;
        }
    }
    out
}

fn pin_changes(ro: &Router, rn: &Router) -> Vec<PinChange> {
    let name = |r: &Router, i: u16| r.servers().get(usize::from(i)).cloned();
    let find = |r: &Router, p: &str| {
        let pins = &r.compiled().pins;
        pins.binary_search_by(|(k, _)| k.as_str().cmp(p))
            .ok()
            .and_then(|i| pins.get(i))
            .and_then(|(_, s)| name(r, *s))
    };
    let all: BTreeSet<&str> = ro
        .compiled()
        .pins
        .iter()
        .chain(&rn.compiled().pins)
        .map(|(p, _)| p.as_str())
        .collect();
    all.into_iter()
        .filter_map(|p| {
            let (before, after) = (find(ro, p), find(rn, p));
            (before != after).then(|| PinChange {
                pin: p.to_owned(),
                before,
                after,
            })
        })
        .collect()
}
