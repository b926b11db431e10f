//! Bearer tokens: read from a request, compared in constant time.

use axum::http::{HeaderMap, header};

/// The bearer token a request carries (empty when none).
pub fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// `given == expected`, in a time that depends only on `expected`'s length (a token
/// cannot be guessed byte by byte from answer times).
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(!e);
    }
    diff == 0
}
