//! Who is calling: a JWT (`sub`, `role`, `organisationId`, `exp`) signed with HS256 under a shared secret, or
//! RS256/ES256 by the SaaS's identity provider; and the proxies' bearer token for the registry feed.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Shortest HS256 secret accepted: RFC 7518 asks for a key at least as long as the hash.
pub const MIN_HS256_SECRET: usize = 32;
/// Clock skew allowed between the token's issuer and the registry.
const LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    SuperAdmin,
    OrganisationAdmin,
    Other(String),
}

impl Role {
    fn parse(role: &str) -> Self {
        match role {
            "super_admin" => Role::SuperAdmin,
            "organisation_admin" => Role::OrganisationAdmin,
            other => Role::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Role::SuperAdmin => "super_admin",
            Role::OrganisationAdmin => "organisation_admin",
            Role::Other(other) => other,
        }
    }
}

/// A caller with a valid token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub role: Role,
    pub organisation_id: String,
}

impl Caller {
    /// Super admins act on any organisation, organisation admins on their own, nobody else on any.
    pub fn may_manage(&self, organisation: &str) -> bool {
        match self.role {
            Role::SuperAdmin => true,
            Role::OrganisationAdmin => self.organisation_id == organisation,
            Role::Other(_) => false,
        }
    }
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_HS256_SECRET {
            return Err(format!(
                "the HS256 secret must be at least {MIN_HS256_SECRET} bytes (it has {})",
                secret.len()
            ));
        }
        Ok(Self::with(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
        ))
    }

    /// An RSA public key (RS256) or an EC P-256 public key (ES256), PEM.
    pub fn from_public_pem(pem: &[u8]) -> Result<Self, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::with(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::with(key, Algorithm::ES256));
        }
        Err("not an RSA or EC (P-256) public key in PEM".into())
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECONDS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_aud = false;
        validation.validate_nbf = true;
        Verifier { key, validation }
    }

    /// Also require these `aud` and `iss` claims, when given: present and equal (a token without them is refused).
    pub fn requiring(mut self, audience: Option<&str>, issuer: Option<&str>) -> Self {
        let mut required = vec!["exp", "sub"];
        if let Some(aud) = audience {
            self.validation.set_audience(&[aud]);
            self.validation.validate_aud = true;
            required.push("aud");
        }
        if let Some(iss) = issuer {
            self.validation.set_issuer(&[iss]);
            required.push("iss");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// Checks an `Authorization` header value. The error says why, without the token.
    pub fn caller(&self, authorization: Option<&[u8]>) -> Result<Caller, String> {
        let token = bearer(authorization)?;
        let data = jsonwebtoken::decode::<Value>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "the token has expired".into(),
                jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    "the token's signature is not valid".into()
                }
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                    "the token is signed with another algorithm".into()
                }
                jsonwebtoken::errors::ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the token has no {claim} claim")
                }
                _ => "the token is not valid".to_string(),
            },
        )?;
        let claim = |name: &str| match data.claims.get(name) {
            // The claims are stored in the audit table: a control character (a NUL Postgres cannot store) is
            // refused like any other malformed token.
            Some(Value::String(s)) if s.chars().any(char::is_control) => Err(format!(
                "the token's {name} claim holds a control character"
            )),
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(format!("the token has no {name} claim")),
        };
        Ok(Caller {
            sub: claim("sub")?,
            role: Role::parse(&claim("role")?),
            organisation_id: claim("organisationId")?,
        })
    }
}

/// The token of an `Authorization: Bearer …` header, read as bytes.
pub fn bearer(authorization: Option<&[u8]>) -> Result<&str, String> {
    let value = authorization.ok_or("an Authorization: Bearer token is required")?;
    let value = std::str::from_utf8(value).map_err(|_| "the Authorization header is not text")?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or("the Authorization header must be Bearer <token>")?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err("the Authorization header must be Bearer <token>".into());
    }
    Ok(token.trim())
}

/// The proxies' token, kept only as its SHA-256 and compared digest to digest, so the comparison's time tells
/// nothing about the token.
pub struct ProxyToken([u8; 32]);

impl ProxyToken {
    pub fn new(token: &str) -> Result<Self, String> {
        if token.trim().len() < 16 {
            return Err("the proxy token must be at least 16 characters".into());
        }
        Ok(ProxyToken(Sha256::digest(token.trim().as_bytes()).into()))
    }

    pub fn admits(&self, authorization: Option<&[u8]>) -> bool {
        bearer(authorization)
            .map(|t| {
                let digest: [u8; 32] = Sha256::digest(t.as_bytes()).into();
                digest
                    .iter()
                    .zip(self.0.iter())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
            })
            .unwrap_or(false)
    }
}

/// An HS256 token for demos and tests.
pub fn issue_hs256(
    secret: &[u8],
    sub: &str,
    role: &str,
    organisation_id: &str,
    expires_at: u64,
) -> Result<String, String> {
    if secret.len() < MIN_HS256_SECRET {
        return Err(format!(
            "the HS256 secret must be at least {MIN_HS256_SECRET} bytes (it has {})",
            secret.len()
        ));
    }
    let claims =
        json!({"sub": sub, "role": role, "organisationId": organisation_id, "exp": expires_at});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("signing the token failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[test]
    fn roles_and_organisations() {
        let v = Verifier::hs256(SECRET).unwrap();
        let token = issue_hs256(SECRET, "ann", "organisation_admin", "org1", now() + 60).unwrap();
        let caller = v.caller(Some(&header(&token))).unwrap();
        assert!(caller.may_manage("org1") && !caller.may_manage("org2"));
        let token = issue_hs256(SECRET, "sam", "super_admin", "org0", now() + 60).unwrap();
        let caller = v.caller(Some(&header(&token))).unwrap();
        assert!(caller.may_manage("org1") && caller.may_manage("org2"));
        let token = issue_hs256(SECRET, "val", "viewer", "org1", now() + 60).unwrap();
        assert!(!v.caller(Some(&header(&token))).unwrap().may_manage("org1"));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = Verifier::hs256(SECRET).unwrap();
        assert!(v.caller(None).is_err());
        assert!(v.caller(Some(b"Basic abc")).is_err());
        assert!(v.caller(Some(b"Bearer \xff\xfe")).is_err());
        let expired = issue_hs256(SECRET, "ann", "super_admin", "o", now() - 3600).unwrap();
        assert_eq!(
            v.caller(Some(&header(&expired))).unwrap_err(),
            "the token has expired"
        );
        let forged = issue_hs256(
            b"another-secret-another-secret-xx",
            "ann",
            "super_admin",
            "o",
            now() + 60,
        )
        .unwrap();
        assert!(v.caller(Some(&header(&forged))).is_err());
        assert!(Verifier::hs256(b"short").is_err());
    }

    #[test]
    fn proxy_token() {
        let t = ProxyToken::new("proxy-token-0123456789").unwrap();
        assert!(t.admits(Some(b"Bearer proxy-token-0123456789")));
        assert!(!t.admits(Some(b"Bearer proxy-token-0123456780")));
        assert!(!t.admits(None));
        assert!(ProxyToken::new("short").is_err());
    }
}
