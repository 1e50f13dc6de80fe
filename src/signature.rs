//! Standard Webhooks signing: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
//!
//! The secret is the base64-decoded part of a `whsec_` key, decoded once per webhook; the HMAC is
//! keyed with it for each signature (two SHA-256 blocks more than keeping the keyed state, which
//! would cost each webhook about 200 bytes in every VM).

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

pub const KEY_PREFIX: &str = "whsec_";
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// A webhook's signing key. Never printed: `Debug` is redacted so a key cannot leak into logs.
#[derive(Clone)]
pub struct SigningKey {
    /// The decoded secret. Not the keyed HMAC state: that is about 200 bytes, and a proxy holds a
    /// key for every webhook of the registry in every VM; keying it again costs two SHA-256
    /// blocks per signature.
    secret: Box<[u8]>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(redacted)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    MissingPrefix,
    NotBase64,
    BadLength(usize),
}

impl fmt::Display for KeyError {
    // The key itself is never part of the message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::MissingPrefix => write!(
                f,
                "must be whsec_ followed by base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (the whsec_ prefix is missing)"
            ),
            KeyError::NotBase64 => write!(
                f,
                "must be whsec_ followed by base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (the part after whsec_ is not valid base64)"
            ),
            KeyError::BadLength(n) => write!(
                f,
                "must be whsec_ followed by base64 of {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes (it decodes to {n} bytes)"
            ),
        }
    }
}

impl SigningKey {
    /// Parses a `whsec_…` key.
    pub fn parse(key: &str) -> Result<Self, KeyError> {
        let encoded = key
            .strip_prefix(KEY_PREFIX)
            .ok_or(KeyError::MissingPrefix)?;
        let secret = STANDARD.decode(encoded).map_err(|_| KeyError::NotBase64)?;
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&secret.len()) {
            return Err(KeyError::BadLength(secret.len()));
        }
        Self::from_secret(&secret).ok_or(KeyError::BadLength(secret.len()))
    }

    fn from_secret(secret: &[u8]) -> Option<Self> {
        HmacSha256::new_from_slice(secret).ok().map(|_| SigningKey {
            secret: secret.into(),
        })
    }

    pub fn format_key(secret: &[u8]) -> String {
        format!("{KEY_PREFIX}{}", STANDARD.encode(secret))
    }

    fn mac(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
        // HMAC takes a key of any length: this never falls back (from_secret checked it).
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| HmacSha256::new(&Default::default()));
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header value.
    pub fn sign(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> String {
        let tag = self.mac(msg_id, timestamp, body).finalize().into_bytes();
        // `v1,` and 44 base64 characters, in one allocation.
        let mut out = String::with_capacity(47);
        out.push_str("v1,");
        STANDARD.encode_string(tag, &mut out);
        out
    }

    /// Checks a `webhook-signature` header, which may hold several space-separated signatures.
    /// Comparison is constant-time.
    pub fn verify(&self, msg_id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        header.split_whitespace().any(|candidate| {
            let Some(encoded) = candidate.strip_prefix("v1,") else {
                return false;
            };
            let Ok(tag) = STANDARD.decode(encoded) else {
                return false;
            };
            self.mac(msg_id, timestamp, body).verify_slice(&tag).is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks specification's published example.
    const SPEC_KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: u64 = 1614265330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_specification_example() {
        let key = SigningKey::parse(SPEC_KEY).unwrap();
        assert_eq!(key.sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
    }

    #[test]
    fn verifies_own_signature_and_rejects_tampering() {
        let key = SigningKey::parse(SPEC_KEY).unwrap();
        assert!(key.verify(SPEC_ID, SPEC_TS, SPEC_BODY, SPEC_SIG));
        assert!(key.verify(SPEC_ID, SPEC_TS, SPEC_BODY, &format!("v1,AAAA {SPEC_SIG}")));
        assert!(!key.verify(SPEC_ID, SPEC_TS + 1, SPEC_BODY, SPEC_SIG));
        assert!(!key.verify(SPEC_ID, SPEC_TS, b"{}", SPEC_SIG));
        assert!(!key.verify("msg_other", SPEC_TS, SPEC_BODY, SPEC_SIG));
        assert!(!key.verify(SPEC_ID, SPEC_TS, SPEC_BODY, "v2,abc"));
        assert!(!key.verify(SPEC_ID, SPEC_TS, SPEC_BODY, ""));
    }

    #[test]
    fn rejects_malformed_keys() {
        assert_eq!(
            SigningKey::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            KeyError::MissingPrefix
        );
        assert_eq!(
            SigningKey::parse("whsec_!!!").unwrap_err(),
            KeyError::NotBase64
        );
        let short = SigningKey::format_key(&[7u8; 23]);
        assert_eq!(
            SigningKey::parse(&short).unwrap_err(),
            KeyError::BadLength(23)
        );
        let long = SigningKey::format_key(&[7u8; 65]);
        assert_eq!(
            SigningKey::parse(&long).unwrap_err(),
            KeyError::BadLength(65)
        );
        assert!(SigningKey::parse(&SigningKey::format_key(&[7u8; 24])).is_ok());
        assert!(SigningKey::parse(&SigningKey::format_key(&[7u8; 64])).is_ok());
    }

    #[test]
    fn errors_and_debug_never_show_the_key() {
        let key = SigningKey::parse(SPEC_KEY).unwrap();
        assert!(!format!("{key:?}").contains("MfKQ"));
        let err = SigningKey::parse("whsec_MfKQ9r8GKYqr!")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("MfKQ"));
    }
}
