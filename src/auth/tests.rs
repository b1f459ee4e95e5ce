//! `Auth` as the rest of the relay uses it: choosing the credential source, and reloading.

use std::io::Write;
use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::*;

const SECRET: &[u8] = b"an-hs256-test-key-of-at-least-32-bytes";

fn write(path: &Path, text: &str) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn entry(name: &str, token: &str) -> String {
    format!("[[token]]\nname = \"{name}\"\ntoken = \"{token}\"\ngrants = [ {{ ids = \"*\", access = \"read\" }} ]\n")
}

fn hs256(exp: SystemTime) -> String {
    let exp = exp
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({ "sub": "svc", "exp": exp });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

#[test]
fn without_credentials_everyone_is_an_anonymous_admin() {
    let auth = Auth::new(AuthSettings::default()).unwrap();
    assert!(auth.is_open());
    let p = auth.authenticate(None).unwrap();
    assert_eq!(p.name, "anonymous");
    assert!(p.is_server_admin());
    assert!(auth.reload().is_ok());
}

#[test]
fn a_missing_or_blank_token_is_missing_and_an_unknown_one_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    write(&file, &entry("a", "secret-a"));
    let auth = Auth::new(AuthSettings {
        tokens_file: Some(file),
        ..AuthSettings::default()
    })
    .unwrap();
    assert!(!auth.is_open());
    assert_eq!(auth.authenticate(None).err(), Some(Refusal::Missing));
    assert_eq!(auth.authenticate(Some("  ")).err(), Some(Refusal::Missing));
    assert_eq!(
        auth.authenticate(Some("nope")).err(),
        Some(Refusal::Invalid)
    );
    assert_eq!(auth.authenticate(Some(" secret-a ")).unwrap().name, "a");
}

#[test]
fn a_broken_reload_keeps_the_old_tokens_and_a_fixed_one_adds_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    write(&file, &entry("a", "secret-a"));
    let auth = Auth::new(AuthSettings {
        tokens_file: Some(file.clone()),
        ..AuthSettings::default()
    })
    .unwrap();
    assert!(auth.authenticate(Some("secret-b")).is_err());

    write(
        &file,
        &format!(
            "{}[[token]]\nname = \"b\"\ntoken = \"secret-b",
            entry("a", "secret-a")
        ),
    );
    let e = auth.reload().unwrap_err();
    assert!(e.contains("tokens.toml") && e.contains("line"), "{e}");
    assert!(!e.contains("secret-b"), "{e}");
    assert_eq!(auth.authenticate(Some("secret-a")).unwrap().name, "a");
    assert!(auth.authenticate(Some("secret-b")).is_err());

    std::fs::remove_file(&file).unwrap();
    assert!(auth.reload().unwrap_err().contains("cannot read"));
    assert_eq!(auth.authenticate(Some("secret-a")).unwrap().name, "a");

    write(
        &file,
        &format!("{}{}", entry("a", "secret-a"), entry("b", "secret-b")),
    );
    auth.reload().unwrap();
    assert_eq!(auth.authenticate(Some("secret-b")).unwrap().name, "b");
    assert_eq!(auth.authenticate(Some("secret-a")).unwrap().name, "a");

    write(&file, &entry("b", "secret-b"));
    auth.reload().unwrap();
    assert!(auth.authenticate(Some("secret-a")).is_err());
}

#[test]
fn a_bad_file_at_start_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.toml");
    write(
        &file,
        &format!("{}{}", entry("a", "same"), entry("b", "same")),
    );
    let e = match Auth::new(AuthSettings {
        tokens_file: Some(file),
        ..AuthSettings::default()
    }) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert!(
        e.contains("tokens.toml") && e.contains("same secret"),
        "{e}"
    );
    assert!(!e.contains("\"same\""), "{e}");
}

#[test]
fn jwt_shaped_tokens_go_to_the_jwt_keys_and_the_rest_to_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let secret = dir.path().join("jwt.key");
    std::fs::write(&secret, [SECRET, b"\n"].concat()).unwrap();
    // A plain secret that looks like a JWT: only reachable while no JWT key is configured.
    write(
        &tokens,
        &format!(
            "{}{}",
            entry("static", "plain-one"),
            entry("dotted", "aaa.bbb.ccc")
        ),
    );
    let only_tokens = Auth::new(AuthSettings {
        tokens_file: Some(tokens.clone()),
        ..AuthSettings::default()
    })
    .unwrap();
    assert_eq!(
        only_tokens.authenticate(Some("aaa.bbb.ccc")).unwrap().name,
        "dotted"
    );
    let jwt = hs256(SystemTime::now() + std::time::Duration::from_secs(60));
    assert_eq!(
        only_tokens.authenticate(Some(&jwt)).err(),
        Some(Refusal::Invalid)
    );

    let both = Auth::new(AuthSettings {
        tokens_file: Some(tokens),
        jwt_secret_file: Some(secret),
        ..AuthSettings::default()
    })
    .unwrap();
    let p = both.authenticate(Some(&jwt)).unwrap();
    assert_eq!(p.name, "svc");
    assert!(p.expires_at.is_some());
    assert_eq!(both.authenticate(Some("plain-one")).unwrap().name, "static");
    assert_eq!(
        both.authenticate(Some("aaa.bbb.ccc")).err(),
        Some(Refusal::Invalid)
    );
    let old = hs256(SystemTime::now() - std::time::Duration::from_secs(60));
    assert_eq!(both.authenticate(Some(&old)).err(), Some(Refusal::Expired));
}

#[test]
fn reload_rereads_the_jwt_key_too() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.key");
    std::fs::write(&secret, SECRET).unwrap();
    let auth = Auth::new(AuthSettings {
        jwt_secret_file: Some(secret.clone()),
        ..AuthSettings::default()
    })
    .unwrap();
    let jwt = hs256(SystemTime::now() + std::time::Duration::from_secs(60));
    assert!(auth.authenticate(Some(&jwt)).is_ok());
    std::fs::write(&secret, b"short").unwrap();
    assert!(auth.reload().is_err());
    assert!(auth.authenticate(Some(&jwt)).is_ok());
    std::fs::write(&secret, b"a-completely-different-key-of-32-bytes-or-more").unwrap();
    auth.reload().unwrap();
    assert_eq!(auth.authenticate(Some(&jwt)).err(), Some(Refusal::Invalid));
}
