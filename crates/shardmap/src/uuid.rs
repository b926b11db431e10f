//! Finding the base_uuid in a request target as the dtable-server reads it, by hand: no
//! regex, and no allocation nor decoding unless a path segment up to the base, a query
//! key or a `dtable_uuid` value holds a `%` (or, in the query, a `+`).
//!
//! # How a dtable-server (Node, Express) reads a request
//!
//! - **Path.** Express matches its routes (`/api/v1/dtables/:dtable_uuid/...`) against
//!   the *raw* path, so an encoded `/` (`%2F`) stays inside one segment; then it
//!   decodes each route parameter once with `decodeURIComponent`, and a bad escape or
//!   bytes that are not UTF-8 make that throw: Express answers 400. So
//!   `ff84e1a1%2D66e2-...` or `%66f84e1a1-...` names the base `ff84e1a1-66e2-...`.
//!   `+` is not a space in a path, and `%252D` is decoded once, to `%2D`. Literal
//!   route segments match only raw (`/api/v1/dt%61bles/...` is no route): decoding
//!   every segment reads more bases than Express can, never fewer.
//! - **Query.** `req.query` comes from `qs` (Express 4) or `querystring` (Express 5):
//!   keys and values are percent-decoded, `+` is a space; a bad escape is kept as it
//!   is rather than refused; a key given twice gives an array, and `qs` also reads
//!   `dtable_uuid[]=`, `dtable_uuid[0]=` and `[dtable_uuid]=` as `dtable_uuid`.
//!
//! # What [`read_base`] does
//!
//! The base is the first path segment that is a uuid once percent-decoded, else the
//! query's `dtable_uuid`. When the path names a base the query is not read: a route
//! with a base in its path reads its parameter, and socket.io's handshake, the reader
//! of `dtable_uuid`, has none in its path (the path won before decoding too; a route
//! reading both would need this rule revisited). What cannot be read unambiguously is an
//! error ([`Unreadable`]), never "no base", since "no base" sends a request to the
//! default server or lets it through a guard:
//! - a bad or truncated escape, or bytes that are not UTF-8 once decoded, in a path
//!   segment up to the base ([`Unreadable::BadEscape`], [`Unreadable::InvalidUtf8`]);
//!   in the query, in any key (one could be `dtable_uuid` to a lenient decoder) and in
//!   the values of `dtable_uuid` keys; other values are not read at all;
//! - a path segment or `dtable_uuid` value that needed decoding and holds a uuid and
//!   more (`<uuid>%2Fx`, `x%2F<uuid>`, `<uuid>%20`, `<uuid>+`): a server may split or
//!   trim it ([`Unreadable::UuidAndMore`]). A *plain* `<uuid>x` stays what it always
//!   was, not a base;
//! - several `dtable_uuid` keys (any spelling, `[]` forms included) whose values are
//!   not all one base, when one of them is a base ([`Unreadable::ConflictingQuery`]).

use std::fmt;

/// A base_uuid in canonical form: 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BaseUuid([u8; 32]);

impl BaseUuid {
    /// Parses a dashed 36-char (`8-4-4-4-12`) or a 32-hex uuid, any case.
    pub fn parse(s: &str) -> Option<BaseUuid> {
        BaseUuid::parse_bytes(s.as_bytes())
    }

    fn parse_bytes(b: &[u8]) -> Option<BaseUuid> {
        let mut out = [0u8; 32];
        match b.len() {
            32 => lower_into(&mut out, b)?,
            36 => {
                if b[8] != b'-' || b[13] != b'-' || b[18] != b'-' || b[23] != b'-' {
                    return None;
                }
                lower_into(&mut out[..8], &b[..8])?;
                lower_into(&mut out[8..12], &b[9..13])?;
                lower_into(&mut out[12..16], &b[14..18])?;
                lower_into(&mut out[16..20], &b[19..23])?;
                lower_into(&mut out[20..], &b[24..])?;
            }
            _ => return None,
        }
        Some(BaseUuid(out))
    }

    /// The base uuid whose 32 hex digits are those of `n`, most significant first.
    pub fn from_u128(n: u128) -> BaseUuid {
        let mut out = [0u8; 32];
        for (i, c) in out.iter_mut().enumerate() {
            let nibble = (n >> (124 - 4 * i)) & 0xf;
            *c = b"0123456789abcdef"[nibble as usize];
        }
        BaseUuid(out)
    }

    /// The 32 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The 32 lowercase hex digits as bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The dashed 36-char form.
    pub fn dashed(&self) -> String {
        let s = self.as_str();
        format!(
            "{}-{}-{}-{}-{}",
            &s[..8],
            &s[8..12],
            &s[12..16],
            &s[16..20],
            &s[20..]
        )
    }

    /// The value of the first `digits` hex digits (1 to 4).
    pub(crate) fn prefix_value(&self, digits: u32) -> usize {
        self.0
            .iter()
            .take(digits as usize)
            .fold(0usize, |acc, &c| (acc << 4) | hex_value(c) as usize)
    }
}

impl fmt::Display for BaseUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for BaseUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BaseUuid({})", self.as_str())
    }
}

/// Why the base of a request target cannot be read unambiguously: the request is
/// refused (`400`) rather than routed as if it had no base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unreadable {
    /// A `%` not followed by two hex digits (`decodeURIComponent` throws).
    BadEscape,
    /// Decoded bytes that are not UTF-8 (`decodeURIComponent` throws).
    InvalidUtf8,
    /// A decoded path segment or `dtable_uuid` value holding a uuid and more.
    UuidAndMore,
    /// `dtable_uuid` given several times, not always as the same base.
    ConflictingQuery,
}

impl Unreadable {
    /// A short word for the `reason` of an answer (`bad_escape`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Unreadable::BadEscape => "bad_escape",
            Unreadable::InvalidUtf8 => "invalid_utf8",
            Unreadable::UuidAndMore => "uuid_and_more",
            Unreadable::ConflictingQuery => "conflicting_dtable_uuid",
        }
    }

    /// What a client is told.
    pub fn message(self) -> &'static str {
        match self {
            Unreadable::BadEscape => {
                "the request target holds a bad or truncated percent-escape where a base could be named"
            }
            Unreadable::InvalidUtf8 => {
                "the request target decodes to bytes that are not UTF-8 where a base could be named"
            }
            Unreadable::UuidAndMore => {
                "a percent-encoded path segment or dtable_uuid value holds a base_uuid and more"
            }
            Unreadable::ConflictingQuery => {
                "the query gives dtable_uuid several times, not always as the same base"
            }
        }
    }
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// The base a request target (`path?query`) is about, read as the dtable-server reads
/// it (see the module's documentation): `Ok(None)` when it names none, an error when
/// it cannot be read unambiguously.
pub fn read_base(path_and_query: &str) -> Result<Option<BaseUuid>, Unreadable> {
    let bytes = path_and_query.as_bytes();
    let (path, query) = match bytes.iter().position(|&c| c == b'?') {
        Some(q) => (&bytes[..q], bytes.get(q + 1..)),
        None => (bytes, None),
    };
    for seg in path.split(|&c| c == b'/') {
        if let Some(u) = path_segment(seg)? {
            return Ok(Some(u));
        }
    }
    match query {
        Some(q) => query_base(q),
        None => Ok(None),
    }
}

/// The base a request target is about, as [`read_base`] reads it; `None` also when it
/// cannot be read unambiguously.
pub fn extract(path_and_query: &str) -> Option<BaseUuid> {
    read_base(path_and_query).ok().flatten()
}

/// The base a path segment names, decoded as `decodeURIComponent` does.
fn path_segment(seg: &[u8]) -> Result<Option<BaseUuid>, Unreadable> {
    if !seg.contains(&b'%') {
        return Ok(segment(seg));
    }
    decoded_base(&decode(seg, false)?)
}

/// The base a decoded segment or value names; a uuid inside more is an error.
fn decoded_base(d: &[u8]) -> Result<Option<BaseUuid>, Unreadable> {
    if let Some(u) = segment(d) {
        return Ok(Some(u));
    }
    if holds_uuid(d) {
        return Err(Unreadable::UuidAndMore);
    }
    Ok(None)
}

/// The query's `dtable_uuid`: every key that names it (see [`names_base`]) must give
/// the same base, once any gives a base.
fn query_base(query: &[u8]) -> Result<Option<BaseUuid>, Unreadable> {
    let mut first: Option<Option<BaseUuid>> = None;
    let (mut any_base, mut differ) = (false, false);
    for pair in query.split(|&c| c == b'&') {
        let (key, value) = match pair.iter().position(|&c| c == b'=') {
            Some(e) => (&pair[..e], &pair[e + 1..]),
            None => (pair, &[][..]),
        };
        if !names_base(key)? {
            continue;
        }
        let base = if value.iter().any(|&c| c == b'%' || c == b'+') {
            decoded_base(&decode(value, true)?)?
        } else {
            segment(value)
        };
        any_base |= base.is_some();
        match first {
            None => first = Some(base),
            Some(f) => differ |= f != base,
        }
    }
    match first {
        Some(_) if differ && any_base => Err(Unreadable::ConflictingQuery),
        Some(base) if !differ => Ok(base),
        _ => Ok(None),
    }
}

/// Whether a query key, decoded as `qs`/`querystring` do, names `dtable_uuid`:
/// `dtable_uuid`, or a `qs` bracket form rooted at it (`dtable_uuid[...`,
/// `[dtable_uuid]...`).
fn names_base(key: &[u8]) -> Result<bool, Unreadable> {
    fn names(k: &[u8]) -> bool {
        k.starts_with(b"[dtable_uuid]")
            || k.strip_prefix(b"dtable_uuid")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"["))
    }
    if key.iter().any(|&c| c == b'%' || c == b'+') {
        Ok(names(&decode(key, true)?))
    } else {
        Ok(names(key))
    }
}

/// Percent-decodes `s` once (and `+` as a space in a query), strictly: a bad or
/// truncated escape and bytes that are not UTF-8 are errors, as for
/// `decodeURIComponent`.
fn decode(s: &[u8], plus_is_space: bool) -> Result<Vec<u8>, Unreadable> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while let Some(&c) = s.get(i) {
        match c {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    s.get(i + 1).copied().and_then(lower_hex),
                    s.get(i + 2).copied().and_then(lower_hex),
                ) else {
                    return Err(Unreadable::BadEscape);
                };
                out.push((hex_value(hi) << 4) | hex_value(lo));
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    match std::str::from_utf8(&out) {
        Ok(_) => Ok(out),
        Err(_) => Err(Unreadable::InvalidUtf8),
    }
}

/// Whether `d` holds a dashed or 32-hex uuid anywhere: a run of 32 hex digits, or the
/// dashed shape at some offset. Linear in `d`.
fn holds_uuid(d: &[u8]) -> bool {
    let mut run = 0;
    for &c in d {
        run = if lower_hex(c).is_some() { run + 1 } else { 0 };
        if run >= 32 {
            return true;
        }
    }
    d.windows(36).any(|w| {
        w[8] == b'-'
            && w[13] == b'-'
            && w[18] == b'-'
            && w[23] == b'-'
            && BaseUuid::parse_bytes(w).is_some()
    })
}

fn segment(s: &[u8]) -> Option<BaseUuid> {
    match s.len() {
        32 | 36 => BaseUuid::parse_bytes(s),
        _ => None,
    }
}

/// Each byte's lowercase hex digit, or 0 when it is not a hex digit.
static LOWER_HEX: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        t[c] = match c as u8 {
            b @ (b'0'..=b'9' | b'a'..=b'f') => b,
            b @ b'A'..=b'F' => b + 32,
            _ => 0,
        };
        c += 1;
    }
    t
};

pub(crate) fn lower_hex(c: u8) -> Option<u8> {
    match LOWER_HEX[usize::from(c)] {
        0 => None,
        h => Some(h),
    }
}

/// Writes the lowercase form of the hex digits `from` into `to` (same length).
fn lower_into(to: &mut [u8], from: &[u8]) -> Option<()> {
    let mut bad = false;
    for (o, &c) in to.iter_mut().zip(from) {
        let h = LOWER_HEX[usize::from(c)];
        bad |= h == 0;
        *o = h;
    }
    (!bad).then_some(())
}

/// The value of a lowercase hex digit (callers only pass hex digits).
pub(crate) fn hex_value(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DASHED: &str = "ff84e1a1-66e2-4a3b-9c1d-0123456789ab";
    const HEX: &str = "ff84e1a166e24a3b9c1d0123456789ab";

    fn ex(s: &str) -> Option<String> {
        extract(s).map(|u| u.as_str().to_owned())
    }

    #[test]
    fn from_u128_is_the_number_in_hex() {
        let n = 0xff84e1a1_66e2_4a3b_9c1d_0123456789ab_u128;
        assert_eq!(BaseUuid::from_u128(n).as_str(), HEX);
        assert_eq!(BaseUuid::from_u128(n).dashed(), DASHED);
        assert_eq!(BaseUuid::from_u128(1).as_str(), format!("{:032x}", 1));
    }

    #[test]
    fn every_seatable_url_shape() {
        for path in [
            format!("/dtable-server/api/v1/dtables/{DASHED}/rows/?table_name=T"),
            format!("/api/v1/dtables/{DASHED}/"),
            format!("/api/v1/internal/dtables/{DASHED}/operations/"),
            format!("/api-gateway/api/v2/dtables/{DASHED}/rows/"),
            format!("/dtable-db/api/v1/query/{DASHED}/"),
            format!("/{DASHED}"),
        ] {
            assert_eq!(ex(&path).as_deref(), Some(HEX), "{path}");
        }
    }

    #[test]
    fn any_case_and_32_hex() {
        assert_eq!(
            ex(&format!("/api/v1/dtables/{}/", DASHED.to_uppercase())).as_deref(),
            Some(HEX)
        );
        assert_eq!(
            ex(&format!("/api/v1/dtables/{}/", HEX.to_uppercase())).as_deref(),
            Some(HEX)
        );
        assert_eq!(ex(&format!("/api/v1/dtables/{HEX}")).as_deref(), Some(HEX));
        assert_eq!(
            extract(&format!("/x/{DASHED}"))
                .map(|u| u.dashed())
                .as_deref(),
            Some(DASHED)
        );
    }

    #[test]
    fn query_only() {
        assert_eq!(
            ex(&format!("/socket.io/?dtable_uuid={DASHED}&EIO=4")).as_deref(),
            Some(HEX)
        );
        assert_eq!(
            ex(&format!(
                "/socket.io/?EIO=4&transport=websocket&dtable_uuid={HEX}"
            ))
            .as_deref(),
            Some(HEX)
        );
        // the path wins over the query
        let other = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            ex(&format!("/api/v1/dtables/{other}/?dtable_uuid={DASHED}")).as_deref(),
            Some(other)
        );
    }

    #[test]
    fn none() {
        for p in [
            "/ping/",
            "/",
            "",
            "/api/v1/admin/sys-info/",
            "?",
            "/socket.io/?EIO=4",
            "/socket.io/?dtable_uuid=",
        ] {
            assert_eq!(ex(p), None, "{p}");
        }
    }

    #[test]
    fn near_misses() {
        let h31 = &HEX[..31];
        let h33 = format!("{HEX}0");
        for p in [
            format!("/api/v1/dtables/{h31}/"),
            format!("/api/v1/dtables/{h33}/"),
            format!("/api/v1/dtables/x{DASHED}/"),
            format!("/api/v1/dtables/{DASHED}x/"),
            format!("/api/v1/dtables/{DASHED}.json"),
            format!("/api/v1/dtables/{HEX}-/"),
            format!("/api/v1/dtables/{}/", DASHED.replace('-', "_")),
            "/api/v1/dtables/ff84e1a166e2-4a3b-9c1d-0123456789ab/".to_owned(),
            format!("/api/v1/dtables/g{}/", &HEX[1..]),
            format!("/socket.io/?other_uuid={DASHED}"),
            format!("/socket.io/?xdtable_uuid={DASHED}"),
            format!("/socket.io/?dtable_uuid={h31}"),
            format!("/socket.io/?dtable_uuid={DASHED}x"),
        ] {
            assert_eq!(ex(&p), None, "{p}");
        }
    }

    #[test]
    fn parse_rejects_misplaced_dashes() {
        assert!(BaseUuid::parse("ff84e1a1-66e24-a3b-9c1d-0123456789ab").is_none());
        assert!(BaseUuid::parse("ff84e1a1-66e2-4a3b-9c1d-0123456789ab").is_some());
    }
}
