//! Remote configuration with real processes: the fleet server sets an agent's telemetry
//! interval and confidence threshold over MQTT, the agent uses them at once, and keeps
//! them across a restart.

mod common;

use std::time::Duration;

use common::{Server, Workspace, free_port, unique_device_id, wait_for};
use serde_json::{Value, json};

/// Returns the telemetry rows whose interval started after `since_ms` (the agent runs
/// on this machine, so its clock is the test's).
fn rows_since(server: &Server, device_id: &str, since_ms: i64) -> Vec<Value> {
    let rows = server.get(&format!("/api/devices/{device_id}/telemetry?limit=10000"));
    rows.as_array()
        .expect("telemetry rows")
        .iter()
        .filter(|row| {
            row["device_time_ms"].as_i64().unwrap() - row["interval_ms"].as_i64().unwrap()
                > since_ms
        })
        .cloned()
        .collect()
}

/// Checks that telemetry rows were built under the server's settings: short intervals,
/// and low-confidence results under the threshold of 1.
fn assert_new_settings(rows: &[Value]) {
    for row in rows {
        assert!(row["interval_ms"].as_i64().unwrap() < 1000, "{row}");
    }
    let low: i64 = rows
        .iter()
        .map(|row| row["low_confidence"].as_i64().unwrap())
        .sum();
    let inferences: i64 = rows
        .iter()
        .map(|row| row["inferences"].as_i64().unwrap())
        .sum();
    assert!(
        low > 0,
        "no low-confidence answer in {inferences} inferences"
    );
    assert!(low < inferences, "every answer was low-confidence");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn server_sets_interval_and_threshold_and_they_persist() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let device_id = unique_device_id("remote-config");
    let flags = [
        "--interval",
        "2",
        "--rate",
        "50",
        "--confidence-threshold",
        "0",
    ];
    let mut device = workspace.start_device(&device_id, &broker, &flags);
    let before = wait_for(Duration::from_secs(60), "the first telemetry", || {
        server
            .device(&device_id)
            .filter(|d| d["state"] == "online" && d["inferences"].as_i64() > Some(0))
    });
    let low_before = server.get(&format!("/api/devices/{device_id}/telemetry"));
    for row in low_before.as_array().unwrap() {
        assert_eq!(row["low_confidence"], 0, "threshold 0 from the flag: {row}");
    }
    assert!(before["inferences"].as_i64().unwrap() > 0);

    // Under a threshold of 1 every result short of certainty is low-confidence. The digit
    // model is certain, to f32 precision, of many test digits, so some results are not.
    // The telemetry interval shrinks from 2 s to 0.25 s.
    let change = server.put_config(
        &device_id,
        &json!({
            "confidence_threshold": 1.0,
            "interval_seconds": 0.25,
            "fallback_threshold": 0.35,
        }),
    );
    let change_id = change["change_id"].as_str().expect("change id").to_string();
    let acked = server.wait_for_config_ack(&device_id, &change_id);
    assert_eq!(acked["status"], "applied", "{acked}");
    assert!(
        acked["detail"]
            .as_str()
            .unwrap()
            .contains("interval 0.25 s"),
        "{acked}"
    );
    assert!(
        acked["detail"]
            .as_str()
            .unwrap()
            .contains("fallback_threshold 0.35"),
        "{acked}"
    );

    let applied_ms = acked["updated_ms"].as_i64().expect("ack time");
    let rows = wait_for(
        Duration::from_secs(30),
        "telemetry under the new settings",
        || {
            let rows = rows_since(&server, &device_id, applied_ms);
            (rows.len() >= 4).then_some(rows)
        },
    );
    assert_new_settings(&rows);

    // A value out of range is rejected by the server before it reaches the device.
    let rejected = ureq::put(&format!("{}/api/devices/{device_id}/config", server.base))
        .set("Authorization", &format!("Bearer {}", server.token))
        .send_json(json!({ "confidence_threshold": 3.0 }));
    match rejected {
        Err(ureq::Error::Status(400, response)) => {
            let body = response.into_string().unwrap();
            assert!(body.contains("confidence_threshold"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }

    // The agent keeps the server's settings after a restart.
    assert!(device.terminate().success());
    let restarted_ms = now_ms();
    let _device = workspace.start_device(&device_id, &broker, &flags);
    let rows = wait_for(
        Duration::from_secs(60),
        "telemetry after the restart",
        || {
            let rows = rows_since(&server, &device_id, restarted_ms);
            (rows.len() >= 3).then_some(rows)
        },
    );
    assert_new_settings(&rows);
}
