//! The error type of the training library.

use std::path::PathBuf;

/// Errors from loading data, training, checkpointing, importing and exporting models.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("failed to read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] fleet_runtime::RuntimeError),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid data set {name}: {reason}")]
    InvalidData { name: String, reason: String },
    #[error("data set {name} is empty")]
    EmptyData { name: String },
    #[error("data set {name}: images are {found}, expected {expected}")]
    ImageShapeMismatch {
        name: String,
        expected: String,
        found: String,
    },
    #[error(
        "data set {name}: label {label} of sample {index} is out of range for {classes} classes"
    )]
    LabelOutOfRange {
        name: String,
        index: usize,
        label: usize,
        classes: usize,
    },
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    #[error("{precision} training is not supported on {device}: {reason}")]
    UnsupportedPrecision {
        precision: String,
        device: String,
        reason: String,
    },
    #[error(
        "{quantity} is {value} at step {step} (epoch {epoch}), so training stopped; last good checkpoint: {}",
        last_checkpoint.as_ref().map_or("none".to_string(), |p| p.display().to_string())
    )]
    NonFiniteLoss {
        /// `loss` or `gradient norm`.
        quantity: &'static str,
        step: u64,
        epoch: usize,
        value: f32,
        last_checkpoint: Option<PathBuf>,
    },
    #[error("checkpoint {path} was saved for architecture {found}, but the model is {expected}")]
    ArchitectureMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("invalid checkpoint {path}: {reason}")]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("invalid teacher logits {name}: {reason}")]
    InvalidTeacherLogits { name: String, reason: String },
    #[error("unsupported ONNX model {path}: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },
    #[error(
        "exported model {path} disagrees with candle: max abs logit difference {max_abs_diff:e} exceeds the tolerance {tolerance:e}"
    )]
    ExportMismatch {
        path: PathBuf,
        max_abs_diff: f32,
        tolerance: f32,
    },
}

/// Result with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
