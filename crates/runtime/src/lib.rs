//! Inference for bundles: backends behind one trait, preprocessing described by the
//! bundle manifest, and the labelled data sources devices and the compressor read.
//!
//! ```no_run
//! use fleet_bundle::{Bundle, PublicKey};
//! use fleet_runtime::{Classifier, Dataset};
//!
//! let key = PublicKey::read("keys/fleet.pub".as_ref())?;
//! let bundle = Bundle::open_verified("bundles/digit-cnn".as_ref(), &key)?;
//! let mut classifier = Classifier::load(&bundle, 1)?;
//! let data = Dataset::open_idx(
//!     "models/mnist/t10k-images-idx3-ubyte.gz".as_ref(),
//!     Some("models/mnist/t10k-labels-idx1-ubyte.gz".as_ref()),
//! )?;
//! let prediction = classifier.classify(&[data.sample(0)?])?.remove(0);
//! println!("class {} with confidence {:.3}", prediction.top1().class, prediction.top1().confidence);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod classifier;
mod dataset;
pub mod int8;
mod preprocess;
mod self_test;
mod tract_backend;

pub use backend::{Backend, Tensor};
pub use classifier::{ClassScore, Classifier, ClassifierConfig, Prediction, softmax};
pub use dataset::{Dataset, Sample, SampleData};
pub use int8::onnx;
pub use preprocess::preprocess;
pub use self_test::{
    SELF_TEST_INPUTS, SELF_TEST_OUTPUTS, SelfTestError, SelfTestReport, check_self_test,
    relative_differences, run_self_test, run_self_test_with, self_test_entry, write_f32,
};
pub use tract_backend::TractBackend;

use std::path::PathBuf;

/// Errors from loading a model, preparing inputs or running inference.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load model {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("inference failed in {backend}: {reason}")]
    Inference {
        backend: &'static str,
        reason: String,
    },
    #[error("input has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("image {sample} could not be decoded: {reason}")]
    Decode { sample: String, reason: String },
    #[error("invalid data set {path}: {reason}")]
    InvalidDataset { path: PathBuf, reason: String },
    #[error("sample index {index} is out of range for a data set of {len} samples")]
    SampleOutOfRange { index: usize, len: usize },
    #[error("preprocessing does not fit the model: {0}")]
    PreprocessingMismatch(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Bundle(#[from] fleet_bundle::BundleError),
}
