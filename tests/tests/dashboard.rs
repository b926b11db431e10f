//! The Grafana dashboard (`deploy/grafana/seashard.json`) against real scrapes: a
//! live control plane (in-process, on loopback) and a live Envoy 1.40 with the
//! built base-router filter. Every metric a panel (or a template variable) queries
//! must exist in the control plane's `/metrics` or the Envoy's `/stats/prometheus`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use deploy::bootstrap::Kind;
use seashard_tests::{Upstream, get, wait_until, wasm_file, workspace_dir};
use serde_json::{Value, json};

mod common;

use common::Cp;

/// Bases on either side of the map's split (`0-7` | `8-f`).
const BASE_LOW: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
const BASE_HIGH: &str = "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

#[test]
fn every_metric_the_dashboard_queries_is_scraped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wasm = wasm_file("base_router.wasm")?;
    let a = Upstream::start("dtable-server")?;
    let b = Upstream::start("dtable-server-2")?;
    let map = json!({"default": "dtable-server",
                     "slots": {"0-7": "dtable-server", "8-f": "dtable-server-2"}});
    let config = common::sqlite_config(dir.path(), 0, &wasm, &map, "", &[&a, &b])?;
    let cp = Cp::start(config)?;
    let envoy = common::start_envoy(Kind::Edge, "edge-1", cp.grpc, &wasm)?;

    // The map reached the filter; then requests to both servers, so that the
    // per-server counters have samples.
    wait_until(
        Duration::from_secs(30),
        "the edge to route with map 1",
        || {
            let r = get(envoy.listener_addr, &rows(BASE_LOW), &[])?;
            let version = r
                .json()
                .ok()
                .map(|b| b["headers"]["x-shard-map-version"].clone());
            Ok((r.status == 200 && version == Some(json!("1"))).then_some(()))
        },
    )?;
    for base in [BASE_LOW, BASE_HIGH, BASE_LOW] {
        let r = get(envoy.listener_addr, &rows(base), &[])?;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Counted in the VM, flushed to Envoy's counters every tick.
    wait_until(Duration::from_secs(10), "both per-server counters", || {
        let text = envoy
            .admin_get("/stats?filter=seashard.requests.server")?
            .text();
        let counted = text.lines().filter(|l| !l.ends_with(": 0")).count();
        Ok((counted >= 2).then_some(()))
    })?;

    let cp_names = metric_names(&get(cp.http, "/metrics", &[])?.text());
    let envoy_names = metric_names(&envoy.admin_get("/stats/prometheus")?.text());
    let scrapes = Scrapes {
        cp: &cp_names,
        envoy: &envoy_names,
    };
    // Every process stopped: the control plane, the Envoy, both upstreams.
    cp.kill();
    drop(envoy);
    drop((a, b));

    let path = workspace_dir().join("deploy/grafana/seashard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}", path.display()))?;
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let queries = queries(&dashboard)?;
    assert!(queries.len() >= 10, "{queries:?}");
    let mut found = BTreeSet::new();
    let mut errors = Vec::new();
    for (title, expr) in &queries {
        match scrapes.check(expr) {
            Ok(names) => found.extend(names),
            Err(e) => errors.push(format!("{title}: {e:#}")),
        }
    }
    eprintln!("the dashboard queries: {found:#?}");
    if !errors.is_empty() {
        bail!(
            "queries of metrics that do not exist:\n{}",
            errors.join("\n")
        );
    }
    // The check catches what it is for.
    for bogus in [
        "sum(rate(seashard_bogus_total[5m]))",
        "seashard_map_version",
        r#"rate({__name__=~"seashard_requests_bogus_.+"}[5m])"#,
        "frobnicate(seashard_pushes_total)",
    ] {
        assert!(scrapes.check(bogus).is_err(), "{bogus} passed");
    }
    Ok(())
}

/// Every panel's (and row's panels') queries and every template variable's query:
/// (where, expression).
fn queries(dashboard: &Value) -> Result<Vec<(String, String)>> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) -> Result<()> {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default();
            if title.is_empty() {
                bail!("a panel without a title: {p}");
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .ok_or_else(|| anyhow!("{title}: a target without expr"))?;
                out.push((title.to_owned(), expr.to_owned()));
            }
            panels(&p["panels"], out)?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out)?;
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let q = v["query"]["query"]
            .as_str()
            .or(v["query"].as_str())
            .unwrap_or_default();
        // Grafana's `label_values(selector, label)`: the selector is PromQL.
        if let Some(args) = q.strip_prefix("label_values(") {
            let (selector, _label) = args
                .rsplit_once(',')
                .ok_or_else(|| anyhow!("variable {}: {q}", v["name"]))?;
            out.push((format!("variable {}", v["name"]), selector.to_owned()));
        }
    }
    Ok(out)
}

/// The metric names of a text exposition, those declared (`# TYPE`) included: a
/// gauge family with no sample yet (e.g. no node id conflict) still exists.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect()
}

/// PromQL functions and aggregations the dashboard may use.
const FUNCTIONS: &[&str] = &[
    "rate",
    "irate",
    "increase",
    "sum",
    "max",
    "min",
    "avg",
    "count",
    "scalar",
    "vector",
    "label_replace",
];
/// Keywords followed by a list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Binary operators and modifiers spelled as words.
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];

/// A vector selector: its metric name (if written before the braces) and the text
/// of its label matchers.
#[derive(Debug)]
struct Selector {
    name: Option<String>,
    matchers: String,
}

/// The selectors of a PromQL expression; an unknown function is an error.
fn selectors(expr: &str) -> Result<Vec<Selector>> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    // The index after the group opened at `i` (by `open`), strings skipped.
    let close = |i: usize, open: u8, shut: u8| -> Result<usize> {
        let mut depth = 0;
        let mut j = i;
        while j < b.len() {
            match b[j] {
                q @ (b'"' | b'\'' | b'`') => j = string_end(b, j, q)?,
                c if c == open => depth += 1,
                c if c == shut => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(j + 1);
                    }
                }
                _ => {}
            }
            j += 1;
        }
        bail!("unclosed {} in {expr}", open as char)
    };
    let next_char = |mut j: usize| {
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        (j, b.get(j).copied())
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = string_end(b, i, c)? + 1;
        } else if c == b'[' {
            i = close(i, b'[', b']')?;
        } else if c == b'{' {
            let end = close(i, b'{', b'}')?;
            out.push(Selector {
                name: None,
                matchers: expr[i + 1..end - 1].to_owned(),
            });
            i = end;
        } else if c == b'$' {
            // A Grafana variable ($__rate_interval, ${x}).
            i += 1;
            if b.get(i) == Some(&b'{') {
                i = close(i, b'{', b'}')?;
            }
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            let word = &expr[start..i];
            let (j, next) = next_char(i);
            if LABEL_LISTS.contains(&word) {
                if next == Some(b'(') {
                    i = close(j, b'(', b')')?;
                }
            } else if FUNCTIONS.contains(&word) {
                // `sum(...)`, or `sum by (...) (...)`.
            } else if next == Some(b'(') {
                bail!("unknown function {word} in {expr}");
            } else if !KEYWORDS.contains(&word) {
                let mut matchers = String::new();
                if next == Some(b'{') {
                    let end = close(j, b'{', b'}')?;
                    matchers = expr[j + 1..end - 1].to_owned();
                    i = end;
                }
                out.push(Selector {
                    name: Some(word.to_owned()),
                    matchers,
                });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// The index of the quote closing the string opened at `i`.
fn string_end(b: &[u8], i: usize, quote: u8) -> Result<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if quote != b'`' => j += 1,
            c if c == quote => return Ok(j),
            _ => {}
        }
        j += 1;
    }
    bail!("unclosed string")
}

/// The value of the `__name__` matcher in `matchers`, and whether it is a regex.
fn name_matcher(matchers: &str) -> Option<(String, bool)> {
    let rest = matchers.split_once("__name__")?.1.trim_start();
    let (regex, rest) = match rest.strip_prefix("=~") {
        Some(r) => (true, r),
        None => (false, rest.strip_prefix('=')?),
    };
    let value = rest.trim_start().strip_prefix('"')?.split_once('"')?.0;
    Some((value.to_owned(), regex))
}

struct Scrapes<'a> {
    cp: &'a BTreeSet<String>,
    envoy: &'a BTreeSet<String>,
}

impl Scrapes<'_> {
    /// The metric names `expr` queries, each of which must be in a scrape. A name
    /// in both scrapes (`seashard_map_version`: the control plane's and each
    /// Envoy's filter's) must be selected by job.
    fn check(&self, expr: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for s in selectors(expr)? {
            let (name, regex) = match (&s.name, name_matcher(&s.matchers)) {
                (Some(n), _) => (n.clone(), false),
                (None, Some(m)) => m,
                (None, None) => bail!("a selector without a metric name in {expr}"),
            };
            if regex {
                // Only `prefix.+`: a family of names, e.g. one counter per server.
                let prefix = name
                    .strip_suffix(".+")
                    .filter(|p| p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'))
                    .ok_or_else(|| anyhow!("unsupported name regex {name} in {expr}"))?;
                let matching: Vec<&String> = self
                    .cp
                    .iter()
                    .chain(self.envoy)
                    .filter(|n| n.len() > prefix.len() && n.starts_with(prefix))
                    .collect();
                if matching.is_empty() {
                    bail!("no metric matches {name} in {expr}");
                }
                names.extend(matching.into_iter().cloned());
                continue;
            }
            match (self.cp.contains(&name), self.envoy.contains(&name)) {
                (false, false) => bail!("{name} is in neither scrape: {expr}"),
                (true, true) if !s.matchers.contains("job") => {
                    bail!("{name} is in both scrapes; select it by job: {expr}")
                }
                _ => names.push(name),
            }
        }
        if names.is_empty() {
            bail!("no metric in {expr}");
        }
        Ok(names)
    }
}

fn rows(base: &str) -> String {
    format!("/dtable-server/api/v1/dtables/{base}/rows/")
}
