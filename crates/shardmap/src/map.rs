//! The shard map document an operator writes, and its validation.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::hex::{SlotRange, canonical_pin};
use crate::problem::Problems;

/// Most pins a map may hold (each is a table entry in every Envoy worker).
pub const MAX_PINS: usize = 10_000;
/// Most path rules a map may hold (they are tried in order on uuid-less requests).
pub const MAX_PATH_RULES: usize = 256;
/// Most distinct servers a map may name.
pub const MAX_SERVERS: usize = 1_024;
/// Longest server (Envoy cluster) name.
pub const MAX_SERVER_NAME_LEN: usize = 63;
/// Longest path-rule regex source, in bytes.
pub const MAX_REGEX_LEN: usize = 1_024;
/// Largest compiled path-rule regex, in bytes (regex-lite's size limit).
pub const MAX_REGEX_SIZE: usize = 64 * 1024;

/// A shard map: where each base lives.
///
/// ```json
/// { "default": "dtable-server",
///   "slots": { "0-9": "dtable-server-2", "a-f": "dtable-server" },
///   "pins":  { "ff84e1a1-66e2": "dtable-server-2" },
///   "paths": [ { "prefix": "/api/v1/admin/", "server": "dtable-server" } ] }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardMap {
    /// The server of requests that carry no base and match no path rule; also of every
    /// base when `slots` is empty.
    #[serde(default)]
    pub default: String,
    /// Hex-prefix ranges of the base_uuid → server. Empty, or tiling the space exactly once.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::unique::unique_string_map"
    )]
    pub slots: BTreeMap<String, String>,
    /// base_uuid prefixes → server; the longest matching pin wins over the slots.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::unique::unique_string_map"
    )]
    pub pins: BTreeMap<String, String>,
    /// Rules for requests that carry no base, tried in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathRule>,
}

/// A rule for uuid-less requests: a path prefix or a regex, and the server it sends to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRule {
    /// Matches paths that start with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Matches paths this regex (regex-lite syntax) finds a match in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// The server to send matching requests to.
    #[serde(default)]
    pub server: String,
}

impl ShardMap {
    /// Parses and validates a map from JSON: the map, or every problem found.
    pub fn from_json(json: &str) -> Result<ShardMap, Problems> {
        let map: ShardMap = serde_json::from_str(json).map_err(|e| {
            let mut p = Problems::default();
            p.push("", format!("not a shard map: {e}"));
            p
        })?;
        map.validate()?;
        Ok(map)
    }

    /// Checks the whole map: `Ok` or every problem, each with where it is.
    pub fn validate(&self) -> Result<(), Problems> {
        compile(self).map(|_| ())
    }

    /// Every server the map names, sorted.
    pub fn servers(&self) -> Vec<&str> {
        let mut all: Vec<&str> = std::iter::once(self.default.as_str())
            .chain(self.slots.values().map(String::as_str))
            .chain(self.pins.values().map(String::as_str))
            .chain(self.paths.iter().map(|r| r.server.as_str()))
            .filter(|s| !s.is_empty())
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The map as pretty JSON.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Whether `name` can be a server: an Envoy cluster name that is also a safe header value.
pub fn check_server_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the server name is empty".into());
    }
    if name.len() > MAX_SERVER_NAME_LEN {
        return Err(format!(
            "server name `{name}` is longer than {MAX_SERVER_NAME_LEN} characters"
        ));
    }
    let ok_first = name
        .as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric);
    let ok_rest = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok_first || !ok_rest {
        return Err(format!(
            "server name `{name}` is not a valid Envoy cluster name here: use letters, digits, `-`, `_`, `.`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// A path rule's matcher, compiled.
#[derive(Debug, Clone)]
pub(crate) enum PathMatcher {
    Prefix(String),
    Regex(regex_lite::Regex),
}

impl PathMatcher {
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Prefix(p) => path.starts_with(p.as_str()),
            PathMatcher::Regex(r) => r.is_match(path),
        }
    }
}

/// A validated map in the form the router looks things up in.
#[derive(Debug, Clone)]
pub(crate) struct CompiledMap {
    /// Server names; the indices below point here.
    pub servers: Vec<String>,
    pub default: u16,
    /// Digits of the slot table: 0 when the map has no slots.
    pub slot_digits: u32,
    /// `16^slot_digits` entries: the server of each prefix.
    pub slot_table: Vec<u16>,
    /// Canonical pin prefixes, sorted, with their server.
    pub pins: Vec<(String, u16)>,
    pub paths: Vec<(PathMatcher, u16)>,
}

/// Validates `map` and compiles it, reporting every problem at once.
pub(crate) fn compile(map: &ShardMap) -> Result<CompiledMap, Problems> {
    let mut problems = Problems::default();
    let mut servers: Vec<String> = Vec::new();
    let mut index: HashMap<String, u16> = HashMap::new();
    let mut server = |at: String, name: &str, problems: &mut Problems| -> u16 {
        if let Err(e) = check_server_name(name) {
            problems.push(at, e);
        }
        if let Some(&i) = index.get(name) {
            return i;
        }
        let i = u16::try_from(servers.len()).unwrap_or(u16::MAX);
        servers.push(name.to_owned());
        index.insert(name.to_owned(), i);
        i
    };

    let default = if map.default.is_empty() {
        problems.push("default", "missing: every map needs a default server");
        0
    } else {
        server("default".into(), &map.default, &mut problems)
    };

    // Slots: parse every key, then check that they tile the space exactly once.
    let mut ranges: Vec<(SlotRange, &str, u16)> = Vec::new();
    for (key, name) in &map.slots {
        let at = format!("slots.\"{key}\"");
        let s = server(at.clone(), name, &mut problems);
        match SlotRange::parse(key) {
            Ok(r) => ranges.push((r, key.as_str(), s)),
            Err(e) => problems.push(at, e),
        }
    }
    let slot_digits = ranges.iter().map(|(r, _, _)| r.digits).max().unwrap_or(0);
    let mut slot_table = Vec::new();
    if !map.slots.is_empty() {
        check_tiling(&ranges, slot_digits, &mut problems);
        slot_table = vec![default; 1 << (4 * slot_digits)];
        for (r, _, s) in &ranges {
            let (a, b) = r.span(slot_digits);
            if let Some(cells) = slot_table.get_mut(a..b) {
                cells.fill(*s);
            }
        }
    }

    // Pins.
    if map.pins.len() > MAX_PINS {
        problems.push(
            "pins",
            format!("{} pins, more than the limit of {MAX_PINS}", map.pins.len()),
        );
    }
    let mut pins: Vec<(String, u16)> = Vec::with_capacity(map.pins.len());
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (key, name) in &map.pins {
        let at = format!("pins.\"{key}\"");
        let s = server(at.clone(), name, &mut problems);
        match canonical_pin(key) {
            Ok(c) => {
                if let Some(first) = seen.insert(c.clone(), key) {
                    problems.push(at, format!("the same pin as `{first}`"));
                } else {
                    pins.push((c, s));
                }
            }
            Err(e) => problems.push(at, e),
        }
    }
    pins.sort_unstable();

    // Path rules.
    if map.paths.len() > MAX_PATH_RULES {
        problems.push(
            "paths",
            format!(
                "{} path rules, more than the limit of {MAX_PATH_RULES}",
                map.paths.len()
            ),
        );
    }
    let mut paths = Vec::with_capacity(map.paths.len());
    for (i, rule) in map.paths.iter().enumerate() {
        let at = format!("paths[{i}]");
        let s = server(format!("{at}.server"), &rule.server, &mut problems);
        match (&rule.prefix, &rule.regex) {
            (Some(p), None) if p.starts_with('/') => {
                paths.push((PathMatcher::Prefix(p.clone()), s))
            }
            (Some(p), None) => problems.push(
                format!("{at}.prefix"),
                format!("`{p}` does not start with `/`"),
            ),
            (None, Some(r)) if r.len() > MAX_REGEX_LEN => problems.push(
                format!("{at}.regex"),
                format!(
                    "the regex is {} bytes, more than the limit of {MAX_REGEX_LEN}",
                    r.len()
                ),
            ),
            (None, Some(r)) => match regex_lite::RegexBuilder::new(r)
                .size_limit(MAX_REGEX_SIZE)
                .build()
            {
                Ok(re) => paths.push((PathMatcher::Regex(re), s)),
                Err(e) => problems.push(format!("{at}.regex"), format!("does not compile: {e}")),
            },
            (Some(_), Some(_)) => {
                problems.push(at, "a path rule has either `prefix` or `regex`, not both")
            }
            (None, None) => problems.push(at, "a path rule needs `prefix` or `regex`"),
        }
    }

    if servers.len() > MAX_SERVERS {
        problems.push(
            "",
            format!(
                "{} servers, more than the limit of {MAX_SERVERS}",
                servers.len()
            ),
        );
    }
    problems.into_result(CompiledMap {
        servers,
        default,
        slot_digits,
        slot_table,
        pins,
        paths,
    })
}

/// Reports every gap and every overlap among the slot ranges, at `digits` granularity.
fn check_tiling(ranges: &[(SlotRange, &str, u16)], digits: u32, problems: &mut Problems) {
    let mut spans: Vec<(usize, usize, &str)> = ranges
        .iter()
        .map(|(r, k, _)| {
            let (a, b) = r.span(digits);
            (a, b, *k)
        })
        .collect();
    spans.sort_unstable();
    let space = 1usize << (4 * digits);
    let mut covered = 0usize; // everything below is covered
    let mut widest: Option<(usize, &str)> = None; // the span reaching furthest so far
    for &(a, b, key) in &spans {
        if a > covered {
            problems.push(
                "slots",
                format!(
                    "gap: no slot covers {}",
                    SlotRange::covering(covered, a, digits)
                ),
            );
        }
        if let Some((end, other)) = widest
            && a < end
        {
            let overlap = SlotRange::covering(a, b.min(end), digits);
            problems.push(
                format!("slots.\"{key}\""),
                format!("overlaps slot `{other}` on {overlap}"),
            );
        }
        if widest.is_none_or(|(end, _)| b > end) {
            widest = Some((b, key));
        }
        covered = covered.max(b);
    }
    if covered < space {
        problems.push(
            "slots",
            format!(
                "gap: no slot covers {}",
                SlotRange::covering(covered, space, digits)
            ),
        );
    }
}
