//! The SQLite backend: one database file, written by one transaction at a time.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, which takes SQLite's write lock up
//! front. Another writer, in this process or another, then waits (up to the busy
//! timeout) instead of failing with `SQLITE_BUSY` when its read would turn into a write,
//! and nothing can change the tables between a transaction's reads and its writes.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use fleet_wire::Status;
use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::rollup::{RawRow, Rollup};
use super::rows::{
    Contact, DeviceRow, HourlyRecord, TelemetryValues, WindowRow, device_contacts, state_name,
};
use super::{
    BatchOutcome, DownsampleOutcome, Received, Record, StoreBackend, StoreError, TelemetryRow,
};

#[derive(Debug)]
pub(super) struct SqliteBackend {
    pool: SqlitePool,
}

impl SqliteBackend {
    /// Opens (creating if needed) the file at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<SqliteBackend, StoreError> {
        let open_error = |source| StoreError::Open {
            database: path.display().to_string(),
            source,
        };
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteBackend { pool })
    }
}

#[async_trait]
impl StoreBackend for SqliteBackend {
    async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        let mut outcome = BatchOutcome::default();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (device_id, contact) in device_contacts(batch) {
            touch_device(&mut tx, device_id, contact).await?;
        }
        for record in batch {
            match record {
                Record::Telemetry(message) => {
                    if insert_telemetry(&mut tx, message).await? {
                        outcome.stored += 1;
                    } else {
                        outcome.duplicates += 1;
                    }
                }
                Record::Status { status, .. } => update_status(&mut tx, status).await?,
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn device_rows(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows = sqlx::query_as(
            "SELECT d.*, t.cpu_percent AS last_cpu, t.process_memory_bytes AS last_memory,
                    t.temperature_celsius AS last_temperature
             FROM devices d
             LEFT JOIN telemetry t ON t.device_id = d.id AND t.seq = d.max_seq
             ORDER BY d.id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn window_rows(&self, since_ms: i64) -> Result<Vec<WindowRow>, StoreError> {
        let rows = sqlx::query_as(
            "SELECT device_id, seq, inferences, interval_ms, latency
             FROM telemetry WHERE received_ms >= ?",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn telemetry(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<TelemetryRow>>, StoreError> {
        if !self.is_known(device_id).await? {
            return Ok(None);
        }
        let rows =
            sqlx::query_as("SELECT * FROM telemetry WHERE device_id = ? ORDER BY seq DESC LIMIT ?")
                .bind(device_id)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        Ok(Some(rows))
    }

    async fn hourly(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<HourlyRecord>>, StoreError> {
        if !self.is_known(device_id).await? {
            return Ok(None);
        }
        let rows = sqlx::query_as(
            "SELECT * FROM telemetry_hourly WHERE device_id = ?
             ORDER BY hour_start_ms DESC LIMIT ?",
        )
        .bind(device_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(rows))
    }

    async fn downsample(&self, older_than_ms: i64) -> Result<DownsampleOutcome, StoreError> {
        // The write lock that BEGIN IMMEDIATE takes keeps other writers out until the
        // commit, so the rows read here are exactly the rows the DELETE below removes.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut rollup = Rollup::default();
        {
            let mut rows = sqlx::query_as::<_, RawRow>(
                "SELECT device_id, seq, received_ms, inferences, input_errors, labeled,
                        correct, latency
                 FROM telemetry WHERE received_ms < ?",
            )
            .bind(older_than_ms)
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                rollup.add(row)?;
            }
        }
        for ((device_id, hour_start_ms), totals) in &rollup.hours {
            let stored: Option<String> = sqlx::query_scalar(
                "SELECT latency FROM telemetry_hourly WHERE device_id = ? AND hour_start_ms = ?",
            )
            .bind(device_id)
            .bind(hour_start_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let latency = totals.merged_latency(stored.as_deref(), device_id, *hour_start_ms)?;
            sqlx::query(
                "INSERT INTO telemetry_hourly (device_id, hour_start_ms, messages, inferences,
                    input_errors, labeled, correct, latency)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (device_id, hour_start_ms) DO UPDATE SET
                    messages = telemetry_hourly.messages + excluded.messages,
                    inferences = telemetry_hourly.inferences + excluded.inferences,
                    input_errors = telemetry_hourly.input_errors + excluded.input_errors,
                    labeled = telemetry_hourly.labeled + excluded.labeled,
                    correct = telemetry_hourly.correct + excluded.correct,
                    latency = excluded.latency",
            )
            .bind(device_id)
            .bind(hour_start_ms)
            .bind(totals.messages)
            .bind(totals.inferences)
            .bind(totals.input_errors)
            .bind(totals.labeled)
            .bind(totals.correct)
            .bind(latency)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM telemetry WHERE received_ms < ?")
            .bind(older_than_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DownsampleOutcome {
            raw_rows: rollup.raw_rows,
            hourly_rows: rollup.hours.len() as u64,
        })
    }
}

impl SqliteBackend {
    async fn is_known(&self, device_id: &str) -> Result<bool, StoreError> {
        let known = sqlx::query("SELECT 1 FROM devices WHERE id = ?")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(known.is_some())
    }
}

/// Stores one telemetry message and adds it to its device's totals. Returns false when
/// its (device, seq) is already stored, and then changes only the duplicate count.
async fn insert_telemetry(
    tx: &mut Transaction<'_, Sqlite>,
    message: &Received,
) -> Result<bool, sqlx::Error> {
    let values = TelemetryValues::new(message);
    let inserted = sqlx::query(
        "INSERT INTO telemetry (device_id, seq, device_time_ms, received_ms,
            interval_ms, model_name, model_version, inferences, input_errors, labeled,
            correct, confidence_sum, low_confidence, latency, latency_p50_us,
            latency_p95_us, cpu_percent, process_memory_bytes, memory_used_bytes,
            memory_total_bytes, temperature_celsius)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (device_id, seq) DO NOTHING",
    )
    .bind(values.device_id)
    .bind(values.seq)
    .bind(values.device_time_ms)
    .bind(values.received_ms)
    .bind(values.interval_ms)
    .bind(values.model_name)
    .bind(values.model_version)
    .bind(values.inferences)
    .bind(values.input_errors)
    .bind(values.labeled)
    .bind(values.correct)
    .bind(values.confidence_sum)
    .bind(values.low_confidence)
    .bind(&values.latency)
    .bind(values.latency_p50_us)
    .bind(values.latency_p95_us)
    .bind(values.cpu_percent)
    .bind(values.process_memory_bytes)
    .bind(values.memory_used_bytes)
    .bind(values.memory_total_bytes)
    .bind(values.temperature_celsius)
    .execute(&mut **tx)
    .await?
    .rows_affected();

    if inserted == 0 {
        sqlx::query("UPDATE devices SET duplicates = duplicates + 1 WHERE id = ?")
            .bind(values.device_id)
            .execute(&mut **tx)
            .await?;
        return Ok(false);
    }

    sqlx::query(
        "UPDATE devices SET
            model_name = ?, model_version = ?, messages = messages + 1,
            min_seq = min(coalesce(min_seq, ?), ?), max_seq = max(coalesce(max_seq, ?), ?),
            inferences = inferences + ?, input_errors = input_errors + ?,
            labeled = labeled + ?, correct = correct + ?
         WHERE id = ?",
    )
    .bind(values.model_name)
    .bind(values.model_version)
    .bind(values.seq)
    .bind(values.seq)
    .bind(values.seq)
    .bind(values.seq)
    .bind(values.inferences)
    .bind(values.input_errors)
    .bind(values.labeled)
    .bind(values.correct)
    .bind(values.device_id)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Records a device's connection state.
async fn update_status(
    tx: &mut Transaction<'_, Sqlite>,
    status: &Status,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET state = ?, agent_version = ?,
            model_name = coalesce(?, model_name), model_version = coalesce(?, model_version)
         WHERE id = ?",
    )
    .bind(state_name(status.state))
    .bind(&status.agent_version)
    .bind(status.model.as_ref().map(|m| m.name.as_str()))
    .bind(status.model.as_ref().map(|m| m.version.as_str()))
    .bind(&status.device_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates the device row on first contact and widens its first and last contact times.
async fn touch_device(
    tx: &mut Transaction<'_, Sqlite>,
    device_id: &str,
    contact: Contact,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (id, first_seen_ms, last_seen_ms) VALUES (?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET
            first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
            last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
    )
    .bind(device_id)
    .bind(contact.first_ms)
    .bind(contact.last_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
