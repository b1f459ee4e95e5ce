//! One call to the receiver, retried: `POST` the body with its signature; a `2xx` is
//! delivered; a network error, a timeout, a `429` or a `5xx` is tried again after a backoff
//! (0.5 s, 1 s, 2 s … up to 30 s, or the receiver's `Retry-After` in seconds when longer,
//! still at most 30 s), up to `--webhook-retries` times; any other status (`4xx`, a redirect,
//! which is not followed) is the receiver's answer and is not retried. Every attempt is bounded
//! by `--webhook-timeout-secs`. The schedule and the verdicts are pure functions, unit-tested.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};

/// The first retry's wait, doubled for each retry after it.
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two attempts, whatever `Retry-After` asks.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Most of a response body read (and discarded) so its connection can be used again.
const MAX_RESPONSE_READ: usize = 64 << 10;
pub const SIGNATURE_HEADER: &str = "x-relay-signature";

/// What to make of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Worth another attempt; the reason is a `relay_webhook_failures_total` label.
    Retry(&'static str),
    /// The receiver said no: trying again would get the same answer.
    Refused(&'static str),
}

/// How a call ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        attempts: u32,
    },
    /// Refused (`4xx`…), or still failing after every retry; `reason` is the last attempt's.
    GaveUp {
        reason: &'static str,
        attempts: u32,
        refused: bool,
    },
}

/// The verdict on a response status.
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        429 => Verdict::Retry("http_429"),
        500..=599 => Verdict::Retry("http_5xx"),
        400..=499 => Verdict::Refused("http_4xx"),
        _ => Verdict::Refused("http_other"),
    }
}

/// The wait before retry number `retry` (1 for the first): 0.5 s doubled each time, capped.
pub fn backoff(retry: u32) -> Duration {
    let factor = 1u32
        .checked_shl(retry.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

/// The wait before retry `retry`: the backoff, or the receiver's `Retry-After` when longer,
/// never more than the cap.
pub fn retry_delay(retry: u32, retry_after: Option<Duration>) -> Duration {
    backoff(retry)
        .max(retry_after.unwrap_or_default())
        .min(BACKOFF_MAX)
}

/// `Retry-After` in seconds (the HTTP-date form is ignored: the backoff applies).
pub fn retry_after(value: &str) -> Option<Duration> {
    value.trim().parse().ok().map(Duration::from_secs)
}

/// Posts calls to one URL.
pub struct Deliverer {
    client: reqwest::Client,
    url: reqwest::Url,
    retries: u32,
}

impl Deliverer {
    /// Fails on a URL that is not `http://` or `https://` with a host.
    pub fn new(url: &str, timeout: Duration, retries: u32) -> Result<Self, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("bad --webhook URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("bad --webhook URL: expected http://host/… or https://host/…".into());
        }
        let timeout = timeout.max(Duration::from_secs(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("automerge-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up the webhook client: {e}"))?;
        Ok(Self {
            client,
            url,
            retries,
        })
    }

    /// Scheme, host and port only: a URL's path, query or user info may hold a secret, so
    /// logs show this.
    pub fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// Sends `body` until it is delivered, refused or out of retries. Counts each delivered
    /// call and each failed attempt.
    pub async fn deliver(&self, body: Bytes, signature: &str) -> Outcome {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (verdict, wait) = self.attempt(body.clone(), signature).await;
            let reason = match verdict {
                Verdict::Delivered => {
                    metrics::counter!("relay_webhook_deliveries_total").increment(1);
                    return Outcome::Delivered { attempts };
                }
                Verdict::Refused(reason) => {
                    metrics::counter!("relay_webhook_failures_total", "reason" => reason)
                        .increment(1);
                    return Outcome::GaveUp {
                        reason,
                        attempts,
                        refused: true,
                    };
                }
                Verdict::Retry(reason) => reason,
            };
            metrics::counter!("relay_webhook_failures_total", "reason" => reason).increment(1);
            if attempts > self.retries {
                return Outcome::GaveUp {
                    reason,
                    attempts,
                    refused: false,
                };
            }
            tokio::time::sleep(retry_delay(attempts, wait)).await;
        }
    }

    /// One `POST`: its verdict and the receiver's `Retry-After`.
    async fn attempt(&self, body: Bytes, signature: &str) -> (Verdict, Option<Duration>) {
        let sent = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(r) => r,
            Err(e) => {
                let reason = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "network"
                };
                // Without the URL: its path or query may hold a secret.
                tracing::debug!(error = %e.without_url(), reason, "webhook attempt failed");
                return (Verdict::Retry(reason), None);
            }
        };
        let wait = header(response.headers(), RETRY_AFTER).and_then(retry_after);
        let verdict = verdict(response.status().as_u16());
        // Read a little of the answer, so the connection goes back to the pool.
        let mut read = 0;
        while read < MAX_RESPONSE_READ {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        (verdict, wait)
    }
}

fn header(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<&str> {
    headers.get(name)?.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn the_backoff_doubles_from_half_a_second_up_to_the_cap() {
        let waits: Vec<Duration> = (1..=8).map(backoff).collect();
        assert_eq!(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0].map(secs));
        assert_eq!(backoff(0), secs(0.5));
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn retry_after_lengthens_the_wait_but_not_past_the_cap() {
        assert_eq!(retry_after(" 3 "), Some(secs(3.0)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(retry_delay(1, Some(secs(3.0))), secs(3.0));
        assert_eq!(retry_delay(3, Some(secs(1.0))), secs(2.0));
        assert_eq!(retry_delay(1, Some(secs(3600.0))), BACKOFF_MAX);
        assert_eq!(retry_delay(2, None), secs(1.0));
    }

    #[test]
    fn only_429_and_5xx_are_retried() {
        assert_eq!(verdict(200), Verdict::Delivered);
        assert_eq!(verdict(204), Verdict::Delivered);
        assert_eq!(verdict(429), Verdict::Retry("http_429"));
        assert_eq!(verdict(500), Verdict::Retry("http_5xx"));
        assert_eq!(verdict(503), Verdict::Retry("http_5xx"));
        assert_eq!(verdict(400), Verdict::Refused("http_4xx"));
        assert_eq!(verdict(404), Verdict::Refused("http_4xx"));
        assert_eq!(verdict(301), Verdict::Refused("http_other"));
        assert_eq!(verdict(101), Verdict::Refused("http_other"));
    }

    #[test]
    fn only_http_urls_with_a_host_and_logs_show_only_the_origin() {
        let timeout = Duration::from_secs(10);
        assert!(Deliverer::new("ftp://example.com/x", timeout, 1).is_err());
        assert!(Deliverer::new("not a url", timeout, 1).is_err());
        assert!(Deliverer::new("unix:relay.sock", timeout, 1).is_err());
        let d = Deliverer::new(
            "https://user:pw@hooks.example.com:8443/t0ken?k=v",
            timeout,
            1,
        )
        .expect("a valid URL");
        assert_eq!(d.origin(), "https://hooks.example.com:8443");
    }
}
