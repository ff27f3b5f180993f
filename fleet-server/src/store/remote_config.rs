//! Stored remote configuration: one row per device with the override set the server
//! wants in use there and whether the device has acknowledged it, and the append-only
//! history of the acknowledgements devices send.
//!
//! The SQL is the same for both databases, so [`remote_config_backend!`] writes one
//! [`ConfigBackend`] implementation per pool type from a single body, as
//! `updates_backend!` does for updates.

use async_trait::async_trait;
use fleet_wire::{ConfigAck, RemoteConfig};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Settings the server overrides on a device, as operators send them and the store keeps
/// them. A setting left out (`None`) uses the agent's own flag or config-file value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSettings {
    /// Top-1 confidence under which an inference counts as low-confidence, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence_threshold: Option<f32>,
    /// Seconds between telemetry messages, 0.05 to 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<f64>,
    /// Inferences per second, 0 for as fast as the model allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Backlog records sent per second at most, above 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_rate: Option<f64>,
    /// Seconds an update may wait for the commit, 1 to 86400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_timeout_seconds: Option<f64>,
    /// Top-1 confidence under which the device's local inference API sends requests to the cloud, 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_threshold: Option<f32>,
}

impl ConfigSettings {
    /// Builds the command payload that carries these settings as change `change_id`.
    pub fn to_remote_config(&self, change_id: &str) -> RemoteConfig {
        RemoteConfig {
            change_id: change_id.to_owned(),
            confidence_threshold: self.confidence_threshold,
            interval_seconds: self.interval_seconds,
            rate: self.rate,
            drain_rate: self.drain_rate,
            commit_timeout_seconds: self.commit_timeout_seconds,
            fallback_threshold: self.fallback_threshold,
        }
    }

    /// Checks every value against the range devices accept. The error names the first
    /// field outside it.
    pub fn validate(&self) -> Result<(), String> {
        self.to_remote_config("").validate()
    }
}

/// Whether a device has acknowledged the latest change of its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigStatus {
    /// Sent, or waiting to be sent, and not acknowledged yet.
    Pending,
    /// The device stored the settings and uses them.
    Applied,
    /// The device rejected the settings and kept its previous ones.
    Rejected,
}

impl ConfigStatus {
    /// Returns the status as written in JSON and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigStatus::Pending => "pending",
            ConfigStatus::Applied => "applied",
            ConfigStatus::Rejected => "rejected",
        }
    }

    fn parse(text: &str) -> Option<ConfigStatus> {
        [
            ConfigStatus::Pending,
            ConfigStatus::Applied,
            ConfigStatus::Rejected,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }
}

/// The configuration the server wants in use on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub device_id: String,
    /// Id of the latest change, repeated in the device's acknowledgement.
    pub change_id: String,
    pub settings: ConfigSettings,
    pub status: ConfigStatus,
    /// The settings in use on the device, or why it rejected the change. Empty while
    /// pending.
    pub detail: String,
    /// Operator, or `token:NAME` for an API token, that requested the change.
    pub requested_by: String,
    /// Server clock when the change was requested and when its status last changed,
    /// milliseconds since the Unix epoch.
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A `device_config` row as stored, with the settings as JSON text.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(super) struct ConfigRow {
    pub device_id: String,
    pub change_id: String,
    pub settings: String,
    pub status: String,
    pub detail: String,
    pub requested_by: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl ConfigRow {
    /// Encodes a record for storage.
    pub(super) fn from_record(record: &ConfigRecord) -> Result<ConfigRow, StoreError> {
        let settings =
            serde_json::to_string(&record.settings).map_err(|error| StoreError::InvalidConfig {
                device_id: record.device_id.clone(),
                reason: format!("settings do not encode as JSON: {error}"),
            })?;
        Ok(ConfigRow {
            device_id: record.device_id.clone(),
            change_id: record.change_id.clone(),
            settings,
            status: record.status.as_str().to_owned(),
            detail: record.detail.clone(),
            requested_by: record.requested_by.clone(),
            created_ms: record.created_ms,
            updated_ms: record.updated_ms,
        })
    }

    /// Decodes the settings and status of a stored row.
    pub(super) fn into_record(self) -> Result<ConfigRecord, StoreError> {
        let invalid = |reason: String| StoreError::InvalidConfig {
            device_id: self.device_id.clone(),
            reason,
        };
        let settings = serde_json::from_str(&self.settings)
            .map_err(|error| invalid(format!("settings are not valid JSON: {error}")))?;
        let status = ConfigStatus::parse(&self.status).ok_or_else(|| {
            invalid(format!(
                "status {:?} is none of pending, applied or rejected",
                self.status
            ))
        })?;
        Ok(ConfigRecord {
            device_id: self.device_id,
            change_id: self.change_id,
            settings,
            status,
            detail: self.detail,
            requested_by: self.requested_by,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        })
    }
}

/// A configuration acknowledgement taken in from MQTT, with the device id its topic
/// named.
#[derive(Debug, Clone)]
pub struct ReceivedConfigAck {
    pub device_id: String,
    pub device_time_ms: u64,
    pub received_ms: u64,
    pub ack: ConfigAck,
}

/// Effect of an acknowledgement on its device's configuration row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckOutcome {
    /// The acknowledgement was for the current change, which is now applied.
    Applied,
    /// The acknowledgement was for the current change, which is now rejected.
    Rejected,
    /// The acknowledgement named another change than the current one, or the device has
    /// no configuration row. Only the history records it.
    Stale,
}

/// One acknowledgement as a device sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct ConfigEventRecord {
    pub change_id: String,
    pub device_id: String,
    pub applied: bool,
    pub detail: String,
    /// Device clock when the device sent it and server clock when it arrived,
    /// milliseconds since the Unix epoch.
    pub device_time_ms: i64,
    pub received_ms: i64,
}

/// Remote configuration operations behind [`super::Store`], one implementation per
/// database.
#[async_trait]
pub(super) trait ConfigBackend: Send + Sync + std::fmt::Debug {
    /// Inserts the row, or replaces the device's row when it has one.
    async fn put_config(&self, row: &ConfigRow) -> Result<(), StoreError>;
    async fn config(&self, device_id: &str) -> Result<Option<ConfigRow>, StoreError>;
    /// Appends the acknowledgement to the history and, when it names the device's
    /// current change, sets that change's status and detail, in one transaction.
    async fn record_config_ack(&self, ack: &ReceivedConfigAck) -> Result<AckOutcome, StoreError>;
    /// Lists a device's latest `limit` acknowledgements, newest first.
    async fn config_events(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Vec<ConfigEventRecord>, StoreError>;
    /// Returns whether the device has connected or has a device credential.
    async fn is_known_device(&self, device_id: &str) -> Result<bool, StoreError>;
}

/// Implements [`ConfigBackend`] for a backend struct with a `pool` field of a sqlx pool.
macro_rules! remote_config_backend {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::remote_config::ConfigBackend for $backend {
            async fn put_config(
                &self,
                row: &$crate::store::remote_config::ConfigRow,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO device_config (device_id, change_id, settings, status, detail, \
                     requested_by, created_ms, updated_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (device_id) DO UPDATE SET change_id = excluded.change_id, \
                     settings = excluded.settings, status = excluded.status, \
                     detail = excluded.detail, requested_by = excluded.requested_by, \
                     created_ms = excluded.created_ms, updated_ms = excluded.updated_ms",
                )
                .bind(&row.device_id)
                .bind(&row.change_id)
                .bind(&row.settings)
                .bind(&row.status)
                .bind(&row.detail)
                .bind(&row.requested_by)
                .bind(row.created_ms)
                .bind(row.updated_ms)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn config(
                &self,
                device_id: &str,
            ) -> Result<Option<$crate::store::remote_config::ConfigRow>, $crate::store::StoreError>
            {
                let row = sqlx::query_as(
                    "SELECT device_id, change_id, settings, status, detail, requested_by, \
                     created_ms, updated_ms FROM device_config WHERE device_id = $1",
                )
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row)
            }

            async fn record_config_ack(
                &self,
                received: &$crate::store::remote_config::ReceivedConfigAck,
            ) -> Result<$crate::store::remote_config::AckOutcome, $crate::store::StoreError> {
                use $crate::store::remote_config::{AckOutcome, ConfigStatus};

                let ack = &received.ack;
                let device_time_ms = i64::try_from(received.device_time_ms).unwrap_or(i64::MAX);
                let received_ms = i64::try_from(received.received_ms).unwrap_or(i64::MAX);
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO config_events (change_id, device_id, applied, detail, \
                     device_time_ms, received_ms) VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&ack.change_id)
                .bind(&received.device_id)
                .bind(ack.applied)
                .bind(&ack.detail)
                .bind(device_time_ms)
                .bind(received_ms)
                .execute(&mut *tx)
                .await?;

                // Matching on the change id in the same statement keeps a late
                // acknowledgement of an older change from overwriting a newer one.
                let status = if ack.applied {
                    ConfigStatus::Applied
                } else {
                    ConfigStatus::Rejected
                };
                let current = sqlx::query(
                    "UPDATE device_config SET status = $1, detail = $2, updated_ms = $3 \
                     WHERE device_id = $4 AND change_id = $5",
                )
                .bind(status.as_str())
                .bind(&ack.detail)
                .bind(received_ms)
                .bind(&received.device_id)
                .bind(&ack.change_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    > 0;
                tx.commit().await?;
                Ok(match (current, ack.applied) {
                    (true, true) => AckOutcome::Applied,
                    (true, false) => AckOutcome::Rejected,
                    (false, _) => AckOutcome::Stale,
                })
            }

            async fn config_events(
                &self,
                device_id: &str,
                limit: i64,
            ) -> Result<
                Vec<$crate::store::remote_config::ConfigEventRecord>,
                $crate::store::StoreError,
            > {
                let events = sqlx::query_as(
                    "SELECT change_id, device_id, applied, detail, device_time_ms, received_ms \
                     FROM config_events WHERE device_id = $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(device_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                Ok(events)
            }

            async fn is_known_device(
                &self,
                device_id: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                let known = sqlx::query(
                    "SELECT 1 FROM devices WHERE id = $1 UNION ALL \
                     SELECT 1 FROM credentials WHERE role = 'device' AND name = $1",
                )
                .bind(device_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(known.is_some())
            }
        }
    };
}

pub(super) use remote_config_backend;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_json_lists_only_overrides() {
        let settings = ConfigSettings {
            rate: Some(2.5),
            confidence_threshold: Some(0.7),
            ..ConfigSettings::default()
        };
        let json = serde_json::to_string(&settings).unwrap();
        assert_eq!(json, r#"{"confidence_threshold":0.7,"rate":2.5}"#);
        assert_eq!(
            serde_json::from_str::<ConfigSettings>(&json).unwrap(),
            settings
        );
        assert_eq!(
            serde_json::to_string(&ConfigSettings::default()).unwrap(),
            "{}"
        );
    }

    #[test]
    fn settings_reject_unknown_fields() {
        let error = serde_json::from_str::<ConfigSettings>(r#"{"rates": 2}"#).unwrap_err();
        assert!(
            error.to_string().contains("unknown field `rates`"),
            "{error}"
        );
    }

    #[test]
    fn row_round_trips_and_rejects_bad_status() {
        let record = ConfigRecord {
            device_id: "cam-1".into(),
            change_id: "c-1".into(),
            settings: ConfigSettings {
                interval_seconds: Some(2.0),
                ..ConfigSettings::default()
            },
            status: ConfigStatus::Rejected,
            detail: "invalid interval".into(),
            requested_by: "alice".into(),
            created_ms: 1,
            updated_ms: 2,
        };
        let row = ConfigRow::from_record(&record).unwrap();
        assert_eq!(row.settings, r#"{"interval_seconds":2.0}"#);
        assert_eq!(row.status, "rejected");
        assert_eq!(row.clone().into_record().unwrap(), record);

        let bad = ConfigRow {
            status: "done".into(),
            ..row
        };
        let error = bad.into_record().unwrap_err().to_string();
        assert!(error.contains("cam-1"), "{error}");
        assert!(error.contains("\"done\""), "{error}");
    }
}
