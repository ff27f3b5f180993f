//! Runs Seldon MLServer, an independent Open Inference Protocol server, as the only
//! backend of the gateway's digit model: it serves the same ONNX file with onnxruntime
//! through `tests/python/mlserver_onnx.py`. Skipped, with the reason printed, when the
//! virtual environment from `scripts/setup-python-clients` is missing.

mod gateway_support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use gateway_support::ports::free_port;
use gateway_support::{Reference, TestBundle, TestGateway, models_dir};

/// An MLServer process serving digit-cnn on a free port, killed when dropped.
struct MlServer {
    child: tokio::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl MlServer {
    async fn start(python: &Path) -> MlServer {
        let dir = tempfile::tempdir().expect("temporary folder");
        let http_port = free_port();
        let settings = serde_json::json!({
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 0,
        });
        std::fs::write(dir.path().join("settings.json"), settings.to_string()).unwrap();
        let model_dir = dir.path().join("digit-cnn");
        std::fs::create_dir(&model_dir).unwrap();
        let model = serde_json::json!({
            "name": "digit-cnn",
            "implementation": "mlserver_onnx.OnnxModel",
            "parameters": {"uri": models_dir().join("digit-cnn/digit-cnn.onnx")},
        });
        std::fs::write(model_dir.join("model-settings.json"), model.to_string()).unwrap();

        let mlserver = python.with_file_name("mlserver");
        let child = tokio::process::Command::new(&mlserver)
            .arg("start")
            .arg(dir.path())
            .env("PYTHONPATH", gateway_support::python_scripts())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", mlserver.display()));
        let mut server = MlServer {
            child,
            url: format!("http://127.0.0.1:{http_port}"),
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(120)).await;
        server
    }

    /// Waits until MLServer reports its model ready, failing early if it exits.
    async fn wait_ready(&mut self, timeout: Duration) {
        let http = reqwest::Client::new();
        let started = Instant::now();
        let url = format!("{}/v2/models/digit-cnn/ready", self.url);
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status().is_success()
            {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll mlserver") {
                panic!("mlserver exited with {status} before its model was ready");
            }
            assert!(
                started.elapsed() < timeout,
                "mlserver not ready within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mlserver_backend_serves_through_gateway() {
    let Some(python) = gateway_support::python_clients() else {
        return;
    };
    let mlserver = MlServer::start(&python).await;
    let bundle = TestBundle::new();
    let extra = format!(
        "external = [{:?}]\n[models.replicas]\nmin = 0\nmax = 0\n",
        mlserver.url
    );
    let gateway = TestGateway::start(&bundle.config("", &extra)).await;
    gateway
        .wait_ready_backends(1, Duration::from_secs(30))
        .await;
    let backends = gateway.backends().await;
    assert_eq!(backends["local_replicas"], 0, "{backends:#}");
    assert_eq!(backends["backends"][0]["url"], mlserver.url, "{backends:#}");

    // A JSON request from a plain HTTP client.
    let reference = Reference::load();
    let indices = [3, 7, 11];
    let (status, _, body) = gateway
        .infer(Some(&gateway.token), "digit-cnn", &reference.body(&indices))
        .await;
    assert_eq!(status, 200, "{body}");
    gateway_support::assert_logits(&reference, &indices, &body);

    // Triton's client with JSON and with binary tensors, which MLServer cannot read:
    // the gateway passes them on as JSON and re-encodes the response.
    gateway_support::check_with_tritonclient(&python, &gateway).await;

    // The gateway itself rejects a request the model cannot take, naming the input.
    let wrong = serde_json::json!({"inputs": [
        {"name": "input", "shape": [1, 784], "datatype": "FP32", "data": vec![0.0; 784]}
    ]});
    let (status, _, body) = gateway
        .infer(Some(&gateway.token), "digit-cnn", &wrong)
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("[-1, 1, 28, 28]"),
        "{body}"
    );
    gateway.server.shutdown().await;
}
