//! Test harness: runs the real `fleet` binary as server and agent processes on free
//! ports in a temporary folder, and reads the server's JSON API.

#![allow(dead_code)]

mod ports;
pub mod proxy;

pub use ports::free_port;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Returns the repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A child process that is killed when the test ends, pass or fail.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    pub child: Child,
}

impl Process {
    /// Sends SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.name);
        wait_timeout(&mut self.child, Duration::from_secs(15))
            .unwrap_or_else(|| panic!("{} did not exit after SIGTERM", self.name))
    }

    /// Returns whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("poll child").is_none()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(status) = child.try_wait().expect("poll child") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Runs `fleet` with `args` to completion.
pub fn fleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run fleet")
}

/// A temporary folder with a key pair and a signed digit-cnn bundle.
#[derive(Debug)]
pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// Broker URL and database of each server started with an embedded broker, so
    /// devices started on that broker get credentials from that database.
    embedded: std::cell::RefCell<Vec<(String, PathBuf)>>,
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::tempdir().expect("temporary folder");
        let keys = dir.path().join("keys");
        let output = fleet(&["compress", "keygen", "--out", path_str(&keys)]);
        assert!(
            output.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let bundle = dir.path().join("bundle");
        let recipe = repo().join("models/digit-cnn/bundle.toml");
        let output = fleet(&[
            "compress",
            "bundle",
            path_str(&recipe),
            "--key",
            path_str(&keys.join("fleet.key")),
            "--out",
            path_str(&bundle),
            "--skip-evaluation",
        ]);
        assert!(
            output.status.success(),
            "bundle: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Workspace {
            dir,
            embedded: Default::default(),
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn bundle(&self) -> PathBuf {
        self.path("bundle")
    }

    pub fn public_key(&self) -> PathBuf {
        self.path("keys/fleet.pub")
    }

    /// Starts `fleet server`; with `broker` it uses that external broker, otherwise it
    /// embeds one on `mqtt_port`.
    pub fn start_server(&self, broker: Option<&str>, mqtt_port: u16) -> Server {
        self.start_server_with(broker, mqtt_port, &[])
    }

    /// Starts `fleet server` as [`Workspace::start_server`] does, with `extra` flags.
    pub fn start_server_with(
        &self,
        broker: Option<&str>,
        mqtt_port: u16,
        extra: &[&str],
    ) -> Server {
        self.start_server_on(broker, mqtt_port, free_port(), extra)
    }

    /// Starts `fleet server` as [`Workspace::start_server_with`] does, with its HTTP API
    /// on `http_port`. A server started again on the same ports reuses the database and
    /// the API token of the one before.
    pub fn start_server_on(
        &self,
        broker: Option<&str>,
        mqtt_port: u16,
        http_port: u16,
        extra: &[&str],
    ) -> Server {
        let http = format!("127.0.0.1:{http_port}");
        let mqtt_listen = format!("127.0.0.1:{mqtt_port}");
        let database = match broker {
            Some(_) => self.path(&format!("fleet-{http_port}.db")),
            None => self.embedded_database(mqtt_port),
        };
        let token_path = self.path(&format!("token-{http_port}"));
        let token = match std::fs::read_to_string(&token_path) {
            Ok(token) => token.trim().to_string(),
            Err(_) => create_api_token(path_str(&database), &token_path),
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleet"));
        command
            .args([
                "server",
                "--http",
                &http,
                "--mqtt-listen",
                &mqtt_listen,
                "--mqtt-clean-session",
                "--database",
            ])
            .arg(&database)
            .stdin(Stdio::null());
        if let Some(broker) = broker {
            command.args(["--broker", broker]);
        }
        command.args(extra);
        let child = command.spawn().expect("start fleet server");
        let mut process = Process {
            name: "fleet server".into(),
            child,
        };
        let base = format!("http://{http}");
        wait_for(Duration::from_secs(30), "the server's /healthz", || {
            assert!(process.is_running(), "fleet server exited during startup");
            ureq::get(&format!("{base}/healthz"))
                .call()
                .is_ok()
                .then_some(())
        });
        Server {
            process,
            api: Api { base, token },
            database: path_str(&database).to_owned(),
        }
    }

    /// Starts `fleet device` on the MNIST test set with the given extra flags. On the
    /// embedded broker of a server started by [`Workspace::start_server`], the device
    /// is first provisioned in that server's database and logs in with its secret.
    pub fn start_device(&self, device_id: &str, broker: &str, extra: &[&str]) -> Process {
        let mnist = repo().join("models/mnist");
        let database = self
            .embedded
            .borrow()
            .iter()
            .find(|(url, _)| url == broker)
            .map(|(_, database)| database.clone());
        let mut login: Vec<std::ffi::OsString> = Vec::new();
        if let Some(database) = database {
            let secret = self.provision_device(&database, device_id);
            login.extend([
                "--username".into(),
                device_id.into(),
                "--password-file".into(),
            ]);
            login.push(secret.into());
        }
        let child = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["device", "--device-id", device_id, "--broker", broker])
            .args(login)
            .arg("--bundle")
            .arg(self.bundle())
            .arg("--public-key")
            .arg(self.public_key())
            .arg("--input")
            .arg(mnist.join("t10k-images-idx3-ubyte.gz"))
            .arg("--labels")
            .arg(mnist.join("t10k-labels-idx1-ubyte.gz"))
            .arg("--state-dir")
            .arg(self.path(&format!("state/{device_id}")))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start fleet device");
        Process {
            name: format!("device {device_id}"),
            child,
        }
    }

    /// Returns the database of the server with an embedded broker on `mqtt_port`, and
    /// records it so that [`Workspace::start_device`] provisions devices on that
    /// broker in it, also before the server starts.
    pub fn embedded_database(&self, mqtt_port: u16) -> PathBuf {
        let database = self.path(&format!("fleet-mqtt-{mqtt_port}.db"));
        let url = format!("mqtt://127.0.0.1:{mqtt_port}");
        let mut embedded = self.embedded.borrow_mut();
        if !embedded.iter().any(|(known, _)| *known == url) {
            embedded.push((url, database.clone()));
        }
        database
    }

    /// Issues a device credential in `database` and returns the path of its secret.
    pub fn provision_device(&self, database: &Path, device_id: &str) -> PathBuf {
        let dir = self.path("secrets");
        let output = fleet(&[
            "server",
            "provision-device",
            device_id,
            "--rotate",
            "--database",
            path_str(database),
            "--out",
            path_str(&dir),
        ]);
        assert!(
            output.status.success(),
            "provision-device {device_id}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        dir.join(format!("{device_id}.secret"))
    }
}

/// Creates an API token in `database` (creating the database if needed), writes it to
/// `path` and returns it.
pub fn create_api_token(database: &str, path: &Path) -> String {
    let name = format!("test-{}", path.file_name().unwrap().to_string_lossy());
    let output = fleet(&[
        "server",
        "create-token",
        &name,
        "--database",
        database,
        "--out",
        path_str(path),
    ]);
    assert!(
        output.status.success(),
        "create-token: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read_to_string(path)
        .expect("read token file")
        .trim()
        .to_string()
}

/// A running `fleet server`; its API is reachable through `Deref`.
#[derive(Debug)]
pub struct Server {
    pub process: Process,
    pub api: Api,
    /// The server's SQLite file.
    pub database: String,
}

impl std::ops::Deref for Server {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The HTTP API of a fleet server at `base`, such as `http://127.0.0.1:8080`, called
/// with an operator's API token.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn get(&self, path: &str) -> serde_json::Value {
        ureq::get(&format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .expect("JSON body")
    }

    /// Returns the value of one sample line of `/metrics`, such as
    /// `fleet_ingest_messages_total{outcome="stored"}`.
    pub fn metric(&self, sample: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.base))
            .call()
            .expect("GET /metrics")
            .into_string()
            .expect("text body");
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{sample} not in /metrics:\n{text}"))
    }

    /// Returns the sequence numbers stored for a device, sorted.
    pub fn stored_seqs(&self, device_id: &str) -> Vec<i64> {
        let rows = self.get(&format!("/api/devices/{device_id}/telemetry?limit=10000"));
        let mut seqs: Vec<i64> = rows
            .as_array()
            .expect("telemetry rows")
            .iter()
            .map(|row| row["seq"].as_i64().expect("seq is a number"))
            .collect();
        seqs.sort_unstable();
        seqs
    }

    /// Replaces the remote configuration of `device_id` with `settings` and returns the
    /// stored change.
    pub fn put_config(&self, device_id: &str, settings: &serde_json::Value) -> serde_json::Value {
        ureq::put(&format!("{}/api/devices/{device_id}/config", self.base))
            .set("Authorization", &format!("Bearer {}", self.token))
            .send_json(settings.clone())
            .expect("PUT the configuration")
            .into_json()
            .expect("JSON body")
    }

    /// Waits until the device acknowledged configuration change `change_id` and returns
    /// the stored record.
    pub fn wait_for_config_ack(&self, device_id: &str, change_id: &str) -> serde_json::Value {
        wait_for(Duration::from_secs(30), "the acknowledgement", || {
            let config = self.get(&format!("/api/devices/{device_id}/config"));
            (config["change_id"] == change_id && config["status"] != "pending").then_some(config)
        })
    }

    /// Returns the `/api/devices` entry of one device, if the server has one.
    pub fn device(&self, device_id: &str) -> Option<serde_json::Value> {
        self.get("/api/devices")
            .as_array()
            .expect("device list")
            .iter()
            .find(|d| d["id"] == device_id)
            .cloned()
    }
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Returns a device id no other test run uses, so runs can share Mosquitto.
/// An install command whose `failed` event does not fit through the broker, and a broker
/// packet limit just above the command itself.
#[derive(Debug)]
pub struct OversizedCommand {
    /// The encoded command, for the device's command topic.
    pub payload: Vec<u8>,
    pub topic: String,
    /// A `max_packet_size` for the broker that the command fits and the event does not.
    pub max_packet: usize,
}

/// Builds an install command with a long update id for `device_id`. An agent started
/// without --server rejects it with a `failed` event that repeats the id and adds the
/// device id and a reason, so the event is larger than the command by at least that.
pub fn oversized_command(device_id: &str) -> OversizedCommand {
    let command = fleet_wire::Command::InstallBundle(fleet_wire::InstallBundle {
        update_id: "u".repeat(1200),
        name: String::new(),
        version: String::new(),
        url: String::new(),
        size: 1,
        sha256: "0".repeat(64),
    });
    let payload = fleet_wire::encode(&command, fleet_wire::Encoding::Postcard).unwrap();
    let topic = fleet_wire::topic::device_topic(device_id, fleet_wire::topic::TopicKind::Command);
    let max_packet = payload.len() + topic.len() + 40;
    OversizedCommand {
        payload,
        topic,
        max_packet,
    }
}

pub fn unique_device_id(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Returns the tract accuracy stated in a model card, in percent.
pub fn model_card_accuracy(model: &str) -> f64 {
    let card = std::fs::read_to_string(repo().join("models").join(model).join("MODEL_CARD.md"))
        .expect("read model card");
    let line = card
        .lines()
        .find_map(|line| line.strip_prefix("Accuracy in tract:"))
        .expect("model card has an 'Accuracy in tract:' line");
    line.trim()
        .split('%')
        .next()
        .and_then(|number| number.trim().parse().ok())
        .unwrap_or_else(|| panic!("no percentage in 'Accuracy in tract:{line}'"))
}

/// Removes the retained status messages of `device_ids` from the broker at
/// `host:port`, so test runs do not pile up retained messages on a shared broker.
pub fn clear_retained_status(host: &str, port: u16, device_ids: &[String]) {
    let mut options = rumqttc::MqttOptions::new(unique_device_id("cleanup"), host, port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 16);
    for id in device_ids {
        let topic = format!("fleet/v1/{id}/status");
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, Vec::new())
            .expect("queue retained clear");
    }
    let mut acknowledged = 0;
    for event in connection.iter() {
        match event.expect("broker connection") {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) => acknowledged += 1,
            _ => continue,
        }
        if acknowledged == device_ids.len() {
            break;
        }
    }
    let _ = client.disconnect();
}

/// Starts a Mosquitto on a free loopback port with `settings` added to its
/// configuration, which is written into `dir`; every file in `dir` is made readable
/// for the `mosquitto` user that Mosquitto switches to when started as root.
pub fn start_mosquitto(dir: &Path, settings: &str) -> (Process, u16) {
    use std::os::unix::fs::PermissionsExt;

    let port = free_port();
    let config = dir.join("mosquitto.conf");
    let text = format!("listener {port} 127.0.0.1\npersistence false\n{settings}");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    let process = Process {
        name: "mosquitto".into(),
        child,
    };
    wait_for(Duration::from_secs(10), "mosquitto to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (process, port)
}
