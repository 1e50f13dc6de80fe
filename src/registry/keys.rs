//! API keys and webhook ids: made from the OS's randomness, and sealed at rest with AES-256-GCM under the main key,
//! so a copy of the database does not reveal them.

use super::store::{Audit, Store};
use super::{log, now_ms};
use crate::signature::SigningKey;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Random bytes behind each new `whsec_` key (the filter accepts 24 to 64).
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;
const SEALED_PREFIX: &str = "aes256gcm:";
const PLAIN_PREFIX: &str = "plain:";

fn random<const N: usize>() -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness from the OS: {e}"))?;
    Ok(bytes)
}

/// A fresh `whsec_` key.
pub fn new_api_key() -> Result<String, String> {
    Ok(SigningKey::format_key(&random::<KEY_BYTES>()?))
}

/// A fresh webhook id: 24 lowercase hex digits, the filter's id format.
pub fn new_webhook_id() -> Result<String, String> {
    Ok(random::<12>()?.iter().map(|b| format!("{b:02x}")).collect())
}

/// Seals keys for the database. Without a main key (`--insecure-plaintext-keys`, demos only) keys are stored as
/// they are, marked `plain:`. With a main key a `plain:` key is refused (anyone who can write a row could plant
/// a key of their own); `--seal-plaintext-keys` seals such keys once, at start, when leaving the demo mode.
pub struct Sealer {
    cipher: Option<Aes256Gcm>,
}

impl Sealer {
    /// The main key: base64 of exactly 32 bytes. The message never holds the key.
    pub fn from_main_key(encoded: &str) -> Result<Self, String> {
        let bytes = STANDARD.decode(encoded.trim()).map_err(|_| {
            "the main key must be base64 of 32 bytes (it is not valid base64)".to_string()
        })?;
        let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
            format!(
                "the main key must be base64 of 32 bytes (it decodes to {} bytes)",
                bytes.len()
            )
        })?;
        Ok(Sealer {
            cipher: Some(cipher),
        })
    }

    pub fn plaintext() -> Self {
        Sealer { cipher: None }
    }

    pub fn encrypts(&self) -> bool {
        self.cipher.is_some()
    }

    /// Seals `key` for the webhook `id`; the id is the associated data, so a sealed key copied onto another
    /// webhook's row does not open.
    pub fn seal(&self, id: &str, key: &str) -> Result<String, String> {
        let Some(cipher) = &self.cipher else {
            return Ok(format!("{PLAIN_PREFIX}{key}"));
        };
        let nonce = random::<NONCE_BYTES>()?;
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: key.as_bytes(),
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| "sealing a key failed".to_string())?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{SEALED_PREFIX}{}", STANDARD.encode(out)))
    }

    /// A stored `plain:` key sealed under the main key; None when `stored` is not in the clear or there is no
    /// main key.
    pub fn seal_plaintext(&self, id: &str, stored: &str) -> Option<Result<String, String>> {
        let key = stored.strip_prefix(PLAIN_PREFIX)?;
        self.cipher.as_ref()?;
        Some(self.seal(id, key))
    }

    pub fn open(&self, id: &str, stored: &str) -> Result<String, String> {
        if let Some(key) = stored.strip_prefix(PLAIN_PREFIX) {
            if self.cipher.is_some() {
                return Err(format!(
                    "webhook {id}: the stored key is in the clear, and a registry with a main key serves only \
                     encrypted keys (keys stored by a registry run with --insecure-plaintext-keys: start once \
                     with --seal-plaintext-keys to encrypt them)"
                ));
            }
            return Ok(key.to_string());
        }
        let sealed = stored
            .strip_prefix(SEALED_PREFIX)
            .ok_or_else(|| format!("webhook {id}: the stored key has an unknown format"))?;
        let Some(cipher) = &self.cipher else {
            return Err(format!(
                "webhook {id}: the key is encrypted and the registry runs without a main key"
            ));
        };
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|_| format!("webhook {id}: the stored key is not valid base64"))?;
        if bytes.len() <= NONCE_BYTES {
            return Err(format!("webhook {id}: the stored key is cut short"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: id.as_bytes(),
                },
            )
            .map_err(|_| {
                format!("webhook {id}: the stored key does not open with this main key")
            })?;
        String::from_utf8(plain).map_err(|_| format!("webhook {id}: the stored key is not text"))
    }
}

/// `--seal-plaintext-keys`: seals every key stored in the clear (current and previous) under the main key, each
/// webhook in one audited write, so the keys of a registry that ran with `--insecure-plaintext-keys` are served
/// again, and no longer readable in a copy of the database.
pub async fn seal_plaintext_keys(store: &Store, sealer: &Sealer) -> Result<(), String> {
    let failed = |e: sqlx::Error| format!("--seal-plaintext-keys: {e}");
    for (organisation, id) in store.with_plaintext_keys().await.map_err(failed)? {
        let Some(old) = store.get(&organisation, &id).await.map_err(failed)? else {
            continue;
        };
        let mut webhook = old.clone();
        if let Some(sealed) = sealer.seal_plaintext(&id, &old.key_sealed) {
            webhook.key_sealed = sealed?;
        }
        if let Some(previous) = old.previous_key_sealed.as_deref() {
            if let Some(sealed) = sealer.seal_plaintext(&id, previous) {
                webhook.previous_key_sealed = Some(sealed?);
            }
        }
        let audit = Audit {
            at_ms: now_ms(),
            actor: "registry",
            role: "registry",
            action: "seal-key",
            detail: "{}".into(),
        };
        if store
            .put(&webhook, Some(&old.key_sealed), audit)
            .await
            .map_err(failed)?
        {
            log(&format!(
                "--seal-plaintext-keys: sealed the plaintext key(s) of webhook {id} of organisation {organisation:?}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes

    #[test]
    fn keys_and_ids_have_the_filters_formats() {
        let key = new_api_key().unwrap();
        assert!(SigningKey::parse(&key).is_ok());
        let id = new_webhook_id().unwrap();
        assert_eq!(id.len(), 24);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(new_api_key().unwrap(), key);
    }

    #[test]
    fn sealed_keys_open_only_for_their_webhook_and_main_key() {
        let sealer = Sealer::from_main_key(MAIN).unwrap();
        let key = new_api_key().unwrap();
        let sealed = sealer.seal("a", &key).unwrap();
        assert!(!sealed.contains(key.trim_start_matches("whsec_")));
        assert_eq!(sealer.open("a", &sealed).unwrap(), key);
        assert!(sealer.open("b", &sealed).is_err());
        let other = Sealer::from_main_key("ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=").unwrap();
        assert!(other.open("a", &sealed).is_err());
        assert!(Sealer::plaintext().open("a", &sealed).is_err());
        // A key in the clear opens only without a main key; with one, it is sealed once on request.
        let plain = Sealer::plaintext().seal("a", &key).unwrap();
        assert_eq!(Sealer::plaintext().open("a", &plain).unwrap(), key);
        let refused = sealer.open("a", &plain).unwrap_err();
        assert!(refused.contains("in the clear") && !refused.contains(&key));
        let resealed = sealer.seal_plaintext("a", &plain).unwrap().unwrap();
        assert_eq!(sealer.open("a", &resealed).unwrap(), key);
        assert!(sealer.seal_plaintext("a", &sealed).is_none());
        assert!(Sealer::plaintext().seal_plaintext("a", &plain).is_none());
        // Two seals of one key differ (fresh nonce each time).
        assert_ne!(sealer.seal("a", &key).unwrap(), sealed);
    }

    #[test]
    fn bad_main_keys_are_refused_without_echoing_them() {
        let e = Sealer::from_main_key("c2hvcnQ=").err().unwrap();
        assert!(e.contains("decodes to 5 bytes") && !e.contains("c2hvcnQ"));
        assert!(Sealer::from_main_key("not base64!").is_err());
    }
}
