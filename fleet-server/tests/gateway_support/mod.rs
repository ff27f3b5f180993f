//! Test harness for the inference gateway: a signed digit-cnn bundle in a temporary
//! folder, an in-process fleet server with the gateway and credentials, the MNIST
//! reference inputs and outputs, and helpers for OIP requests and `/metrics`.

#![allow(dead_code)]

#[path = "../../../tests/common/ports.rs"]
pub mod ports;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fleet_bundle::{
    BundleFile, MANIFEST_FORMAT, Manifest, ModelFile, Postprocessing, Preprocessing, PublicKey,
    ResizeFilter, SecretKey, TensorSpec,
};
use fleet_server::store::access::CredentialRole;
use fleet_server::{BrokerMode, Server, ServerConfig};
use tokio::io::AsyncBufReadExt;

/// Floats in one 28x28 digit sample.
pub const SAMPLE_LEN: usize = 784;
/// Classes of the digit model.
pub const CLASSES: usize = 10;

/// Returns the `models/` folder of the repository.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A temporary folder with a key pair and a signed digit-cnn bundle.
#[derive(Debug)]
pub struct TestBundle {
    pub dir: tempfile::TempDir,
}

impl TestBundle {
    /// Returns digit-cnn 1.0.0 signed with a new key pair.
    pub fn new() -> TestBundle {
        let (secret, public) = fleet_bundle::generate_key_pair().expect("key pair");
        TestBundle::signed(&secret, &public, "1.0.0")
    }

    /// Returns digit-cnn at `version`, signed with `secret`, whose public half `public`
    /// is written beside the bundle.
    pub fn signed(secret: &SecretKey, public: &PublicKey, version: &str) -> TestBundle {
        let dir = tempfile::tempdir().expect("temporary folder");
        public
            .write(&dir.path().join("fleet.pub"))
            .expect("write public key");
        let model_dir = models_dir().join("digit-cnn");
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: "digit-cnn".into(),
            version: version.into(),
            target: "any".into(),
            created_by: "gateway tests".into(),
            model: ModelFile {
                path: "digit-cnn.onnx".into(),
                format: "onnx".into(),
            },
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 1, 28, 28],
            }],
            outputs: vec![TensorSpec {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 10],
            }],
            preprocessing: Preprocessing::Grayscale {
                width: 28,
                height: 28,
                resize: ResizeFilter::Bilinear,
                scale: 1.0 / 255.0,
                offset: 0.0,
            },
            postprocessing: Postprocessing::Softmax,
            labels: Some("labels.txt".into()),
            metrics: None,
            self_test: None,
            files: Vec::new(),
        };
        let files = [
            BundleFile {
                source: model_dir.join("digit-cnn.onnx"),
                path: "digit-cnn.onnx".into(),
            },
            BundleFile {
                source: model_dir.join("labels.txt"),
                path: "labels.txt".into(),
            },
        ];
        fleet_bundle::write_bundle(&dir.path().join("bundle"), manifest, &files, secret)
            .expect("write bundle");
        TestBundle { dir }
    }

    pub fn bundle(&self) -> PathBuf {
        self.dir.path().join("bundle")
    }

    pub fn public_key(&self) -> PathBuf {
        self.dir.path().join("fleet.pub")
    }

    /// Returns the bundle packed as an archive, as `fleet-server bundle upload` sends it.
    pub fn archive(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        fleet_bundle::archive::pack(&self.bundle(), &mut bytes).expect("pack bundle");
        bytes
    }

    /// Returns a gateway config serving the bundle, with `extra` TOML appended inside
    /// the `[[models]]` table (start it with `[models.replicas]` and the like), and
    /// `limits` placed before it.
    pub fn config(&self, limits: &str, extra: &str) -> String {
        format!(
            "replica_command = [{replica:?}]\n{limits}\n\
             [[models]]\nname = \"digit-cnn\"\nbundle = {bundle:?}\npublic_key = {key:?}\n{extra}\n",
            replica = env!("CARGO_BIN_EXE_fleet-replica"),
            bundle = self.bundle().to_str().unwrap(),
            key = self.public_key().to_str().unwrap(),
        )
    }
}

/// The MNIST reference inputs (pixel / 255) and their onnxruntime logits.
#[derive(Debug, Clone)]
pub struct Reference {
    pub inputs: Vec<f32>,
    pub logits: Vec<f32>,
}

impl Reference {
    pub fn load() -> Reference {
        let dir = models_dir().join("digit-cnn/reference");
        Reference {
            inputs: read_f32(&dir.join("inputs.f32")),
            logits: read_f32(&dir.join("outputs.f32")),
        }
    }

    /// Returns sample `index` (0 to 15).
    pub fn sample(&self, index: usize) -> &[f32] {
        &self.inputs[index * SAMPLE_LEN..(index + 1) * SAMPLE_LEN]
    }

    /// Returns the reference logits of sample `index`.
    pub fn expected(&self, index: usize) -> &[f32] {
        &self.logits[index * CLASSES..(index + 1) * CLASSES]
    }

    /// Returns an OIP request body for samples `indices`.
    pub fn body(&self, indices: &[usize]) -> serde_json::Value {
        let data: Vec<f32> = indices
            .iter()
            .flat_map(|&i| self.sample(i).to_vec())
            .collect();
        serde_json::json!({
            "id": "test",
            "inputs": [{
                "name": "input",
                "shape": [indices.len(), 1, 28, 28],
                "datatype": "FP32",
                "data": data,
            }]
        })
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect()
}

/// A fleet server with the gateway, a client token, an operator token and a device.
#[derive(Debug)]
pub struct TestGateway {
    pub server: Server,
    pub base: String,
    /// API token of a client script.
    pub token: String,
    /// A second API token, for throttling checks that must not affect `token`.
    pub other_token: String,
    /// Secret of device `dev-1`.
    pub device_secret: String,
    /// Secret of ingester `ingest-1`.
    pub ingester_secret: String,
    pub http: reqwest::Client,
    _db: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a server on free ports with the gateway configured by `config_toml`.
    pub async fn start(config_toml: &str) -> TestGateway {
        let db = tempfile::tempdir().expect("temporary folder");
        let database = db.path().join("fleet.db").to_str().unwrap().to_owned();
        let gateway = fleet_server::gateway::GatewayConfig::from_toml(config_toml)
            .unwrap_or_else(|e| panic!("gateway config: {e}\n{config_toml}"));
        let http_listen = "127.0.0.1:0".parse().unwrap();
        let config = ServerConfig {
            http_listen,
            broker: BrokerMode::Embedded {
                listen: "127.0.0.1:0".parse().unwrap(),
                access: fleet_server::broker::ClientAccess::Credentials,
            },
            database,
            mqtt_client_id: format!("gateway-test-{}", std::process::id()),
            shared_group: None,
            clean_session: true,
            mqtt_credentials: None,
            telemetry_retention: None,
            updates: Default::default(),
            samples: Default::default(),
        };
        let server = Server::start_with_gateway(config, Some(gateway))
            .await
            .expect("start server with gateway");
        let store = &server.store;
        let token = fleet_server::access::create_api_token(store, "client")
            .await
            .unwrap();
        let other_token = fleet_server::access::create_api_token(store, "other")
            .await
            .unwrap();
        let device_secret =
            fleet_server::access::provision(store, "dev-1", CredentialRole::Device, false)
                .await
                .unwrap();
        let ingester_secret =
            fleet_server::access::provision(store, "ingest-1", CredentialRole::Ingester, false)
                .await
                .unwrap();
        let base = format!("http://{}", server.http_addr);
        TestGateway {
            server,
            base,
            token,
            other_token,
            device_secret,
            ingester_secret,
            http: reqwest::Client::new(),
            _db: db,
        }
    }

    /// Sends an inference request with `token` and returns status, headers and body.
    pub async fn infer(
        &self,
        token: Option<&str>,
        model: &str,
        body: &serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let mut request = self
            .http
            .post(format!("{}/v2/models/{model}/infer", self.base))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("send inference request");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = json_body(response).await;
        (status, headers, body)
    }

    /// Returns `GET /api/gateway/backends` for the digit model.
    pub async fn backends(&self) -> serde_json::Value {
        let response = self
            .http
            .get(format!("{}/api/gateway/backends", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET /api/gateway/backends");
        json_body(response).await["digit-cnn"].clone()
    }

    /// Returns the server's `/metrics` text.
    pub async fn metrics(&self) -> String {
        fetch_text(&self.http, &format!("{}/metrics", self.base)).await
    }

    /// Waits until `count` backends of the digit model are ready.
    pub async fn wait_ready_backends(&self, count: usize, timeout: Duration) {
        let started = Instant::now();
        loop {
            let backends = self.backends().await;
            let ready = backends["backends"]
                .as_array()
                .map(|list| list.iter().filter(|b| b["state"] == "ready").count())
                .unwrap_or(0);
            if ready == count {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{count} ready backends expected within {timeout:?}: {backends:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Returns a response's JSON body, or `null` when it is not JSON.
pub async fn json_body(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("read response body");
    serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
}

/// Returns the body of a GET as text.
pub async fn fetch_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .expect("text body")
}

/// Returns the value of one sample line of a Prometheus text, such as
/// `fleet_replica_batches_total`, or `None` when absent.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Asserts that `logits` match the reference of each sample in `indices`.
pub fn assert_logits(reference: &Reference, indices: &[usize], body: &serde_json::Value) {
    let output = &body["outputs"][0];
    assert_eq!(output["name"], "logits", "{body}");
    assert_eq!(
        output["shape"],
        serde_json::json!([indices.len(), CLASSES]),
        "{body}"
    );
    let data: Vec<f32> = output["data"]
        .as_array()
        .expect("output data")
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (row, &index) in indices.iter().enumerate() {
        for class in 0..CLASSES {
            let found = data[row * CLASSES + class];
            let expected = reference.expected(index)[class];
            assert!(
                (found - expected).abs() < 1e-3,
                "sample {index} class {class}: {found} vs reference {expected}"
            );
        }
    }
}

/// A `fleet-replica` process started by a test, killed when dropped.
#[derive(Debug)]
pub struct ReplicaProcess {
    pub child: tokio::process::Child,
    pub url: String,
}

impl ReplicaProcess {
    /// Starts `fleet-replica` on the bundle with `extra` flags and waits for its address.
    pub async fn start(bundle: &TestBundle, extra: &[&str]) -> ReplicaProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fleet-replica"))
            .arg("--bundle")
            .arg(bundle.bundle())
            .arg("--public-key")
            .arg(bundle.public_key())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start fleet-replica");
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("replica reports its address in time")
            .expect("read replica output")
            .expect("replica printed a line");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
        let url = format!("http://{}", value["listening"].as_str().unwrap());
        ReplicaProcess { child, url }
    }

    /// Kills the process with SIGKILL and waits for it.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill replica");
    }
}

/// Sends SIGKILL to a process by id.
pub fn kill_pid(pid: u64) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}

/// Returns whether a process with this id exists (and is not a zombie).
pub fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// Returns the Python of `target/python-clients` (tritonclient, MLServer, onnxruntime),
/// or `None` with the reason printed when `scripts/setup-python-clients` has not made it.
pub fn python_clients() -> Option<PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-clients/bin/python");
    if python.exists() {
        Some(python)
    } else {
        eprintln!(
            "skipped: {} is missing; run scripts/setup-python-clients to create it",
            python.display()
        );
        None
    }
}

/// Returns the folder of the tests' Python scripts.
pub fn python_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python")
}

/// Runs `tests/python/gateway_client.py` against the gateway's digit model, which sends
/// the first four reference samples as JSON and as binary tensors, and checks both
/// responses against the reference logits.
pub async fn check_with_tritonclient(python: &Path, gateway: &TestGateway) {
    let address = gateway.base.trim_start_matches("http://").to_owned();
    let output = tokio::process::Command::new(python)
        .arg(python_scripts().join("gateway_client.py"))
        .args([&address, &gateway.token])
        .arg(models_dir().join("digit-cnn/reference/inputs.f32"))
        .arg("digit-cnn")
        .output()
        .await
        .expect("run gateway_client.py");
    assert!(
        output.status.success(),
        "gateway_client.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answers: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("gateway_client.py prints JSON");
    let reference = Reference::load();
    for form in ["json", "binary"] {
        let rows = answers[form].as_array().expect("logits rows");
        assert_eq!(rows.len(), 4, "{form}: {answers}");
        for (index, row) in rows.iter().enumerate() {
            for class in 0..CLASSES {
                let found = row[class].as_f64().unwrap() as f32;
                let expected = reference.expected(index)[class];
                assert!(
                    (found - expected).abs() < 1e-3,
                    "{form}, sample {index}: {found} vs {expected}"
                );
            }
        }
    }
}
