//! Fleet state in SQLite or PostgreSQL through sqlx: devices, their telemetry, hourly
//! rollups of old telemetry, over-the-air updates, hard samples, remote configuration,
//! and the queries the API and console read.
//!
//! [`Store`] is the handle the rest of the server uses. Each database is a
//! [`StoreBackend`] that owns its pool and its SQL. What does not depend on the database
//! (live-window merging, gap and accuracy arithmetic, hourly bucketing) is computed in
//! this module and its `rows` and `rollup` submodules, once for both backends.

pub mod access;
mod postgres;
pub mod remote_config;
mod rollup;
mod rows;
pub mod samples;
mod sqlite;
pub mod updates;

use crate::metrics::CLOCK_SKEW_LIMIT_MS;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fleet_wire::{LatencyHistogram, Status, Telemetry};
use serde::Serialize;

use self::access::{AccessBackend, Credential};
use self::remote_config::{
    AckOutcome, ConfigBackend, ConfigEventRecord, ConfigRecord, ConfigRow, ReceivedConfigAck,
};
use self::rows::{DeviceRow, HourlyRecord, WindowRow};
use self::samples::{SampleBackend, SampleFilter, SampleRecord};
use self::updates::{
    BundleRecord, EventOutcome, ReceivedEvent, Superseded, UpdateBackend, UpdateEventRecord,
    UpdateRecord,
};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Opening or connecting failed. `database` is the SQLite path, or the PostgreSQL URL
    /// without its password.
    #[error("failed to open database {database}")]
    Open {
        database: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "unsupported database URL scheme {scheme:?}; expected postgres://, postgresql://, \
         sqlite://PATH or a file path"
    )]
    UnsupportedScheme { scheme: String },
    #[error("database {database:?} names no SQLite file; expected sqlite://PATH or a file path")]
    MissingPath { database: String },
    #[error("invalid stored latency histogram for device {device_id} seq {seq}")]
    Histogram {
        device_id: String,
        seq: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "invalid stored latency histogram for device {device_id} hour starting at {hour_start_ms} ms"
    )]
    HourlyHistogram {
        device_id: String,
        hour_start_ms: i64,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid stored credential role {role:?}; expected \"device\" or \"ingester\"")]
    InvalidRole { role: String },
    #[error("invalid stored configuration of device {device_id}: {reason}")]
    InvalidConfig { device_id: String, reason: String },
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

/// Counts from one [`Store::downsample`] run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DownsampleOutcome {
    /// Raw telemetry rows added to hourly rows and deleted.
    pub raw_rows: u64,
    /// Hourly rows created or added to.
    pub hourly_rows: u64,
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
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
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
    /// Whether the device clock differed from the server clock by more than
    /// [`CLOCK_SKEW_LIMIT_MS`] when the message arrived.
    #[sqlx(skip)]
    pub clock_skewed: bool,
}

/// One hour of a device's telemetry after [`Store::downsample`] rolled it up.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HourlyRow {
    /// Start of the hour by the server clock (`received_ms`), in milliseconds since the
    /// Unix epoch.
    pub hour_start_ms: i64,
    pub messages: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    /// Latencies of every message in the hour, merged.
    pub latency: LatencyHistogram,
}

/// Database operations behind [`Store`], one implementation per database.
///
/// `Store` wraps an `Arc<dyn StoreBackend>`, made object-safe with `async-trait`, rather
/// than an enum of the backends. Each backend then keeps its pool type and SQL in its
/// own module, `Store` never matches on the database, and another backend needs only a
/// new module and an `open_*` constructor. The price is one boxed future per call, which
/// is small next to the database round trip that the call waits for.
///
/// Backends return rows as stored. `Store` decodes histograms and derives the figures
/// the API shows, so both databases give the same results.
#[async_trait]
trait StoreBackend: Send + Sync + fmt::Debug {
    /// Applies a batch in one transaction and in order, as [`Store::apply_batch`]
    /// describes.
    async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError>;

    /// Lists every device row with the system readings of its highest-seq telemetry row,
    /// ordered by id.
    async fn device_rows(&self) -> Result<Vec<DeviceRow>, StoreError>;

    /// Lists the raw telemetry received at or after `since_ms`.
    async fn window_rows(&self, since_ms: i64) -> Result<Vec<WindowRow>, StoreError>;

    /// Returns a device's latest `limit` raw telemetry rows, newest first, or `None`
    /// when the device is unknown.
    async fn telemetry(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<TelemetryRow>>, StoreError>;

    /// Returns a device's latest `limit` hourly rows, newest first, or `None` when the
    /// device is unknown.
    async fn hourly(
        &self,
        device_id: &str,
        limit: i64,
    ) -> Result<Option<Vec<HourlyRecord>>, StoreError>;

    /// Rolls raw telemetry received before `older_than_ms` into hourly rows and deletes
    /// it, as [`Store::downsample`] describes.
    async fn downsample(&self, older_than_ms: i64) -> Result<DownsampleOutcome, StoreError>;
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
    access: Arc<dyn AccessBackend>,
    updates: Arc<dyn UpdateBackend>,
    samples: Arc<dyn SampleBackend>,
    config: Arc<dyn ConfigBackend>,
}

impl Store {
    /// Opens the database that `database` names and applies migrations: PostgreSQL for a
    /// `postgres://` or `postgresql://` URL, and SQLite for `sqlite://PATH` or a plain
    /// file path.
    ///
    /// `PATH` is used as written, so `sqlite://data/fleet.db` is relative to the working
    /// directory and `sqlite:///var/lib/fleet.db` is absolute. Any other `SCHEME://`
    /// prefix is rejected with [`StoreError::UnsupportedScheme`].
    pub async fn open(database: &str) -> Result<Store, StoreError> {
        match Location::parse(database)? {
            Location::Postgres(url) => Store::open_postgres(url).await,
            Location::Sqlite(path) => Store::open_sqlite(path).await,
        }
    }

    /// Opens (creating if needed) the SQLite file at `path` and applies migrations.
    ///
    /// WAL mode lets the API read while ingestion writes; `synchronous = FULL` makes a
    /// committed batch survive power loss, which the MQTT acknowledgement relies on.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let backend = Arc::new(sqlite::SqliteBackend::open(path).await?);
        Ok(Store {
            backend: backend.clone(),
            access: backend.clone(),
            updates: backend.clone(),
            samples: backend.clone(),
            config: backend,
        })
    }

    /// Connects to PostgreSQL at `url` and applies migrations.
    ///
    /// Tables are created in the first schema of the connection's `search_path`, which
    /// the URL can set, for example with `?options[search_path]=fleet`. Several servers
    /// may share one database: batches, totals and downsampling stay exact under
    /// concurrent writers.
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let backend = Arc::new(postgres::PostgresBackend::open(url).await?);
        Ok(Store {
            backend: backend.clone(),
            access: backend.clone(),
            updates: backend.clone(),
            samples: backend.clone(),
            config: backend,
        })
    }

    /// Applies a batch of records in one transaction and in order, ignoring (and
    /// counting) telemetry whose (device, seq) pair is already stored.
    pub async fn apply_batch(&self, batch: &[Record]) -> Result<BatchOutcome, StoreError> {
        self.backend.apply_batch(batch).await
    }

    /// Lists every device with totals and the latency and throughput of telemetry
    /// received in the last `window`.
    ///
    /// The CPU, memory and temperature readings come from the device's highest-seq raw
    /// telemetry row, so they are `None` once [`Store::downsample`] has removed it.
    pub async fn devices(
        &self,
        now_ms: u64,
        window: Duration,
    ) -> Result<Vec<DeviceSummary>, StoreError> {
        let since = now_ms.saturating_sub(window.as_millis() as u64) as i64;
        let windows = merge_windows(self.backend.window_rows(since).await?)?;
        let rows = self.backend.device_rows().await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let window = windows.get(&row.id);
                row.into_summary(window)
            })
            .collect())
    }

    /// Returns a device's most recent telemetry rows, newest first, or `None` when the
    /// device is unknown.
    pub async fn telemetry(
        &self,
        device_id: &str,
        limit: u32,
    ) -> Result<Option<Vec<TelemetryRow>>, StoreError> {
        let mut rows = self.backend.telemetry(device_id, i64::from(limit)).await?;
        for row in rows.iter_mut().flatten() {
            row.clock_skewed = (row.received_ms - row.device_time_ms).abs() > CLOCK_SKEW_LIMIT_MS;
        }
        Ok(rows)
    }

    /// Returns a device's most recent hourly rows, newest first, or `None` when the device
    /// is unknown.
    pub async fn hourly_telemetry(
        &self,
        device_id: &str,
        limit: u32,
    ) -> Result<Option<Vec<HourlyRow>>, StoreError> {
        let Some(records) = self.backend.hourly(device_id, i64::from(limit)).await? else {
            return Ok(None);
        };
        let rows = records
            .into_iter()
            .map(|record| record.into_row(device_id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(rows))
    }

    /// Adds every raw telemetry row received before `older_than_ms` (milliseconds since
    /// the Unix epoch, server clock) to its device's hourly row in `telemetry_hourly`
    /// and deletes it, in one transaction.
    ///
    /// Each raw row is counted in exactly one hourly row, also when the job runs twice or
    /// on several servers at once: a second run finds nothing left to roll up. A cutoff in
    /// the middle of an hour is fine, because a later run adds the rest of that hour to
    /// the same hourly row. The totals in `devices` do not change.
    ///
    /// NOTE: deduplication checks raw rows only, so a message that is delivered again
    /// after its raw row was rolled up is stored and counted a second time.
    pub async fn downsample(&self, older_than_ms: u64) -> Result<DownsampleOutcome, StoreError> {
        let cutoff = i64::try_from(older_than_ms).unwrap_or(i64::MAX);
        self.backend.downsample(cutoff).await
    }
}

/// Identities: broker credentials, operators, API tokens and sessions. Arguments named
/// `sha256` are hex SHA-256 digests of secrets, never the secrets.
impl Store {
    /// Inserts a broker credential, or replaces the one of the same name when `replace`;
    /// returns false when one exists and `replace` is false.
    pub async fn put_credential(
        &self,
        credential: &Credential,
        replace: bool,
    ) -> Result<bool, StoreError> {
        self.access.put_credential(credential, replace).await
    }

    pub async fn credential(&self, name: &str) -> Result<Option<Credential>, StoreError> {
        self.access.credential(name).await
    }

    /// Returns the credential whose secret hashes to `sha256`.
    pub async fn credential_by_secret(
        &self,
        sha256: &str,
    ) -> Result<Option<Credential>, StoreError> {
        self.access.credential_by_secret(sha256).await
    }

    /// Lists every broker credential, ordered by name.
    pub async fn credentials(&self) -> Result<Vec<Credential>, StoreError> {
        self.access.credentials().await
    }

    /// Deletes a broker credential; returns false when there was none.
    pub async fn delete_credential(&self, name: &str) -> Result<bool, StoreError> {
        self.access.delete_credential(name).await
    }

    /// Creates an operator or replaces their password hash.
    pub async fn put_operator(&self, name: &str, password_hash: &str) -> Result<(), StoreError> {
        let now = crate::unix_millis() as i64;
        self.access.put_operator(name, password_hash, now).await
    }

    pub async fn operator_password_hash(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.access.operator_password_hash(name).await
    }

    /// Stores an API token's hash; returns false when a token of that name exists.
    pub async fn put_api_token(&self, name: &str, sha256: &str) -> Result<bool, StoreError> {
        let now = crate::unix_millis() as i64;
        self.access.put_api_token(name, sha256, now).await
    }

    /// Returns the name of the API token whose hash is `sha256`.
    pub async fn api_token_name(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        self.access.api_token_name(sha256).await
    }

    /// Deletes an API token; returns false when there was none.
    pub async fn delete_api_token(&self, name: &str) -> Result<bool, StoreError> {
        self.access.delete_api_token(name).await
    }

    /// Stores a console session until `expires_ms` and deletes expired ones.
    pub async fn put_session(
        &self,
        sha256: &str,
        operator: &str,
        expires_ms: u64,
    ) -> Result<(), StoreError> {
        let now = crate::unix_millis() as i64;
        self.access
            .put_session(sha256, operator, expires_ms as i64, now)
            .await
    }

    /// Returns the operator of an unexpired session.
    pub async fn session_operator(&self, sha256: &str) -> Result<Option<String>, StoreError> {
        let now = crate::unix_millis() as i64;
        self.access.session_operator(sha256, now).await
    }

    pub async fn delete_session(&self, sha256: &str) -> Result<(), StoreError> {
        self.access.delete_session(sha256).await
    }
}

/// Over-the-air updates: stored bundle archives, updates and their progress events.
/// Arguments named `sha256` are lowercase hex digests of bundle archives.
impl Store {
    /// Records a stored bundle archive; returns false, changing nothing, when one with
    /// the same SHA-256 is already recorded.
    pub async fn put_bundle(&self, bundle: &BundleRecord) -> Result<bool, StoreError> {
        self.updates.put_bundle(bundle).await
    }

    pub async fn bundle(&self, sha256: &str) -> Result<Option<BundleRecord>, StoreError> {
        self.updates.bundle(sha256).await
    }

    /// Lists every bundle, newest upload first.
    pub async fn bundles(&self) -> Result<Vec<BundleRecord>, StoreError> {
        self.updates.bundles().await
    }

    /// Creates one pending update of `bundle` per `(update id, device id)` pair, in one
    /// transaction, and returns the new updates. Each device's unfinished updates are
    /// marked superseded first and returned as well.
    pub async fn create_updates(
        &self,
        bundle: &BundleRecord,
        updates: &[(String, String)],
        created_by: &str,
    ) -> Result<(Vec<UpdateRecord>, Vec<Superseded>), StoreError> {
        let now = crate::unix_millis() as i64;
        let superseded = self
            .updates
            .create_updates(&bundle.sha256, updates, created_by, now)
            .await?;
        let created = updates
            .iter()
            .map(|(id, device_id)| UpdateRecord {
                update_id: id.clone(),
                device_id: device_id.clone(),
                sha256: bundle.sha256.clone(),
                name: bundle.name.clone(),
                version: bundle.version.clone(),
                size: bundle.size,
                stage: updates::STAGE_PENDING.to_owned(),
                detail: String::new(),
                created_ms: now,
                updated_ms: now,
                created_by: created_by.to_owned(),
            })
            .collect();
        Ok((created, superseded))
    }

    pub async fn update(&self, id: &str) -> Result<Option<UpdateRecord>, StoreError> {
        self.updates.update(id).await
    }

    /// Lists the latest `limit` updates, newest first, of one device or of all.
    pub async fn updates(
        &self,
        device_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UpdateRecord>, StoreError> {
        self.updates.updates(device_id, i64::from(limit)).await
    }

    /// Lists a device's updates that are neither final nor superseded, oldest first.
    pub async fn unfinished_updates(
        &self,
        device_id: &str,
    ) -> Result<Vec<UpdateRecord>, StoreError> {
        self.updates.unfinished_updates(device_id).await
    }

    /// Lists the events reported for an update, in the order they arrived.
    pub async fn update_events(
        &self,
        update_id: &str,
    ) -> Result<Vec<UpdateEventRecord>, StoreError> {
        self.updates.update_events(update_id).await
    }

    /// Appends an event to the event history and, when it names an update of the same
    /// device, moves that update to the event's stage. Updates only move forward: an
    /// event for a stage at or behind the current one, or for a finished update,
    /// changes nothing but the history.
    pub async fn record_update_event(
        &self,
        event: &ReceivedEvent,
    ) -> Result<EventOutcome, StoreError> {
        let rank = updates::stage_rank(event.event.stage);
        self.updates.record_update_event(event, rank).await
    }

    /// Lists the ids of devices that have connected or hold a device credential,
    /// ordered by id.
    pub async fn known_devices(&self) -> Result<Vec<String>, StoreError> {
        self.updates.known_devices().await
    }
}

/// Hard samples: inputs devices classified with low confidence. Arguments named `sha256`
/// are lowercase hex digests of sample contents.
impl Store {
    /// Records a stored sample; returns false, changing nothing, when one with the same
    /// SHA-256 is already recorded.
    pub async fn put_sample(&self, sample: &SampleRecord) -> Result<bool, StoreError> {
        self.samples.put_sample(sample).await
    }

    pub async fn sample(&self, sha256: &str) -> Result<Option<SampleRecord>, StoreError> {
        self.samples.sample(sha256).await
    }

    /// Lists the latest `limit` samples that match `filter`, newest upload first.
    pub async fn samples(
        &self,
        filter: &SampleFilter,
        limit: u32,
    ) -> Result<Vec<SampleRecord>, StoreError> {
        self.samples.samples(filter, i64::from(limit)).await
    }
}

/// Remote configuration: the settings the server overrides on each device and the
/// acknowledgements devices send.
impl Store {
    /// Stores `record` as the device's configuration, replacing any earlier change.
    pub async fn put_config(&self, record: &ConfigRecord) -> Result<(), StoreError> {
        self.config
            .put_config(&ConfigRow::from_record(record)?)
            .await
    }

    pub async fn config(&self, device_id: &str) -> Result<Option<ConfigRecord>, StoreError> {
        match self.config.config(device_id).await? {
            Some(row) => Ok(Some(row.into_record()?)),
            None => Ok(None),
        }
    }

    /// Appends an acknowledgement to the history and, when it names the device's
    /// current change, sets that change's status and detail. An acknowledgement of an
    /// older change is only recorded, so it cannot undo a newer one.
    pub async fn record_config_ack(
        &self,
        ack: &ReceivedConfigAck,
    ) -> Result<AckOutcome, StoreError> {
        self.config.record_config_ack(ack).await
    }

    /// Lists a device's latest `limit` acknowledgements, newest first.
    pub async fn config_events(
        &self,
        device_id: &str,
        limit: u32,
    ) -> Result<Vec<ConfigEventRecord>, StoreError> {
        self.config.config_events(device_id, i64::from(limit)).await
    }

    /// Returns whether the device has connected or has a device credential.
    pub async fn is_known_device(&self, device_id: &str) -> Result<bool, StoreError> {
        self.config.is_known_device(device_id).await
    }
}

/// Latency and throughput figures of one device over the live window.
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

/// Merges the latency histograms and counts of each device's recent telemetry.
fn merge_windows(rows: Vec<WindowRow>) -> Result<HashMap<String, WindowStats>, StoreError> {
    let mut windows: HashMap<String, WindowStats> = HashMap::new();
    for row in rows {
        let latency: LatencyHistogram =
            serde_json::from_str(&row.latency).map_err(|source| StoreError::Histogram {
                device_id: row.device_id.clone(),
                seq: row.seq,
                source,
            })?;
        let entry = windows.entry(row.device_id).or_default();
        entry.inferences += row.inferences;
        entry.interval_ms += row.interval_ms;
        entry.latency.merge(&latency);
    }
    Ok(windows)
}

/// The database that a [`Store::open`] argument names.
#[derive(Debug, PartialEq)]
enum Location<'a> {
    Postgres(&'a str),
    Sqlite(&'a Path),
}

impl<'a> Location<'a> {
    fn parse(database: &'a str) -> Result<Location<'a>, StoreError> {
        let missing_path = || StoreError::MissingPath {
            database: database.to_owned(),
        };
        let Some((scheme, rest)) = database
            .split_once("://")
            .filter(|(scheme, _)| is_url_scheme(scheme))
        else {
            if database.is_empty() {
                return Err(missing_path());
            }
            return Ok(Location::Sqlite(Path::new(database)));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" => Ok(Location::Postgres(database)),
            "sqlite" if rest.is_empty() => Err(missing_path()),
            "sqlite" => Ok(Location::Sqlite(Path::new(rest))),
            _ => Err(StoreError::UnsupportedScheme {
                scheme: scheme.to_owned(),
            }),
        }
    }
}

/// Returns the SQLite file that a [`Store::open`] argument names, or `None` when it names
/// PostgreSQL or is invalid.
pub fn sqlite_path(database: &str) -> Option<&Path> {
    match Location::parse(database) {
        Ok(Location::Sqlite(path)) => Some(path),
        _ => None,
    }
}

/// Returns true when `text` is a URL scheme as RFC 3986 defines it: a letter, then
/// letters, digits, `+`, `-` or `.`.
fn is_url_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Returns `url` with the password in its user information and in a `password` query
/// parameter replaced by `***`, for error messages and logs.
pub(crate) fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((user_info, host)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{path}?{}", parameters.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_picks_backend_by_scheme() {
        let cases = [
            ("postgres://h/db", Location::Postgres("postgres://h/db")),
            ("PostgreSQL://h/db", Location::Postgres("PostgreSQL://h/db")),
            ("sqlite://fleet.db", Location::Sqlite(Path::new("fleet.db"))),
            (
                "sqlite:///var/fleet.db",
                Location::Sqlite(Path::new("/var/fleet.db")),
            ),
            ("fleet.db", Location::Sqlite(Path::new("fleet.db"))),
            ("/tmp/a b.db", Location::Sqlite(Path::new("/tmp/a b.db"))),
            (
                "./odd://name.db",
                Location::Sqlite(Path::new("./odd://name.db")),
            ),
        ];
        for (database, expected) in cases {
            assert_eq!(Location::parse(database).unwrap(), expected, "{database}");
        }
    }

    #[test]
    fn location_rejects_unknown_scheme_and_empty_path() {
        let error = Location::parse("mysql://u:secret@h/db").unwrap_err();
        assert!(
            matches!(&error, StoreError::UnsupportedScheme { scheme } if scheme == "mysql"),
            "{error:?}"
        );
        assert!(!error.to_string().contains("secret"), "{error}");
        for database in ["", "sqlite://"] {
            let error = Location::parse(database).unwrap_err();
            assert!(
                matches!(error, StoreError::MissingPath { .. }),
                "{database}: {error:?}"
            );
        }
    }

    #[test]
    fn redact_password_hides_only_the_password() {
        let cases = [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "postgres://h/db?password=pw&x=1",
                "postgres://h/db?password=***&x=1",
            ),
            (
                "postgres://u:p@ss@h/db?sslmode=disable",
                "postgres://u:***@h/db?sslmode=disable",
            ),
            ("no scheme", "no scheme"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_password(url), expected, "{url}");
        }
    }
}
