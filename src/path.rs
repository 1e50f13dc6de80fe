//! The canonical form of a request path, so that rule matching does not depend on how a client
//! spells a path or on the proxy's own normalisation settings.
//!
//! From the raw `:path` bytes:
//! 1. the query and fragment (from the first `?` or `#`) are dropped, before anything else, so
//!    that a query's bytes never matter;
//! 2. the rest must be UTF-8;
//! 3. in each `/`-separated segment, `;` and what follows (path parameters, e.g. `;jsessionid=…`)
//!    are dropped;
//! 4. percent-encodings of unreserved characters (RFC 3986 §2.3: `A-Z a-z 0-9 - . _ ~`, hex
//!    digits in either case) are decoded; other percent-encodings stay, with uppercase hex
//!    (RFC 3986 §6.2.2.1). An encoded `/` or `\` (`%2F`, `%5C`) inside a segment is refused:
//!    upstreams disagree on whether it separates segments (Envoy's edge guide treats it as
//!    suspicious), so no rule matches such a path and it is counted;
//! 5. empty segments (`//`, a trailing `/`) are dropped and dot segments removed (RFC 3986
//!    §5.2.4; a `..` at the root stays at the root).
//!
//! The result is `/` or `/seg/…/seg` with no empty segment. A path already in that form is
//! borrowed, not copied: the hot path allocates nothing.

use std::borrow::Cow;

/// Why a request path has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// Not UTF-8 (before the query).
    NotUtf8,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C` inside a segment.
    EscapedSlash,
}

impl BadPath {
    /// The reason as it appears in metric names and log lines.
    pub fn reason(self) -> &'static str {
        match self {
            BadPath::NotUtf8 => "not_utf8",
            BadPath::BadEscape => "bad_escape",
            BadPath::EscapedSlash => "escaped_slash",
        }
    }
}

/// The part of a raw `:path` before its query or fragment.
pub fn without_query(raw: &[u8]) -> &[u8] {
    match raw.iter().position(|b| matches!(b, b'?' | b'#')) {
        Some(end) => &raw[..end],
        None => raw,
    }
}

/// The canonical form of a raw `:path` (see the module's documentation). A path that does not
/// start with `/` (`*`, an authority form) is returned as it is: no rule matches it.
pub fn canonical(raw: &[u8]) -> Result<Cow<'_, str>, BadPath> {
    let path = std::str::from_utf8(without_query(raw)).map_err(|_| BadPath::NotUtf8)?;
    if !path.starts_with('/') || is_canonical(path) {
        return Ok(Cow::Borrowed(path));
    }
    let mut segments: Vec<Cow<'_, str>> = Vec::new();
    for raw_segment in path.split('/') {
        let segment = canonical_segment(raw_segment)?;
        match segment.as_ref() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// Whether `path` (starting with `/`) is already canonical: no `%`, `;`, `//`, `/.`, and no
/// trailing `/` unless it is the root. Checked on bytes, in one pass.
fn is_canonical(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut previous = 0u8;
    for &b in bytes {
        match b {
            b'%' | b';' => return false,
            b'/' | b'.' if previous == b'/' => return false,
            _ => {}
        }
        previous = b;
    }
    bytes.len() == 1 || previous != b'/'
}

/// One segment in canonical form: path parameters dropped, unreserved characters decoded, other
/// escapes with uppercase hex. Dot segments are left to the caller.
pub fn canonical_segment(raw: &str) -> Result<Cow<'_, str>, BadPath> {
    let segment = raw.split(';').next().unwrap_or_default();
    if !segment.contains('%') {
        return Ok(Cow::Borrowed(segment));
    }
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest
            .as_bytes()
            .get(at + 1..at + 3)
            .ok_or(BadPath::BadEscape)?;
        let (Some(high), Some(low)) = (hex_value(escape[0]), hex_value(escape[1])) else {
            return Err(BadPath::BadEscape);
        };
        let byte = high << 4 | low;
        if byte == b'/' || byte == b'\\' {
            return Err(BadPath::EscapedSlash);
        }
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            out.push('%');
            out.push(char::from(escape[0].to_ascii_uppercase()));
            out.push(char::from(escape[1].to_ascii_uppercase()));
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// RFC 3986 §2.3.
pub fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|v| u8::try_from(v).ok())
}

#[cfg(test)]
mod tests;
