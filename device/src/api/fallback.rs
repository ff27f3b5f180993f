//! Cloud fallback: forwards an inference request to the fleet server's gateway when the
//! local model cannot produce a good result, and returns the gateway's response instead.
//!
//! A request goes to the cloud, as the client sent it, in four cases: the local model
//! fails, more requests are running locally than allowed, the recent local latency is
//! over its objective, or the lowest top-1 confidence of the local result is under the
//! threshold. A [`Breaker`] stops sending while the cloud fails, so the local result
//! comes back at once, flagged as such.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_wire::FallbackCounts;
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::breaker::{Breaker, BreakerConfig, BreakerState, Permit};
use super::infer::{InferResponse, JSON_LENGTH_HEADER};
use super::{ApiError, LocalRun, MAX_BODY_BYTES};
use crate::settings::LiveSettings;

/// Response header naming where the inference ran: `local` or `cloud`.
pub const SOURCE_HEADER: &str = "fleet-inference-source";
/// Response header of a cloud response naming why the request went to the cloud.
pub const REASON_HEADER: &str = "fleet-fallback-reason";
/// Response header of a local result returned because the cloud failed: `unavailable`
/// or `rejected`.
pub const FALLBACK_HEADER: &str = "fleet-fallback";

/// Weight of the newest request in the local latency average.
const LATENCY_EWMA_WEIGHT: f64 = 0.2;
/// Age after which a latency average over the objective no longer sends requests to the
/// cloud, so one request runs locally again and refreshes it.
const LATENCY_REFRESH: Duration = Duration::from_secs(1);
/// Maximum cool-down of the circuit breaker, unless the configured one is longer.
const MAX_COOLDOWN: Duration = Duration::from_secs(60);
/// Characters of a cloud error body kept for the log and the error message.
const CLOUD_ERROR_CHARS: usize = 200;

/// When requests go to the cloud, and how long the cloud may take.
#[derive(Debug, Clone, PartialEq)]
pub struct FallbackPolicy {
    /// Model the gateway serves as the fallback; the local model's name when `None`.
    pub model: Option<String>,
    /// Top-1 confidence under which a batch's lowest result sends the request to the
    /// cloud.
    pub threshold: Option<f32>,
    /// Requests running locally at most; one more goes to the cloud.
    pub max_local_queue: Option<usize>,
    /// Local latency average over which requests go to the cloud.
    pub latency_slo: Option<Duration>,
    /// Time limit of one request to the cloud, body included.
    pub timeout: Duration,
    /// Consecutive cloud failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker first stays open; it doubles after each failed probe.
    pub breaker_cooldown: Duration,
}

impl Default for FallbackPolicy {
    fn default() -> FallbackPolicy {
        FallbackPolicy {
            model: None,
            threshold: None,
            max_local_queue: None,
            latency_slo: None,
            timeout: Duration::from_millis(2000),
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

/// Reason a request went to the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FallbackReason {
    LocalError,
    Overloaded,
    Slow,
    LowConfidence,
}

impl FallbackReason {
    /// Returns the name used in the reason header and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::LocalError => "local_error",
            FallbackReason::Overloaded => "overloaded",
            FallbackReason::Slow => "slow",
            FallbackReason::LowConfidence => "low_confidence",
        }
    }
}

/// Fallback counters since the last telemetry message, shared with the reporter.
#[derive(Debug, Default)]
pub struct FallbackCounters {
    local_error: AtomicU32,
    overloaded: AtomicU32,
    slow: AtomicU32,
    low_confidence: AtomicU32,
    cloud_unavailable: AtomicU32,
    cloud_rejected: AtomicU32,
}

impl FallbackCounters {
    fn count(&self, reason: FallbackReason) {
        let counter = match reason {
            FallbackReason::LocalError => &self.local_error,
            FallbackReason::Overloaded => &self.overloaded,
            FallbackReason::Slow => &self.slow,
            FallbackReason::LowConfidence => &self.low_confidence,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the counts so far without resetting them.
    pub fn snapshot(&self) -> FallbackCounts {
        self.read(|counter| counter.load(Ordering::Relaxed))
    }

    /// Returns the counts so far and starts a new interval.
    pub fn take(&self) -> FallbackCounts {
        self.read(|counter| counter.swap(0, Ordering::Relaxed))
    }

    fn read(&self, read: impl Fn(&AtomicU32) -> u32) -> FallbackCounts {
        FallbackCounts {
            local_error: read(&self.local_error),
            overloaded: read(&self.overloaded),
            slow: read(&self.slow),
            low_confidence: read(&self.low_confidence),
            cloud_unavailable: read(&self.cloud_unavailable),
            cloud_rejected: read(&self.cloud_rejected),
        }
    }
}

/// Failure of a request sent to the cloud.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CloudError {
    #[error("circuit breaker open after repeated cloud failures")]
    Open,
    #[error("cloud request to {url} failed: {message}")]
    Unavailable { url: String, message: String },
    #[error("cloud rejected the request to {url} with status {status}: {message}")]
    Rejected {
        url: String,
        status: u16,
        message: String,
    },
}

impl CloudError {
    /// Returns the value of the [`FALLBACK_HEADER`] on the local answer.
    fn flag(&self) -> &'static str {
        match self {
            CloudError::Open | CloudError::Unavailable { .. } => "unavailable",
            CloudError::Rejected { .. } => "rejected",
        }
    }
}

/// The cloud side of the local API: where requests go, the breaker, the latency average,
/// the requests running locally and the counters.
#[derive(Debug)]
pub struct Fallback {
    server: String,
    token: Option<String>,
    policy: FallbackPolicy,
    agent: ureq::Agent,
    breaker: Breaker,
    latency: LatencyAverage,
    local_in_progress: AtomicUsize,
    counters: std::sync::Arc<FallbackCounters>,
    rejections: AtomicU64,
    /// Settings in use, whose `fallback_threshold` remote configuration may change;
    /// without them the policy's threshold applies.
    settings: Option<watch::Receiver<LiveSettings>>,
}

impl Fallback {
    /// Creates the fallback to the gateway at `server` (`http://HOST:PORT`), sending
    /// `token` as a bearer token when given, and counting into `counters`.
    pub fn new(
        server: String,
        token: Option<String>,
        policy: FallbackPolicy,
        counters: std::sync::Arc<FallbackCounters>,
    ) -> Fallback {
        let agent = ureq::AgentBuilder::new()
            .timeout(policy.timeout)
            .redirects(0)
            .build();
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: policy.breaker_failures,
            cooldown: policy.breaker_cooldown,
            max_cooldown: MAX_COOLDOWN.max(policy.breaker_cooldown),
            // Every request ends by its timeout, so twice that means the probe's
            // client went away before the breaker heard back.
            probe_timeout: policy.timeout * 2,
        });
        Fallback {
            server: server.trim_end_matches('/').to_string(),
            token,
            latency: LatencyAverage::new(policy.latency_slo),
            policy,
            agent,
            breaker,
            local_in_progress: AtomicUsize::new(0),
            counters,
            rejections: AtomicU64::new(0),
            settings: None,
        }
    }

    /// Takes the low-confidence threshold from `settings` from now on, so a remote
    /// configuration change applies to the next request.
    pub fn with_settings(mut self, settings: watch::Receiver<LiveSettings>) -> Fallback {
        self.settings = Some(settings);
        self
    }

    /// Returns the top-1 confidence under which a request goes to the cloud, if any.
    fn threshold(&self) -> Option<f32> {
        match &self.settings {
            Some(settings) => settings.borrow().fallback_threshold,
            None => self.policy.threshold,
        }
    }

    /// Returns the counters this fallback adds to.
    pub fn counters(&self) -> &FallbackCounters {
        &self.counters
    }

    /// Returns the circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Answers a checked request locally or from the cloud, as the policy decides.
    pub(super) async fn serve(
        &self,
        local: LocalRun,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        let request = CloudRequest {
            model: self
                .policy
                .model
                .clone()
                .unwrap_or_else(|| local.model_name()),
            request_id: local.request_id(),
            headers,
            body,
        };

        let mut earlier_failure = None;
        let mut slot = LocalSlot::enter(&self.local_in_progress);
        if let Some(reason) = self.reason_before_running(slot.count) {
            drop(slot);
            match self.forward(reason, &request).await {
                Ok(answer) => return answer,
                Err(error) => earlier_failure = Some(error),
            }
            slot = LocalSlot::enter(&self.local_in_progress);
        }

        let started = Instant::now();
        let result = local.run().await;
        drop(slot);
        let answer = match result {
            Ok(answer) => answer,
            Err(local_error) => {
                let cloud_error = match earlier_failure {
                    Some(error) => error,
                    None => match self.forward(FallbackReason::LocalError, &request).await {
                        Ok(answer) => return answer,
                        Err(error) => error,
                    },
                };
                return ApiError::new(
                    local_error.status,
                    format!(
                        "{}; cloud fallback failed too: {cloud_error}",
                        local_error.message
                    ),
                )
                .into_response();
            }
        };
        self.latency.record(started.elapsed(), Instant::now());

        let low = self
            .threshold()
            .is_some_and(|threshold| answer.lowest_confidence < threshold);
        if low && earlier_failure.is_none() {
            match self.forward(FallbackReason::LowConfidence, &request).await {
                Ok(answer) => return answer,
                Err(error) => earlier_failure = Some(error),
            }
        }
        local_response(
            answer.response,
            earlier_failure.as_ref().map(CloudError::flag),
        )
    }

    /// Returns why a request should go to the cloud without running locally, given the
    /// number of requests running locally with it.
    fn reason_before_running(&self, in_progress: usize) -> Option<FallbackReason> {
        if self
            .policy
            .max_local_queue
            .is_some_and(|max| in_progress > max)
        {
            return Some(FallbackReason::Overloaded);
        }
        if self.latency.is_slow(Instant::now()) {
            return Some(FallbackReason::Slow);
        }
        None
    }

    /// Sends the request to the gateway when the breaker allows it, and returns the
    /// gateway's answer as the response.
    async fn forward(
        &self,
        reason: FallbackReason,
        request: &CloudRequest<'_>,
    ) -> Result<Response, CloudError> {
        self.counters.count(reason);
        let Some(permit) = self.breaker.try_acquire(Instant::now()) else {
            self.counters
                .cloud_unavailable
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                reason = reason.as_str(),
                request_id = request.request_id.as_deref(),
                "cloud fallback skipped: circuit breaker open"
            );
            return Err(CloudError::Open);
        };

        let url = format!("{}/v2/models/{}/infer", self.server, request.model);
        let outcome = self.send(&url, request).await;
        self.record_outcome(reason, permit, request, &outcome);
        let answer = outcome?;
        tracing::debug!(
            reason = reason.as_str(),
            model = %request.model,
            request_id = request.request_id.as_deref(),
            "inference API request answered by the cloud"
        );
        Ok(answer.into_response(reason))
    }

    /// Sends one request to the gateway on tokio's blocking pool.
    async fn send(&self, url: &str, request: &CloudRequest<'_>) -> Result<CloudAnswer, CloudError> {
        let mut call = self.agent.post(url);
        for name in [header::CONTENT_TYPE.as_str(), JSON_LENGTH_HEADER] {
            if let Some(value) = request.headers.get(name).and_then(|v| v.to_str().ok()) {
                call = call.set(name, value);
            }
        }
        if let Some(token) = &self.token {
            call = call.set("authorization", &format!("Bearer {token}"));
        }
        let body = request.body.clone();
        let owned_url = url.to_string();
        tokio::task::spawn_blocking(move || send_blocking(call, &owned_url, &body))
            .await
            .unwrap_or_else(|error| {
                Err(CloudError::Unavailable {
                    url: url.to_string(),
                    message: format!("request task failed: {error}"),
                })
            })
    }

    /// Updates the breaker and the counters with how a request to the cloud went, and
    /// logs what changed.
    fn record_outcome(
        &self,
        reason: FallbackReason,
        permit: Permit,
        request: &CloudRequest<'_>,
        outcome: &Result<CloudAnswer, CloudError>,
    ) {
        match outcome {
            // The cloud answered, even if with a rejection, so it is reachable.
            Ok(_) | Err(CloudError::Rejected { .. }) => {
                let was_closed = matches!(self.breaker.state(), BreakerState::Closed { .. });
                self.breaker.record_success();
                if permit == Permit::Probe || !was_closed {
                    tracing::info!(model = %request.model, "cloud fallback circuit closed");
                }
            }
            Err(_) => {
                self.counters
                    .cloud_unavailable
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        match outcome {
            Ok(_) | Err(CloudError::Open) => {}
            Err(error @ CloudError::Rejected { .. }) => {
                self.counters.cloud_rejected.fetch_add(1, Ordering::Relaxed);
                // Rejections do not open the breaker, so their log is rate-limited here.
                let count = self.rejections.fetch_add(1, Ordering::Relaxed) + 1;
                if count <= 10 || count.is_multiple_of(100) {
                    tracing::warn!(
                        reason = reason.as_str(),
                        request_id = request.request_id.as_deref(),
                        rejected_total = count,
                        %error,
                        "cloud fallback rejected; answering locally"
                    );
                }
            }
            Err(error @ CloudError::Unavailable { .. }) => {
                let opened = self.breaker.record_failure(Instant::now());
                // Failures stop once the breaker opens, so at most `breaker_failures`
                // lines and one per probe come out while the cloud is down.
                tracing::warn!(
                    reason = reason.as_str(),
                    request_id = request.request_id.as_deref(),
                    probe = permit == Permit::Probe,
                    %error,
                    "cloud fallback failed; answering locally"
                );
                if opened && let BreakerState::Open { until } = self.breaker.state() {
                    let retry_in = until.saturating_duration_since(Instant::now());
                    tracing::warn!(
                        model = %request.model,
                        retry_in_ms = retry_in.as_millis() as u64,
                        "cloud fallback circuit opened"
                    );
                }
            }
        }
    }
}

/// Contents of a request to the cloud besides the URL.
struct CloudRequest<'a> {
    model: String,
    request_id: Option<String>,
    headers: &'a HeaderMap,
    body: Bytes,
}

/// A successful answer of the cloud, passed on as it came.
#[derive(Debug)]
struct CloudAnswer {
    status: StatusCode,
    content_type: Option<String>,
    json_length: Option<String>,
    body: Vec<u8>,
}

impl CloudAnswer {
    fn into_response(self, reason: FallbackReason) -> Response {
        let mut headers = HeaderMap::new();
        let copied = [
            (header::CONTENT_TYPE, self.content_type),
            (
                HeaderName::from_static(JSON_LENGTH_HEADER),
                self.json_length,
            ),
        ];
        for (name, value) in copied {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, value);
            }
        }
        headers.insert(SOURCE_HEADER, HeaderValue::from_static("cloud"));
        headers.insert(REASON_HEADER, HeaderValue::from_static(reason.as_str()));
        (self.status, headers, self.body).into_response()
    }
}

/// Sends the request and reads the whole answer, classifying every failure.
fn send_blocking(call: ureq::Request, url: &str, body: &[u8]) -> Result<CloudAnswer, CloudError> {
    let unavailable = |message: String| CloudError::Unavailable {
        url: url.to_string(),
        message,
    };
    let response = match call.send_bytes(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(status, response)) => {
            let message = error_text(response);
            return Err(if status == 429 || status >= 500 {
                unavailable(format!("status {status}: {message}"))
            } else {
                CloudError::Rejected {
                    url: url.to_string(),
                    status,
                    message,
                }
            });
        }
        Err(ureq::Error::Transport(error)) => return Err(unavailable(error.to_string())),
    };
    let status = response.status();
    if !(200..300).contains(&status) {
        return Err(CloudError::Rejected {
            url: url.to_string(),
            status,
            message: error_text(response),
        });
    }
    let content_type = response.header("content-type").map(str::to_string);
    let json_length = response.header(JSON_LENGTH_HEADER).map(str::to_string);
    let mut answer = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(response.into_reader(), MAX_BODY_BYTES as u64 + 1),
        &mut answer,
    )
    .map_err(|error| unavailable(format!("reading the answer failed: {error}")))?;
    if answer.len() > MAX_BODY_BYTES {
        return Err(unavailable(format!(
            "answer is larger than the limit of {MAX_BODY_BYTES} bytes"
        )));
    }
    Ok(CloudAnswer {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        content_type,
        json_length,
        body: answer,
    })
}

/// Returns the start of an error answer's body, for messages.
fn error_text(response: ureq::Response) -> String {
    let text = response.into_string().unwrap_or_default();
    let text: String = text.chars().take(CLOUD_ERROR_CHARS).collect();
    if text.is_empty() {
        "empty body".into()
    } else {
        text
    }
}

/// Builds the response of a local answer, flagged with `fallback` when the cloud should
/// have answered but could not.
pub(super) fn local_response(mut response: InferResponse, fallback: Option<&str>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(SOURCE_HEADER, HeaderValue::from_static("local"));
    if let Some(flag) = fallback {
        if let Ok(value) = HeaderValue::from_str(flag) {
            headers.insert(FALLBACK_HEADER, value);
        }
        let parameters = response.parameters.get_or_insert_with(Map::new);
        parameters.insert(SOURCE_HEADER.replace('-', "_"), Value::from("local"));
        parameters.insert(FALLBACK_HEADER.replace('-', "_"), Value::from(flag));
    }
    response.into_http(headers)
}

/// One request counted among those running locally until dropped.
struct LocalSlot<'a> {
    counter: &'a AtomicUsize,
    /// Requests running locally, this one included, when it entered.
    count: usize,
}

impl<'a> LocalSlot<'a> {
    fn enter(counter: &'a AtomicUsize) -> LocalSlot<'a> {
        let count = counter.fetch_add(1, Ordering::AcqRel) + 1;
        LocalSlot { counter, count }
    }
}

impl Drop for LocalSlot<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Exponentially weighted average of local request latency, compared with the objective.
#[derive(Debug)]
struct LatencyAverage {
    objective: Option<Duration>,
    /// Average in milliseconds and when the last request was recorded.
    state: Mutex<Option<(f64, Instant)>>,
}

impl LatencyAverage {
    fn new(objective: Option<Duration>) -> LatencyAverage {
        LatencyAverage {
            objective,
            state: Mutex::new(None),
        }
    }

    /// Adds the latency of a local request, measured from the start of the request's
    /// local run to its end, waits for the model included.
    fn record(&self, latency: Duration, now: Instant) {
        if self.objective.is_none() {
            return;
        }
        let millis = latency.as_secs_f64() * 1000.0;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let average = match *state {
            Some((average, _)) => average + LATENCY_EWMA_WEIGHT * (millis - average),
            None => millis,
        };
        *state = Some((average, now));
    }

    /// Returns whether the average is over the objective and recent enough to trust.
    fn is_slow(&self, now: Instant) -> bool {
        let Some(objective) = self.objective else {
            return false;
        };
        let state = *self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.is_some_and(|(average, recorded)| {
            average > objective.as_secs_f64() * 1000.0
                && now.saturating_duration_since(recorded) < LATENCY_REFRESH
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_average_follows_requests() {
        let average = LatencyAverage::new(Some(Duration::from_millis(100)));
        let now = Instant::now();
        assert!(!average.is_slow(now));
        average.record(Duration::from_millis(50), now);
        assert!(!average.is_slow(now));
        // 50 + 0.2 * (500 - 50) = 140 ms, over the objective.
        average.record(Duration::from_millis(500), now);
        assert!(average.is_slow(now));
        // 140 + 0.2 * (0 - 140) = 112 ms, then 89.6 ms.
        average.record(Duration::ZERO, now);
        assert!(average.is_slow(now));
        average.record(Duration::ZERO, now);
        assert!(!average.is_slow(now));
    }

    #[test]
    fn stale_latency_average_lets_a_request_run_locally() {
        let average = LatencyAverage::new(Some(Duration::from_millis(10)));
        let now = Instant::now();
        average.record(Duration::from_millis(500), now);
        assert!(average.is_slow(now + LATENCY_REFRESH / 2));
        assert!(!average.is_slow(now + LATENCY_REFRESH));
    }

    #[test]
    fn latency_without_objective_is_never_slow() {
        let average = LatencyAverage::new(None);
        let now = Instant::now();
        average.record(Duration::from_secs(10), now);
        assert!(!average.is_slow(now));
    }

    #[test]
    fn local_slots_count_requests_in_progress() {
        let counter = AtomicUsize::new(0);
        let first = LocalSlot::enter(&counter);
        let second = LocalSlot::enter(&counter);
        assert_eq!((first.count, second.count), (1, 2));
        drop(first);
        assert_eq!(LocalSlot::enter(&counter).count, 2);
        drop(second);
        assert_eq!(counter.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn counters_take_and_reset() {
        let counters = FallbackCounters::default();
        counters.count(FallbackReason::LowConfidence);
        counters.count(FallbackReason::LowConfidence);
        counters.count(FallbackReason::Slow);
        counters.cloud_unavailable.fetch_add(1, Ordering::Relaxed);
        let interval = counters.take();
        assert_eq!(interval.low_confidence, 2);
        assert_eq!(interval.slow, 1);
        assert_eq!(interval.cloud_unavailable, 1);
        assert_eq!(counters.snapshot(), FallbackCounts::default());
    }

    #[test]
    fn cloud_errors_flag_the_local_answer() {
        let unavailable = CloudError::Unavailable {
            url: "http://127.0.0.1:1/v2/models/m/infer".into(),
            message: "timed out".into(),
        };
        let rejected = CloudError::Rejected {
            url: "http://127.0.0.1:1/v2/models/m/infer".into(),
            status: 404,
            message: "model not found".into(),
        };
        assert_eq!(CloudError::Open.flag(), "unavailable");
        assert_eq!(unavailable.flag(), "unavailable");
        assert_eq!(rejected.flag(), "rejected");
        assert!(rejected.to_string().contains("404"), "{rejected}");
    }
}
