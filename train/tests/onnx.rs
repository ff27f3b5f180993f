//! ONNX export and import: agreement with tract, round trips, the shipped digit-cnn,
//! fine-tuning, and the teacher-logit cache.

mod common;

use std::fs;

use candle_core::Device;
use fleet_train::{
    CacheOutcome, Cnn, CnnConfig, Normalization, TeacherLogits, TrainError, compare_with_tract,
    export_and_verify, export_onnx, fine_tune, import_onnx,
};

use common::{MNIST_SHAPE, mnist_test, mnist_train, options, quick_config, repo_root};

fn digit_cnn() -> std::path::PathBuf {
    repo_root().join("models/digit-cnn/digit-cnn.onnx")
}

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn exported_student_agrees_with_tract() {
    let config = CnnConfig::student(
        MNIST_SHAPE,
        10,
        4,
        3,
        vec![16],
        Some(Normalization {
            mean: 0.1307,
            std: 0.3081,
        }),
    );
    let model = Cnn::new(config, &Device::Cpu, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("student.onnx");
    let data = mnist_test(16);
    let report = export_and_verify(&model, &path, "test student", &data, 16, 1e-4).unwrap();
    assert_eq!(report.checked_images, 16);
    assert!(report.max_abs_diff < 1e-4, "{}", report.max_abs_diff);
    assert_eq!(report.bytes, fs::metadata(&path).unwrap().len());

    let summary_params: usize = model.parameter_count();
    let imported = import_onnx(&path, &Device::Cpu).unwrap();
    assert_eq!(imported.config(), model.config());
    assert_eq!(imported.parameter_count(), summary_params);
    let images = data.scaled_batch(&(0..16).collect::<Vec<_>>());
    assert_eq!(
        imported.predict(&images, 16).unwrap(),
        model.predict(&images, 16).unwrap()
    );
}

#[test]
fn rejected_export_keeps_the_old_model() {
    let model = Cnn::new(common::tiny_student(), &Device::Cpu, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("student.onnx");
    fs::write(&path, b"previous model").unwrap();
    // No difference is below a negative tolerance, so the check always fails.
    let error = export_and_verify(&model, &path, "test", &mnist_test(4), 4, -1.0).unwrap_err();
    assert!(
        matches!(error, TrainError::ExportMismatch { .. }),
        "{error}"
    );
    assert_eq!(fs::read(&path).unwrap(), b"previous model");
    assert!(dir.path().join("student.unverified.onnx").is_file());
}

#[test]
fn imported_digit_cnn_matches_reference_logits() {
    let model = import_onnx(&digit_cnn(), &Device::Cpu).unwrap();
    assert_eq!(model.parameter_count(), 390_410);
    assert_eq!(model.config().conv_channels, [32, 64, 128]);
    assert_eq!(model.config().hidden, [256]);

    let reference = repo_root().join("models/digit-cnn/reference");
    let inputs = read_f32(&reference.join("inputs.f32"));
    let expected = read_f32(&reference.join("outputs.f32"));
    let logits = model.predict(&inputs, 16).unwrap();
    let max_diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 1e-3, "max abs diff {max_diff}");
}

#[test]
fn export_of_imported_digit_cnn_agrees_with_tract() {
    let model = import_onnx(&digit_cnn(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("digit-cnn.onnx");
    export_onnx(&model, &path, "round trip").unwrap();
    let data = mnist_test(8);
    let images = data.scaled_batch(&(0..8).collect::<Vec<_>>());
    let diff = compare_with_tract(&model, &path, &images, 8).unwrap();
    assert!(diff < 1e-3, "{diff}");
}

#[test]
fn fine_tuning_starts_from_the_onnx_weights() {
    let (train_set, test_set) = (mnist_train(64), mnist_test(200));
    let dir = tempfile::tempdir().unwrap();
    let config = fleet_train::TrainConfig {
        optimizer: fleet_train::AdamWConfig {
            learning_rate: 1e-5,
            ..Default::default()
        },
        ..quick_config(1)
    };
    let (model, report) = fine_tune(
        &digit_cnn(),
        &train_set,
        &test_set,
        &config,
        &options(dir.path(), false),
    )
    .unwrap();
    assert_eq!(model.parameter_count(), 390_410);
    // A fresh model of this size scores about 10%; the imported weights keep the
    // teacher's accuracy after a tiny step.
    assert!(report.test_accuracy > 0.95, "{}", report.test_accuracy);
}

#[test]
fn unsupported_graph_names_the_node() {
    let path = repo_root().join("models/efficientnet-lite0/efficientnet-lite0.onnx");
    let error = import_onnx(&path, &Device::Cpu).unwrap_err();
    assert!(
        matches!(error, TrainError::UnsupportedModel { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("node "), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.onnx");
    fs::write(&garbage, b"\xff\xff\xff").unwrap();
    let error = import_onnx(&garbage, &Device::Cpu).unwrap_err();
    assert!(
        error.to_string().contains("not an ONNX protobuf"),
        "{error}"
    );
}

#[test]
fn teacher_logits_are_cached() {
    let data = mnist_test(40);
    let dir = tempfile::tempdir().unwrap();
    let (computed, outcome) =
        TeacherLogits::load_or_compute(&digit_cnn(), &data, dir.path(), 16).unwrap();
    let CacheOutcome::Computed(path) = outcome else {
        panic!("a fresh cache folder cannot hit");
    };
    assert_eq!(computed.len(), 40);
    assert_eq!(computed.classes(), 10);
    let reference = read_f32(&repo_root().join("models/digit-cnn/reference/outputs.f32"));
    for (a, b) in computed
        .rows(&(0..16).collect::<Vec<_>>())
        .iter()
        .zip(&reference)
    {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }

    let (cached, outcome) =
        TeacherLogits::load_or_compute(&digit_cnn(), &data, dir.path(), 16).unwrap();
    assert_eq!(outcome, CacheOutcome::Hit(path.clone()));
    assert_eq!(cached.rows(&[0, 39]), computed.rows(&[0, 39]));

    fs::write(&path, b"FLTLOGIT damaged").unwrap();
    let (_, outcome) = TeacherLogits::load_or_compute(&digit_cnn(), &data, dir.path(), 16).unwrap();
    assert_eq!(outcome, CacheOutcome::Computed(path));
}

#[test]
fn model_file_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let model = import_onnx(&digit_cnn(), &Device::Cpu).unwrap();
    let path = dir.path().join("model.safetensors");
    fleet_train::save_model(&path, &model).unwrap();

    let loaded = fleet_train::load_model(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), model.config());
    let images = mnist_test(8).scaled_batch(&(0..8).collect::<Vec<_>>());
    assert_eq!(
        loaded.predict(&images, 8).unwrap(),
        model.predict(&images, 8).unwrap()
    );

    // A model file has no training state, so it does not resume a run.
    let error = fleet_train::Checkpoint::read(&path)
        .unwrap_err()
        .to_string();
    assert!(error.contains("fleet_train.state"), "{error}");
}

#[test]
fn candle_backend_checks_format_and_shape() {
    let dir = tempfile::tempdir().unwrap();
    let model = import_onnx(&digit_cnn(), &Device::Cpu).unwrap();
    let path = dir.path().join("model.safetensors");
    fleet_train::save_model(&path, &model).unwrap();

    let mut backend = fleet_train::load_backend("safetensors", &path, &[2, 1, 28, 28]).unwrap();
    assert_eq!(backend.name(), "candle");
    let output = backend
        .run(fleet_runtime::Tensor::new(vec![2, 1, 28, 28], vec![0.5; 2 * 28 * 28]).unwrap())
        .unwrap();
    assert_eq!(output.shape, vec![2, 10]);
    let wrong_input = fleet_runtime::Tensor::new(vec![1, 1, 28, 28], vec![0.5; 28 * 28]).unwrap();
    assert!(
        backend.run(wrong_input).is_err(),
        "a batch of the wrong size"
    );

    let error = fleet_train::load_backend("safetensors", &path, &[1, 3, 28, 28])
        .err()
        .expect("three channels for a grayscale model")
        .to_string();
    assert!(error.contains("[1, 3, 28, 28]"), "{error}");
    let error = fleet_train::load_backend("pytorch", &path, &[1, 1, 28, 28])
        .err()
        .expect("unknown format")
        .to_string();
    assert!(error.contains("\"pytorch\""), "{error}");
    assert!(error.contains("safetensors"), "{error}");
    let error = fleet_train::load_backend("safetensors", &digit_cnn(), &[1, 1, 28, 28])
        .err()
        .expect("an ONNX file is not a model file")
        .to_string();
    assert!(error.contains("digit-cnn.onnx"), "{error}");
}
