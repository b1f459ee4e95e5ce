//! Access control: who presents which credential, and what its grants allow.
//!
//! Credentials are static tokens from `--auth-tokens` (stored as SHA-256 hashes or plain,
//! compared in constant time: `tokens.rs`) or signed JWTs (`--auth-jwt-secret-file` for HS256,
//! `--auth-jwt-public-key` for EdDSA/ES256: `jwt.rs`); `verifier.rs` loads them together and
//! picks which one checks a token, `mint.rs` makes new static tokens for
//! `automerge-relay token`. Either kind carries grants (`grants.rs`). With no
//! credentials configured every caller is anonymous with admin on every id (the server refuses
//! that on a non-loopback address unless `--allow-anonymous`). `SIGHUP` reloads; a bad file keeps
//! the previous configuration.
//!
//! Secrets never reach a log line or a metric label: a principal carries only the token's
//! name (static tokens) or its `sub` (JWTs).

mod grants;
mod jwt;
mod mint;
mod tokens;
mod verifier;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

pub use grants::{access_for, is_server_admin, Access, Grant, IdPattern};
pub use mint::token_printout;
use verifier::Verifier;

/// Where credentials come from (from the command line).
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub tokens_file: Option<PathBuf>,
    pub jwt_secret_file: Option<PathBuf>,
    pub jwt_public_key: Option<PathBuf>,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub jwt_audience: Vec<String>,
}

impl AuthSettings {
    /// True when some credential source is configured.
    pub fn any(&self) -> bool {
        self.tokens_file.is_some()
            || self.jwt_secret_file.is_some()
            || self.jwt_public_key.is_some()
    }
}

/// Who is calling, and what they may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name or the JWT's `sub`, for logs; never the secret.
    pub name: String,
    pub grants: Vec<Grant>,
    /// When the credential stops being valid (JWT `exp`); live connections close then.
    pub expires_at: Option<SystemTime>,
}

impl Principal {
    /// The caller of a relay without credentials: everything is allowed.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            grants: vec![Grant {
                ids: IdPattern::Any,
                access: Access::Admin,
            }],
            expires_at: None,
        }
    }

    /// The widest access on document `id`.
    pub fn access(&self, id: &str) -> Option<Access> {
        access_for(&self.grants, id)
    }

    /// Whether the principal may do `need` on document `id`.
    pub fn may(&self, id: &str, need: Access) -> bool {
        self.access(id).is_some_and(|a| a >= need)
    }

    /// Whether the principal may use the server's `/_/` endpoints.
    pub fn is_server_admin(&self) -> bool {
        is_server_admin(&self.grants)
    }
}

/// Why a request was refused; the `reason` label of `relay_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token presented.
    Missing,
    /// Malformed, unknown, badly signed, wrong audience, not yet valid.
    Invalid,
    /// Past its `exp`.
    Expired,
    /// A valid token without a grant for this id or action.
    Forbidden,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Expired => "expired",
            Refusal::Forbidden => "forbidden",
        }
    }

    /// Counts the refusal in `/_/metrics`.
    pub fn count(self) {
        metrics::counter!(crate::metrics::AUTH_FAILURES, "reason" => self.reason()).increment(1);
    }
}

/// The relay's credentials, reloadable.
pub struct Auth {
    settings: AuthSettings,
    /// `None`: no credentials configured, every caller is anonymous.
    verifier: RwLock<Option<Arc<Verifier>>>,
}

impl Auth {
    /// Loads every configured credential source; an error names the file and the problem.
    pub fn new(settings: AuthSettings) -> Result<Self, String> {
        let verifier = if settings.any() {
            Some(Arc::new(Verifier::load(&settings)?))
        } else {
            None
        };
        Ok(Self {
            settings,
            verifier: RwLock::new(verifier),
        })
    }

    /// No credentials: everyone is anonymous (admin).
    pub fn is_open(&self) -> bool {
        !self.settings.any()
    }

    /// Reloads the token file and keys; on error the previous configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        if !self.settings.any() {
            return Ok(());
        }
        let fresh = Arc::new(Verifier::load(&self.settings)?);
        if let Ok(mut v) = self.verifier.write() {
            *v = Some(fresh);
        }
        Ok(())
    }

    /// Checks a presented token (from `Authorization: Bearer` or `?token=`).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Principal, Refusal> {
        let verifier = match self.verifier.read() {
            Ok(v) => v.clone(),
            Err(_) => return Err(Refusal::Invalid),
        };
        let Some(verifier) = verifier else {
            return Ok(Principal::anonymous());
        };
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let Some(token) = token else {
            return Err(Refusal::Missing);
        };
        verifier.verify(token, SystemTime::now())
    }
}

#[cfg(test)]
mod tests;
