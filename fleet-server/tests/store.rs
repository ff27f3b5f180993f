//! The SQLite store: deduplication on (device, seq), gap counting, status and the
//! live window, on a real database file.

use std::time::Duration;

use fleet_server::store::{Received, Record, Store};
use fleet_wire::{DeviceState, LatencyHistogram, ModelRef, Status, SystemStats, Telemetry};

fn telemetry(device_id: &str, seq: u64, correct: u32) -> Record {
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
        },
        received_ms: 1_000_000 + seq,
    })
}

async fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("fleet.db"))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn duplicates_are_stored_once() {
    let (_dir, store) = open().await;
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

#[tokio::test]
async fn gaps_count_missing_sequence_numbers() {
    let (_dir, store) = open().await;
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

#[tokio::test]
async fn non_finite_readings_become_nulls() {
    let (_dir, store) = open().await;
    store.apply_batch(&[telemetry("c", 1, 4)]).await.unwrap();
    let rows = store.telemetry("c", 10).await.unwrap().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].cpu_percent, None);
    assert_eq!(rows[0].temperature_celsius, None);
    assert_eq!(rows[0].process_memory_bytes, Some(1 << 20));
    assert!(store.telemetry("unknown", 10).await.unwrap().is_none());
}

#[tokio::test]
async fn live_window_merges_recent_histograms() {
    let (_dir, store) = open().await;
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

#[tokio::test]
async fn status_updates_state_in_order() {
    let (_dir, store) = open().await;
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
}
