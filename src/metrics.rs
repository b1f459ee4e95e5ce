//! Prometheus metrics at `GET /_/metrics`, through the `metrics` facade.
//!
//! Counters and histograms are recorded where things happen (document owners, transports,
//! error responses); gauges of current state are set when the endpoint is scraped.
//! Without an installed recorder (library use, unit tests) every call is a no-op.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const BATCH_WRITES: &str = "relay_batch_writes";
pub const APPLY_SECONDS: &str = "relay_apply_seconds";
pub const PERSIST_SECONDS: &str = "relay_persist_seconds";
pub const OWNER_TURNS: &str = "relay_owner_turns_total";
pub const LOADED: &str = "relay_documents_loaded_total";
pub const EVICTED: &str = "relay_documents_evicted_total";
pub const COMPACTIONS: &str = "relay_compactions_total";
pub const OVERFLOWS: &str = "relay_subscriber_overflows_total";
pub const REJECTED: &str = "relay_rejected_total";
pub const AUTH_FAILURES: &str = "relay_auth_failures_total";

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide recorder once; later calls return the same handle.
///
/// The recorder keeps every histogram sample until the samples are folded into buckets, which
/// happens on a scrape or an upkeep. Without a scraper they would pile up forever (measured in
/// the soak: megabytes per minute), so the first install starts an upkeep task on the current
/// Tokio runtime.
pub fn install() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_WRITES.into()), &sizes))
                .and_then(|b| b.install_recorder());
            match built {
                Ok(handle) => {
                    let upkeep = handle.clone();
                    tokio::spawn(async move {
                        let mut every = tokio::time::interval(UPKEEP_EVERY);
                        loop {
                            every.tick().await;
                            upkeep.run_upkeep();
                        }
                    });
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics are unavailable");
                    None
                }
            }
        })
        .clone()
}

/// Counts a refused request, WebSocket message or connection by its stable reason.
pub fn rejected(reason: &'static str) {
    metrics::counter!(REJECTED, "reason" => reason).increment(1);
}
