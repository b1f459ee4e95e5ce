//! One load of every configured credential source, and which of them checks a presented token.
//!
//! (For now only the static tokens; JWTs come next.)

use std::time::SystemTime;

use super::tokens::StaticTokens;
use super::{AuthSettings, Principal, Refusal};

pub(super) struct Verifier {
    tokens: StaticTokens,
}

impl Verifier {
    /// Reads every configured file; the first problem is the error.
    pub(super) fn load(settings: &AuthSettings) -> Result<Self, String> {
        let tokens = match &settings.tokens_file {
            Some(path) => StaticTokens::load(path)?,
            None => StaticTokens::none(),
        };
        Ok(Self { tokens })
    }

    pub(super) fn verify(&self, token: &str, _now: SystemTime) -> Result<Principal, Refusal> {
        self.tokens.verify(token)
    }
}
