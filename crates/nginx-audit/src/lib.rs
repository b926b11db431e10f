//! `seactl audit-nginx`: did the operator's nginx `map $request_uri` setup open a
//! base on two dtable-servers?
//!
//! Access logs are read line by line ([`feed`], plain or gzipped) into an [`Audit`],
//! which keeps only per-base aggregates (base × server: requests by URL shape, first
//! and last time), so memory grows with the number of bases, never with the log.
//! For each request the server is the one nginx logged in `$upstream_addr` (mapped to
//! a server name through the config's upstream addresses), else the one nginx's map
//! picks for the request target, evaluated as nginx does ([`Predictor`]): such a
//! report is a prediction. A base is at risk when its requests reached more than one
//! server, a server other than its owner under the imported map, or more than one
//! address of one server.
//!
//! Invariant: a logged address is counted under its `server` line (port and all),
//! never under a name alone. Two upstream blocks are two servers even on one host
//! (`shardmap::nginx` names them apart), and the addresses of one server (an upstream
//! block with several `server` lines, nginx balancing over them, or blocks `--server`
//! named alike) stay apart in the aggregates: a base that reached two of them was
//! open on two dtable-servers, and is reported `balanced`, with the addresses.
//!
//! The accepted line formats are in [`line`].

pub mod line;
mod predict;
mod report;
pub mod time;

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;

use shardmap::nginx::{NginxMap, UpstreamBlock};
use shardmap::{BaseUuid, Problems, Router, ShardMap};

pub use line::{LogLine, Malformed, UpstreamField, parse_line};
pub use predict::Predictor;
pub use report::{BaseReport, Report, ServerReport, Shapes};
pub use time::Time;

/// Lines longer than this are malformed (and never held whole in memory).
pub const MAX_LINE: usize = 64 * 1024;

/// At most this many distinct unknown `$upstream_addr` values are named in the
/// report; the rest are counted under [`OTHER_UNKNOWN`].
pub const MAX_UNKNOWN_ADDRS: usize = 64;
pub const OTHER_UNKNOWN: &str = "(other unknown upstream addresses)";

/// How a request target names its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// A dashed uuid as a path segment: what SeaTable's regexes match.
    PathDashed = 0,
    /// 32 hex digits as a path segment: no dash, nginx's regexes miss it.
    PathHex32 = 1,
    /// Only the `dtable_uuid` query parameter (dashed or not).
    QueryOnly = 2,
    /// Anything else `shardmap::extract` finds.
    Other = 3,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::PathDashed,
        Shape::PathHex32,
        Shape::QueryOnly,
        Shape::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Shape::PathDashed => "path-dashed",
            Shape::PathHex32 => "path-hex32",
            Shape::QueryOnly => "query-dtable_uuid",
            Shape::Other => "other",
        }
    }
}

/// The base of a request target (as `shardmap::extract` finds it) and its shape.
pub fn base_and_shape(target: &str) -> Option<(BaseUuid, Shape)> {
    let base = shardmap::extract(target)?;
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    for seg in path.split('/') {
        if BaseUuid::parse(seg) == Some(base) {
            let shape = if seg.len() == 36 {
                Shape::PathDashed
            } else {
                Shape::PathHex32
            };
            return Some((base, shape));
        }
    }
    let query_only = target
        .split_once('?')
        .is_some_and(|(_, q)| q.split('&').any(|p| p.starts_with("dtable_uuid=")));
    Some((
        base,
        if query_only {
            Shape::QueryOnly
        } else {
            Shape::Other
        },
    ))
}

/// Why an audit cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the imported map does not compile:\n{0}")]
    Map(Problems),
}

/// The address of a predicted request (no `$upstream_addr`).
const NO_ADDR: u16 = u16::MAX;

/// One base on one address of one server.
#[derive(Debug, Clone)]
struct Cell {
    server: u16,
    /// Index into `Audit::addresses`, or [`NO_ADDR`].
    addr: u16,
    shapes: [u64; 4],
    first: Time,
    last: Time,
}

/// The running aggregates of an audit.
pub struct Audit {
    router: Router,
    predictor: Predictor,
    /// Normalized upstream address → (server index, address index).
    addrs: HashMap<String, (u16, u16)>,
    /// The addresses of servers: `server` lines as the config writes them, or as
    /// logged (unknown, `--upstream`).
    addresses: Vec<String>,
    address_index: HashMap<String, u16>,
    servers: Vec<String>,
    server_index: HashMap<String, u16>,
    bases: HashMap<BaseUuid, Vec<Cell>>,
    unknown: BTreeMap<String, u64>,
    counts: Counts,
    warnings: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    lines: u64,
    malformed: BTreeMap<String, u64>,
    requests: u64,
    observed: u64,
    predicted: u64,
    no_upstream: u64,
    without_base: u64,
}

/// Normalizes an upstream address so the config's and the log's compare equal:
/// socket addresses canonically (`[::1]:5000`), names lowercase, port 80 when none.
pub fn normalize_addr(a: &str) -> String {
    if let Ok(s) = a.parse::<SocketAddr>() {
        return s.to_string();
    }
    if a.starts_with("unix:") {
        return a.to_owned();
    }
    if let Ok(ip) = a.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return SocketAddr::new(ip, 80).to_string();
    }
    let lower = a.to_ascii_lowercase();
    match lower.rsplit_once(':') {
        Some((_, p)) if !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()) => lower,
        _ => format!("{lower}:80"),
    }
}

impl Audit {
    /// `imported` is the shard map `import-nginx` makes of the config (it names each
    /// base's owner); `nginx` the same config as nginx evaluates it; `resolve` the
    /// socket addresses a `server` line that is no literal address (a host name) has
    /// here, counted as that line; `named` more `(address, server)` pairs
    /// (`--upstream`), which win over the config's own addresses.
    pub fn new(
        imported: &ShardMap,
        nginx: &NginxMap,
        mut resolve: impl FnMut(&UpstreamBlock, &str) -> Vec<String>,
        named: &[(String, String)],
    ) -> Result<Audit, AuditError> {
        let router = Router::new(imported).map_err(AuditError::Map)?;
        let (predictor, warnings) = Predictor::new(nginx);
        let mut audit = Audit {
            router,
            predictor,
            addrs: HashMap::new(),
            addresses: Vec::new(),
            address_index: HashMap::new(),
            servers: Vec::new(),
            server_index: HashMap::new(),
            bases: HashMap::new(),
            unknown: BTreeMap::new(),
            counts: Counts::default(),
            warnings,
        };
        // Address → the block that lists it first, which keeps it.
        let mut taken: HashMap<String, &UpstreamBlock> = HashMap::new();
        for u in &nginx.upstreams {
            let server = audit.intern(&u.server);
            for a in &u.addrs {
                let at = audit.intern_addr(a);
                let resolved = if a.starts_with("unix:") || a.parse::<SocketAddr>().is_ok() {
                    Vec::new()
                } else {
                    resolve(u, a)
                };
                for n in std::iter::once(a.as_str())
                    .chain(resolved.iter().map(String::as_str))
                    .map(normalize_addr)
                {
                    match taken.get(&n) {
                        // Listed by blocks of one server: one server, nothing to say.
                        Some(first) if first.server == u.server => {}
                        Some(first) => audit.warnings.push(format!(
                            "{n} is a server of upstreams `{}` (server `{}`) and `{}` (server `{}`): counted under `{}`",
                            first.name, first.server, u.name, u.server, first.server
                        )),
                        None => {
                            taken.insert(n.clone(), u);
                            audit.addrs.insert(n, (server, at));
                        }
                    }
                }
            }
        }
        for (a, s) in named {
            let server = audit.intern(s);
            let n = normalize_addr(a);
            let at = audit.intern_addr(&n);
            audit.addrs.insert(n, (server, at));
        }
        Ok(audit)
    }

    fn intern_addr(&mut self, addr: &str) -> u16 {
        if let Some(&i) = self.address_index.get(addr) {
            return i;
        }
        // Bounded like the servers; never NO_ADDR.
        let i = u16::try_from(self.addresses.len())
            .unwrap_or(NO_ADDR - 1)
            .min(NO_ADDR - 1);
        self.addresses.push(addr.to_owned());
        self.address_index.insert(addr.to_owned(), i);
        i
    }

    fn intern(&mut self, server: &str) -> u16 {
        if let Some(&i) = self.server_index.get(server) {
            return i;
        }
        // Bounded: the config's servers plus at most MAX_UNKNOWN_ADDRS + 1 names.
        let i = u16::try_from(self.servers.len()).unwrap_or(u16::MAX);
        self.servers.push(server.to_owned());
        self.server_index.insert(server.to_owned(), i);
        i
    }

    /// The (server, address) of a logged address.
    fn server_of_addr(&mut self, addr: &str) -> (u16, u16) {
        let n = normalize_addr(addr);
        if let Some(&i) = self.addrs.get(&n) {
            return i;
        }
        let name = if self.unknown.contains_key(&n) || self.unknown.len() < MAX_UNKNOWN_ADDRS {
            n
        } else {
            OTHER_UNKNOWN.to_owned()
        };
        *self.unknown.entry(name.clone()).or_default() += 1;
        (self.intern(&name), self.intern_addr(&name))
    }

    /// Counts a line that could not be read (not UTF-8, too long).
    pub fn malformed(&mut self, why: Malformed) {
        self.counts.lines += 1;
        *self.counts.malformed.entry(why.to_string()).or_default() += 1;
    }

    /// Takes one line (without its newline).
    pub fn line(&mut self, line: &str) {
        let parsed = match parse_line(line) {
            Ok(p) => p,
            Err(why) => return self.malformed(why),
        };
        self.counts.lines += 1;
        self.counts.requests += 1;
        let Some((base, shape)) = base_and_shape(parsed.target) else {
            self.counts.without_base += 1;
            return;
        };
        let mut hit = [(u16::MAX, NO_ADDR); 4];
        let mut n = 0;
        match parsed.upstream {
            UpstreamField::Dash => {
                self.counts.no_upstream += 1;
                return;
            }
            UpstreamField::Addrs(v) => {
                self.counts.observed += 1;
                for a in line::addresses(v) {
                    let s = self.server_of_addr(a);
                    if !hit[..n].contains(&s) && n < hit.len() {
                        hit[n] = s;
                        n += 1;
                    }
                }
            }
            UpstreamField::Absent => {
                self.counts.predicted += 1;
                let server = self.predictor.server(parsed.target).to_owned();
                hit[0] = (self.intern(&server), NO_ADDR);
                n = 1;
            }
        }
        let cells = self.bases.entry(base).or_default();
        for &(server, addr) in &hit[..n] {
            match cells
                .iter_mut()
                .find(|c| c.server == server && c.addr == addr)
            {
                Some(c) => {
                    c.shapes[shape as usize] += 1;
                    if parsed.time.unix < c.first.unix {
                        c.first = parsed.time;
                    }
                    if parsed.time.unix > c.last.unix {
                        c.last = parsed.time;
                    }
                }
                None => {
                    let mut shapes = [0; 4];
                    shapes[shape as usize] = 1;
                    cells.push(Cell {
                        server,
                        addr,
                        shapes,
                        first: parsed.time,
                        last: parsed.time,
                    });
                }
            }
        }
    }

    /// The number of bases seen so far.
    pub fn bases(&self) -> usize {
        self.bases.len()
    }
}

/// Reads every line of `input` (plain, or gzip: recognized by its magic bytes, any
/// number of members) into `audit`. Lines longer than [`MAX_LINE`] or not UTF-8
/// are counted as malformed; only I/O errors (a truncated gzip too) stop it.
pub fn feed(audit: &mut Audit, input: impl Read) -> io::Result<()> {
    let mut buffered = BufReader::with_capacity(256 * 1024, input);
    let gz = buffered.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    if gz {
        let dec = flate2::bufread::MultiGzDecoder::new(buffered);
        feed_lines(audit, BufReader::with_capacity(256 * 1024, dec))
    } else {
        feed_lines(audit, buffered)
    }
}

fn feed_lines(audit: &mut Audit, mut r: impl BufRead) -> io::Result<()> {
    let mut line: Vec<u8> = Vec::with_capacity(1024);
    let mut too_long = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], i + 1),
            None => (buf, buf.len()),
        };
        let end_of_line = done <= buf.len() && buf.get(done - 1) == Some(&b'\n');
        if !too_long {
            if line.len() + chunk.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        r.consume(done);
        if end_of_line {
            finish_line(audit, &line, too_long);
            line.clear();
            too_long = false;
        }
    }
    if !line.is_empty() || too_long {
        finish_line(audit, &line, too_long);
    }
    Ok(())
}

fn finish_line(audit: &mut Audit, line: &[u8], too_long: bool) {
    if too_long {
        return audit.malformed(Malformed::Bytes);
    }
    match std::str::from_utf8(line) {
        Ok(s) if s.trim().is_empty() => {}
        Ok(s) => audit.line(s),
        Err(_) => audit.malformed(Malformed::Bytes),
    }
}

#[cfg(test)]
mod tests;
