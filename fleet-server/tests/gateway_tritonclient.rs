//! Drives the gateway with NVIDIA's Python `tritonclient[http]`, an independent Open
//! Inference Protocol client. Skipped, with the reason printed, when the virtual
//! environment from `scripts/setup-python-clients` is missing.

mod gateway_support;

use std::path::PathBuf;
use std::time::Duration;

use gateway_support::{CLASSES, TestBundle, TestGateway, models_dir};

const CLIENT_SCRIPT: &str = r#"
import json, sys
import numpy as np
import tritonclient.http as http

address, token, inputs_path = sys.argv[1:4]
headers = {"Authorization": "Bearer " + token}
client = http.InferenceServerClient(url=address)
assert client.is_server_live()
assert client.is_server_ready()
assert client.is_model_ready("digit-cnn", headers=headers)
metadata = client.get_model_metadata("digit-cnn", headers=headers)
assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28], metadata
samples = np.fromfile(inputs_path, dtype="<f4").reshape(16, 1, 28, 28)[:4]
tensor = http.InferInput("input", [4, 1, 28, 28], "FP32")
tensor.set_data_from_numpy(samples, binary_data=False)
output = http.InferRequestedOutput("logits", binary_data=False)
result = client.infer("digit-cnn", [tensor], outputs=[output], headers=headers, request_id="py-1")
print(json.dumps({"id": result.get_response()["id"], "logits": result.as_numpy("logits").tolist()}))
"#;

fn venv_python() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/python-clients/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_infers_through_gateway() {
    let python = venv_python();
    if !python.exists() {
        eprintln!(
            "skipped: {} is missing; run scripts/setup-python-clients to create it",
            python.display()
        );
        return;
    }
    let bundle = TestBundle::new();
    let gateway = TestGateway::start(&bundle.config("", "")).await;
    gateway
        .wait_ready_backends(1, Duration::from_secs(60))
        .await;
    let inputs = models_dir().join("digit-cnn/reference/inputs.f32");
    let address = gateway.base.trim_start_matches("http://").to_owned();
    let token = gateway.token.clone();
    let output = tokio::process::Command::new(&python)
        .args(["-c", CLIENT_SCRIPT, &address, &token])
        .arg(&inputs)
        .output()
        .await
        .expect("run tritonclient script");
    assert!(
        output.status.success(),
        "tritonclient script failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("script prints JSON");
    assert_eq!(answer["id"], "py-1");
    let reference = gateway_support::Reference::load();
    let rows = answer["logits"].as_array().expect("logits rows");
    assert_eq!(rows.len(), 4);
    for (index, row) in rows.iter().enumerate() {
        for class in 0..CLASSES {
            let found = row[class].as_f64().unwrap() as f32;
            let expected = reference.expected(index)[class];
            assert!(
                (found - expected).abs() < 1e-3,
                "sample {index}: {found} vs {expected}"
            );
        }
    }
    gateway.server.shutdown().await;
}
