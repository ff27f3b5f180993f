//! Stored over-the-air updates: the bundle archives the server keeps, one update per
//! device and archive with its current stage, and the append-only history of the
//! progress events devices report.
//!
//! The SQL is the same for both databases (SQLite accepts PostgreSQL's `$N`
//! placeholders), so [`updates_backend!`] writes one [`UpdateBackend`] implementation
//! per pool type from a single body, as `access_backend!` does for identities.

use async_trait::async_trait;
use fleet_wire::{UpdateEvent, UpdateStage};
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Stage of an update that no device has reported on yet.
pub const STAGE_PENDING: &str = "pending";
/// Stage of an update that a newer update for the same device replaced before it
/// finished. Only the server uses it; devices never report it.
pub const STAGE_SUPERSEDED: &str = "superseded";

/// Stages a device reports before a final one, in the order it passes them.
const PROGRESS_STAGES: [UpdateStage; 5] = [
    UpdateStage::Accepted,
    UpdateStage::Downloaded,
    UpdateStage::Verified,
    UpdateStage::HealthChecked,
    UpdateStage::Switched,
];
/// Rank of every final stage: above each progress stage, so a final event always
/// applies to an unfinished update.
const FINAL_RANK: i64 = 6;
/// Rank SQL gives a stored final stage or [`STAGE_SUPERSEDED`]: above every stage, so
/// nothing moves an update out of it.
const STUCK_RANK: i64 = 100;

/// Returns where `stage` sits in an update's progress; an event moves an update only to
/// a stage of a higher rank.
pub fn stage_rank(stage: UpdateStage) -> i64 {
    match stage {
        UpdateStage::Accepted => 1,
        UpdateStage::Downloaded => 2,
        UpdateStage::Verified => 3,
        UpdateStage::HealthChecked => 4,
        UpdateStage::Switched => 5,
        UpdateStage::Committed
        | UpdateStage::AlreadyInstalled
        | UpdateStage::Failed
        | UpdateStage::RolledBack => FINAL_RANK,
    }
}

/// Returns whether a stored stage name ends its update: a final device stage or
/// [`STAGE_SUPERSEDED`].
pub fn is_finished(stage: &str) -> bool {
    stage != STAGE_PENDING
        && !PROGRESS_STAGES
            .iter()
            .any(|progress| progress.as_str() == stage)
}

/// A bundle archive stored on the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct BundleRecord {
    /// Lowercase hex SHA-256 of the archive.
    pub sha256: String,
    /// Bundle name and version from the archive's manifest.
    pub name: String,
    pub version: String,
    /// Archive size in bytes.
    pub size: i64,
    /// Server clock at upload, milliseconds since the Unix epoch.
    pub uploaded_ms: i64,
    /// Operator, or `token:NAME` for an API token, that uploaded it.
    pub uploaded_by: String,
}

/// One update of one device with its bundle and current stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct UpdateRecord {
    pub update_id: String,
    pub device_id: String,
    /// SHA-256, name, version and size of the bundle archive being installed.
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub size: i64,
    /// [`STAGE_PENDING`], a stage name from [`UpdateStage::as_str`], or
    /// [`STAGE_SUPERSEDED`].
    pub stage: String,
    /// Detail of the event that set the stage, or why the update was superseded.
    pub detail: String,
    /// Server clock at creation and at the last stage change, milliseconds since the
    /// Unix epoch.
    pub created_ms: i64,
    pub updated_ms: i64,
    /// Operator, or `token:NAME` for an API token, that created the update.
    pub created_by: String,
}

/// One progress event as a device reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct UpdateEventRecord {
    /// Empty for a rollback that the agent started on its own.
    pub update_id: String,
    pub device_id: String,
    pub sha256: String,
    pub version: String,
    pub stage: String,
    pub detail: String,
    /// Device clock when the event happened and server clock when it arrived,
    /// milliseconds since the Unix epoch.
    pub device_time_ms: i64,
    pub received_ms: i64,
}

/// An update event taken in from MQTT, with the device id its topic named.
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub device_id: String,
    pub device_time_ms: u64,
    pub received_ms: u64,
    pub event: UpdateEvent,
}

/// Effect of recording an event on its update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventOutcome {
    /// The update moved to the event's stage.
    Applied,
    /// The update stayed where it was: it had already reached this stage or a later one,
    /// or it had finished.
    Stale,
    /// No update of this device has the event's update id.
    UnknownUpdate,
}

/// An update that a newer one replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superseded {
    pub update_id: String,
    pub device_id: String,
    /// Id of the update that replaced it.
    pub replaced_by: String,
}

/// Update operations behind [`super::Store`], one implementation per database.
#[async_trait]
pub(super) trait UpdateBackend: Send + Sync + std::fmt::Debug {
    /// Inserts `bundle`; returns false, changing nothing, when its SHA-256 is stored.
    async fn put_bundle(&self, bundle: &BundleRecord) -> Result<bool, StoreError>;
    async fn bundle(&self, sha256: &str) -> Result<Option<BundleRecord>, StoreError>;
    /// Lists every bundle, newest upload first.
    async fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError>;

    /// Inserts one pending update per `(id, device_id)` pair in one transaction, first
    /// marking each device's unfinished updates superseded, and returns those.
    async fn create_updates(
        &self,
        sha256: &str,
        updates: &[(String, String)],
        created_by: &str,
        now_ms: i64,
    ) -> Result<Vec<Superseded>, StoreError>;
    async fn update(&self, id: &str) -> Result<Option<UpdateRecord>, StoreError>;
    /// Lists updates, newest first, of one device or of all.
    async fn updates(
        &self,
        device_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<UpdateRecord>, StoreError>;
    /// Lists a device's unfinished updates, oldest first.
    async fn unfinished_updates(&self, device_id: &str) -> Result<Vec<UpdateRecord>, StoreError>;
    /// Lists an update's events in the order they arrived.
    async fn update_events(&self, update_id: &str) -> Result<Vec<UpdateEventRecord>, StoreError>;
    /// Appends an event and moves its update forward, in one transaction.
    async fn record_update_event(
        &self,
        event: &ReceivedEvent,
        stage_rank: i64,
    ) -> Result<EventOutcome, StoreError>;
    /// Lists the ids of devices that have connected or hold a device credential.
    async fn known_devices(&self) -> Result<Vec<String>, StoreError>;
}

/// Columns of [`UpdateRecord`], from `updates u JOIN bundles b`.
pub(super) const UPDATE_COLUMNS: &str = "u.id AS update_id, u.device_id, u.sha256, b.name, b.version, b.size, \
     u.stage, u.detail, u.created_ms, u.updated_ms, u.created_by";

/// Returns a SQL list of the stages that leave an update unfinished, as in
/// `('pending', 'accepted', ...)`. The names are constants, never user input.
pub(super) fn unfinished_stages_sql() -> String {
    let names: Vec<String> = std::iter::once(STAGE_PENDING)
        .chain(PROGRESS_STAGES.iter().map(|stage| stage.as_str()))
        .map(|name| format!("'{name}'"))
        .collect();
    format!("({})", names.join(", "))
}

/// Returns a SQL expression giving the rank of the stored `stage` column, as
/// [`stage_rank`] does for a reported stage.
pub(super) fn stored_rank_sql() -> String {
    let mut sql = format!("CASE stage WHEN '{STAGE_PENDING}' THEN 0");
    for stage in PROGRESS_STAGES {
        sql.push_str(&format!(
            " WHEN '{}' THEN {}",
            stage.as_str(),
            stage_rank(stage)
        ));
    }
    sql.push_str(&format!(" ELSE {STUCK_RANK} END"));
    sql
}

/// Implements [`UpdateBackend`] for a backend struct with a `pool` field of a sqlx pool.
macro_rules! updates_backend {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::updates::UpdateBackend for $backend {
            async fn put_bundle(
                &self,
                bundle: &$crate::store::updates::BundleRecord,
            ) -> Result<bool, $crate::store::StoreError> {
                let result = sqlx::query(
                    "INSERT INTO bundles (sha256, name, version, size, uploaded_ms, uploaded_by) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sha256) DO NOTHING",
                )
                .bind(&bundle.sha256)
                .bind(&bundle.name)
                .bind(&bundle.version)
                .bind(bundle.size)
                .bind(bundle.uploaded_ms)
                .bind(&bundle.uploaded_by)
                .execute(&self.pool)
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn bundle(
                &self,
                sha256: &str,
            ) -> Result<Option<$crate::store::updates::BundleRecord>, $crate::store::StoreError>
            {
                let bundle = sqlx::query_as("SELECT * FROM bundles WHERE sha256 = $1")
                    .bind(sha256)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(bundle)
            }

            async fn bundles(
                &self,
            ) -> Result<Vec<$crate::store::updates::BundleRecord>, $crate::store::StoreError> {
                let bundles =
                    sqlx::query_as("SELECT * FROM bundles ORDER BY uploaded_ms DESC, sha256")
                        .fetch_all(&self.pool)
                        .await?;
                Ok(bundles)
            }

            async fn create_updates(
                &self,
                sha256: &str,
                updates: &[(String, String)],
                created_by: &str,
                now_ms: i64,
            ) -> Result<Vec<$crate::store::updates::Superseded>, $crate::store::StoreError> {
                let supersede = format!(
                    "UPDATE updates SET stage = '{}', detail = $1, updated_ms = $2 \
                     WHERE device_id = $3 AND stage IN {} RETURNING id",
                    $crate::store::updates::STAGE_SUPERSEDED,
                    $crate::store::updates::unfinished_stages_sql(),
                );
                let mut superseded = Vec::new();
                let mut tx = self.pool.begin().await?;
                for (id, device_id) in updates {
                    let replaced: Vec<(String,)> = sqlx::query_as(&supersede)
                        .bind(format!("replaced by update {id}"))
                        .bind(now_ms)
                        .bind(device_id)
                        .fetch_all(&mut *tx)
                        .await?;
                    superseded.extend(replaced.into_iter().map(|(old,)| {
                        $crate::store::updates::Superseded {
                            update_id: old,
                            device_id: device_id.clone(),
                            replaced_by: id.clone(),
                        }
                    }));
                    sqlx::query(
                        "INSERT INTO updates (id, device_id, sha256, created_ms, created_by, \
                         stage, detail, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, '', $4)",
                    )
                    .bind(id)
                    .bind(device_id)
                    .bind(sha256)
                    .bind(now_ms)
                    .bind(created_by)
                    .bind($crate::store::updates::STAGE_PENDING)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(superseded)
            }

            async fn update(
                &self,
                id: &str,
            ) -> Result<Option<$crate::store::updates::UpdateRecord>, $crate::store::StoreError>
            {
                let sql = format!(
                    "SELECT {} FROM updates u JOIN bundles b ON b.sha256 = u.sha256 \
                     WHERE u.id = $1",
                    $crate::store::updates::UPDATE_COLUMNS
                );
                let update = sqlx::query_as(&sql)
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(update)
            }

            async fn updates(
                &self,
                device_id: Option<&str>,
                limit: i64,
            ) -> Result<Vec<$crate::store::updates::UpdateRecord>, $crate::store::StoreError> {
                let filter = match device_id {
                    Some(_) => "WHERE u.device_id = $2",
                    None => "",
                };
                let sql = format!(
                    "SELECT {} FROM updates u JOIN bundles b ON b.sha256 = u.sha256 {filter} \
                     ORDER BY u.created_ms DESC, u.id LIMIT $1",
                    $crate::store::updates::UPDATE_COLUMNS
                );
                let mut query = sqlx::query_as(&sql).bind(limit);
                if let Some(device_id) = device_id {
                    query = query.bind(device_id);
                }
                Ok(query.fetch_all(&self.pool).await?)
            }

            async fn unfinished_updates(
                &self,
                device_id: &str,
            ) -> Result<Vec<$crate::store::updates::UpdateRecord>, $crate::store::StoreError> {
                let sql = format!(
                    "SELECT {} FROM updates u JOIN bundles b ON b.sha256 = u.sha256 \
                     WHERE u.device_id = $1 AND u.stage IN {} ORDER BY u.created_ms, u.id",
                    $crate::store::updates::UPDATE_COLUMNS,
                    $crate::store::updates::unfinished_stages_sql(),
                );
                let updates = sqlx::query_as(&sql)
                    .bind(device_id)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(updates)
            }

            async fn update_events(
                &self,
                update_id: &str,
            ) -> Result<Vec<$crate::store::updates::UpdateEventRecord>, $crate::store::StoreError>
            {
                let events = sqlx::query_as(
                    "SELECT update_id, device_id, sha256, version, stage, detail, \
                     device_time_ms, received_ms FROM update_events \
                     WHERE update_id = $1 ORDER BY id",
                )
                .bind(update_id)
                .fetch_all(&self.pool)
                .await?;
                Ok(events)
            }

            async fn record_update_event(
                &self,
                received: &$crate::store::updates::ReceivedEvent,
                stage_rank: i64,
            ) -> Result<$crate::store::updates::EventOutcome, $crate::store::StoreError> {
                use $crate::store::updates::EventOutcome;

                let event = &received.event;
                let device_time_ms = i64::try_from(received.device_time_ms).unwrap_or(i64::MAX);
                let received_ms = i64::try_from(received.received_ms).unwrap_or(i64::MAX);
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO update_events (update_id, device_id, sha256, version, stage, \
                     detail, device_time_ms, received_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&event.update_id)
                .bind(&received.device_id)
                .bind(&event.sha256)
                .bind(&event.version)
                .bind(event.stage.as_str())
                .bind(&event.detail)
                .bind(device_time_ms)
                .bind(received_ms)
                .execute(&mut *tx)
                .await?;

                // One conditional statement, so concurrent servers cannot move an update
                // backwards between a read and a write.
                let advance = format!(
                    "UPDATE updates SET stage = $1, detail = $2, updated_ms = $3 \
                     WHERE id = $4 AND device_id = $5 AND ({}) < $6",
                    $crate::store::updates::stored_rank_sql()
                );
                let moved = sqlx::query(&advance)
                    .bind(event.stage.as_str())
                    .bind(&event.detail)
                    .bind(received_ms)
                    .bind(&event.update_id)
                    .bind(&received.device_id)
                    .bind(stage_rank)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
                let outcome = if moved {
                    EventOutcome::Applied
                } else {
                    let known = sqlx::query("SELECT 1 FROM updates WHERE id = $1 AND device_id = $2")
                        .bind(&event.update_id)
                        .bind(&received.device_id)
                        .fetch_optional(&mut *tx)
                        .await?
                        .is_some();
                    if known {
                        EventOutcome::Stale
                    } else {
                        EventOutcome::UnknownUpdate
                    }
                };
                tx.commit().await?;
                Ok(outcome)
            }

            async fn known_devices(&self) -> Result<Vec<String>, $crate::store::StoreError> {
                let ids: Vec<(String,)> = sqlx::query_as(
                    "SELECT id FROM devices UNION \
                     SELECT name FROM credentials WHERE role = 'device' ORDER BY 1",
                )
                .fetch_all(&self.pool)
                .await?;
                Ok(ids.into_iter().map(|(id,)| id).collect())
            }
        }
    };
}

pub(super) use updates_backend;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_stages_rank_in_order_below_final() {
        for (index, stage) in PROGRESS_STAGES.iter().enumerate() {
            assert!(!stage.is_final(), "{stage:?}");
            assert_eq!(stage_rank(*stage), index as i64 + 1, "{stage:?}");
        }
        for stage in [
            UpdateStage::Committed,
            UpdateStage::AlreadyInstalled,
            UpdateStage::Failed,
            UpdateStage::RolledBack,
        ] {
            assert!(stage.is_final(), "{stage:?}");
            assert_eq!(stage_rank(stage), FINAL_RANK, "{stage:?}");
        }
    }

    #[test]
    fn finished_stages_are_final_or_superseded() {
        assert!(!is_finished(STAGE_PENDING));
        assert!(!is_finished("switched"));
        assert!(is_finished("committed"));
        assert!(is_finished("rolled_back"));
        assert!(is_finished(STAGE_SUPERSEDED));
    }

    #[test]
    fn stored_rank_sql_lists_every_progress_stage() {
        let sql = stored_rank_sql();
        assert!(sql.starts_with("CASE stage WHEN 'pending' THEN 0"), "{sql}");
        assert!(sql.contains("WHEN 'health_checked' THEN 4"), "{sql}");
        assert!(sql.ends_with("ELSE 100 END"), "{sql}");
        assert_eq!(
            unfinished_stages_sql(),
            "('pending', 'accepted', 'downloaded', 'verified', 'health_checked', 'switched')"
        );
    }
}
