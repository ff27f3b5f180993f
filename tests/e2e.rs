//! The whole path on the digit model: a fleet server and two real agent processes on
//! halves of the MNIST test set, over the embedded broker and over Mosquitto.

mod common;

use std::time::Duration;

use common::{Workspace, free_port, model_card_accuracy, unique_device_id, wait_for};

/// Images in the MNIST test set; the two agents together classify each once.
const TEST_IMAGES: i64 = 10_000;

/// Runs two agents, each on one half of the test set for one pass, and checks what the
/// server stored: every message, no sequence gaps, and the model card's accuracy.
fn two_devices_report_everything(
    device_broker: &str,
    server: common::Server,
    workspace: &Workspace,
) -> [String; 2] {
    let ids = [unique_device_id("e2e-a"), unique_device_id("e2e-b")];
    let mut devices: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(index, id)| {
            let shard = format!("{index}/2");
            workspace.start_device(
                id,
                device_broker,
                &[
                    "--shard",
                    &shard,
                    "--rate",
                    "0",
                    "--passes",
                    "1",
                    "--interval",
                    "0.5",
                ],
            )
        })
        .collect();

    let totals = wait_for(
        Duration::from_secs(180),
        "all 10,000 inferences to be stored",
        || {
            for device in &mut devices {
                assert!(device.is_running(), "{} exited early", device.name);
            }
            let entries: Vec<_> = ids.iter().filter_map(|id| server.device(id)).collect();
            let inferences: i64 = entries
                .iter()
                .map(|d| d["inferences"].as_i64().unwrap())
                .sum();
            (entries.len() == 2 && inferences == TEST_IMAGES).then_some(entries)
        },
    );

    for device in &mut devices {
        let status = device.terminate();
        assert!(status.success(), "{} exited with {status}", device.name);
    }

    let (mut labeled, mut correct) = (0, 0);
    for (id, entry) in ids.iter().zip(&totals) {
        assert_eq!(entry["gaps"], 0, "gaps reported for {id}: {entry}");
        assert_eq!(entry["input_errors"], 0, "{entry}");
        labeled += entry["labeled"].as_i64().unwrap();
        correct += entry["correct"].as_i64().unwrap();

        let seqs = server.stored_seqs(id);
        let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
        assert_eq!(seqs, expected, "sequence numbers of {id} are not 1..=n");
    }
    assert_eq!(labeled, TEST_IMAGES);
    let messages: i64 = totals.iter().map(|d| d["messages"].as_i64().unwrap()).sum();
    let stored = server.metric("fleet_ingest_messages_total{outcome=\"stored\"}");
    assert!(
        stored >= messages as f64,
        "/metrics counts {stored} stored, the API {messages}"
    );
    let accuracy = 100.0 * correct as f64 / labeled as f64;
    let card = model_card_accuracy("digit-cnn");
    assert!(
        (accuracy - card).abs() <= 0.5,
        "stored accuracy {accuracy:.2}% vs model card {card:.2}%"
    );

    // After a clean stop the retained status reads offline.
    wait_for(
        Duration::from_secs(20),
        "offline status of both devices",
        || {
            ids.iter()
                .all(|id| server.device(id).is_some_and(|d| d["state"] == "offline"))
                .then_some(())
        },
    );
    ids
}

#[test]
fn embedded_broker_end_to_end() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    two_devices_report_everything(&broker, server, &workspace);
}

#[test]
fn mosquitto_end_to_end() {
    let workspace = Workspace::new();
    let broker = "mqtt://127.0.0.1:1883";
    assert!(
        std::net::TcpStream::connect("127.0.0.1:1883").is_ok(),
        "Mosquitto is not listening on 127.0.0.1:1883; start it with `mosquitto -d -c /etc/mosquitto/mosquitto.conf`"
    );
    let server = workspace.start_server(Some(broker), free_port());
    let ids = two_devices_report_everything(broker, server, &workspace);
    common::clear_retained_status("127.0.0.1", 1883, &ids);
}

#[test]
fn agent_waits_for_an_unreachable_broker() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let id = unique_device_id("late-broker");
    // The server's database is chosen now, so the device can be provisioned in it
    // before the server starts.
    workspace.embedded_database(mqtt_port);
    let mut device = workspace.start_device(&id, &broker, &["--rate", "50", "--interval", "0.5"]);

    std::thread::sleep(Duration::from_secs(3));
    assert!(
        device.is_running(),
        "the agent gave up on an unreachable broker"
    );

    let server = workspace.start_server(None, mqtt_port);
    let entry = wait_for(
        Duration::from_secs(60),
        "telemetry after the broker appeared",
        || {
            server
                .device(&id)
                .filter(|d| d["inferences"].as_i64().unwrap_or(0) > 0)
        },
    );
    assert_eq!(entry["state"], "online");
    assert!(device.terminate().success());
}

#[test]
fn undecodable_image_is_skipped_and_counted() {
    let workspace = Workspace::new();
    let photos = workspace.path("photos");
    std::fs::create_dir(&photos).unwrap();
    let source = common::repo().join("models/efficientnet-lite0/images");
    for name in ["imagenet_00_243.jpg", "imagenet_01_559.jpg"] {
        std::fs::copy(source.join(name), photos.join(name)).unwrap();
    }
    std::fs::write(photos.join("broken_7.jpg"), b"\xff\xd8\xff\xe0 truncated").unwrap();

    let mqtt_port = free_port();
    let server = workspace.start_server(None, mqtt_port);
    let id = unique_device_id("bad-image");
    let secret = workspace.provision_device(std::path::Path::new(&server.database), &id);
    let mut device = std::process::Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "device",
            "--device-id",
            &id,
            "--broker",
            &format!("mqtt://127.0.0.1:{mqtt_port}"),
        ])
        .arg("--bundle")
        .arg(workspace.bundle())
        .arg("--public-key")
        .arg(workspace.public_key())
        .arg("--input")
        .arg(&photos)
        .args(["--passes", "1", "--rate", "0", "--interval", "0.5"])
        .args(["--username", &id, "--password-file"])
        .arg(secret)
        .arg("--state-dir")
        .arg(workspace.path("state"))
        .spawn()
        .map(|child| common::Process {
            name: id.clone(),
            child,
        })
        .unwrap();

    let entry = wait_for(
        Duration::from_secs(60),
        "one pass over the photo folder",
        || {
            server.device(&id).filter(|d| {
                d["inferences"].as_i64().unwrap_or(0) + d["input_errors"].as_i64().unwrap_or(0) >= 3
            })
        },
    );
    assert_eq!(entry["inferences"], 2, "{entry}");
    assert_eq!(entry["input_errors"], 1, "{entry}");
    assert!(device.is_running(), "a bad image stopped the agent");
    assert!(device.terminate().success());
}

#[test]
fn busy_mqtt_port_is_an_error() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let _first = workspace.start_server(None, mqtt_port);

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["server", "--mqtt-listen", &format!("127.0.0.1:{mqtt_port}")])
        .args(["--http", &format!("127.0.0.1:{}", free_port())])
        .arg("--database")
        .arg(workspace.path("second.db"))
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "a second broker started on a taken port"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
}
