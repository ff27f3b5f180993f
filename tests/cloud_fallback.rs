//! Cloud fallback end to end. An agent's local inference API sends a low-confidence
//! request to the real gateway of `fleet server`, which runs the model on a replica
//! process and accepts the device's secret. The fallback is counted in telemetry, and a
//! remote configuration change turns the threshold off again. Requests in binary tensor
//! data take the same path.

mod common;

use std::time::Duration;

use common::{Workspace, free_port, path_str, repo, unique_device_id, wait_for};
use serde_json::{Value, json};

const SAMPLE_LEN: usize = 28 * 28;

/// Returns an ambiguous input: the average of the first two preprocessed reference
/// inputs of the digit model (a 7 and a 2). A clear digit gets a softmax confidence of
/// exactly 1.0 in f32, which no threshold can be over.
fn ambiguous_input() -> Vec<f32> {
    let bytes = std::fs::read(repo().join("models/digit-cnn/reference/inputs.f32")).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .take(2 * SAMPLE_LEN)
        .map(|chunk| f32::from_le_bytes(chunk.try_into().unwrap()))
        .collect();
    let (seven, two) = values.split_at(SAMPLE_LEN);
    seven.iter().zip(two).map(|(a, b)| (a + b) / 2.0).collect()
}

/// Calls the agent's local inference API and returns the status, the
/// `fleet-inference-source` and `fleet-fallback-reason` headers and the body.
fn infer(api: &str, input: &[f32]) -> (u16, Option<String>, Option<String>, Value) {
    let body = json!({
        "inputs": [{ "name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": input }],
    });
    let response = match ureq::post(&format!("{api}/v2/models/digit-cnn/infer")).send_json(body) {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("local inference API: {error}"),
    };
    let header = |name: &str| response.header(name).map(str::to_string);
    let (source, reason) = (
        header("fleet-inference-source"),
        header("fleet-fallback-reason"),
    );
    (
        response.status(),
        source,
        reason,
        response.into_json().unwrap(),
    )
}

/// Calls the agent's local inference API with the input and the output as binary tensor
/// data, as Triton's client does by default, and returns the status, the
/// `fleet-inference-source` header, the JSON part and the logits.
fn infer_binary(api: &str, input: &[f32]) -> (u16, Option<String>, Value, Vec<f32>) {
    let section = fleet_oip::encode_f32(input);
    let json = json!({
        "inputs": [{ "name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                     "parameters": { "binary_data_size": section.len() } }],
        "outputs": [{ "name": "logits", "parameters": { "binary_data": true } }],
    });
    let (body, json_length) = fleet_oip::join_body(serde_json::to_vec(&json).unwrap(), [section]);

    let response = match ureq::post(&format!("{api}/v2/models/digit-cnn/infer"))
        .set(fleet_oip::JSON_LENGTH_HEADER, &json_length.to_string())
        .send_bytes(&body)
    {
        Ok(response) | Err(ureq::Error::Status(_, response)) => response,
        Err(error) => panic!("local inference API: {error}"),
    };
    let status = response.status();
    let source = response
        .header("fleet-inference-source")
        .map(str::to_string);
    let json_length: usize = response
        .header(fleet_oip::JSON_LENGTH_HEADER)
        .and_then(|value| value.parse().ok())
        .unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
    if json_length > bytes.len() {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        panic!("binary answer expected, got status {status}: {text}");
    }
    let head: Value = serde_json::from_slice(&bytes[..json_length]).unwrap();
    let logits = fleet_oip::decode_f32("logits", &bytes[json_length..], 10).unwrap();
    (status, source, head, logits)
}

#[test]
fn low_confidence_reaches_gateway() {
    let workspace = Workspace::new();
    let gateway = workspace.path("gateway.toml");
    std::fs::write(
        &gateway,
        "[[models]]\nname = \"digit-cnn\"\nbundle = \"bundle\"\npublic_key = \"keys/fleet.pub\"\n\
         [models.replicas]\nmin = 1\nmax = 1\n",
    )
    .unwrap();
    let mqtt_port = free_port();
    let server =
        workspace.start_server_with(None, mqtt_port, &["--gateway-config", path_str(&gateway)]);
    wait_for(Duration::from_secs(60), "a ready gateway replica", || {
        ureq::get(&format!("{}/v2/health/ready", server.base))
            .call()
            .ok()
            .map(|_| ())
    });

    let device_id = unique_device_id("fallback");
    let api = format!("127.0.0.1:{}", free_port());
    // Any result with top-1 confidence under 1 goes to the cloud.
    let _device = workspace.start_device(
        &device_id,
        &format!("mqtt://127.0.0.1:{mqtt_port}"),
        &[
            "--interval",
            "0.5",
            "--api-listen",
            &api,
            "--server",
            &server.base,
            "--fallback-threshold",
            "1.0",
        ],
    );
    let api = format!("http://{api}");
    wait_for(Duration::from_secs(30), "the local inference API", || {
        ureq::get(&format!("{api}/v2/health/ready"))
            .call()
            .ok()
            .map(|_| ())
    });

    let input = ambiguous_input();
    let (status, source, reason, body) = infer(&api, &input);
    assert_eq!(status, 200, "{body}");
    assert_eq!(source.as_deref(), Some("cloud"), "{body}");
    assert_eq!(reason.as_deref(), Some("low_confidence"), "{body}");
    let logits = body["outputs"][0]["data"].as_array().expect("cloud logits");
    assert_eq!(logits.len(), 10, "{body}");
    let served = server.get("/api/gateway/backends");
    let requests: u64 = served["digit-cnn"]["backends"]
        .as_array()
        .expect("backend list")
        .iter()
        .filter_map(|backend| backend["served"].as_u64())
        .sum();
    assert!(requests >= 1, "no backend served the request: {served}");

    // The same request in binary tensor data goes through the gateway as well, and the
    // logits come back in binary, equal to the JSON answer's.
    let (status, source, head, binary_logits) = infer_binary(&api, &input);
    assert_eq!(status, 200, "{head}");
    assert_eq!(source.as_deref(), Some("cloud"), "{head}");
    for (binary, json) in binary_logits.iter().zip(logits) {
        let json = json.as_f64().unwrap() as f32;
        assert!((binary - json).abs() < 1e-5, "{binary} vs {json}");
    }

    wait_for(
        Duration::from_secs(30),
        "the fallback counted in telemetry",
        || {
            let count = server.metric("fleet_device_fallbacks_total{reason=\"low_confidence\"}");
            (count >= 1.0).then_some(())
        },
    );

    // Threshold 0: no confidence is under it, so the local model serves the request.
    let change = server.put_config(&device_id, &json!({ "fallback_threshold": 0.0 }));
    let change_id = change["change_id"].as_str().expect("change id");
    let acked = server.wait_for_config_ack(&device_id, change_id);
    assert_eq!(acked["status"], "applied", "{acked}");
    let (status, source, reason, body) = infer(&api, &input);
    assert_eq!(status, 200, "{body}");
    assert_eq!(source.as_deref(), Some("local"), "{body}");
    assert_eq!(reason, None, "{body}");
}
