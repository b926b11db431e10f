//! The compiled `Router`: built once from a valid map (and a fence), then asked where
//! each request goes.

use serde::{Deserialize, Serialize};

use crate::hex::{SlotRange, canonical_pin};
use crate::map::{CompiledMap, ShardMap, compile};
use crate::problem::Problems;
use crate::uuid::{BaseUuid, Unreadable, read_base};

/// Bases a rollout is moving: requests for them are answered `503` until the new map is
/// active, so no base is ever served by two servers.
///
/// A base is fenced when its first digits lie in one of `slots` (hex ranges, which need
/// not tile) or one of `pins` (uuid prefixes) is a prefix of it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub slots: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<String>,
}

impl Fence {
    /// True when the fence holds no base.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.pins.is_empty()
    }
}

/// Why a request goes where it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The base matched a pin.
    Pin,
    /// The base's slot.
    Slot,
    /// No base; a path rule matched.
    Path,
    /// No base and no path rule matched, or the map has no slots.
    Default,
    /// The base is fenced by a rollout: answer 503, send it nowhere.
    Fenced,
    /// The request's base cannot be read unambiguously ([`Unreadable`]): answer 400,
    /// send it nowhere. Only [`Router::decide`] gives it (its `server` is the default,
    /// to fill the field); [`Router::read`] gives the error itself.
    Unreadable,
}

impl Reason {
    /// The reason as a short lowercase word (`pin`, `slot`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pin => "pin",
            Reason::Slot => "slot",
            Reason::Path => "path",
            Reason::Default => "default",
            Reason::Fenced => "fenced",
            Reason::Unreadable => "unreadable",
        }
    }
}

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'r> {
    /// The server (Envoy cluster). For a fenced base: its owner under the active map.
    pub server: &'r str,
    /// The server's index in [`Router::servers`].
    pub server_index: usize,
    pub reason: Reason,
    /// The base the request is about, in canonical form.
    pub base: Option<BaseUuid>,
}

/// A shard map compiled for lookups: slot table, sorted pin table, path rules, fence.
#[derive(Debug, Clone)]
pub struct Router {
    map: CompiledMap,
    /// Distinct pin lengths, longest first: the longest matching pin wins.
    pin_lens: Vec<usize>,
    fence_digits: u32,
    /// `16^fence_digits` flags; empty when no slot is fenced.
    fence_slots: Vec<bool>,
    fence_pins: Vec<String>,
    fence_pin_lens: Vec<usize>,
}

impl Router {
    /// Compiles a valid map with no fence.
    pub fn new(map: &ShardMap) -> Result<Router, Problems> {
        Router::with_fence(map, &Fence::default())
    }

    /// Compiles a valid map and a fence; every problem of both is reported.
    pub fn with_fence(map: &ShardMap, fence: &Fence) -> Result<Router, Problems> {
        let compiled = compile(map);
        let mut problems = compiled.as_ref().err().cloned().unwrap_or_default();

        let mut ranges = Vec::with_capacity(fence.slots.len());
        for (i, s) in fence.slots.iter().enumerate() {
            match SlotRange::parse(s) {
                Ok(r) => ranges.push(r),
                Err(e) => problems.push(format!("fence.slots[{i}]"), e),
            }
        }
        let mut fence_pins = Vec::with_capacity(fence.pins.len());
        for (i, p) in fence.pins.iter().enumerate() {
            match canonical_pin(p) {
                Ok(c) => fence_pins.push(c),
                Err(e) => problems.push(format!("fence.pins[{i}]"), e),
            }
        }
        let map = match compiled {
            Ok(m) if problems.is_empty() => m,
            _ => return Err(problems),
        };

        let fence_digits = ranges.iter().map(|r| r.digits).max().unwrap_or(0);
        let mut fence_slots = Vec::new();
        if !ranges.is_empty() {
            fence_slots = vec![false; 1 << (4 * fence_digits)];
            for r in &ranges {
                let (a, b) = r.span(fence_digits);
                if let Some(cells) = fence_slots.get_mut(a..b) {
                    cells.fill(true);
                }
            }
        }
        fence_pins.sort_unstable();
        fence_pins.dedup();
        Ok(Router {
            pin_lens: lengths(map.pins.iter().map(|(p, _)| p.len())),
            fence_pin_lens: lengths(fence_pins.iter().map(String::len)),
            map,
            fence_digits,
            fence_slots,
            fence_pins,
        })
    }

    /// Where the request for `path_and_query` (the `:path` pseudo-header) goes; a
    /// target whose base cannot be read gets [`Reason::Unreadable`] (see [`Router::read`]).
    pub fn decide(&self, path_and_query: &str) -> Decision<'_> {
        self.read(path_and_query)
            .unwrap_or_else(|_| self.decision(self.map.default, Reason::Unreadable, None))
    }

    /// Where the request for `path_and_query` goes, its base read as the dtable-server
    /// reads it ([`read_base`]); an error when it cannot be read unambiguously.
    pub fn read(&self, path_and_query: &str) -> Result<Decision<'_>, Unreadable> {
        Ok(match read_base(path_and_query)? {
            Some(base) => self.decide_base(&base),
            None => {
                let path = path_and_query.split(['?', '#']).next().unwrap_or_default();
                for (matcher, server) in &self.map.paths {
                    if matcher.matches(path) {
                        return Ok(self.decision(*server, Reason::Path, None));
                    }
                }
                self.decision(self.map.default, Reason::Default, None)
            }
        })
    }

    /// Where requests for `base` go.
    pub fn decide_base(&self, base: &BaseUuid) -> Decision<'_> {
        let (server, reason) = self.owner(base);
        let reason = if self.is_fenced(base) {
            Reason::Fenced
        } else {
            reason
        };
        self.decision(server, reason, Some(*base))
    }

    fn decision(&self, server: u16, reason: Reason, base: Option<BaseUuid>) -> Decision<'_> {
        Decision {
            server: self.name(server),
            server_index: usize::from(server),
            reason,
            base,
        }
    }

    /// The server that owns `base` under this map (fence ignored).
    pub fn owner_of(&self, base: &BaseUuid) -> &str {
        self.name(self.owner(base).0)
    }

    /// True when `base` is fenced.
    pub fn is_fenced(&self, base: &BaseUuid) -> bool {
        if !self.fence_slots.is_empty()
            && self
                .fence_slots
                .get(base.prefix_value(self.fence_digits))
                .copied()
                .unwrap_or(false)
        {
            return true;
        }
        longest_prefix(&self.fence_pins, &self.fence_pin_lens, base, |p| p.as_str()).is_some()
    }

    /// Every server name the map uses.
    pub fn servers(&self) -> &[String] {
        &self.map.servers
    }

    /// The default server.
    pub fn default_server(&self) -> &str {
        self.name(self.map.default)
    }

    pub(crate) fn compiled(&self) -> &CompiledMap {
        &self.map
    }

    fn owner(&self, base: &BaseUuid) -> (u16, Reason) {
        if let Some((_, s)) =
            longest_prefix(&self.map.pins, &self.pin_lens, base, |(p, _)| p.as_str())
        {
            return (*s, Reason::Pin);
        }
        if self.map.slot_table.is_empty() {
            return (self.map.default, Reason::Default);
        }
        let s = self
            .map
            .slot_table
            .get(base.prefix_value(self.map.slot_digits))
            .copied();
        (s.unwrap_or(self.map.default), Reason::Slot)
    }

    fn name(&self, i: u16) -> &str {
        self.map
            .servers
            .get(usize::from(i))
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// The entry of `sorted` whose key is the longest prefix of `base`, trying `lens` in order.
fn longest_prefix<'t, T>(
    sorted: &'t [T],
    lens: &[usize],
    base: &BaseUuid,
    key: impl Fn(&T) -> &str,
) -> Option<&'t T> {
    let hex = base.as_bytes();
    lens.iter().find_map(|&len| {
        let want = hex.get(..len)?;
        sorted
            .binary_search_by(|e| key(e).as_bytes().cmp(want))
            .ok()
            .and_then(|i| sorted.get(i))
    })
}

fn lengths(lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = lens.collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.dedup();
    v
}
