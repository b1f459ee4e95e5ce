//! Static tokens: the `--auth-tokens` file and matching a presented secret against it.
//!
//! Every entry is kept as the SHA-256 of its secret, whether the file gives the hash
//! (`token = "sha256:<64 hex>"`, so the file itself holds no usable secret) or the secret. A
//! presented secret is hashed once and compared with every entry in constant time, without
//! stopping at a match, so timing tells nothing about which entry (if any) it was close to.
//! Because only hashes are compared, presenting the text of a `sha256:` line hashes to something
//! else and is refused.
//!
//! Load errors name the file, the line and the problem, and never quote the file's text: a
//! parse error near a secret must not put the secret into a log line.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use toml::Spanned;

use super::{Grant, Principal, Refusal};

/// The prefix of a token given as its hash.
const HASH_PREFIX: &str = "sha256:";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: Spanned<String>,
    token: Spanned<String>,
    grants: Vec<Grant>,
}

/// One usable entry: no secret, only its hash.
struct Entry {
    name: String,
    hash: [u8; 32],
    grants: Vec<Grant>,
}

/// The static tokens of one load of the file (none when no file is configured).
pub(super) struct StaticTokens {
    entries: Vec<Entry>,
}

impl StaticTokens {
    /// No tokens: every secret is refused.
    pub(super) fn none() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// Reads and checks the token file.
    pub(super) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Parses the file's text; the error says where and what, without quoting the text.
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let file: TokenFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| at(text, s.start)).unwrap_or_default();
            format!("{at}{}", e.message().trim_end())
        })?;
        let mut entries: Vec<Entry> = Vec::with_capacity(file.token.len());
        // Where each name and each secret first appeared (byte offsets), for the error.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut secrets: HashMap<[u8; 32], (usize, String)> = HashMap::new();
        for raw in file.token {
            let name_at = raw.name.span().start;
            let token_at = raw.token.span().start;
            let name = raw.name.into_inner();
            check_name(&name).map_err(|e| format!("{}{e}", at(text, name_at)))?;
            let hash = hash_of(raw.token.get_ref())
                .map_err(|e| format!("{}entry {name:?}: {e}", at(text, token_at)))?;
            if let Some(&first) = names.get(&name) {
                return Err(format!(
                    "{}two entries are named {name:?} (the first on line {})",
                    at(text, name_at),
                    line(text, first)
                ));
            }
            if let Some((first, other)) = secrets.get(&hash) {
                return Err(format!(
                    "{}entry {name:?} has the same secret as entry {other:?} (line {})",
                    at(text, token_at),
                    line(text, *first)
                ));
            }
            names.insert(name.clone(), name_at);
            secrets.insert(hash, (token_at, name.clone()));
            entries.push(Entry {
                name,
                hash,
                grants: raw.grants,
            });
        }
        Ok(Self { entries })
    }

    /// The principal whose secret `presented` is, or `Invalid`.
    pub(super) fn verify(&self, presented: &str) -> Result<Principal, Refusal> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every entry is compared; the match (at most one: secrets are unique) is selected
        // without a branch.
        let mut found = u64::MAX;
        for (i, entry) in self.entries.iter().enumerate() {
            let index = u64::try_from(i).unwrap_or(u64::MAX);
            found.conditional_assign(&index, digest.ct_eq(&entry.hash));
        }
        usize::try_from(found)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|entry| Principal {
                name: entry.name.clone(),
                grants: entry.grants.clone(),
                expires_at: None,
            })
            .ok_or(Refusal::Invalid)
    }
}

/// A name goes into logs and metric labels: it must be there, and be one printable line.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("a token's name must not be empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "the name {name:?} has a control character (names appear in logs)"
        ));
    }
    Ok(())
}

/// The hash an entry's `token` stands for; errors never quote the value.
fn hash_of(token: &str) -> Result<[u8; 32], String> {
    // Any case: `SHA256:<hex>` read as a plain secret would let the hash text itself in.
    let split = token.split_at_checked(HASH_PREFIX.len());
    if let Some((_, hex_part)) = split.filter(|(p, _)| p.eq_ignore_ascii_case(HASH_PREFIX)) {
        let mut hash = [0u8; 32];
        return match hex::decode_to_slice(hex_part, &mut hash) {
            Ok(()) => Ok(hash),
            Err(_) => Err(format!(
                "a {HASH_PREFIX} token must be followed by exactly 64 hex digits \
                 (the SHA-256 of the secret); this one has {} characters after the prefix",
                hex_part.chars().count()
            )),
        };
    }
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if token.trim() != token {
        // Presented tokens are trimmed, so this one could never match.
        return Err("the token starts or ends with whitespace".into());
    }
    Ok(Sha256::digest(token.as_bytes()).into())
}

/// The hex SHA-256 of a secret: what follows `sha256:` in the token file.
pub(super) fn hash_hex(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The 1-based line of byte `offset` in `text`.
fn line(text: &str, offset: usize) -> usize {
    let before = text.get(..offset.min(text.len())).unwrap_or("");
    before.matches('\n').count() + 1
}

/// `line L, column C: ` for byte `offset` of `text`.
fn at(text: &str, offset: usize) -> String {
    let before = text.get(..offset.min(text.len())).unwrap_or("");
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {}, column {column}: ", line(text, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Access, IdPattern};

    /// The SHA-256 of "test", the example the spec's `sha256:9f86d08…` line starts with.
    const TEST_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn tokens(text: &str) -> StaticTokens {
        match StaticTokens::parse(text) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn error(text: &str) -> String {
        match StaticTokens::parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        }
    }

    const TWO: &str = r#"
[[token]]
name = "alice-laptop"
token = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
grants = [ { ids = "alice-*", access = "write" }, { ids = "team-board", access = "read" } ]

[[token]]
name = "ops"
token = "plain-secret-for-ops"
grants = [ { ids = "*", access = "admin" } ]
"#;

    #[test]
    fn hashed_and_plain_secrets_are_accepted() {
        assert_eq!(hash_hex("test"), TEST_HASH);
        let t = tokens(TWO);
        let alice = t.verify("test").unwrap();
        assert_eq!(alice.name, "alice-laptop");
        assert_eq!(alice.expires_at, None);
        assert_eq!(alice.access("alice-notes"), Some(Access::Write));
        assert_eq!(alice.access("team-board"), Some(Access::Read));
        assert_eq!(alice.access("bob"), None);
        let ops = t.verify("plain-secret-for-ops").unwrap();
        assert_eq!(ops.name, "ops");
        assert!(ops.is_server_admin());
    }

    #[test]
    fn unknown_secrets_and_the_hash_text_are_refused() {
        let t = tokens(TWO);
        for wrong in [
            "tes",
            "test ",
            "TEST",
            "plain-secret-for-op",
            TEST_HASH,
            &format!("sha256:{TEST_HASH}"),
            &format!("SHA256:{TEST_HASH}"),
        ] {
            assert_eq!(t.verify(wrong).err(), Some(Refusal::Invalid), "{wrong:?}");
        }
        // The hash text hashes to something else.
        assert_ne!(hash_hex(&format!("sha256:{TEST_HASH}")), TEST_HASH);
    }

    #[test]
    fn the_prefix_is_read_in_any_case_so_its_text_never_becomes_a_plain_secret() {
        let upper = TWO.replace("token = \"sha256:", "token = \"SHA256:");
        let t = tokens(&upper);
        assert_eq!(t.verify("test").unwrap().name, "alice-laptop");
        assert!(t.verify(&format!("SHA256:{TEST_HASH}")).is_err());
    }

    #[test]
    fn every_entry_is_found_not_only_the_first() {
        let mut text = String::new();
        for i in 0..20 {
            text.push_str(&format!(
                "[[token]]\nname = \"n{i}\"\ntoken = \"secret-{i}\"\ngrants = []\n"
            ));
        }
        let t = tokens(&text);
        for i in 0..20 {
            assert_eq!(
                t.verify(&format!("secret-{i}")).unwrap().name,
                format!("n{i}")
            );
        }
        assert!(t.verify("secret-20").is_err());
    }

    #[test]
    fn an_empty_file_lets_nobody_in() {
        for text in ["", "# nothing yet\n", "token = []\n"] {
            let t = tokens(text);
            assert_eq!(t.verify("test").err(), Some(Refusal::Invalid));
        }
        assert!(StaticTokens::none().verify("anything").is_err());
    }

    #[test]
    fn duplicate_names_are_an_error() {
        let text = r#"
[[token]]
name = "a"
token = "first-s3cret"
grants = []
[[token]]
name = "a"
token = "second-s3cret"
grants = []
"#;
        let e = error(text);
        assert!(
            e.contains("line 7") && e.contains("named \"a\"") && e.contains("line 3"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn duplicate_secrets_are_an_error_even_when_one_is_hashed() {
        let text = format!(
            "[[token]]\nname = \"a\"\ntoken = \"test\"\ngrants = []\n\
             [[token]]\nname = \"b\"\ntoken = \"sha256:{TEST_HASH}\"\ngrants = []\n"
        );
        let e = error(&text);
        assert!(
            e.contains("line 7") && e.contains("same secret as entry \"a\""),
            "{e}"
        );
        assert!(!e.contains("\"test\"") && !e.contains(TEST_HASH), "{e}");
    }

    #[test]
    fn bad_toml_names_the_line_and_never_quotes_the_file() {
        let text = "[[token]]\nname = \"a\"\ntoken = \"hunter2-super-secret\ngrants = []\n";
        let e = error(text);
        assert!(e.contains("line 3"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn unknown_and_missing_fields_are_errors() {
        let unknown = "[[token]]\nname = \"a\"\ntoken = \"s\"\ngrants = []\nexpires = 3\n";
        assert!(error(unknown).contains("unknown field `expires`"));
        let top = "[[tokens]]\nname = \"a\"\n";
        assert!(error(top).contains("unknown field `tokens`"));
        for (missing, text) in [
            ("name", "[[token]]\ntoken = \"s\"\ngrants = []\n"),
            ("token", "[[token]]\nname = \"a\"\ngrants = []\n"),
            ("grants", "[[token]]\nname = \"a\"\ntoken = \"s\"\n"),
        ] {
            let e = error(text);
            assert!(e.contains(&format!("missing field `{missing}`")), "{e}");
            assert!(e.starts_with("line 1"), "{e}");
        }
        let bad_grant = "[[token]]\nname = \"a\"\ntoken = \"s\"\n\
                         grants = [ { ids = \"*\", access = \"owner\" } ]\n";
        assert!(error(bad_grant).contains("line 4"));
    }

    #[test]
    fn malformed_hashes_are_errors_that_do_not_quote_them() {
        for bad in [
            "sha256:",
            "sha256:9f86d08",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0g",
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0800",
            "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0",
        ] {
            let text = format!("[[token]]\nname = \"a\"\ntoken = \"{bad}\"\ngrants = []\n");
            let e = error(&text);
            assert!(e.contains("line 3") && e.contains("64 hex digits"), "{e}");
            assert!(!e.contains("9f86d08"), "{e}");
        }
    }

    #[test]
    fn bad_patterns_names_and_secrets_are_errors() {
        let pattern = "[[token]]\nname = \"a\"\ntoken = \"s\"\n\
                       grants = [ { ids = \"a*b\", access = \"read\" } ]\n";
        let e = error(pattern);
        assert!(
            e.contains("line 4") && e.contains("only a trailing *"),
            "{e}"
        );
        for (text, want) in [
            ("name = \"\"\ntoken = \"s\"", "must not be empty"),
            ("name = \"a\\nb\"\ntoken = \"s\"", "control character"),
            ("name = \"a\"\ntoken = \"\"", "empty"),
            ("name = \"a\"\ntoken = \" s\"", "whitespace"),
        ] {
            let e = error(&format!("[[token]]\n{text}\ngrants = []\n"));
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn grants_keep_their_patterns() {
        let t = tokens(TWO);
        let alice = t.verify("test").unwrap();
        assert_eq!(alice.grants[0].ids, IdPattern::Prefix("alice-".into()));
        assert_eq!(alice.grants[1].ids, IdPattern::Exact("team-board".into()));
    }
}
