//! Webhooks against the real binary over real sockets: a receiver inside the test (axum on a
//! free loopback port) records every request and checks its signature; the relay runs with
//! short debounce flags. Every wait has a deadline; timing checks leave generous slack.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ROOT};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use common::*;
use hmac::{Hmac, Mac};

/// The key the relay signs with; the file holds it with a trailing newline, which is ignored.
const SECRET: &str = "webhook-test-secret";

#[derive(Clone, Copy)]
enum Mode {
    /// 204 to everything.
    Ok,
    /// `status` to the first `times` requests, then 204.
    Fail { status: u16, times: usize },
    /// Takes the request and never answers.
    Hang,
}

#[derive(Clone, Debug)]
struct Request {
    at: Instant,
    raw: Vec<u8>,
    json: serde_json::Value,
    content_type: String,
    signature: String,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    async fn start(mode: Mode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let port = listener.local_addr().expect("receiver address").port();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state((mode, requests.clone()));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://127.0.0.1:{port}/hook"),
            requests,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived, then returns them all.
    async fn wait_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        wait_for(&format!("{n} webhook requests"), timeout, || async move {
            let got = self.requests();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

async fn receive(
    State((mode, requests)): State<(Mode, Arc<Mutex<Vec<Request>>>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let n = {
        let mut all = requests.lock().unwrap();
        all.push(Request {
            at: Instant::now(),
            raw: body.to_vec(),
            json: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
            content_type: header("content-type"),
            signature: header("x-relay-signature"),
        });
        all.len()
    };
    match mode {
        Mode::Ok => StatusCode::NO_CONTENT,
        Mode::Fail { status, times } if n <= times => {
            StatusCode::from_u16(status).expect("a status")
        }
        Mode::Fail { .. } => StatusCode::NO_CONTENT,
        Mode::Hang => std::future::pending().await,
    }
}

/// Checks what every call carries: JSON, a signature over the exact body, an RFC 3339 time.
fn assert_well_formed(r: &Request) {
    assert_eq!(r.content_type, "application/json");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&r.raw);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(r.signature, expected, "the signature verifies");
    let time = r.json["time"].as_str().expect("a time");
    let b = time.as_bytes();
    assert!(
        time.len() == 24 && b[4] == b'-' && b[10] == b'T' && b[19] == b'.' && time.ends_with('Z'),
        "RFC 3339 UTC with milliseconds: {time}"
    );
}

fn heads_of(r: &Request) -> Vec<String> {
    json_heads(&r.json)
}

/// A relay sending its calls to `receiver`, with these extra flags.
fn relay(dir: &std::path::Path, receiver: &Receiver, extra: &[&str]) -> Relay {
    let secret = dir.join("webhook-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("write the secret");
    let secret = secret.to_str().expect("a UTF-8 path").to_owned();
    let mut args = vec![
        "--store",
        "memory",
        "--metrics-public",
        "--webhook",
        receiver.url.as_str(),
        "--webhook-secret-file",
        secret.as_str(),
    ];
    args.extend_from_slice(extra);
    Relay::start_with(&dir.join("data"), &args)
}

/// One new change on top of `doc`, posted; panics unless it is acknowledged within 10 s.
async fn post_change(c: &reqwest::Client, url: &str, doc: &mut AutoCommit, n: i64) {
    let heads = doc.get_heads();
    doc.put(ROOT, "n", n).expect("put");
    doc.commit();
    let sent = c.post(url).body(doc.save_after(&heads)).send();
    let r = tokio::time::timeout(Duration::from_secs(10), sent)
        .await
        .expect("the write is acknowledged within 10 s")
        .expect("post");
    assert!(r.status().is_success(), "write: {}", r.status());
}

/// The value of `name` (with `label`, e.g. `reason="http_5xx"`, if given) on `/_/metrics`.
async fn metric(c: &reqwest::Client, relay: &Relay, name: &str, label: &str) -> f64 {
    let text = c
        .get(relay.url("/_/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter(|l| l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_one_signed_call_with_the_final_heads_and_a_delete_follows() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Ok).await;
    // A long debounce, so 50 quick writes stay one burst however slow the machine is.
    let relay = relay(
        dir.path(),
        &receiver,
        &[
            "--webhook-debounce-ms",
            "1000",
            "--webhook-max-wait-ms",
            "30000",
        ],
    );
    let c = reqwest::Client::new();
    let url = relay.url("/burst");
    let mut doc = AutoCommit::new();
    for i in 0..50 {
        post_change(&c, &url, &mut doc, i).await;
    }
    let calls = receiver.wait_requests(1, Duration::from_secs(20)).await;
    let call = &calls[0];
    assert_well_formed(call);
    assert_eq!(call.json["id"], "burst");
    assert_eq!(heads_of(call), heads_hex(&mut doc), "the final heads");
    assert_eq!(call.json["changes"], 50, "{}", call.json);
    assert!(call.json.get("deleted").is_none());

    let r = c.delete(&url).send().await.expect("delete");
    assert!(r.status().is_success(), "delete: {}", r.status());
    let calls = receiver.wait_requests(2, Duration::from_secs(10)).await;
    assert_eq!(calls.len(), 2, "one call for the burst, one for the delete");
    assert_well_formed(&calls[1]);
    assert_eq!(calls[1].json["id"], "burst");
    assert_eq!(calls[1].json["deleted"], true);
    assert!(calls[1].json.get("heads").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cancels_the_waiting_change_and_is_sent_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Ok).await;
    let relay = relay(
        dir.path(),
        &receiver,
        &[
            "--webhook-debounce-ms",
            "3000",
            "--webhook-max-wait-ms",
            "30000",
        ],
    );
    let c = reqwest::Client::new();
    let url = relay.url("/gone");
    let mut doc = AutoCommit::new();
    post_change(&c, &url, &mut doc, 1).await;
    let deleted_at = Instant::now();
    assert!(c.delete(&url).send().await.unwrap().status().is_success());
    let calls = receiver.wait_requests(1, Duration::from_secs(10)).await;
    assert_well_formed(&calls[0]);
    assert_eq!(calls[0].json["deleted"], true, "the delete comes first");
    assert!(
        calls[0].at - deleted_at < Duration::from_millis(2500),
        "without the 3 s debounce"
    );
    // Written again from scratch: the next call counts only the new change, so the one
    // before the delete was dropped, not kept in the burst.
    let mut again = AutoCommit::new();
    post_change(&c, &url, &mut again, 2).await;
    let calls = receiver.wait_requests(2, Duration::from_secs(15)).await;
    assert_well_formed(&calls[1]);
    assert_eq!(calls[1].json["changes"], 1, "{}", calls[1].json);
    assert_eq!(heads_of(&calls[1]), heads_hex(&mut again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_gets_a_call_at_least_every_max_wait() {
    const MAX_WAIT: Duration = Duration::from_millis(1500);
    const SLACK: Duration = Duration::from_millis(1500);
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Ok).await;
    let relay = relay(
        dir.path(),
        &receiver,
        &[
            "--webhook-debounce-ms",
            "300",
            "--webhook-max-wait-ms",
            "1500",
        ],
    );
    let c = reqwest::Client::new();
    let url = relay.url("/stream");
    let mut doc = AutoCommit::new();
    let mut every = tokio::time::interval(Duration::from_millis(100));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut acked = Vec::new();
    for i in 0..40 {
        every.tick().await;
        post_change(&c, &url, &mut doc, i).await;
        acked.push(Instant::now());
    }
    let end = Instant::now();
    let last = heads_hex(&mut doc);
    let calls = wait_for(
        "the call with the final heads",
        Duration::from_secs(15),
        || {
            let got = receiver.requests();
            let done = got.last().is_some_and(|r| heads_of(r) == last);
            async move { done.then_some(got) }
        },
    )
    .await;
    for call in &calls {
        assert_well_formed(call);
    }
    let total: u64 = calls
        .iter()
        .map(|r| r.json["changes"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 40, "every change counted once");
    // At least every max-wait while the stream lasts (a debounce alone would wait for its end).
    let mut previous = start;
    for call in &calls {
        assert!(
            call.at - previous <= MAX_WAIT + SLACK,
            "a gap of {:?} between calls",
            call.at - previous
        );
        previous = call.at;
    }
    // And no more often than that: one call per max-wait, the one after the stream, and one
    // more for each pause in the writes longer than the debounce (a slow machine).
    let pauses = acked
        .windows(2)
        .filter(|w| w[1] - w[0] > Duration::from_millis(250))
        .count();
    let most = ((end - start).as_millis() / MAX_WAIT.as_millis()) as usize + 2 + pauses;
    assert!(
        (2..=most).contains(&calls.len()),
        "{} calls for {:?} of writes (at most {most})",
        calls.len(),
        end - start
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_failing_twice_gets_the_call_on_the_third_try() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Fail {
        status: 500,
        times: 2,
    })
    .await;
    let relay = relay(dir.path(), &receiver, &["--webhook-debounce-ms", "200"]);
    let c = reqwest::Client::new();
    let mut doc = AutoCommit::new();
    post_change(&c, &relay.url("/retried"), &mut doc, 1).await;
    let tries = receiver.wait_requests(3, Duration::from_secs(20)).await;
    for t in &tries {
        assert_well_formed(t);
        assert_eq!(t.raw, tries[0].raw, "every attempt sends the same body");
    }
    assert_eq!(heads_of(&tries[2]), heads_hex(&mut doc));
    // The backoff: 0.5 s, then 1 s (less a little for timer granularity).
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(450));
    assert!(tries[2].at - tries[1].at >= Duration::from_millis(950));
    let (c, relay) = (&c, &relay);
    wait_for(
        "the delivery counted",
        Duration::from_secs(10),
        || async move {
            let delivered = metric(c, relay, "relay_webhook_deliveries_total", "").await;
            (delivered == 1.0).then_some(())
        },
    )
    .await;
    let failures = metric(
        c,
        relay,
        "relay_webhook_failures_total",
        "reason=\"http_5xx\"",
    )
    .await;
    assert_eq!(failures, 2.0);
    assert_eq!(receiver.requests().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4xx_is_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Fail {
        status: 400,
        times: usize::MAX,
    })
    .await;
    let relay = relay(dir.path(), &receiver, &["--webhook-debounce-ms", "100"]);
    let c = reqwest::Client::new();
    let mut doc = AutoCommit::new();
    post_change(&c, &relay.url("/refused"), &mut doc, 1).await;
    let (c, relay) = (&c, &relay);
    wait_for(
        "the call given up",
        Duration::from_secs(15),
        || async move {
            let refused = metric(
                c,
                relay,
                "relay_webhook_given_up_total",
                "reason=\"refused\"",
            )
            .await;
            (refused == 1.0).then_some(())
        },
    )
    .await;
    assert_eq!(receiver.requests().len(), 1, "one attempt only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_acknowledged_while_the_receiver_hangs_and_the_queue_overflows() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Hang).await;
    let relay = relay(
        dir.path(),
        &receiver,
        // A long timeout: no attempt ends, so none is retried, while the test runs.
        &[
            "--webhook-debounce-ms",
            "0",
            "--webhook-queue",
            "4",
            "--webhook-timeout-secs",
            "120",
        ],
    );
    let c = reqwest::Client::new();
    let mut docs: Vec<AutoCommit> = (0..20).map(|_| AutoCommit::new()).collect();
    for round in 0..3 {
        for (i, doc) in docs.iter_mut().enumerate() {
            post_change(&c, &relay.url(&format!("/hang-{i}")), doc, round).await;
        }
    }
    // The receiver holds the calls it took; four documents fill the queue, the rest are
    // dropped and counted.
    receiver.wait_requests(1, Duration::from_secs(10)).await;
    let (c, relay) = (&c, &relay);
    wait_for(
        "the queue full and drops counted",
        Duration::from_secs(10),
        || async move {
            let queued = metric(c, relay, "relay_webhook_queue", "").await;
            let dropped = metric(c, relay, "relay_webhook_dropped_total", "").await;
            (queued == 4.0 && dropped >= 16.0).then_some(())
        },
    )
    .await;
    assert!(
        receiver.requests().len() <= 4,
        "one call per queued document"
    );
    // Still acknowledged, queued document or not.
    post_change(c, &relay.url("/hang-0"), &mut docs[0], 9).await;
    post_change(c, &relay.url("/hang-19"), &mut docs[19], 9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_the_waiting_calls_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(Mode::Ok).await;
    let mut relay = relay(
        dir.path(),
        &receiver,
        &[
            "--webhook-debounce-ms",
            "600000",
            "--webhook-max-wait-ms",
            "600000",
        ],
    );
    let c = reqwest::Client::new();
    let mut doc = AutoCommit::new();
    post_change(&c, &relay.url("/last-words"), &mut doc, 1).await;
    post_change(&c, &relay.url("/last-words"), &mut doc, 2).await;
    assert!(receiver.requests().is_empty(), "held back by the debounce");
    let code = tokio::task::spawn_blocking(move || relay.terminate())
        .await
        .expect("terminate");
    assert_eq!(code, Some(0));
    // Sent before the relay exited.
    let calls = receiver.requests();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_well_formed(&calls[0]);
    assert_eq!(calls[0].json["changes"], 2);
    assert_eq!(heads_of(&calls[0]), heads_hex(&mut doc));
}

#[test]
fn the_relay_refuses_to_start_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_automerge-relay"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory"])
        .args(["--webhook", "http://127.0.0.1:9/hook"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .env_remove("RELAY_WEBHOOK_SECRET_FILE")
        .output()
        .expect("run the relay");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--webhook-secret-file"), "{stderr}");
}
