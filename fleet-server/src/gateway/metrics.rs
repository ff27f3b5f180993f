//! Prometheus metrics of the inference gateway, registered in the server's registry.
//!
//! Labels are bounded: `model` takes only configured model names (requests for other
//! names count under `model="unknown"`), `code` only the HTTP status codes the gateway
//! returns, and `direction` and `reason` only the values of [`ScaleDirection`] and the
//! autoscaler's reasons.

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Model label value for requests naming a model that is not configured.
pub const UNKNOWN_MODEL: &str = "unknown";

/// Labels of a finished gateway request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    pub code: String,
}

/// Labels naming a model.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

/// Labels of backends in one state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendStateLabels {
    pub model: String,
    pub state: String,
}

/// Labels of an autoscaler decision.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub model: String,
    pub direction: String,
    pub reason: String,
}

/// Whether a decision adds or removes replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDirection {
    Up,
    Down,
}

impl ScaleDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleDirection::Up => "up",
            ScaleDirection::Down => "down",
        }
    }
}

/// Every metric of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    /// Finished requests by model and status code.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from arrival to response of successful inference requests, in seconds.
    pub request_seconds: Family<ModelLabel, Histogram>,
    /// Time inference requests passed on from a backend spent in the gateway itself,
    /// in seconds: from arrival to response, less the time waiting for a backend and
    /// the time spent on backends.
    pub overhead_seconds: Family<ModelLabel, Histogram>,
    /// Requests sent to a backend and not yet completed.
    pub in_flight: Family<ModelLabel, Gauge<i64, AtomicI64>>,
    /// Requests waiting in the gateway for a free backend.
    pub queue_depth: Family<ModelLabel, Gauge<i64, AtomicI64>>,
    /// Requests sent again to another backend after the first failed before responding.
    pub retries: Family<ModelLabel, Counter>,
    /// Backends by state: starting, ready, unhealthy or draining.
    pub backends: Family<BackendStateLabels, Gauge<i64, AtomicI64>>,
    /// Local replicas the autoscaler wants.
    pub desired_replicas: Family<ModelLabel, Gauge<i64, AtomicI64>>,
    /// Backends the load calls for, external ones included and before the replica
    /// bounds: what an outside scaler such as KEDA should run.
    pub desired_backends: Family<ModelLabel, Gauge<i64, AtomicI64>>,
    /// p95 request latency over the autoscaler's stable window, in milliseconds.
    pub latency_p95_ms: Family<ModelLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while the model's autoscaler is in panic mode.
    pub panic_mode: Family<ModelLabel, Gauge<i64, AtomicI64>>,
    /// Autoscaler decisions that changed the replica count, by direction and reason.
    pub scale_decisions: Family<DecisionLabels, Counter>,
    /// Requests without valid credentials.
    pub unauthorized: Counter,
    /// Requests refused by the per-principal rate limit.
    pub throttled: Counter,
    /// Principals tracked by the rate limiter.
    pub limiter_keys: Gauge<i64, AtomicI64>,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        GatewayMetrics {
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            overhead_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_025, 2.0, 16))
            }),
            in_flight: Family::default(),
            queue_depth: Family::default(),
            retries: Family::default(),
            backends: Family::default(),
            desired_replicas: Family::default(),
            desired_backends: Family::default(),
            latency_p95_ms: Family::default(),
            panic_mode: Family::default(),
            scale_decisions: Family::default(),
            unauthorized: Counter::default(),
            throttled: Counter::default(),
            limiter_keys: Gauge::default(),
        }
    }
}

impl GatewayMetrics {
    /// Registers every metric under `gateway_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("gateway");
        registry.register(
            "requests",
            "Finished gateway requests by model and HTTP status code",
            self.requests.clone(),
        );
        registry.register(
            "request_seconds",
            "Time from arrival to response of successful inference requests",
            self.request_seconds.clone(),
        );
        registry.register(
            "overhead_seconds",
            "Time inference requests passed on from a backend spent in the gateway itself, less waiting for and on backends",
            self.overhead_seconds.clone(),
        );
        registry.register(
            "in_flight",
            "Requests sent to a backend and not yet completed",
            self.in_flight.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting in the gateway for a free backend",
            self.queue_depth.clone(),
        );
        registry.register(
            "retries",
            "Requests sent again to another backend after the first failed before responding",
            self.retries.clone(),
        );
        registry.register(
            "backends",
            "Backends by state: starting, ready, unhealthy or draining",
            self.backends.clone(),
        );
        registry.register(
            "desired_replicas",
            "Local replicas the autoscaler wants",
            self.desired_replicas.clone(),
        );
        registry.register(
            "desired_backends",
            "Backends the load calls for, external ones included, before the replica bounds",
            self.desired_backends.clone(),
        );
        registry.register(
            "latency_p95_ms",
            "p95 request latency over the autoscaler's stable window in milliseconds",
            self.latency_p95_ms.clone(),
        );
        registry.register(
            "panic_mode",
            "1 while the model's autoscaler is in panic mode",
            self.panic_mode.clone(),
        );
        registry.register(
            "scale_decisions",
            "Autoscaler decisions that changed the replica count, by direction and reason",
            self.scale_decisions.clone(),
        );
        registry.register(
            "unauthorized_requests",
            "Gateway requests without valid credentials",
            self.unauthorized.clone(),
        );
        registry.register(
            "throttled_requests",
            "Gateway requests refused by the per-principal rate limit",
            self.throttled.clone(),
        );
        registry.register(
            "limiter_keys",
            "Principals tracked by the gateway's rate limiter",
            self.limiter_keys.clone(),
        );
    }

    /// Counts a finished request.
    pub fn count_request(&self, model: &str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                code: code.to_string(),
            })
            .inc();
    }

    /// Returns the label set of `model`.
    pub fn model(model: &str) -> ModelLabel {
        ModelLabel {
            model: model.to_owned(),
        }
    }
}
