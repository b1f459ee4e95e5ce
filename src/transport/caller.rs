//! Who is calling: the one credential check every interface goes through.
//!
//! A token comes as `Authorization: Bearer <token>` or, for clients that cannot set headers
//! (browsers' WebSocket and EventSource, automerge-repo's adapter), as `?token=<token>`. It is
//! checked before anything else happens — for live sockets and event streams before the
//! upgrade — and the grant for the document and action right after. The token itself is never
//! logged: refusals name only their reason.

use std::time::SystemTime;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use crate::auth::{Access, Principal, Refusal};
use crate::error::RelayError;
use crate::id::DocId;
use crate::state::AppState;

/// An authenticated caller (anonymous with every grant when the relay has no credentials).
pub struct Caller(pub Principal);

impl FromRequestParts<AppState> for Caller {
    type Rejection = RelayError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, RelayError> {
        let token = presented(&parts.headers, parts.uri.query());
        match state.auth.authenticate(token.as_deref()) {
            Ok(principal) => Ok(Caller(principal)),
            Err(refusal) => Err(unauthorized(refusal)),
        }
    }
}

impl Caller {
    /// Refuses (403) unless the caller may do `need` on document `id`.
    pub fn require(&self, id: &DocId, need: Access) -> Result<(), RelayError> {
        if self.0.may(id.as_str(), need) {
            return Ok(());
        }
        Err(forbidden(match need {
            Access::Read => "this token has no grant to read this document",
            Access::Write => "this token has no grant to write this document",
            Access::Admin => "this token has no admin grant for this document",
        }))
    }

    /// Refuses (403) unless the caller may use the server's `/_/` endpoints.
    pub fn require_server_admin(&self) -> Result<(), RelayError> {
        if self.0.is_server_admin() {
            Ok(())
        } else {
            Err(forbidden(
                "this endpoint needs a token with admin access on every id",
            ))
        }
    }

    /// When the credential expires, on Tokio's clock (live connections end then).
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        expires_at(&self.0)
    }
}

/// `exp` as an instant of Tokio's clock.
pub fn expires_at(principal: &Principal) -> Option<tokio::time::Instant> {
    let exp = principal.expires_at?;
    let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
    Some(tokio::time::Instant::now() + left)
}

/// Resolves when the token expires at `at`; never, for a token without expiry.
pub async fn expiry(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The presented token: the `Authorization: Bearer` header, else the `token` query parameter.
fn presented(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        // A header that is present but not a bearer token is a malformed credential.
        let text = value.to_str().unwrap_or_default().trim();
        let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
        return Some(if scheme.eq_ignore_ascii_case("bearer") {
            token.trim().to_owned()
        } else {
            // Never a valid token: the check refuses it as invalid, not missing.
            "\u{0}".to_owned()
        });
    }
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// 401 for a missing, malformed, unknown or expired token (counted by reason).
pub fn unauthorized(refusal: Refusal) -> RelayError {
    refusal.count();
    tracing::debug!(
        reason = refusal.reason(),
        "refused a request without a valid token"
    );
    RelayError::Unauthorized(match refusal {
        Refusal::Missing => {
            "a token is required: send `Authorization: Bearer <token>` or `?token=<token>`"
        }
        Refusal::Expired => "the token has expired; get a fresh one",
        Refusal::Invalid | Refusal::Forbidden => "the token is not valid",
    })
}

/// 403 for a valid token without the grant (counted as `forbidden`).
pub fn forbidden(message: &'static str) -> RelayError {
    Refusal::Forbidden.count();
    tracing::debug!("refused a request outside the token's grants");
    RelayError::Forbidden(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_header_wins_over_the_query_and_both_are_decoded() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h, Some("a=1&token=s%2Bx")), Some("s+x".into()));
        assert_eq!(presented(&h, Some("a=1")), None);
        assert_eq!(presented(&h, None), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer  abc "));
        assert_eq!(presented(&h, Some("token=q")), Some("abc".into()));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer abc"));
        assert_eq!(presented(&h, None), Some("abc".into()));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic dXNlcg=="));
        assert_eq!(
            presented(&h, None),
            Some("\u{0}".into()),
            "not a bearer token"
        );
    }
}
