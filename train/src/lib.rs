//! Training in candle for the fleet's models: distillation of a small student from an
//! ONNX teacher, and fine-tuning of an existing ONNX model on new data.
//!
//! The pieces, in the order a run uses them:
//!
//! - [`ImageSet`] reads labelled images (MNIST IDX files or folders of photos), and
//!   [`Loader`] turns them into seeded, shuffled and augmented batches.
//! - [`TeacherLogits`] runs the teacher once with tract and caches its logits on disk.
//! - [`Cnn`] is the model family (3x3 convolution blocks and fully connected layers);
//!   [`CnnConfig::student`] sizes a student by width and depth.
//! - [`train`] runs AdamW with a learning-rate schedule, gradient clipping, dropout and
//!   label smoothing, saves a checkpoint per epoch and writes a JSON-lines log.
//! - [`export_and_verify`] writes the result as ONNX and checks tract against candle.
//!
//! Trained models also run on devices: [`save_model`] writes the safetensors model file
//! a bundle carries, and [`load_backend`] loads a bundle's model with the backend its
//! format needs, [`CandleBackend`] for that file and tract for ONNX.
//!
//! ```no_run
//! use std::path::Path;
//! use fleet_train::{CnnConfig, ImageSet, ImageShape, RunOptions, TeacherLogits, TrainConfig};
//!
//! let shape = ImageShape { channels: 1, height: 28, width: 28 };
//! let mnist = Path::new("models/mnist");
//! let train_set = ImageSet::from_idx(
//!     &mnist.join("train-images-idx3-ubyte.gz"),
//!     &mnist.join("train-labels-idx1-ubyte.gz"),
//!     shape,
//!     10,
//! )?;
//! let test_set = ImageSet::from_idx(
//!     &mnist.join("t10k-images-idx3-ubyte.gz"),
//!     &mnist.join("t10k-labels-idx1-ubyte.gz"),
//!     shape,
//!     10,
//! )?;
//! let teacher = Path::new("models/digit-cnn/digit-cnn.onnx");
//! let (logits, _) =
//!     TeacherLogits::load_or_compute(teacher, &train_set, Path::new("target/teacher"), 256)?;
//! let student = CnnConfig::student(shape, 10, 16, 3, vec![], None);
//! let options = RunOptions {
//!     checkpoint_dir: "target/student".into(),
//!     log_path: Some("target/student/log.jsonl".into()),
//!     resume: false,
//!     show_progress: true,
//! };
//! let (model, report) =
//!     fleet_train::distill(student, &logits, &train_set, &test_set, &TrainConfig::default(), &options)?;
//! println!("{} parameters, {:.2}% on the test set", model.parameter_count(), 100.0 * report.test_accuracy);
//! # Ok::<(), fleet_train::TrainError>(())
//! ```

mod atomic;
mod augment;
mod backend;
mod checkpoint;
mod data;
mod device;
mod error;
mod export;
mod import;
mod kernels;
mod loader;
mod loss;
mod model;
mod optim;
mod schedule;
mod teacher;
mod train_log;
mod trainer;

/// The candle device type, so that callers need no direct candle dependency.
pub use candle_core::Device;

pub use atomic::write_atomically;
pub use augment::{Augmentation, DigitAugmentation, PhotoAugmentation, TrainRng};
pub use backend::{
    CANDLE_DEVICE_VARIABLE, CandleBackend, ONNX_FORMAT, SAFETENSORS_FORMAT, inference_device,
    load_backend,
};
pub use checkpoint::{
    Checkpoint, TrainingState, checkpoint_path, latest_checkpoint, load_model, save_checkpoint,
    save_model,
};
pub use data::{ImageSet, ImageShape};
pub use device::{DeviceKind, Precision, select_device};
pub use error::{Result, TrainError};
pub use export::{
    DEFAULT_TOLERANCE, ExportReport, INPUT_NAME, OPSET, OUTPUT_NAME, compare_with_tract,
    export_and_verify, export_onnx,
};
pub use import::import_onnx;
pub use loader::{Batch, Loader};
pub use loss::{
    LossConfig, LossTerms, correct_predictions, distillation_kl, smoothed_cross_entropy,
    training_loss,
};
pub use model::{Cnn, CnnConfig, Dropout, Normalization, Parameter};
pub use optim::{AdamW, AdamWConfig, clip_factor};
pub use schedule::LrSchedule;
pub use teacher::{CacheOutcome, TeacherLogits};
pub use train_log::{EpochRecord, LogRecord, TrainLog};
pub use trainer::{RunOptions, TrainConfig, TrainReport, accuracy, train};

/// Trains a new `student` on `train_set` against the teacher's `logits` (one row per
/// training image), evaluating on `test_set` after every epoch. Resumes from the latest
/// checkpoint when `options.resume` is set.
pub fn distill(
    student: CnnConfig,
    logits: &TeacherLogits,
    train_set: &ImageSet,
    test_set: &ImageSet,
    config: &TrainConfig,
    options: &RunOptions,
) -> Result<(Cnn, TrainReport)> {
    let (device, dtype) = select_device(config.device, config.precision)?;
    let mut model = Cnn::new(student, &device, config.seed)?;
    model.set_compute_dtype(dtype);
    tracing::info!(
        architecture = %model.config(),
        parameters = model.parameter_count(),
        images = train_set.len(),
        "distilling"
    );
    let report = train(
        &mut model,
        train_set,
        Some(logits),
        test_set,
        config,
        options,
    )?;
    Ok((model, report))
}

/// Fine-tunes the ONNX model at `onnx` on `train_set`: its Conv and Gemm weights are
/// imported into a [`Cnn`] (see [`import_onnx`] for the graphs it accepts) and trained
/// on the labels alone. Export the result with [`export_and_verify`].
pub fn fine_tune(
    onnx: &std::path::Path,
    train_set: &ImageSet,
    test_set: &ImageSet,
    config: &TrainConfig,
    options: &RunOptions,
) -> Result<(Cnn, TrainReport)> {
    let (device, dtype) = select_device(config.device, config.precision)?;
    let mut model = import_onnx(onnx, &device)?;
    model.set_compute_dtype(dtype);
    tracing::info!(
        model = %onnx.display(),
        parameters = model.parameter_count(),
        images = train_set.len(),
        "fine-tuning"
    );
    let report = train(&mut model, train_set, None, test_set, config, options)?;
    Ok((model, report))
}
