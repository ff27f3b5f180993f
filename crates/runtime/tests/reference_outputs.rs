//! tract's outputs on the shipped models next to onnxruntime's on the same inputs.
//!
//! `models/*/reference/` contains input tensors and the logits onnxruntime computed for them
//! (written by each model's `build.py`). The largest absolute difference is printed so
//! the model cards can quote it, and must stay under a tolerance that float32 reordering
//! explains.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_runtime::{Backend, Tensor, TractBackend};

/// Largest absolute logit difference accepted between tract and onnxruntime.
const TOLERANCE: f32 = 1e-3;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn shape_of(reference: &serde_json::Value, key: &str) -> Vec<usize> {
    reference[key]
        .as_array()
        .unwrap_or_else(|| panic!("reference.json lacks {key}"))
        .iter()
        .map(|d| d.as_u64().expect("dimension is a number") as usize)
        .collect()
}

/// Runs every reference input one at a time and returns the largest difference.
fn max_difference(model: &str) -> f32 {
    let dir = models_dir().join(model);
    let reference: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("reference/reference.json")).unwrap()).unwrap();
    let input_shape = shape_of(&reference, "input_shape");
    let output_shape = shape_of(&reference, "output_shape");
    let inputs = read_f32(
        &dir.join("reference")
            .join(reference["input"].as_str().unwrap()),
    );
    let expected = read_f32(
        &dir.join("reference")
            .join(reference["output"].as_str().unwrap()),
    );

    let mut single = input_shape.clone();
    single[0] = 1;
    let mut backend = TractBackend::load_onnx(&dir.join(format!("{model}.onnx")), &single).unwrap();
    let input_len: usize = input_shape[1..].iter().product();
    let output_len: usize = output_shape[1..].iter().product();
    let mut worst = 0f32;
    for row in 0..input_shape[0] {
        let input = inputs[row * input_len..(row + 1) * input_len].to_vec();
        let output = backend
            .run(Tensor::new(single.clone(), input).unwrap())
            .unwrap();
        assert_eq!(output.data.len(), output_len);
        let want = &expected[row * output_len..(row + 1) * output_len];
        for (got, want) in output.data.iter().zip(want) {
            worst = worst.max((got - want).abs());
        }
    }
    worst
}

#[test]
fn digit_cnn_matches_onnxruntime() {
    let worst = max_difference("digit-cnn");
    println!("digit-cnn: max |tract - onnxruntime| = {worst:e}");
    assert!(worst < TOLERANCE, "max difference {worst}");
}

#[test]
fn efficientnet_lite0_matches_onnxruntime() {
    let worst = max_difference("efficientnet-lite0");
    println!("efficientnet-lite0: max |tract - onnxruntime| = {worst:e}");
    assert!(worst < TOLERANCE, "max difference {worst}");
}
