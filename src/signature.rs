//! Standard Webhooks signing: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
//!
//! The secret is the base64-decoded part of a `whsec_` key, decoded once per webhook, and the HMAC
//! is keyed with it once: each key keeps the keyed state (the inner and outer SHA-256 states, at
//! most 120 bytes; the decoded secret took about 60 with its allocation), so a signature does not
//! hash the key's two padded blocks again.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::digest::core_api::CoreWrapper;
use hmac::digest::KeyInit;
use hmac::{Hmac, HmacCore, Mac};
use sha2::Sha256;
use std::fmt;

type HmacSha256 = Hmac<Sha256>;

pub const KEY_PREFIX: &str = "whsec_";
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;

/// A webhook's signing key. Never printed: `Debug` is redacted so a key cannot leak into logs.
#[derive(Clone)]
pub struct SigningKey {
    /// The HMAC keyed with the decoded secret, without the message buffer of a running HMAC: a
    /// proxy holds a key for every webhook of the registry in every VM.
    keyed: HmacCore<Sha256>,
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
        HmacCore::<Sha256>::new_from_slice(secret)
            .ok()
            .map(|keyed| SigningKey { keyed })
    }

    pub fn format_key(secret: &[u8]) -> String {
        format!("{KEY_PREFIX}{}", STANDARD.encode(secret))
    }

    fn mac(&self, msg_id: &str, timestamp: u64, body: &[u8]) -> HmacSha256 {
        let mut mac: HmacSha256 = CoreWrapper::from_core(self.keyed.clone());
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
    fn a_key_holds_its_keyed_state_in_at_most_120_bytes() {
        // Two SHA-256 states and their block counts (120 bytes on x86-64).
        assert!(std::mem::size_of::<SigningKey>() <= 120);
        // The same signature however many times the keyed state is reused.
        let key = SigningKey::parse(SPEC_KEY).unwrap();
        for _ in 0..3 {
            assert_eq!(key.sign(SPEC_ID, SPEC_TS, SPEC_BODY), SPEC_SIG);
        }
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
