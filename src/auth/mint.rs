//! `automerge-relay token`: a new random secret and the token-file entry that accepts it.
//!
//! The entry carries only the secret's hash, so the token file can be read by more people (or
//! end up in a backup) without handing out access; the secret itself is shown once, on its own
//! line, and nowhere else. It is 32 bytes from the operating system's generator in base58:
//! letters and digits only, safe in a URL query and in a header as it is.

use super::tokens::{check_name, hash_hex};

/// Bytes of randomness in a secret (256 bits).
const SECRET_BYTES: usize = 32;

/// What `automerge-relay token --name NAME` prints, or why it could not make a secret.
pub fn token_printout(name: &str) -> Result<String, String> {
    check_name(name)?;
    let secret = new_secret()?;
    Ok(printout(name, &secret))
}

/// A new secret from the OS generator.
fn new_secret() -> Result<String, String> {
    let mut bytes = [0u8; SECRET_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| format!("the operating system's random generator failed: {e}"))?;
    Ok(bs58::encode(bytes).into_string())
}

fn printout(name: &str, secret: &str) -> String {
    // A TOML string (quoted and escaped) for any name.
    let name = toml::Value::String(name.to_owned());
    let hash = hash_hex(secret);
    format!(
        "The new secret (shown only this once: the relay keeps only its hash). Clients send it as\n\
         `Authorization: Bearer <secret>` or `?token=<secret>`:\n\
         \n\
         {secret}\n\
         \n\
         Add this entry to the --auth-tokens file, then reload the relay (SIGHUP):\n\
         \n\
         [[token]]\n\
         name = {name}\n\
         token = \"sha256:{hash}\"\n\
         grants = [ {{ ids = \"*\", access = \"write\" }} ]\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tokens::StaticTokens;
    use crate::auth::Access;

    /// The secret line and the token-file entry out of a printout.
    fn split(printout: &str) -> (&str, &str) {
        let mut lines = printout.lines();
        let secret = lines
            .by_ref()
            .skip_while(|l| !l.is_empty())
            .find(|l| !l.is_empty())
            .unwrap();
        let entry = &printout[printout.find("[[token]]").unwrap()..];
        (secret, entry)
    }

    #[test]
    fn the_printed_secret_verifies_against_its_own_entry() {
        let printout = token_printout("my-device").unwrap();
        let (secret, entry) = split(&printout);
        assert!(printout.contains("shown only this once"));
        let bytes = bs58::decode(secret).into_vec().unwrap();
        assert_eq!(bytes.len(), SECRET_BYTES);
        assert!(secret.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(entry.starts_with("[[token]]\nname = \"my-device\"\ntoken = \"sha256:"));
        assert!(entry.ends_with("grants = [ { ids = \"*\", access = \"write\" } ]\n"));
        assert!(!entry.contains(secret));

        let tokens = StaticTokens::parse(entry).unwrap();
        let p = tokens.verify(secret).unwrap();
        assert_eq!(p.name, "my-device");
        assert_eq!(p.access("any-doc"), Some(Access::Write));
        assert!(!p.is_server_admin());
        // Two runs, two secrets.
        let again = token_printout("my-device").unwrap();
        assert_ne!(split(&again).0, secret);
        assert!(tokens.verify(split(&again).0).is_err());
    }

    #[test]
    fn any_name_is_quoted_into_valid_toml_and_bad_names_are_refused() {
        let printout = token_printout("bob's \"work\" laptop \\ ü").unwrap();
        let (secret, entry) = split(&printout);
        let p = StaticTokens::parse(entry).unwrap().verify(secret).unwrap();
        assert_eq!(p.name, "bob's \"work\" laptop \\ ü");
        assert!(token_printout("").is_err());
        assert!(token_printout("two\nlines").is_err());
    }
}
