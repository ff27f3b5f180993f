//! Routes of over-the-air updates.
//!
//! Operators upload and list bundles and create and follow updates. Any authenticated
//! principal, devices included, downloads archives, with HTTP range requests so that an
//! interrupted download can resume.

use std::collections::HashSet;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt};

use super::commands::send_counted;
use super::{UpdateError, Updates, checked_sha256, glob, new_update_id};
use crate::access::Principal;
use crate::api::{ApiError, ApiState};
use crate::store::updates::{BundleRecord, Superseded, UpdateEventRecord, UpdateRecord};

/// Updates listed when no `limit` is given, and the most one request may list.
const DEFAULT_UPDATE_ROWS: u32 = 100;
const MAX_UPDATE_ROWS: u32 = 10_000;
/// Bytes read from an archive per response body chunk.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Routes for operators: `/api/bundles` and `/api/updates`.
pub fn operator_routes() -> Router<ApiState> {
    Router::new()
        .route("/api/bundles", get(list_bundles).post(upload_bundle))
        .route("/api/updates", get(list_updates).post(create_updates))
        .route("/api/updates/{id}", get(update_detail))
}

/// Routes for any authenticated principal: the archive download.
pub fn download_routes() -> Router<ApiState> {
    Router::new().route("/api/bundles/{sha256}/archive", get(download_archive))
}

/// Body of `POST /api/updates`: a bundle and either device ids or a group pattern.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUpdates {
    /// SHA-256 of a stored bundle archive.
    pub bundle: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Pattern over known device ids, with `*` for any run of characters and `?` for
    /// one character, such as `jetson-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Response of `POST /api/updates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedUpdates {
    /// One new update per device, in the order of the request or of the device ids.
    pub updates: Vec<UpdateRecord>,
    /// Unfinished updates that the new ones replaced.
    pub superseded: Vec<Superseded>,
    /// Ids of new updates whose command the MQTT client did not take; the server sends
    /// them again when their device next comes online.
    pub unsent: Vec<String>,
}

/// Response of `GET /api/updates/{id}`: the update and its event history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateDetail {
    #[serde(flatten)]
    pub update: UpdateRecord,
    /// Events in the order they arrived.
    pub events: Vec<UpdateEventRecord>,
}

/// Query of `GET /api/updates`.
#[derive(Debug, Deserialize)]
struct UpdatesQuery {
    device: Option<String>,
    limit: Option<u32>,
}

/// Returns the name the principal acts under, as stored in `uploaded_by`, `created_by`
/// and `requested_by`.
pub(crate) fn actor(principal: &Principal) -> String {
    match principal {
        Principal::Operator { name } => name.clone(),
        Principal::Device { id } => format!("device:{id}"),
        Principal::Ingester { name } => format!("ingester:{name}"),
    }
}

async fn list_bundles(State(state): State<ApiState>) -> Result<Json<Vec<BundleRecord>>, ApiError> {
    Ok(Json(state.store.bundles().await?))
}

/// Stores an uploaded archive: 201 with its record when new, 200 with the stored record
/// when an archive with the same SHA-256 is already there.
async fn upload_bundle(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let updates = &state.updates;
    let (status, record) = match store_upload(updates, &principal, &headers, body).await {
        Ok(stored) => stored,
        Err(error) if error.is_rejection() => {
            updates.metrics.updates.bundles_rejected.inc();
            tracing::warn!(uploader = %actor(&principal), %error, "bundle upload rejected");
            return Err(error.into());
        }
        Err(error) => return Err(error.into()),
    };
    Ok((status, Json(record)).into_response())
}

async fn store_upload(
    updates: &Updates,
    principal: &Principal,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, BundleRecord), UpdateError> {
    let limit = updates.max_bundle_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // NOTE: a rejection before the body is read leaves it unread, so hyper closes the
    // connection, and a client still sending a large body may see a reset, not the 413.
    if declared.is_some_and(|length| length > limit) {
        return Err(UpdateError::TooLarge { limit });
    }

    let incoming = updates.archives.receive(body, limit).await?;
    let manifest = updates
        .archives
        .inspect(&incoming, updates.public_key.clone())
        .await?;
    let sha256 = incoming.sha256.clone();
    let stored_path = updates.archives.path_of(&sha256);
    if let Some(existing) = updates.store.bundle(&sha256).await?
        && tokio::fs::try_exists(&stored_path).await.unwrap_or(false)
    {
        return Ok((StatusCode::OK, existing));
    }

    let size = incoming.size;
    updates.archives.keep(incoming).await?;
    let record = BundleRecord {
        sha256: sha256.clone(),
        name: manifest.name,
        version: manifest.version,
        size: i64::try_from(size).unwrap_or(i64::MAX),
        uploaded_ms: crate::unix_millis() as i64,
        uploaded_by: actor(principal),
    };
    if !updates.store.put_bundle(&record).await? {
        // Another upload of the same archive was recorded first, or the record outlived
        // its file, which the rename above has just restored.
        let existing = updates.store.bundle(&sha256).await?.unwrap_or(record);
        return Ok((StatusCode::OK, existing));
    }
    tracing::info!(
        sha256 = %record.sha256,
        name = %record.name,
        version = %record.version,
        size,
        uploader = %record.uploaded_by,
        "bundle stored"
    );
    Ok((StatusCode::CREATED, record))
}

/// Streams an archive, whole or one byte range of it.
async fn download_archive(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let updates = &state.updates;
    let sha256 = checked_sha256(&sha256)?;
    if updates.store.bundle(sha256).await?.is_none() {
        return Err(UpdateError::BundleNotFound {
            sha256: sha256.to_owned(),
        }
        .into());
    }
    let path = updates.archives.path_of(sha256);
    let io_error = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => UpdateError::ArchiveMissing {
            sha256: sha256.to_owned(),
        },
        _ => UpdateError::Io {
            path: path.clone(),
            source,
        },
    };
    let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
    let size = file.metadata().await.map_err(io_error)?.len();

    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok());
    let mut response = match parse_range(range, size) {
        ByteRange::Whole => {
            tracing::info!(%sha256, downloader = %actor(&principal), size, "bundle archive sent");
            let mut response = Response::new(file_body(file, size));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            response
        }
        ByteRange::Part { start, end } => {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(io_error)?;
            let length = end - start + 1;
            tracing::info!(%sha256, downloader = %actor(&principal), start, end, "bundle archive range sent");
            let mut response = Response::new(file_body(file, length));
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            headers.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {start}-{end}/{size}")),
            );
            response
        }
        ByteRange::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!(
                    "range {:?} is outside the archive of {size} bytes",
                    range.unwrap_or_default()
                ),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{size}")),
            );
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::ETAG, header_value(&format!("\"{sha256}\"")));
    if !headers.contains_key(header::CONTENT_TYPE) {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        );
    }
    Ok(response)
}

/// Returns a header value made of visible ASCII, as every value built here is.
fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Returns a body that streams `length` bytes of `file` from its current position.
fn file_body(file: tokio::fs::File, length: u64) -> Body {
    let reader: Option<Box<dyn AsyncRead + Send + Unpin>> = Some(Box::new(file.take(length)));
    let stream = futures_util::stream::unfold(reader, |reader| async move {
        let mut reader = reader?;
        let mut buffer = vec![0u8; READ_CHUNK_BYTES];
        match reader.read(&mut buffer).await {
            Ok(0) => None,
            Ok(read) => {
                buffer.truncate(read);
                Some((Ok(Bytes::from(buffer)), Some(reader)))
            }
            // The stream ends after the error, which aborts the response.
            Err(error) => Some((Err(error), None)),
        }
    });
    Body::from_stream(stream)
}

/// Part of an archive of a given size that a `Range` header requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// No usable range: send the whole archive with 200.
    Whole,
    /// Send bytes `start..=end` with 206.
    Part { start: u64, end: u64 },
    /// The range starts past the end: respond with 416.
    Unsatisfiable,
}

/// Parses a `Range` header of one byte range: `bytes=N-`, `bytes=N-M` or the suffix
/// form `bytes=-N`. As RFC 9110 section 14.2 allows, a header that is malformed, names
/// another unit or requests several ranges is ignored and the whole archive is sent.
fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(spec) = header.and_then(|value| value.trim().strip_prefix("bytes=")) else {
        return ByteRange::Whole;
    };
    if spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return ByteRange::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match parse_digits(last) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if size == 0 => ByteRange::Unsatisfiable,
            Some(suffix) => ByteRange::Part {
                start: size - suffix.min(size),
                end: size - 1,
            },
            None => ByteRange::Whole,
        };
    }
    let Some(start) = parse_digits(first) else {
        return ByteRange::Whole;
    };
    let end = if last.is_empty() {
        u64::MAX
    } else {
        match parse_digits(last) {
            Some(end) if end >= start => end,
            _ => return ByteRange::Whole,
        }
    };
    if start >= size {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Part {
        start,
        end: end.min(size - 1),
    }
}

/// Parses a non-empty run of ASCII digits, rejecting signs and spaces.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Creates one update per selected device, supersedes their unfinished updates and
/// publishes the install commands.
async fn create_updates(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    body: Result<Json<CreateUpdates>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedUpdates>), ApiError> {
    let Json(request) = body.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid update request: {}", rejection.body_text()),
        )
    })?;
    let updates = &state.updates;
    let sha256 = checked_sha256(&request.bundle)?;
    let bundle =
        updates
            .store
            .bundle(sha256)
            .await?
            .ok_or_else(|| UpdateError::BundleNotFound {
                sha256: sha256.to_owned(),
            })?;
    let devices = select_devices(updates, &request).await?;
    let pairs = devices
        .into_iter()
        .map(|device_id| Ok((new_update_id()?, device_id)))
        .collect::<Result<Vec<_>, UpdateError>>()?;

    let created_by = actor(&principal);
    let (created, superseded) = updates
        .store
        .create_updates(&bundle, &pairs, &created_by)
        .await?;
    for old in &superseded {
        tracing::info!(
            update_id = %old.update_id,
            device_id = %old.device_id,
            replaced_by = %old.replaced_by,
            "update superseded"
        );
    }
    tracing::info!(
        sha256 = %bundle.sha256,
        name = %bundle.name,
        version = %bundle.version,
        devices = created.len(),
        creator = %created_by,
        "updates created"
    );
    let mut unsent = Vec::new();
    for update in &created {
        if !send_counted(updates, update).await {
            unsent.push(update.update_id.clone());
        }
    }
    let response = CreatedUpdates {
        updates: created,
        superseded,
        unsent,
    };
    Ok((StatusCode::CREATED, Json(response)))
}

/// Returns the device ids a request names, each once and in order, after checking that
/// each is a known device.
async fn select_devices(
    updates: &Updates,
    request: &CreateUpdates,
) -> Result<Vec<String>, UpdateError> {
    match (&request.devices, &request.group) {
        (Some(ids), None) => {
            if ids.is_empty() {
                return Err(UpdateError::InvalidRequest(
                    "devices is empty; list at least one device id".into(),
                ));
            }
            for id in ids {
                fleet_wire::topic::validate_device_id(id).map_err(UpdateError::InvalidRequest)?;
            }
            let known: HashSet<String> = updates.store.known_devices().await?.into_iter().collect();
            let mut seen = HashSet::new();
            let selected: Vec<String> = ids
                .iter()
                .filter(|id| seen.insert(id.as_str()))
                .cloned()
                .collect();
            let missing: Vec<&str> = selected
                .iter()
                .filter(|id| !known.contains(*id))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(UpdateError::DevicesNotFound {
                    ids: missing.join(", "),
                });
            }
            Ok(selected)
        }
        (None, Some(group)) => {
            if group.is_empty() {
                return Err(UpdateError::InvalidRequest(
                    "group is empty; give a pattern such as jetson-*".into(),
                ));
            }
            let selected: Vec<String> = updates
                .store
                .known_devices()
                .await?
                .into_iter()
                .filter(|id| glob::matches(group, id))
                .collect();
            if selected.is_empty() {
                return Err(UpdateError::NoDevicesMatch {
                    group: group.clone(),
                });
            }
            Ok(selected)
        }
        (Some(_), Some(_)) => Err(UpdateError::InvalidRequest(
            "give either devices or group, not both".into(),
        )),
        (None, None) => Err(UpdateError::InvalidRequest(
            "missing devices or group: give a list of device ids or a pattern such as jetson-*"
                .into(),
        )),
    }
}

async fn list_updates(
    State(state): State<ApiState>,
    query: Result<Query<UpdatesQuery>, QueryRejection>,
) -> Result<Json<Vec<UpdateRecord>>, ApiError> {
    let Query(query) = query.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid query: {}", rejection.body_text()),
        )
    })?;
    let limit = query.limit.unwrap_or(DEFAULT_UPDATE_ROWS);
    if limit == 0 || limit > MAX_UPDATE_ROWS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be between 1 and {MAX_UPDATE_ROWS}, got {limit}"),
        ));
    }
    let rows = state.store.updates(query.device.as_deref(), limit).await?;
    Ok(Json(rows))
}

async fn update_detail(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<UpdateDetail>, ApiError> {
    let Some(update) = state.store.update(&id).await? else {
        return Err(UpdateError::UpdateNotFound { id }.into());
    };
    let events = state.store.update_events(&id).await?;
    Ok(Json(UpdateDetail { update, events }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_range_reads_one_byte_range() {
        let size = 1000;
        let cases = [
            (None, ByteRange::Whole),
            (Some("bytes=0-99"), ByteRange::Part { start: 0, end: 99 }),
            (
                Some("bytes=100-"),
                ByteRange::Part {
                    start: 100,
                    end: 999,
                },
            ),
            (
                Some("bytes=900-5000"),
                ByteRange::Part {
                    start: 900,
                    end: 999,
                },
            ),
            (
                Some("bytes=999-999"),
                ByteRange::Part {
                    start: 999,
                    end: 999,
                },
            ),
            (
                Some("bytes=-10"),
                ByteRange::Part {
                    start: 990,
                    end: 999,
                },
            ),
            (Some("bytes=-5000"), ByteRange::Part { start: 0, end: 999 }),
            (Some("bytes=1000-"), ByteRange::Unsatisfiable),
            (Some("bytes=2000-3000"), ByteRange::Unsatisfiable),
            (Some("bytes=-0"), ByteRange::Unsatisfiable),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_range(header, size), expected, "{header:?}");
        }
    }

    #[test]
    fn parse_range_ignores_malformed_headers() {
        for header in [
            "items=0-10",
            "bytes=0-10,20-30",
            "bytes=abc-",
            "bytes=+5-10",
            "bytes=10-5",
            "bytes=",
            "bytes=5",
        ] {
            assert_eq!(
                parse_range(Some(header), 1000),
                ByteRange::Whole,
                "{header}"
            );
        }
    }
}
