//! Remote configuration, server side. Operators set the settings the server overrides on
//! a device (confidence threshold, telemetry interval, inference rate, drain rate,
//! commit timeout). The server stores the set as a new change, publishes it as a
//! [`fleet_wire::Command::SetConfig`], and records the device's acknowledgement.
//!
//! - [`http`] serves `PUT` and `GET /api/devices/{id}/config`, [`commands`] publishes
//!   the commands and resends a pending change when its device comes online, and
//!   [`metrics`] counts commands and acknowledgements.
//! - [`client`] and [`cli`] are the `fleet-server config` commands, which call those
//!   routes.
//!
//! Each change carries the whole override set, so a device that missed earlier changes
//! converges on the latest one. A change is `pending` until the device acknowledges it,
//! then `applied` or `rejected`. An acknowledgement of an older change is kept in the
//! history and changes nothing else.

pub mod cli;
pub mod client;
pub mod commands;
pub mod http;
pub mod metrics;

use std::sync::Arc;

use axum::http::StatusCode;
use tokio::sync::Mutex;

use crate::api::ApiError;
use crate::metrics::ServerMetrics;
use crate::store::{Store, StoreError};
use crate::updates::commands::CommandPublisher;

/// Errors of the configuration routes. Each converts into an HTTP response with its own
/// status.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid configuration request: {0}")]
    InvalidRequest(String),
    #[error("{0}")]
    InvalidDeviceId(String),
    /// A value outside its range. The message names the field.
    #[error("{0}")]
    InvalidSettings(String),
    #[error("device {id:?} not found; a device is known once it has connected or been provisioned")]
    DeviceNotFound { id: String },
    #[error("no configuration set for device {id:?}; set one with PUT /api/devices/{id}/config")]
    NotSet { id: String },
    #[error("no random source for the change id: {0}")]
    Random(String),
}

impl ConfigError {
    /// Returns the HTTP status of the response this error becomes.
    pub fn status(&self) -> StatusCode {
        match self {
            ConfigError::InvalidRequest(_)
            | ConfigError::InvalidDeviceId(_)
            | ConfigError::InvalidSettings(_) => StatusCode::BAD_REQUEST,
            ConfigError::DeviceNotFound { .. } | ConfigError::NotSet { .. } => {
                StatusCode::NOT_FOUND
            }
            ConfigError::Store(_) | ConfigError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(error: ConfigError) -> ApiError {
        let status = error.status();
        if !status.is_server_error() {
            return ApiError::new(status, error.to_string());
        }
        if let ConfigError::Store(error) = error {
            return error.into();
        }
        tracing::error!(error = %error, "configuration request failed");
        ApiError::new(
            status,
            "internal error handling the configuration request; see the server log",
        )
    }
}

/// State of the configuration routes and of the resend on reconnection.
#[derive(Debug)]
pub struct RemoteConfigs {
    pub store: Store,
    pub publisher: CommandPublisher,
    pub metrics: Arc<ServerMetrics>,
    /// Held while a change is stored and published and while a pending change is resent,
    /// so this server publishes a device's changes in the order it stored them.
    ///
    /// NOTE: servers sharing one database do not share this lock. When two of them
    /// change the same device at once, the device may end up with the older change
    /// while the newer one stays pending until the device next comes online.
    order: Mutex<()>,
}

impl RemoteConfigs {
    pub fn new(store: Store, publisher: CommandPublisher, metrics: Arc<ServerMetrics>) -> Self {
        RemoteConfigs {
            store,
            publisher,
            metrics,
            order: Mutex::new(()),
        }
    }
}

/// Returns a new random change id, `c-` and 16 hex digits.
fn new_change_id() -> Result<String, ConfigError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|error| ConfigError::Random(error.to_string()))?;
    Ok(format!("c-{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ids_are_distinct() {
        let a = new_change_id().unwrap();
        let b = new_change_id().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("c-"), "{a}");
        assert_eq!(a.len(), 18, "{a}");
    }

    #[test]
    fn errors_map_to_statuses() {
        let cases = [
            (
                ConfigError::InvalidSettings("invalid rate -1".into()),
                StatusCode::BAD_REQUEST,
            ),
            (
                ConfigError::DeviceNotFound { id: "cam-1".into() },
                StatusCode::NOT_FOUND,
            ),
            (
                ConfigError::NotSet { id: "cam-1".into() },
                StatusCode::NOT_FOUND,
            ),
            (
                ConfigError::Random("no entropy".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error}");
        }
    }
}
