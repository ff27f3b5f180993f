//! The local inference API over HTTP: health, metadata, inference against the shipped
//! onnxruntime reference outputs, and the 400 and 404 responses.

mod common;

use serde_json::{Value, json};

use common::{ApiServer, Reference, digit_bundle};
use fleet_device::model::SharedModel;

/// Largest difference allowed between our logits and onnxruntime's.
const LOGIT_TOLERANCE: f32 = 1e-3;

/// Starts the API on the digit CNN. The folder contains the bundle and must outlive it.
fn server() -> (tempfile::TempDir, ApiServer) {
    let (dir, model) = model();
    (dir, ApiServer::start(model))
}

fn model() -> (tempfile::TempDir, SharedModel) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = digit_bundle(dir.path());
    let model = SharedModel::load(&bundle.bundle).expect("load the digit-cnn model");
    (dir, model)
}

/// Sends a request and returns the status and the body as JSON (null when empty).
fn call(request: ureq::Request, body: Option<&Value>) -> (u16, Value) {
    let result = match body {
        Some(body) => request.send_json(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("request failed: {error}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    let json = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (status, json)
}

fn infer_body(shape: &[usize], data: &[f32]) -> Value {
    json!({
        "id": "request-7",
        "inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": data}],
    })
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|output| output["name"] == name)
        .unwrap_or_else(|| panic!("no output {name:?} in {response}"))
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(found: &[f32], expected: &[f32]) {
    assert_eq!(found.len(), expected.len());
    for (index, (f, e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f - e).abs() <= LOGIT_TOLERANCE,
            "element {index}: {f} against reference {e}"
        );
    }
}

#[test]
fn health_and_readiness() {
    let (_dir, server) = server();
    let (status, _) = call(ureq::get(&server.url("/v2/health/live")), None);
    assert_eq!(status, 200);
    let (status, _) = call(ureq::get(&server.url("/v2/health/ready")), None);
    assert_eq!(status, 200);
    let (status, _) = call(ureq::get(&server.url("/v2/models/digit-cnn/ready")), None);
    assert_eq!(status, 200);
    let (status, metadata) = call(ureq::get(&server.url("/v2")), None);
    assert_eq!(status, 200);
    assert_eq!(metadata["name"], "fleet-device");

    server.state.set_ready(false);
    let (status, _) = call(ureq::get(&server.url("/v2/health/ready")), None);
    assert_eq!(status, 503);
    let (status, _) = call(ureq::get(&server.url("/v2/health/live")), None);
    assert_eq!(status, 200);
}

#[test]
fn model_metadata_lists_tensors() {
    let (_dir, server) = server();
    for path in [
        "/v2/models/digit-cnn",
        "/v2/models/digit-cnn/versions/1.0.0",
    ] {
        let (status, metadata) = call(ureq::get(&server.url(path)), None);
        assert_eq!(status, 200, "{path}");
        assert_eq!(metadata["name"], "digit-cnn");
        assert_eq!(metadata["versions"], json!(["1.0.0"]));
        assert_eq!(
            metadata["inputs"],
            json!([{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}])
        );
        let outputs: Vec<(&str, &str)> = metadata["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["name"].as_str().unwrap(), o["datatype"].as_str().unwrap()))
            .collect();
        assert_eq!(
            outputs,
            [
                ("logits", "FP32"),
                ("probabilities", "FP32"),
                ("top1_class", "INT64"),
                ("top1_label", "BYTES"),
            ]
        );
        assert_eq!(metadata["outputs"][0]["shape"], json!([-1, 10]));
    }
}

#[test]
fn infer_matches_reference_outputs() {
    let (_dir, server) = server();
    let reference = Reference::load();
    let body = infer_body(&[Reference::SAMPLES, 1, 28, 28], &reference.inputs);
    let (status, response) = call(
        ureq::post(&server.url("/v2/models/digit-cnn/infer")),
        Some(&body),
    );
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["model_name"], "digit-cnn");
    assert_eq!(response["model_version"], "1.0.0");
    assert_eq!(response["id"], "request-7");

    let logits = output(&response, "logits");
    assert_eq!(logits["datatype"], "FP32");
    assert_eq!(logits["shape"], json!([16, 10]));
    assert_close(&floats(&logits["data"]), &reference.logits);

    let probabilities = floats(&output(&response, "probabilities")["data"]);
    for (sample, row) in probabilities.chunks(Reference::CLASSES).enumerate() {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "sample {sample} sums to {sum}");
    }

    let classes = output(&response, "top1_class");
    assert_eq!(classes["shape"], json!([16]));
    let labels = output(&response, "top1_label");
    for sample in 0..Reference::SAMPLES {
        let expected = reference.class_of(sample);
        assert_eq!(classes["data"][sample], expected, "sample {sample}");
        assert_eq!(
            labels["data"][sample],
            expected.to_string(),
            "sample {sample}"
        );
    }
}

#[test]
fn infer_takes_nested_data_and_chosen_outputs() {
    let (_dir, server) = server();
    let reference = Reference::load();
    let rows: Vec<Vec<f32>> = reference.input(3).chunks(28).map(<[f32]>::to_vec).collect();
    let body = json!({
        "inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [[rows]]}],
        "outputs": [{"name": "top1_class"}],
    });
    let (status, response) = call(
        ureq::post(&server.url("/v2/models/digit-cnn/versions/1.0.0/infer")),
        Some(&body),
    );
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(
        output(&response, "top1_class")["data"],
        json!([reference.class_of(3)])
    );
    assert!(response.get("id").is_none());
}

#[test]
fn infer_takes_binary_tensor_data() {
    let (_dir, server) = server();
    let reference = Reference::load();
    let header = json!({
        "inputs": [{
            "name": "input",
            "shape": [2, 1, 28, 28],
            "datatype": "FP32",
            "parameters": {"binary_data_size": 2 * Reference::SAMPLE_LEN * 4},
        }],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    for value in &reference.inputs[..2 * Reference::SAMPLE_LEN] {
        body.extend_from_slice(&value.to_le_bytes());
    }
    let response = ureq::post(&server.url("/v2/models/digit-cnn/infer"))
        .set("Content-Type", "application/octet-stream")
        .set("Inference-Header-Content-Length", &header.len().to_string())
        .send_bytes(&body)
        .expect("binary inference request");
    let response: Value = response.into_json().unwrap();
    assert_close(
        &floats(&output(&response, "logits")["data"]),
        &reference.logits[..2 * Reference::CLASSES],
    );
}

#[test]
fn infer_returns_binary_outputs() {
    let (_dir, server) = server();
    let reference = Reference::load();
    let body = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{
            "name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
            "data": &reference.inputs[..2 * Reference::SAMPLE_LEN],
        }],
        "outputs": [
            {"name": "logits"},
            {"name": "top1_label"},
            {"name": "top1_class", "parameters": {"binary_data": false}},
        ],
    });
    let response = ureq::post(&server.url("/v2/models/digit-cnn/infer"))
        .send_json(body)
        .expect("inference request");
    let json_len: usize = response
        .header("Inference-Header-Content-Length")
        .expect("binary response")
        .parse()
        .unwrap();
    assert_eq!(
        response.header("Content-Type"),
        Some("application/octet-stream")
    );
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    let header: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    let binary = &bytes[json_len..];

    let logits = output(&header, "logits");
    let logits_len = 2 * Reference::CLASSES * 4;
    assert_eq!(logits["parameters"]["binary_data_size"], logits_len);
    assert!(logits.get("data").is_none(), "{header}");
    let values: Vec<f32> = binary[..logits_len]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_close(&values, &reference.logits[..2 * Reference::CLASSES]);

    // Strings: a 4-byte little-endian length, then the bytes.
    let labels = &binary[logits_len..];
    let expected: Vec<u8> = (0..2)
        .flat_map(|sample| {
            let label = reference.class_of(sample).to_string();
            (label.len() as u32)
                .to_le_bytes()
                .into_iter()
                .chain(label.into_bytes())
        })
        .collect();
    assert_eq!(labels, expected.as_slice());
    let label_output = output(&header, "top1_label");
    assert_eq!(
        label_output["parameters"]["binary_data_size"],
        expected.len()
    );

    let classes = output(&header, "top1_class");
    assert_eq!(
        classes["data"],
        json!([reference.class_of(0), reference.class_of(1)])
    );
    assert!(classes.get("parameters").is_none(), "{header}");
}

#[test]
fn invalid_inputs_are_rejected() {
    let (_dir, server) = server();
    let one = vec![0.5f32; Reference::SAMPLE_LEN];
    let cases = [
        (
            json!({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": one}]}),
            vec!["unknown input \"image\"", "\"input\"", "[-1, 1, 28, 28]"],
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "FP32", "data": one}]}),
            vec!["input \"input\"", "[1, 28, 28]", "[-1, 1, 28, 28]"],
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "INT32", "data": one}]}),
            vec!["input \"input\"", "INT32", "FP32", "[-1, 1, 28, 28]"],
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [1.0, 2.0]}]}),
            vec!["input \"input\"", "2 elements", "784"],
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": ["a"]}]}),
            vec!["input \"input\"", "non-numeric"],
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [65, 1, 28, 28], "datatype": "FP32", "data": []}]}),
            vec!["input \"input\"", "[65, 1, 28, 28]", "1 to 64"],
        ),
        (json!({"inputs": []}), vec!["missing input", "\"input\""]),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": one}],
                   "outputs": [{"name": "scores"}]}),
            vec!["unknown output \"scores\"", "logits"],
        ),
        (json!({"input": []}), vec!["invalid inference request"]),
    ];
    for (body, expected) in cases {
        let (status, response) = call(
            ureq::post(&server.url("/v2/models/digit-cnn/infer")),
            Some(&body),
        );
        assert_eq!(status, 400, "{body} answered {response}");
        let error = response["error"].as_str().unwrap_or_default();
        for part in expected {
            assert!(error.contains(part), "error {error:?} lacks {part:?}");
        }
    }
}

#[test]
fn unknown_models_are_not_found() {
    let (_dir, server) = server();
    let body = infer_body(&[1, 1, 28, 28], &[0.0; Reference::SAMPLE_LEN]);
    let cases = [
        (
            ureq::get(&server.url("/v2/models/resnet")),
            None,
            "\"resnet\"",
        ),
        (
            ureq::post(&server.url("/v2/models/resnet/infer")),
            Some(&body),
            "\"resnet\"",
        ),
        (
            ureq::get(&server.url("/v2/models/digit-cnn/versions/2")),
            None,
            "version \"2\"",
        ),
        (
            ureq::get(&server.url("/v2/models/resnet/ready")),
            None,
            "\"resnet\"",
        ),
        (ureq::get(&server.url("/v1/models")), None, "no route"),
    ];
    for (request, body, expected) in cases {
        let (status, response) = call(request, body);
        assert_eq!(status, 404, "{response}");
        let error = response["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(expected),
            "error {error:?} lacks {expected:?}"
        );
    }
}

#[test]
fn api_and_loop_share_the_model() {
    let (_dir, model) = model();
    let server = ApiServer::start(model.clone());
    let reference = Reference::load();

    // A second caller runs the model directly, as the agent's inference loop does, while
    // HTTP requests come in. Every result must still match its own input.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looping = {
        let stop = stop.clone();
        let input = reference.input(5).to_vec();
        let expected = reference.logits_of(5).to_vec();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let row = model.run(1, &input).unwrap().remove(0);
                assert_close(&row, &expected);
                runs += 1;
            }
            runs
        })
    };
    let requests: Vec<_> = (0..4)
        .map(|worker| {
            let url = server.url("/v2/models/digit-cnn/infer");
            let reference = Reference::load();
            std::thread::spawn(move || {
                for round in 0..10 {
                    let sample = (worker * 10 + round) % Reference::SAMPLES;
                    let body = infer_body(&[1, 1, 28, 28], reference.input(sample));
                    let (status, response) = call(ureq::post(&url), Some(&body));
                    assert_eq!(status, 200, "{response}");
                    let logits = floats(&output(&response, "logits")["data"]);
                    assert_close(&logits, reference.logits_of(sample));
                }
            })
        })
        .collect();
    for request in requests {
        request.join().expect("request thread");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = looping.join().expect("loop thread");
    assert!(runs > 0);
}
