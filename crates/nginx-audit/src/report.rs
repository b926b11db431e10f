//! The report: every base at risk and a summary, as JSON or text.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::{Audit, NO_ADDR, Shape, Time};

/// Requests by URL shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Shapes {
    #[serde(rename = "path-dashed")]
    pub path_dashed: u64,
    #[serde(rename = "path-hex32")]
    pub path_hex32: u64,
    #[serde(rename = "query-dtable_uuid")]
    pub query_only: u64,
    pub other: u64,
}

impl Shapes {
    fn from_counts(c: &[u64; 4]) -> Shapes {
        Shapes {
            path_dashed: c[Shape::PathDashed as usize],
            path_hex32: c[Shape::PathHex32 as usize],
            query_only: c[Shape::QueryOnly as usize],
            other: c[Shape::Other as usize],
        }
    }

    fn describe(&self) -> String {
        [
            (Shape::PathDashed, self.path_dashed),
            (Shape::PathHex32, self.path_hex32),
            (Shape::QueryOnly, self.query_only),
            (Shape::Other, self.other),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{} {n}", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// A base's requests on one server: by shape, first, last, by address index.
type PerServer = ([u64; 4], Time, Time, BTreeMap<u16, u64>);

/// One server that served a base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerReport {
    pub server: String,
    pub owner: bool,
    pub requests: u64,
    pub shapes: Shapes,
    pub first: Time,
    pub last: Time,
    /// Observed requests by address of this server (a `server` line of its upstream
    /// block, as the config writes it, or as logged): two or more are two or more
    /// dtable-servers.
    pub addresses: BTreeMap<String, u64>,
}

/// A base at risk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BaseReport {
    /// Dashed.
    pub base: String,
    /// Its owner under the imported map.
    pub owner: String,
    /// Served by more than one dtable-server: several servers, or several addresses
    /// of one (`balanced`).
    pub split: bool,
    /// Some server was reached at several of its addresses: nginx balanced the base
    /// over an upstream block's `server` lines (or over blocks `--server` named alike).
    pub balanced: bool,
    pub requests: u64,
    /// Requests that reached a server other than the owner.
    pub off_owner: u64,
    /// The URL shapes of those requests: what caused it.
    pub causes: Shapes,
    pub first: Time,
    pub last: Time,
    /// Most requests first.
    pub servers: Vec<ServerReport>,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// `observed` (every request had `$upstream_addr`), `predicted` (none had: the
    /// servers are what nginx's map picks), `mixed`, or `empty`.
    pub mode: &'static str,
    /// Non-blank lines read.
    pub lines: u64,
    /// Lines skipped, by reason.
    pub malformed: BTreeMap<String, u64>,
    pub malformed_total: u64,
    /// Well-formed lines.
    pub requests: u64,
    /// Requests whose server came from `$upstream_addr`.
    pub observed: u64,
    /// Requests whose server was predicted from nginx's map.
    pub predicted: u64,
    /// Requests with a base and `$upstream_addr` `-` (no server reached): not counted.
    pub no_upstream: u64,
    /// Requests naming no base.
    pub without_base: u64,
    /// Distinct bases with a server.
    pub bases: u64,
    pub bases_at_risk: u64,
    /// Of those, bases that reached several addresses of one server.
    pub bases_balanced: u64,
    /// Requests of the bases at risk (on any server).
    pub requests_affected: u64,
    /// Of those, requests that reached a server other than the owner.
    pub requests_off_owner: u64,
    /// `requests_affected / requests`.
    pub share_of_traffic: f64,
    /// `$upstream_addr` values that are no address of the config (nor `--upstream`):
    /// they appear as servers under their address.
    pub unknown_upstream_addrs: BTreeMap<String, u64>,
    pub warnings: Vec<String>,
    /// Most requests off the owner first.
    pub at_risk: Vec<BaseReport>,
}

impl Audit {
    /// The report of everything read so far.
    pub fn report(&self) -> Report {
        let c = &self.counts;
        let mut at_risk = Vec::new();
        for (base, cells) in &self.bases {
            let owner = self.router.owner_of(base);
            let owner_index = self.server_index.get(owner).copied();
            // Per server: request counts by shape, times, requests by address.
            let mut by_server: BTreeMap<u16, PerServer> = BTreeMap::new();
            for cell in cells {
                let e = by_server.entry(cell.server).or_insert((
                    [0; 4],
                    cell.first,
                    cell.last,
                    BTreeMap::new(),
                ));
                for (a, b) in e.0.iter_mut().zip(cell.shapes) {
                    *a += b;
                }
                if cell.first.unix < e.1.unix {
                    e.1 = cell.first;
                }
                if cell.last.unix > e.2.unix {
                    e.2 = cell.last;
                }
                if cell.addr != NO_ADDR {
                    *e.3.entry(cell.addr).or_default() += cell.shapes.iter().sum::<u64>();
                }
            }
            let balanced = by_server.values().any(|e| e.3.len() > 1);
            let split = by_server.len() > 1 || balanced;
            if !split && by_server.keys().all(|&s| Some(s) == owner_index) {
                continue;
            }
            let mut causes = [0u64; 4];
            let mut servers = Vec::new();
            for (&server, (shapes, first, last, addrs)) in &by_server {
                let is_owner = Some(server) == owner_index;
                if !is_owner {
                    for (a, b) in causes.iter_mut().zip(shapes) {
                        *a += b;
                    }
                }
                let name =
                    |v: &[String], i: u16| v.get(usize::from(i)).cloned().unwrap_or_default();
                servers.push(ServerReport {
                    server: name(&self.servers, server),
                    owner: is_owner,
                    requests: shapes.iter().sum(),
                    shapes: Shapes::from_counts(shapes),
                    first: *first,
                    last: *last,
                    addresses: addrs
                        .iter()
                        .map(|(&a, &n)| (name(&self.addresses, a), n))
                        .collect(),
                });
            }
            servers.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.server.cmp(&b.server)));
            let first = cells.iter().map(|c| c.first).min_by_key(|t| t.unix);
            let last = cells.iter().map(|c| c.last).max_by_key(|t| t.unix);
            let (Some(first), Some(last)) = (first, last) else {
                continue;
            };
            at_risk.push(BaseReport {
                base: base.dashed(),
                owner: owner.to_owned(),
                split,
                balanced,
                requests: servers.iter().map(|s| s.requests).sum(),
                off_owner: causes.iter().sum(),
                causes: Shapes::from_counts(&causes),
                first,
                last,
                servers,
            });
        }
        at_risk.sort_by(|a, b| b.off_owner.cmp(&a.off_owner).then(a.base.cmp(&b.base)));
        let requests_affected = at_risk.iter().map(|b| b.requests).sum();
        let mode = match (c.observed, c.predicted) {
            (0, 0) => "empty",
            (_, 0) => "observed",
            (0, _) => "predicted",
            _ => "mixed",
        };
        Report {
            mode,
            lines: c.lines,
            malformed_total: c.malformed.values().sum(),
            malformed: c.malformed.clone(),
            requests: c.requests,
            observed: c.observed,
            predicted: c.predicted,
            no_upstream: c.no_upstream,
            without_base: c.without_base,
            bases: self.bases.len() as u64,
            bases_at_risk: at_risk.len() as u64,
            bases_balanced: at_risk.iter().filter(|b| b.balanced).count() as u64,
            requests_affected,
            requests_off_owner: at_risk.iter().map(|b| b.off_owner).sum(),
            share_of_traffic: if c.requests == 0 {
                0.0
            } else {
                requests_affected as f64 / c.requests as f64
            },
            unknown_upstream_addrs: self.unknown.clone(),
            warnings: self.warnings.clone(),
            at_risk,
        }
    }
}

impl Report {
    /// The report for a person.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} lines: {} requests, {} malformed (skipped), {} without a base, {} with `-` upstream",
            self.lines, self.requests, self.malformed_total, self.without_base, self.no_upstream
        );
        for (why, n) in &self.malformed {
            let _ = writeln!(s, "  malformed: {n} × {why}");
        }
        let _ = match self.mode {
            "predicted" => writeln!(
                s,
                "no $upstream_addr in the log: servers are PREDICTED from nginx's map, not observed"
            ),
            "mixed" => writeln!(
                s,
                "{} requests observed ($upstream_addr), {} predicted from nginx's map",
                self.observed, self.predicted
            ),
            _ => Ok(()),
        };
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        for (a, n) in &self.unknown_upstream_addrs {
            let _ = writeln!(
                s,
                "warning: $upstream_addr {a} ({n} requests) is no address of the config; name it with --upstream {a}=SERVER"
            );
        }
        let _ = writeln!(
            s,
            "{} bases; {} at risk: {} requests affected ({:.2}% of traffic), {} of them off the owner",
            self.bases,
            self.bases_at_risk,
            self.requests_affected,
            self.share_of_traffic * 100.0,
            self.requests_off_owner
        );
        if self.bases_balanced > 0 {
            let _ = writeln!(
                s,
                "{} of them reached several addresses of one server: nginx balanced them over several dtable-servers",
                self.bases_balanced
            );
        }
        for b in &self.at_risk {
            let _ = writeln!(
                s,
                "\n{}  owner {}{}  {} .. {}",
                b.base,
                b.owner,
                if b.servers.len() > 1 {
                    "  SPLIT across servers"
                } else if b.balanced {
                    "  SPLIT across several addresses of one server (dtable-servers nginx balanced over)"
                } else {
                    "  served off its owner"
                },
                b.first,
                b.last
            );
            let _ = writeln!(s, "  caused by: {}", b.causes.describe());
            for sv in &b.servers {
                let _ = writeln!(
                    s,
                    "  {:<24} {:>8} requests  {} .. {}  ({}){}",
                    sv.server,
                    sv.requests,
                    sv.first,
                    sv.last,
                    sv.shapes.describe(),
                    if sv.owner { "  owner" } else { "" }
                );
                if !sv.addresses.is_empty() {
                    let at: Vec<String> = sv
                        .addresses
                        .iter()
                        .map(|(a, n)| format!("{a} {n}"))
                        .collect();
                    let _ = writeln!(s, "    at {}", at.join(", "));
                }
            }
        }
        s
    }
}
