//! Finding the base_uuid in a request target, by hand: one pass, no allocation, no regex.

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

/// The base a request target (`path?query`) is about: the first path segment that is a
/// uuid, else the value of the `dtable_uuid` query parameter; `None` when neither is.
pub fn extract(path_and_query: &str) -> Option<BaseUuid> {
    let bytes = path_and_query.as_bytes();
    // One pass over the path: only segments of 32 or 36 bytes are looked at.
    let mut start = 0;
    let mut end = bytes.len();
    for (i, &c) in bytes.iter().enumerate() {
        if c == b'/' || c == b'?' {
            if let Some(u) = segment(&bytes[start..i]) {
                return Some(u);
            }
            if c == b'?' {
                end = i;
                break;
            }
            start = i + 1;
        }
    }
    if end == bytes.len() {
        return segment(&bytes[start..]);
    }
    let query = path_and_query.get(end + 1..)?;
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("dtable_uuid=") {
            return BaseUuid::parse(value);
        }
    }
    None
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
