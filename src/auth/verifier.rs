//! Checking one presented secret against the configured credentials.
//!
//! (Interim: static tokens only, plain secrets; hashed secrets, JWTs and constant-time
//! comparison come next.)

use std::time::SystemTime;

use serde::Deserialize;

use super::{AuthSettings, Grant, Principal, Refusal};

#[derive(Deserialize)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Deserialize)]
struct TokenEntry {
    name: String,
    token: String,
    grants: Vec<Grant>,
}

pub(super) struct Verifier {
    tokens: Vec<TokenEntry>,
}

impl Verifier {
    pub(super) fn load(settings: &AuthSettings) -> Result<Self, String> {
        let mut tokens = Vec::new();
        if let Some(path) = &settings.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let file: TokenFile =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            tokens = file.token;
        }
        Ok(Self { tokens })
    }

    pub(super) fn verify(&self, token: &str, _now: SystemTime) -> Result<Principal, Refusal> {
        self.tokens
            .iter()
            .find(|t| t.token == token)
            .map(|t| Principal {
                name: t.name.clone(),
                grants: t.grants.clone(),
                expires_at: None,
            })
            .ok_or(Refusal::Invalid)
    }
}
