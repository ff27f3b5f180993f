//! A replica's Open Inference Protocol v2 REST routes and its `/metrics`.
//!
//! Replicas listen on loopback for their gateway and do not authenticate requests:
//! the gateway has done that before it forwards one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::batcher::{Batcher, SubmitError};
use super::metrics::ReplicaMetrics;
use crate::api::ApiError;
use crate::gateway::oip::{self, InferResponse, ModelMetadata, OutputTensor};

/// Shared state of a replica's handlers.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    pub metadata: Arc<ModelMetadata>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<ReplicaMetrics>,
    /// False once shutdown began, so health checks stop routing here.
    pub ready: Arc<AtomicBool>,
    pub max_batch_per_request: usize,
    pub max_body_bytes: usize,
}

/// Builds the replica's routes.
pub fn router(state: ReplicaState) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .with_state(state)
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "name": "fleet-replica",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "live": true }))
}

async fn ready(State(state): State<ReplicaState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        Json(serde_json::json!({ "ready": true })).into_response()
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "replica is shutting down").into_response()
    }
}

fn check_name(state: &ReplicaState, name: &str) -> Result<(), ApiError> {
    if name == state.metadata.name {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model {name:?} not found; this replica serves {:?}",
                state.metadata.name
            ),
        ))
    }
}

async fn model_metadata(
    State(state): State<ReplicaState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    check_name(&state, &name)?;
    Ok(Json(state.metadata.as_ref().clone()))
}

async fn model_ready(
    State(state): State<ReplicaState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    check_name(&state, &name)?;
    Ok(ready(State(state)).await)
}

async fn metrics(State(state): State<ReplicaState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// Checks the request, queues it for the next batch and returns the model's output.
async fn infer(
    State(state): State<ReplicaState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_name(&state, &name)?;
    let bad_request =
        |error: oip::InvalidRequest| ApiError::new(StatusCode::BAD_REQUEST, error.to_string());
    let json_length = headers
        .get(fleet_oip::JSON_LENGTH_HEADER)
        .map(|value| value.as_bytes());
    let (request, binary) = oip::parse(json_length, &body).map_err(bad_request)?;
    let valid = oip::validate(
        &request,
        binary,
        &state.metadata,
        state.max_batch_per_request,
    )
    .map_err(bad_request)?;
    let traceparent = headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let request_id = headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    tracing::debug!(
        request_id,
        traceparent,
        batch = valid.batch,
        "inference request"
    );

    let input = valid.inputs.into_iter().next().unwrap_or_default();
    let pending = state
        .batcher
        .submit(valid.batch, input)
        .map_err(|error| match error {
            SubmitError::QueueFull(_) | SubmitError::Closed => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
        })?;
    let output = pending
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the replica is shutting down",
            )
        })?
        .map_err(|reason| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("inference failed: {reason}"),
            )
        })?;

    let spec = &state.metadata.outputs[0];
    let shape = std::iter::once(valid.batch as i64)
        .chain(output.row_shape.iter().map(|&d| d as i64))
        .collect();
    let response = InferResponse {
        model_name: state.metadata.name.clone(),
        model_version: state.metadata.versions.first().cloned(),
        id: request.id,
        outputs: vec![OutputTensor {
            name: spec.name.clone(),
            shape,
            datatype: "FP32".into(),
            data: output.data,
        }],
    };
    if !valid.binary_outputs.any() {
        return Ok(Json(response).into_response());
    }
    let json = serde_json::to_vec(&response).expect("a response serialises");
    let (body, json_length) = oip::binary_response(&json, &valid.binary_outputs)
        .map_err(|reason| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, reason))?;
    Ok((
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/octet-stream".to_owned(),
            ),
            (fleet_oip::JSON_LENGTH_HEADER, json_length.to_string()),
        ],
        body,
    )
        .into_response())
}
