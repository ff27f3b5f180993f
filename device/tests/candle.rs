//! The candle backend in the agent: a bundle whose model is a safetensors conversion of
//! the digit CNN loads through the same path as ONNX bundles, reproduces onnxruntime's
//! reference logits and serves the local inference API.

mod common;

use common::{ApiServer, Reference, candle_digit_bundle, digit_bundle};
use fleet_device::model::SharedModel;
use serde_json::{Value, json};

/// Largest accepted difference from onnxruntime's logits, as for the tract bundle.
const LOGIT_TOLERANCE: f32 = 1e-3;

fn candle_model(dir: &tempfile::TempDir) -> SharedModel {
    let bundle = candle_digit_bundle(dir.path());
    assert_eq!(bundle.bundle.manifest.model.format, "safetensors");
    SharedModel::load(&bundle.bundle).expect("load the candle bundle")
}

#[test]
fn candle_bundle_matches_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = candle_model(&dir);
    assert_eq!(model.backend_name(), "candle");
    let reference = Reference::load();
    for sample in 0..Reference::SAMPLES {
        let rows = model.run(1, reference.input(sample)).expect("run candle");
        assert_eq!(rows.len(), 1);
        let expected = reference.logits_of(sample);
        assert_eq!(rows[0].len(), expected.len(), "sample {sample}");
        for (index, (found, expected)) in rows[0].iter().zip(expected).enumerate() {
            assert!(
                (found - expected).abs() <= LOGIT_TOLERANCE,
                "sample {sample}, logit {index}: candle {found}, onnxruntime {expected}"
            );
        }
    }
}

#[test]
fn candle_and_tract_agree_on_batches() {
    let dir = tempfile::tempdir().unwrap();
    let candle = candle_model(&dir);
    let tract_dir = tempfile::tempdir().unwrap();
    let tract = SharedModel::load(&digit_bundle(tract_dir.path()).bundle).expect("load tract");
    assert_eq!(tract.backend_name(), "tract");
    let reference = Reference::load();
    let from_candle = candle
        .run(Reference::SAMPLES, &reference.inputs)
        .expect("run candle");
    let from_tract = tract
        .run(Reference::SAMPLES, &reference.inputs)
        .expect("run tract");
    assert_eq!(from_candle.len(), Reference::SAMPLES);
    for (sample, (a, b)) in from_candle.iter().zip(&from_tract).enumerate() {
        for (index, (a, b)) in a.iter().zip(b).enumerate() {
            assert!(
                (a - b).abs() <= LOGIT_TOLERANCE,
                "sample {sample}, logit {index}: candle {a}, tract {b}"
            );
        }
    }
}

#[test]
fn candle_bundle_serves_inference_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = ApiServer::start(candle_model(&dir));
    let reference = Reference::load();
    let data = [reference.input(0), reference.input(1)].concat();
    let body = json!({
        "inputs": [{
            "name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32", "data": data,
        }],
    });
    let response: Value = ureq::post(&server.url("/v2/models/digit-cnn/infer"))
        .send_json(body)
        .expect("infer")
        .into_json()
        .expect("JSON body");
    let classes = response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|output| output["name"] == "top1_class")
        .unwrap_or_else(|| panic!("no top1_class in {response}"));
    assert_eq!(
        classes["data"],
        json!([reference.class_of(0), reference.class_of(1)])
    );
}
