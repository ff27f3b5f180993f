//! Prometheus metrics of a replica, served on its own `/metrics`.

use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric a replica exports.
#[derive(Debug)]
pub struct ReplicaMetrics {
    registry: Registry,
    /// Inference requests completed by the model, in any batch.
    pub requests: Counter,
    /// Model runs; fewer than `requests` when batches formed.
    pub batches: Counter,
    /// Samples per model run.
    pub batch_size: Histogram,
    /// Time of one model run, in seconds.
    pub inference_seconds: Histogram,
    /// Requests waiting for a batch.
    pub queue_depth: Gauge<i64, AtomicI64>,
}

impl Default for ReplicaMetrics {
    fn default() -> Self {
        ReplicaMetrics::new()
    }
}

impl ReplicaMetrics {
    /// Creates the metrics under the `fleet_replica_` prefix.
    pub fn new() -> ReplicaMetrics {
        let mut registry = Registry::with_prefix("fleet_replica");
        let requests = Counter::default();
        let batches = Counter::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        let inference_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let queue_depth = Gauge::default();
        registry.register(
            "requests",
            "Inference requests answered by the model",
            requests.clone(),
        );
        registry.register(
            "batches",
            "Model runs, each over one batch",
            batches.clone(),
        );
        registry.register("batch_size", "Samples per model run", batch_size.clone());
        registry.register(
            "inference_seconds",
            "Time of one model run",
            inference_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a batch",
            queue_depth.clone(),
        );
        ReplicaMetrics {
            registry,
            requests,
            batches,
            batch_size,
            inference_seconds,
            queue_depth,
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
