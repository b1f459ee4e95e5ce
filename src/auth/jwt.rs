//! Signed tokens (JWTs), for apps whose backend mints credentials without talking to the relay.
//!
//! The keys: an HS256 shared secret (`--auth-jwt-secret-file`, the file's bytes less one
//! trailing newline) and/or one PEM public key (`--auth-jwt-public-key`), Ed25519 for EdDSA or
//! P-256 for ES256, told apart by the key itself. Each key accepts exactly its one algorithm, so
//! `alg: none` (which `jsonwebtoken` does not even parse), an HS256 token checked against a
//! public key, or any other algorithm is refused.
//!
//! `jsonwebtoken` checks the signature, the algorithm, that `exp` is there and, when audiences
//! are configured, `aud`. The times (`exp`, `nbf`, with 5 s of clock skew) are checked here
//! against the caller's `now`, so an expired token is told apart from a bad one (`Expired` vs
//! `Invalid`) and tests do not depend on the clock.
//!
//! Nothing here derives `Debug`: `jsonwebtoken::DecodingKey`'s would print an HMAC secret.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::{AuthSettings, Grant, Principal, Refusal};

/// The clock skew allowed on `exp` and `nbf`.
const LEEWAY: Duration = Duration::from_secs(5);

/// Shortest HS256 key accepted: RFC 7518 §3.2 requires at least the hash's 256 bits, and a
/// shorter one can be guessed offline from any token seen.
const MIN_SECRET_LEN: usize = 32;

/// `SubjectPublicKeyInfo` DER of an Ed25519 key, up to the 32 key bytes.
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// `SubjectPublicKeyInfo` DER of an uncompressed P-256 key, up to the 64 coordinate bytes.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00, 0x04,
];

/// The OID of elliptic-curve public keys (1.2.840.10045.2.1), to name other curves in errors.
const EC_PUBLIC_KEY_OID: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// The claims the relay reads; any others are ignored.
#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    grants: Option<Vec<Grant>>,
}

/// One key and the one algorithm it verifies.
struct Key {
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

/// The configured JWT keys.
pub(super) struct JwtKeys {
    keys: Vec<Key>,
}

impl JwtKeys {
    /// Loads the configured keys; `None` when no JWT key is configured.
    pub(super) fn load(settings: &AuthSettings) -> Result<Option<Self>, String> {
        let mut keys = Vec::new();
        if let Some(path) = &settings.jwt_secret_file {
            let secret = read_secret(path)?;
            keys.push(Key::new(
                Algorithm::HS256,
                DecodingKey::from_secret(&secret),
                &settings.jwt_audience,
            ));
        }
        if let Some(path) = &settings.jwt_public_key {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read the JWT public key {}: {e}", path.display()))?;
            let (algorithm, key) =
                public_key(&pem).map_err(|e| format!("JWT public key {}: {e}", path.display()))?;
            keys.push(Key::new(algorithm, key, &settings.jwt_audience));
        }
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    /// Verifies a JWT at time `now`.
    pub(super) fn verify(&self, token: &str, now: SystemTime) -> Result<Principal, Refusal> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Invalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.algorithm == header.alg)
            .ok_or(Refusal::Invalid)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|_| Refusal::Invalid)?
            .claims;
        let expires_at = at(claims.exp)?;
        if now >= expires_at.checked_add(LEEWAY).ok_or(Refusal::Invalid)? {
            return Err(Refusal::Expired);
        }
        if let Some(nbf) = claims.nbf {
            let not_before = at(nbf)?;
            if now
                .checked_add(LEEWAY)
                .is_some_and(|skewed| skewed < not_before)
            {
                return Err(Refusal::Invalid);
            }
        }
        Ok(Principal {
            name: claims
                .sub
                .filter(|s| !s.is_empty())
                .map_or_else(|| "jwt".to_owned(), |s| one_line(&s)),
            grants: claims.grants.unwrap_or_default(),
            expires_at: Some(expires_at),
        })
    }
}

impl Key {
    fn new(algorithm: Algorithm, key: DecodingKey, audience: &[String]) -> Self {
        let mut validation = Validation::new(algorithm);
        // Times are checked in `verify`, against its `now`; `exp` must still be present.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        let mut required = vec!["exp"];
        if audience.is_empty() {
            // Not configured: any `aud` (or none) is accepted.
            validation.validate_aud = false;
        } else {
            validation.set_audience(audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Self {
            algorithm,
            key,
            validation,
        }
    }
}

/// The name goes into log lines: control characters (a newline that would fake a log line)
/// are written as escapes, everything else as it is.
fn one_line(sub: &str) -> String {
    let mut name = String::with_capacity(sub.len());
    for c in sub.chars() {
        if c.is_control() {
            name.extend(c.escape_default());
        } else {
            name.push(c);
        }
    }
    name
}

/// A NumericDate (seconds since the epoch) as a time; one past what `SystemTime` holds is
/// `Invalid`.
fn at(seconds: u64) -> Result<SystemTime, Refusal> {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .ok_or(Refusal::Invalid)
}

/// The HS256 key: the file's bytes without one trailing `\n` or `\r\n`.
fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    let mut secret = std::fs::read(path)
        .map_err(|e| format!("cannot read the JWT secret file {}: {e}", path.display()))?;
    if secret.ends_with(b"\r\n") {
        secret.truncate(secret.len() - 2);
    } else if secret.ends_with(b"\n") {
        secret.truncate(secret.len() - 1);
    }
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "JWT secret file {}: the key has {} bytes; HS256 needs at least {MIN_SECRET_LEN} \
             (e.g. `head -c 32 /dev/urandom | base64 > {}`)",
            path.display(),
            secret.len(),
            path.display()
        ));
    }
    Ok(secret)
}

/// The algorithm and key of a PEM public key: Ed25519 (EdDSA) or P-256 (ES256).
fn public_key(pem_text: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let blocks = pem::parse_many(pem_text).map_err(|e| format!("not a PEM file: {e}"))?;
    let [block] = blocks.as_slice() else {
        return Err(format!(
            "expected one PEM block (BEGIN PUBLIC KEY), found {}",
            blocks.len()
        ));
    };
    if block.tag().contains("PRIVATE KEY") {
        return Err("this is a private key; give the relay only the public key \
                    (`openssl pkey -in KEY -pubout`)"
            .into());
    }
    if block.tag() != "PUBLIC KEY" {
        return Err(format!(
            "expected BEGIN PUBLIC KEY, found BEGIN {}",
            block.tag()
        ));
    }
    let der = block.contents();
    let invalid = |e: jsonwebtoken::errors::Error| format!("unusable key: {e}");
    if der.len() == ED25519_SPKI_PREFIX.len() + 32 && der.starts_with(ED25519_SPKI_PREFIX) {
        return Ok((
            Algorithm::EdDSA,
            DecodingKey::from_ed_pem(pem_text).map_err(invalid)?,
        ));
    }
    if der.len() == P256_SPKI_PREFIX.len() + 64 && der.starts_with(P256_SPKI_PREFIX) {
        return Ok((
            Algorithm::ES256,
            DecodingKey::from_ec_pem(pem_text).map_err(invalid)?,
        ));
    }
    if der
        .windows(EC_PUBLIC_KEY_OID.len())
        .any(|w| w == EC_PUBLIC_KEY_OID)
    {
        return Err("an elliptic-curve key on a curve other than P-256 \
                    (or a compressed point); only P-256 (ES256) is accepted"
            .into());
    }
    Err("neither an Ed25519 (EdDSA) nor a P-256 (ES256) public key".into())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::{json, Value};

    use super::*;
    use crate::auth::Access;

    const SECRET: &[u8] = b"an-hs256-test-key-of-at-least-32-bytes";
    /// A fixed "now": the checks use the time they are given, not the clock.
    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(NOW)
    }

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/auth/testdata")
            .join(name)
    }

    fn secret_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        file
    }

    struct Setup {
        keys: JwtKeys,
        _secret: Option<tempfile::NamedTempFile>,
    }

    fn load(hs256: bool, public_key: Option<&str>, audience: &[&str]) -> Setup {
        let secret = hs256.then(|| secret_file(SECRET));
        let settings = AuthSettings {
            tokens_file: None,
            jwt_secret_file: secret.as_ref().map(|f| f.path().to_owned()),
            jwt_public_key: public_key.map(testdata),
            jwt_audience: audience.iter().map(|s| s.to_string()).collect(),
        };
        match JwtKeys::load(&settings) {
            Ok(Some(keys)) => Setup {
                keys,
                _secret: secret,
            },
            Ok(None) => panic!("no keys"),
            Err(e) => panic!("{e}"),
        }
    }

    fn load_error(settings: &AuthSettings) -> String {
        match JwtKeys::load(settings) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    fn hs256(claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    fn signed(alg: Algorithm, private_key: &str, claims: &Value) -> String {
        let pem = std::fs::read(testdata(private_key)).unwrap();
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
            other => panic!("{other:?}"),
        };
        jsonwebtoken::encode(&Header::new(alg), claims, &key).unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn valid_claims() -> Value {
        json!({
            "sub": "alice",
            "exp": NOW + 600,
            "grants": [ { "ids": "alice-*", "access": "write" }, { "ids": "board", "access": "read" } ],
        })
    }

    #[test]
    fn a_valid_hs256_token_gives_its_sub_grants_and_exp() {
        let s = load(true, None, &[]);
        let p = s.keys.verify(&hs256(&valid_claims()), now()).unwrap();
        assert_eq!(p.name, "alice");
        assert_eq!(p.access("alice-notes"), Some(Access::Write));
        assert_eq!(p.access("board"), Some(Access::Read));
        assert_eq!(p.access("bob"), None);
        assert!(!p.is_server_admin());
        assert_eq!(
            p.expires_at,
            Some(UNIX_EPOCH + Duration::from_secs(NOW + 600))
        );
    }

    #[test]
    fn without_sub_or_grants_the_name_is_jwt_and_nothing_is_allowed() {
        let s = load(true, None, &[]);
        let p = s
            .keys
            .verify(&hs256(&json!({ "exp": NOW + 60 })), now())
            .unwrap();
        assert_eq!(p.name, "jwt");
        assert!(p.grants.is_empty());
        let empty_sub = hs256(&json!({ "exp": NOW + 60, "sub": "", "grants": null }));
        assert_eq!(s.keys.verify(&empty_sub, now()).unwrap().name, "jwt");
        let odd_sub = hs256(&json!({ "exp": NOW + 60, "sub": "o'brien ü\nfake log line" }));
        assert_eq!(
            s.keys.verify(&odd_sub, now()).unwrap().name,
            "o'brien ü\\nfake log line"
        );
    }

    #[test]
    fn expiry_allows_five_seconds_of_skew() {
        let s = load(true, None, &[]);
        let at = |exp: u64| {
            s.keys
                .verify(&hs256(&json!({ "exp": exp })), now())
                .map(|_| ())
        };
        assert_eq!(at(NOW - 3600), Err(Refusal::Expired));
        assert_eq!(at(NOW - 5), Err(Refusal::Expired));
        assert_eq!(at(NOW - 4), Ok(()));
        assert_eq!(at(NOW), Ok(()));
        assert_eq!(at(u64::MAX), Err(Refusal::Invalid));
    }

    #[test]
    fn a_future_nbf_is_invalid_beyond_five_seconds() {
        let s = load(true, None, &[]);
        let at = |nbf: u64| {
            let claims = json!({ "exp": NOW + 600, "nbf": nbf });
            s.keys.verify(&hs256(&claims), now()).map(|_| ())
        };
        assert_eq!(at(NOW + 60), Err(Refusal::Invalid));
        assert_eq!(at(NOW + 6), Err(Refusal::Invalid));
        assert_eq!(at(NOW + 5), Ok(()));
        assert_eq!(at(NOW - 60), Ok(()));
    }

    #[test]
    fn exp_is_required_and_must_be_a_number() {
        let s = load(true, None, &[]);
        for claims in [
            json!({ "sub": "alice" }),
            json!({ "exp": null }),
            json!({ "exp": "1800000600" }),
            json!({ "exp": -1 }),
        ] {
            let token = hs256(&claims);
            assert_eq!(
                s.keys.verify(&token, now()).err(),
                Some(Refusal::Invalid),
                "{claims}"
            );
        }
    }

    #[test]
    fn the_audience_is_checked_when_configured() {
        let s = load(true, None, &["relay", "relay-staging"]);
        let with = |aud: Value| {
            let claims = json!({ "exp": NOW + 60, "aud": aud });
            s.keys.verify(&hs256(&claims), now()).map(|_| ())
        };
        assert_eq!(with(json!("relay")), Ok(()));
        assert_eq!(with(json!(["other", "relay-staging"])), Ok(()));
        assert_eq!(with(json!("other")), Err(Refusal::Invalid));
        assert_eq!(with(json!(["other"])), Err(Refusal::Invalid));
        let missing = hs256(&json!({ "exp": NOW + 60 }));
        assert_eq!(s.keys.verify(&missing, now()).err(), Some(Refusal::Invalid));
        // Not configured: any aud passes.
        let open = load(true, None, &[]);
        let any = hs256(&json!({ "exp": NOW + 60, "aud": "whatever" }));
        assert!(open.keys.verify(&any, now()).is_ok());
    }

    #[test]
    fn a_bad_signature_is_invalid() {
        let s = load(true, None, &[]);
        let token = hs256(&valid_claims());
        let (message, signature) = token.rsplit_once('.').unwrap();
        let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
        sig[0] ^= 1;
        let tampered_sig = format!("{message}.{}", URL_SAFE_NO_PAD.encode(&sig));
        assert_eq!(
            s.keys.verify(&tampered_sig, now()).err(),
            Some(Refusal::Invalid)
        );
        // Claims swapped for wider ones under the original signature.
        let header = token.split('.').next().unwrap();
        let wider = json!({ "exp": NOW + 600, "grants": [ { "ids": "*", "access": "admin" } ] });
        let tampered_claims = format!("{header}.{}.{signature}", b64(&wider));
        assert_eq!(
            s.keys.verify(&tampered_claims, now()).err(),
            Some(Refusal::Invalid)
        );
        // Signed with another key.
        let other = EncodingKey::from_secret(b"another-hs256-key-of-at-least-32-bytes!");
        let forged =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &valid_claims(), &other).unwrap();
        assert_eq!(s.keys.verify(&forged, now()).err(), Some(Refusal::Invalid));
        for junk in ["a.b.c", "..", "x", ""] {
            assert_eq!(s.keys.verify(junk, now()).err(), Some(Refusal::Invalid));
        }
    }

    #[test]
    fn alg_none_is_refused() {
        let s = load(true, Some("ed25519.pub.pem"), &[]);
        let claims = b64(&valid_claims());
        for header in [
            json!({ "alg": "none", "typ": "JWT" }),
            json!({ "alg": "None" }),
            json!({ "typ": "JWT" }),
        ] {
            for signature in ["", "AAAA"] {
                let token = format!("{}.{claims}.{signature}", b64(&header));
                assert_eq!(s.keys.verify(&token, now()).err(), Some(Refusal::Invalid));
            }
        }
    }

    #[test]
    fn only_the_configured_algorithms_are_accepted() {
        let ed_only = load(false, Some("ed25519.pub.pem"), &[]);
        // HS256 signed with the public key's bytes as the HMAC secret: the classic confusion.
        let pem = std::fs::read(testdata("ed25519.pub.pem")).unwrap();
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &valid_claims(),
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        assert_eq!(
            ed_only.keys.verify(&confused, now()).err(),
            Some(Refusal::Invalid)
        );
        let hs = hs256(&valid_claims());
        assert_eq!(
            ed_only.keys.verify(&hs, now()).err(),
            Some(Refusal::Invalid)
        );
        let es = signed(Algorithm::ES256, "p256.key.pem", &valid_claims());
        assert_eq!(
            ed_only.keys.verify(&es, now()).err(),
            Some(Refusal::Invalid)
        );
        // HS384 with the right secret is still another algorithm.
        let hs_only = load(true, None, &[]);
        let hs384 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS384),
            &valid_claims(),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            hs_only.keys.verify(&hs384, now()).err(),
            Some(Refusal::Invalid)
        );
    }

    #[test]
    fn eddsa_and_es256_tokens_verify_with_their_public_keys() {
        let ed = load(false, Some("ed25519.pub.pem"), &[]);
        let token = signed(Algorithm::EdDSA, "ed25519.key.pem", &valid_claims());
        let p = ed.keys.verify(&token, now()).unwrap();
        assert_eq!(p.name, "alice");
        assert_eq!(p.access("alice-x"), Some(Access::Write));

        let es = load(false, Some("p256.pub.pem"), &[]);
        let token = signed(Algorithm::ES256, "p256.key.pem", &valid_claims());
        let p = es.keys.verify(&token, now()).unwrap();
        assert_eq!(p.access("board"), Some(Access::Read));
        let ed_token = signed(Algorithm::EdDSA, "ed25519.key.pem", &valid_claims());
        assert_eq!(
            es.keys.verify(&ed_token, now()).err(),
            Some(Refusal::Invalid)
        );

        // Both kinds of key at once: each token goes to its own.
        let both = load(true, Some("p256.pub.pem"), &[]);
        assert!(both.keys.verify(&token, now()).is_ok());
        assert!(both.keys.verify(&hs256(&valid_claims()), now()).is_ok());
        let expired = signed(
            Algorithm::ES256,
            "p256.key.pem",
            &json!({ "exp": NOW - 60 }),
        );
        assert_eq!(
            both.keys.verify(&expired, now()).err(),
            Some(Refusal::Expired)
        );
    }

    #[test]
    fn the_secret_file_loses_one_trailing_newline() {
        let check = |bytes: &[u8], signing_key: &[u8]| {
            let file = secret_file(bytes);
            let settings = AuthSettings {
                jwt_secret_file: Some(file.path().to_owned()),
                ..AuthSettings::default()
            };
            let keys = JwtKeys::load(&settings).unwrap().unwrap();
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &json!({ "exp": NOW + 60 }),
                &EncodingKey::from_secret(signing_key),
            )
            .unwrap();
            keys.verify(&token, now()).map(|_| ())
        };
        let with = |tail: &[u8]| [SECRET, tail].concat();
        assert_eq!(check(&with(b"\n"), SECRET), Ok(()));
        assert_eq!(check(&with(b"\r\n"), SECRET), Ok(()));
        assert_eq!(check(SECRET, SECRET), Ok(()));
        // Only one newline goes.
        assert_eq!(check(&with(b"\n\n"), &with(b"\n")), Ok(()));
        assert_eq!(check(&with(b"\n"), &with(b"\n")), Err(Refusal::Invalid));
        assert_eq!(check(&with(b" "), SECRET), Err(Refusal::Invalid));
    }

    #[test]
    fn unusable_key_files_are_errors_that_name_the_file() {
        let short = secret_file(b"secret\n");
        let e = load_error(&AuthSettings {
            jwt_secret_file: Some(short.path().to_owned()),
            ..AuthSettings::default()
        });
        assert!(
            e.contains(&short.path().display().to_string()) && e.contains("6 bytes"),
            "{e}"
        );
        assert!(!e.contains("secret\n") && !e.contains("\"secret"), "{e}");

        let missing = testdata("no-such-file.pem");
        let e = load_error(&AuthSettings {
            jwt_public_key: Some(missing.clone()),
            ..AuthSettings::default()
        });
        assert!(
            e.contains("cannot read") && e.contains("no-such-file.pem"),
            "{e}"
        );

        for (file, want) in [
            ("ed25519.key.pem", "private key"),
            ("p256.key.pem", "private key"),
            ("p384.pub.pem", "only P-256"),
            ("README.md", "PEM"),
        ] {
            let e = load_error(&AuthSettings {
                jwt_public_key: Some(testdata(file)),
                ..AuthSettings::default()
            });
            assert!(e.contains(file) && e.contains(want), "{file}: {e}");
        }
        let two = secret_file(
            &[
                std::fs::read(testdata("ed25519.pub.pem")).unwrap(),
                std::fs::read(testdata("p256.pub.pem")).unwrap(),
            ]
            .concat(),
        );
        let e = load_error(&AuthSettings {
            jwt_public_key: Some(two.path().to_owned()),
            ..AuthSettings::default()
        });
        assert!(e.contains("one PEM block"), "{e}");
    }

    #[test]
    fn no_jwt_settings_means_no_keys() {
        assert!(JwtKeys::load(&AuthSettings::default()).unwrap().is_none());
    }
}
