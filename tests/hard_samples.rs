//! Hard samples with real processes: a fleet server with its embedded broker and an
//! agent whose confidence threshold is so high that many digits count as unsure. The
//! samples reach `GET /api/samples` as decodable PNGs, and samples captured while the
//! server is down are uploaded once it is back on the same database and port.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::{Api, Workspace, free_port, unique_device_id, wait_for};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Returns the records the server lists for one device.
fn samples_of(api: &Api, device_id: &str) -> Vec<Value> {
    api.get(&format!("/api/samples?device={device_id}&limit=10000"))
        .as_array()
        .expect("a JSON array of samples")
        .clone()
}

/// Returns the bytes and content type of a stored sample.
fn sample_content(api: &Api, sha256: &str) -> (Vec<u8>, String) {
    let response = ureq::get(&format!("{}/api/samples/{sha256}", api.base))
        .set("Authorization", &format!("Bearer {}", api.token))
        .call()
        .unwrap_or_else(|error| panic!("GET /api/samples/{sha256}: {error}"));
    let content_type = response.content_type().to_owned();
    let mut bytes = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut bytes)
        .expect("read the sample");
    (bytes, content_type)
}

/// Returns the SHA-256 of every sample waiting in an agent's hard-sample folder, from
/// the file names `{sequence}-{sha256}.sample`.
fn waiting_samples(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".sample")?;
            Some(stem.split_once('-')?.1.to_owned())
        })
        .collect()
}

#[test]
fn hard_samples_survive_server_outage() {
    let workspace = Workspace::new();
    let mqtt_port = free_port();
    let http_port = free_port();
    let mut server = workspace.start_server_on(None, mqtt_port, http_port, &[]);
    let device_id = unique_device_id("hard-samples");
    let broker = format!("mqtt://127.0.0.1:{mqtt_port}");
    let base = server.base.clone();
    let mut device = workspace.start_device(
        &device_id,
        &broker,
        &[
            "--server",
            &base,
            "--confidence-threshold",
            "0.99999",
            "--rate",
            "20",
            "--hard-sample-rate",
            "600",
        ],
    );
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(workspace.bundle().join(fleet_bundle::MANIFEST_FILE)).unwrap(),
    )
    .unwrap();

    // Samples arrive with the device id from the credential and the running model.
    let records = wait_for(Duration::from_secs(60), "three hard samples", || {
        let records = samples_of(&server.api, &device_id);
        (records.len() >= 3).then_some(records)
    });
    for record in &records {
        assert_eq!(record["device_id"], device_id.as_str(), "{record}");
        assert_eq!(record["model_name"], "digit-cnn", "{record}");
        assert_eq!(record["model_version"], manifest["version"], "{record}");
        assert_eq!(record["content_type"], "image/png", "{record}");
        let confidence = record["confidence"].as_f64().expect("confidence");
        assert!(confidence < 0.99999, "{record}");
        let source = record["source"].as_str().expect("source");
        assert!(source.starts_with("t10k-images-idx3-ubyte.gz#"), "{record}");
        let true_class = record["true_class"].as_i64().expect("MNIST has labels");
        assert!((0..10).contains(&true_class), "{record}");
    }
    let sha256 = records[0]["sha256"].as_str().unwrap();
    let (png, content_type) = sample_content(&server.api, sha256);
    assert_eq!(content_type, "image/png");
    assert_eq!(hex_sha256(&png), sha256, "the file is named by its content");
    let image = image::load_from_memory(&png).expect("a decodable PNG");
    assert_eq!((image.width(), image.height()), (28, 28));
    let by_model = server.get("/api/samples?model=digit-cnn&limit=2");
    assert_eq!(by_model.as_array().map(Vec::len), Some(2), "{by_model}");

    // Samples captured while the server is down wait in the agent's folder.
    assert!(server.process.terminate().success());
    let folder = workspace.path(&format!("state/{device_id}/hard-samples"));
    let waiting = wait_for(
        Duration::from_secs(60),
        "three samples waiting while the server is down",
        || {
            let waiting = waiting_samples(&folder);
            (waiting.len() >= 3).then_some(waiting)
        },
    );
    assert!(
        device.is_running(),
        "the agent carries on without the server"
    );

    // Back on the same database and port, the server receives every one of them.
    let server = workspace.start_server_on(None, mqtt_port, http_port, &[]);
    wait_for(
        Duration::from_secs(90),
        "the samples captured during the outage on the server",
        || {
            let stored: HashSet<String> = samples_of(&server.api, &device_id)
                .iter()
                .map(|record| record["sha256"].as_str().unwrap().to_owned())
                .collect();
            waiting
                .iter()
                .all(|sha256| stored.contains(sha256))
                .then_some(())
        },
    );
    let stored = samples_of(&server.api, &device_id);
    let unique: HashSet<&str> = stored
        .iter()
        .map(|record| record["sha256"].as_str().unwrap())
        .collect();
    assert_eq!(unique.len(), stored.len(), "each content is stored once");
    for sha256 in &waiting {
        let (bytes, _) = sample_content(&server.api, sha256);
        assert_eq!(&hex_sha256(&bytes), sha256);
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
