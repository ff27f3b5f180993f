//! Rows as both backends read and write them, and their conversion to and from the
//! store's public types.

use std::collections::{BTreeMap, HashSet};

use fleet_wire::{DeviceState, LatencyHistogram};

use super::{BatchOutcome, DeviceSummary, HourlyRow, Received, Record, StoreError, WindowStats};

/// A `devices` row with the system readings of its highest-seq telemetry row.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct DeviceRow {
    pub id: String,
    pub state: String,
    pub model_name: Option<String>,
    pub model_version: Option<String>,
    pub agent_version: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub messages: i64,
    pub min_seq: Option<i64>,
    pub max_seq: Option<i64>,
    pub duplicates: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub last_cpu: Option<f64>,
    pub last_memory: Option<i64>,
    pub last_temperature: Option<f64>,
}

impl DeviceRow {
    pub fn into_summary(self, window: Option<&WindowStats>) -> DeviceSummary {
        let latency_ms = |quantile| {
            window
                .and_then(|w| w.latency.quantile_micros(quantile))
                .map(|us| us / 1e3)
        };
        DeviceSummary {
            gaps: match (self.min_seq, self.max_seq) {
                (Some(low), Some(high)) => high - low + 1 - self.messages,
                _ => 0,
            },
            accuracy: (self.labeled > 0).then(|| self.correct as f64 / self.labeled as f64),
            throughput: window.map_or(0.0, WindowStats::throughput),
            latency_p50_ms: latency_ms(0.5),
            latency_p95_ms: latency_ms(0.95),
            id: self.id,
            state: self.state,
            model_name: self.model_name,
            model_version: self.model_version,
            agent_version: self.agent_version,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            messages: self.messages,
            duplicates: self.duplicates,
            inferences: self.inferences,
            input_errors: self.input_errors,
            labeled: self.labeled,
            correct: self.correct,
            cpu_percent: self.last_cpu,
            process_memory_bytes: self.last_memory,
            temperature_celsius: self.last_temperature,
        }
    }
}

/// The columns of a raw telemetry row that the live window needs.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct WindowRow {
    pub device_id: String,
    pub seq: i64,
    pub inferences: i64,
    pub interval_ms: i64,
    /// The latency histogram as JSON.
    pub latency: String,
}

/// A `telemetry_hourly` row with its histogram still as JSON.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct HourlyRecord {
    pub hour_start_ms: i64,
    pub messages: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub latency: String,
}

impl HourlyRecord {
    pub fn into_row(self, device_id: &str) -> Result<HourlyRow, StoreError> {
        let latency = parse_hourly_histogram(&self.latency, device_id, self.hour_start_ms)?;
        Ok(HourlyRow {
            hour_start_ms: self.hour_start_ms,
            messages: self.messages,
            inferences: self.inferences,
            input_errors: self.input_errors,
            labeled: self.labeled,
            correct: self.correct,
            latency,
        })
    }
}

/// Column values of a new telemetry row, converted to the types both databases bind.
///
/// Non-finite readings are stored as NULL (the non-null confidence sum as 0), so both
/// databases and the JSON API treat them as missing.
#[derive(Debug)]
pub(super) struct TelemetryValues<'a> {
    pub device_id: &'a str,
    pub seq: i64,
    pub device_time_ms: i64,
    pub received_ms: i64,
    pub interval_ms: i64,
    pub model_name: &'a str,
    pub model_version: &'a str,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub confidence_sum: f64,
    pub low_confidence: i64,
    /// The latency histogram as JSON.
    pub latency: String,
    pub latency_p50_us: Option<f64>,
    pub latency_p95_us: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub process_memory_bytes: i64,
    pub memory_used_bytes: i64,
    pub memory_total_bytes: i64,
    pub temperature_celsius: Option<f64>,
}

impl<'a> TelemetryValues<'a> {
    pub fn new(message: &'a Received) -> TelemetryValues<'a> {
        let t = &message.telemetry;
        TelemetryValues {
            device_id: &t.device_id,
            seq: t.seq as i64,
            device_time_ms: t.device_time_ms as i64,
            received_ms: message.received_ms as i64,
            interval_ms: i64::from(t.interval_ms),
            model_name: &t.model.name,
            model_version: &t.model.version,
            inferences: i64::from(t.inferences),
            input_errors: i64::from(t.input_errors),
            labeled: i64::from(t.labeled),
            correct: i64::from(t.correct),
            confidence_sum: finite(f64::from(t.confidence_sum)).unwrap_or(0.0),
            low_confidence: i64::from(t.low_confidence),
            latency: serde_json::to_string(&t.latency).expect("histograms serialize"),
            latency_p50_us: t.latency.quantile_micros(0.5),
            latency_p95_us: t.latency.quantile_micros(0.95),
            cpu_percent: finite(f64::from(t.system.cpu_percent)),
            process_memory_bytes: t.system.process_memory_bytes as i64,
            memory_used_bytes: t.system.memory_used_bytes as i64,
            memory_total_bytes: t.system.memory_total_bytes as i64,
            temperature_celsius: t
                .system
                .temperature_celsius
                .and_then(|c| finite(f64::from(c))),
        }
    }
}

/// Earliest and latest receive time of one device's records in a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Contact {
    pub first_ms: i64,
    pub last_ms: i64,
}

/// Returns the devices that a batch mentions with their contact times, ordered by id.
///
/// Backends create or update these device rows before anything else in the batch, in
/// this order. On PostgreSQL that takes each device's row lock in the same order in
/// every transaction, so two servers writing overlapping batches wait for each other
/// instead of deadlocking.
pub(super) fn device_contacts(batch: &[Record]) -> BTreeMap<&str, Contact> {
    let mut contacts: BTreeMap<&str, Contact> = BTreeMap::new();
    for record in batch {
        let (device_id, received_ms) = match record {
            Record::Telemetry(message) => (&message.telemetry.device_id, message.received_ms),
            Record::Status {
                status,
                received_ms,
            } => (&status.device_id, *received_ms),
        };
        let received_ms = received_ms as i64;
        contacts
            .entry(device_id)
            .and_modify(|contact| {
                contact.first_ms = contact.first_ms.min(received_ms);
                contact.last_ms = contact.last_ms.max(received_ms);
            })
            .or_insert(Contact {
                first_ms: received_ms,
                last_ms: received_ms,
            });
    }
    contacts
}

/// Returns the column values of the telemetry to insert from a batch: the first copy of
/// each (device, seq) pair, in batch order. Later copies in the same batch are
/// duplicates, which [`device_changes`] counts.
pub(super) fn unique_telemetry(batch: &[Record]) -> Vec<TelemetryValues<'_>> {
    let mut seen: HashSet<(&str, u64)> = HashSet::new();
    batch
        .iter()
        .filter_map(|record| match record {
            Record::Telemetry(message) => Some(message),
            Record::Status { .. } => None,
        })
        .filter(|message| seen.insert((&message.telemetry.device_id, message.telemetry.seq)))
        .map(TelemetryValues::new)
        .collect()
}

/// Returns the (device, seq) keys of `rows` other than those in `skipped`, in the form
/// [`device_changes`] takes as the inserted keys.
pub(super) fn inserted_keys(
    rows: &[TelemetryValues<'_>],
    skipped: &HashSet<(&str, i64)>,
) -> HashSet<(String, i64)> {
    rows.iter()
        .filter(|row| !skipped.contains(&(row.device_id, row.seq)))
        .map(|row| (row.device_id.to_owned(), row.seq))
        .collect()
}

/// Changes that one batch makes to a `devices` row besides its contact times.
#[derive(Debug, Default)]
pub(super) struct DeviceChange<'a> {
    /// Stored (non-duplicate) messages and the sums of their counters.
    pub messages: i64,
    pub min_seq: Option<i64>,
    pub max_seq: Option<i64>,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub duplicates: i64,
    /// Model name and version set by the last stored telemetry or status that names one.
    pub model: Option<(&'a str, &'a str)>,
    /// State and agent version of the last status.
    pub status: Option<(&'static str, &'a str)>,
}

/// Replays a batch in order and returns each device's net change, ordered by device id,
/// with the number of telemetry messages stored.
///
/// `inserted` contains the (device, seq) pairs that the database inserted. The first
/// telemetry record with such a pair counts as stored, and every other telemetry record
/// as a duplicate. Applying the result gives the row that applying the records one by
/// one would give: totals are sums, and the model, state and agent version are those of
/// the last record that sets them.
pub(super) fn device_changes<'a>(
    batch: &'a [Record],
    mut inserted: HashSet<(String, i64)>,
) -> (BTreeMap<&'a str, DeviceChange<'a>>, usize) {
    let mut changes: BTreeMap<&str, DeviceChange<'_>> = BTreeMap::new();
    let mut stored = 0;
    for record in batch {
        match record {
            Record::Telemetry(message) => {
                let t = &message.telemetry;
                let change = changes.entry(&t.device_id).or_default();
                let seq = t.seq as i64;
                if !inserted.remove(&(t.device_id.clone(), seq)) {
                    change.duplicates += 1;
                    continue;
                }
                stored += 1;
                change.messages += 1;
                change.min_seq = Some(change.min_seq.map_or(seq, |low| low.min(seq)));
                change.max_seq = Some(change.max_seq.map_or(seq, |high| high.max(seq)));
                change.inferences += i64::from(t.inferences);
                change.input_errors += i64::from(t.input_errors);
                change.labeled += i64::from(t.labeled);
                change.correct += i64::from(t.correct);
                change.model = Some((&t.model.name, &t.model.version));
            }
            Record::Status { status, .. } => {
                let change = changes.entry(&status.device_id).or_default();
                change.status = Some((state_name(status.state), &status.agent_version));
                if let Some(model) = &status.model {
                    change.model = Some((&model.name, &model.version));
                }
            }
        }
    }
    (changes, stored)
}

/// Returns the `devices.state` text for a connection state.
pub(super) fn state_name(state: DeviceState) -> &'static str {
    match state {
        DeviceState::Online => "online",
        DeviceState::Offline => "offline",
    }
}

/// Parses a stored histogram, naming the hourly row it came from on failure.
pub(super) fn parse_hourly_histogram(
    text: &str,
    device_id: &str,
    hour_start_ms: i64,
) -> Result<LatencyHistogram, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::HourlyHistogram {
        device_id: device_id.to_owned(),
        hour_start_ms,
        source,
    })
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

/// Devices with the readings of their latest stored telemetry message. The SQL is the
/// same on both databases because it binds no parameters.
pub(super) const DEVICE_ROWS_QUERY: &str = "SELECT d.*, t.cpu_percent AS last_cpu,
        t.process_memory_bytes AS last_memory, t.temperature_celsius AS last_temperature
    FROM devices d
    LEFT JOIN telemetry t ON t.device_id = d.id AND t.seq = d.max_seq
    ORDER BY d.id";

/// Counts a batch's telemetry records that were `stored` and those that were not, which
/// were duplicates.
pub(super) fn batch_outcome(batch: &[Record], stored: usize) -> BatchOutcome {
    let received = batch
        .iter()
        .filter(|record| matches!(record, Record::Telemetry(_)))
        .count();
    BatchOutcome {
        stored,
        duplicates: received - stored,
    }
}
