//! The local inference API: Open Inference Protocol v2 over HTTP (the KServe v2 REST
//! protocol that Triton also speaks), serving the agent's loaded model.
//!
//! | route | returns |
//! |---|---|
//! | `GET /v2` | server name, version and extensions |
//! | `GET /v2/health/live` | 200 while the process serves |
//! | `GET /v2/health/ready` | 200 while the model is loaded and the agent is not stopping, else 503 |
//! | `GET /v2/models/{name}` | the model's inputs and outputs |
//! | `GET /v2/models/{name}/ready` | 200 when `name` is the loaded model and it is ready |
//! | `POST /v2/models/{name}/infer` | the outputs for the request's input |
//!
//! Every model route also takes `/versions/{version}` after the name. Errors are JSON
//! `{"error": "..."}`: 400 for an invalid request, naming the input and the expected
//! shape, and 404 for a model or version that is not loaded.
//!
//! Inputs and outputs come as JSON `data` or in the binary tensor data extension (the
//! default of Triton's Python client): outputs are binary when the request sets
//! `binary_data_output` or the output's `binary_data` parameter.
//!
//! With a [`Fallback`], requests the local model cannot serve well go on to the fleet
//! server's inference gateway ([`fallback`]). Every response carries the
//! `fleet-inference-source` header, `local` or `cloud`.

pub mod breaker;
pub mod fallback;
pub mod infer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::model::{ModelSlot, SharedModel};

pub use fallback::{Fallback, FallbackCounters, FallbackPolicy};

/// Largest request body accepted. JSON text takes about 10 bytes per float, so this fits
/// a few batches of 224x224 RGB images.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// State shared by the handlers: the model slot, the readiness flag and the cloud
/// fallback, if any.
#[derive(Debug, Clone)]
pub struct ApiState {
    model: ModelSlot,
    ready: Arc<AtomicBool>,
    fallback: Option<Arc<Fallback>>,
}

impl ApiState {
    /// Creates the state for a loaded model, ready to serve.
    pub fn new(model: SharedModel) -> ApiState {
        ApiState::with_slot(ModelSlot::new(model))
    }

    /// Creates the state for the agent's model slot, so requests use whichever model an
    /// update has switched to.
    pub fn with_slot(model: ModelSlot) -> ApiState {
        ApiState {
            model,
            ready: Arc::new(AtomicBool::new(true)),
            fallback: None,
        }
    }

    /// Sends requests that the local model cannot serve well to the cloud.
    pub fn with_fallback(self, fallback: Fallback) -> ApiState {
        ApiState {
            fallback: Some(Arc::new(fallback)),
            ..self
        }
    }

    /// Returns the cloud fallback, if any.
    pub fn fallback(&self) -> Option<&Fallback> {
        self.fallback.as_deref()
    }

    /// Sets whether readiness checks pass; the agent clears it while stopping.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Returns the model when `name` and `version` (if given) match it.
    fn model(&self, name: &str, version: Option<&str>) -> Result<SharedModel, ApiError> {
        let model = self.model.current();
        let info = model.info();
        if name != info.name {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} not found: this device serves {:?}",
                    info.name
                ),
            ));
        }
        if let Some(version) = version.filter(|&version| version != info.version) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} version {version:?} not found: this device serves \
                     version {:?}",
                    info.version
                ),
            ));
        }
        Ok(model)
    }
}

/// An error response: a status and a JSON body `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> ApiError {
        ApiError { status, message }
    }

    fn bad_request(message: String) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "inference API request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "inference API request rejected");
        }
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// Builds the router with every route.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(versioned_model_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(versioned_model_ready),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(versioned_infer),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests
/// in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "fleet-device",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<ApiState>) -> StatusCode {
    if state.ready.load(Ordering::Relaxed) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn model_metadata(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&state, &name, None)
}

async fn versioned_model_metadata(
    State(state): State<ApiState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&state, &name, Some(&version))
}

fn metadata(
    state: &ApiState,
    name: &str,
    version: Option<&str>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let model = state.model(name, version)?;
    let info = model.info();
    Ok(Json(json!({
        "name": info.name,
        "versions": [info.version],
        "platform": "tract_onnx",
        "inputs": [{
            "name": info.input.name,
            "datatype": "FP32",
            "shape": infer::expected_input_shape(info),
        }],
        "outputs": infer::output_metadata(info),
    })))
}

async fn model_ready(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.model(&name, None)?;
    Ok(ready(State(state)).await)
}

async fn versioned_model_ready(
    State(state): State<ApiState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.model(&name, Some(&version))?;
    Ok(ready(State(state)).await)
}

async fn infer(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_inference(&state, &name, None, &headers, body).await
}

async fn versioned_infer(
    State(state): State<ApiState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    run_inference(&state, &name, Some(&version), &headers, body).await
}

/// Checks the request, then serves it locally or, with a fallback, from the cloud when
/// the policy requires. Invalid requests are rejected and never go to the cloud.
async fn run_inference(
    state: &ApiState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let local = match LocalRun::check(state, name, version, headers, &body) {
        Ok(local) => local,
        Err(error) => return error.into_response(),
    };
    match &state.fallback {
        Some(fallback) => fallback.serve(local, headers, body).await,
        None => match local.run().await {
            Ok(answer) => fallback::local_response(answer.response, None),
            Err(error) => error.into_response(),
        },
    }
}

/// A checked request, ready to run on the local model.
struct LocalRun {
    model: SharedModel,
    input: infer::CheckedInput,
    request_id: Option<String>,
    wanted: Vec<infer::WantedOutput>,
}

/// The local model's answer to a request.
struct LocalAnswer {
    response: infer::InferResponse,
    /// Lowest top-1 confidence in the batch.
    lowest_confidence: f32,
}

impl LocalRun {
    /// Checks the model name, the body, the input and the requested outputs.
    fn check(
        state: &ApiState,
        name: &str,
        version: Option<&str>,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<LocalRun, ApiError> {
        let model = state.model(name, version)?;
        let info = model.info();
        let (request, binary) = infer::parse_body(headers, body)?;
        let input = infer::check_input(info, &request, binary)?;
        let wanted = infer::requested_outputs(info, &request)?;
        Ok(LocalRun {
            model,
            input,
            request_id: request.id,
            wanted,
        })
    }

    fn model_name(&self) -> String {
        self.model.info().name.clone()
    }

    fn request_id(&self) -> Option<String> {
        self.request_id.clone()
    }

    /// Runs the model on tokio's blocking pool and builds the response.
    async fn run(self) -> Result<LocalAnswer, ApiError> {
        let info = self.model.info();
        let batch = self.input.batch;
        let runner = self.model.clone();
        let input = self.input;
        let rows = tokio::task::spawn_blocking(move || runner.run(batch, &input.data))
            .await
            .map_err(|error| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("inference task failed: {error}"),
                )
            })?
            .map_err(|error| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("inference failed: {error}"),
                )
            })?;
        let lowest_confidence = infer::lowest_top1(info, &rows);
        let response = infer::build_response(info, self.request_id, &self.wanted, &rows)?;
        tracing::debug!(model = %info.name, batch, "inference API request served");
        Ok(LocalAnswer {
            response,
            lowest_confidence,
        })
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {uri}: the inference API serves /v2/..."),
    )
}
