//! The store on both backends: deduplication on (device, seq), gap counting, status, the
//! live window, downsampling, concurrent writers, over-the-air updates, hard samples and
//! remote configuration, on real databases.
//!
//! Every test listed in `on_each_backend!` runs twice: on a SQLite file in a temporary
//! folder, and in a PostgreSQL schema of its own, so the tests can run in parallel. The
//! PostgreSQL server is `postgres://postgres@127.0.0.1:5432/test` unless
//! `FLEET_TEST_POSTGRES_URL` names another; the PostgreSQL tests fail when it is not
//! reachable.

use std::error::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use fleet_server::access::{self, AccessError, Principal};
use fleet_server::store::access::CredentialRole;
use fleet_server::store::remote_config::{
    AckOutcome, ConfigRecord, ConfigSettings, ConfigStatus, ReceivedConfigAck,
};
use fleet_server::store::samples::{SampleFilter, SampleRecord};
use fleet_server::store::updates::{
    BundleRecord, EventOutcome, ReceivedEvent, STAGE_PENDING, STAGE_SUPERSEDED,
};
use fleet_server::store::{DownsampleOutcome, Received, Record, Store};
use fleet_wire::{
    ConfigAck, DeviceState, LatencyHistogram, ModelRef, Status, SystemStats, Telemetry,
    UpdateEvent, UpdateStage,
};
use sqlx::{Connection, Executor, PgConnection};

const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const HOUR_MS: u64 = 3_600_000;

/// Defines one `#[tokio::test]` per backend for each named `async fn(Backend)`, in the
/// modules `sqlite` and `postgres`.
macro_rules! on_each_backend {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Sqlite).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Postgres).await;
                }
            )+
        }
    };
}

on_each_backend!(
    duplicates_are_stored_once,
    duplicates_within_one_batch,
    model_follows_last_record,
    large_batch_is_stored_whole,
    gaps_count_missing_sequence_numbers,
    non_finite_readings_become_nulls,
    live_window_merges_recent_histograms,
    status_updates_state_in_order,
    downsample_preserves_counts,
    downsample_runs_concurrently_once,
    overlapping_batches_from_two_handles,
    credentials_are_issued_checked_and_revoked,
    operator_sessions_and_tokens,
    bundles_are_recorded_once,
    update_stage_moves_forward_only,
    new_update_supersedes_unfinished_one,
    samples_are_recorded_once,
    samples_filter_by_device_and_model,
    config_change_replaces_previous_one,
    config_ack_sets_current_change_only,
    known_device_has_connected_or_credential,
);

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A database of one test's own: a SQLite file in a temporary folder, or a PostgreSQL
/// schema that is dropped when this value is dropped.
struct TestDatabase {
    /// What `Store::open` takes to open this database.
    url: String,
    _dir: Option<tempfile::TempDir>,
    /// The server URL without the schema option, and the schema name.
    postgres_schema: Option<(String, String)>,
}

impl TestDatabase {
    async fn create(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
                TestDatabase {
                    url,
                    _dir: Some(dir),
                    postgres_schema: None,
                }
            }
            Backend::Postgres => {
                let server = std::env::var("FLEET_TEST_POSTGRES_URL")
                    .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned());
                let schema = unique_schema_name();
                let mut connection = PgConnection::connect(&server)
                    .await
                    .unwrap_or_else(|error| {
                        panic!(
                            "failed to connect to PostgreSQL at {server}: {error}. Start it, or set \
                         FLEET_TEST_POSTGRES_URL to a reachable server"
                        )
                    });
                connection
                    .execute(format!("CREATE SCHEMA {schema}").as_str())
                    .await
                    .unwrap();
                connection.close().await.unwrap();
                let separator = if server.contains('?') { '&' } else { '?' };
                TestDatabase {
                    url: format!("{server}{separator}options[search_path]={schema}"),
                    _dir: None,
                    postgres_schema: Some((server, schema)),
                }
            }
        }
    }

    /// Opens another handle on this database, with its own connection pool.
    async fn open(&self) -> Store {
        Store::open(&self.url).await.unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((server, schema)) = self.postgres_schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot block on its own futures, so
        // the schema is dropped from a thread with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut connection = PgConnection::connect(&server).await?;
                connection
                    .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
                    .await?;
                connection.close().await
            })
        })
        .join();
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("failed to drop a test schema: {error}"),
            Err(_) => eprintln!("failed to drop a test schema: the dropping thread panicked"),
        }
    }
}

/// Returns a schema name that no other test, in this process or another, uses.
fn unique_schema_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "fleet_test_{}_{}_{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn telemetry(device_id: &str, seq: u64, correct: u32) -> Record {
    telemetry_at(device_id, seq, correct, 1_000_000 + seq)
}

fn telemetry_at(device_id: &str, seq: u64, correct: u32, received_ms: u64) -> Record {
    let mut latency = LatencyHistogram::default();
    for micros in [400, 500, 600, 5_000] {
        latency.record_micros(micros);
    }
    Record::Telemetry(Received {
        telemetry: Telemetry {
            device_id: device_id.into(),
            seq,
            device_time_ms: 1_000 * seq,
            interval_ms: 1_000,
            model: ModelRef {
                name: "digit-cnn".into(),
                version: "1.0.0".into(),
            },
            inferences: 4,
            input_errors: 0,
            labeled: 4,
            correct,
            confidence_sum: 3.5,
            low_confidence: 0,
            latency,
            system: SystemStats {
                cpu_percent: f32::NAN,
                process_memory_bytes: 1 << 20,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 1 << 32,
                temperature_celsius: Some(f32::INFINITY),
            },
            fallback: Default::default(),
        },
        received_ms,
    })
}

/// Returns the error and all its sources as one line.
fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn duplicates_are_stored_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let first = store
        .apply_batch(&[telemetry("a", 1, 4), telemetry("a", 2, 3)])
        .await
        .unwrap();
    assert_eq!((first.stored, first.duplicates), (2, 0));

    let again = store
        .apply_batch(&[telemetry("a", 2, 3), telemetry("a", 3, 4)])
        .await
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (1, 1));

    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices.len(), 1);
    let device = &devices[0];
    assert_eq!(device.messages, 3);
    assert_eq!(device.duplicates, 1);
    assert_eq!(device.inferences, 12);
    assert_eq!(device.correct, 11);
    assert_eq!(device.gaps, 0);
    assert!((device.accuracy.unwrap() - 11.0 / 12.0).abs() < 1e-12);
}

async fn duplicates_within_one_batch(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    // A batch whose messages were all dropped arrives empty.
    let empty = store.apply_batch(&[]).await.unwrap();
    assert_eq!(empty.stored, 0);
    assert_eq!(empty.duplicates, 0);
    let outcome = store
        .apply_batch(&[
            telemetry("a", 1, 4),
            telemetry("a", 1, 0),
            telemetry("b", 1, 2),
            telemetry("a", 2, 3),
            telemetry("b", 1, 1),
            telemetry("a", 1, 1),
        ])
        .await
        .unwrap();
    assert_eq!(outcome.stored, 3);
    assert_eq!(outcome.duplicates, 3);

    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    let a = &devices[0];
    assert_eq!(a.id, "a");
    assert_eq!(a.messages, 2);
    assert_eq!(a.duplicates, 2);
    // The first copy of each (device, seq) is the one stored and counted.
    assert_eq!(a.correct, 7);
    assert_eq!(a.gaps, 0);
    let b = &devices[1];
    assert_eq!(b.id, "b");
    assert_eq!(b.messages, 1);
    assert_eq!(b.duplicates, 1);
    assert_eq!(b.correct, 2);
    let rows = store.telemetry("a", 10).await.unwrap().unwrap();
    let correct: Vec<(i64, i64)> = rows.iter().map(|row| (row.seq, row.correct)).collect();
    assert_eq!(correct, [(2, 3), (1, 4)]);
}

async fn model_follows_last_record(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let status = |device_id: &str, agent_version: &str, model: Option<&str>| Record::Status {
        status: Status {
            device_id: device_id.into(),
            state: DeviceState::Online,
            model: model.map(|version| ModelRef {
                name: "other-cnn".into(),
                version: version.into(),
            }),
            agent_version: agent_version.into(),
            device_time_ms: 0,
        },
        received_ms: 5,
    };
    store.apply_batch(&[telemetry("f", 1, 4)]).await.unwrap();
    store
        .apply_batch(&[
            // f: a status naming a model after telemetry wins.
            telemetry("f", 2, 4),
            status("f", "0.2.0", Some("2.0.0")),
            // g: telemetry after a status naming a model wins.
            status("g", "0.2.0", Some("2.0.0")),
            telemetry("g", 1, 4),
            // h: a status without a model keeps the telemetry's model, and a duplicate
            // changes nothing but the duplicate count.
            telemetry("h", 1, 4),
            status("h", "0.3.0", None),
            status("h", "0.4.0", Some("3.0.0")),
            telemetry("h", 1, 4),
            // f again: a duplicate of an earlier batch does not set the model.
            telemetry("f", 1, 4),
        ])
        .await
        .unwrap();
    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    let model = |index: usize| {
        let device = &devices[index];
        (
            device.model_name.as_deref(),
            device.model_version.as_deref(),
        )
    };
    assert_eq!(devices[0].id, "f");
    assert_eq!(model(0), (Some("other-cnn"), Some("2.0.0")));
    assert_eq!(devices[0].agent_version.as_deref(), Some("0.2.0"));
    assert_eq!(devices[0].duplicates, 1);
    assert_eq!(devices[1].id, "g");
    assert_eq!(model(1), (Some("digit-cnn"), Some("1.0.0")));
    assert_eq!(devices[1].state, "online");
    assert_eq!(devices[2].id, "h");
    assert_eq!(model(2), (Some("other-cnn"), Some("3.0.0")));
    assert_eq!(devices[2].agent_version.as_deref(), Some("0.4.0"));
    assert_eq!(devices[2].duplicates, 1);
    assert_eq!(devices[2].messages, 1);
}

/// A batch larger than one multi-row statement takes on SQLite (1,560 telemetry rows or
/// 2,520 device rows) is stored whole.
async fn large_batch_is_stored_whole(backend: Backend) {
    const DEVICES: u64 = 3_000;
    const MESSAGES: u64 = 4_000;
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let batch: Vec<Record> = (0..MESSAGES)
        .map(|i| telemetry(&format!("device-{:04}", i % DEVICES), i / DEVICES, 1))
        .collect();
    let outcome = store.apply_batch(&batch).await.unwrap();
    assert_eq!(outcome.stored, MESSAGES as usize);
    assert_eq!(outcome.duplicates, 0);
    let again = store.apply_batch(&batch).await.unwrap();
    assert_eq!(again.stored, 0);
    assert_eq!(again.duplicates, MESSAGES as usize);

    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices.len(), DEVICES as usize);
    let messages: i64 = devices.iter().map(|device| device.messages).sum();
    assert_eq!(messages, MESSAGES as i64);
    let duplicates: i64 = devices.iter().map(|device| device.duplicates).sum();
    assert_eq!(duplicates, MESSAGES as i64);
    let correct: i64 = devices.iter().map(|device| device.correct).sum();
    assert_eq!(correct, MESSAGES as i64);
    assert!(devices.iter().all(|device| device.gaps == 0));
}

async fn gaps_count_missing_sequence_numbers(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    store
        .apply_batch(&[
            telemetry("b", 1, 4),
            telemetry("b", 4, 4),
            telemetry("b", 6, 4),
        ])
        .await
        .unwrap();
    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices[0].gaps, 3);
}

async fn non_finite_readings_become_nulls(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    store.apply_batch(&[telemetry("c", 1, 4)]).await.unwrap();
    let rows = store.telemetry("c", 10).await.unwrap().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].cpu_percent, None);
    assert_eq!(rows[0].temperature_celsius, None);
    assert_eq!(rows[0].process_memory_bytes, Some(1 << 20));
    // The sample message's device clock is 999 s behind its receive time.
    assert!(rows[0].clock_skewed);
    assert!(store.telemetry("unknown", 10).await.unwrap().is_none());
}

async fn live_window_merges_recent_histograms(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    store
        .apply_batch(&[telemetry("d", 1, 4), telemetry("d", 2, 4)])
        .await
        .unwrap();
    let live = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        (live[0].throughput - 4.0).abs() < 1e-9,
        "{}",
        live[0].throughput
    );
    let p50 = live[0].latency_p50_ms.unwrap();
    assert!((0.5..=0.6).contains(&p50), "p50 {p50} ms");

    let later = store
        .devices(9_000_000, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(later[0].throughput, 0.0);
    assert_eq!(later[0].latency_p50_ms, None);
}

async fn status_updates_state_in_order(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let status = |state| Record::Status {
        status: Status {
            device_id: "e".into(),
            state,
            model: None,
            agent_version: "0.1.0".into(),
            device_time_ms: 0,
        },
        received_ms: 5,
    };
    store
        .apply_batch(&[
            status(DeviceState::Online),
            telemetry("e", 1, 4),
            status(DeviceState::Offline),
        ])
        .await
        .unwrap();
    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices[0].state, "offline");
    assert_eq!(devices[0].model_name.as_deref(), Some("digit-cnn"));
    assert_eq!(devices[0].first_seen_ms, 5);
    assert_eq!(devices[0].last_seen_ms, 1_000_001);

    // A batch without a status leaves the state and agent version as they were.
    store.apply_batch(&[telemetry("e", 2, 6)]).await.unwrap();
    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices[0].state, "offline");
    assert_eq!(devices[0].agent_version.as_deref(), Some("0.1.0"));
    assert_eq!(devices[0].messages, 2);

    let mut online = status(DeviceState::Online);
    if let Record::Status { status, .. } = &mut online {
        status.agent_version = "0.2.0".into();
    }
    store.apply_batch(&[online]).await.unwrap();
    let devices = store
        .devices(1_000_010, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(devices[0].state, "online");
    assert_eq!(devices[0].agent_version.as_deref(), Some("0.2.0"));
    assert_eq!(devices[0].messages, 2);
}

async fn downsample_preserves_counts(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let hour = |n: u64| 10 * HOUR_MS + n * HOUR_MS;
    store
        .apply_batch(&[
            telemetry_at("f", 1, 4, hour(0) + 10),
            telemetry_at("f", 2, 3, hour(0) + 20),
            telemetry_at("f", 3, 2, hour(0) + 30),
            telemetry_at("g", 1, 1, hour(0) + 40),
            telemetry_at("f", 4, 4, hour(1) + 10),
            telemetry_at("f", 5, 0, hour(1) + 2_000),
            telemetry_at("f", 6, 4, hour(2) + 10),
        ])
        .await
        .unwrap();
    let before = store.devices(hour(3), Duration::ZERO).await.unwrap();

    // A cutoff inside hour 1 rolls up part of it; the next run adds the rest to the
    // same hourly row.
    let first = store.downsample(hour(1) + 1_000).await.unwrap();
    assert_eq!(
        first,
        DownsampleOutcome {
            raw_rows: 5,
            hourly_rows: 3
        }
    );
    let second = store.downsample(hour(2)).await.unwrap();
    assert_eq!(
        second,
        DownsampleOutcome {
            raw_rows: 1,
            hourly_rows: 1
        }
    );
    let third = store.downsample(hour(2)).await.unwrap();
    assert_eq!(third, DownsampleOutcome::default());

    let hourly = store.hourly_telemetry("f", 10).await.unwrap().unwrap();
    let starts: Vec<i64> = hourly.iter().map(|row| row.hour_start_ms).collect();
    assert_eq!(starts, [hour(1) as i64, hour(0) as i64]);
    assert_eq!(hourly[0].messages, 2);
    assert_eq!(hourly[0].inferences, 8);
    assert_eq!(hourly[0].labeled, 8);
    assert_eq!(hourly[0].correct, 4);
    assert_eq!(hourly[0].input_errors, 0);
    assert_eq!(hourly[0].latency.count, 8);
    assert_eq!(hourly[1].messages, 3);
    assert_eq!(hourly[1].inferences, 12);
    assert_eq!(hourly[1].correct, 9);
    assert_eq!(hourly[1].latency.count, 12);
    assert_eq!(hourly[1].latency.max_micros, 5_000);

    let other = store.hourly_telemetry("g", 10).await.unwrap().unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].messages, 1);
    assert_eq!(other[0].correct, 1);
    assert!(
        store
            .hourly_telemetry("unknown", 10)
            .await
            .unwrap()
            .is_none()
    );

    let raw = store.telemetry("f", 10).await.unwrap().unwrap();
    let raw_seqs: Vec<i64> = raw.iter().map(|row| row.seq).collect();
    assert_eq!(raw_seqs, [6]);
    assert!(store.telemetry("g", 10).await.unwrap().unwrap().is_empty());

    let after = store.devices(hour(3), Duration::ZERO).await.unwrap();
    assert_eq!(after.len(), before.len());
    for (after, before) in after.iter().zip(&before) {
        assert_eq!(after.id, before.id);
        assert_eq!(after.messages, before.messages, "{}", after.id);
        assert_eq!(after.gaps, before.gaps, "{}", after.id);
        assert_eq!(after.duplicates, before.duplicates, "{}", after.id);
        assert_eq!(after.inferences, before.inferences, "{}", after.id);
        assert_eq!(after.labeled, before.labeled, "{}", after.id);
        assert_eq!(after.correct, before.correct, "{}", after.id);
        assert_eq!(after.first_seen_ms, before.first_seen_ms, "{}", after.id);
        assert_eq!(after.last_seen_ms, before.last_seen_ms, "{}", after.id);
    }
}

async fn downsample_runs_concurrently_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let replicas = [db.open().await, db.open().await];
    let devices = ["h", "i", "j"];
    let mut batch = Vec::new();
    for seq in 1..=200u64 {
        for device in devices {
            // Spread over 5 hours, so the runs update several hourly rows each.
            batch.push(telemetry_at(device, seq, 3, seq * HOUR_MS / 40));
        }
    }
    replicas[0].apply_batch(&batch).await.unwrap();
    let cutoff = 6 * HOUR_MS;

    let runs: Vec<_> = replicas
        .iter()
        .map(|store| {
            let store = store.clone();
            tokio::spawn(async move { store.downsample(cutoff).await })
        })
        .collect();
    let mut raw_rows = 0;
    for run in runs {
        raw_rows += run.await.unwrap().unwrap().raw_rows;
    }
    assert_eq!(raw_rows, 600);

    for device in devices {
        let hourly = replicas[1]
            .hourly_telemetry(device, 100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(hourly.len(), 6, "{device}");
        let messages: i64 = hourly.iter().map(|row| row.messages).sum();
        let correct: i64 = hourly.iter().map(|row| row.correct).sum();
        let latencies: u32 = hourly.iter().map(|row| row.latency.count).sum();
        assert_eq!(messages, 200, "{device}");
        assert_eq!(correct, 600, "{device}");
        assert_eq!(latencies, 800, "{device}");
        let raw = replicas[1].telemetry(device, 100).await.unwrap().unwrap();
        assert!(raw.is_empty(), "{device}: {} raw rows left", raw.len());
    }
}

async fn overlapping_batches_from_two_handles(backend: Backend) {
    const ROUNDS: u64 = 8;
    const BATCH: u64 = 40;
    const OVERLAP: u64 = 20;
    let db = TestDatabase::create(backend).await;
    let replicas = [db.open().await, db.open().await];
    let devices = ["p", "q", "r"];

    // In each round both handles write BATCH messages per device at the same time, the
    // second starting OVERLAP sequence numbers before the first ends and listing the
    // devices in the opposite order.
    let mut stored = 0;
    let mut duplicates = 0;
    for round in 0..ROUNDS {
        let start = round * (2 * BATCH - OVERLAP) + 1;
        let mut first = Vec::new();
        let mut second = Vec::new();
        for seq in start..start + BATCH {
            for device in devices {
                first.push(telemetry(device, seq, 4));
            }
        }
        for seq in start + BATCH - OVERLAP..start + 2 * BATCH - OVERLAP {
            for device in devices.iter().rev() {
                second.push(telemetry(device, seq, 4));
            }
        }
        let writes: Vec<_> = [first, second]
            .into_iter()
            .zip(replicas.iter().cloned())
            .map(|(batch, store)| tokio::spawn(async move { store.apply_batch(&batch).await }))
            .collect();
        for write in writes {
            let outcome = write.await.unwrap().unwrap();
            stored += outcome.stored;
            duplicates += outcome.duplicates;
        }
    }

    let unique_per_device = (ROUNDS * (2 * BATCH - OVERLAP)) as i64;
    let overlap_per_device = (ROUNDS * OVERLAP) as i64;
    assert_eq!(stored as i64, 3 * unique_per_device);
    assert_eq!(duplicates as i64, 3 * overlap_per_device);

    let summaries = replicas[1].devices(0, Duration::ZERO).await.unwrap();
    assert_eq!(summaries.len(), 3);
    for device in &summaries {
        assert_eq!(device.messages, unique_per_device, "{}", device.id);
        assert_eq!(device.duplicates, overlap_per_device, "{}", device.id);
        assert_eq!(device.inferences, 4 * unique_per_device, "{}", device.id);
        assert_eq!(device.correct, 4 * unique_per_device, "{}", device.id);
        assert_eq!(device.gaps, 0, "{}", device.id);
        let rows = replicas[0]
            .telemetry(&device.id, 10_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rows.len() as i64, unique_per_device, "{}", device.id);
    }
}

async fn credentials_are_issued_checked_and_revoked(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let store = database.open().await;
    let secret = access::provision(&store, "cam-1", CredentialRole::Device, false)
        .await
        .unwrap();
    let device = Principal::Device { id: "cam-1".into() };
    let checked = access::check_broker_login(&store, "cam-1", &secret)
        .await
        .unwrap();
    assert_eq!(checked, Some(device.clone()));
    let wrong = access::check_broker_login(&store, "cam-1", "guess")
        .await
        .unwrap();
    assert_eq!(wrong, None);
    let unknown = access::check_broker_login(&store, "cam-9", &secret)
        .await
        .unwrap();
    assert_eq!(unknown, None);

    let again = access::provision(&store, "cam-1", CredentialRole::Device, false).await;
    assert!(
        matches!(again, Err(AccessError::AlreadyProvisioned { .. })),
        "{again:?}"
    );
    let rotated = access::provision(&store, "cam-1", CredentialRole::Device, true)
        .await
        .unwrap();
    let old = access::check_broker_login(&store, "cam-1", &secret)
        .await
        .unwrap();
    assert_eq!(old, None, "the old secret still works after rotation");
    let new = access::check_broker_login(&store, "cam-1", &rotated)
        .await
        .unwrap();
    assert_eq!(new, Some(device.clone()));
    let by_token = access::principal_for_token(&store, &rotated).await.unwrap();
    assert_eq!(by_token, Some(device));

    access::provision(&store, "replica-a", CredentialRole::Ingester, false)
        .await
        .unwrap();
    let listed: Vec<(String, CredentialRole)> = store
        .credentials()
        .await
        .unwrap()
        .into_iter()
        .map(|credential| (credential.name, credential.role))
        .collect();
    assert_eq!(
        listed,
        [
            ("cam-1".to_string(), CredentialRole::Device),
            ("replica-a".to_string(), CredentialRole::Ingester),
        ]
    );
    let invalid = access::provision(&store, "a/b", CredentialRole::Device, false).await;
    assert!(
        matches!(invalid, Err(AccessError::InvalidName { .. })),
        "{invalid:?}"
    );

    assert!(store.delete_credential("cam-1").await.unwrap());
    assert!(!store.delete_credential("cam-1").await.unwrap());
    let revoked = access::check_broker_login(&store, "cam-1", &rotated)
        .await
        .unwrap();
    assert_eq!(revoked, None);
}

async fn operator_sessions_and_tokens(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let store = database.open().await;
    let short = access::set_operator_password(&store, "alice", "too short").await;
    assert!(
        matches!(short, Err(AccessError::PasswordTooShort { chars: 9 })),
        "{short:?}"
    );
    access::set_operator_password(&store, "alice", "correct horse battery")
        .await
        .unwrap();
    let right = access::check_operator_password(&store, "alice", "correct horse battery");
    assert!(right.await.unwrap());
    let wrong = access::check_operator_password(&store, "alice", "wrong horse battery");
    assert!(!wrong.await.unwrap());
    let unknown = access::check_operator_password(&store, "mallory", "correct horse battery");
    assert!(!unknown.await.unwrap());

    let token = access::create_api_token(&store, "grafana").await.unwrap();
    let principal = access::principal_for_token(&store, &token).await.unwrap();
    assert_eq!(
        principal,
        Some(Principal::Operator {
            name: "token:grafana".into()
        })
    );
    let duplicate = access::create_api_token(&store, "grafana").await;
    assert!(
        matches!(duplicate, Err(AccessError::TokenExists { .. })),
        "{duplicate:?}"
    );
    assert!(store.delete_api_token("grafana").await.unwrap());
    assert_eq!(
        access::principal_for_token(&store, &token).await.unwrap(),
        None
    );

    let now = fleet_server::unix_millis();
    let live = access::sha256_hex("live-session");
    let expired = access::sha256_hex("expired-session");
    store.put_session(&expired, "alice", now - 1).await.unwrap();
    store
        .put_session(&live, "alice", now + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store.session_operator(&live).await.unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(store.session_operator(&expired).await.unwrap(), None);
    store.delete_session(&live).await.unwrap();
    assert_eq!(store.session_operator(&live).await.unwrap(), None);
}

#[tokio::test]
async fn open_rejects_unknown_scheme() {
    let error = Store::open("mysql://fleet:hunter2@127.0.0.1/fleet")
        .await
        .unwrap_err();
    let message = error_chain(&error);
    assert!(message.contains("\"mysql\""), "{message}");
    assert!(!message.contains("hunter2"), "{message}");

    let error = Store::open("sqlite://").await.unwrap_err();
    let message = error_chain(&error);
    assert!(message.contains("sqlite://PATH"), "{message}");
}

#[tokio::test]
async fn open_postgres_error_hides_password() {
    // Port 1 on loopback refuses the connection at once.
    let error = Store::open("postgres://fleet:hunter2@127.0.0.1:1/fleet")
        .await
        .unwrap_err();
    let message = error_chain(&error);
    assert!(
        message.contains("postgres://fleet:***@127.0.0.1:1/fleet"),
        "{message}"
    );
    assert!(!message.contains("hunter2"), "{message}");
}

#[tokio::test]
async fn open_accepts_plain_path_and_sqlite_url() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let by_path = Store::open(path.to_str().unwrap()).await.unwrap();
    by_path.apply_batch(&[telemetry("k", 1, 4)]).await.unwrap();

    let by_url = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let rows = by_url.telemetry("k", 10).await.unwrap().unwrap();
    assert_eq!(rows.len(), 1);

    let by_open_sqlite = Store::open_sqlite(&path).await.unwrap();
    let rows = by_open_sqlite.telemetry("k", 10).await.unwrap().unwrap();
    assert_eq!(rows.len(), 1);
}

fn bundle_record(sha_digit: char, version: &str) -> BundleRecord {
    BundleRecord {
        sha256: sha_digit.to_string().repeat(64),
        name: "digit-cnn".into(),
        version: version.into(),
        size: 1_234,
        uploaded_ms: 1_000,
        uploaded_by: "alice".into(),
    }
}

fn update_event(device_id: &str, update_id: &str, stage: UpdateStage) -> ReceivedEvent {
    ReceivedEvent {
        device_id: device_id.into(),
        device_time_ms: 5_000,
        received_ms: 6_000,
        event: UpdateEvent {
            update_id: update_id.into(),
            sha256: "a".repeat(64),
            version: "1.1.0".into(),
            stage,
            detail: format!("reached {}", stage.as_str()),
        },
    }
}

/// Returns the stored stage of an update.
async fn stage_of(store: &Store, id: &str) -> String {
    store
        .update(id)
        .await
        .unwrap()
        .expect("stored update")
        .stage
}

async fn bundles_are_recorded_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let first = bundle_record('a', "1.0.0");
    assert!(store.put_bundle(&first).await.unwrap());
    let mut again = first.clone();
    again.uploaded_by = "bob".into();
    assert!(!store.put_bundle(&again).await.unwrap());
    assert!(
        store
            .put_bundle(&bundle_record('b', "1.1.0"))
            .await
            .unwrap()
    );

    assert_eq!(store.bundle(&first.sha256).await.unwrap(), Some(first));
    assert_eq!(store.bundle(&"c".repeat(64)).await.unwrap(), None);
    let listed = store.bundles().await.unwrap();
    assert_eq!(listed.len(), 2);
}

async fn update_stage_moves_forward_only(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let bundle = bundle_record('a', "1.1.0");
    store.put_bundle(&bundle).await.unwrap();
    let pairs = [("u-1".to_string(), "cam-1".to_string())];
    let (created, superseded) = store
        .create_updates(&bundle, &pairs, "alice")
        .await
        .unwrap();
    assert!(superseded.is_empty());
    assert_eq!(created[0].stage, STAGE_PENDING);
    assert_eq!(stage_of(&store, "u-1").await, STAGE_PENDING);

    let steps = [
        (UpdateStage::Accepted, EventOutcome::Applied, "accepted"),
        (UpdateStage::Verified, EventOutcome::Applied, "verified"),
        (UpdateStage::Downloaded, EventOutcome::Stale, "verified"),
        (UpdateStage::Verified, EventOutcome::Stale, "verified"),
        (UpdateStage::Committed, EventOutcome::Applied, "committed"),
        (UpdateStage::Failed, EventOutcome::Stale, "committed"),
    ];
    for (stage, outcome, expected) in steps {
        let recorded = store
            .record_update_event(&update_event("cam-1", "u-1", stage))
            .await
            .unwrap();
        assert_eq!(recorded, outcome, "{stage:?}");
        assert_eq!(stage_of(&store, "u-1").await, expected, "after {stage:?}");
    }
    let update = store.update("u-1").await.unwrap().unwrap();
    assert_eq!(update.detail, "reached committed");
    assert_eq!(update.updated_ms, 6_000);

    // Another device cannot move the update, and an unknown id is kept in the history.
    let foreign = store
        .record_update_event(&update_event("cam-2", "u-1", UpdateStage::RolledBack))
        .await
        .unwrap();
    assert_eq!(foreign, EventOutcome::UnknownUpdate);
    let own_rollback = store
        .record_update_event(&update_event("cam-1", "", UpdateStage::RolledBack))
        .await
        .unwrap();
    assert_eq!(own_rollback, EventOutcome::UnknownUpdate);
    assert_eq!(stage_of(&store, "u-1").await, "committed");

    let events = store.update_events("u-1").await.unwrap();
    let stages: Vec<&str> = events.iter().map(|event| event.stage.as_str()).collect();
    assert_eq!(
        stages,
        [
            "accepted",
            "verified",
            "downloaded",
            "verified",
            "committed",
            "failed",
            "rolled_back"
        ]
    );
    assert_eq!(events[6].device_id, "cam-2");
    assert_eq!(events[0].device_time_ms, 5_000);
    assert_eq!(events[0].received_ms, 6_000);
    let unattributed = store.update_events("").await.unwrap();
    assert_eq!(unattributed.len(), 1);
    assert_eq!(unattributed[0].device_id, "cam-1");
}

async fn new_update_supersedes_unfinished_one(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let first = bundle_record('a', "1.0.0");
    let second = bundle_record('b', "1.1.0");
    store.put_bundle(&first).await.unwrap();
    store.put_bundle(&second).await.unwrap();
    let pair = |id: &str, device: &str| (id.to_string(), device.to_string());

    store
        .create_updates(
            &first,
            &[pair("u-1", "cam-1"), pair("u-2", "cam-2")],
            "alice",
        )
        .await
        .unwrap();
    store
        .record_update_event(&update_event("cam-1", "u-1", UpdateStage::Downloaded))
        .await
        .unwrap();
    store
        .record_update_event(&update_event("cam-2", "u-2", UpdateStage::Committed))
        .await
        .unwrap();

    let (_, superseded) = store
        .create_updates(
            &second,
            &[pair("u-3", "cam-1"), pair("u-4", "cam-2")],
            "bob",
        )
        .await
        .unwrap();
    assert_eq!(superseded.len(), 1, "{superseded:?}");
    assert_eq!(superseded[0].update_id, "u-1");
    assert_eq!(superseded[0].replaced_by, "u-3");
    assert_eq!(stage_of(&store, "u-1").await, STAGE_SUPERSEDED);
    assert_eq!(stage_of(&store, "u-2").await, "committed");

    // A superseded update stays superseded whatever its device reports later.
    let late = store
        .record_update_event(&update_event("cam-1", "u-1", UpdateStage::Committed))
        .await
        .unwrap();
    assert_eq!(late, EventOutcome::Stale);
    assert_eq!(stage_of(&store, "u-1").await, STAGE_SUPERSEDED);

    let unfinished = store.unfinished_updates("cam-1").await.unwrap();
    let ids: Vec<&str> = unfinished
        .iter()
        .map(|update| update.update_id.as_str())
        .collect();
    assert_eq!(ids, ["u-3"]);
    assert_eq!(unfinished[0].version, "1.1.0");
    assert_eq!(unfinished[0].size, 1_234);
    assert_eq!(unfinished[0].created_by, "bob");

    let cam1 = store.updates(Some("cam-1"), 10).await.unwrap();
    assert_eq!(cam1.len(), 2);
    assert_eq!(store.updates(None, 10).await.unwrap().len(), 4);
    assert_eq!(store.updates(None, 3).await.unwrap().len(), 3);
}

fn sample_record(sha_digit: char, device_id: &str, model: &str, received_ms: i64) -> SampleRecord {
    SampleRecord {
        sha256: sha_digit.to_string().repeat(64),
        device_id: device_id.into(),
        model_name: model.into(),
        model_version: "1.0.0".into(),
        predicted_class: 3,
        predicted_label: "three".into(),
        confidence: 0.25,
        true_class: None,
        source: "t10k-images-idx3-ubyte.gz#17".into(),
        device_time_ms: received_ms - 10,
        received_ms,
        content_type: "image/png".into(),
        size: 300,
    }
}

async fn samples_are_recorded_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let mut first = sample_record('a', "pi-1", "digit-cnn", 1_000);
    first.true_class = Some(5);
    assert!(store.put_sample(&first).await.unwrap());
    let again = sample_record('a', "pi-2", "digit-student", 2_000);
    assert!(!store.put_sample(&again).await.unwrap());

    assert_eq!(store.sample(&first.sha256).await.unwrap(), Some(first));
    assert_eq!(store.sample(&"b".repeat(64)).await.unwrap(), None);
    let listed = store.samples(&SampleFilter::default(), 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].device_id, "pi-1", "the first record is kept");
}

async fn samples_filter_by_device_and_model(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let records = [
        sample_record('a', "pi-1", "digit-cnn", 1_000),
        sample_record('b', "pi-1", "digit-student", 2_000),
        sample_record('c', "pi-2", "digit-cnn", 3_000),
    ];
    for record in &records {
        assert!(store.put_sample(record).await.unwrap());
    }

    let hashes = |filter: SampleFilter, limit: u32| {
        let store = store.clone();
        async move {
            store
                .samples(&filter, limit)
                .await
                .unwrap()
                .into_iter()
                .map(|record| record.sha256.chars().next().unwrap())
                .collect::<String>()
        }
    };
    assert_eq!(hashes(SampleFilter::default(), 10).await, "cba");
    assert_eq!(hashes(SampleFilter::default(), 2).await, "cb");

    let pi1 = SampleFilter {
        device_id: Some("pi-1".into()),
        model_name: None,
    };
    assert_eq!(hashes(pi1, 10).await, "ba");
    let cnn = SampleFilter {
        device_id: None,
        model_name: Some("digit-cnn".into()),
    };
    assert_eq!(hashes(cnn, 10).await, "ca");

    let both = SampleFilter {
        device_id: Some("pi-2".into()),
        model_name: Some("digit-cnn".into()),
    };
    assert_eq!(hashes(both, 10).await, "c");
    let none = SampleFilter {
        device_id: Some("pi-3".into()),
        model_name: None,
    };
    assert_eq!(hashes(none, 10).await, "");
}

fn config_record(device_id: &str, change_id: &str, settings: ConfigSettings) -> ConfigRecord {
    ConfigRecord {
        device_id: device_id.into(),
        change_id: change_id.into(),
        settings,
        status: ConfigStatus::Pending,
        detail: String::new(),
        requested_by: "alice".into(),
        created_ms: 1_000,
        updated_ms: 1_000,
    }
}

fn config_ack(device_id: &str, change_id: &str, applied: bool) -> ReceivedConfigAck {
    ReceivedConfigAck {
        device_id: device_id.into(),
        device_time_ms: 5_000,
        received_ms: 6_000,
        ack: ConfigAck {
            change_id: change_id.into(),
            applied,
            detail: format!("{change_id} applied: {applied}"),
        },
    }
}

async fn config_change_replaces_previous_one(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    assert_eq!(store.config("cam-1").await.unwrap(), None);

    let first = config_record(
        "cam-1",
        "c-1",
        ConfigSettings {
            confidence_threshold: Some(0.7),
            interval_seconds: Some(0.25),
            rate: Some(0.0),
            drain_rate: Some(12.5),
            commit_timeout_seconds: Some(900.0),
            fallback_threshold: Some(0.25),
        },
    );
    store.put_config(&first).await.unwrap();
    assert_eq!(store.config("cam-1").await.unwrap(), Some(first));

    let mut second = config_record("cam-1", "c-2", ConfigSettings::default());
    second.requested_by = "bob".into();
    second.created_ms = 2_000;
    second.updated_ms = 2_000;
    store.put_config(&second).await.unwrap();
    assert_eq!(store.config("cam-1").await.unwrap(), Some(second));
    assert_eq!(store.config("cam-2").await.unwrap(), None);
}

async fn config_ack_sets_current_change_only(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    let settings = ConfigSettings {
        rate: Some(4.0),
        ..ConfigSettings::default()
    };
    store
        .put_config(&config_record("cam-1", "c-1", settings.clone()))
        .await
        .unwrap();

    let outcome = store
        .record_config_ack(&config_ack("cam-1", "c-1", true))
        .await
        .unwrap();
    assert_eq!(outcome, AckOutcome::Applied);
    let applied = store.config("cam-1").await.unwrap().unwrap();
    assert_eq!(applied.status, ConfigStatus::Applied);
    assert_eq!(applied.detail, "c-1 applied: true");
    assert_eq!(applied.updated_ms, 6_000);
    assert_eq!(applied.created_ms, 1_000);
    assert_eq!(applied.settings, settings);

    store
        .put_config(&config_record("cam-1", "c-2", settings))
        .await
        .unwrap();
    let steps = [
        ("cam-1", "c-1", false, AckOutcome::Stale),
        ("cam-2", "c-2", true, AckOutcome::Stale),
        ("cam-1", "c-2", false, AckOutcome::Rejected),
    ];
    for (device_id, change_id, applied, expected) in steps {
        let outcome = store
            .record_config_ack(&config_ack(device_id, change_id, applied))
            .await
            .unwrap();
        assert_eq!(outcome, expected, "{device_id} {change_id}");
    }
    let rejected = store.config("cam-1").await.unwrap().unwrap();
    assert_eq!(rejected.change_id, "c-2");
    assert_eq!(rejected.status, ConfigStatus::Rejected);
    assert_eq!(rejected.detail, "c-2 applied: false");

    let events = store.config_events("cam-1", 10).await.unwrap();
    let history: Vec<(&str, bool)> = events
        .iter()
        .map(|event| (event.change_id.as_str(), event.applied))
        .collect();
    assert_eq!(history, [("c-2", false), ("c-1", false), ("c-1", true)]);
    assert_eq!(events[0].device_time_ms, 5_000);
    assert_eq!(events[0].received_ms, 6_000);
    assert_eq!(store.config_events("cam-1", 1).await.unwrap().len(), 1);
    let other = store.config_events("cam-2", 10).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].device_id, "cam-2");
}

async fn known_device_has_connected_or_credential(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = db.open().await;
    assert!(!store.is_known_device("cam-1").await.unwrap());

    store
        .apply_batch(&[telemetry("cam-1", 1, 4)])
        .await
        .unwrap();
    access::provision(&store, "cam-2", CredentialRole::Device, false)
        .await
        .unwrap();
    access::provision(&store, "ingest-1", CredentialRole::Ingester, false)
        .await
        .unwrap();
    assert!(store.is_known_device("cam-1").await.unwrap());
    assert!(store.is_known_device("cam-2").await.unwrap());
    assert!(!store.is_known_device("ingest-1").await.unwrap());
    assert!(!store.is_known_device("cam-3").await.unwrap());
}
