//! Routes of hard samples.
//!
//! Devices upload with `POST /api/samples`: the body is the sample's bytes, the
//! `Content-Type` header is `image/png` or `image/jpeg`, and the query string carries
//! [`SampleMetadata`]. Operators list samples with `GET /api/samples` and read one back
//! with `GET /api/samples/{sha256}`.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::{Bytes, BytesMut};
use fleet_wire::sample::SampleMetadata;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::files::{has_signature, supported_content_type};
use super::{SampleError, Samples, checked_sha256};
use crate::access::Principal;
use crate::api::{ApiError, ApiState};
use crate::metrics::Outcome;
use crate::store::samples::{SampleFilter, SampleRecord};

/// Samples listed when no `limit` is given, and the most one request may list.
const DEFAULT_SAMPLE_ROWS: u32 = 100;
const MAX_SAMPLE_ROWS: u32 = 10_000;

/// Routes for operators: the sample list and sample contents.
pub fn operator_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/samples", get(list_samples))
        .route("/api/samples/{sha256}", get(sample_content))
}

/// Routes for any authenticated principal; the handler admits devices only.
pub fn device_routes() -> Router<ApiState> {
    Router::new().route("/api/samples", post(upload_sample))
}

/// Query of `GET /api/samples`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SamplesQuery {
    device: Option<String>,
    model: Option<String>,
    limit: Option<u32>,
}

/// Stores an uploaded sample: 201 with its record when new, 200 with the stored record
/// when a sample with the same SHA-256 is already there.
async fn upload_sample(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    query: Result<Query<SampleMetadata>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let samples = &state.samples;
    let uploader = match &principal {
        Principal::Device { id } => id.clone(),
        _ => return Err(SampleError::NotADevice.into()),
    };
    match store_upload(samples, &uploader, query, &headers, body).await {
        Ok((status, record)) => {
            let outcome = if status == StatusCode::CREATED {
                Outcome::Stored
            } else {
                Outcome::Duplicate
            };
            samples.metrics.count_sample(outcome);
            Ok((status, Json(record)).into_response())
        }
        Err(error) if error.status().is_client_error() => {
            samples.metrics.count_sample(Outcome::Rejected);
            tracing::warn!(device_id = %uploader, %error, "sample upload rejected");
            Err(error.into())
        }
        Err(error) => Err(error.into()),
    }
}

async fn store_upload(
    samples: &Samples,
    uploader: &str,
    query: Result<Query<SampleMetadata>, QueryRejection>,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, SampleRecord), SampleError> {
    let Query(metadata) = query.map_err(|rejection| {
        SampleError::InvalidMetadata(format!("query string: {}", rejection.body_text()))
    })?;
    metadata.validate().map_err(SampleError::InvalidMetadata)?;
    if metadata.device_id != uploader {
        return Err(SampleError::DeviceMismatch {
            declared: metadata.device_id,
            authenticated: uploader.to_owned(),
        });
    }
    let found = headers
        .get(header::CONTENT_TYPE)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        .unwrap_or_default();
    let content_type =
        supported_content_type(&found).ok_or(SampleError::UnsupportedContentType { found })?;

    let bytes = receive(body, headers, samples.max_sample_bytes).await?;
    if !has_signature(content_type, &bytes) {
        return Err(SampleError::ContentMismatch { content_type });
    }
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if sha256 != metadata.sha256 {
        return Err(SampleError::Sha256Mismatch {
            declared: metadata.sha256,
            actual: sha256,
        });
    }
    if let Some(existing) = samples.store.sample(&sha256).await?
        && samples
            .files
            .exists(&existing.sha256, &existing.content_type)
            .await
    {
        return Ok((StatusCode::OK, existing));
    }

    let size = bytes.len();
    samples.files.write(&sha256, content_type, bytes).await?;
    let record = SampleRecord {
        sha256: sha256.clone(),
        device_id: uploader.to_owned(),
        model_name: metadata.model_name,
        model_version: metadata.model_version,
        predicted_class: i64::from(metadata.predicted_class),
        predicted_label: metadata.predicted_label,
        confidence: f64::from(metadata.confidence),
        true_class: metadata.true_class.map(i64::from),
        source: metadata.source,
        device_time_ms: i64::try_from(metadata.device_time_ms).unwrap_or(i64::MAX),
        received_ms: crate::unix_millis() as i64,
        content_type: content_type.to_owned(),
        size: size as i64,
    };
    if !samples.store.put_sample(&record).await? {
        // Another upload of the same content was recorded first, or the record outlived
        // its file, which the write above has just restored.
        let existing = samples.store.sample(&sha256).await?.unwrap_or(record);
        return Ok((StatusCode::OK, existing));
    }
    tracing::info!(
        sha256 = %record.sha256,
        device_id = %record.device_id,
        model = %record.model_name,
        version = %record.model_version,
        confidence = record.confidence,
        size,
        "sample stored"
    );
    Ok((StatusCode::CREATED, record))
}

/// Reads the whole body, failing once it passes `limit` bytes; a `Content-Length` over
/// the limit fails before any byte is read.
async fn receive(body: Body, headers: &HeaderMap, limit: u64) -> Result<Bytes, SampleError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // NOTE: a rejection before the body is read leaves it unread, so hyper closes the
    // connection, and a client still sending a large body may see a reset, not the 413.
    if declared.is_some_and(|length| length > limit) {
        return Err(SampleError::TooLarge { limit });
    }
    let mut received = BytesMut::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(SampleError::Body)?;
        if (received.len() + chunk.len()) as u64 > limit {
            return Err(SampleError::TooLarge { limit });
        }
        received.extend_from_slice(&chunk);
    }
    if received.is_empty() {
        return Err(SampleError::EmptyBody);
    }
    Ok(received.freeze())
}

async fn list_samples(
    State(state): State<ApiState>,
    query: Result<Query<SamplesQuery>, QueryRejection>,
) -> Result<Json<Vec<SampleRecord>>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid query: {}", rejection.body_text()),
        )
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_SAMPLE_ROWS);
    if limit == 0 || limit > MAX_SAMPLE_ROWS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_SAMPLE_ROWS}, got {limit}"),
        ));
    }
    let filter = SampleFilter {
        device_id: query.device,
        model_name: query.model,
    };
    Ok(Json(state.samples.store.samples(&filter, limit).await?))
}

/// Returns a sample's bytes with its content type.
async fn sample_content(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
) -> Result<Response, ApiError> {
    let samples = &state.samples;
    let sha256 = checked_sha256(&sha256)?;
    let Some(record) = samples.store.sample(sha256).await? else {
        return Err(SampleError::NotFound {
            sha256: sha256.to_owned(),
        }
        .into());
    };
    let bytes = samples.files.read(sha256, &record.content_type).await?;
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    let content_type = HeaderValue::from_str(&record.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    // Devices chose these bytes, so a browser must not guess another type from them.
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        headers.insert(header::ETAG, etag);
    }
    Ok(response)
}
