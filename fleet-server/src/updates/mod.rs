//! Over-the-air updates, server side. Operators upload signed bundle archives and start
//! updates. The server then publishes an install command to each device, serves the
//! archive to devices over HTTP, and records the progress events devices report.
//!
//! - [`archives`] keeps the archive files, [`http`] serves the routes under
//!   `/api/bundles` and `/api/updates`, and [`commands`] publishes install commands.
//! - [`client`] and [`cli`] are the `fleet-server bundle` and `fleet-server update`
//!   commands, which call those routes.
//!
//! An update moves through the stages devices report (see [`fleet_wire::UpdateStage`])
//! and only forward. A newer update for the same device supersedes an unfinished one.

pub mod archives;
pub mod cli;
pub mod client;
pub mod commands;
pub mod glob;
pub mod http;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use fleet_bundle::PublicKey;

use crate::api::ApiError;
use crate::metrics::ServerMetrics;
use crate::store::{Store, StoreError};
use archives::ArchiveStore;
use commands::CommandPublisher;

/// Largest bundle archive accepted unless configured otherwise: 1 GiB.
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 1 << 30;
/// Name of the bundle folder placed beside a SQLite database when none is configured.
pub const DEFAULT_BUNDLE_DIR_NAME: &str = "fleet-bundles";

/// Settings of over-the-air updates.
#[derive(Debug, Clone)]
pub struct UpdateSettings {
    /// Folder of the bundle archives; `None` puts [`DEFAULT_BUNDLE_DIR_NAME`] beside a
    /// SQLite database, or in the working directory for PostgreSQL.
    pub bundle_dir: Option<PathBuf>,
    /// Public key file that uploaded bundles must be signed with; `None` accepts any
    /// readable archive, leaving the signature check to the devices.
    pub public_key: Option<PathBuf>,
    /// Largest archive accepted, in bytes.
    pub max_bundle_bytes: u64,
    /// Base of the archive URLs in install commands, as devices reach the server;
    /// `None` uses `http://` and the HTTP listen address.
    pub public_url: Option<String>,
}

impl Default for UpdateSettings {
    fn default() -> Self {
        UpdateSettings {
            bundle_dir: None,
            public_key: None,
            max_bundle_bytes: DEFAULT_MAX_BUNDLE_BYTES,
            public_url: None,
        }
    }
}

impl UpdateSettings {
    /// Returns the configured bundle folder, or the default one for `database`.
    pub fn resolve_bundle_dir(&self, database: &str) -> PathBuf {
        if let Some(dir) = &self.bundle_dir {
            return dir.clone();
        }
        let parent = crate::store::sqlite_path(database)
            .and_then(Path::parent)
            .filter(|parent| !parent.as_os_str().is_empty());
        match parent {
            Some(parent) => parent.join(DEFAULT_BUNDLE_DIR_NAME),
            None => PathBuf::from(DEFAULT_BUNDLE_DIR_NAME),
        }
    }
}

/// Errors of bundle uploads, downloads and updates. Each converts into an HTTP response
/// with its own status.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the request body is empty; send a bundle archive, as `fleet-server bundle upload` does"
    )]
    EmptyBody,
    #[error("the bundle archive is larger than the limit of {limit} bytes (--max-bundle-bytes)")]
    TooLarge { limit: u64 },
    #[error("failed to read the request body: {0}")]
    Body(axum::Error),
    #[error("invalid bundle archive: {reason}")]
    InvalidArchive { reason: String },
    #[error(
        "bundle {name} {version} failed the signature check against the server's \
         --bundle-public-key: {reason}"
    )]
    Unverified {
        name: String,
        version: String,
        reason: String,
    },
    #[error("failed to access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid SHA-256 {value:?}: expected 64 lowercase hex digits")]
    InvalidSha256 { value: String },
    #[error("bundle {sha256} not found; upload it first")]
    BundleNotFound { sha256: String },
    #[error("the archive of bundle {sha256} is missing from the bundle folder; upload it again")]
    ArchiveMissing { sha256: String },
    #[error("update {id:?} not found")]
    UpdateNotFound { id: String },
    #[error(
        "devices not found: {ids}; a device is known once it has connected or been provisioned"
    )]
    DevicesNotFound { ids: String },
    #[error("no known device matches group {group:?}")]
    NoDevicesMatch { group: String },
    #[error("invalid update request: {0}")]
    InvalidRequest(String),
    #[error("failed to publish the install command: {0}")]
    Publish(String),
    #[error("background task failed: {0}")]
    Task(String),
}

impl UpdateError {
    /// Returns the HTTP status of the response this error becomes.
    pub fn status(&self) -> StatusCode {
        match self {
            UpdateError::EmptyBody
            | UpdateError::Body(_)
            | UpdateError::InvalidArchive { .. }
            | UpdateError::Unverified { .. }
            | UpdateError::InvalidSha256 { .. }
            | UpdateError::NoDevicesMatch { .. }
            | UpdateError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            UpdateError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UpdateError::BundleNotFound { .. }
            | UpdateError::UpdateNotFound { .. }
            | UpdateError::DevicesNotFound { .. } => StatusCode::NOT_FOUND,
            UpdateError::Store(_)
            | UpdateError::Io { .. }
            | UpdateError::ArchiveMissing { .. }
            | UpdateError::Publish(_)
            | UpdateError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Returns whether the request was at fault (a 4xx status) rather than the server.
    pub fn is_rejection(&self) -> bool {
        self.status().is_client_error()
    }
}

impl From<UpdateError> for ApiError {
    fn from(error: UpdateError) -> ApiError {
        let status = error.status();
        if !status.is_server_error() {
            return ApiError::new(status, error.to_string());
        }
        if let UpdateError::Store(error) = error {
            return error.into();
        }
        let chain = format!("{:#}", anyhow::Error::from(error));
        tracing::error!(error = chain, "update request failed");
        ApiError::new(
            status,
            "internal error handling the update request; see the server log",
        )
    }
}

/// State of the update routes and the resend task.
#[derive(Debug)]
pub struct Updates {
    pub store: Store,
    pub archives: ArchiveStore,
    /// Key uploads are checked against, when configured.
    pub public_key: Option<PublicKey>,
    pub max_bundle_bytes: u64,
    pub publisher: CommandPublisher,
    pub metrics: Arc<ServerMetrics>,
}

/// Returns whether `value` is a lowercase hex SHA-256.
pub fn is_sha256(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// Returns `value` when it is a lowercase hex SHA-256.
fn checked_sha256(value: &str) -> Result<&str, UpdateError> {
    if is_sha256(value) {
        Ok(value)
    } else {
        Err(UpdateError::InvalidSha256 {
            value: value.chars().take(80).collect(),
        })
    }
}

/// Returns a new random update id, `u-` and 16 hex digits.
fn new_update_id() -> Result<String, UpdateError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes)
        .map_err(|error| UpdateError::Task(format!("no random source: {error}")))?;
    Ok(format!("u-{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_dir_defaults_beside_sqlite_file() {
        let settings = UpdateSettings::default();
        let cases = [
            ("fleet.db", "fleet-bundles"),
            ("data/fleet.db", "data/fleet-bundles"),
            ("sqlite:///var/lib/fleet.db", "/var/lib/fleet-bundles"),
            ("sqlite://fleet.db", "fleet-bundles"),
            ("postgres://u@h/db", "fleet-bundles"),
        ];
        for (database, expected) in cases {
            assert_eq!(
                settings.resolve_bundle_dir(database),
                PathBuf::from(expected),
                "{database}"
            );
        }
        let configured = UpdateSettings {
            bundle_dir: Some("/srv/bundles".into()),
            ..UpdateSettings::default()
        };
        assert_eq!(
            configured.resolve_bundle_dir("data/fleet.db"),
            PathBuf::from("/srv/bundles")
        );
    }

    #[test]
    fn sha256_must_be_lowercase_hex() {
        assert!(is_sha256(&"ab12".repeat(16)));
        assert!(!is_sha256(&"AB12".repeat(16)));
        assert!(!is_sha256(&"ab12".repeat(15)));
        assert!(!is_sha256(&"zz12".repeat(16)));
    }

    #[test]
    fn update_ids_are_distinct() {
        let a = new_update_id().unwrap();
        let b = new_update_id().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("u-"), "{a}");
        assert_eq!(a.len(), 18, "{a}");
    }
}
