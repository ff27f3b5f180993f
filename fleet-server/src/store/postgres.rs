//! The PostgreSQL backend, safe for several servers writing to one database.
//!
//! Transactions run at PostgreSQL's default READ COMMITTED level and rely on row and
//! table locks instead of serializable retries:
//!
//! - A batch first upserts the row of every device it mentions, in device id order. The
//!   upsert locks each row until the commit, so all writes for one device are serialized
//!   across transactions, and the fixed order keeps two overlapping batches from
//!   deadlocking.
//! - Totals change only through `UPDATE ... SET messages = messages + 1` and similar, so
//!   they are computed on the locked row, never read into Rust and written back.
//! - `INSERT ... ON CONFLICT (device_id, seq) DO NOTHING` waits for a concurrent
//!   transaction that inserted the same key and, once that commits, reports the conflict.
//!   A message stored by two servers at once is thus counted once as stored and once as
//!   a duplicate.
//! - Downsampling locks `telemetry_hourly` in SHARE ROW EXCLUSIVE mode, which conflicts
//!   with itself, so only one downsampling transaction runs at a time while readers
//!   continue. `DELETE ... RETURNING` hands each raw row to exactly one of them.

use std::str::FromStr;

use async_trait::async_trait;
use fleet_wire::Status;
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::rollup::{RawRow, Rollup};
use super::rows::{
    Contact, DeviceRow, HourlyRecord, TelemetryValues, WindowRow, device_contacts, state_name,
};
use super::{
    BatchOutcome, DownsampleOutcome, Received, Record, StoreBackend, StoreError, TelemetryRow,
    redact_password,
};

/// Connections per server. Ingestion writes through one at a time, and API requests use
/// the rest.
const MAX_CONNECTIONS: u32 = 8;

#[derive(Debug)]
pub(super) struct PostgresBackend {
    pool: PgPool,
}

impl PostgresBackend {
    /// Connects to `url` and applies migrations.
    pub async fn open(url: &str) -> Result<PostgresBackend, StoreError> {
        let open_error = |source| StoreError::Open {
            database: redact_password(url),
            source,
        };
        let options = PgConnectOptions::from_str(url).map_err(open_error)?;
        // A single connection fails at once when the server is unreachable, where a pool
        // would retry a refused connection until its acquire timeout (30 s by default).
        let mut connection = PgConnection::connect_with(&options)
            .await
            .map_err(open_error)?;
        sqlx::migrate!("./migrations/postgres")
            .run(&mut connection)
            .await?;
        connection.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_lazy_with(options);
        Ok(PostgresBackend { pool })
    }

    async fn is_known(&self, device_id: &str) -> Result<bool, StoreError> {
        let known = sqlx::query("SELECT 1 FROM devices WHERE id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(known.is_some())
    }
}

#[async_trait]
impl StoreBackend for PostgresBackend {
    async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        let mut outcome = BatchOutcome::default();
        let mut tx = self.pool.begin().await?;
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
             FROM telemetry WHERE received_ms >= $1",
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
        let rows = sqlx::query_as(
            "SELECT * FROM telemetry WHERE device_id = $1 ORDER BY seq DESC LIMIT $2",
        )
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
            "SELECT * FROM telemetry_hourly WHERE device_id = $1
             ORDER BY hour_start_ms DESC LIMIT $2",
        )
        .bind(device_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(rows))
    }

    async fn downsample(&self, older_than_ms: i64) -> Result<DownsampleOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Taken before the DELETE, so a second job waits here and its DELETE, which
        // takes a new snapshot at READ COMMITTED, no longer finds the rows this one
        // removed. Holding it also makes the read and rewrite of each hourly histogram
        // below safe.
        sqlx::query("LOCK TABLE telemetry_hourly IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let mut rollup = Rollup::default();
        {
            // DELETE ... RETURNING rather than SELECT then DELETE: a row that another
            // server commits in between would otherwise be deleted without being counted.
            let mut rows = sqlx::query_as::<_, RawRow>(
                "DELETE FROM telemetry WHERE received_ms < $1
                 RETURNING device_id, seq, received_ms, inferences, input_errors, labeled,
                           correct, latency",
            )
            .bind(older_than_ms)
            .fetch(&mut *tx);
            while let Some(row) = rows.try_next().await? {
                rollup.add(row)?;
            }
        }
        for ((device_id, hour_start_ms), totals) in &rollup.hours {
            let stored: Option<String> = sqlx::query_scalar(
                "SELECT latency FROM telemetry_hourly
                 WHERE device_id = $1 AND hour_start_ms = $2",
            )
            .bind(device_id)
            .bind(hour_start_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let latency = totals.merged_latency(stored.as_deref(), device_id, *hour_start_ms)?;
            sqlx::query(
                "INSERT INTO telemetry_hourly (device_id, hour_start_ms, messages, inferences,
                    input_errors, labeled, correct, latency)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
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
        tx.commit().await?;
        Ok(DownsampleOutcome {
            raw_rows: rollup.raw_rows,
            hourly_rows: rollup.hours.len() as u64,
        })
    }
}

/// Stores one telemetry message and adds it to its device's totals. Returns false when
/// its (device, seq) is already stored, and then changes only the duplicate count.
async fn insert_telemetry(
    tx: &mut Transaction<'_, Postgres>,
    message: &Received,
) -> Result<bool, sqlx::Error> {
    let values = TelemetryValues::new(message);
    let inserted = sqlx::query(
        "INSERT INTO telemetry (device_id, seq, device_time_ms, received_ms,
            interval_ms, model_name, model_version, inferences, input_errors, labeled,
            correct, confidence_sum, low_confidence, latency, latency_p50_us,
            latency_p95_us, cpu_percent, process_memory_bytes, memory_used_bytes,
            memory_total_bytes, temperature_celsius)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
            $17, $18, $19, $20, $21)
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
        sqlx::query("UPDATE devices SET duplicates = duplicates + 1 WHERE id = $1")
            .bind(values.device_id)
            .execute(&mut **tx)
            .await?;
        return Ok(false);
    }

    // LEAST and GREATEST skip NULL, so the first message sets min_seq and max_seq.
    sqlx::query(
        "UPDATE devices SET
            model_name = $1, model_version = $2, messages = messages + 1,
            min_seq = LEAST(min_seq, $3), max_seq = GREATEST(max_seq, $3),
            inferences = inferences + $4, input_errors = input_errors + $5,
            labeled = labeled + $6, correct = correct + $7
         WHERE id = $8",
    )
    .bind(values.model_name)
    .bind(values.model_version)
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
    tx: &mut Transaction<'_, Postgres>,
    status: &Status,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET state = $1, agent_version = $2,
            model_name = coalesce($3, model_name), model_version = coalesce($4, model_version)
         WHERE id = $5",
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
/// Either way the row stays locked until the transaction ends.
async fn touch_device(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &str,
    contact: Contact,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (id, first_seen_ms, last_seen_ms) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET
            first_seen_ms = LEAST(devices.first_seen_ms, excluded.first_seen_ms),
            last_seen_ms = GREATEST(devices.last_seen_ms, excluded.last_seen_ms)",
    )
    .bind(device_id)
    .bind(contact.first_ms)
    .bind(contact.last_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
