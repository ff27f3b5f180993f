//! Routes of remote configuration, for operators: `PUT` and `GET
//! /api/devices/{id}/config`.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Extension, Json, Router};

use super::commands::store_and_send;
use super::{ConfigError, RemoteConfigs, new_change_id};
use crate::access::Principal;
use crate::api::{ApiError, ApiState};
use crate::store::remote_config::{ConfigRecord, ConfigSettings, ConfigStatus};
use crate::updates::http::actor;

/// Routes for operators: `/api/devices/{id}/config`.
pub fn operator_routes() -> Router<ApiState> {
    Router::new().route("/api/devices/{id}/config", get(show_config).put(set_config))
}

/// Stores the body as the device's new override set and publishes it: 202 with the
/// stored change, whose status stays `pending` until the device acknowledges it.
async fn set_config(
    State(state): State<ApiState>,
    Extension(principal): Extension<Principal>,
    Path(device_id): Path<String>,
    body: Result<Json<ConfigSettings>, JsonRejection>,
) -> Result<(StatusCode, Json<ConfigRecord>), ApiError> {
    let Json(settings) =
        body.map_err(|rejection| ConfigError::InvalidRequest(rejection.body_text()))?;
    let record = new_change(&state.remote_config, &principal, device_id, settings).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Checks a requested change, then stores and publishes it.
async fn new_change(
    configs: &RemoteConfigs,
    principal: &Principal,
    device_id: String,
    settings: ConfigSettings,
) -> Result<ConfigRecord, ConfigError> {
    fleet_wire::topic::validate_device_id(&device_id).map_err(ConfigError::InvalidDeviceId)?;
    settings.validate().map_err(ConfigError::InvalidSettings)?;
    if !configs.store.is_known_device(&device_id).await? {
        return Err(ConfigError::DeviceNotFound { id: device_id });
    }

    let now = crate::unix_millis() as i64;
    let record = ConfigRecord {
        device_id,
        change_id: new_change_id()?,
        settings,
        status: ConfigStatus::Pending,
        detail: String::new(),
        requested_by: actor(principal),
        created_ms: now,
        updated_ms: now,
    };
    let sent = store_and_send(configs, &record).await?;
    tracing::info!(
        device_id = %record.device_id,
        change_id = %record.change_id,
        settings = %serde_json::to_string(&record.settings).unwrap_or_default(),
        requester = %record.requested_by,
        sent,
        "configuration change stored"
    );
    Ok(record)
}

async fn show_config(
    State(state): State<ApiState>,
    Path(device_id): Path<String>,
) -> Result<Json<ConfigRecord>, ApiError> {
    match state.store.config(&device_id).await? {
        Some(record) => Ok(Json(record)),
        None => Err(ConfigError::NotSet { id: device_id }.into()),
    }
}
