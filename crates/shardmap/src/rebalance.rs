//! `rebalance`: add or remove a server and even out the slot count per server,
//! moving the fewest slots.

use std::collections::BTreeMap;
use std::fmt;

use crate::hex::{MAX_SLOT_DIGITS, SlotRange};
use crate::map::{ShardMap, check_server_name};
use crate::problem::Problems;
use crate::router::Router;

/// The server a rebalance adds or removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(String),
    Remove(String),
}

/// A rebalanced map and how much it moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebalance {
    pub map: ShardMap,
    /// Slot digits of the new map.
    pub digits: u32,
    /// Slots (of `digits` digits) whose owner changed.
    pub moved_slots: usize,
}

/// Why a rebalance cannot be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceError {
    /// The input map is invalid.
    Invalid(Problems),
    /// The request itself cannot be carried out.
    Refused(String),
}

impl fmt::Display for RebalanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RebalanceError::Invalid(p) => write!(f, "the map is invalid:\n{p}"),
            RebalanceError::Refused(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for RebalanceError {}

/// Adds or removes a server and evens out the slot count per server at `digits` digits
/// (default: the map's own slot digits, or the fewest that give every server a slot).
/// Only the slots of servers above their share move; pins, paths and default stay.
pub fn rebalance(
    map: &ShardMap,
    change: &Change,
    digits: Option<u32>,
) -> Result<Rebalance, RebalanceError> {
    let router = Router::new(map).map_err(RebalanceError::Invalid)?;
    let compiled = router.compiled();
    let refuse = |s: String| Err(RebalanceError::Refused(s));

    // The servers that hold slots afterwards.
    let mut servers: Vec<String> = if compiled.slot_table.is_empty() {
        vec![map.default.clone()]
    } else {
        let mut v: Vec<String> = map.slots.values().cloned().collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    match change {
        Change::Add(name) => {
            if let Err(e) = check_server_name(name) {
                return refuse(e);
            }
            if servers.contains(name) {
                return refuse(format!("`{name}` already holds slots"));
            }
            servers.push(name.clone());
        }
        Change::Remove(name) => {
            let mut uses = Vec::new();
            if map.default == *name {
                uses.push("it is the default server".to_string());
            }
            uses.extend(
                map.pins
                    .iter()
                    .filter(|(_, s)| *s == name)
                    .map(|(p, _)| format!("pin `{p}` points at it")),
            );
            uses.extend(
                map.paths
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.server == *name)
                    .map(|(i, _)| format!("path rule {i} points at it")),
            );
            if !uses.is_empty() {
                return refuse(format!("cannot remove `{name}`: {}", uses.join("; ")));
            }
            if !servers.contains(name) {
                return refuse(format!("`{name}` holds no slots"));
            }
            servers.retain(|s| s != name);
            if servers.is_empty() {
                return refuse(format!(
                    "cannot remove `{name}`: no other server would hold slots"
                ));
            }
        }
    }

    let current = compiled.slot_digits;
    let needed = (1..=MAX_SLOT_DIGITS)
        .find(|d| (1usize << (4 * d)) >= servers.len())
        .unwrap_or(MAX_SLOT_DIGITS);
    let d = match digits {
        Some(d) if !(1..=MAX_SLOT_DIGITS).contains(&d) => {
            return refuse(format!("--digits must be 1 to {MAX_SLOT_DIGITS}"));
        }
        Some(d) if d < current => {
            return refuse(format!(
                "the map already uses {current}-digit slots; rebalance at {current} digits or more"
            ));
        }
        Some(d) if (1usize << (4 * d)) < servers.len() => {
            return refuse(format!(
                "{} servers do not fit in {} slots of {d} digits",
                servers.len(),
                1usize << (4 * d)
            ));
        }
        Some(d) => d,
        None => current.max(needed),
    };

    // Every slot's owner at `d` digits.
    let n = 1usize << (4 * d);
    let name_of = |i: u16| {
        compiled
            .servers
            .get(usize::from(i))
            .cloned()
            .unwrap_or_default()
    };
    let mut owners: Vec<String> = (0..n)
        .map(|i| match compiled.slot_table.is_empty() {
            true => map.default.clone(),
            false => name_of(
                compiled
                    .slot_table
                    .get(i >> (4 * (d - current)))
                    .copied()
                    .unwrap_or(compiled.default),
            ),
        })
        .collect();

    // Targets: an even share; the remainder goes to the servers holding most already.
    // A removed server's target is zero.
    let mut count: BTreeMap<&str, usize> = servers.iter().map(|s| (s.as_str(), 0)).collect();
    for o in &owners {
        *count.entry(o.as_str()).or_insert(0) += 1;
    }
    let mut by_count: Vec<(&str, usize)> = count
        .iter()
        .filter(|(s, _)| servers.iter().any(|k| k == *s))
        .map(|(s, c)| (*s, *c))
        .collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let (share, extra) = (n / servers.len(), n % servers.len());
    let target: BTreeMap<&str, usize> = by_count
        .iter()
        .enumerate()
        .map(|(rank, (s, _))| (*s, share + usize::from(rank < extra)))
        .collect();
    let excess = |s: &str| {
        count
            .get(s)
            .copied()
            .unwrap_or(0)
            .saturating_sub(target.get(s).copied().unwrap_or(0))
    };

    // Each server above its target gives up its excess, highest slots first.
    let mut given: BTreeMap<&str, usize> = BTreeMap::new();
    let mut freed: Vec<usize> = Vec::new();
    for (i, o) in owners.iter().enumerate().rev() {
        let g = given.entry(o.as_str()).or_insert(0);
        if *g < excess(o) {
            *g += 1;
            freed.push(i);
        }
    }
    freed.sort_unstable();
    let moved_slots = freed.len();
    let need: Vec<(String, usize)> = target
        .iter()
        .filter_map(|(s, t)| {
            t.checked_sub(count.get(s).copied().unwrap_or(0))
                .filter(|k| *k > 0)
                .map(|k| (s.to_string(), k))
        })
        .collect();
    let mut freed = freed.into_iter();
    for (server, k) in need {
        for i in freed.by_ref().take(k) {
            owners[i] = server.clone();
        }
    }

    let mut out = map.clone();
    out.slots = coalesce(&owners, d);
    let rebalanced = Rebalance {
        map: out,
        digits: d,
        moved_slots,
    };
    rebalanced.map.validate().map_err(RebalanceError::Invalid)?;
    Ok(rebalanced)
}

/// Slot ranges for runs of equal owners.
fn coalesce(owners: &[String], d: u32) -> BTreeMap<String, String> {
    let mut slots = BTreeMap::new();
    let mut start = 0;
    for i in 1..=owners.len() {
        if i == owners.len() || owners[i] != owners[start] {
            slots.insert(
                SlotRange::covering(start, i, d).to_string(),
                owners[start].clone(),
            );
            start = i;
        }
    }
    slots
}
