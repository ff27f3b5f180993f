//! Over-the-air updates through a real server: bundle uploads and downloads over HTTP,
//! install commands and progress events over the embedded MQTT broker, with device
//! and operator credentials. The store's update SQL on both databases is covered in
//! `store.rs`.

mod fleet_support;
mod gateway_support;

use std::path::Path;
use std::time::Instant;

use fleet_server::updates::UpdateSettings;
use fleet_server::updates::client::FleetClient;
use fleet_server::updates::http::CreateUpdates;
use fleet_support::{TestDevice, TestServer, WAIT};
use fleet_wire::{Command, EventKind, InstallBundle, UpdateEvent, UpdateStage};
use gateway_support::{TestBundle, metric};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Requests of the bundle and update routes.
impl TestServer {
    async fn upload(&self, archive: Vec<u8>, token: Option<&str>) -> (StatusCode, Value) {
        let request = self
            .http
            .post(format!("{}/api/bundles", self.base))
            .body(archive);
        let (status, _, body) = self.send(request, token).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn post_updates(&self, body: &Value, token: Option<&str>) -> (StatusCode, Value) {
        let request = self
            .http
            .post(format!("{}/api/updates", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        let (status, _, body) = self.send(request, token).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// Uploads `bundle` as the operator and returns its SHA-256.
    async fn upload_ok(&self, bundle: &TestBundle) -> String {
        let (status, body) = self.upload(bundle.archive(), Some(&self.token)).await;
        assert!(status.is_success(), "{status}: {body}");
        body["sha256"].as_str().unwrap().to_owned()
    }

    /// Starts an update of `sha256` on `devices` and returns the response body.
    async fn send_update(&self, sha256: &str, devices: &[&str]) -> Value {
        let request = json!({ "bundle": sha256, "devices": devices });
        let (status, body) = self.post_updates(&request, Some(&self.token)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Waits until update `id` reaches `stage` and returns its detail.
    async fn wait_stage(&self, id: &str, stage: &str) -> Value {
        let started = Instant::now();
        loop {
            let (status, body) = self
                .get_json(&format!("/api/updates/{id}"), Some(&self.token))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["stage"] == stage {
                return body;
            }
            assert!(
                started.elapsed() < WAIT,
                "update {id} did not reach {stage} within {WAIT:?}: {body:#}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Install commands and update events of a test device.
impl TestDevice {
    /// Returns the next command the device receives, which must be an install command.
    async fn next_install(&mut self) -> InstallBundle {
        match self.next_command().await {
            Command::InstallBundle(install) => install,
            other => panic!("expected an install command, got {other:?}"),
        }
    }

    async fn publish_event(&self, update_id: &str, sha256: &str, stage: UpdateStage) {
        self.publish_event_as(&self.id, update_id, sha256, stage)
            .await;
    }

    /// Publishes an update event on this device's topic whose payload names `device_id`.
    async fn publish_event_as(
        &self,
        device_id: &str,
        update_id: &str,
        sha256: &str,
        stage: UpdateStage,
    ) {
        let update = UpdateEvent {
            update_id: update_id.to_owned(),
            sha256: sha256.to_owned(),
            version: "test".into(),
            stage,
            detail: format!("test reached {}", stage.as_str()),
        };
        self.publish_event_kind(device_id, EventKind::Update(update))
            .await;
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Lists the file names in a folder.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_stores_archive_once() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let bundle = TestBundle::new();
    let archive = bundle.archive();

    let (status, first) = server.upload(archive.clone(), Some(&server.token)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let sha256 = sha256_hex(&archive);
    assert_eq!(first["sha256"], sha256.as_str());
    assert_eq!(first["name"], "digit-cnn");
    assert_eq!(first["version"], "1.0.0");
    assert_eq!(first["size"], archive.len() as u64);
    assert_eq!(first["uploaded_by"], "token:script");

    let (status, second) = server.upload(archive.clone(), Some(&server.token)).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(second, first);

    let (status, listed) = server.get_json("/api/bundles", Some(&server.token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed, json!([first]));
    let stored = std::fs::read(server.bundle_dir().join(format!("{sha256}.tar"))).unwrap();
    assert_eq!(stored, archive);
    assert_eq!(file_names(&server.bundle_dir()), [format!("{sha256}.tar")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_checks_signature_with_configured_key() {
    let (secret, public) = fleet_bundle::generate_key_pair().unwrap();
    let trusted = TestBundle::signed(&secret, &public, "2.0.0");
    let server = TestServer::start(UpdateSettings {
        public_key: Some(trusted.public_key()),
        ..UpdateSettings::default()
    })
    .await;

    let other_key = TestBundle::new();
    let (status, body) = server
        .upload(other_key.archive(), Some(&server.token))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("digit-cnn 1.0.0 failed the signature check"),
        "{message}"
    );
    assert!(
        message.contains("signed with a key other than"),
        "{message}"
    );
    assert!(!message.contains(".verify-"), "{message}");

    // The manifest changed after signing, as if tampered with on the way.
    let tampered = TestBundle::signed(&secret, &public, "2.0.1");
    let manifest_path = tampered.bundle().join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::write(&manifest_path, manifest.replace("2.0.1", "2.0.9")).unwrap();
    let (status, body) = server.upload(tampered.archive(), Some(&server.token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("signature check failed"),
        "{body}"
    );

    let (status, body) = server.upload(trusted.archive(), Some(&server.token)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["version"], "2.0.0");
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "fleet_bundle_uploads_rejected_total"),
        Some(2.0)
    );
    let tar_files: Vec<String> = file_names(&server.bundle_dir())
        .into_iter()
        .filter(|name| name.ends_with(".tar"))
        .collect();
    assert_eq!(tar_files.len(), 1, "{tar_files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rejects_garbage_empty_and_oversized() {
    let server = TestServer::start(UpdateSettings {
        max_bundle_bytes: 4096,
        ..UpdateSettings::default()
    })
    .await;

    let garbage = b"this is not a tar archive".repeat(40);
    let (status, body) = server.upload(garbage, Some(&server.token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with("invalid bundle archive: not a readable tar archive: "),
        "{message}"
    );
    let bundle_dir = server.bundle_dir().display().to_string();
    assert!(!message.contains(&bundle_dir), "{message}");

    let (status, body) = server.upload(Vec::new(), Some(&server.token)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("empty"), "{body}");

    // Small enough that the server reads it whole, which keeps the connection open for
    // the response instead of resetting it with unread data.
    let oversized = TestBundle::new().archive()[..5000].to_vec();
    let (status, body) = server.upload(oversized, Some(&server.token)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("limit of 4096 bytes"),
        "{body}"
    );

    let (_, listed) = server.get_json("/api/bundles", Some(&server.token)).await;
    assert_eq!(listed, json!([]));
    assert!(file_names(&server.bundle_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_serves_whole_archive_and_ranges() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let bundle = TestBundle::new();
    let archive = bundle.archive();
    let sha256 = server.upload_ok(&bundle).await;
    let url = format!("{}/api/bundles/{sha256}/archive", server.base);
    let size = archive.len();
    let token = Some(server.device_secret.as_str());

    let (status, headers, body) = server.send(server.http.get(&url), token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, archive);
    assert_eq!(headers["content-length"], size.to_string().as_str());
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers["content-type"], "application/x-tar");
    assert_eq!(headers["etag"], format!("\"{sha256}\"").as_str());

    let ranges = [
        ("bytes=10-99".to_string(), 10, 99),
        (format!("bytes={}-", size - 100), size - 100, size - 1),
        ("bytes=-16".to_string(), size - 16, size - 1),
        (format!("bytes=5-{}", size + 1000), 5, size - 1),
    ];
    for (range, start, end) in ranges {
        let request = server.http.get(&url).header("range", &range);
        let (status, headers, body) = server.send(request, token).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            headers["content-range"],
            format!("bytes {start}-{end}/{size}").as_str(),
            "{range}"
        );
        assert_eq!(
            headers["content-length"],
            (end - start + 1).to_string().as_str()
        );
        assert_eq!(body, archive[start..=end], "{range}");
    }

    let request = server
        .http
        .get(&url)
        .header("range", format!("bytes={size}-"));
    let (status, headers, _) = server.send(request, token).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers["content-range"], format!("bytes */{size}").as_str());

    let unknown = format!("{}/api/bundles/{}/archive", server.base, "0".repeat(64));
    let (status, _, _) = server.send(server.http.get(&unknown), token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let malformed = format!("{}/api/bundles/not-a-digest/archive", server.base);
    let (status, _, body) = server.send(server.http.get(&malformed), token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("invalid SHA-256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_check_credentials() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let bundle = TestBundle::new();
    let sha256 = server.upload_ok(&bundle).await;
    let archive_path = format!("/api/bundles/{sha256}/archive");
    let device = Some(server.device_secret.as_str());

    // Bodies are small, so the server reads them whole before it rejects them; a
    // rejected multi-megabyte upload may end in a connection reset instead.
    let small_body = b"not checked before the credentials".to_vec();
    let (status, _) = server.upload(small_body.clone(), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for path in ["/api/bundles", "/api/updates", archive_path.as_str()] {
        let (status, _) = server.get_json(path, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _) = server.get_json(&archive_path, Some("wrong-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let request = json!({ "bundle": sha256, "devices": ["dev-1"] });
    let (status, _) = server.post_updates(&request, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, _, body) = server
        .send(
            server.http.get(format!("{}{archive_path}", server.base)),
            device,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, bundle.archive());
    let (status, body) = server.upload(small_body, device).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    for path in ["/api/bundles", "/api/updates"] {
        let (status, _) = server.get_json(path, device).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
    }
    let (status, _) = server.post_updates(&request, device).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_publishes_install_command() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;
    let bundle = TestBundle::new();
    let archive = bundle.archive();
    let sha256 = server.upload_ok(&bundle).await;

    let created = server.send_update(&sha256, &["dev-1"]).await;
    let update = &created["updates"][0];
    assert_eq!(created["updates"].as_array().unwrap().len(), 1);
    assert_eq!(update["device_id"], "dev-1");
    assert_eq!(update["stage"], "pending");
    assert_eq!(update["sha256"], sha256.as_str());
    assert_eq!(update["created_by"], "token:script");
    assert_eq!(created["superseded"], json!([]));
    assert_eq!(created["unsent"], json!([]));

    let install = device.next_install().await;
    assert_eq!(install.update_id, update["update_id"].as_str().unwrap());
    assert_eq!(install.sha256, sha256);
    assert_eq!(install.name, "digit-cnn");
    assert_eq!(install.version, "1.0.0");
    assert_eq!(install.size, archive.len() as u64);
    assert_eq!(
        install.url,
        format!("{}/api/bundles/{sha256}/archive", server.base)
    );

    // The device fetches the archive from the command's URL with its own credential.
    let request = server.http.get(&install.url);
    let (status, _, body) = server.send(request, Some(&server.device_secret)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256_hex(&body), install.sha256);
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fleet_update_commands_sent_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_request_selects_devices() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let sha256 = server.upload_ok(&TestBundle::new()).await;
    let token = Some(server.token.as_str());

    let request = json!({ "bundle": sha256, "group": "dev-*" });
    let (status, body) = server.post_updates(&request, token).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let devices: Vec<&str> = body["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|update| update["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(devices, ["dev-1", "dev-2"]);

    let request = json!({ "bundle": sha256, "devices": ["dev-2", "dev-2"] });
    let (status, body) = server.post_updates(&request, token).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["updates"].as_array().unwrap().len(), 1);
    assert_eq!(body["superseded"][0]["device_id"], "dev-2");

    let rejected = [
        (
            json!({ "bundle": sha256, "group": "cam-?" }),
            StatusCode::BAD_REQUEST,
            "no known device matches group",
        ),
        (
            json!({ "bundle": sha256, "devices": ["dev-9"] }),
            StatusCode::NOT_FOUND,
            "devices not found: dev-9",
        ),
        (
            json!({ "bundle": sha256, "devices": ["bad/id"] }),
            StatusCode::BAD_REQUEST,
            "contains '/'",
        ),
        (
            json!({ "bundle": sha256, "devices": [] }),
            StatusCode::BAD_REQUEST,
            "devices is empty",
        ),
        (
            json!({ "bundle": sha256 }),
            StatusCode::BAD_REQUEST,
            "missing devices or group",
        ),
        (
            json!({ "bundle": sha256, "devices": ["dev-1"], "group": "dev-*" }),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            json!({ "bundle": "0".repeat(64), "devices": ["dev-1"] }),
            StatusCode::NOT_FOUND,
            "not found; upload it first",
        ),
        (
            json!({ "bundle": "abc", "devices": ["dev-1"] }),
            StatusCode::BAD_REQUEST,
            "invalid SHA-256",
        ),
        (
            json!({ "bundle": sha256, "device": ["dev-1"] }),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
    ];
    for (request, expected, message) in rejected {
        let (status, body) = server.post_updates(&request, token).await;
        assert_eq!(status, expected, "{request}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{request}: {error}");
    }

    let (_, dev2) = server.get_json("/api/updates?device=dev-2", token).await;
    let mut stages: Vec<&str> = dev2
        .as_array()
        .unwrap()
        .iter()
        .map(|update| update["stage"].as_str().unwrap())
        .collect();
    // Both may carry the same creation millisecond, which leaves their order open.
    stages.sort();
    assert_eq!(stages, ["pending", "superseded"]);
    let (_, all) = server.get_json("/api/updates?limit=2", token).await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (status, _) = server.get_json("/api/updates?limit=0", token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = server.get_json("/api/updates/u-unknown", token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_move_update_forward() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;
    let sha256 = server.upload_ok(&TestBundle::new()).await;
    let created = server.send_update(&sha256, &["dev-1"]).await;
    let id = created["updates"][0]["update_id"]
        .as_str()
        .unwrap()
        .to_owned();
    device.next_install().await;

    device
        .publish_event(&id, &sha256, UpdateStage::Accepted)
        .await;
    server.wait_stage(&id, "accepted").await;
    device
        .publish_event(&id, &sha256, UpdateStage::Verified)
        .await;
    server.wait_stage(&id, "verified").await;
    // Behind the current stage: recorded, but the stage stays.
    device
        .publish_event(&id, &sha256, UpdateStage::Downloaded)
        .await;
    device
        .publish_event(&id, &sha256, UpdateStage::Committed)
        .await;
    server.wait_stage(&id, "committed").await;
    // A final stage sticks.
    device
        .publish_event(&id, &sha256, UpdateStage::Failed)
        .await;
    server
        .wait_metric("fleet_update_events_total{outcome=\"stale\"}", 2.0)
        .await;
    // A rollback the agent started on its own names no update.
    device
        .publish_event("", &sha256, UpdateStage::RolledBack)
        .await;
    server
        .wait_metric("fleet_update_events_total{outcome=\"unknown_update\"}", 1.0)
        .await;
    // A payload naming another device than its topic is dropped.
    device
        .publish_event_as("dev-2", &id, &sha256, UpdateStage::RolledBack)
        .await;
    server
        .wait_metric("fleet_ingest_messages_total{outcome=\"rejected\"}", 1.0)
        .await;

    let detail = server.wait_stage(&id, "committed").await;
    assert_eq!(detail["detail"], "test reached committed");
    let stages: Vec<&str> = detail["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["accepted", "verified", "downloaded", "committed", "failed"]
    );
    let first = &detail["events"][0];
    assert_eq!(first["device_id"], "dev-1");
    assert_eq!(first["update_id"], id.as_str());
    assert_eq!(first["detail"], "test reached accepted");
    assert!(first["device_time_ms"].as_i64().unwrap() > 0, "{first}");
    assert!(first["received_ms"].as_i64().unwrap() > 0, "{first}");
    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "fleet_update_events_total{outcome=\"applied\"}"),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_device_gets_unfinished_command_again() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;
    let first_bundle = server.upload_ok(&TestBundle::new()).await;
    let (secret, public) = fleet_bundle::generate_key_pair().unwrap();
    let second_bundle = server
        .upload_ok(&TestBundle::signed(&secret, &public, "1.1.0"))
        .await;

    let first = server.send_update(&first_bundle, &["dev-1"]).await;
    let first_id = first["updates"][0]["update_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(device.next_install().await.update_id, first_id);
    device.publish_online().await;
    let resent = device.next_install().await;
    assert_eq!(resent.update_id, first_id);
    assert_eq!(resent.sha256, first_bundle);

    // A newer update supersedes the unfinished one, which is not sent again.
    let second = server.send_update(&second_bundle, &["dev-1"]).await;
    let second_id = second["updates"][0]["update_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(second["superseded"][0]["update_id"], first_id.as_str());
    assert_eq!(second["superseded"][0]["replaced_by"], second_id.as_str());
    assert_eq!(device.next_install().await.update_id, second_id);
    device.publish_online().await;
    assert_eq!(device.next_install().await.update_id, second_id);
    server.wait_stage(&first_id, "superseded").await;

    // A finished update is not sent again either.
    device
        .publish_event(&second_id, &second_bundle, UpdateStage::Committed)
        .await;
    server.wait_stage(&second_id, "committed").await;
    let third = server.send_update(&first_bundle, &["dev-1"]).await;
    let third_id = third["updates"][0]["update_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(third["superseded"], json!([]));
    assert_eq!(device.next_install().await.update_id, third_id);
    device.publish_online().await;
    assert_eq!(device.next_install().await.update_id, third_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_client_uploads_and_sends() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let bundle = TestBundle::new();
    let bundle_dir = bundle.bundle();
    let expected_sha = sha256_hex(&bundle.archive());
    let base = server.base.clone();
    let token = server.token.clone();

    let (first, second, created, listed, detail) = tokio::task::spawn_blocking(move || {
        let client = FleetClient::new(&base, &token).unwrap();
        let first = client.upload_bundle(&bundle_dir).unwrap();
        let second = client.upload_bundle(&bundle_dir).unwrap();
        let request = CreateUpdates {
            bundle: first.bundle.sha256.clone(),
            devices: None,
            group: Some("dev-?".into()),
        };
        let created = client.create_updates(&request).unwrap();
        let listed = client.updates(Some("dev-2"), 10).unwrap();
        let detail = client.update(&created.updates[1].update_id).unwrap();
        (first, second, created, listed, detail)
    })
    .await
    .unwrap();

    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.bundle.sha256, expected_sha);
    assert_eq!(second.bundle, first.bundle);
    assert_eq!(created.updates.len(), 2);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].device_id, "dev-2");
    assert_eq!(detail.update.update_id, created.updates[1].update_id);
    assert!(detail.events.is_empty());

    let failing = server.base.clone();
    let error = tokio::task::spawn_blocking(move || {
        let client = FleetClient::new(&failing, "wrong-token").unwrap();
        client.bundles().unwrap_err()
    })
    .await
    .unwrap();
    let message = error.to_string();
    assert!(message.contains("returned 401"), "{message}");
    assert!(message.contains("authentication required"), "{message}");
}
