//! Property tests: tiling, the exactness of `diff`'s fence, `rebalance`'s economy, and
//! the gate: a guard passes exactly its own unfenced bases, an edge routes as `decide`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shardmap::{
    BaseUuid, Change, Fence, Reason, RefusalKind, Router, RouterConfig, ShardMap, SlotRange,
    Verdict, diff, rebalance,
};

const SERVERS: [&str; 4] = ["s0", "s1", "s2", "s3"];

/// A valid map: `d`-digit slots cut at random points, random owners, nested pins.
fn valid_map() -> impl Strategy<Value = ShardMap> {
    (
        1u32..=2,
        prop::collection::vec((any::<u16>(), 0usize..4), 0..6),
        prop::collection::vec(pin(), 0..6),
    )
        .prop_map(|(d, cuts, pins)| {
            let n = 1usize << (4 * d);
            let mut points: Vec<usize> = cuts
                .iter()
                .map(|(c, _)| 1 + usize::from(*c) % (n - 1))
                .collect();
            points.push(0);
            points.push(n);
            points.sort_unstable();
            points.dedup();
            let mut slots = BTreeMap::new();
            for (i, w) in points.windows(2).enumerate() {
                let owner = cuts.get(i).map_or(0, |c| c.1);
                slots.insert(
                    SlotRange::covering(w[0], w[1], d).to_string(),
                    SERVERS[owner].to_string(),
                );
            }
            ShardMap {
                default: "s0".into(),
                slots,
                pins: pins.into_iter().collect(),
                paths: vec![],
            }
        })
}

/// Pins drawn from a few stems, so they nest and collide with slot boundaries.
fn pin() -> impl Strategy<Value = (String, String)> {
    (
        prop::sample::select(vec![
            "0",
            "0a",
            "0ab",
            "7f",
            "ff84e1a1",
            "ff84e1a166e2",
            "a",
            "8",
        ]),
        "[0-9a-f]{0,3}",
        0usize..4,
    )
        .prop_map(|(stem, tail, s)| (format!("{stem}{tail}"), SERVERS[s].to_string()))
}

/// Uuids near the interesting places: pin stems and slot boundaries.
fn uuid() -> impl Strategy<Value = BaseUuid> {
    (
        prop::sample::select(vec![
            "",
            "0",
            "0a",
            "0ab",
            "7f",
            "80",
            "ff84e1a1",
            "ff84e1a166e2",
            "a",
        ]),
        "[0-9a-f]{32}",
    )
        .prop_map(|(stem, rest)| BaseUuid::parse(&format!("{stem}{rest}")[..32]).unwrap())
}

/// A fence of a few slot ranges and pins near the interesting places.
fn fence() -> impl Strategy<Value = Fence> {
    let slots = prop::sample::subsequence(vec!["0", "0-3", "7f", "80-9f", "a", "ff84"], 0..3);
    let pins = prop::collection::vec(pin().prop_map(|(p, _)| p), 0..3);
    (slots, pins).prop_map(|(slots, pins)| Fence {
        slots: slots.into_iter().map(str::to_owned).collect(),
        pins,
    })
}

/// The request targets of `u` a client may send: dashed, 32-hex, in the query.
fn targets(u: &BaseUuid) -> [String; 3] {
    [
        format!("/api/v1/dtables/{}/rows/", u.dashed()),
        format!(
            "/dtable-server/api/v1/dtables/{}/",
            u.as_str().to_uppercase()
        ),
        format!("/socket.io/?EIO=4&dtable_uuid={u}"),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// For any uuid, the guard of server S passes it iff it is not fenced and S owns
    /// it; else it is refused 503 (fenced) or 421 naming the owner.
    #[test]
    fn a_guard_passes_exactly_its_servers_unfenced_bases(
        map in valid_map(), fence in fence(), guard in prop::sample::select(vec!["s0", "s1", "s2", "s3", "s9"]),
        version in 0u64..3, uuids in prop::collection::vec(uuid(), 32),
    ) {
        let config = RouterConfig { fence, guard: Some(guard.into()), ..RouterConfig::new(version, map.clone()) };
        let gate = config.compile_gate().unwrap();
        let router = Router::with_fence(&map, &config.fence).unwrap();
        for u in &uuids {
            let fenced = router.is_fenced(u);
            let owner = router.owner_of(u);
            for t in targets(u) {
                match gate.verdict(&t) {
                    Verdict::Pass { base } => {
                        prop_assert!(!fenced && owner == guard, "{} passed: fenced={} owner={}", t, fenced, owner);
                        prop_assert_eq!(base, Some(*u));
                    }
                    Verdict::Refuse(r) => {
                        prop_assert!(fenced || owner != guard, "{} refused", t);
                        prop_assert_eq!(r.base, Some(*u));
                        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                        prop_assert_eq!(body["base_uuid"].as_str().map(str::to_owned), Some(u.dashed()));
                        let want = match (fenced, version) {
                            (true, 0) => RefusalKind::AwaitingMap,
                            (true, _) => RefusalKind::BaseMoving,
                            (false, _) => RefusalKind::Misdirected,
                        };
                        prop_assert_eq!(r.kind, want);
                        if !fenced {
                            prop_assert_eq!(r.status, 421);
                            prop_assert_eq!(body["owner"].as_str(), Some(owner));
                            prop_assert_eq!(body["server"].as_str(), Some(guard));
                        } else {
                            prop_assert_eq!(r.status, 503);
                            prop_assert_eq!(r.retry_after, Some(config.retry_after));
                        }
                    }
                    Verdict::Route(d) => prop_assert!(false, "a guard routed {} to {}", t, d.server),
                }
            }
        }
    }

    /// An edge's verdict is `decide`'s decision, and a fenced base is refused 503.
    #[test]
    fn an_edge_routes_as_decide(map in valid_map(), fence in fence(), version in 0u64..3, uuids in prop::collection::vec(uuid(), 32)) {
        let config = RouterConfig { fence, ..RouterConfig::new(version, map) };
        let gate = config.compile_gate().unwrap();
        for u in &uuids {
            let targets = targets(u);
            for t in targets.iter().map(String::as_str).chain(["/ping/", ""]) {
                let d = gate.router().decide(t);
                match gate.verdict(t) {
                    Verdict::Route(got) => {
                        prop_assert_ne!(d.reason, Reason::Fenced);
                        prop_assert_eq!(got, d);
                    }
                    Verdict::Refuse(r) => {
                        prop_assert_eq!(d.reason, Reason::Fenced);
                        prop_assert_eq!(r.base, d.base);
                        prop_assert_eq!(r.status, 503);
                        let want = if version == 0 { RefusalKind::AwaitingMap } else { RefusalKind::BaseMoving };
                        prop_assert_eq!(r.kind, want);
                    }
                    Verdict::Pass { .. } => prop_assert!(false, "an edge passed {}", t),
                }
            }
        }
    }

    /// Validation accepts a set of slot ranges exactly when they tile the space once.
    #[test]
    fn slots_are_accepted_iff_they_tile(ranges in prop::collection::vec((1u32..=2, any::<u8>(), any::<u8>()), 1..6)) {
        let mut slots = BTreeMap::new();
        let mut spans = Vec::new();
        for (d, a, b) in ranges {
            let top = (1u32 << (4 * d)) - 1;
            let (lo, hi) = (u32::from(a.min(b)) & top, u32::from(a.max(b)) & top);
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            let r = SlotRange { digits: d, lo, hi };
            if slots.insert(r.to_string(), "s0".to_string()).is_none() {
                spans.push(r.span(2));
            }
        }
        let mut cover = [0u32; 256];
        for (a, b) in spans {
            for c in &mut cover[a..b] { *c += 1; }
        }
        let tiles = cover.iter().all(|c| *c == 1);
        let map = ShardMap { default: "s0".into(), slots, ..ShardMap::default() };
        prop_assert_eq!(map.validate().is_ok(), tiles, "{:?}", map.validate());
    }

    /// For any uuid: fenced by the plan ⇔ its owner differs between the two maps.
    #[test]
    fn the_fence_is_exactly_the_moved_bases(old in valid_map(), new in valid_map(), uuids in prop::collection::vec(uuid(), 64)) {
        let plan = diff(&old, &new).unwrap();
        let (ro, rn) = (Router::new(&old).unwrap(), Router::new(&new).unwrap());
        let fenced = Router::with_fence(&old, &plan.fence).unwrap();
        for u in &uuids {
            let moved = ro.owner_of(u) != rn.owner_of(u);
            prop_assert_eq!(fenced.is_fenced(u), moved, "{} old={} new={} fence={:?}", u, ro.owner_of(u), rn.owner_of(u), plan.fence);
            if moved {
                prop_assert!(plan.losing.iter().any(|s| s == ro.owner_of(u)));
                prop_assert!(plan.gaining.iter().any(|s| s == rn.owner_of(u)));
            }
        }
        prop_assert_eq!(plan.moves_bases(), !plan.moves.is_empty());
    }

    /// Every base inside a fence is owned by one of `owners_within`, and each of those
    /// owns a base inside it.
    #[test]
    fn owners_within_is_exact(old in valid_map(), new in valid_map(), other in valid_map(), uuids in prop::collection::vec(uuid(), 64)) {
        let fence = diff(&old, &new).unwrap().fence;
        let owners = shardmap::owners_within(&other, &fence).unwrap();
        let fenced = Router::with_fence(&other, &fence).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for u in &uuids {
            if fenced.is_fenced(u) {
                prop_assert!(owners.contains(fenced.owner_of(u)), "{} owned by {}, not in {:?}", u, fenced.owner_of(u), owners);
                seen.insert(fenced.owner_of(u).to_owned());
            }
        }
        prop_assert!(seen.is_subset(&owners));
        prop_assert_eq!(owners.is_empty(), fence.is_empty());
    }

    /// A slot is said to move exactly when its slot owner differs.
    #[test]
    fn slot_moves_are_exact(old in valid_map(), new in valid_map()) {
        let plan = diff(&old, &new).unwrap();
        let owner = |m: &ShardMap, i: usize| -> String {
            m.slots.iter().find(|(k, _)| { let (a, b) = SlotRange::parse(k).unwrap().span(2); (a..b).contains(&i) })
                .map(|(_, s)| s.clone()).unwrap()
        };
        for i in 0..256 {
            let said = plan.slots.iter().find(|m| { let (a, b) = SlotRange::parse(&m.range).unwrap().span(2); (a..b).contains(&i) });
            let (o, n) = (owner(&old, i), owner(&new, i));
            match said {
                Some(m) => prop_assert!(m.from == o && m.to == n && o != n),
                None => prop_assert_eq!(o, n),
            }
        }
    }

    /// Rebalance evens slot counts out (within one) and moves only the excess of
    /// servers above their share: no slot it did not need to.
    #[test]
    fn rebalance_moves_only_what_it_must(map in valid_map(), add in any::<bool>(), digits in 1u32..=2) {
        let change = if add { Change::Add("s9".into()) } else {
            match map.slots.values().find(|s| *s != "s0") { Some(s) => Change::Remove(s.clone()), None => Change::Add("s9".into()) }
        };
        let map = ShardMap { pins: BTreeMap::new(), ..map };
        let Ok(r) = rebalance(&map, &change, Some(digits.max(map_digits(&map)))) else { return Ok(()) };
        let d = r.digits;
        let n = 1usize << (4 * d);
        let owners = |m: &ShardMap| -> Vec<String> {
            let rt = Router::new(m).unwrap();
            (0..n).map(|i| {
                let hex = format!("{:0w$x}{}", i, "0".repeat(32 - d as usize), w = d as usize);
                rt.owner_of(&BaseUuid::parse(&hex).unwrap()).to_string()
            }).collect()
        };
        let (before, after) = (owners(&map), owners(&r.map));
        let mut cb: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ca: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &before { *cb.entry(o).or_default() += 1; }
        for o in &after { *ca.entry(o).or_default() += 1; }
        let (min, max) = (ca.values().min().copied().unwrap(), ca.values().max().copied().unwrap());
        prop_assert!(max - min <= 1, "{:?}", ca);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        prop_assert_eq!(moved, r.moved_slots);
        let excess: usize = cb.iter().map(|(s, c)| c.saturating_sub(ca.get(s).copied().unwrap_or(0))).sum();
        prop_assert_eq!(moved, excess);
        for (a, b) in before.iter().zip(&after) {
            if a != b {
                // Only a server that ends with fewer slots gives any away.
                prop_assert!(ca.get(a.as_str()).copied().unwrap_or(0) < cb[a.as_str()]);
            }
        }
        // No server that could have kept its slots lost one: a server's count only
        // drops to the largest share.
        let share_hi = n.div_ceil(ca.len());
        for (s, c) in &cb {
            if let Some(a) = ca.get(s) && a < c {
                prop_assert!(*a >= share_hi - 1 && *c > share_hi - 1);
            }
        }
        match &change {
            Change::Add(s) => prop_assert!(ca.contains_key(s.as_str())),
            Change::Remove(s) => prop_assert!(!ca.contains_key(s.as_str())),
        }
    }
}

fn map_digits(m: &ShardMap) -> u32 {
    m.slots
        .keys()
        .map(|k| SlotRange::parse(k).unwrap().digits)
        .max()
        .unwrap_or(1)
}
