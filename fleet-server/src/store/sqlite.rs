//! The SQLite backend: one database file, written by one transaction at a time.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, which takes SQLite's write lock up
//! front. Another writer, in this process or another, then waits (up to the busy
//! timeout) instead of failing with `SQLITE_BUSY` when its read would turn into a write,
//! and nothing can change the tables between a transaction's reads and its writes.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::rollup::{RawRow, Rollup};
use super::rows::{
    Contact, DEVICE_ROWS_QUERY, DeviceChange, DeviceRow, HourlyRecord, TelemetryValues, WindowRow,
    batch_outcome, device_changes, device_contacts, inserted_keys, unique_telemetry,
};
use super::{BatchOutcome, DownsampleOutcome, Record, StoreBackend, StoreError, TelemetryRow};

/// Most parameters one statement may bind: SQLITE_MAX_VARIABLE_NUMBER, 32,766 by default
/// since SQLite 3.32. Multi-row statements are split into chunks below it.
const MAX_PARAMETERS: usize = 32_766;
/// Parameters per row of each multi-row statement.
const DEVICE_CONTACT_COLUMNS: usize = 3;
const TELEMETRY_COLUMNS: usize = 21;
const DEVICE_CHANGE_COLUMNS: usize = 13;

/// Rows of a multi-row statement, padded with rows of NULLs to the next power of two.
///
/// SQLx caches a prepared statement per SQL text, and the row count changes from one
/// batch to the next. Unpadded statements were parsed and planned again for almost every
/// batch, which took over a quarter of the SQLite thread's time in the ingest benchmark.
/// With padding, each statement has at most one text per power of two. Padding rows
/// never match a stored key and are filtered out before anything is written.
fn padded<T>(rows: &[T]) -> impl Iterator<Item = Option<&T>> {
    let padding = rows.len().next_power_of_two() - rows.len();
    rows.iter()
        .map(Some)
        .chain(std::iter::repeat_n(None, padding))
}

/// Binds one padding row of `columns` NULLs in a multi-row statement.
fn push_nulls(row: &mut Separated<'_, '_, Sqlite, &'static str>, columns: usize) {
    for _ in 0..columns {
        row.push_bind(None::<i64>);
    }
}

/// Rows per multi-row statement with `columns` parameters each: the largest power of
/// two under SQLite's parameter limit, so that padding never crosses the limit.
const fn chunk_rows(columns: usize) -> usize {
    let max_rows = MAX_PARAMETERS / columns;
    1 << (usize::BITS - 1 - max_rows.leading_zeros())
}

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
            // NORMAL would skip the fsync at each commit, but in WAL mode a commit could
            // then be lost on power failure after its messages were acknowledged, and the
            // broker would not send them again. So each batch commit pays one fsync.
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

super::access::access_backend!(SqliteBackend);
super::updates::updates_backend!(SqliteBackend);
super::samples::samples_backend!(SqliteBackend);
super::remote_config::remote_config_backend!(SqliteBackend);

#[async_trait]
impl StoreBackend for SqliteBackend {
    async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        let telemetry = unique_telemetry(batch);
        let contacts: Vec<(&str, Contact)> = device_contacts(batch).into_iter().collect();

        // Most batches hold no telemetry that is stored already, so the device totals are
        // first computed as if every row were new and sent with the rest of the batch,
        // which then costs one round trip to SQLite. If some rows were stored before,
        // those totals are wrong: the transaction is rolled back and the batch written
        // again, with the totals computed from what the insert skipped.
        let all_new = inserted_keys(&telemetry, &HashSet::new());
        let (changes, stored) = device_changes(batch, all_new);
        let changes: Vec<(&str, DeviceChange<'_>)> = changes.into_iter().collect();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let seen = write_batch(&mut tx, &contacts, &telemetry, &changes).await?;
        if seen.is_empty() {
            tx.commit().await?;
            return Ok(batch_outcome(batch, stored));
        }
        tx.rollback().await?;

        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let seen = write_batch(&mut tx, &contacts, &telemetry, &[]).await?;
        let (changes, stored) = device_changes(batch, inserted_keys(&telemetry, &seen));
        let changes: Vec<(&str, DeviceChange<'_>)> = changes.into_iter().collect();
        write_batch(&mut tx, &[], &[], &changes).await?;
        tx.commit().await?;
        Ok(batch_outcome(batch, stored))
    }

    async fn device_rows(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows = sqlx::query_as(DEVICE_ROWS_QUERY)
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

/// Sends a batch's statements to SQLite in one round trip: the device contacts, then for
/// each chunk of telemetry a `SELECT` of the keys already stored and an insert that skips
/// them, then the device changes. Returns the (device, seq) pairs of `rows` that were
/// stored before.
///
/// Each statement sent on its own is a round trip to SQLx's SQLite thread, which on a
/// busy machine includes waiting until that thread and then the writer's task are
/// scheduled. As one multi-statement query, SQLx prepares and runs the statements in
/// order on its thread and binds each its share of the parameters.
///
/// The write lock that `BEGIN IMMEDIATE` took keeps the `SELECT`'s result true until the
/// commit. Asking first, rather than inserting with `RETURNING`, sends back only the
/// rows stored before, usually none, where `RETURNING` sends every inserted key from
/// SQLx's thread one row at a time.
async fn write_batch<'a>(
    tx: &mut Transaction<'_, Sqlite>,
    contacts: &[(&str, Contact)],
    rows: &[TelemetryValues<'a>],
    changes: &[(&str, DeviceChange<'_>)],
) -> Result<HashSet<(&'a str, i64)>, sqlx::Error> {
    let mut query = QueryBuilder::<Sqlite>::new("");
    for chunk in contacts.chunks(chunk_rows(DEVICE_CONTACT_COLUMNS)) {
        push_touch_devices(&mut query, chunk);
        query.push(";\n");
    }
    for chunk in rows.chunks(chunk_rows(TELEMETRY_COLUMNS)) {
        push_stored_keys(&mut query, chunk);
        query.push(";\n");
        push_insert_telemetry(&mut query, chunk);
        query.push(";\n");
    }
    for chunk in changes.chunks(chunk_rows(DEVICE_CHANGE_COLUMNS)) {
        push_update_devices(&mut query, chunk);
        query.push(";\n");
    }
    if query.sql().is_empty() {
        return Ok(HashSet::new());
    }
    let seen: Vec<(String, i64)> = query.build_query_as().fetch_all(&mut **tx).await?;
    if seen.is_empty() {
        return Ok(HashSet::new());
    }
    let seen: HashSet<(String, i64)> = seen.into_iter().collect();
    Ok(rows
        .iter()
        .filter(|row| seen.contains(&(row.device_id.to_owned(), row.seq)))
        .map(|row| (row.device_id, row.seq))
        .collect())
}

/// Appends a `SELECT` of the (device, seq) pairs of `rows` that are already stored.
fn push_stored_keys<'q>(query: &mut QueryBuilder<'q, Sqlite>, rows: &'q [TelemetryValues<'_>]) {
    query.push("WITH k (device_id, seq) AS (");
    // A padding row's NULL key joins nothing.
    query.push_values(padded(rows), |mut row, values| match values {
        Some(values) => {
            row.push_bind(values.device_id).push_bind(values.seq);
        }
        None => push_nulls(&mut row, 2),
    });
    query.push(
        ") SELECT t.device_id, t.seq FROM telemetry t
         JOIN k ON t.device_id = k.device_id AND t.seq = k.seq",
    );
}

/// Appends an insert of the telemetry `rows` that skips the ones already stored.
fn push_insert_telemetry<'q>(
    query: &mut QueryBuilder<'q, Sqlite>,
    rows: &'q [TelemetryValues<'_>],
) {
    query.push(
        "INSERT INTO telemetry (device_id, seq, device_time_ms, received_ms,
            interval_ms, model_name, model_version, inferences, input_errors, labeled,
            correct, confidence_sum, low_confidence, latency, latency_p50_us,
            latency_p95_us, cpu_percent, process_memory_bytes, memory_used_bytes,
            memory_total_bytes, temperature_celsius) SELECT * FROM (",
    );
    query.push_values(padded(rows), |mut row, values| match values {
        Some(values) => {
            row.push_bind(values.device_id)
                .push_bind(values.seq)
                .push_bind(values.device_time_ms)
                .push_bind(values.received_ms)
                .push_bind(values.interval_ms)
                .push_bind(values.model_name)
                .push_bind(values.model_version)
                .push_bind(values.inferences)
                .push_bind(values.input_errors)
                .push_bind(values.labeled)
                .push_bind(values.correct)
                .push_bind(values.confidence_sum)
                .push_bind(values.low_confidence)
                .push_bind(values.latency.as_str())
                .push_bind(values.latency_p50_us)
                .push_bind(values.latency_p95_us)
                .push_bind(values.cpu_percent)
                .push_bind(values.process_memory_bytes)
                .push_bind(values.memory_used_bytes)
                .push_bind(values.memory_total_bytes)
                .push_bind(values.temperature_celsius);
        }
        None => push_nulls(&mut row, TELEMETRY_COLUMNS),
    });
    // The WHERE clause drops the padding rows, which are all NULL. SQLite also needs it
    // to read the `ON` below as the upsert rather than as a join constraint.
    query.push(") WHERE column1 IS NOT NULL ON CONFLICT (device_id, seq) DO NOTHING");
}

/// Appends an update that adds each device's batch totals to its row and applies its latest model and status.
fn push_update_devices<'q>(
    query: &mut QueryBuilder<'q, Sqlite>,
    changes: &'q [(&str, DeviceChange<'_>)],
) {
    query.push(
        "WITH v (id, messages, min_seq, max_seq, inferences, input_errors, labeled, correct,
            duplicates, model_name, model_version, state, agent_version) AS (",
    );
    // A padding row's NULL id matches no device.
    query.push_values(padded(changes), |mut row, change| match change {
        Some((device_id, change)) => {
            row.push_bind(*device_id)
                .push_bind(change.messages)
                .push_bind(change.min_seq)
                .push_bind(change.max_seq)
                .push_bind(change.inferences)
                .push_bind(change.input_errors)
                .push_bind(change.labeled)
                .push_bind(change.correct)
                .push_bind(change.duplicates)
                .push_bind(change.model.map(|(name, _)| name))
                .push_bind(change.model.map(|(_, version)| version))
                .push_bind(change.status.map(|(state, _)| state))
                .push_bind(change.status.map(|(_, agent_version)| agent_version));
        }
        None => push_nulls(&mut row, DEVICE_CHANGE_COLUMNS),
    });
    // SQLite's min() and max() with several arguments return NULL when any argument is
    // NULL, hence the coalesce on both sides.
    query.push(
        ")
         UPDATE devices SET
            messages = devices.messages + v.messages,
            min_seq = min(coalesce(devices.min_seq, v.min_seq), coalesce(v.min_seq, devices.min_seq)),
            max_seq = max(coalesce(devices.max_seq, v.max_seq), coalesce(v.max_seq, devices.max_seq)),
            inferences = devices.inferences + v.inferences,
            input_errors = devices.input_errors + v.input_errors,
            labeled = devices.labeled + v.labeled,
            correct = devices.correct + v.correct,
            duplicates = devices.duplicates + v.duplicates,
            model_name = coalesce(v.model_name, devices.model_name),
            model_version = coalesce(v.model_version, devices.model_version),
            state = coalesce(v.state, devices.state),
            agent_version = CASE WHEN v.state IS NULL THEN devices.agent_version
                                 ELSE v.agent_version END
         FROM v WHERE devices.id = v.id",
    );
}

/// Appends an upsert that creates the device rows on first contact and widens their
/// first and last contact times.
fn push_touch_devices<'q>(query: &mut QueryBuilder<'q, Sqlite>, contacts: &'q [(&str, Contact)]) {
    // The WHERE clause drops the padding rows. SQLite also needs it to read the `ON` below
    // as the upsert rather than as a join constraint of the SELECT.
    query.push("INSERT INTO devices (id, first_seen_ms, last_seen_ms) SELECT * FROM (");
    query.push_values(padded(contacts), |mut row, contact| match contact {
        Some((device_id, contact)) => {
            row.push_bind(*device_id)
                .push_bind(contact.first_ms)
                .push_bind(contact.last_ms);
        }
        None => push_nulls(&mut row, DEVICE_CONTACT_COLUMNS),
    });
    query.push(") WHERE column1 IS NOT NULL");
    query.push(
        " ON CONFLICT (id) DO UPDATE SET
            first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),
            last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_rows_fit_parameter_limit() {
        for columns in [
            DEVICE_CONTACT_COLUMNS,
            TELEMETRY_COLUMNS,
            DEVICE_CHANGE_COLUMNS,
        ] {
            let rows = chunk_rows(columns);
            assert!(rows.is_power_of_two(), "{columns} columns: {rows} rows");
            assert!(
                rows * columns <= MAX_PARAMETERS,
                "{columns} columns: {rows} rows"
            );
            assert!(
                2 * rows * columns > MAX_PARAMETERS,
                "{columns} columns: {rows} rows"
            );
        }
    }

    #[test]
    fn padded_rows_end_with_nulls() {
        let rows = [1, 2, 3, 4, 5];
        let filled: Vec<Option<&i32>> = padded(&rows).collect();
        assert_eq!(filled.len(), 8);
        assert_eq!(
            filled[..5],
            [Some(&1), Some(&2), Some(&3), Some(&4), Some(&5)]
        );
        assert!(filled[5..].iter().all(Option::is_none));
        assert_eq!(padded(&rows[..4]).count(), 4);
        assert_eq!(padded(&rows[..1]).count(), 1);
    }
}
