//! HTTP header names, each written once, and header maps read as bytes.
//!
//! Every header value from outside is bytes: a client, an upstream or a receiver may send bytes
//! that are not UTF-8, and the SDK's string getters panic on them (a VM trap). The host hands a
//! whole header map over as one serialized buffer ([`parse_map`]); nothing here assumes UTF-8.

pub const METHOD: &str = ":method";
pub const PATH: &str = ":path";
pub const STATUS: &str = ":status";
pub const AUTHORITY: &str = ":authority";
pub const SCHEME: &str = ":scheme";
pub const CONTENT_TYPE: &str = "content-type";
pub const CONTENT_LENGTH: &str = "content-length";
pub const CONTENT_ENCODING: &str = "content-encoding";
pub const USER_AGENT: &str = "user-agent";
pub const RETRY_AFTER: &str = "retry-after";
pub const ETAG: &str = "etag";
pub const IF_NONE_MATCH: &str = "if-none-match";
pub const AUTHORIZATION: &str = "authorization";
/// Standard Webhooks headers of a delivery.
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// One header map as the host serialized it, borrowed: `(name, value)` pairs in order.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Parses the proxy-wasm header map serialization: a little-endian u32 count, then a (name
/// length, value length) pair of u32 per entry, then each name and value followed by a NUL.
/// Returns None for a buffer that does not hold what it claims (never panics, never reads out of
/// bounds); an empty buffer is an empty map.
pub fn parse_map(bytes: &[u8]) -> Option<Pairs<'_>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = read_u32(bytes, 0)? as usize;
    let mut at = count.checked_mul(8)?.checked_add(4)?;
    if at > bytes.len() {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    for n in 0..count {
        let name_len = read_u32(bytes, 4 + n * 8)? as usize;
        let value_len = read_u32(bytes, 8 + n * 8)? as usize;
        let name = terminated(bytes, at, name_len)?;
        at = at.checked_add(name_len)?.checked_add(1)?;
        let value = terminated(bytes, at, value_len)?;
        at = at.checked_add(value_len)?.checked_add(1)?;
        pairs.push((name, value));
    }
    Some(pairs)
}

/// `len` bytes at `at`, which the serialization follows with a NUL.
fn terminated(bytes: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    let end = at.checked_add(len)?;
    (bytes.get(end)? == &0).then_some(())?;
    bytes.get(at..end)
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let slice = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(slice.try_into().ok()?))
}

/// A header looked up in a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup<'a> {
    Absent,
    One(&'a [u8]),
    /// The header appears more than once. Proxies and upstreams disagree on which copy counts
    /// (first, last, joined), so a value taken from it can't be trusted.
    Repeated,
}

/// Looks `name` (lowercase) up, ASCII case-insensitively, noticing repeats.
pub fn lookup<'a>(pairs: &[(&'a [u8], &'a [u8])], name: &str) -> Lookup<'a> {
    let mut found = Lookup::Absent;
    for (n, v) in pairs {
        if n.eq_ignore_ascii_case(name.as_bytes()) {
            found = match found {
                Lookup::Absent => Lookup::One(v),
                _ => return Lookup::Repeated,
            };
        }
    }
    found
}

/// The first value of `name`, for headers where repeats do not matter (`:status`, `:path`).
pub fn first<'a>(pairs: &[(&'a [u8], &'a [u8])], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| *v)
}

/// An HTTP status code from its header value: exactly three ASCII digits.
pub fn parse_status(value: &[u8]) -> Option<u16> {
    match value {
        [a, b, c] if value.iter().all(u8::is_ascii_digit) => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// A short, printable preview of bytes from outside, for log lines: at most 16 bytes as hex.
pub fn hex_preview(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for b in bytes.iter().take(16) {
        let _ = write!(out, "{b:02x}");
    }
    if bytes.len() > 16 {
        out.push('…');
    }
    out
}

/// Serializes pairs the way the host does; the inverse of [`parse_map`] (for tests and doubles).
pub fn serialize_map(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_bytes_that_are_not_utf8() {
        let pairs: Vec<(&[u8], &[u8])> = vec![
            (b":status", b"200"),
            (b"x-organisation-id", b"caf\xe9"),
            (b"empty", b""),
        ];
        let bytes = serialize_map(&pairs);
        assert_eq!(parse_map(&bytes), Some(pairs));
    }

    #[test]
    fn malformed_maps_are_refused_not_trapped() {
        let good = serialize_map(&[(b"a", b"b")]);
        for cut in 1..good.len() {
            assert_eq!(parse_map(&good[..cut]), None, "cut at {cut}");
        }
        // A count that would overflow the offset arithmetic.
        assert_eq!(parse_map(&u32::MAX.to_le_bytes()), None);
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse_map(&huge), None);
        assert_eq!(parse_map(b""), Some(vec![]));
    }

    #[test]
    fn repeats_are_noticed_case_insensitively() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"X-Org", b"a"), (b"x-org", b"b")];
        assert_eq!(lookup(&pairs, "x-org"), Lookup::Repeated);
        assert_eq!(lookup(&pairs[..1], "x-org"), Lookup::One(b"a"));
        assert_eq!(lookup(&pairs, "other"), Lookup::Absent);
        assert_eq!(first(&pairs, "x-org"), Some(&b"a"[..]));
    }

    #[test]
    fn statuses_are_three_digits() {
        assert_eq!(parse_status(b"200"), Some(200));
        assert_eq!(parse_status(b"503"), Some(503));
        for bad in [&b""[..], b"20", b"2000", b"2x0", b"\xff\xff\xff", b" 200"] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn previews_are_short_hex() {
        assert_eq!(hex_preview(b"caf\xe9"), "636166e9");
        assert_eq!(hex_preview(&[0xab; 40]).chars().count(), 33);
    }
}
