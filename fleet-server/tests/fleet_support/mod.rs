//! Test harness for the fleet server's operator routes and device commands. It starts
//! an in-process server on free ports with an operator token and two provisioned
//! devices, and connects devices to the embedded broker that receive their commands and
//! publish events and status. `updates.rs` and `config.rs` add request helpers of their
//! own in `impl` blocks. A test file that declares this module declares
//! `gateway_support` as well, whose metric helpers it uses.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleet_server::store::access::CredentialRole;
use fleet_server::updates::UpdateSettings;
use fleet_server::{BrokerMode, Server, ServerConfig};
use fleet_wire::{Command, DeviceState, Encoding, Event, EventKind, Status};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::gateway_support::{fetch_text, metric};

/// How long a test waits for something the server does in the background.
pub const WAIT: Duration = Duration::from_secs(30);

/// A fleet server on free ports with an operator token and two provisioned devices.
pub struct TestServer {
    pub server: Server,
    pub base: String,
    /// API token of an operator script.
    pub token: String,
    /// Secrets of devices `dev-1` and `dev-2`.
    pub device_secret: String,
    pub second_device_secret: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(settings: UpdateSettings) -> TestServer {
        TestServer::start_with(|config| config.updates = settings).await
    }

    /// Starts the server after `adjust` changed its default test configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary folder");
        let mut config = ServerConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            broker: BrokerMode::Embedded {
                listen: "127.0.0.1:0".parse().unwrap(),
                access: fleet_server::broker::ClientAccess::Credentials,
            },
            database: dir.path().join("fleet.db").to_str().unwrap().to_owned(),
            mqtt_client_id: format!("fleet-test-{}", std::process::id()),
            shared_group: None,
            clean_session: true,
            mqtt_credentials: None,
            telemetry_retention: None,
            updates: Default::default(),
            samples: Default::default(),
        };
        adjust(&mut config);
        let server = Server::start(config).await.expect("start server");
        let store = &server.store;
        let token = fleet_server::access::create_api_token(store, "script")
            .await
            .unwrap();
        let device_secret =
            fleet_server::access::provision(store, "dev-1", CredentialRole::Device, false)
                .await
                .unwrap();
        let second_device_secret =
            fleet_server::access::provision(store, "dev-2", CredentialRole::Device, false)
                .await
                .unwrap();
        TestServer {
            base: format!("http://{}", server.http_addr),
            server,
            token,
            device_secret,
            second_device_secret,
            http: reqwest::Client::new(),
            dir,
        }
    }

    /// Returns the default bundle folder, beside the database.
    pub fn bundle_dir(&self) -> PathBuf {
        self.dir.path().join("fleet-bundles")
    }

    /// Sends a request with an optional bearer token and returns status, headers and
    /// body bytes.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        token: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.expect("send request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("read body").to_vec();
        (status, headers, body)
    }

    /// Sends a GET to `path` and returns the status and the JSON body, or `Null` when
    /// the body is not JSON.
    pub async fn get_json(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        let request = self.http.get(format!("{}{path}", self.base));
        let (status, _, body) = self.send(request, token).await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        fetch_text(&self.http, &format!("{}/metrics", self.base)).await
    }

    /// Waits until the metric sample reaches `expected`.
    pub async fn wait_metric(&self, sample: &str, expected: f64) {
        let started = Instant::now();
        loop {
            let text = self.metrics().await;
            if metric(&text, sample) == Some(expected) {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "{sample} did not reach {expected} within {WAIT:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A device on the embedded broker that receives its commands and publishes events.
pub struct TestDevice {
    pub id: String,
    pub client: AsyncClient,
    pub commands: mpsc::UnboundedReceiver<Command>,
}

impl TestDevice {
    /// Connects with the device's credential and returns once its command subscription
    /// is acknowledged.
    pub async fn connect(server: &TestServer, id: &str, secret: &str) -> TestDevice {
        let url = fleet_mqtt::BrokerUrl::parse(&server.server.mqtt_addr).unwrap();
        let mut options = MqttOptions::new(id, url.host, url.port);
        options.set_credentials(id, secret);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let command_topic =
            fleet_wire::topic::device_topic(id, fleet_wire::topic::TopicKind::Command);
        client
            .subscribe(&command_topic, QoS::AtLeastOnce)
            .await
            .unwrap();

        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(sender) = subscribed_tx.take() {
                            let _ = sender.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(Packet::Publish(publish))) => {
                        let command = fleet_wire::decode::<Command>(&publish.payload)
                            .expect("command payload decodes");
                        if commands_tx.send(command).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => panic!("device connection failed: {error}"),
                }
            }
        });

        tokio::time::timeout(WAIT, subscribed)
            .await
            .expect("command subscription acknowledged in time")
            .unwrap();
        TestDevice {
            id: id.to_owned(),
            client,
            commands,
        }
    }

    /// Returns the next command the device receives.
    pub async fn next_command(&mut self) -> Command {
        tokio::time::timeout(WAIT, self.commands.recv())
            .await
            .expect("a command arrives in time")
            .expect("command channel open")
    }

    /// Publishes an event on this device's topic whose payload names `device_id`.
    pub async fn publish_event_kind(&self, device_id: &str, kind: EventKind) {
        let event = Event {
            device_id: device_id.to_owned(),
            device_time_ms: fleet_server::unix_millis(),
            kind,
        };
        let topic = fleet_wire::topic::device_topic(&self.id, fleet_wire::topic::TopicKind::Events);
        let payload = fleet_wire::encode(&event, Encoding::Postcard).unwrap();
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub async fn publish_online(&self) {
        let status = Status {
            device_id: self.id.clone(),
            state: DeviceState::Online,
            model: None,
            agent_version: "test".into(),
            device_time_ms: fleet_server::unix_millis(),
        };
        let topic = fleet_wire::topic::device_topic(&self.id, fleet_wire::topic::TopicKind::Status);
        let payload = fleet_wire::encode(&status, Encoding::Postcard).unwrap();
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}
