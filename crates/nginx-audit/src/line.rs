//! One access-log line in nginx's `combined` format, optionally with `$upstream_addr`
//! appended as the last field, quoted or not:
//!
//! ```text
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" $upstream_addr
//! $remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent" "$upstream_addr"
//! ```
//!
//! `$upstream_addr` is `-` (no upstream chosen) or addresses (`10.0.0.4:5000`,
//! `[::1]:5000`, `unix:/path`) separated by `, ` (nginx tried the next server) or ` : `
//! (an internal redirect went to another upstream). Anything else is malformed.

use crate::time::Time;

/// What the last field says about the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamField<'a> {
    /// The line has no field after the user agent: plain `combined`.
    Absent,
    /// `-`: nginx chose no upstream (answered itself, or the client left first).
    Dash,
    /// One or more addresses, as logged (see [`addresses`]).
    Addrs(&'a str),
}

/// A parsed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLine<'a> {
    pub time: Time,
    /// The request target of `$request` (`$request_uri` as the client sent it).
    pub target: &'a str,
    pub status: u16,
    pub upstream: UpstreamField<'a>,
}

/// Why a line is not a log line of the accepted formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("no remote address, ident or user")]
    Head,
    #[error("no `[time]`, or a time not like 10/Oct/2000:13:55:36 -0700")]
    Time,
    #[error("no quoted `\"METHOD TARGET PROTOCOL\"` request")]
    Request,
    #[error("no status or body size")]
    Status,
    #[error("no quoted referer or user agent")]
    Quoted,
    #[error("the last field is not `-` or upstream addresses")]
    Upstream,
    #[error("not UTF-8, or longer than the line limit")]
    Bytes,
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> Result<LogLine<'_>, Malformed> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    // $remote_addr - $remote_user [
    let open = line.find(" [").ok_or(Malformed::Head)?;
    let mut head = line[..open].splitn(3, ' ');
    let (Some(addr), Some(_ident), Some(_user)) = (head.next(), head.next(), head.next()) else {
        return Err(Malformed::Head);
    };
    if addr.is_empty() {
        return Err(Malformed::Head);
    }
    let rest = &line[open + 2..];
    let close = rest.find(']').ok_or(Malformed::Time)?;
    let time = Time::parse_nginx(&rest[..close]).ok_or(Malformed::Time)?;
    let rest = rest[close + 1..]
        .strip_prefix(" \"")
        .ok_or(Malformed::Request)?;
    let (request, rest) = rest.split_once('"').ok_or(Malformed::Request)?;
    let mut parts = request.split(' ');
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(Malformed::Request);
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || target.is_empty()
        || parts.clone().count() > 1
    {
        return Err(Malformed::Request);
    }
    let rest = rest.strip_prefix(' ').ok_or(Malformed::Status)?;
    let (status, rest) = rest.split_once(' ').ok_or(Malformed::Status)?;
    let status = (status.len() == 3 && status.bytes().all(|b| b.is_ascii_digit()))
        .then(|| status.parse::<u16>().ok())
        .flatten()
        .ok_or(Malformed::Status)?;
    let (bytes, rest) = rest.split_once(' ').ok_or(Malformed::Status)?;
    if bytes.is_empty() || !bytes.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Malformed::Status);
    }
    let rest = quoted(rest).ok_or(Malformed::Quoted)?;
    let rest = rest.strip_prefix(' ').ok_or(Malformed::Quoted)?;
    let rest = quoted(rest).ok_or(Malformed::Quoted)?;
    let upstream = upstream_field(rest)?;
    Ok(LogLine {
        time,
        target,
        status,
        upstream,
    })
}

/// Skips one `"..."` field; nginx escapes `"` inside as `\x22`.
fn quoted(s: &str) -> Option<&str> {
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    Some(&s[end + 1..])
}

fn upstream_field(rest: &str) -> Result<UpstreamField<'_>, Malformed> {
    if rest.trim().is_empty() {
        return Ok(UpstreamField::Absent);
    }
    let v = rest.strip_prefix(' ').ok_or(Malformed::Upstream)?;
    let v = match v.strip_prefix('"') {
        Some(q) => q.strip_suffix('"').ok_or(Malformed::Upstream)?,
        None => v.trim_end(),
    };
    if v == "-" {
        return Ok(UpstreamField::Dash);
    }
    if v.is_empty() || addresses(v).any(|a| a.is_empty() || a.contains([' ', '"'])) {
        return Err(Malformed::Upstream);
    }
    Ok(UpstreamField::Addrs(v))
}

/// The addresses of an `$upstream_addr` value, in order (`, ` and ` : ` separate them).
pub fn addresses(v: &str) -> impl Iterator<Item = &str> {
    v.split(", ").flat_map(|p| p.split(" : ")).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMBINED: &str = r#"10.0.0.9 - - [01/Dec/2026:23:48:56 +0000] "GET /dtable-server/api/v1/dtables/a1b2c3d4-5e6f-4a0b-8c9d-0e1f2a3b4c5d/rows/?table_name=T HTTP/1.1" 200 512 "-" "Mozilla/5.0 (X11; Linux) \x22quoted\x22""#;

    #[test]
    fn combined_without_upstream() {
        let l = parse_line(COMBINED).unwrap();
        assert_eq!(
            l.target,
            "/dtable-server/api/v1/dtables/a1b2c3d4-5e6f-4a0b-8c9d-0e1f2a3b4c5d/rows/?table_name=T"
        );
        assert_eq!(l.status, 200);
        assert_eq!(l.upstream, UpstreamField::Absent);
        assert_eq!(l.time.to_string(), "2026-12-01T23:48:56+00:00");
        // A trailing space or CR is still plain combined.
        assert_eq!(
            parse_line(&format!("{COMBINED} \r")).unwrap().upstream,
            UpstreamField::Absent
        );
    }

    #[test]
    fn with_upstream_addr_quoted_or_not() {
        for tail in [" 10.0.0.4:5000", " \"10.0.0.4:5000\""] {
            let s = format!("{COMBINED}{tail}");
            let l = parse_line(&s).unwrap();
            assert_eq!(l.upstream, UpstreamField::Addrs("10.0.0.4:5000"), "{tail}");
        }
        let s = format!("{COMBINED} [::1]:5000");
        let l = parse_line(&s).unwrap();
        assert_eq!(l.upstream, UpstreamField::Addrs("[::1]:5000"));
        for (tail, want) in [
            (
                " \"[2001:db8::4]:5000, 10.0.0.5:5000\"",
                ["[2001:db8::4]:5000", "10.0.0.5:5000"],
            ),
            // Unquoted lists contain spaces too.
            (
                " 10.0.0.4:5000 : unix:/run/ds.sock",
                ["10.0.0.4:5000", "unix:/run/ds.sock"],
            ),
        ] {
            let s = format!("{COMBINED}{tail}");
            let l = parse_line(&s).unwrap();
            let UpstreamField::Addrs(v) = l.upstream else {
                panic!("{l:?}")
            };
            assert_eq!(addresses(v).collect::<Vec<_>>(), want, "{tail}");
        }
        for tail in [" -", " \"-\""] {
            assert_eq!(
                parse_line(&format!("{COMBINED}{tail}")).unwrap().upstream,
                UpstreamField::Dash
            );
        }
        // IPv6 client and a user name.
        let l = parse_line(r#"2001:db8::1 - alice [01/Dec/2026:23:48:56 -0130] "POST /x HTTP/2.0" 201 0 "-" "-" 127.0.0.1:80"#).unwrap();
        assert_eq!(l.target, "/x");
        assert_eq!(l.time.to_string(), "2026-12-01T23:48:56-01:30");
    }

    #[test]
    fn malformed() {
        let cases = [
            ("", Malformed::Head),
            ("garbage", Malformed::Head),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56] "GET / HTTP/1.1" 200 1 "-" "-""#,
                Malformed::Time,
            ),
            (
                r#"1.2.3.4 - - [41/Foo/2026:23:48:56 +0000] "GET / HTTP/1.1" 200 1 "-" "-""#,
                Malformed::Time,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "-" 400 0 "-" "-""#,
                Malformed::Request,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "\x16\x03\x01" 400 0 "-" "-""#,
                Malformed::Request,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "GET / HTTP/1.1" 2000 1 "-" "-""#,
                Malformed::Status,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "GET / HTTP/1.1" 200 1 "-""#,
                Malformed::Quoted,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "GET / HTTP/1.1" 200 1 "-" "-" "10.0.0.1:80"#,
                Malformed::Upstream,
            ),
            // Another field before $upstream_addr: not an accepted format.
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "GET / HTTP/1.1" 200 1 "-" "-" 0.012 10.0.0.1:80"#,
                Malformed::Upstream,
            ),
            (
                r#"1.2.3.4 - - [01/Dec/2026:23:48:56 +0000] "GET / HTTP/1.1" 200 1 "-" "-" "#,
                Malformed::Head,
            ),
        ];
        for (i, (line, want)) in cases.iter().enumerate() {
            if i == cases.len() - 1 {
                // A trailing space only: still plain combined.
                assert!(parse_line(line).is_ok(), "{line}");
                continue;
            }
            assert_eq!(parse_line(line), Err(*want), "{line}");
        }
    }
}
