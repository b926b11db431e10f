//! Secrets never appear in an answer, a log line or an error: the words that name
//! one, URLs without their user info and query values, and text with known secret
//! values replaced by [`REDACTED`].

/// What an API answer may show of a hook's value: `<redacted>`.
pub const REDACTED: &str = "<redacted>";

/// Words that mark a word (a command-line argument, a key in a log line) as naming
/// or carrying a secret.
const SECRET_MARKERS: [&str; 7] = [
    "token",
    "secret",
    "password",
    "passwd",
    "authorization",
    "bearer",
    "key",
];

/// Whether `word` names or carries a secret: it contains one of the markers (`token`,
/// `secret`, `password`, `passwd`, `authorization`, `bearer`, `key`), in any case.
/// [`REDACTED`] itself does not.
pub fn names_a_secret(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    word != REDACTED && SECRET_MARKERS.iter().any(|m| lower.contains(m))
}

/// An argv as answers, messages and logs show it: every argument that names a
/// secret ([`names_a_secret`]) is [`REDACTED`].
pub fn shown_argv(argv: &[String]) -> Vec<&str> {
    argv.iter()
        .map(|a| if names_a_secret(a) { REDACTED } else { a })
        .collect()
}

/// `url` without its user info, and with every query value replaced.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    let userinfo = if authority.contains('@') {
        format!("{REDACTED}@")
    } else {
        String::new()
    };
    let path = match path.split_once('?') {
        Some((p, q)) => {
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) => format!("{k}={REDACTED}"),
                    None => kv.to_owned(),
                })
                .collect();
            format!("{p}?{}", q.join("&"))
        }
        None => path.to_owned(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    format!("{scheme}{sep}{userinfo}{host}{path}")
}

/// The user info and query values of `url`.
pub fn url_secrets(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    let mut out = Vec::new();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        out.push(userinfo.to_owned());
        out.extend(userinfo.split(':').map(str::to_owned));
    }
    if let Some((_, q)) = rest.split_once('?') {
        out.extend(
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(_, v)| v.to_owned()),
        );
    }
    out
}

/// `text` with every one of `secrets` replaced by `<redacted>`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        if !s.is_empty() {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}
