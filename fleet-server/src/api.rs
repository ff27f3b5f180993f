//! HTTP routes: the JSON API and the web console.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::access::http::{self as access_http, LoginLimiter};
use crate::metrics::{Outcome, ServerMetrics};
use crate::remote_config::RemoteConfigs;
use crate::remote_config::http as remote_config_http;
use crate::samples::Samples;
use crate::samples::http as samples_http;
use crate::store::{DeviceSummary, Store, StoreError, TelemetryRow};
use crate::updates::Updates;
use crate::updates::http as updates_http;

/// Telemetry received within this window feeds the live latency and throughput.
pub const LIVE_WINDOW: Duration = Duration::from_secs(30);
/// Rows returned by the telemetry route when no `limit` is given, and the most allowed.
const DEFAULT_TELEMETRY_ROWS: u32 = 100;
const MAX_TELEMETRY_ROWS: u32 = 10_000;

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub store: Store,
    pub metrics: Arc<ServerMetrics>,
    pub login_limiter: LoginLimiter,
    pub updates: Arc<Updates>,
    pub remote_config: Arc<RemoteConfigs>,
    pub samples: Arc<Samples>,
}

/// Builds the router. The console page, `/healthz`, `/metrics` and the login route are
/// public (the page requests a login before it reads the API, and the metrics carry no
/// device ids); the bundle archive download admits devices and operators, and sample
/// uploads admit devices only; every other `/api` route requires an operator.
pub fn router(state: ApiState) -> Router {
    let operator_routes = Router::new()
        .route("/api/summary", get(summary))
        .route("/api/devices", get(devices))
        .route("/api/devices/{id}/telemetry", get(telemetry))
        .route("/api/whoami", get(access_http::whoami))
        .route("/api/logout", post(access_http::logout))
        .merge(updates_http::operator_routes())
        .merge(remote_config_http::operator_routes())
        .merge(samples_http::operator_routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access_http::require_operator,
        ));
    let device_routes = updates_http::download_routes()
        .merge(samples_http::device_routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access_http::require_principal,
        ));
    Router::new()
        .route("/", get(console))
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/api/login", post(access_http::login))
        .merge(operator_routes)
        .merge(device_routes)
        .with_state(state)
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn console() -> Html<&'static str> {
    Html(include_str!("console.html"))
}

/// An error response with a JSON body `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        let error = anyhow::Error::from(error);
        tracing::error!(error = format!("{error:#}"), "request failed in the store");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "internal storage error; see the server log".into(),
        }
    }
}

async fn devices(State(state): State<ApiState>) -> Result<Json<Vec<DeviceSummary>>, ApiError> {
    Ok(Json(
        state
            .store
            .devices(crate::unix_millis(), LIVE_WINDOW)
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct TelemetryQuery {
    limit: Option<u32>,
}

/// Returns 200 `ok` while the server is connected to its MQTT broker and 503 with a
/// JSON error otherwise, so a load balancer or Kubernetes stops routing to a replica
/// that cannot ingest.
async fn health(State(state): State<ApiState>) -> Result<&'static str, ApiError> {
    if state.metrics.broker_connected.get() == 1 {
        Ok("ok")
    } else {
        Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "not connected to the MQTT broker".into(),
        })
    }
}

async fn telemetry(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    query: Result<Query<TelemetryQuery>, QueryRejection>,
) -> Result<Json<Vec<TelemetryRow>>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("invalid query: {}", rejection.body_text()),
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_TELEMETRY_ROWS);
    if limit == 0 || limit > MAX_TELEMETRY_ROWS {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("limit must be between 1 and {MAX_TELEMETRY_ROWS}, got {limit}"),
        });
    }
    match state.store.telemetry(&id, limit).await? {
        Some(rows) => Ok(Json(rows)),
        None => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("device {id:?} not found"),
        }),
    }
}

/// Fleet-wide totals, as the console header and the demo's status line show them.
#[derive(Debug, Clone, Serialize)]
pub struct FleetSummary {
    pub devices: usize,
    pub online: usize,
    pub inferences: i64,
    /// Inferences per second across the fleet over the live window.
    pub throughput: f64,
    /// Top-1 accuracy over all labelled inferences, 0 to 1.
    pub accuracy: Option<f64>,
    /// Worst per-device p95 latency over the live window, in milliseconds.
    pub worst_latency_p95_ms: Option<f64>,
    pub telemetry_stored: u64,
    pub telemetry_duplicates: u64,
    pub telemetry_rejected: u64,
    pub gaps: i64,
}

/// Computes fleet totals from the per-device summaries.
pub fn summarize(devices: &[DeviceSummary], metrics: &ServerMetrics) -> FleetSummary {
    let labeled: i64 = devices.iter().map(|d| d.labeled).sum();
    let correct: i64 = devices.iter().map(|d| d.correct).sum();
    FleetSummary {
        devices: devices.len(),
        online: devices.iter().filter(|d| d.state == "online").count(),
        inferences: devices.iter().map(|d| d.inferences).sum(),
        throughput: devices.iter().map(|d| d.throughput).sum(),
        accuracy: (labeled > 0).then(|| correct as f64 / labeled as f64),
        worst_latency_p95_ms: devices
            .iter()
            .filter_map(|d| d.latency_p95_ms)
            .reduce(f64::max),
        telemetry_stored: metrics.total(Outcome::Stored),
        telemetry_duplicates: metrics.total(Outcome::Duplicate),
        telemetry_rejected: metrics.total(Outcome::Rejected),
        gaps: devices.iter().map(|d| d.gaps).sum(),
    }
}

async fn summary(State(state): State<ApiState>) -> Result<Json<FleetSummary>, ApiError> {
    let devices = state
        .store
        .devices(crate::unix_millis(), LIVE_WINDOW)
        .await?;
    Ok(Json(summarize(&devices, &state.metrics)))
}
