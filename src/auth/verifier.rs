//! One load of every configured credential source, and which of them checks a presented token.
//!
//! A token shaped like a JWT (three base64url segments separated by dots) goes to the JWT keys
//! when any is configured; anything else, or any token when no JWT key is configured, is
//! matched against the static tokens. A token goes to one of them only, so a refusal is that
//! source's own (`Expired` only ever comes from a JWT). `automerge-relay token` secrets are
//! base58 and never look like a JWT.

use std::time::SystemTime;

use super::jwt::JwtKeys;
use super::tokens::StaticTokens;
use super::{AuthSettings, Principal, Refusal};

pub(super) struct Verifier {
    tokens: StaticTokens,
    jwt: Option<JwtKeys>,
}

impl Verifier {
    /// Reads every configured file; the first problem is the error.
    pub(super) fn load(settings: &AuthSettings) -> Result<Self, String> {
        let tokens = match &settings.tokens_file {
            Some(path) => StaticTokens::load(path)?,
            None => StaticTokens::none(),
        };
        let jwt = JwtKeys::load(settings)?;
        Ok(Self { tokens, jwt })
    }

    pub(super) fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, Refusal> {
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => jwt.verify(token, now),
            _ => self.tokens.verify(token),
        }
    }
}

/// Three base64url segments separated by dots; the signature may be empty (`alg: none`, refused
/// by the JWT check rather than looked up as a static token).
fn looks_like_jwt(token: &str) -> bool {
    let segments: Vec<&str> = token.split('.').collect();
    let base64url = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    matches!(segments.as_slice(), [header, claims, signature]
        if !header.is_empty() && !claims.is_empty()
            && base64url(header) && base64url(claims) && base64url(signature))
}
