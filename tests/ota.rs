//! Over-the-air updates with real processes: a fleet server with its embedded broker, a
//! device agent, and a proxy that cuts or stalls downloads. The agent starts on the
//! digit CNN and is updated to the distilled digit student.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::proxy::{Fault, FaultyProxy};
use common::{Process, Server, Workspace, fleet, free_port, path_str, unique_device_id, wait_for};
use serde_json::{Value, json};

/// A server behind a faulty proxy, its embedded broker, and one agent taking updates
/// through the proxy.
struct Fleet {
    workspace: Workspace,
    server: Server,
    proxy: FaultyProxy,
    broker: String,
    device_id: String,
}

impl Fleet {
    fn start(name: &str) -> Fleet {
        let workspace = Workspace::new();
        let proxy = FaultyProxy::start();
        let mqtt_port = free_port();
        let public_url = proxy.url();
        let server = workspace.start_server_with(None, mqtt_port, &["--public-url", &public_url]);
        let http = server.base.trim_start_matches("http://");
        proxy.forward_to(http.parse().expect("server address"));
        Fleet {
            workspace,
            server,
            proxy,
            broker: format!("mqtt://127.0.0.1:{mqtt_port}"),
            device_id: unique_device_id(name),
        }
    }

    /// Starts the agent with telemetry every `interval` seconds. The backlog drains at
    /// twice the telemetry rate, so a long interval leaves seconds between the switch
    /// and the commit of an update.
    fn start_device(&self, interval: &str) -> Process {
        let server = self.proxy.url();
        self.workspace.start_device(
            &self.device_id,
            &self.broker,
            &[
                "--server",
                &server,
                "--interval",
                interval,
                "--rate",
                "20",
                "--drain-rate",
                "0.1",
                "--commit-timeout",
                "120",
            ],
        )
    }

    /// Builds a bundle of `recipe` signed with `key` into `out`.
    fn build_bundle(&self, recipe: &str, key: &Path, out: &str) -> PathBuf {
        let out = self.workspace.path(out);
        let recipe = common::repo().join(recipe);
        let output = fleet(&[
            "compress",
            "bundle",
            path_str(&recipe),
            "--key",
            path_str(key),
            "--out",
            path_str(&out),
            "--skip-evaluation",
        ]);
        assert!(
            output.status.success(),
            "bundle {}: {}",
            recipe.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        out
    }

    /// Builds the digit student bundle, signed with the fleet's key.
    fn student_bundle(&self) -> PathBuf {
        let key = self.workspace.path("keys/fleet.key");
        self.build_bundle("models/digit-student/bundle.toml", &key, "student")
    }

    /// Uploads a bundle folder and returns its archive's SHA-256 and size.
    fn upload(&self, bundle: &Path) -> (String, u64) {
        let mut archive = Vec::new();
        fleet_bundle::archive::pack(bundle, &mut archive).expect("pack the bundle");
        let response: Value = ureq::post(&format!("{}/api/bundles", self.server.base))
            .set("Authorization", &format!("Bearer {}", self.server.token))
            .send_bytes(&archive)
            .expect("upload the bundle")
            .into_json()
            .expect("JSON body");
        let sha256 = response["sha256"].as_str().expect("sha256").to_string();
        (sha256, archive.len() as u64)
    }

    /// Sends an update of `sha256` to the device and returns its update id.
    fn send_update(&self, sha256: &str) -> String {
        let response: Value = ureq::post(&format!("{}/api/updates", self.server.base))
            .set("Authorization", &format!("Bearer {}", self.server.token))
            .send_json(json!({ "bundle": sha256, "devices": [self.device_id] }))
            .expect("send the update")
            .into_json()
            .expect("JSON body");
        let updates = response["updates"].as_array().expect("created updates");
        assert_eq!(updates.len(), 1, "{response}");
        updates[0]["update_id"]
            .as_str()
            .expect("update id")
            .to_string()
    }

    /// Waits until the update reaches a final stage and returns its record with events.
    fn wait_for_end(&self, update_id: &str, timeout: Duration) -> Value {
        wait_for(timeout, &format!("update {update_id} to end"), || {
            let update = self.server.get(&format!("/api/updates/{update_id}"));
            let stage = update["stage"].as_str().unwrap_or_default().to_string();
            ["committed", "already_installed", "failed", "rolled_back"]
                .contains(&stage.as_str())
                .then_some(update)
        })
    }

    /// Waits for telemetry that names `model` and returns the device's entry.
    fn wait_for_model(&self, model: &str) -> Value {
        wait_for(
            Duration::from_secs(60),
            &format!("telemetry from {model}"),
            || {
                self.server
                    .device(&self.device_id)
                    .filter(|device| device["model_name"] == model)
            },
        )
    }

    fn state_file(&self) -> PathBuf {
        self.workspace
            .path(&format!("state/{}/bundles/state.json", self.device_id))
    }
}

fn stages(update: &Value) -> Vec<String> {
    update["events"]
        .as_array()
        .expect("event history")
        .iter()
        .map(|event| event["stage"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn detail_of(update: &Value, stage: &str) -> String {
    update["events"]
        .as_array()
        .expect("event history")
        .iter()
        .find(|event| event["stage"] == stage)
        .and_then(|event| event["detail"].as_str())
        .unwrap_or_else(|| panic!("no {stage} event in {update}"))
        .to_string()
}

#[test]
fn update_resumes_commits_and_repeats() {
    let fleet = Fleet::start("ota-commit");
    let mut device = fleet.start_device("1");
    fleet.wait_for_model("digit-cnn");

    let student = fleet.student_bundle();
    let (sha256, size) = fleet.upload(&student);
    fleet.proxy.inject(Fault::Close {
        after: size as usize / 2,
    });
    let update_id = fleet.send_update(&sha256);
    let update = fleet.wait_for_end(&update_id, Duration::from_secs(90));
    assert_eq!(update["stage"], "committed", "{update}");
    assert_eq!(
        stages(&update),
        [
            "accepted",
            "downloaded",
            "verified",
            "health_checked",
            "switched",
            "committed"
        ],
        "{update}"
    );
    let downloads = fleet.proxy.downloads();
    assert_eq!(
        downloads.len(),
        2,
        "one cut and one resumed request: {downloads:?}"
    );
    assert!(
        downloads[1].to_ascii_lowercase().contains("range: bytes="),
        "the second request resumes: {}",
        downloads[1]
    );
    assert!(detail_of(&update, "downloaded").contains("2 request(s)"));
    assert!(detail_of(&update, "health_checked").contains("4 reference inputs reproduced"));
    fleet.wait_for_model("digit-student");

    // Sent again, the same archive changes nothing.
    let repeat = fleet.send_update(&sha256);
    let repeated = fleet.wait_for_end(&repeat, Duration::from_secs(30));
    assert_eq!(repeated["stage"], "already_installed", "{repeated}");
    assert_eq!(fleet.proxy.downloads().len(), 2, "nothing downloaded again");

    // The new model survives a restart.
    assert!(device.terminate().success());
    let _device = fleet.start_device("1");
    let state: Value = serde_json::from_slice(&std::fs::read(fleet.state_file()).unwrap()).unwrap();
    assert_eq!(state["current"]["sha256"], sha256.as_str(), "{state}");
    assert_eq!(state["trial"], Value::Null, "{state}");
    wait_for(Duration::from_secs(30), "online with the student", || {
        fleet
            .server
            .device(&fleet.device_id)
            .filter(|d| d["state"] == "online" && d["model_name"] == "digit-student")
    });
}

#[test]
fn update_rejects_damaged_and_foreign_bundles() {
    let fleet = Fleet::start("ota-reject");
    let _device = fleet.start_device("1");
    fleet.wait_for_model("digit-cnn");

    // A bundle signed by a key the device does not trust.
    let other_keys = fleet.workspace.path("other-keys");
    let output = common::fleet(&["compress", "keygen", "--out", path_str(&other_keys)]);
    assert!(output.status.success());
    let foreign = fleet.build_bundle(
        "models/digit-student/bundle.toml",
        &other_keys.join("fleet.key"),
        "foreign",
    );
    let (foreign_sha, _) = fleet.upload(&foreign);
    let update = fleet.wait_for_end(&fleet.send_update(&foreign_sha), Duration::from_secs(60));
    assert_eq!(update["stage"], "failed", "{update}");
    let reason = detail_of(&update, "failed");
    assert!(reason.contains("signature check failed"), "{reason}");

    // An archive with one byte flipped on the server's disk after upload.
    let (sha256, _) = fleet.upload(&fleet.student_bundle());
    let stored = find_file(fleet.workspace.dir.path(), &format!("{sha256}.tar"))
        .expect("the server stores the archive under its hash");
    let mut bytes = std::fs::read(&stored).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&stored, bytes).unwrap();
    let update = fleet.wait_for_end(&fleet.send_update(&sha256), Duration::from_secs(60));
    assert_eq!(update["stage"], "failed", "{update}");
    let reason = detail_of(&update, "failed");
    assert!(reason.contains("SHA-256"), "{reason}");

    // Neither attempt touched the running model, and the agent still reports.
    let seen = fleet.server.device(&fleet.device_id).unwrap()["inferences"]
        .as_i64()
        .unwrap();
    wait_for(Duration::from_secs(30), "more inferences", || {
        fleet
            .server
            .device(&fleet.device_id)
            .filter(|d| d["model_name"] == "digit-cnn" && d["inferences"].as_i64().unwrap() > seen)
    });
    let leftovers = std::fs::read_dir(
        fleet
            .workspace
            .path(&format!("state/{}/bundles", fleet.device_id)),
    )
    .unwrap()
    .flatten()
    .filter(|entry| entry.path().is_dir() && entry.file_name() != "staging")
    .count();
    assert_eq!(leftovers, 0, "rejected bundles are removed");
}

#[test]
fn update_survives_agent_kills() {
    let fleet = Fleet::start("ota-kill");
    let mut device = fleet.start_device("1");
    fleet.wait_for_model("digit-cnn");
    let (sha256, size) = fleet.upload(&fleet.student_bundle());

    // Killed during a stalled download: the restarted agent gets the command again from
    // the server, resumes where the download stopped and commits.
    fleet.proxy.inject(Fault::Stall {
        after: size as usize / 2,
    });
    let update_id = fleet.send_update(&sha256);
    let part = fleet.workspace.path(&format!(
        "state/{}/bundles/staging/{sha256}.part",
        fleet.device_id
    ));
    wait_for(
        Duration::from_secs(60),
        "half of the archive on disk",
        || {
            std::fs::metadata(&part)
                .ok()
                .filter(|metadata| metadata.len() > 0)
                .map(|_| ())
        },
    );
    device.child.kill().unwrap();
    device.child.wait().unwrap();
    let mut device = fleet.start_device("1");
    let update = fleet.wait_for_end(&update_id, Duration::from_secs(90));
    assert_eq!(update["stage"], "committed", "{update}");
    let downloaded = detail_of(&update, "downloaded");
    assert!(
        !downloaded.contains("resumed from byte 0"),
        "the restarted download resumes: {downloaded}"
    );
    fleet.wait_for_model("digit-student");

    // Killed between the switch and the commit: the agent restarts on the student.
    // Records leave at one per 5 s, so the commit comes seconds after the switch.
    assert!(device.terminate().success());
    let mut device = fleet.start_device("10");
    let cnn = fleet.build_bundle(
        "models/digit-cnn/bundle.toml",
        &fleet.workspace.path("keys/fleet.key"),
        "cnn-again",
    );
    let (cnn_sha, _) = fleet.upload(&cnn);
    let back_id = fleet.send_update(&cnn_sha);
    wait_for(Duration::from_secs(120), "the update on trial", || {
        let state = std::fs::read(fleet.state_file()).ok()?;
        let state: Value = serde_json::from_slice(&state).ok()?;
        (state["trial"]["update_id"] == back_id.as_str()).then_some(())
    });
    device.child.kill().unwrap();
    device.child.wait().unwrap();
    let _device = fleet.start_device("1");
    let update = fleet.wait_for_end(&back_id, Duration::from_secs(60));
    assert_eq!(update["stage"], "rolled_back", "{update}");
    assert!(
        detail_of(&update, "rolled_back").contains("stopped before the update was committed"),
        "{update}"
    );
    let state: Value = serde_json::from_slice(&std::fs::read(fleet.state_file()).unwrap()).unwrap();
    assert_eq!(state["current"]["sha256"], sha256.as_str(), "{state}");
    assert_eq!(state["trial"], Value::Null, "{state}");
    fleet.wait_for_model("digit-student");
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name() == name {
            return Some(path);
        }
    }
    None
}
