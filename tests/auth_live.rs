//! Access control over time and around the process, against the real binary: tokens that expire
//! during live connections, the secure default at startup, SIGHUP reloads, refusals counted by
//! reason, and secrets kept out of the logs.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync;
use automerge_relay::RepoMessage;
use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const DEADLINE: Duration = Duration::from_secs(10);
const ADMIN: &str = "live-admin-secret-8c7b6a5f4e3d2c1b0a99887766554433";
const HS_KEY: &str = "live-hs256-key-2f3e4d5c6b7a89900a1b2c3d4e5f6a7b";
/// How late after `exp` a live connection may be closed: the documented 5 s, plus 1 s for a
/// loaded test machine.
const CLOSE_WITHIN: Duration = Duration::from_secs(6);

/// A relay with an admin token (file) and an HS256 key (file with a trailing newline).
struct Setup {
    relay: Relay,
    dir: tempfile::TempDir,
}

impl Setup {
    fn start(extra_tokens: &str, opts: &SpawnOptions) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens.toml");
        let key = dir.path().join("jwt.key");
        let admin = token_entry(
            "live-admin",
            ADMIN,
            r#"[ { ids = "*", access = "admin" } ]"#,
        );
        std::fs::write(&tokens, admin + extra_tokens).unwrap();
        std::fs::write(&key, format!("{HS_KEY}\n")).unwrap();
        let args = [
            "--auth-tokens",
            tokens.to_str().unwrap(),
            "--auth-jwt-secret-file",
            key.to_str().unwrap(),
        ];
        let relay = Relay::start_opts(&dir.path().join("data"), &args, opts);
        Setup { relay, dir }
    }

    fn tokens_file(&self) -> std::path::PathBuf {
        self.dir.path().join("tokens.toml")
    }

    async fn seed(&self, id: &str) -> Vec<u8> {
        let c = reqwest::Client::new();
        let r = c
            .post(self.relay.url(&format!("/{id}")))
            .bearer_auth(ADMIN)
            .body(base_doc().save())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "seed {id}: {}", r.status());
        self.admin_get(id).await
    }

    async fn admin_get(&self, id: &str) -> Vec<u8> {
        let r = reqwest::Client::new()
            .get(self.relay.url(&format!("/{id}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "admin GET /{id}");
        r.bytes().await.unwrap().to_vec()
    }

    async fn admin_post(&self, id: &str, body: Vec<u8>) {
        let r = reqwest::Client::new()
            .post(self.relay.url(&format!("/{id}")))
            .bearer_auth(ADMIN)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "admin POST /{id}: {}", r.status());
    }

    async fn metrics(&self) -> String {
        let r = reqwest::Client::new()
            .get(self.relay.url("/_/metrics"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "admin reads /_/metrics");
        r.text().await.unwrap()
    }
}

/// A JWT (HS256 with the relay's key) with these grants, valid until `exp`.
fn jwt(exp: u64, grants: serde_json::Value) -> String {
    jwt_hs256(
        HS_KEY.as_bytes(),
        &json!({ "sub": "live", "exp": exp, "grants": grants }),
    )
}

/// The moment `exp` (Unix seconds) on this process's monotonic clock.
fn instant_of(exp: u64) -> Instant {
    let at = UNIX_EPOCH + Duration::from_secs(exp);
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => Instant::now() + ahead,
        Err(e) => Instant::now() - e.duration(),
    }
}

/// Waits (with a deadline, not as an assertion) until the wall clock passes `exp` plus the
/// relay's allowed clock skew, so the token is certainly expired for the relay too.
async fn until_certainly_expired(exp: u64) {
    let at = instant_of(exp) + Duration::from_secs(6);
    tokio::time::sleep_until(at.into()).await;
}

async fn status_of(r: reqwest::RequestBuilder) -> u16 {
    r.send().await.expect("request").status().as_u16()
}

// ---- expiry during live connections ---------------------------------------------------------

#[tokio::test]
async fn a_token_expiring_during_a_websocket_session_closes_it_with_4401() {
    let s = Setup::start("", &SpawnOptions::default());
    let stored = s.seed("exp-ws").await;
    let exp = now_secs() + 2;
    let token = jwt(exp, json!([{ "ids": "exp-*", "access": "write" }]));
    let url = with_query_token(&s.relay.ws_url("/exp-ws"), &token);
    let mut ws = ws_connect_auth(&url, None).await.expect("connects");
    let Some(Message::Binary(_)) = next_frame(&mut ws, DEADLINE).await else {
        panic!("expected the document first")
    };
    // Alive while the token is valid: it hears a change and gets an upload acknowledged.
    let mut doc = automerge::AutoCommit::load(&stored).unwrap();
    let heads = doc.get_heads();
    add_item(&mut doc, "before exp");
    s.admin_post("exp-ws", doc.save_after(&heads)).await;
    let Some(Message::Binary(_)) = next_frame(&mut ws, DEADLINE).await else {
        panic!("expected the pushed change")
    };
    let heads = doc.get_heads();
    add_item(&mut doc, "mine, before exp");
    ws.send(Message::binary(doc.save_after(&heads)))
        .await
        .unwrap();
    let Some(Message::Text(ack)) = next_frame(&mut ws, DEADLINE).await else {
        panic!("expected an ack")
    };
    assert!(ack.contains("\"ack\""), "{ack}");

    let code = close_code(&mut ws, instant_of(exp) + CLOSE_WITHIN).await;
    let closed_at = Instant::now();
    assert_eq!(code, Some(4401), "close code when the token expires");
    assert!(
        closed_at + Duration::from_millis(500) >= instant_of(exp),
        "closed before the token expired"
    );

    // The client reconnects with a fresh token; the expired one no longer opens a socket.
    let fresh = jwt(
        now_secs() + 600,
        json!([{ "ids": "exp-*", "access": "read" }]),
    );
    let mut ws = ws_connect_auth(&s.relay.ws_url("/exp-ws"), Some(&fresh))
        .await
        .expect("a fresh token reconnects");
    let Some(Message::Binary(_)) = next_frame(&mut ws, DEADLINE).await else {
        panic!("expected the document after reconnecting")
    };
    until_certainly_expired(exp).await;
    match ws_connect_auth(&url, None).await {
        Err(r) => assert_eq!(r.status, 401),
        Ok(_) => panic!("an expired token opened a socket"),
    }
}

#[tokio::test]
async fn a_token_expiring_during_a_repo_session_closes_it_with_4401() {
    let s = Setup::start("", &SpawnOptions::default());
    s.seed("exp-repo").await;
    let exp = now_secs() + 2;
    let token = jwt(exp, json!([{ "ids": "*", "access": "read" }]));
    let url = with_query_token(&s.relay.ws_url("/"), &token);
    let mut peer = RepoPeer::connect(&url, None).await.expect("connects");
    let mut local = automerge::Automerge::new();
    let mut state = sync::State::new();
    peer.request("exp-repo", &mut local, &mut state).await;
    match peer.recv().await {
        RepoMessage::Sync { document_id, .. } => assert_eq!(document_id, "exp-repo"),
        other => panic!("expected a sync reply, got {other:?}"),
    }
    let code = close_code(&mut peer.ws, instant_of(exp) + CLOSE_WITHIN).await;
    assert_eq!(code, Some(4401), "close code when the token expires");
    assert!(Instant::now() + Duration::from_millis(500) >= instant_of(exp));
}

#[tokio::test]
async fn a_token_expiring_during_an_sse_stream_ends_it() {
    let s = Setup::start("", &SpawnOptions::default());
    s.seed("exp-sse").await;
    let exp = now_secs() + 2;
    let token = jwt(exp, json!([{ "ids": "exp-*", "access": "read" }]));
    let mut r = reqwest::Client::new()
        .get(s.relay.url("/exp-sse"))
        .header("accept", "text/event-stream")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = instant_of(exp) + CLOSE_WITHIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.chunk()).await {
            Err(_) => panic!("the event stream was still open {CLOSE_WITHIN:?} after exp"),
            Ok(Ok(Some(_))) => continue, // events or keep-alive comments
            Ok(Ok(None)) | Ok(Err(_)) => break,
        }
    }
    assert!(
        Instant::now() + Duration::from_millis(500) >= instant_of(exp),
        "the stream ended before the token expired"
    );
}

// ---- the secure default ---------------------------------------------------------------------

/// Starts `serve --listen 0.0.0.0:0` with `extra` and `env`; returns the child and, if it
/// printed its listening line, the port (`None` when it exited first).
fn start_public(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> (Child, Option<u16>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_automerge-relay"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("RELAY_AUTH_TOKENS")
        .env_remove("RELAY_ALLOW_ANONYMOUS")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start relay binary");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
        stop(child);
        panic!("the relay neither started nor exited within 20 s");
    };
    let port = line
        .contains("listening")
        .then(|| line.trim().rsplit(':').next()?.parse().ok())
        .flatten();
    (child, port)
}

fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test]
async fn a_public_address_without_credentials_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = start_public(dir.path(), &[], &[]);
    if port.is_some() {
        stop(child);
        panic!("started on 0.0.0.0 without credentials");
    }
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "exit status {status}");
    for flag in ["--auth-tokens", "--auth-jwt", "--allow-anonymous"] {
        assert!(
            stderr.contains(flag),
            "the refusal does not name {flag}:\n{stderr}"
        );
    }
}

#[tokio::test]
async fn allow_anonymous_or_credentials_let_it_start_on_a_public_address() {
    let c = reqwest::Client::new();
    // --allow-anonymous: open to everyone.
    let dir = tempfile::tempdir().unwrap();
    let (child, port) = start_public(dir.path(), &["--allow-anonymous"], &[]);
    let port = port.expect("starts with --allow-anonymous");
    let url = format!("http://127.0.0.1:{port}");
    let r = c.put(format!("{url}/anon-doc")).body(base_doc().save());
    assert_eq!(status_of(r).await, 201);
    assert_eq!(status_of(c.get(format!("{url}/_/health"))).await, 200);
    stop(child);

    // Credentials from the environment (RELAY_AUTH_TOKENS): it starts, and asks for them.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        token_entry("env-admin", ADMIN, r#"[ { ids = "*", access = "admin" } ]"#),
    )
    .unwrap();
    let data = dir.path().join("data");
    let env = [("RELAY_AUTH_TOKENS", tokens.to_str().unwrap())];
    let (child, port) = start_public(&data, &[], &env);
    let port = port.expect("starts with RELAY_AUTH_TOKENS");
    let url = format!("http://127.0.0.1:{port}");
    let r = c.put(format!("{url}/env-doc")).body(base_doc().save());
    assert_eq!(status_of(r).await, 401);
    let r = c
        .put(format!("{url}/env-doc"))
        .bearer_auth(ADMIN)
        .body(base_doc().save());
    assert_eq!(status_of(r).await, 201);
    assert_eq!(status_of(c.get(format!("{url}/_/health"))).await, 200);
    assert_eq!(status_of(c.get(format!("{url}/_/ready"))).await, 200);
    stop(child);
}

// ---- SIGHUP ---------------------------------------------------------------------------------

/// Polls `GET /_/docs` with `token` until it answers `want`.
async fn until_status(relay: &Relay, token: &str, want: u16, what: &str) {
    let c = reqwest::Client::new();
    let url = relay.url("/_/docs");
    wait_for(what, DEADLINE, || {
        let r = c.get(&url).bearer_auth(token);
        async move { (status_of(r).await == want).then_some(()) }
    })
    .await;
}

async fn docs_status(relay: &Relay, token: &str) -> u16 {
    status_of(
        reqwest::Client::new()
            .get(relay.url("/_/docs"))
            .bearer_auth(token),
    )
    .await
}

#[tokio::test]
async fn sighup_reloads_tokens_and_keys_and_a_broken_file_keeps_the_previous_ones() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let opts = SpawnOptions {
        stderr_file: Some(log.clone()),
        ..Default::default()
    };
    let s = Setup::start("", &opts);
    let added = "added-secret-4b5c6d7e8f90a1b2c3d4e5f60718293a";
    let key2 = "second-hs256-key-a1b2c3d4e5f60718293a4b5c6d7e8f90";
    let admin_grants = json!([{ "ids": "*", "access": "admin" }]);
    let claims = json!({ "sub": "reload", "exp": now_secs() + 600, "grants": admin_grants });
    let jwt1 = jwt_hs256(HS_KEY.as_bytes(), &claims);
    let jwt2 = jwt_hs256(key2.as_bytes(), &claims);
    assert_eq!(docs_status(&s.relay, ADMIN).await, 200);
    assert_eq!(docs_status(&s.relay, added).await, 401);
    assert_eq!(docs_status(&s.relay, &jwt1).await, 200);
    assert_eq!(docs_status(&s.relay, &jwt2).await, 401);

    // A token added to the file, and a new key, work after SIGHUP without a restart.
    let grants = r#"[ { ids = "*", access = "admin" } ]"#;
    let file = token_entry("live-admin", ADMIN, grants) + &token_entry("added", added, grants);
    std::fs::write(s.tokens_file(), &file).unwrap();
    std::fs::write(s.dir.path().join("jwt.key"), format!("{key2}\n")).unwrap();
    s.relay.sighup();
    until_status(&s.relay, added, 200, "the added token to work after SIGHUP").await;
    until_status(&s.relay, &jwt2, 200, "the new key to work after SIGHUP").await;
    assert_eq!(docs_status(&s.relay, ADMIN).await, 200);
    assert_eq!(
        docs_status(&s.relay, &jwt1).await,
        401,
        "the old key is gone"
    );

    // A broken file: the relay says why and keeps what it had.
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    std::fs::write(s.tokens_file(), "[[token]\nname = \"broken").unwrap();
    s.relay.sighup();
    let name = s
        .tokens_file()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    wait_for("the relay to log why the reload failed", DEADLINE, || {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let fresh = log.get(logged_before..).unwrap_or_default().contains(&name);
        async move { fresh.then_some(()) }
    })
    .await;
    for (what, token) in [("the first token", ADMIN), ("the added one", added)] {
        assert_eq!(
            docs_status(&s.relay, token).await,
            200,
            "{what} after a bad reload"
        );
    }
    assert_eq!(
        docs_status(&s.relay, &jwt2).await,
        200,
        "the key after a bad reload"
    );

    // A key file gone missing: the same.
    std::fs::write(s.tokens_file(), &file).unwrap();
    let key_file = s.dir.path().join("jwt.key");
    std::fs::remove_file(&key_file).unwrap();
    let logged_before = std::fs::read_to_string(&log).unwrap_or_default().len();
    s.relay.sighup();
    wait_for(
        "the relay to log why the key reload failed",
        DEADLINE,
        || {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let fresh = log
                .get(logged_before..)
                .unwrap_or_default()
                .contains("jwt.key");
            async move { fresh.then_some(()) }
        },
    )
    .await;
    assert_eq!(
        docs_status(&s.relay, &jwt2).await,
        200,
        "the key after a failed reload"
    );
    assert_eq!(docs_status(&s.relay, added).await, 200);
    std::fs::write(&key_file, format!("{key2}\n")).unwrap();

    // A token removed from the file stops working.
    std::fs::write(s.tokens_file(), token_entry("added", added, grants)).unwrap();
    s.relay.sighup();
    until_status(&s.relay, ADMIN, 401, "the removed token to be refused").await;
    assert_eq!(docs_status(&s.relay, added).await, 200);
}

// ---- metrics --------------------------------------------------------------------------------

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    let reader = "metrics-reader-secret-0a1b2c3d4e5f60718293a4b5";
    let s = Setup::start(
        &token_entry(
            "metrics-reader",
            reader,
            r#"[ { ids = "m-*", access = "read" } ]"#,
        ),
        &SpawnOptions::default(),
    );
    let stored = s.seed("m-doc").await;
    let before = s.metrics().await;
    let count = |page: &str| REASONS.map(|r| auth_failures(page, r));
    let base = count(&before);
    let c = reqwest::Client::new();
    let doc = s.relay.url("/m-doc");
    let expired = jwt(now_secs() - 60, json!([{ "ids": "*", "access": "admin" }]));
    let forged = jwt_hs256(
        b"not-the-relay-key",
        &json!({ "exp": now_secs() + 600, "grants": [{ "ids": "*", "access": "admin" }] }),
    );

    // missing: 3
    assert_eq!(status_of(c.get(&doc)).await, 401);
    assert!(ws_connect_auth(&s.relay.ws_url("/m-doc"), None)
        .await
        .is_err());
    assert!(RepoPeer::connect(&s.relay.ws_url("/"), None).await.is_err());
    // invalid: 2
    assert_eq!(status_of(c.get(&doc).bearer_auth("garbage")).await, 401);
    assert_eq!(status_of(c.get(with_query_token(&doc, &forged))).await, 401);
    // expired: 1
    assert_eq!(status_of(c.get(&doc).bearer_auth(&expired)).await, 401);
    // forbidden: 2
    let put = c.put(&doc).bearer_auth(reader).body(base_doc().save());
    assert_eq!(status_of(put).await, 403);
    let docs = c.get(s.relay.url("/_/docs")).bearer_auth(reader);
    assert_eq!(status_of(docs).await, 403);
    // served: nothing
    assert_eq!(status_of(c.get(&doc).bearer_auth(reader)).await, 200);

    let after = count(&s.metrics().await);
    let delta: Vec<u64> = after.iter().zip(base).map(|(a, b)| a - b).collect();
    assert_eq!(
        delta,
        [3, 2, 1, 2],
        "(missing, invalid, expired, forbidden)"
    );

    // A read-only upload over the per-document WebSocket: one more forbidden.
    let url = with_query_token(&s.relay.ws_url("/m-doc"), reader);
    let mut ws = ws_connect_auth(&url, None)
        .await
        .expect("reader subscribes");
    let _doc = next_frame(&mut ws, DEADLINE).await;
    let mut local = automerge::AutoCommit::load(&stored).unwrap();
    let heads = local.get_heads();
    add_item(&mut local, "read-only");
    ws.send(Message::binary(local.save_after(&heads)))
        .await
        .unwrap();
    let Some(Message::Text(reply)) = next_frame(&mut ws, DEADLINE).await else {
        panic!("expected an error reply")
    };
    assert!(reply.contains("forbidden"), "{reply}");
    let now = wait_for("the refused upload to be counted", DEADLINE, || async {
        let c = count(&s.metrics().await);
        (c[3] > after[3]).then_some(c)
    })
    .await;
    assert_eq!(now[3], after[3] + 1, "the refused upload is counted once");

    // A read-only repo peer's changes: counted as forbidden too.
    let url = with_query_token(&s.relay.ws_url("/"), reader);
    let mut peer = RepoPeer::connect(&url, None).await.expect("reader joins");
    let (edit, _) = sync_edit(&stored, "read-only");
    peer.sync("m-doc", edit).await;
    wait_for("the refused repo edit to be counted", DEADLINE, || async {
        let c = count(&s.metrics().await);
        (c[3] > now[3] && c[..3] == now[..3]).then_some(())
    })
    .await;
    assert_eq!(s.admin_get("m-doc").await, stored, "nothing was stored");

    // The label is the reason, and nothing else.
    let page = s.metrics().await;
    for line in page
        .lines()
        .filter(|l| l.starts_with("relay_auth_failures_total"))
    {
        let labels = line.split('{').nth(1).and_then(|l| l.split('}').next());
        let ok = labels.is_some_and(|l| {
            REASONS
                .iter()
                .any(|r| l.trim_end_matches(',') == format!("reason=\"{r}\""))
        });
        assert!(ok, "unexpected labels: {line}");
    }
}

const REASONS: [&str; 4] = ["missing", "invalid", "expired", "forbidden"];

// ---- secrets in logs ------------------------------------------------------------------------

#[tokio::test]
async fn secrets_never_reach_the_log_at_debug() {
    secrets_stay_out_of_the_log("debug").await;
}

#[tokio::test]
async fn secrets_never_reach_the_log_at_trace() {
    secrets_stay_out_of_the_log("trace").await;
}

/// Every way of presenting a secret (valid, unknown, expired; header and `?token=`; HTTP, SSE,
/// per-document and repo sockets; a reload), then the whole log at `level` and `/_/metrics`
/// are searched for every secret.
async fn secrets_stay_out_of_the_log(level: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr.log");
    let reader = "log-reader-secret-5d4c3b2a1f0e9d8c7b6a59483726";
    let unknown = "log-unknown-secret-1a2b3c4d5e6f7a8b9c0d1e2f3a4b";
    let later = "log-later-secret-9f8e7d6c5b4a39281706f5e4d3c2";
    let reader_line = token_entry(
        "log-reader",
        &format!("sha256:{}", sha256_hex(reader)),
        r#"[ { ids = "log-*", access = "read" } ]"#,
    );
    let opts = SpawnOptions {
        rust_log: Some(level.into()),
        stderr_file: Some(log.clone()),
        ..Default::default()
    };
    let mut s = Setup::start(&reader_line, &opts);
    let stored = s.seed("log-doc").await;
    let grants = json!([{ "ids": "log-*", "access": "write" }]);
    let good_jwt = jwt(now_secs() + 600, grants.clone());
    let expired_jwt = jwt(now_secs() - 60, grants);
    let c = reqwest::Client::new();
    let doc = s.relay.url("/log-doc");

    for token in [
        ADMIN,
        reader,
        unknown,
        good_jwt.as_str(),
        expired_jwt.as_str(),
    ] {
        let _ = status_of(c.get(&doc).bearer_auth(token)).await;
        let _ = status_of(c.get(with_query_token(&doc, token))).await;
        let put = c.put(with_query_token(&doc, token)).body(base_doc().save());
        let _ = status_of(put).await;
        let _ = status_of(c.get(with_query_token(&s.relay.url("/_/docs"), token))).await;
        let sse = c
            .get(with_query_token(&doc, token))
            .header("accept", "text/event-stream");
        let _ = status_of(sse).await;
        let ws_url = with_query_token(&s.relay.ws_url("/log-doc"), token);
        if let Ok(mut ws) = ws_connect_auth(&ws_url, None).await {
            let _ = next_frame(&mut ws, DEADLINE).await;
            let mut local = automerge::AutoCommit::load(&stored).unwrap();
            let heads = local.get_heads();
            add_item(&mut local, "log");
            ws.send(Message::binary(local.save_after(&heads)))
                .await
                .unwrap();
            let _ = next_frame(&mut ws, DEADLINE).await;
        }
        let _ = ws_connect_auth(&s.relay.ws_url("/log-doc"), Some(token)).await;
        let repo_url = with_query_token(&s.relay.ws_url("/"), token);
        if let Ok(mut peer) = RepoPeer::connect(&repo_url, None).await {
            let (edit, _) = sync_edit(&stored, "log");
            peer.sync("log-doc", edit).await;
            // A read-only peer may get no answer: wait a little, without judging.
            let _ = tokio::time::timeout(Duration::from_millis(500), peer.recv()).await;
        }
    }
    // A reload, which must not print the file either.
    let file = token_entry(
        "live-admin",
        ADMIN,
        r#"[ { ids = "*", access = "admin" } ]"#,
    ) + &reader_line
        + &token_entry("log-later", later, r#"[ { ids = "*", access = "admin" } ]"#);
    std::fs::write(s.tokens_file(), file).unwrap();
    s.relay.sighup();
    until_status(&s.relay, later, 200, "the reloaded token to work").await;
    let page = s.metrics().await;
    assert_eq!(s.relay.terminate(), Some(0));

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(" {} ", level.to_ascii_uppercase())),
        "the relay logged nothing at {level}; the check would prove nothing:\n{logged}"
    );
    let signature = |jwt: &str| jwt.rsplit('.').next().unwrap().to_string();
    let secrets = [
        ("the admin secret", ADMIN.to_string()),
        ("the reader secret", reader.to_string()),
        ("an unknown secret", unknown.to_string()),
        ("a secret added by reload", later.to_string()),
        ("the HS256 key", HS_KEY.to_string()),
        ("a JWT", good_jwt.clone()),
        ("a JWT's signature", signature(&good_jwt)),
        ("an expired JWT", expired_jwt.clone()),
        ("an expired JWT's signature", signature(&expired_jwt)),
    ];
    for (what, secret) in &secrets {
        assert!(!logged.contains(secret.as_str()), "{what} is in the log");
        assert!(
            !logged.contains(&percent_encode(secret)),
            "{what} is in the log (URL-encoded)"
        );
        assert!(!page.contains(secret.as_str()), "{what} is in /_/metrics");
    }
}
