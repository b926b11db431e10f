//! nginx's `map` as nginx evaluates it: exact keys first (ignoring case), then the
//! regexes in the order written (first match wins; `~*` ignores case), else `default`.
//! The regexes are PCRE in nginx and `regex-lite` here: the same for SeaTable's
//! documented rules; a regex `regex-lite` refuses is skipped with a warning.

use regex_lite::Regex;
use shardmap::nginx::NginxMap;

pub struct Predictor {
    uri_only: bool,
    default: String,
    exact: Vec<(String, String)>,
    regexes: Vec<(Regex, String)>,
}

impl Predictor {
    /// The predictor and what it could not reproduce.
    pub fn new(map: &NginxMap) -> (Predictor, Vec<String>) {
        let mut warnings = Vec::new();
        let mut regexes = Vec::new();
        for r in &map.regexes {
            let source = if r.case_insensitive {
                format!("(?i){}", r.regex)
            } else {
                r.regex.clone()
            };
            match Regex::new(&source) {
                Ok(re) => regexes.push((re, r.server.clone())),
                Err(e) => warnings.push(format!(
                    "line {}: `{}` cannot be evaluated here ({e}); requests without $upstream_addr skip it",
                    r.line, r.regex
                )),
            }
        }
        let uri_only = map.source == "$uri";
        if uri_only {
            warnings.push(
                "the map reads $uri: evaluated on the logged path without its query (not percent-decoded)"
                    .into(),
            );
        }
        let p = Predictor {
            uri_only,
            default: map.default.clone(),
            exact: map
                .exact
                .iter()
                .map(|(k, s)| (k.to_ascii_lowercase(), s.clone()))
                .collect(),
            regexes,
        };
        (p, warnings)
    }

    /// The server nginx's map picks for a request target.
    pub fn server(&self, target: &str) -> &str {
        let subject = if self.uri_only {
            target.split_once('?').map_or(target, |(p, _)| p)
        } else {
            target
        };
        if let Some((_, s)) = self
            .exact
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(subject))
        {
            return s;
        }
        self.regexes
            .iter()
            .find(|(re, _)| re.is_match(subject))
            .map_or(&self.default, |(_, s)| s)
    }
}
