//! Remote configuration through a real server: changes set over HTTP, published as
//! commands on the embedded MQTT broker, acknowledged by a device over MQTT, and sent
//! again when the device comes online. The store's configuration SQL on both databases
//! is covered in `store.rs`.

mod fleet_support;
mod gateway_support;

use std::time::Instant;

use fleet_server::store::remote_config::{ConfigSettings, ConfigStatus};
use fleet_server::updates::UpdateSettings;
use fleet_server::updates::client::FleetClient;
use fleet_support::{TestDevice, TestServer, WAIT};
use fleet_wire::{Command, ConfigAck, EventKind, RemoteConfig};
use gateway_support::{TestBundle, metric};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Requests of the configuration routes.
impl TestServer {
    async fn put_config(
        &self,
        device_id: &str,
        body: &str,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let request = self
            .http
            .put(format!("{}/api/devices/{device_id}/config", self.base))
            .header("content-type", "application/json")
            .body(body.to_owned());
        let (status, _, body) = self.send(request, token).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// Sets a device's configuration as the operator and returns the stored change.
    async fn put_config_ok(&self, device_id: &str, body: Value) -> Value {
        let (status, record) = self
            .put_config(device_id, &body.to_string(), Some(&self.token))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{record}");
        record
    }

    async fn get_config(&self, device_id: &str) -> (StatusCode, Value) {
        self.get_json(
            &format!("/api/devices/{device_id}/config"),
            Some(&self.token),
        )
        .await
    }

    /// Waits until the device's configuration reaches `status` and returns it.
    async fn wait_config_status(&self, device_id: &str, status: &str) -> Value {
        let started = Instant::now();
        loop {
            let (code, record) = self.get_config(device_id).await;
            assert_eq!(code, StatusCode::OK, "{record}");
            if record["status"] == status {
                return record;
            }
            assert!(
                started.elapsed() < WAIT,
                "configuration of {device_id} did not reach {status} within {WAIT:?}: {record}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// Configuration commands and acknowledgements of a test device.
impl TestDevice {
    /// Returns the next command the device receives, which must set its configuration.
    async fn next_config(&mut self) -> RemoteConfig {
        match self.next_command().await {
            Command::SetConfig(config) => config,
            other => panic!("expected a configuration command, got {other:?}"),
        }
    }

    /// Returns the next command the device receives, which must install a bundle, and
    /// its update id.
    async fn next_install_id(&mut self) -> String {
        match self.next_command().await {
            Command::InstallBundle(install) => install.update_id,
            other => panic!("expected an install command, got {other:?}"),
        }
    }

    async fn publish_ack(&self, change_id: &str, applied: bool, detail: &str) {
        let ack = ConfigAck {
            change_id: change_id.to_owned(),
            applied,
            detail: detail.to_owned(),
        };
        self.publish_event_kind(&self.id, EventKind::Config(ack))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_publishes_set_config() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;

    let body = json!({ "confidence_threshold": 0.7, "rate": 2.5, "interval_seconds": 2 });
    let record = server.put_config_ok("dev-1", body).await;
    assert_eq!(record["device_id"], "dev-1");
    assert_eq!(record["status"], "pending");
    assert_eq!(record["detail"], "");
    assert_eq!(record["requested_by"], "token:script");
    assert_eq!(
        record["settings"],
        json!({ "confidence_threshold": 0.7, "rate": 2.5, "interval_seconds": 2.0 })
    );
    assert_eq!(record["created_ms"], record["updated_ms"]);
    let change_id = record["change_id"].as_str().unwrap().to_owned();
    assert!(change_id.starts_with("c-"), "{change_id}");

    let command = device.next_config().await;
    assert_eq!(command.change_id, change_id);
    assert_eq!(command.confidence_threshold, Some(0.7));
    assert_eq!(command.rate, Some(2.5));
    assert_eq!(command.interval_seconds, Some(2.0));
    assert_eq!(command.drain_rate, None);
    assert_eq!(command.commit_timeout_seconds, None);

    let (status, stored) = server.get_config("dev-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored, record);

    // An empty object clears every override, as a new change.
    let cleared = server.put_config_ok("dev-1", json!({})).await;
    assert_eq!(cleared["settings"], json!({}));
    assert_ne!(cleared["change_id"], change_id.as_str());
    let command = device.next_config().await;
    assert_eq!(command.change_id, cleared["change_id"].as_str().unwrap());
    assert_eq!(
        command,
        RemoteConfig {
            change_id: command.change_id.clone(),
            ..RemoteConfig::default()
        }
    );
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fleet_config_commands_sent_total"), Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_rejects_invalid_requests() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let token = Some(server.token.as_str());

    let rejected = [
        (
            r#"{"confidence_threshold": 1.5}"#,
            "invalid confidence_threshold 1.5",
        ),
        (
            r#"{"interval_seconds": 0.01}"#,
            "invalid interval_seconds 0.01",
        ),
        (r#"{"rate": -1}"#, "invalid rate -1"),
        (r#"{"drain_rate": 0}"#, "invalid drain_rate 0"),
        (
            r#"{"commit_timeout_seconds": 1e9}"#,
            "invalid commit_timeout_seconds",
        ),
        (r#"{"rates": 2}"#, "unknown field `rates`"),
        (r#"{"change_id": "c-mine"}"#, "unknown field `change_id`"),
        (r#"{"rate": "fast"}"#, "rate: invalid type"),
        (r#"{"rate": 2"#, "invalid configuration request"),
        ("", "invalid configuration request"),
    ];
    for (body, message) in rejected {
        let (status, reply) = server.put_config("dev-1", body, token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{body}: {error}");
    }
    let (status, reply) = server.put_config("bad%3Fid", "{}", token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("contains '?'"),
        "{reply}"
    );

    let (status, _) = server.get_config("dev-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");

    let (status, reply) = server.put_config("dev-9", r#"{"rate": 1}"#, token).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("device \"dev-9\" not found"),
        "{reply}"
    );
    let (status, reply) = server.get_config("dev-9").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("no configuration set for device \"dev-9\""),
        "{reply}"
    );
    let text = server.metrics().await;
    assert_eq!(metric(&text, "fleet_config_commands_sent_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_routes_check_credentials() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let device = Some(server.device_secret.as_str());
    let body = r#"{"rate": 1}"#;

    let (status, _) = server.put_config("dev-1", body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server.put_config("dev-1", body, Some("wrong-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = server.get_json("/api/devices/dev-1/config", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // A device may not change settings, its own included.
    let (status, _) = server.put_config("dev-1", body, device).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.get_json("/api/devices/dev-1/config", device).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.get_config("dev-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_set_status_of_current_change() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;

    let first = server.put_config_ok("dev-1", json!({ "rate": 2 })).await;
    let first_id = device.next_config().await.change_id;
    assert_eq!(first["change_id"], first_id.as_str());
    device.publish_ack(&first_id, true, "rate 2/s").await;
    let applied = server.wait_config_status("dev-1", "applied").await;
    assert_eq!(applied["detail"], "rate 2/s");
    assert_eq!(applied["change_id"], first_id.as_str());
    assert!(
        applied["updated_ms"].as_i64() >= applied["created_ms"].as_i64(),
        "{applied}"
    );

    // A late acknowledgement of the first change leaves the second one pending.
    server.put_config_ok("dev-1", json!({ "rate": 3 })).await;
    let second_id = device.next_config().await.change_id;
    device.publish_ack(&first_id, false, "late").await;
    server
        .wait_metric("fleet_config_acks_total{outcome=\"stale\"}", 1.0)
        .await;
    let (_, pending) = server.get_config("dev-1").await;
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["change_id"], second_id.as_str());
    assert_eq!(pending["detail"], "");

    device
        .publish_ack(&second_id, false, "invalid rate 3: over the model's limit")
        .await;
    let rejected = server.wait_config_status("dev-1", "rejected").await;
    assert_eq!(rejected["detail"], "invalid rate 3: over the model's limit");
    assert_eq!(rejected["settings"], json!({ "rate": 3.0 }));

    // An acknowledgement whose payload names another device than its topic is dropped.
    let forged = ConfigAck {
        change_id: second_id.clone(),
        applied: true,
        detail: "forged".into(),
    };
    device
        .publish_event_kind("dev-2", EventKind::Config(forged))
        .await;
    server
        .wait_metric("fleet_ingest_messages_total{outcome=\"rejected\"}", 1.0)
        .await;
    let (_, after) = server.get_config("dev-1").await;
    assert_eq!(after["status"], "rejected");

    let text = server.metrics().await;
    assert_eq!(
        metric(&text, "fleet_config_acks_total{outcome=\"applied\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "fleet_config_acks_total{outcome=\"rejected\"}"),
        Some(1.0)
    );
    let events = server
        .server
        .store
        .config_events("dev-1", 10)
        .await
        .unwrap();
    let history: Vec<(&str, bool)> = events
        .iter()
        .map(|event| (event.change_id.as_str(), event.applied))
        .collect();
    assert_eq!(
        history,
        [
            (second_id.as_str(), false),
            (first_id.as_str(), false),
            (first_id.as_str(), true)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_device_gets_pending_change_again() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let mut device = TestDevice::connect(&server, "dev-1", &server.device_secret).await;

    // An unfinished update and a pending change: one online status resends both, in
    // that order.
    let (status, _, bundle) = server
        .send(
            server
                .http
                .post(format!("{}/api/bundles", server.base))
                .body(TestBundle::new().archive()),
            Some(&server.token),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let bundle: Value = serde_json::from_slice(&bundle).unwrap();
    let (status, _, _) = server
        .send(
            server
                .http
                .post(format!("{}/api/updates", server.base))
                .header("content-type", "application/json")
                .body(json!({ "bundle": bundle["sha256"], "devices": ["dev-1"] }).to_string()),
            Some(&server.token),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let update_id = device.next_install_id().await;
    server
        .put_config_ok("dev-1", json!({ "drain_rate": 50 }))
        .await;
    let change_id = device.next_config().await.change_id;

    device.publish_online().await;
    assert_eq!(device.next_install_id().await, update_id);
    let resent = device.next_config().await;
    assert_eq!(resent.change_id, change_id);
    assert_eq!(resent.drain_rate, Some(50.0));

    // Once applied, the change is not sent again: the next two commands are the
    // update's alone.
    device
        .publish_ack(&change_id, true, "drain rate 50/s")
        .await;
    server.wait_config_status("dev-1", "applied").await;
    device.publish_online().await;
    assert_eq!(device.next_install_id().await, update_id);
    device.publish_online().await;
    assert_eq!(device.next_install_id().await, update_id);

    // A device that was away when its change was published gets it on coming online.
    let record = server
        .put_config_ok("dev-2", json!({ "commit_timeout_seconds": 120 }))
        .await;
    let secret = fleet_server::access::provision(
        &server.server.store,
        "dev-2",
        fleet_server::store::access::CredentialRole::Device,
        true,
    )
    .await
    .unwrap();
    let mut away = TestDevice::connect(&server, "dev-2", &secret).await;
    away.publish_online().await;
    let delivered = away.next_config().await;
    assert_eq!(delivered.change_id, record["change_id"].as_str().unwrap());
    assert_eq!(delivered.commit_timeout_seconds, Some(120.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_client_sets_and_shows() {
    let server = TestServer::start(UpdateSettings::default()).await;
    let base = server.base.clone();
    let token = server.token.clone();

    let (set, fetched, missing, invalid) = tokio::task::spawn_blocking(move || {
        let client = FleetClient::new(&base, &token).unwrap();
        let settings = ConfigSettings {
            confidence_threshold: Some(0.55),
            ..ConfigSettings::default()
        };
        let set = client.set_config("dev-2", &settings).unwrap();
        let fetched = client.config("dev-2").unwrap();
        let missing = client.config("dev-1").unwrap_err().to_string();
        let invalid_settings = ConfigSettings {
            rate: Some(-2.0),
            ..ConfigSettings::default()
        };
        let invalid = client
            .set_config("dev-2", &invalid_settings)
            .unwrap_err()
            .to_string();
        (set, fetched, missing, invalid)
    })
    .await
    .unwrap();

    assert_eq!(set.device_id, "dev-2");
    assert_eq!(set.status, ConfigStatus::Pending);
    assert_eq!(set.settings.confidence_threshold, Some(0.55));
    assert_eq!(fetched, set);
    assert!(missing.contains("returned 404"), "{missing}");
    assert!(missing.contains("no configuration set"), "{missing}");
    assert!(invalid.contains("returned 400"), "{invalid}");
    assert!(invalid.contains("invalid rate -2"), "{invalid}");
}
