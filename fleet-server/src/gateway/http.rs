//! The gateway's HTTP routes: Open Inference Protocol v2 REST under `/v2`, and a
//! backend listing for operators under `/api/gateway`.
//!
//! Every route but `/v2/health/*` and `/v2` needs `Authorization: Bearer TOKEN` with a
//! device secret or an API token; each principal is throttled on its own. The checks
//! run in this order, so nothing reaches a backend before it passed all of them:
//! credentials (401), rate (429), body size (413), model name (404), request body and
//! tensor shapes (400).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Serialize;
use tracing::Instrument;

use super::auth::{self, Authenticator};
use super::limiter::{Throttle, retry_after_secs};
use super::metrics::{GatewayMetrics, UNKNOWN_MODEL};
use super::model::{Forward, ForwardError, ModelRuntime};
use super::oip;
use crate::access::Principal;
use crate::api::ApiError;

/// An error response with a JSON body `{"error": "..."}` whose status is readable, so
/// the request counter can label it.
#[derive(Debug)]
pub struct GatewayError {
    status: StatusCode,
    message: String,
    /// Seconds for the `Retry-After` header, if the client should try again later.
    retry_after: Option<u64>,
}

impl GatewayError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> GatewayError {
        GatewayError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After: seconds` to the response.
    pub fn retry_after(mut self, seconds: u64) -> GatewayError {
        self.retry_after = Some(seconds);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let mut response = ApiError::new(self.status, self.message).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Header carrying the request id, echoed in every response.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// W3C trace context header, passed through to the backend.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// W3C Server Timing header, splitting an inference request's time between the
/// gateway, the wait for a backend and the backend.
pub static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// Shared state of the gateway's handlers.
#[derive(Debug, Clone)]
pub struct GatewayState {
    pub models: Arc<BTreeMap<String, Arc<ModelRuntime>>>,
    pub auth: Arc<Authenticator>,
    pub throttle: Throttle<String>,
    pub metrics: GatewayMetrics,
    pub max_body_bytes: usize,
    pub max_batch_per_request: usize,
}

/// Builds the gateway's routes.
pub fn router(state: GatewayState) -> Router {
    let authenticated = Router::new()
        .route("/v2/models", get(model_index))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(versioned_metadata),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(versioned_ready),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(versioned_infer),
        )
        .route("/api/gateway/backends", get(backends))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .merge(authenticated)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

/// Marker the inference handler leaves on a response passed on from a backend, for
/// [`request_context`] to split the request's time.
#[derive(Debug, Clone)]
struct Served {
    model: String,
    backend_time: Duration,
    queue_time: Duration,
}

/// Takes the client's `x-request-id` or makes one, records it on the request's log
/// span and returns it on the response. On a response passed on from a backend, it
/// also adds `Server-Timing` in milliseconds (`gateway;dur=0.184, queue;dur=0.000,
/// backend;dur=3.021`) and records the gateway's share in the
/// `fleet_gateway_overhead_seconds` histogram. `backend` is the time spent sending to
/// backends and reading their responses, `queue` the time waiting for a backend with
/// room, and `gateway` the rest, from here (before authentication) to the response.
async fn request_context(
    State(state): State<GatewayState>,
    mut request: Request,
    next: Next,
) -> Response {
    let arrived = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|value| valid_request_id(value))
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(&random_hex(16)).expect("hex is a valid header"));
    request.headers_mut().insert(REQUEST_ID.clone(), id.clone());
    let span = tracing::info_span!(
        "gateway_request",
        request_id = %id.to_str().unwrap_or_default(),
        method = %request.method(),
        path = %request.uri().path(),
    );
    let mut response = next.run(request).instrument(span).await;
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    if let Some(served) = response.extensions_mut().remove::<Served>() {
        let own = arrived
            .elapsed()
            .saturating_sub(served.backend_time + served.queue_time);
        state
            .metrics
            .overhead_seconds
            .get_or_create(&GatewayMetrics::model(&served.model))
            .observe(own.as_secs_f64());
        let timing = format!(
            "gateway;dur={:.3}, queue;dur={:.3}, backend;dur={:.3}",
            own.as_secs_f64() * 1e3,
            served.queue_time.as_secs_f64() * 1e3,
            served.backend_time.as_secs_f64() * 1e3
        );
        response.headers_mut().insert(
            &SERVER_TIMING,
            HeaderValue::from_str(&timing).expect("formatted durations are a valid header value"),
        );
    }
    response
}

fn valid_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty() && bytes.len() <= 128 && bytes.iter().all(|b| b.is_ascii_graphic())
}

/// Returns `bytes` random bytes from the operating system as lowercase hex.
fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    // NOTE: getrandom fails only when the OS has no entropy source. The id then stays
    // all zeros, which only weakens correlation.
    let _ = getrandom::getrandom(&mut buffer);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the client's `traceparent` when it is well formed, else a new trace with
/// this gateway as its root, so the backend's logs can always be correlated.
fn traceparent(headers: &HeaderMap) -> HeaderValue {
    let valid = headers.get(&TRACEPARENT).filter(|value| {
        let parts: Vec<&str> = value.to_str().unwrap_or_default().split('-').collect();
        let lengths_ok = parts.len() == 4
            && parts[0].len() == 2
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts[3].len() == 2;
        lengths_ok
            && parts
                .iter()
                .all(|part| part.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    match valid {
        Some(value) => value.clone(),
        None => {
            let value = format!("00-{}-{}-01", random_hex(16), random_hex(8));
            HeaderValue::from_str(&value).expect("hex is a valid header")
        }
    }
}

/// Middleware for every route except health: 401 without a valid bearer token, 403
/// for ingester credentials, 429 with `Retry-After` over the principal's rate.
async fn authenticate(
    State(state): State<GatewayState>,
    mut request: Request,
    next: Next,
) -> Response {
    let model = model_label(&state, request.uri().path());
    let principal = match auth::bearer_token(request.headers()) {
        Some(token) => match state.auth.principal(token).await {
            Ok(principal) => principal,
            Err(error) => return ApiError::from(error).into_response(),
        },
        None => None,
    };
    let Some(principal) = principal else {
        state.metrics.unauthorized.inc();
        state.metrics.count_request(&model, 401);
        let mut response = GatewayError::new(
            StatusCode::UNAUTHORIZED,
            "authentication required: send Authorization: Bearer TOKEN with a device secret or API token",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    if let Principal::Ingester { .. } = principal {
        state.metrics.count_request(&model, 403);
        return GatewayError::new(
            StatusCode::FORBIDDEN,
            "ingester credentials cannot use the inference gateway",
        )
        .into_response();
    }

    let key = auth::limiter_key(&principal);
    if let Err(wait) = state.throttle.check(&key) {
        state.metrics.throttled.inc();
        state.metrics.count_request(&model, 429);
        let retry_after = retry_after_secs(wait);
        tracing::debug!(principal = %key, retry_after, "request throttled");
        return GatewayError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("rate limit exceeded for {key}; retry in {retry_after} s"),
        )
        .retry_after(retry_after)
        .into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Returns the model named in a `/v2/models/{name}/...` path when it is configured,
/// else [`UNKNOWN_MODEL`], so metric labels stay bounded.
fn model_label(state: &GatewayState, path: &str) -> String {
    path.strip_prefix("/v2/models/")
        .and_then(|rest| rest.split('/').next())
        .filter(|name| state.models.contains_key(*name))
        .unwrap_or(UNKNOWN_MODEL)
        .to_owned()
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "live": true }))
}

/// 200 when every model can take requests (has a ready backend or scales from zero),
/// 503 naming the first that cannot.
async fn ready(State(state): State<GatewayState>) -> Response {
    match state.models.values().find(|model| !model.is_ready()) {
        None => Json(serde_json::json!({ "ready": true })).into_response(),
        Some(model) => GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model {:?} has no ready backend", model.name),
        )
        .into_response(),
    }
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "fleet-gateway",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// A model in the repository index.
#[derive(Debug, Serialize)]
struct IndexEntry {
    name: String,
    version: String,
    state: &'static str,
}

fn index(state: &GatewayState) -> Vec<IndexEntry> {
    state
        .models
        .values()
        .map(|model| IndexEntry {
            name: model.name.clone(),
            version: model.metadata.versions.first().cloned().unwrap_or_default(),
            state: if model.is_ready() {
                "READY"
            } else {
                "UNAVAILABLE"
            },
        })
        .collect()
}

async fn model_index(State(state): State<GatewayState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "models": index(&state) }))
}

/// Triton's repository index extension, which `tritonclient` calls.
async fn repository_index(State(state): State<GatewayState>) -> Json<Vec<IndexEntry>> {
    Json(index(&state))
}

fn find_model(state: &GatewayState, name: &str) -> Result<Arc<ModelRuntime>, GatewayError> {
    state.models.get(name).cloned().ok_or_else(|| {
        state.metrics.count_request(UNKNOWN_MODEL, 404);
        let known: Vec<&String> = state.models.keys().collect();
        GatewayError::new(
            StatusCode::NOT_FOUND,
            format!("model {name:?} not found; this gateway serves {known:?}"),
        )
    })
}

async fn model_metadata(
    State(state): State<GatewayState>,
    Path(name): Path<String>,
) -> Result<Json<oip::ModelMetadata>, GatewayError> {
    Ok(Json(find_model(&state, &name)?.metadata.clone()))
}

async fn model_ready(
    State(state): State<GatewayState>,
    Path(name): Path<String>,
) -> Result<Response, GatewayError> {
    let model = find_model(&state, &name)?;
    if model.is_ready() {
        Ok(Json(serde_json::json!({ "name": name, "ready": true })).into_response())
    } else {
        Err(GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("model {name:?} has no ready backend"),
        ))
    }
}

/// Returns 404 unless `version` is the version the gateway serves of model `name`.
/// Clients such as Triton's put the version in the path when they are given one.
fn check_version(state: &GatewayState, name: &str, version: &str) -> Result<(), GatewayError> {
    let model = find_model(state, name)?;
    if model
        .metadata
        .versions
        .iter()
        .any(|served| served == version)
    {
        return Ok(());
    }
    state.metrics.count_request(name, 404);
    Err(GatewayError::new(
        StatusCode::NOT_FOUND,
        format!(
            "version {version:?} of model {name:?} not found; this gateway serves {:?}",
            model.metadata.versions
        ),
    ))
}

async fn versioned_metadata(
    State(state): State<GatewayState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<oip::ModelMetadata>, GatewayError> {
    check_version(&state, &name, &version)?;
    model_metadata(State(state), Path(name)).await
}

async fn versioned_ready(
    State(state): State<GatewayState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, GatewayError> {
    check_version(&state, &name, &version)?;
    model_ready(State(state), Path(name)).await
}

async fn versioned_infer(
    State(state): State<GatewayState>,
    Path((name, version)): Path<(String, String)>,
    request: Request,
) -> Result<Response, GatewayError> {
    check_version(&state, &name, &version)?;
    infer(State(state), Path(name), request).await
}

/// Lists every backend of every model with its state and load, for operators.
async fn backends(
    State(state): State<GatewayState>,
    request: Request,
) -> Result<Json<serde_json::Value>, GatewayError> {
    if !matches!(
        request.extensions().get::<Principal>(),
        Some(Principal::Operator { .. })
    ) {
        return Err(GatewayError::new(
            StatusCode::FORBIDDEN,
            "this route is for operators; device credentials cannot use it",
        ));
    }
    let models: serde_json::Map<String, serde_json::Value> = state
        .models
        .values()
        .map(|model| {
            let backends: Vec<_> = model.pool.backends().iter().map(|b| b.status()).collect();
            let body = serde_json::json!({
                "local_replicas": model.local_replicas(),
                "queued": model.pool.queued(),
                "backends": backends,
            });
            (model.name.clone(), body)
        })
        .collect();
    Ok(Json(serde_json::Value::Object(models)))
}

/// Checks an inference request, forwards it and returns the backend's response.
async fn infer(
    State(state): State<GatewayState>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, GatewayError> {
    let started = Instant::now();
    let result = infer_checked(&state, &name, request, started).await;
    if let Err(error) = &result
        && state.models.contains_key(&name)
    {
        state.metrics.count_request(&name, error.status().as_u16());
    }
    result
}

async fn infer_checked(
    state: &GatewayState,
    name: &str,
    request: Request,
    started: Instant,
) -> Result<Response, GatewayError> {
    let (parts, body) = request.into_parts();
    let body = read_body(body, &parts.headers, state.max_body_bytes).await?;
    let model = find_model(state, name)?;
    let bad_request =
        |error: oip::InvalidRequest| GatewayError::new(StatusCode::BAD_REQUEST, error.to_string());
    let json_length = parts
        .headers
        .get(fleet_oip::JSON_LENGTH_HEADER)
        .map(HeaderValue::as_bytes);
    let (parsed, binary) = oip::parse(json_length, &body).map_err(bad_request)?;
    let valid = oip::validate(
        &parsed,
        binary,
        &model.metadata,
        state.max_batch_per_request,
    )
    .map_err(bad_request)?;
    // Backends get plain JSON; a JSON request without binary parameters passes as sent.
    let body = if valid.binary_inputs || valid.binary_outputs.any() {
        bytes::Bytes::from(oip::json_request(&parsed, &valid, &model.metadata))
    } else {
        body
    };

    let forward = Forward {
        body,
        request_id: parts
            .headers
            .get(&REQUEST_ID)
            .cloned()
            .unwrap_or(HeaderValue::from_static("")),
        traceparent: traceparent(&parts.headers),
        tracestate: parts.headers.get(&TRACESTATE).cloned(),
    };
    let reply = model.forward(&forward).await.map_err(|error| {
        if let ForwardError::QueueFull { .. } = error {
            // Under overload every request turned away gets here, so this logs at debug
            // level, as throttling does. The request counter still counts each 503.
            tracing::debug!(model = %name, error = %error, "inference request turned away");
        } else {
            tracing::warn!(model = %name, error = %error, "inference request failed");
        }
        forward_error(error)
    })?;

    let elapsed = started.elapsed();
    if (200..300).contains(&reply.status) {
        model.latency.record(elapsed);
        state
            .metrics
            .request_seconds
            .get_or_create(&GatewayMetrics::model(name))
            .observe(elapsed.as_secs_f64());
    }
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let served = Served {
        model: name.to_owned(),
        backend_time: reply.backend_time,
        queue_time: reply.queue_time,
    };
    if status.is_success() && valid.binary_outputs.any() {
        let (body, json_length) = oip::binary_response(&reply.body, &valid.binary_outputs)
            .map_err(|reason| {
                tracing::warn!(model = %name, reason = %reason, "backend response not re-encoded as binary");
                GatewayError::new(
                    StatusCode::BAD_GATEWAY,
                    format!("the backend's response could not be re-encoded as binary data: {reason}"),
                )
            })?;
        state.metrics.count_request(name, reply.status);
        let mut response = Response::new(Body::from(body));
        response.extensions_mut().insert(served);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(
            fleet_oip::JSON_LENGTH_HEADER,
            HeaderValue::from(json_length),
        );
        return Ok(response);
    }
    state.metrics.count_request(name, reply.status);
    let content_type = reply
        .content_type
        .unwrap_or(HeaderValue::from_static("application/json"));
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = status;
    response.extensions_mut().insert(served);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    Ok(response)
}

/// Bytes of an oversized request body read and dropped before the 413 is sent.
///
/// A server that responds before reading the body and then closes the connection with
/// unread bytes makes the kernel reset it, and a client still sending its body can
/// get the reset ("broken pipe") instead of the 413. Past this many bytes the
/// connection is closed anyway, so a huge upload cannot hold it.
const DRAINED_BYTES: usize = 4 << 20;

/// Reads the body and returns 413 when it is over the limit, declared or sent. The
/// rest of an oversized body is read and dropped, up to [`DRAINED_BYTES`], so that the
/// client receives the 413.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<bytes::Bytes, GatewayError> {
    let too_large = || {
        GatewayError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    let mut buffer = bytes::BytesMut::new();
    let mut oversized = declared.is_some_and(|length| length > limit as u64);
    let mut dropped = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|error| {
            GatewayError::new(
                StatusCode::BAD_REQUEST,
                format!("failed to read the request body: {error}"),
            )
        })?;
        if !oversized && buffer.len() + chunk.len() > limit {
            oversized = true;
            dropped = buffer.len();
            buffer.clear();
        }
        if oversized {
            dropped += chunk.len();
            if dropped > DRAINED_BYTES {
                break;
            }
        } else {
            buffer.extend_from_slice(&chunk);
        }
    }
    if oversized {
        return Err(too_large());
    }
    Ok(buffer.freeze())
}

fn forward_error(error: ForwardError) -> GatewayError {
    let (status, retry_after) = match &error {
        ForwardError::NoBackend { .. } => (StatusCode::SERVICE_UNAVAILABLE, None),
        // A full queue empties as the backends respond and the autoscaler adds replicas.
        ForwardError::QueueFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, Some(1)),
        ForwardError::Failed { .. } => (StatusCode::BAD_GATEWAY, None),
        ForwardError::TimedOut { .. } => (StatusCode::GATEWAY_TIMEOUT, None),
    };
    let mut response = GatewayError::new(status, error.to_string());
    response.retry_after = retry_after;
    response
}
