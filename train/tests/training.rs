//! The training loop: determinism, checkpoints and resuming, divergence, and the
//! settings it rejects.

mod common;

use std::collections::HashMap;
use std::fs;

use candle_core::{Device, Tensor};
use fleet_train::{
    AdamWConfig, Checkpoint, Cnn, CnnConfig, LogRecord, Precision, TeacherLogits, TrainConfig,
    TrainError, checkpoint_path, distill, select_device, train,
};

use common::{MNIST_SHAPE, mnist_test, mnist_train, options, quick_config, tiny_student};

/// Teacher logits that favour each image's label, standing in for a real teacher.
fn label_logits(labels: &[u32]) -> TeacherLogits {
    let values = labels
        .iter()
        .flat_map(|&label| (0..10).map(move |c| if c == label { 4.0 } else { 0.0 }))
        .collect();
    TeacherLogits::new("labels", values, labels.len(), 10).unwrap()
}

fn values(tensors: &HashMap<String, Tensor>) -> Vec<(String, Vec<f32>)> {
    let mut out: Vec<_> = tensors
        .iter()
        .map(|(name, t)| (name.clone(), t.flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let (train_set, test_set) = (mnist_train(96), mnist_test(64));
    let teacher = label_logits(train_set.labels());
    let config = quick_config(1);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let (model, report) = distill(
            tiny_student(),
            &teacher,
            &train_set,
            &test_set,
            &config,
            &options(dir.path(), false),
        )
        .unwrap();
        assert_eq!(report.epochs.len(), 1);
        runs.push(values(&model.tensors()));
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let (train_set, test_set) = (mnist_train(96), mnist_test(64));
    let teacher = label_logits(train_set.labels());

    let straight = tempfile::tempdir().unwrap();
    let (uninterrupted, _) = distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(2),
        &options(straight.path(), false),
    )
    .unwrap();

    let split = tempfile::tempdir().unwrap();
    distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(1),
        &options(split.path(), false),
    )
    .unwrap();
    let (resumed, report) = distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(2),
        &options(split.path(), true),
    )
    .unwrap();

    assert_eq!(
        report.resumed_from.as_deref(),
        Some(checkpoint_path(&split.path().join("checkpoints"), 1).as_path())
    );
    assert_eq!(report.epochs.len(), 1);
    assert_eq!(report.epochs[0].epoch, 2);
    assert_eq!(values(&uninterrupted.tensors()), values(&resumed.tensors()));

    let log = fs::read_to_string(split.path().join("log.jsonl")).unwrap();
    let records: Vec<LogRecord> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let epochs: Vec<usize> = records
        .iter()
        .filter_map(|r| match r {
            LogRecord::Epoch(e) => Some(e.epoch),
            LogRecord::Step { .. } => None,
        })
        .collect();
    assert_eq!(epochs, [1, 2]);
    assert!(records.iter().any(|r| matches!(r, LogRecord::Step { .. })));
}

#[test]
fn checkpoint_of_another_architecture_is_rejected() {
    let (train_set, test_set) = (mnist_train(32), mnist_test(32));
    let teacher = label_logits(train_set.labels());
    let dir = tempfile::tempdir().unwrap();
    distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(1),
        &options(dir.path(), false),
    )
    .unwrap();

    let wider = CnnConfig::student(MNIST_SHAPE, 10, 6, 2, vec![8], None);
    let error = distill(
        wider,
        &teacher,
        &train_set,
        &test_set,
        &quick_config(2),
        &options(dir.path(), true),
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::ArchitectureMismatch { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("conv [4, 8]"), "{error}");
    assert!(error.to_string().contains("conv [6, 12]"), "{error}");
}

#[test]
fn damaged_checkpoint_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("epoch-001.safetensors");
    fs::write(&path, b"not a checkpoint").unwrap();
    let error = Checkpoint::read(&path).unwrap_err();
    assert!(
        matches!(error, TrainError::InvalidCheckpoint { .. }),
        "{error}"
    );
}

#[test]
fn diverging_run_stops_and_keeps_the_last_checkpoint() {
    let (train_set, test_set) = (mnist_train(64), mnist_test(32));
    let teacher = label_logits(train_set.labels());
    let dir = tempfile::tempdir().unwrap();
    distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(1),
        &options(dir.path(), false),
    )
    .unwrap();
    let good = checkpoint_path(&dir.path().join("checkpoints"), 1);
    let saved = fs::read(&good).unwrap();

    // A learning rate of 1e30 moves every weight by about 1e30 in the first update,
    // so the next forward pass overflows.
    let diverging = TrainConfig {
        optimizer: AdamWConfig {
            learning_rate: 1e30,
            ..AdamWConfig::default()
        },
        max_grad_norm: None,
        ..quick_config(3)
    };
    let error = distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &diverging,
        &options(dir.path(), true),
    )
    .unwrap_err();
    let TrainError::NonFiniteLoss {
        step,
        epoch,
        last_checkpoint,
        ..
    } = &error
    else {
        panic!("expected a non-finite loss, got {error}");
    };
    assert_eq!(*epoch, 2);
    assert!(*step > 2, "step {step} is not after the resumed ones");
    assert_eq!(last_checkpoint.as_deref(), Some(good.as_path()));
    assert!(
        error.to_string().contains(&format!("step {step}")),
        "{error}"
    );
    assert_eq!(fs::read(&good).unwrap(), saved);
    assert!(!checkpoint_path(&dir.path().join("checkpoints"), 2).exists());
}

#[test]
fn teacher_rows_must_match_the_images() {
    let (train_set, test_set) = (mnist_train(32), mnist_test(32));
    let teacher = label_logits(&train_set.labels()[..16]);
    let dir = tempfile::tempdir().unwrap();
    let error = distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(1),
        &options(dir.path(), false),
    )
    .unwrap_err();
    assert!(error.to_string().contains("16 rows"), "{error}");
}

#[test]
fn empty_training_set_is_rejected() {
    let (mut train_set, test_set) = (mnist_train(32), mnist_test(32));
    let teacher = label_logits(train_set.labels());
    train_set.truncate(0);
    let dir = tempfile::tempdir().unwrap();
    let error = distill(
        tiny_student(),
        &teacher,
        &train_set,
        &test_set,
        &quick_config(1),
        &options(dir.path(), false),
    )
    .unwrap_err();
    assert!(matches!(error, TrainError::EmptyData { .. }), "{error}");

    let model = common::repo_root().join("models/digit-cnn/digit-cnn.onnx");
    let error = TeacherLogits::compute(&model, &train_set, 16).unwrap_err();
    assert!(matches!(error, TrainError::EmptyData { .. }), "{error}");
}

#[test]
fn non_finite_teacher_logits_are_rejected() {
    let mut values = vec![0.0; 20];
    values[13] = f32::NAN;
    let error = TeacherLogits::new("t", values, 2, 10).unwrap_err();
    assert!(error.to_string().contains("logit 3 of image 1"), "{error}");
}

#[test]
fn half_precision_on_cpu_is_rejected() {
    for precision in [Precision::F16, Precision::Bf16] {
        let error = select_device(fleet_train::DeviceKind::Cpu, precision).unwrap_err();
        assert!(
            matches!(error, TrainError::UnsupportedPrecision { .. }),
            "{error}"
        );
        assert!(
            error.to_string().contains("not supported on the CPU"),
            "{error}"
        );
    }
}

#[test]
fn invalid_training_settings_are_rejected() {
    let cases = [
        (
            TrainConfig {
                epochs: 0,
                ..TrainConfig::default()
            },
            "epochs = 0",
        ),
        (
            TrainConfig {
                dropout: 1.0,
                ..TrainConfig::default()
            },
            "dropout",
        ),
        (
            TrainConfig {
                max_grad_norm: Some(-1.0),
                ..TrainConfig::default()
            },
            "max_grad_norm",
        ),
    ];
    for (config, expected) in cases {
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn images_of_another_shape_are_rejected() {
    let (train_set, test_set) = (mnist_train(32), mnist_test(32));
    let other = fleet_train::ImageShape {
        channels: 1,
        height: 14,
        width: 14,
    };
    let mut model = Cnn::new(
        CnnConfig::student(other, 10, 4, 1, vec![], None),
        &Device::Cpu,
        1,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let error = train(
        &mut model,
        &train_set,
        None,
        &test_set,
        &quick_config(1),
        &options(dir.path(), false),
    )
    .unwrap_err();
    assert!(
        matches!(error, TrainError::ImageShapeMismatch { .. }),
        "{error}"
    );
}
