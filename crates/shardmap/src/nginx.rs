//! Importing SeaTable's nginx `map $request_uri` into a shard map.
//!
//! The documented map is a list of case-insensitive regexes, first match wins:
//! `"~*ff84e1a1-66e2"` pins one base, `"~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})"` sends the
//! bases whose uuid starts with a digit somewhere. The first-character regexes become
//! slots, a literal uuid prefix becomes a pin, `default` stays; anything that cannot
//! be translated exactly becomes a path rule (or is dropped) with a warning.
//!
//! Server names (invariant: two upstream blocks with different `server` lines are
//! never one server unless `--server` says so, and then with a loud warning). A block
//! is named by `--server UPSTREAM=NAME`, else by the host of its first `server` line
//! (SeaTable's compose names, `dtable-server-2`), unless that host is shared with a
//! block listing other servers (`10.0.0.4:5000` and `10.0.0.4:5001`: two
//! dtable-servers) or the name is taken by another block: then by the block's own
//! name, unique in nginx, with a warning. Falling back rather than failing keeps the
//! common case working with no flag, and the names it picks are the ones the map
//! already uses; only when the block's name is taken too (by a `--server` name) is it
//! an error naming both blocks. Blocks listing the same servers are one server. Two
//! blocks given one name by `--server` are the operator's choice (say, one machine
//! known by a name and an address), kept, and warned about as MERGED: if they were
//! two dtable-servers, the bases nginx spread over them are on both (`seactl
//! audit-nginx` counts their addresses apart and reports those bases). A block with
//! several `server` lines is nginx balancing each base over several dtable-servers:
//! imported as one server, with a warning.

use std::collections::BTreeMap;

use crate::hex::{SlotRange, canonical_pin};
use crate::map::{PathRule, ShardMap, check_server_name};
use crate::problem::Problems;

/// The translated map and what could not be translated exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub map: ShardMap,
    pub warnings: Vec<String>,
}

/// Translates an nginx configuration. `servers` maps upstream names to server names;
/// unlisted upstreams are named after the host of their first `server` line, or their
/// block when that would merge two (see the module doc).
pub fn import(conf: &str, servers: &BTreeMap<String, String>) -> Result<Import, Problems> {
    let directives = directives(conf)?;
    let mut problems = Problems::default();
    let mut warnings = Vec::new();

    // Upstream name → server name.
    let named = match name_upstreams(&directives, servers) {
        Ok((named, more)) => {
            warnings.extend(more);
            named
        }
        Err(p) => return Err(p),
    };
    let upstreams: BTreeMap<String, String> =
        named.into_iter().map(|u| (u.name, u.server)).collect();

    let (map, maps) = first_request_uri_map(&directives)?;
    if maps > 1 {
        warnings.push(format!(
            "{} map blocks on $request_uri; only the first (line {}) was imported",
            maps, map.line
        ));
    }
    if map.args.first().is_some_and(|a| a == "$uri") {
        warnings.push(format!("line {}: the map reads $uri (no query string); seashard also finds `dtable_uuid` in the query", map.line));
    }

    let resolve =
        |value: &str, line: usize, problems: &mut Problems, warnings: &mut Vec<String>| -> String {
            let server = match upstreams.get(value) {
                Some(s) => s.clone(),
                None => {
                    let s = servers
                        .get(value)
                        .cloned()
                        .unwrap_or_else(|| value.to_owned());
                    if !servers.contains_key(value) {
                        warnings.push(format!(
                        "line {line}: `{value}` is not an upstream block; used as the server name"
                    ));
                    }
                    s
                }
            };
            if let Err(e) = check_server_name(&server) {
                problems.push(
                    format!("line {line}"),
                    format!("{e} (from `{value}`; name it with --server {value}=NAME)"),
                );
            }
            server
        };

    let mut default = None;
    let mut claimed: [Option<String>; 16] = Default::default();
    let mut pins: BTreeMap<String, String> = BTreeMap::new();
    let mut pin_order: Vec<String> = Vec::new();
    let mut paths = Vec::new();
    for entry in map.block.iter().flatten() {
        let line = entry.line;
        let Some((key, value)) = key_and_value(entry, &mut problems) else {
            continue;
        };
        if key == "default" {
            default = Some(resolve(value, line, &mut problems, &mut warnings));
            continue;
        }
        let server = resolve(value, line, &mut problems, &mut warnings);
        let (regex, case_insensitive) = match (key.strip_prefix("~*"), key.strip_prefix('~')) {
            (Some(r), _) => (r, true),
            (None, Some(r)) => (r, false),
            (None, None) => {
                warnings.push(format!(
                    "line {line}: `{key}` matches one exact request URI; kept as a path rule for uuid-less requests only"
                ));
                paths.push(PathRule {
                    prefix: None,
                    regex: Some(format!("^{}$", escape(key))),
                    server,
                });
                continue;
            }
        };
        if let Some(digits) = first_char_rule(regex, case_insensitive, &mut warnings, line) {
            for d in digits {
                if let Some(slot) = claimed.get_mut(usize::from(d)) {
                    slot.get_or_insert_with(|| server.clone());
                }
            }
            continue;
        }
        if let Some(pin) = literal_pin(regex) {
            let first = usize::from(crate::uuid::hex_value(pin.as_bytes()[0]));
            let shadow = pin_order.iter().find(|p| pin.starts_with(p.as_str()));
            if let Some(p) = shadow {
                warnings.push(format!("line {line}: pin `{regex}` is shadowed by the earlier pin `{p}` in nginx; dropped"));
            } else if claimed.get(first).is_some_and(Option::is_some) {
                warnings.push(format!("line {line}: pin `{regex}` comes after a rule that already sends these bases elsewhere in nginx; dropped"));
            } else {
                if !regex.contains('-') && pin.len() > 8 {
                    warnings.push(format!("line {line}: `{regex}` has no dash: nginx matched it only in the 32-hex form; seashard pins both forms"));
                }
                if !case_insensitive {
                    warnings.push(format!("line {line}: `~{regex}` was case-sensitive in nginx; seashard pins any case"));
                }
                pin_order.push(pin.clone());
                pins.insert(pin, server);
            }
            continue;
        }
        let source = if case_insensitive {
            format!("(?i){regex}")
        } else {
            regex.to_owned()
        };
        warnings.push(format!(
            "line {line}: `{key}` is not a first-character or uuid-prefix rule; kept as a path rule, which seashard applies to uuid-less requests only"
        ));
        paths.push(PathRule {
            prefix: None,
            regex: Some(source),
            server,
        });
    }

    // A `--server` that names nothing (a typo) leaves its block named by its host.
    for (upstream, name) in servers {
        let used = upstreams.contains_key(upstream)
            || map
                .block
                .iter()
                .flatten()
                .any(|e| e.args.first() == Some(upstream));
        if !used {
            warnings.push(format!(
                "--server {upstream}={name}: no upstream block or map value `{upstream}`; ignored"
            ));
        }
    }
    let Some(default) = default else {
        return Err(no_default(&map, problems));
    };
    let mut slots = BTreeMap::new();
    if claimed.iter().any(Option::is_some) {
        let owners: Vec<String> = claimed
            .iter()
            .map(|c| c.clone().unwrap_or_else(|| default.clone()))
            .collect();
        let mut start = 0;
        for i in 1..=16 {
            if i == 16 || owners[i] != owners[start] {
                slots.insert(
                    SlotRange::covering(start, i, 1).to_string(),
                    owners[start].clone(),
                );
                start = i;
            }
        }
    }
    let map = ShardMap {
        default,
        slots,
        pins,
        paths,
    };
    if let Err(more) = map.validate() {
        problems.0.extend(more.0);
    }
    problems.into_result(Import { map, warnings })
}

/// The hex digits a `([CLASS])([0-9a-f]{7}-[0-9a-f]{4})` rule sends, or `None` when the
/// regex is not of that shape.
fn first_char_rule(
    regex: &str,
    case_insensitive: bool,
    warnings: &mut Vec<String>,
    line: usize,
) -> Option<Vec<u8>> {
    let strip = |s: &str| s.replace(['(', ')'], "");
    let flat = strip(regex);
    let rest = flat.strip_prefix('[')?;
    let (class, tail) = rest.split_once(']')?;
    let hex_tail = [
        "[0-9a-f]{7}-[0-9a-f]{4}",
        "[0-9a-fA-F]{7}-[0-9a-fA-F]{4}",
        "[a-f0-9]{7}-[a-f0-9]{4}",
    ];
    if !hex_tail.contains(&tail) || class.starts_with('^') {
        return None;
    }
    let bytes = class.as_bytes();
    let mut set = [false; 256];
    let mut i = 0;
    while i < bytes.len() {
        let (a, b) = match (bytes.get(i), bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(&a), Some(b'-'), Some(&b)) => {
                i += 3;
                (a, b)
            }
            (Some(&a), _, _) => {
                i += 1;
                (a, a)
            }
            _ => break,
        };
        for c in a..=b {
            set[usize::from(c)] = true;
            if case_insensitive {
                set[usize::from(c.to_ascii_lowercase())] = true;
                set[usize::from(c.to_ascii_uppercase())] = true;
            }
        }
    }
    if !case_insensitive && tail.contains("a-f]") && !tail.contains("A-F") {
        warnings.push(format!("line {line}: `~{regex}` was case-sensitive in nginx (uppercase uuids fell to default); seashard routes any case"));
    }
    Some(
        b"0123456789abcdef"
            .iter()
            .enumerate()
            .filter(|(_, c)| set[usize::from(**c)])
            .map(|(i, _)| i as u8)
            .collect(),
    )
}

/// A regex that is a plain uuid prefix (hex digits and dashes in uuid places).
fn literal_pin(regex: &str) -> Option<String> {
    let body = regex.strip_prefix('^').unwrap_or(regex);
    canonical_pin(body).ok()
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Where an upstream block's server name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Named {
    /// `--server UPSTREAM=NAME`.
    Given,
    /// The host of its first `server` line.
    Host,
    /// The block's own name.
    Block,
}

/// Names the server of every upstream block, never two blocks with different
/// `server` lines alike unless `servers` says so (see the module doc), and warns
/// about blocks that balance over several servers. The blocks in config order.
fn name_upstreams(
    directives: &[Directive],
    servers: &BTreeMap<String, String>,
) -> Result<(Vec<UpstreamBlock>, Vec<String>), Problems> {
    let mut blocks: Vec<(UpstreamBlock, Named, Vec<String>)> = Vec::new();
    walk(directives, &mut |d| {
        let (true, Some(name), Some(block)) = (d.name == "upstream", d.args.first(), &d.block)
        else {
            return;
        };
        let addrs: Vec<String> = block
            .iter()
            .filter(|s| s.name == "server")
            .filter_map(|s| s.args.first().cloned())
            .collect();
        let (server, named) = match (servers.get(name), addrs.first()) {
            (Some(s), _) => (s.clone(), Named::Given),
            (None, Some(a)) => (host_of(a), Named::Host),
            (None, None) => (name.clone(), Named::Block),
        };
        // What identifies the dtable-servers behind the block.
        let mut key: Vec<String> = addrs.iter().map(|a| a.to_ascii_lowercase()).collect();
        key.sort();
        key.dedup();
        blocks.push((
            UpstreamBlock {
                name: name.clone(),
                server,
                addrs,
            },
            named,
            key,
        ));
    });
    let describe = |b: &UpstreamBlock| format!("`{}` ({})", b.name, b.addrs.join(", "));
    // Indices of the blocks named `name` whose servers differ from the first's.
    let clash = |blocks: &[(UpstreamBlock, Named, Vec<String>)], i: usize| -> Vec<usize> {
        let group: Vec<usize> = (0..blocks.len())
            .filter(|&j| blocks[j].0.server == blocks[i].0.server)
            .collect();
        if group.iter().all(|&j| blocks[j].2 == blocks[i].2) {
            Vec::new()
        } else {
            group
        }
    };
    let mut warnings = Vec::new();
    // A host shared by blocks with different servers names none of them, whatever
    // `--server` names some of them (a name does not change with another's).
    let hosts: Vec<Option<String>> = blocks
        .iter()
        .map(|(b, _, _)| b.addrs.first().map(|a| host_of(a)))
        .collect();
    for i in 0..blocks.len() {
        let shared: Vec<usize> = (0..blocks.len())
            .filter(|&j| hosts[j].is_some() && hosts[j] == hosts[i] && blocks[j].2 != blocks[i].2)
            .collect();
        if blocks[i].1 != Named::Host || shared.is_empty() {
            continue;
        }
        let others: Vec<String> = shared.iter().map(|&j| describe(&blocks[j].0)).collect();
        warnings.push(format!(
            "upstream {} shares its host `{}` with {}, a different server: named after its block, `{}` (name it with --server {}=NAME)",
            describe(&blocks[i].0),
            blocks[i].0.server,
            others.join(" and "),
            blocks[i].0.name,
            blocks[i].0.name
        ));
        blocks[i].0.server = blocks[i].0.name.clone();
        blocks[i].1 = Named::Block;
    }
    // Each round moves at least one block from Host to Block, so this ends.
    loop {
        let mut fell_back = false;
        for i in 0..blocks.len() {
            let group = clash(&blocks, i);
            if !group.iter().any(|&j| blocks[j].1 == Named::Host) {
                continue;
            }
            let shared = blocks[i].0.server.clone();
            let list: Vec<String> = group.iter().map(|&j| describe(&blocks[j].0)).collect();
            let mut renamed = Vec::new();
            for &j in &group {
                if blocks[j].1 == Named::Host {
                    blocks[j].0.server = blocks[j].0.name.clone();
                    blocks[j].1 = Named::Block;
                    renamed.push(format!("`{}`", blocks[j].0.name));
                }
            }
            warnings.push(format!(
                "upstreams {} would all be named `{shared}`, but they are different servers: {} named after their blocks, {} (name them with --server UPSTREAM=NAME)",
                list.join(" and "),
                if renamed.len() == 1 { "one is" } else { "they are" },
                renamed.join(", ")
            ));
            fell_back = true;
        }
        if !fell_back {
            break;
        }
    }
    let mut problems = Problems::default();
    let mut reported: Vec<String> = Vec::new();
    for i in 0..blocks.len() {
        let group = clash(&blocks, i);
        let server = &blocks[i].0.server;
        if group.is_empty() || reported.contains(server) {
            continue;
        }
        reported.push(server.clone());
        let list: Vec<String> = group.iter().map(|&j| describe(&blocks[j].0)).collect();
        if group.iter().all(|&j| blocks[j].1 == Named::Given) {
            warnings.push(format!(
                "MERGED by --server: upstreams {} are all server `{server}`: the imported map sends all their bases to `{server}`, but nginx spread them over these different addresses; if they are different dtable-servers, bases were open on several (seactl audit-nginx reports which) and moving them all to one loses writes",
                list.join(" and ")
            ));
        } else {
            problems.push(
                format!("upstream {}", blocks[i].0.name),
                format!(
                    "upstreams {} would all be server `{server}`, and they are different servers; name them apart with --server UPSTREAM=NAME",
                    list.join(" and ")
                ),
            );
        }
    }
    for (b, _, key) in &blocks {
        if key.len() > 1 {
            warnings.push(format!(
                "upstream `{}` balances over {} servers ({}): nginx sent each of its bases to any of them, so if they are several dtable-servers, its bases were open on several dtable-servers at once; the imported map names them all `{}`, one server (seactl audit-nginx reports the bases that reached several)",
                b.name,
                b.addrs.len(),
                b.addrs.join(", "),
                b.server
            ));
        }
    }
    let blocks = blocks.into_iter().map(|(b, _, _)| b).collect();
    problems.into_result((blocks, warnings))
}

fn host_of(server: &str) -> String {
    let s = server.strip_prefix("unix:").unwrap_or(server);
    match s.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|c| c.is_ascii_digit()) => {
            h.trim_matches(['[', ']']).to_owned()
        }
        _ => s.to_owned(),
    }
}

/// The configuration's directives, or its syntax error (the one problem, at its line).
fn directives(conf: &str) -> Result<Vec<Directive>, Problems> {
    parse(conf).map_err(|(line, why)| {
        let mut problems = Problems::default();
        problems.push(format!("line {line}"), why);
        problems
    })
}

/// The first `map $request_uri` (or `$uri`) block and how many there are; none is a
/// problem.
fn first_request_uri_map(directives: &[Directive]) -> Result<(Directive, usize), Problems> {
    let (mut first, mut count) = (None, 0);
    walk(directives, &mut |d| {
        if d.name == "map"
            && d.args
                .first()
                .is_some_and(|a| a == "$request_uri" || a == "$uri")
            && d.block.is_some()
        {
            count += 1;
            first.get_or_insert_with(|| d.clone());
        }
    });
    let Some(first) = first else {
        let mut problems = Problems::default();
        problems.push("", "no `map $request_uri $var { ... }` block found");
        return Err(problems);
    };
    Ok((first, count))
}

/// A map entry's key and its one value; `None` for a bare `hostnames` or `volatile`,
/// and for an entry without exactly one value (a problem, pushed to `problems`).
fn key_and_value<'a>(entry: &'a Directive, problems: &mut Problems) -> Option<(&'a str, &'a str)> {
    let key = entry.name.as_str();
    if matches!(key, "hostnames" | "volatile") && entry.args.is_empty() {
        return None;
    }
    let [value] = entry.args.as_slice() else {
        problems.push(
            format!("line {}", entry.line),
            format!("map entry `{key}` needs exactly one value"),
        );
        return None;
    };
    Some((key, value))
}

/// `problems` and the one of a `map` block without `default`.
fn no_default(map: &Directive, mut problems: Problems) -> Problems {
    problems.push(
        format!("line {}", map.line),
        "the map has no `default`: every map needs one",
    );
    problems
}

/// One nginx directive: `name args...;` or `name args... { block }`.
#[derive(Debug, Clone)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Option<Vec<Directive>>,
    line: usize,
}

fn walk(ds: &[Directive], f: &mut impl FnMut(&Directive)) {
    for d in ds {
        f(d);
        if let Some(b) = &d.block {
            walk(b, f);
        }
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    Open,
    Close,
    Semi,
}

fn tokens(conf: &str) -> Result<Vec<(Token, usize)>, (usize, String)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = conf.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
            }
            '{' => out.push((Token::Open, line)),
            '}' => out.push((Token::Close, line)),
            ';' => out.push((Token::Semi, line)),
            '"' | '\'' => {
                let start = line;
                let mut word = String::new();
                loop {
                    match chars.next() {
                        None => return Err((start, "unterminated quoted string".into())),
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                if n != c {
                                    word.push('\\');
                                }
                                word.push(n);
                            }
                        }
                        Some(q) if q == c => break,
                        Some(n) => {
                            if n == '\n' {
                                line += 1;
                            }
                            word.push(n);
                        }
                    }
                }
                out.push((Token::Word(word), start));
            }
            c => {
                let mut word = String::from(c);
                while let Some(&n) = chars.peek() {
                    if n.is_whitespace() || matches!(n, '{' | '}' | ';') {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                out.push((Token::Word(word), line));
            }
        }
    }
    Ok(out)
}

fn parse(conf: &str) -> Result<Vec<Directive>, (usize, String)> {
    let toks = tokens(conf)?;
    let mut pos = 0;
    let ds = parse_block(&toks, &mut pos, 0)?;
    Ok(ds)
}

fn parse_block(
    toks: &[(Token, usize)],
    pos: &mut usize,
    depth: usize,
) -> Result<Vec<Directive>, (usize, String)> {
    let mut out = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut line = 0;
    while let Some((tok, l)) = toks.get(*pos) {
        *pos += 1;
        match tok {
            Token::Word(w) => {
                if words.is_empty() {
                    line = *l;
                }
                words.push(w.clone());
            }
            Token::Semi | Token::Open => {
                let mut it = std::mem::take(&mut words).into_iter();
                let Some(name) = it.next() else {
                    return Err((
                        *l,
                        format!(
                            "unexpected `{}`",
                            if *tok == Token::Semi { ';' } else { '{' }
                        ),
                    ));
                };
                let block = if *tok == Token::Open {
                    Some(parse_block(toks, pos, depth + 1)?)
                } else {
                    None
                };
                out.push(Directive {
                    name,
                    args: it.collect(),
                    block,
                    line,
                });
            }
            Token::Close => {
                if depth == 0 {
                    return Err((*l, "unexpected `}`".into()));
                }
                if !words.is_empty() {
                    return Err((*l, "missing `;` before `}`".into()));
                }
                return Ok(out);
            }
        }
    }
    if depth > 0 {
        return Err((
            toks.last().map_or(1, |t| t.1),
            "missing `}` at the end".into(),
        ));
    }
    if !words.is_empty() {
        return Err((line, "missing `;` at the end".into()));
    }
    Ok(out)
}

/// The map as nginx itself evaluates it (not translated), for tools that replay
/// requests through it (`seactl audit-nginx`): exact keys first (case-insensitive),
/// then the regexes in order, first match wins, else `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxMap {
    /// The variable the map reads: `$request_uri` (path and query) or `$uri`.
    pub source: String,
    /// The server of `default`.
    pub default: String,
    /// Exact keys (nginx compares them ignoring case) and their servers.
    pub exact: Vec<(String, String)>,
    /// The regex keys in order: `~*` (case-insensitive) or `~`.
    pub regexes: Vec<MapRegex>,
    /// Every `upstream` block: its name, its server name, its `server` addresses.
    pub upstreams: Vec<UpstreamBlock>,
}

/// One regex key of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapRegex {
    /// The regex as written after `~` or `~*` (PCRE syntax).
    pub regex: String,
    pub case_insensitive: bool,
    pub server: String,
    /// The line of the configuration.
    pub line: usize,
}

/// One `upstream NAME { server ADDR; ... }` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBlock {
    pub name: String,
    /// The server name [`import`] gives it: `servers[name]`, else the host of its first
    /// `server` line, else (shared host, taken name) the block's name.
    pub server: String,
    /// The addresses of its `server` lines, as written (`host:port`, `[::1]:5000`, `unix:/path`).
    pub addrs: Vec<String>,
}

/// Reads the first `map $request_uri` (or `$uri`) block and the upstream blocks, with
/// server names resolved as [`import`] resolves them (`servers` maps upstream names to
/// server names; a value that is no upstream block is the server name itself).
pub fn nginx_map(conf: &str, servers: &BTreeMap<String, String>) -> Result<NginxMap, Problems> {
    let directives = directives(conf)?;
    let upstreams = name_upstreams(&directives, servers)?.0;
    let (map, _) = first_request_uri_map(&directives)?;
    let mut problems = Problems::default();
    let resolve = |value: &str| -> String {
        upstreams
            .iter()
            .find(|u| u.name == value)
            .map(|u| u.server.clone())
            .or_else(|| servers.get(value).cloned())
            .unwrap_or_else(|| value.to_owned())
    };
    let mut default = None;
    let mut exact = Vec::new();
    let mut regexes = Vec::new();
    for entry in map.block.iter().flatten() {
        let Some((key, value)) = key_and_value(entry, &mut problems) else {
            continue;
        };
        let server = resolve(value);
        if key == "default" {
            default = Some(server);
        } else if let Some(r) = key.strip_prefix("~*") {
            regexes.push(MapRegex {
                regex: r.to_owned(),
                case_insensitive: true,
                server,
                line: entry.line,
            });
        } else if let Some(r) = key.strip_prefix('~') {
            regexes.push(MapRegex {
                regex: r.to_owned(),
                case_insensitive: false,
                server,
                line: entry.line,
            });
        } else {
            // A leading backslash escapes a key that starts with `~`.
            let k = key.strip_prefix('\\').unwrap_or(key);
            exact.push((k.to_owned(), server));
        }
    }
    let Some(default) = default else {
        return Err(no_default(&map, problems));
    };
    problems.into_result(NginxMap {
        source: map.args.first().cloned().unwrap_or_default(),
        default,
        exact,
        regexes,
        upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who owns `key` (a slot range or a pin) in `entries`.
    fn owner<'m>(entries: &'m BTreeMap<String, String>, key: &str) -> Option<&'m str> {
        entries.get(key).map(String::as_str)
    }

    pub(crate) const SEATABLE_CONF: &str = r#"
worker_processes auto;
events { worker_connections 4096; }
http {
    upstream dtable_server_a_z { server dtable-server:5000; keepalive 15; }
    upstream dtable_server_0_9 { server dtable-server-2:5000; keepalive 15; }
    map $request_uri $dtable_upstream {
        default dtable_server_a_z;
        "~*ff84e1a1-66e2" dtable_server_0_9;
        "~*([a-zA-Z])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_a_z;
        "~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})" dtable_server_0_9;
    }
    server { listen 5000; location / { proxy_pass http://$dtable_upstream; } }
}
"#;

    #[test]
    fn nginx_map_keeps_nginx_semantics() {
        let m = nginx_map(SEATABLE_CONF, &BTreeMap::new()).unwrap();
        assert_eq!(m.source, "$request_uri");
        assert_eq!(m.default, "dtable-server");
        assert_eq!(m.regexes.len(), 3);
        assert_eq!(m.regexes[0].regex, "ff84e1a1-66e2");
        assert!(m.regexes[0].case_insensitive);
        assert_eq!(m.regexes[0].server, "dtable-server-2");
        assert_eq!(m.upstreams.len(), 2);
        assert_eq!(
            m.upstreams[1].addrs,
            vec!["dtable-server-2:5000".to_string()]
        );
        let named = BTreeMap::from([("dtable_server_0_9".to_string(), "ds2".to_string())]);
        let m = nginx_map(SEATABLE_CONF, &named).unwrap();
        assert_eq!(m.regexes[2].server, "ds2");
    }

    #[test]
    fn the_documented_map() {
        let got = import(SEATABLE_CONF, &BTreeMap::new()).unwrap();
        assert_eq!(got.warnings, Vec::<String>::new());
        let m = got.map;
        assert_eq!(m.default, "dtable-server");
        assert_eq!(owner(&m.slots, "0-9"), Some("dtable-server-2"));
        assert_eq!(owner(&m.slots, "a-f"), Some("dtable-server"));
        assert_eq!(m.slots.len(), 2);
        assert_eq!(owner(&m.pins, "ff84e1a166e2"), Some("dtable-server-2"));
    }

    #[test]
    fn server_names_can_be_given() {
        let names = BTreeMap::from([("dtable_server_0_9".to_string(), "ds2".to_string())]);
        let m = import(SEATABLE_CONF, &names).unwrap().map;
        assert_eq!(owner(&m.slots, "0-9"), Some("ds2"));
        let typo = BTreeMap::from([("dtable_server_0-9".to_string(), "ds2".to_string())]);
        let got = import(SEATABLE_CONF, &typo).unwrap();
        assert_eq!(
            got.warnings,
            [
                "--server dtable_server_0-9=ds2: no upstream block or map value `dtable_server_0-9`; ignored"
            ]
        );
    }

    #[test]
    fn untranslatable_rules_become_path_rules_with_a_warning() {
        let conf = r#"map $request_uri $u { default a; "~*^/api/v1/admin/" b; "~*([0-7])([0-9a-f]{7}-[0-9a-f]{4})" c; "~*([0-9])([0-9a-f]{7}-[0-9a-f]{4})" d; "~*0abc" e; }"#;
        let got = import(conf, &BTreeMap::new()).unwrap();
        assert_eq!(got.map.paths.len(), 1);
        assert_eq!(
            got.map.paths[0].regex.as_deref(),
            Some("(?i)^/api/v1/admin/")
        );
        assert_eq!(owner(&got.map.slots, "0-7"), Some("c"));
        assert_eq!(owner(&got.map.slots, "8-9"), Some("d"));
        assert_eq!(owner(&got.map.slots, "a-f"), Some("a"));
        assert!(
            got.warnings.iter().any(|w| w.contains("path rule")),
            "{:?}",
            got.warnings
        );
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("`0abc`") && w.contains("dropped")),
            "{:?}",
            got.warnings
        );
        assert!(got.map.pins.is_empty());
    }

    /// Two dtable-servers on one host, nginx picking by port.
    const ONE_HOST: &str = include_str!("../tests/fixtures/one-host.nginx.conf");

    #[test]
    fn two_upstreams_on_one_host_stay_two_servers() {
        let got = import(ONE_HOST, &BTreeMap::new()).unwrap();
        let m = &got.map;
        assert_eq!(m.default, "dtable_server_a_z");
        assert_eq!(owner(&m.slots, "0-9"), Some("dtable_server_0_9"));
        assert_eq!(owner(&m.slots, "a-f"), Some("dtable_server_a_z"));
        assert!(
            got.warnings.iter().any(|w| w.contains("10.0.0.4:5000")
                && w.contains("10.0.0.4:5001")
                && w.contains("named after its block")),
            "{:?}",
            got.warnings
        );
        let n = nginx_map(ONE_HOST, &BTreeMap::new()).unwrap();
        let servers: Vec<_> = n.upstreams.iter().map(|u| u.server.as_str()).collect();
        assert_eq!(servers, ["dtable_server_a_z", "dtable_server_0_9"]);
        assert_eq!(n.default, "dtable_server_a_z");
        assert_eq!(n.regexes[1].server, "dtable_server_0_9");
        // A name given for one of them leaves the other on its block's name.
        let named = BTreeMap::from([("dtable_server_0_9".to_string(), "ds2".to_string())]);
        let m = import(ONE_HOST, &named).unwrap().map;
        assert_eq!(m.default, "dtable_server_a_z");
        assert_eq!(owner(&m.slots, "0-9"), Some("ds2"));
    }

    #[test]
    fn the_same_servers_listed_twice_are_one_server() {
        let conf = ONE_HOST.replace("10.0.0.4:5001", "10.0.0.4:5000");
        let got = import(&conf, &BTreeMap::new()).unwrap();
        assert_eq!(got.map.default, "10.0.0.4");
        assert!(got.map.slots.values().all(|s| s == "10.0.0.4"));
        assert_eq!(got.warnings, Vec::<String>::new());
    }

    #[test]
    fn a_fallback_that_collides_again_falls_back_again_or_fails() {
        // `other`'s host is `dtable_server_a_z`, the name the first block falls back to.
        let conf = ONE_HOST.replace(
            "map $request_uri",
            "upstream other { server dtable_server_a_z:5000; }\n    map $request_uri",
        );
        let n = nginx_map(&conf, &BTreeMap::new()).unwrap();
        let servers: Vec<_> = n.upstreams.iter().map(|u| u.server.as_str()).collect();
        assert_eq!(servers, ["dtable_server_a_z", "dtable_server_0_9", "other"]);
        // A block's own name taken by `--server`: no name left, an error naming both.
        let conf = ONE_HOST.replace(
            "map $request_uri",
            "upstream other { server 10.0.0.9:5000; }\n    map $request_uri",
        );
        let named = BTreeMap::from([("other".to_string(), "dtable_server_a_z".to_string())]);
        let err = import(&conf, &named).unwrap_err().to_string();
        assert!(
            err.contains("`dtable_server_a_z` (10.0.0.4:5000)")
                && err.contains("`other` (10.0.0.9:5000)")
                && err.contains("--server"),
            "{err}"
        );
        assert!(nginx_map(&conf, &named).is_err());
    }

    #[test]
    fn two_upstreams_named_alike_on_purpose_are_merged_loudly() {
        let named = BTreeMap::from([
            ("dtable_server_a_z".to_string(), "ds".to_string()),
            ("dtable_server_0_9".to_string(), "ds".to_string()),
        ]);
        let got = import(ONE_HOST, &named).unwrap();
        assert_eq!(got.map.default, "ds");
        assert!(
            got.warnings.iter().any(|w| w.contains("MERGED")
                && w.contains("`dtable_server_a_z`")
                && w.contains("`dtable_server_0_9`")),
            "{:?}",
            got.warnings
        );
    }

    #[test]
    fn an_upstream_balancing_over_several_servers_is_reported() {
        let conf = ONE_HOST.replace(
            "server 10.0.0.4:5001;",
            "server 10.0.0.5:5000; server 10.0.0.6:5000 backup;",
        );
        let got = import(&conf, &BTreeMap::new()).unwrap();
        assert!(
            got.warnings
                .iter()
                .any(|w| w.contains("`dtable_server_0_9`")
                    && w.contains("10.0.0.5:5000, 10.0.0.6:5000")
                    && w.contains("several dtable-servers")),
            "{:?}",
            got.warnings
        );
        assert_eq!(owner(&got.map.slots, "0-9"), Some("10.0.0.5"));
    }

    #[test]
    fn errors() {
        assert!(
            import(
                "http { map $request_uri $u { default a; }",
                &BTreeMap::new()
            )
            .unwrap_err()
            .to_string()
            .contains("missing `}`")
        );
        assert!(
            import("http { }", &BTreeMap::new())
                .unwrap_err()
                .to_string()
                .contains("no `map $request_uri")
        );
        assert!(
            import("map $request_uri $u { \"~*x\" a; }", &BTreeMap::new())
                .unwrap_err()
                .to_string()
                .contains("no `default`")
        );
        let bad = import(
            "map $request_uri $u { default \"bad name\"; }",
            &BTreeMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("--server bad name=NAME"), "{bad}");
    }
}
