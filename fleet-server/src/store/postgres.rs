//! The PostgreSQL backend, safe for several servers writing to one database.
//!
//! Transactions run at PostgreSQL's default READ COMMITTED level and rely on row and
//! table locks instead of serializable retries:
//!
//! - A batch first upserts the row of every device it mentions, in device id order. The
//!   upsert locks each row until the commit, so all writes for one device are serialized
//!   across transactions, and the fixed order keeps two overlapping batches from
//!   deadlocking.
//! - Totals change only through `SET messages = d.messages + v.messages` and similar, in
//!   an update or in the upsert's `DO UPDATE`, adding the batch's sums per device, so
//!   they are computed on the locked row, never read into Rust and written back.
//! - `INSERT ... ON CONFLICT (device_id, seq) DO NOTHING` waits for a concurrent
//!   transaction that inserted the same key and, once that commits, reports the conflict.
//!   A message stored by two servers at once is thus counted once as stored and once as
//!   a duplicate.
//! - Downsampling locks `telemetry_hourly` in SHARE ROW EXCLUSIVE mode, which conflicts
//!   with itself, so only one downsampling transaction runs at a time while readers
//!   continue. `DELETE ... RETURNING` hands each raw row to exactly one of them.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use futures_util::TryStreamExt;
use sqlx::Arguments;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::rollup::{RawRow, Rollup};
use super::rows::{
    Contact, DEVICE_ROWS_QUERY, DeviceChange, DeviceRow, HourlyRecord, TelemetryValues, WindowRow,
    batch_outcome, device_changes, device_contacts, inserted_keys, unique_telemetry,
};
use super::{
    BatchOutcome, DownsampleOutcome, Record, StoreBackend, StoreError, TelemetryRow,
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

super::access::access_backend!(PostgresBackend);
super::updates::updates_backend!(PostgresBackend);
super::samples::samples_backend!(PostgresBackend);
super::remote_config::remote_config_backend!(PostgresBackend);

#[async_trait]
impl StoreBackend for PostgresBackend {
    async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        let telemetry = unique_telemetry(batch);
        let contacts = device_contacts(batch);

        // Most batches hold no telemetry that is stored already. The device totals are
        // first computed as if every row were new and written in the same statement as
        // the telemetry. If the insert skipped some rows, those totals are wrong: the
        // transaction is rolled back and the batch written again, statement by
        // statement, with the totals computed from what the insert stored.
        let all_new = inserted_keys(&telemetry, &HashSet::new());
        let (changes, stored) = device_changes(batch, all_new);
        let mut tx = self.pool.begin().await?;
        let inserted = write_batch(&mut tx, &contacts, &changes, &telemetry).await?;
        if inserted == telemetry.len() as u64 {
            tx.commit().await?;
            return Ok(batch_outcome(batch, stored));
        }
        tx.rollback().await?;

        let mut tx = self.pool.begin().await?;
        touch_devices(&mut tx, &contacts).await?;
        let inserted = insert_telemetry(&mut tx, &telemetry).await?;
        let (changes, stored) = device_changes(batch, inserted.into_iter().collect());
        update_devices(&mut tx, &changes).await?;
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

/// The start of both telemetry inserts: every column from the arrays that
/// [`telemetry_arguments`] binds as $1 to $21. A macro, so that `concat!` can build each
/// statement's text at compile time.
macro_rules! insert_telemetry_sql {
    () => {
        "INSERT INTO telemetry (device_id, seq, device_time_ms, received_ms,
            interval_ms, model_name, model_version, inferences, input_errors, labeled,
            correct, confidence_sum, low_confidence, latency, latency_p50_us,
            latency_p95_us, cpu_percent, process_memory_bytes, memory_used_bytes,
            memory_total_bytes, temperature_celsius)
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
            $5::bigint[], $6::text[], $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
            $11::bigint[], $12::float8[], $13::bigint[], $14::text[], $15::float8[],
            $16::float8[], $17::float8[], $18::bigint[], $19::bigint[], $20::bigint[],
            $21::float8[])"
    };
}

/// Upserts the row of every device in `contacts` with its contact times and `changes`,
/// then inserts the telemetry `rows`, skipping those whose (device, seq) is already
/// stored, all in one statement. Returns the number of telemetry rows inserted.
///
/// The upsert locks the device rows in the order of `contacts`, as [`touch_devices`]
/// does, before any telemetry is inserted: the insert's condition reads the count of
/// upserted rows, which runs the upsert to its end first.
///
/// A device row that is inserted here takes the batch totals as they are; one that
/// exists adds them. A batch without a status for the device leaves its state and agent
/// version: the upsert carries the column default 'unknown' as the state, which no status
/// sets, and the update keeps the stored values when it finds it.
async fn write_batch(
    tx: &mut Transaction<'_, Postgres>,
    contacts: &BTreeMap<&str, Contact>,
    changes: &BTreeMap<&str, DeviceChange<'_>>,
    rows: &[TelemetryValues<'_>],
) -> Result<u64, sqlx::Error> {
    let no_change = DeviceChange::default();
    let devices: Vec<(&str, &Contact, &DeviceChange<'_>)> = contacts
        .iter()
        .map(|(id, contact)| (*id, contact, changes.get(id).unwrap_or(&no_change)))
        .collect();

    let mut arguments = telemetry_arguments(rows)?;
    add_column(&mut arguments, devices.iter().map(|(id, _, _)| *id))?;
    add_column(&mut arguments, devices.iter().map(|(_, c, _)| c.first_ms))?;
    add_column(&mut arguments, devices.iter().map(|(_, c, _)| c.last_ms))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.messages))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.min_seq))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.max_seq))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.inferences))?;
    add_column(
        &mut arguments,
        devices.iter().map(|(_, _, c)| c.input_errors),
    )?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.labeled))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.correct))?;
    add_column(&mut arguments, devices.iter().map(|(_, _, c)| c.duplicates))?;
    let model = devices.iter().map(|(_, _, c)| c.model);
    add_column(
        &mut arguments,
        model.clone().map(|m| m.map(|(name, _)| name)),
    )?;
    add_column(&mut arguments, model.map(|m| m.map(|(_, version)| version)))?;
    let status = devices.iter().map(|(_, _, c)| c.status);
    add_column(
        &mut arguments,
        status.clone().map(|s| s.map(|(state, _)| state)),
    )?;
    add_column(&mut arguments, status.map(|s| s.map(|(_, agent)| agent)))?;

    let done = sqlx::query_with(
        concat!(
            "WITH touched AS (
            INSERT INTO devices AS d (id, first_seen_ms, last_seen_ms, messages, min_seq,
                max_seq, inferences, input_errors, labeled, correct, duplicates, model_name,
                model_version, state, agent_version)
            SELECT id, first_ms, last_ms, messages, min_seq, max_seq, inferences,
                input_errors, labeled, correct, duplicates, model_name, model_version,
                coalesce(state, 'unknown'), agent_version
            FROM UNNEST($22::text[], $23::bigint[], $24::bigint[], $25::bigint[],
                $26::bigint[], $27::bigint[], $28::bigint[], $29::bigint[], $30::bigint[],
                $31::bigint[], $32::bigint[], $33::text[], $34::text[], $35::text[],
                $36::text[]) WITH ORDINALITY
                AS v (id, first_ms, last_ms, messages, min_seq, max_seq, inferences,
                      input_errors, labeled, correct, duplicates, model_name, model_version,
                      state, agent_version, position)
            ORDER BY position
            ON CONFLICT (id) DO UPDATE SET
                first_seen_ms = LEAST(d.first_seen_ms, excluded.first_seen_ms),
                last_seen_ms = GREATEST(d.last_seen_ms, excluded.last_seen_ms),
                messages = d.messages + excluded.messages,
                min_seq = LEAST(d.min_seq, excluded.min_seq),
                max_seq = GREATEST(d.max_seq, excluded.max_seq),
                inferences = d.inferences + excluded.inferences,
                input_errors = d.input_errors + excluded.input_errors,
                labeled = d.labeled + excluded.labeled,
                correct = d.correct + excluded.correct,
                duplicates = d.duplicates + excluded.duplicates,
                model_name = coalesce(excluded.model_name, d.model_name),
                model_version = coalesce(excluded.model_version, d.model_version),
                state = CASE WHEN excluded.state = 'unknown' THEN d.state
                             ELSE excluded.state END,
                agent_version = CASE WHEN excluded.state = 'unknown' THEN d.agent_version
                                     ELSE excluded.agent_version END
            RETURNING 1
         ) ",
            insert_telemetry_sql!(),
            " WHERE (SELECT count(*) FROM touched) > 0
         ON CONFLICT (device_id, seq) DO NOTHING"
        ),
        arguments,
    )
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected())
}

/// Inserts telemetry rows, skipping those whose (device, seq) is already stored, and
/// returns the (device, seq) pairs it inserted.
async fn insert_telemetry(
    tx: &mut Transaction<'_, Postgres>,
    rows: &[TelemetryValues<'_>],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as_with(
        concat!(
            insert_telemetry_sql!(),
            " ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq"
        ),
        telemetry_arguments(rows)?,
    )
    .fetch_all(&mut **tx)
    .await
}

/// Encodes telemetry `rows` as parameters $1 to $21, one array per column.
///
/// As arrays, the statement text and its prepared form are the same for every batch
/// size, and no batch reaches PostgreSQL's limit of 65,535 parameters.
fn telemetry_arguments(rows: &[TelemetryValues<'_>]) -> Result<PgArguments, sqlx::Error> {
    let mut arguments = PgArguments::default();
    let a = &mut arguments;
    add_column(a, rows.iter().map(|v| v.device_id))?;
    add_column(a, rows.iter().map(|v| v.seq))?;
    add_column(a, rows.iter().map(|v| v.device_time_ms))?;
    add_column(a, rows.iter().map(|v| v.received_ms))?;
    add_column(a, rows.iter().map(|v| v.interval_ms))?;
    add_column(a, rows.iter().map(|v| v.model_name))?;
    add_column(a, rows.iter().map(|v| v.model_version))?;
    add_column(a, rows.iter().map(|v| v.inferences))?;
    add_column(a, rows.iter().map(|v| v.input_errors))?;
    add_column(a, rows.iter().map(|v| v.labeled))?;
    add_column(a, rows.iter().map(|v| v.correct))?;
    add_column(a, rows.iter().map(|v| v.confidence_sum))?;
    add_column(a, rows.iter().map(|v| v.low_confidence))?;
    add_column(a, rows.iter().map(|v| v.latency.as_str()))?;
    add_column(a, rows.iter().map(|v| v.latency_p50_us))?;
    add_column(a, rows.iter().map(|v| v.latency_p95_us))?;
    add_column(a, rows.iter().map(|v| v.cpu_percent))?;
    add_column(a, rows.iter().map(|v| v.process_memory_bytes))?;
    add_column(a, rows.iter().map(|v| v.memory_used_bytes))?;
    add_column(a, rows.iter().map(|v| v.memory_total_bytes))?;
    add_column(a, rows.iter().map(|v| v.temperature_celsius))?;
    Ok(arguments)
}

/// Appends `values` to `arguments` as one array parameter.
fn add_column<'q, T>(
    arguments: &mut PgArguments,
    values: impl Iterator<Item = T>,
) -> Result<(), sqlx::Error>
where
    Vec<T>: sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + 'q,
{
    arguments
        .add(values.collect::<Vec<T>>())
        .map_err(sqlx::Error::Encode)
}

/// Adds each device's batch totals to its row and applies its latest model and status.
/// The rows are already locked by [`touch_devices`].
async fn update_devices(
    tx: &mut Transaction<'_, Postgres>,
    changes: &BTreeMap<&str, DeviceChange<'_>>,
) -> Result<(), sqlx::Error> {
    let column = |get: fn(&DeviceChange<'_>) -> i64| changes.values().map(get).collect::<Vec<_>>();
    // LEAST and GREATEST skip NULL, so the first stored message sets min_seq and max_seq.
    sqlx::query(
        "UPDATE devices AS d SET
            messages = d.messages + v.messages,
            min_seq = LEAST(d.min_seq, v.min_seq), max_seq = GREATEST(d.max_seq, v.max_seq),
            inferences = d.inferences + v.inferences,
            input_errors = d.input_errors + v.input_errors,
            labeled = d.labeled + v.labeled, correct = d.correct + v.correct,
            duplicates = d.duplicates + v.duplicates,
            model_name = coalesce(v.model_name, d.model_name),
            model_version = coalesce(v.model_version, d.model_version),
            state = coalesce(v.state, d.state),
            agent_version = CASE WHEN v.state IS NULL THEN d.agent_version
                                 ELSE v.agent_version END
         FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
            $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[],
            $12::text[], $13::text[])
            AS v (id, messages, min_seq, max_seq, inferences, input_errors, labeled, correct,
                  duplicates, model_name, model_version, state, agent_version)
         WHERE d.id = v.id",
    )
    .bind(changes.keys().copied().collect::<Vec<_>>())
    .bind(column(|c| c.messages))
    .bind(changes.values().map(|c| c.min_seq).collect::<Vec<_>>())
    .bind(changes.values().map(|c| c.max_seq).collect::<Vec<_>>())
    .bind(column(|c| c.inferences))
    .bind(column(|c| c.input_errors))
    .bind(column(|c| c.labeled))
    .bind(column(|c| c.correct))
    .bind(column(|c| c.duplicates))
    .bind(
        changes
            .values()
            .map(|c| c.model.map(|(name, _)| name))
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .values()
            .map(|c| c.model.map(|(_, version)| version))
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .values()
            .map(|c| c.status.map(|(state, _)| state))
            .collect::<Vec<_>>(),
    )
    .bind(
        changes
            .values()
            .map(|c| c.status.map(|(_, agent_version)| agent_version))
            .collect::<Vec<_>>(),
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Creates the device rows on first contact and widens their first and last contact
/// times. Either way each row stays locked until the transaction ends.
///
/// `WITH ORDINALITY ... ORDER BY` makes PostgreSQL upsert, and so lock, the rows in the
/// order of `contacts`, which is by id in Rust's byte order whatever the database
/// collation.
async fn touch_devices(
    tx: &mut Transaction<'_, Postgres>,
    contacts: &BTreeMap<&str, Contact>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (id, first_seen_ms, last_seen_ms)
         SELECT id, first_ms, last_ms
         FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) WITH ORDINALITY
            AS v (id, first_ms, last_ms, position)
         ORDER BY position
         ON CONFLICT (id) DO UPDATE SET
            first_seen_ms = LEAST(devices.first_seen_ms, excluded.first_seen_ms),
            last_seen_ms = GREATEST(devices.last_seen_ms, excluded.last_seen_ms)",
    )
    .bind(contacts.keys().copied().collect::<Vec<_>>())
    .bind(contacts.values().map(|c| c.first_ms).collect::<Vec<_>>())
    .bind(contacts.values().map(|c| c.last_ms).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
}
