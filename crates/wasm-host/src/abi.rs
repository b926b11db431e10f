//! The proxy-wasm ABI v0.2.1 constants and the header map encoding.

/// A status returned by a host function to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The item does not exist.
    NotFound = 1,
    /// An argument is invalid (unknown enum value, wrong context, ...).
    BadArgument = 2,
    /// A value could not be serialized.
    SerializationFailure = 3,
    /// A value could not be parsed.
    ParseFailure = 4,
    /// A pointer/size pair lies outside the guest's memory.
    InvalidMemoryAccess = 6,
    /// The item exists but holds nothing.
    Empty = 7,
    /// Compare-and-swap failed.
    CasMismatch = 8,
    /// The host failed.
    InternalFailure = 10,
    /// The host does not implement this function.
    Unimplemented = 12,
}

/// The `errno` a WASI function returns when this host does not implement it.
pub(crate) const WASI_ENOSYS: u32 = 52;
/// The WASI `errno` for a bad file descriptor.
pub(crate) const WASI_EBADF: u32 = 8;
/// The WASI `errno` for an invalid argument.
pub(crate) const WASI_EINVAL: u32 = 28;
/// The WASI `errno` for a memory access outside the guest's memory.
pub(crate) const WASI_EFAULT: u32 = 21;

/// What a filter tells the host to do with the stream after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Pass the headers (or data) on to the next filter.
    Continue,
    /// Stop iteration until the filter resumes the stream or replies.
    Pause,
    /// Any other value the ABI allows (e.g. `ContinueAndEndStream = 2`).
    Other(u32),
}

impl From<u32> for Action {
    fn from(value: u32) -> Self {
        match value {
            0 => Self::Continue,
            1 => Self::Pause,
            other => Self::Other(other),
        }
    }
}

/// A log level of `proxy_log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// `Trace = 0`.
    Trace,
    /// `Debug = 1`.
    Debug,
    /// `Info = 2`.
    Info,
    /// `Warn = 3`.
    Warn,
    /// `Error = 4`.
    Error,
    /// `Critical = 5`; the Rust SDK logs panics at this level.
    Critical,
}

impl LogLevel {
    pub(crate) fn from_abi(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Trace,
            1 => Self::Debug,
            2 => Self::Info,
            3 => Self::Warn,
            4 => Self::Error,
            5 => Self::Critical,
            _ => return None,
        })
    }
}

/// The kind of a metric defined by `proxy_define_metric`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// `Counter = 0`: only grows.
    Counter,
    /// `Gauge = 1`: set or moved either way.
    Gauge,
    /// `Histogram = 2`: a series of recorded values.
    Histogram,
}

impl MetricKind {
    pub(crate) fn from_abi(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::Counter,
            1 => Self::Gauge,
            2 => Self::Histogram,
            _ => return None,
        })
    }
}

/// The header maps of an HTTP stream (ABI `MapType` 0 to 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MapType {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
    ResponseTrailers = 3,
}

impl MapType {
    pub(crate) fn from_abi(value: u32) -> Option<Self> {
        Some(match value {
            0 => Self::RequestHeaders,
            1 => Self::RequestTrailers,
            2 => Self::ResponseHeaders,
            3 => Self::ResponseTrailers,
            _ => return None,
        })
    }
}

/// ABI `BufferType::VmConfiguration`.
pub(crate) const BUFFER_VM_CONFIGURATION: u32 = 6;
/// ABI `BufferType::PluginConfiguration`.
pub(crate) const BUFFER_PLUGIN_CONFIGURATION: u32 = 7;

/// Encodes header pairs as the ABI specifies: a little-endian `u32` count; a
/// `u32` key length and a `u32` value length per pair; then per pair the key
/// bytes, a NUL, the value bytes, a NUL.
pub fn encode_header_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let data: usize = pairs
        .iter()
        .map(|(k, v)| k.as_ref().len() + v.as_ref().len() + 2)
        .sum();
    let mut out = Vec::with_capacity(4 + 8 * pairs.len() + data);
    out.extend_from_slice(&len_u32(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&len_u32(k.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&len_u32(v.as_ref().len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// Decodes the encoding of [`encode_header_map`]; `None` if `bytes` is
/// truncated, has trailing bytes or lacks a NUL terminator.
pub fn decode_header_map(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = usize::try_from(read_u32(bytes, 0)?).ok()?;
    let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
    if data > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for i in 0..count {
        let key_len = usize::try_from(read_u32(bytes, 4 + 8 * i)?).ok()?;
        let value_len = usize::try_from(read_u32(bytes, 8 + 8 * i)?).ok()?;
        let key = nul_terminated(bytes, data, key_len)?;
        data += key_len + 1;
        let value = nul_terminated(bytes, data, value_len)?;
        data += value_len + 1;
        pairs.push((key.to_vec(), value.to_vec()));
    }
    (data == bytes.len()).then_some(pairs)
}

/// The `len` bytes at `start`, which must be followed by a NUL.
fn nul_terminated(bytes: &[u8], start: usize, len: usize) -> Option<&[u8]> {
    let end = start.checked_add(len)?;
    match bytes.get(end) {
        Some(0) => bytes.get(start..end),
        _ => None,
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let raw = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(raw.try_into().ok()?))
}

/// Lengths in a wasm32 guest fit in a `u32`; larger ones cannot be written.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_abi() {
        let bytes = encode_header_map(&[("ab", "c"), ("", "")]);
        let expected: Vec<u8> = [
            &2u32.to_le_bytes()[..],
            &2u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            &0u32.to_le_bytes(),
            b"ab\0c\0\0\0",
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn round_trip() {
        let pairs = [
            (":path", "/dtable-server/api/v1/dtables/ü/"),
            ("x-empty", ""),
            ("", "empty key"),
            ("x-emoji", "🦀 ✓"),
        ];
        let decoded = decode_header_map(&encode_header_map(&pairs)).unwrap();
        let expected: Vec<(Vec<u8>, Vec<u8>)> = pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(decoded, expected);
        assert_eq!(
            decode_header_map(&encode_header_map::<&str, &str>(&[])),
            Some(vec![])
        );
        assert_eq!(decode_header_map(b""), Some(vec![]));
    }

    #[test]
    fn malformed_input_is_refused() {
        let good = encode_header_map(&[("k", "v")]);
        assert!(decode_header_map(&good[..good.len() - 1]).is_none());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_header_map(&trailing).is_none());
        let mut no_nul = good.clone();
        let at = no_nul.len() - 1;
        no_nul[at] = b'x';
        assert!(decode_header_map(&no_nul).is_none());
        assert!(decode_header_map(&u32::MAX.to_le_bytes()).is_none());
    }
}
