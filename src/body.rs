//! The response body of a candidate stream: a bounded copy, decoded and parsed at end of stream.

use flate2::read::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use serde_json::Value;
use std::borrow::Cow;
use std::io::Read;

/// The upstream's `content-encoding`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Unsupported(String),
}

impl Encoding {
    pub fn from_header(value: Option<&str>) -> Self {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Encoding::Identity,
            Some("gzip") | Some("x-gzip") => Encoding::Gzip,
            Some("deflate") => Encoding::Deflate,
            Some(other) => Encoding::Unsupported(other.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    /// Over `maxBodyBytes`, as received or once decompressed.
    TooLarge,
    /// A content-encoding we cannot decode, or a corrupt compressed body.
    Undecodable(String),
    NotJson(String),
}

/// A copy of the body, chunk by chunk, that gives up once it passes `limit` bytes.
#[derive(Debug)]
pub struct BodyBuffer {
    bytes: Vec<u8>,
    limit: usize,
    too_large: bool,
}

impl BodyBuffer {
    pub fn new(limit: usize) -> Self {
        BodyBuffer {
            bytes: Vec::new(),
            limit,
            too_large: false,
        }
    }

    /// Appends a chunk; returns false once the body is over the limit (the copy is then freed).
    pub fn push(&mut self, chunk: &[u8]) -> bool {
        if self.too_large {
            return false;
        }
        if self.bytes.len() + chunk.len() > self.limit {
            self.too_large = true;
            self.bytes = Vec::new();
            return false;
        }
        self.bytes.extend_from_slice(chunk);
        true
    }

    pub fn is_too_large(&self) -> bool {
        self.too_large
    }

    /// The body with its content-encoding undone.
    pub fn decode(&self, encoding: &Encoding) -> Result<Cow<'_, [u8]>, BodyError> {
        if self.too_large {
            return Err(BodyError::TooLarge);
        }
        match encoding {
            Encoding::Identity => Ok(Cow::Borrowed(&self.bytes)),
            Encoding::Gzip => {
                inflate(MultiGzDecoder::new(&self.bytes[..]), self.limit, "gzip").map(Cow::Owned)
            }
            Encoding::Deflate => {
                // "deflate" is zlib-wrapped by the RFC, raw deflate by some servers.
                inflate(ZlibDecoder::new(&self.bytes[..]), self.limit, "deflate")
                    .or_else(|_| {
                        inflate(DeflateDecoder::new(&self.bytes[..]), self.limit, "deflate")
                    })
                    .map(Cow::Owned)
            }
            Encoding::Unsupported(name) => Err(BodyError::Undecodable(format!(
                "unsupported content-encoding {name:?}"
            ))),
        }
    }

    /// Decodes and parses the body as a JSON tree.
    pub fn parse(&self, encoding: &Encoding) -> Result<Value, BodyError> {
        serde_json::from_slice(&self.decode(encoding)?)
            .map_err(|e| BodyError::NotJson(e.to_string()))
    }
}

/// Decompresses at most `limit` bytes, so a compression bomb costs no more than a large body.
fn inflate(reader: impl Read, limit: usize, name: &str) -> Result<Vec<u8>, BodyError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| BodyError::Undecodable(format!("corrupt {name} body: {e}")))?;
    if out.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn chunks_accumulate_until_the_limit() {
        let mut b = BodyBuffer::new(10);
        assert!(b.push(b"{\"a\":"));
        assert!(b.push(b"1}"));
        assert_eq!(
            b.parse(&Encoding::Identity).unwrap(),
            serde_json::json!({"a": 1})
        );
        assert!(!b.push(b"12345"));
        assert!(b.is_too_large());
        assert!(!b.push(b"x"));
        assert_eq!(b.parse(&Encoding::Identity), Err(BodyError::TooLarge));
    }

    #[test]
    fn decodes_gzip_and_deflate() {
        let json = br#"{"status":"completed"}"#;
        let mut b = BodyBuffer::new(1000);
        b.push(&gzip(json));
        assert_eq!(b.parse(&Encoding::Gzip).unwrap()["status"], "completed");
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(json).unwrap();
        let mut b = BodyBuffer::new(1000);
        b.push(&z.finish().unwrap());
        assert_eq!(b.parse(&Encoding::Deflate).unwrap()["status"], "completed");
    }

    #[test]
    fn a_compression_bomb_is_too_large() {
        let bomb = gzip(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 4096);
        let mut b = BodyBuffer::new(64 * 1024);
        assert!(b.push(&bomb));
        assert_eq!(b.parse(&Encoding::Gzip), Err(BodyError::TooLarge));
    }

    #[test]
    fn bad_bodies_are_reported() {
        let mut b = BodyBuffer::new(100);
        b.push(b"{not json");
        assert!(matches!(
            b.parse(&Encoding::Identity),
            Err(BodyError::NotJson(_))
        ));
        assert!(matches!(
            b.parse(&Encoding::Gzip),
            Err(BodyError::Undecodable(_))
        ));
        assert!(matches!(
            b.parse(&Encoding::from_header(Some("br"))),
            Err(BodyError::Undecodable(_))
        ));
    }

    #[test]
    fn encodings_from_headers() {
        assert_eq!(Encoding::from_header(None), Encoding::Identity);
        assert_eq!(Encoding::from_header(Some(" GZIP ")), Encoding::Gzip);
        assert_eq!(Encoding::from_header(Some("x-gzip")), Encoding::Gzip);
        assert_eq!(
            Encoding::from_header(Some("gzip, br")),
            Encoding::Unsupported("gzip, br".into())
        );
    }
}
