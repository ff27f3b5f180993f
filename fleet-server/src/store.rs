//! Fleet state in SQLite through sqlx: devices, their telemetry, and the queries the
//! API and console read.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use fleet_wire::{DeviceState, LatencyHistogram, Status, Telemetry};
use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("invalid stored latency histogram for device {device_id} seq {seq}")]
    Histogram {
        device_id: String,
        seq: i64,
        #[source]
        source: serde_json::Error,
    },
}

/// A telemetry message with the time the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub telemetry: Telemetry,
    pub received_ms: u64,
}

/// One decoded message to apply to the store.
#[derive(Debug, Clone)]
pub enum Record {
    Telemetry(Received),
    Status { status: Status, received_ms: u64 },
}

/// Counts from one batch write.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    pub stored: usize,
    pub duplicates: usize,
}

/// One device as the API and console show it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceSummary {
    pub id: String,
    pub state: String,
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    pub agent_version: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub messages: i64,
    /// Sequence numbers missing between the lowest and highest received.
    pub gaps: i64,
    pub duplicates: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    /// Top-1 accuracy over every labelled inference, 0 to 1.
    pub accuracy: Option<f64>,
    /// Inferences per second over the recent window.
    pub throughput: f64,
    /// Latency percentiles over the recent window, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub process_memory_bytes: Option<i64>,
    pub temperature_celsius: Option<f64>,
}

/// One stored telemetry row as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryRow {
    pub seq: i64,
    pub device_time_ms: i64,
    pub received_ms: i64,
    pub interval_ms: i64,
    pub model_name: String,
    pub model_version: String,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub confidence_sum: f64,
    pub low_confidence: i64,
    pub latency_p50_us: Option<f64>,
    pub latency_p95_us: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub process_memory_bytes: Option<i64>,
    pub memory_used_bytes: Option<i64>,
    pub memory_total_bytes: Option<i64>,
    pub temperature_celsius: Option<f64>,
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the SQLite file at `path` and applies migrations.
    ///
    /// WAL mode lets the API read while ingestion writes; `synchronous = FULL` makes a
    /// committed batch survive power loss, which the MQTT acknowledgement relies on.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
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
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Store { pool })
    }

    /// Applies a batch of records in one transaction and in order, ignoring (and
    /// counting) telemetry whose (device, seq) pair is already stored.
    pub async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        let mut outcome = BatchOutcome::default();
        let mut tx = self.pool.begin().await?;
        for record in batch {
            match record {
                Record::Telemetry(message) => {
                    if insert_telemetry(&mut tx, message).await? {
                        outcome.stored += 1;
                    } else {
                        outcome.duplicates += 1;
                    }
                }
                Record::Status {
                    status,
                    received_ms,
                } => update_status(&mut tx, status, *received_ms).await?,
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }

    /// Lists every device with totals and the latency and throughput of telemetry
    /// received in the last `window`.
    pub async fn devices(
        &self,
        now_ms: u64,
        window: Duration,
    ) -> Result<Vec<DeviceSummary>, StoreError> {
        let recent = self.recent_windows(now_ms, window).await?;
        let rows = sqlx::query(
            "SELECT d.*, t.cpu_percent AS last_cpu, t.process_memory_bytes AS last_memory,
                    t.temperature_celsius AS last_temperature
             FROM devices d
             LEFT JOIN telemetry t ON t.device_id = d.id AND t.seq = d.max_seq
             ORDER BY d.id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let messages: i64 = row.try_get("messages")?;
            let min_seq: Option<i64> = row.try_get("min_seq")?;
            let max_seq: Option<i64> = row.try_get("max_seq")?;
            let labeled: i64 = row.try_get("labeled")?;
            let correct: i64 = row.try_get("correct")?;
            let window_stats = recent.get(&id);
            devices.push(DeviceSummary {
                state: row.try_get("state")?,
                model_name: row.try_get("model_name")?,
                model_version: row.try_get("model_version")?,
                agent_version: row.try_get("agent_version")?,
                first_seen_ms: row.try_get("first_seen_ms")?,
                last_seen_ms: row.try_get("last_seen_ms")?,
                messages,
                gaps: match (min_seq, max_seq) {
                    (Some(low), Some(high)) => high - low + 1 - messages,
                    _ => 0,
                },
                duplicates: row.try_get("duplicates")?,
                inferences: row.try_get("inferences")?,
                input_errors: row.try_get("input_errors")?,
                labeled,
                correct,
                accuracy: (labeled > 0).then(|| correct as f64 / labeled as f64),
                throughput: window_stats.map_or(0.0, WindowStats::throughput),
                latency_p50_ms: window_stats
                    .and_then(|w| w.latency.quantile_micros(0.5))
                    .map(|us| us / 1e3),
                latency_p95_ms: window_stats
                    .and_then(|w| w.latency.quantile_micros(0.95))
                    .map(|us| us / 1e3),
                cpu_percent: row.try_get("last_cpu")?,
                process_memory_bytes: row.try_get("last_memory")?,
                temperature_celsius: row.try_get("last_temperature")?,
                id,
            });
        }
        Ok(devices)
    }

    /// Returns a device's most recent telemetry rows, newest first, or `None` when the
    /// device is unknown.
    pub async fn telemetry(
        &self,
        device_id: &str,
        limit: u32,
    ) -> Result<Option<Vec<TelemetryRow>>, StoreError> {
        let known = sqlx::query("SELECT 1 FROM devices WHERE id = ?")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        let rows =
            sqlx::query("SELECT * FROM telemetry WHERE device_id = ? ORDER BY seq DESC LIMIT ?")
                .bind(device_id)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        let rows = rows
            .into_iter()
            .map(|row| {
                Ok(TelemetryRow {
                    seq: row.try_get("seq")?,
                    device_time_ms: row.try_get("device_time_ms")?,
                    received_ms: row.try_get("received_ms")?,
                    interval_ms: row.try_get("interval_ms")?,
                    model_name: row.try_get("model_name")?,
                    model_version: row.try_get("model_version")?,
                    inferences: row.try_get("inferences")?,
                    input_errors: row.try_get("input_errors")?,
                    labeled: row.try_get("labeled")?,
                    correct: row.try_get("correct")?,
                    confidence_sum: row.try_get("confidence_sum")?,
                    low_confidence: row.try_get("low_confidence")?,
                    latency_p50_us: row.try_get("latency_p50_us")?,
                    latency_p95_us: row.try_get("latency_p95_us")?,
                    cpu_percent: row.try_get("cpu_percent")?,
                    process_memory_bytes: row.try_get("process_memory_bytes")?,
                    memory_used_bytes: row.try_get("memory_used_bytes")?,
                    memory_total_bytes: row.try_get("memory_total_bytes")?,
                    temperature_celsius: row.try_get("temperature_celsius")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Some(rows))
    }

    /// Merges the latency histograms and counts of each device's recent telemetry.
    async fn recent_windows(
        &self,
        now_ms: u64,
        window: Duration,
    ) -> Result<HashMap<String, WindowStats>, StoreError> {
        let since = now_ms.saturating_sub(window.as_millis() as u64) as i64;
        let rows = sqlx::query(
            "SELECT device_id, seq, inferences, interval_ms, latency FROM telemetry WHERE received_ms >= ?",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        let mut windows: HashMap<String, WindowStats> = HashMap::new();
        for row in rows {
            let device_id: String = row.try_get("device_id")?;
            let text: String = row.try_get("latency")?;
            let latency: LatencyHistogram =
                serde_json::from_str(&text).map_err(|source| StoreError::Histogram {
                    device_id: device_id.clone(),
                    seq: row.try_get("seq").unwrap_or(-1),
                    source,
                })?;
            let entry = windows.entry(device_id).or_default();
            entry.inferences += row.try_get::<i64, _>("inferences")?;
            entry.interval_ms += row.try_get::<i64, _>("interval_ms")?;
            entry.latency.merge(&latency);
        }
        Ok(windows)
    }
}

#[derive(Debug, Default)]
struct WindowStats {
    inferences: i64,
    interval_ms: i64,
    latency: LatencyHistogram,
}

impl WindowStats {
    fn throughput(&self) -> f64 {
        if self.interval_ms <= 0 {
            return 0.0;
        }
        self.inferences as f64 * 1000.0 / self.interval_ms as f64
    }
}

/// Stores one telemetry message and adds it to its device's totals. Returns false when
/// its (device, seq) is already stored, and then changes only the duplicate count.
async fn insert_telemetry(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    message: &Received,
) -> Result<bool, sqlx::Error> {
    let t = &message.telemetry;
    let seq = t.seq as i64;
    let received = message.received_ms as i64;
    touch_device(tx, &t.device_id, received).await?;
    let latency = serde_json::to_string(&t.latency).expect("histograms serialize");
    let inserted = sqlx::query(
        "INSERT OR IGNORE INTO telemetry (device_id, seq, device_time_ms, received_ms,
            interval_ms, model_name, model_version, inferences, input_errors, labeled,
            correct, confidence_sum, low_confidence, latency, latency_p50_us,
            latency_p95_us, cpu_percent, process_memory_bytes, memory_used_bytes,
            memory_total_bytes, temperature_celsius)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&t.device_id)
    .bind(seq)
    .bind(t.device_time_ms as i64)
    .bind(received)
    .bind(i64::from(t.interval_ms))
    .bind(&t.model.name)
    .bind(&t.model.version)
    .bind(i64::from(t.inferences))
    .bind(i64::from(t.input_errors))
    .bind(i64::from(t.labeled))
    .bind(i64::from(t.correct))
    .bind(finite(f64::from(t.confidence_sum)).unwrap_or(0.0))
    .bind(i64::from(t.low_confidence))
    .bind(latency)
    .bind(t.latency.quantile_micros(0.5))
    .bind(t.latency.quantile_micros(0.95))
    .bind(finite(f64::from(t.system.cpu_percent)))
    .bind(t.system.process_memory_bytes as i64)
    .bind(t.system.memory_used_bytes as i64)
    .bind(t.system.memory_total_bytes as i64)
    .bind(
        t.system
            .temperature_celsius
            .and_then(|c| finite(f64::from(c))),
    )
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        sqlx::query("UPDATE devices SET duplicates = duplicates + 1 WHERE id = ?")
            .bind(&t.device_id)
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
    .bind(&t.model.name)
    .bind(&t.model.version)
    .bind(seq)
    .bind(seq)
    .bind(seq)
    .bind(seq)
    .bind(i64::from(t.inferences))
    .bind(i64::from(t.input_errors))
    .bind(i64::from(t.labeled))
    .bind(i64::from(t.correct))
    .bind(&t.device_id)
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// Records a device's connection state.
async fn update_status(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    status: &Status,
    received_ms: u64,
) -> Result<(), sqlx::Error> {
    touch_device(tx, &status.device_id, received_ms as i64).await?;
    let state = match status.state {
        DeviceState::Online => "online",
        DeviceState::Offline => "offline",
    };
    sqlx::query(
        "UPDATE devices SET state = ?, agent_version = ?,
            model_name = coalesce(?, model_name), model_version = coalesce(?, model_version)
         WHERE id = ?",
    )
    .bind(state)
    .bind(&status.agent_version)
    .bind(status.model.as_ref().map(|m| m.name.clone()))
    .bind(status.model.as_ref().map(|m| m.version.clone()))
    .bind(&status.device_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates the device row on first contact and moves `last_seen_ms` forward.
async fn touch_device(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    device_id: &str,
    received_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (id, first_seen_ms, last_seen_ms) VALUES (?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
    )
    .bind(device_id)
    .bind(received_ms)
    .bind(received_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}
