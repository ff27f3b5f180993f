//! The manifest: what a bundle contains and how to feed its model.

use serde::{Deserialize, Serialize};

/// Manifest layout version this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// Description of a bundle, signed as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Layout version, [`MANIFEST_FORMAT`].
    pub format: u32,
    pub name: String,
    pub version: String,
    /// Hardware the model was prepared for, `any` for portable float models.
    pub target: String,
    /// Tool and version that wrote the bundle.
    pub created_by: String,
    pub model: ModelFile,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub preprocessing: Preprocessing,
    pub postprocessing: Postprocessing,
    /// Bundle-relative path of a text file with one class name per line, in index order.
    pub labels: Option<String>,
    /// Accuracy, size and latency measured when the bundle was built.
    pub metrics: Option<Metrics>,
    /// Reference inputs and the outputs the model gave for them when the bundle was
    /// built; a device reproduces them before it switches to the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_test: Option<SelfTest>,
    /// Every file of the bundle with its size and SHA-256, checked before use.
    pub files: Vec<FileEntry>,
}

/// Reference inputs with expected outputs, stored as raw little-endian `f32` files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfTest {
    /// Bundle-relative path of the preprocessed inputs, `samples` of them back to back.
    pub inputs: String,
    /// Bundle-relative path of the first output of each input, back to back.
    pub outputs: String,
    pub samples: u32,
    /// Largest accepted difference per output element, relative to the largest magnitude
    /// in that sample's expected output (or to 1 when that is smaller). The top-1 class
    /// must match as well.
    pub tolerance: f32,
}

/// The model file inside the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    /// Bundle-relative path.
    pub path: String,
    /// File format; `onnx` is the only one so far.
    pub format: String,
}

/// Name, element type and shape of one model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    /// Element type in Open Inference Protocol spelling, such as `FP32`.
    pub datatype: String,
    /// Dimensions, with -1 for a dimension chosen at run time (the batch size).
    pub shape: Vec<i64>,
}

/// Recipe that turns raw inputs into the model's input tensor.
///
/// Every variant produces `value * scale + offset` per element from pixel values in
/// 0..=255, laid out as NCHW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Preprocessing {
    /// One-channel images, such as IDX digit files or grayscale photos.
    Grayscale {
        width: u32,
        height: u32,
        resize: ResizeFilter,
        scale: f32,
        offset: f32,
    },
    /// Three-channel RGB images.
    Rgb {
        width: u32,
        height: u32,
        resize: ResizeFilter,
        scale: f32,
        offset: f32,
    },
}

impl Preprocessing {
    /// Returns `(channels, height, width)` of one preprocessed sample.
    pub fn sample_shape(&self) -> (usize, usize, usize) {
        match *self {
            Preprocessing::Grayscale { width, height, .. } => (1, height as usize, width as usize),
            Preprocessing::Rgb { width, height, .. } => (3, height as usize, width as usize),
        }
    }
}

/// Interpolation used when an input image does not have the model's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    Bilinear,
    Nearest,
}

/// Step that turns the model's output into class confidences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Postprocessing {
    /// The model outputs logits; confidences are their softmax.
    Softmax,
    /// The model already outputs probabilities.
    Identity,
}

/// Measurements taken by the compressor when it built the bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Data set the accuracy was measured on, such as `MNIST test set (10000 images)`.
    pub dataset: String,
    pub samples: u64,
    /// Fraction of samples whose top-1 class matched the label, 0 to 1.
    pub top1_accuracy: f64,
    /// Size of the model file in bytes.
    pub model_bytes: u64,
    /// Median latency of one single-sample inference in milliseconds.
    pub latency_ms_p50: f64,
    /// Backend and build the latency was measured with, such as `tract 0.23, 1 thread`.
    pub measured_with: String,
}

/// One file of the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Bundle-relative path with `/` separators.
    pub path: String,
    pub size: u64,
    /// Lowercase hex SHA-256 of the contents.
    pub sha256: String,
}
