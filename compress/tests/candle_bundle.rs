//! Bundles for the candle backend: the ONNX model converted to a safetensors model file,
//! checked against tract before it is written, with a self-test candle reproduces.

use std::path::{Path, PathBuf};

use fleet_bundle::Bundle;
use fleet_compress::{BundleRuntime, Recipe, build_bundle};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

#[test]
fn candle_bundle_of_student() {
    let recipe = Recipe::read(&repo_path("models/digit-student/bundle.toml")).unwrap();
    let (secret, public) = fleet_bundle::generate_key_pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    build_bundle(&recipe, &secret, &out, false, BundleRuntime::Candle).unwrap();

    let bundle = Bundle::open_verified(&out, &public).expect("signed bundle");
    assert_eq!(bundle.manifest.model.format, "safetensors");
    assert_eq!(bundle.manifest.model.path, "model.safetensors");
    assert!(bundle.manifest.self_test.is_some(), "no self-test recorded");
    let report = fleet_runtime::run_self_test_with(&bundle, |path, shape| {
        fleet_train::load_backend("safetensors", path, shape)
    })
    .expect("candle reproduces the self-test");
    assert_eq!(report.samples, 4);

    // tract cannot read the converted file, so the format in the manifest matters.
    assert!(fleet_runtime::run_self_test(&bundle).is_err());
}

#[test]
fn unconvertible_model_rejected_for_candle() {
    let recipe = Recipe::read(&repo_path("models/efficientnet-lite0/bundle.toml")).unwrap();
    let (secret, _) = fleet_bundle::generate_key_pair().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bundle");
    let error = build_bundle(&recipe, &secret, &out, false, BundleRuntime::Candle)
        .expect_err("EfficientNet-Lite0 is not in the digit CNN family");
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot be converted for candle"),
        "{message}"
    );
    assert!(message.contains("efficientnet"), "{message}");
    assert!(!out.exists(), "nothing written for a failed conversion");
}
