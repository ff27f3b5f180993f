//! Hard samples, server side: inputs a device classified with low confidence, uploaded
//! with the prediction so they can be labelled and used for retraining.
//!
//! Devices send each sample's bytes to `POST /api/samples` ([`http`]). The server keeps
//! one file per content in the sample folder ([`files`]), named by its SHA-256, and one
//! row per content in the database. A content uploaded again, by the same device or
//! another, keeps its first record. Operators list the records and read the files back.

pub mod files;
pub mod http;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;

use crate::api::ApiError;
use crate::metrics::ServerMetrics;
use crate::store::{Store, StoreError};
use files::SampleFiles;

/// Maximum sample size unless configured otherwise: 8 MiB, above the 3 to 5 MB of a
/// typical 12-megapixel camera JPEG (an estimate).
pub const DEFAULT_MAX_SAMPLE_BYTES: u64 = 8 << 20;
/// Name of the sample folder placed beside a SQLite database when none is configured.
pub const DEFAULT_SAMPLE_DIR_NAME: &str = "fleet-samples";

/// Settings of hard-sample uploads.
#[derive(Debug, Clone)]
pub struct SampleSettings {
    /// Folder of the sample files; `None` puts [`DEFAULT_SAMPLE_DIR_NAME`] beside a
    /// SQLite database, or in the working directory for PostgreSQL.
    pub sample_dir: Option<PathBuf>,
    /// Maximum sample size, in bytes.
    pub max_sample_bytes: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            sample_dir: None,
            max_sample_bytes: DEFAULT_MAX_SAMPLE_BYTES,
        }
    }
}

impl SampleSettings {
    /// Returns the configured sample folder, or the default one for `database`.
    pub fn resolve_sample_dir(&self, database: &str) -> PathBuf {
        if let Some(dir) = &self.sample_dir {
            return dir.clone();
        }
        let parent = crate::store::sqlite_path(database)
            .and_then(Path::parent)
            .filter(|parent| !parent.as_os_str().is_empty());
        match parent {
            Some(parent) => parent.join(DEFAULT_SAMPLE_DIR_NAME),
            None => PathBuf::from(DEFAULT_SAMPLE_DIR_NAME),
        }
    }
}

/// Errors of sample uploads and reads. Each converts into an HTTP response with its own
/// status.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("POST /api/samples is for device credentials; operators read samples with GET")]
    NotADevice,
    #[error("device_id {declared:?} does not match the credential of device {authenticated:?}")]
    DeviceMismatch {
        declared: String,
        authenticated: String,
    },
    #[error("the request body is empty; send the sample's PNG or JPEG bytes")]
    EmptyBody,
    #[error("the sample is larger than the limit of {limit} bytes (--max-sample-bytes)")]
    TooLarge { limit: u64 },
    #[error("failed to read the request body: {0}")]
    Body(axum::Error),
    #[error("unsupported content type {found:?}: expected image/png or image/jpeg")]
    UnsupportedContentType { found: String },
    #[error(
        "the body does not match its content type {content_type}: it lacks that format's \
         file signature"
    )]
    ContentMismatch { content_type: &'static str },
    #[error("invalid sample metadata: {0}")]
    InvalidMetadata(String),
    #[error("the body hashes to SHA-256 {actual}, but the request names {declared}")]
    Sha256Mismatch { declared: String, actual: String },
    #[error("invalid SHA-256 {value:?}: expected 64 lowercase hex digits")]
    InvalidSha256 { value: String },
    #[error("sample {sha256} not found")]
    NotFound { sha256: String },
    #[error("the file of sample {sha256} is missing from the sample folder")]
    FileMissing { sha256: String },
    #[error("failed to access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Task(String),
}

impl SampleError {
    /// Returns the HTTP status of the response this error becomes.
    pub fn status(&self) -> StatusCode {
        match self {
            SampleError::NotADevice | SampleError::DeviceMismatch { .. } => StatusCode::FORBIDDEN,
            SampleError::EmptyBody
            | SampleError::Body(_)
            | SampleError::ContentMismatch { .. }
            | SampleError::InvalidMetadata(_)
            | SampleError::Sha256Mismatch { .. }
            | SampleError::InvalidSha256 { .. } => StatusCode::BAD_REQUEST,
            SampleError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            SampleError::UnsupportedContentType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            SampleError::NotFound { .. } => StatusCode::NOT_FOUND,
            SampleError::Store(_)
            | SampleError::FileMissing { .. }
            | SampleError::Io { .. }
            | SampleError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<SampleError> for ApiError {
    fn from(error: SampleError) -> ApiError {
        let status = error.status();
        if !status.is_server_error() {
            return ApiError::new(status, error.to_string());
        }
        if let SampleError::Store(error) = error {
            return error.into();
        }
        let chain = format!("{:#}", anyhow::Error::from(error));
        tracing::error!(error = chain, "sample request failed");
        ApiError::new(
            status,
            "internal error handling the sample request; see the server log",
        )
    }
}

/// State of the sample routes.
#[derive(Debug)]
pub struct Samples {
    pub store: Store,
    pub files: SampleFiles,
    pub max_sample_bytes: u64,
    pub metrics: Arc<ServerMetrics>,
}

/// Returns `value` when it is a lowercase hex SHA-256.
fn checked_sha256(value: &str) -> Result<&str, SampleError> {
    if crate::updates::is_sha256(value) {
        Ok(value)
    } else {
        Err(SampleError::InvalidSha256 {
            value: value.chars().take(80).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_dir_defaults_beside_sqlite_file() {
        let settings = SampleSettings::default();
        let cases = [
            ("fleet.db", "fleet-samples"),
            ("data/fleet.db", "data/fleet-samples"),
            ("sqlite:///var/lib/fleet.db", "/var/lib/fleet-samples"),
            ("postgres://u@h/db", "fleet-samples"),
        ];
        for (database, expected) in cases {
            assert_eq!(
                settings.resolve_sample_dir(database),
                PathBuf::from(expected),
                "{database}"
            );
        }
        let configured = SampleSettings {
            sample_dir: Some("/srv/samples".into()),
            ..SampleSettings::default()
        };
        assert_eq!(
            configured.resolve_sample_dir("data/fleet.db"),
            PathBuf::from("/srv/samples")
        );
    }

    #[test]
    fn rejections_carry_client_statuses() {
        let cases = [
            (SampleError::NotADevice, StatusCode::FORBIDDEN),
            (SampleError::EmptyBody, StatusCode::BAD_REQUEST),
            (
                SampleError::TooLarge { limit: 1 },
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                SampleError::UnsupportedContentType {
                    found: "text/plain".into(),
                },
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                SampleError::NotFound {
                    sha256: "a".repeat(64),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                SampleError::FileMissing {
                    sha256: "a".repeat(64),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(error.status(), expected, "{error}");
        }
    }
}
