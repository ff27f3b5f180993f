//! Prometheus metrics of the server, served on `/metrics` in the text exposition format.
//!
//! Labels never carry device ids, so the number of series stays fixed however large the
//! fleet grows.

use std::fmt::Write;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use fleet_wire::FallbackCounts;

use crate::store::updates::EventOutcome;

/// Devices whose clock differs from the server's by more than this are counted as
/// skewed.
pub const CLOCK_SKEW_LIMIT_MS: i64 = 5 * 60 * 1000;

/// Label set naming the outcome of an ingested message.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: Outcome,
}

/// Label values of [`OutcomeLabel`].
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Stored for the first time.
    Stored,
    /// Already stored under the same (device, seq); counted but not stored again.
    Duplicate,
    /// Undecodable, oversized or not matching its topic; dropped.
    Rejected,
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            Outcome::Stored => "stored",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected => "rejected",
        };
        encoder.write_str(value)
    }
}

/// Label set naming why a device's inference API forwarded a request to the cloud, or
/// why the cloud did not respond.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabel {
    pub reason: FallbackReason,
}

/// Label values of [`FallbackLabel`], one per field of [`FallbackCounts`].
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum FallbackReason {
    LocalError,
    Overloaded,
    Slow,
    LowConfidence,
    CloudUnavailable,
    CloudRejected,
}

impl FallbackReason {
    const ALL: [FallbackReason; 6] = [
        FallbackReason::LocalError,
        FallbackReason::Overloaded,
        FallbackReason::Slow,
        FallbackReason::LowConfidence,
        FallbackReason::CloudUnavailable,
        FallbackReason::CloudRejected,
    ];

    fn count_in(self, counts: &FallbackCounts) -> u32 {
        match self {
            FallbackReason::LocalError => counts.local_error,
            FallbackReason::Overloaded => counts.overloaded,
            FallbackReason::Slow => counts.slow,
            FallbackReason::LowConfidence => counts.low_confidence,
            FallbackReason::CloudUnavailable => counts.cloud_unavailable,
            FallbackReason::CloudRejected => counts.cloud_rejected,
        }
    }
}

impl EncodeLabelValue for FallbackReason {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            FallbackReason::LocalError => "local_error",
            FallbackReason::Overloaded => "overloaded",
            FallbackReason::Slow => "slow",
            FallbackReason::LowConfidence => "low_confidence",
            FallbackReason::CloudUnavailable => "cloud_unavailable",
            FallbackReason::CloudRejected => "cloud_rejected",
        };
        encoder.write_str(value)
    }
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    messages: Family<OutcomeLabel, Counter>,
    /// Batch writes that failed and were retried.
    pub write_errors: Counter,
    /// Time to write and commit one batch, in seconds.
    pub batch_seconds: Histogram,
    /// Receive time minus device time of each telemetry message, in seconds.
    pub ingest_lag_seconds: Histogram,
    /// Telemetry messages whose device clock was off by more than
    /// [`CLOCK_SKEW_LIMIT_MS`].
    pub clock_skewed: Counter,
    /// Messages received from the broker and not yet committed.
    pub queue_depth: Gauge<i64, AtomicI64>,
    /// 1 while the ingest client is connected to the broker.
    pub broker_connected: Gauge<i64, AtomicI64>,
    /// Embedded-broker connections refused for bad or missing credentials.
    pub broker_logins_refused: Counter,
    /// Embedded-broker clients disconnected for a publish or subscribe outside their
    /// topics.
    pub broker_acl_denied: Counter,
    /// HTTP requests to operator routes without valid credentials.
    pub unauthorized_requests: Counter,
    /// Console logins with a wrong user name or password.
    pub login_failed: Counter,
    /// Console logins refused by the per-name rate limit.
    pub login_throttled: Counter,
    /// Metrics of over-the-air updates.
    pub updates: UpdateMetrics,
    /// Metrics of remote configuration.
    pub remote_config: crate::remote_config::metrics::ConfigMetrics,
    /// Hard-sample uploads by outcome: stored, duplicate (already stored) or rejected.
    samples: Family<OutcomeLabel, Counter>,
    /// Metrics of the inference gateway, exported empty when it does not run.
    pub gateway: crate::gateway::GatewayMetrics,
    /// Cloud fallback counts that devices reported in their telemetry, by reason.
    device_fallbacks: Family<FallbackLabel, Counter>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics::new()
    }
}

impl ServerMetrics {
    /// Creates the metrics and registers them under the `fleet` prefix.
    pub fn new() -> ServerMetrics {
        let mut registry = Registry::with_prefix("fleet");
        let messages = Family::<OutcomeLabel, Counter>::default();
        // Every outcome is exported from the start, as 0, so a query or alert on one
        // that has not happened yet finds a series.
        let samples = Family::<OutcomeLabel, Counter>::default();
        let device_fallbacks = Family::<FallbackLabel, Counter>::default();
        for reason in FallbackReason::ALL {
            let _ = device_fallbacks.get_or_create(&FallbackLabel { reason });
        }
        for outcome in [Outcome::Stored, Outcome::Duplicate, Outcome::Rejected] {
            let _ = messages.get_or_create(&OutcomeLabel { outcome });
            let _ = samples.get_or_create(&OutcomeLabel { outcome });
        }
        let write_errors = Counter::default();
        let batch_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let ingest_lag_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let clock_skewed = Counter::default();
        let queue_depth = Gauge::default();
        let broker_connected = Gauge::default();
        let access = AccessMetrics::default();
        access.register(&mut registry);
        let updates = UpdateMetrics::new();
        updates.register(&mut registry);
        let remote_config = crate::remote_config::metrics::ConfigMetrics::default();
        remote_config.register(&mut registry);
        let gateway = crate::gateway::GatewayMetrics::default();
        gateway.register(&mut registry);
        registry.register(
            "ingest_messages",
            "MQTT messages taken in, by outcome",
            messages.clone(),
        );
        registry.register(
            "device_fallbacks",
            "Requests to devices' inference APIs forwarded to the cloud, by reason, \
             and those answered locally because the cloud did not answer",
            device_fallbacks.clone(),
        );
        registry.register(
            "sample_uploads",
            "Hard-sample uploads, by outcome",
            samples.clone(),
        );
        registry.register(
            "ingest_write_errors",
            "Batch writes that failed and were retried",
            write_errors.clone(),
        );
        registry.register(
            "ingest_batch_seconds",
            "Time to write and commit one batch",
            batch_seconds.clone(),
        );
        registry.register(
            "ingest_lag_seconds",
            "Receive time minus device time of telemetry messages",
            ingest_lag_seconds.clone(),
        );
        registry.register(
            "ingest_clock_skewed",
            "Telemetry messages whose device clock was off by more than five minutes",
            clock_skewed.clone(),
        );
        registry.register(
            "ingest_queue_depth",
            "Messages received and not yet committed",
            queue_depth.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while the ingest client is connected to the broker",
            broker_connected.clone(),
        );
        ServerMetrics {
            registry,
            messages,
            write_errors,
            batch_seconds,
            ingest_lag_seconds,
            clock_skewed,
            queue_depth,
            broker_connected,
            broker_logins_refused: access.broker_logins_refused,
            broker_acl_denied: access.broker_acl_denied,
            unauthorized_requests: access.unauthorized_requests,
            login_failed: access.login_failed,
            login_throttled: access.login_throttled,
            updates,
            remote_config,
            samples,
            gateway,
            device_fallbacks,
        }
    }

    /// Adds the cloud fallback counts of one telemetry message.
    pub fn count_fallbacks(&self, counts: &FallbackCounts) {
        for reason in FallbackReason::ALL {
            let count = reason.count_in(counts);
            if count > 0 {
                self.device_fallbacks
                    .get_or_create(&FallbackLabel { reason })
                    .inc_by(u64::from(count));
            }
        }
    }

    /// Counts messages with one outcome.
    pub fn count(&self, outcome: Outcome, messages: u64) {
        self.messages
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(messages);
    }

    /// Counts one hard-sample upload with `outcome`.
    pub fn count_sample(&self, outcome: Outcome) {
        self.samples.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Returns how many messages had `outcome` since the server started.
    pub fn total(&self, outcome: Outcome) -> u64 {
        self.messages.get_or_create(&OutcomeLabel { outcome }).get()
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Label set naming what an update event did to its update.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpdateEventLabel {
    pub outcome: EventOutcome,
}

impl EncodeLabelValue for EventOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            EventOutcome::Applied => "applied",
            EventOutcome::Stale => "stale",
            EventOutcome::UnknownUpdate => "unknown_update",
        };
        encoder.write_str(value)
    }
}

/// Counters of over-the-air updates.
#[derive(Debug, Default)]
pub struct UpdateMetrics {
    events: Family<UpdateEventLabel, Counter>,
    /// Install commands handed to the MQTT client, first sends and resends.
    pub commands_sent: Counter,
    /// Install commands the MQTT client did not take.
    pub commands_failed: Counter,
    /// Bundle uploads rejected as empty, oversized, unreadable or wrongly signed.
    pub bundles_rejected: Counter,
}

impl UpdateMetrics {
    fn new() -> UpdateMetrics {
        let metrics = UpdateMetrics::default();
        for outcome in [
            EventOutcome::Applied,
            EventOutcome::Stale,
            EventOutcome::UnknownUpdate,
        ] {
            let _ = metrics.events.get_or_create(&UpdateEventLabel { outcome });
        }
        metrics
    }

    /// Counts one stored update event by what it did to its update.
    pub fn count_event(&self, outcome: EventOutcome) {
        self.events
            .get_or_create(&UpdateEventLabel { outcome })
            .inc();
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "update_events",
            "Update events stored, by what they did to their update",
            self.events.clone(),
        );
        let counters = [
            (
                "update_commands_sent",
                "Install commands handed to the MQTT client, first sends and resends",
                &self.commands_sent,
            ),
            (
                "update_commands_failed",
                "Install commands the MQTT client did not take",
                &self.commands_failed,
            ),
            (
                "bundle_uploads_rejected",
                "Bundle uploads rejected as empty, oversized, unreadable or wrongly signed",
                &self.bundles_rejected,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}

/// Counters of refused logins and requests.
#[derive(Debug, Default)]
struct AccessMetrics {
    broker_logins_refused: Counter,
    broker_acl_denied: Counter,
    unauthorized_requests: Counter,
    login_failed: Counter,
    login_throttled: Counter,
}

impl AccessMetrics {
    fn register(&self, registry: &mut Registry) {
        let counters = [
            (
                "broker_logins_refused",
                "Embedded-broker connections refused for bad or missing credentials",
                &self.broker_logins_refused,
            ),
            (
                "broker_acl_denied",
                "Embedded-broker clients disconnected for using a topic outside their rights",
                &self.broker_acl_denied,
            ),
            (
                "http_unauthorized_requests",
                "HTTP requests to operator routes without valid credentials",
                &self.unauthorized_requests,
            ),
            (
                "login_failed",
                "Console logins with a wrong user name or password",
                &self.login_failed,
            ),
            (
                "login_throttled",
                "Console logins refused by the per-name rate limit",
                &self.login_throttled,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_counts_by_outcome() {
        let metrics = ServerMetrics::new();
        metrics.count(Outcome::Stored, 7);
        metrics.count(Outcome::Rejected, 2);
        metrics.ingest_lag_seconds.observe(0.004);
        let text = metrics.render();
        assert!(
            text.contains("fleet_ingest_messages_total{outcome=\"stored\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("fleet_ingest_messages_total{outcome=\"rejected\"} 2"),
            "{text}"
        );
        assert!(text.contains("fleet_ingest_lag_seconds_count 1"), "{text}");
        assert_eq!(metrics.total(Outcome::Stored), 7);
        assert_eq!(metrics.total(Outcome::Duplicate), 0);
    }

    #[test]
    fn fallback_counts_are_summed_by_reason() {
        let metrics = ServerMetrics::new();
        let counts = FallbackCounts {
            low_confidence: 3,
            cloud_unavailable: 1,
            ..FallbackCounts::default()
        };
        metrics.count_fallbacks(&counts);
        metrics.count_fallbacks(&counts);
        let text = metrics.render();
        for expected in [
            "fleet_device_fallbacks_total{reason=\"low_confidence\"} 6",
            "fleet_device_fallbacks_total{reason=\"cloud_unavailable\"} 2",
            "fleet_device_fallbacks_total{reason=\"slow\"} 0",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
    }
}
