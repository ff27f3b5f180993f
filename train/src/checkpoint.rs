//! Checkpoints: the model's parameters, the optimizer's moments and the run's position,
//! in one safetensors file per epoch.
//!
//! The safetensors header metadata carries the architecture and the training state as
//! JSON, so that resuming can reject a checkpoint of another architecture before
//! touching any tensor. Files are written to a temporary name and renamed, so an
//! interrupted save leaves the previous checkpoints as they were.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::atomic::write_atomically;
use crate::model::{Cnn, CnnConfig};
use crate::optim::AdamW;
use crate::{Result, TrainError};

const FORMAT_KEY: &str = "fleet_train.format";
const FORMAT_VERSION: &str = "1";
const ARCHITECTURE_KEY: &str = "fleet_train.architecture";
const STATE_KEY: &str = "fleet_train.state";
/// Prefix of the tensors that hold parameters; optimizer moments start with `adamw.`.
const MODEL_PREFIX: &str = "model.";

/// The position of a run when its checkpoint is saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// Seed of the run, which resuming must reuse to see the same batches.
    pub seed: u64,
    /// Training time so far, in seconds, summed over resumed runs.
    pub elapsed_seconds: f64,
    /// Accuracy on the evaluation set after this epoch, 0 to 1.
    pub test_accuracy: Option<f64>,
}

/// Path of the checkpoint of `epoch` in `dir`: `epoch-007.safetensors`.
pub fn checkpoint_path(dir: &Path, epoch: usize) -> PathBuf {
    dir.join(format!("epoch-{epoch:03}.safetensors"))
}

/// Returns the checkpoint of the highest epoch in `dir`, or `None` when there is none
/// (or `dir` does not exist).
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TrainError::Read {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut latest: Option<(usize, PathBuf)> = None;
    for entry in entries {
        let path = entry
            .map_err(|source| TrainError::Read {
                path: dir.to_path_buf(),
                source,
            })?
            .path();
        let epoch = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("epoch-")?.strip_suffix(".safetensors"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(epoch) = epoch
            && latest.as_ref().is_none_or(|(best, _)| epoch > *best)
        {
            latest = Some((epoch, path));
        }
    }
    Ok(latest.map(|(_, path)| path))
}

/// Saves the model, the optimizer state and `state` to `path`, atomically.
pub fn save_checkpoint(
    path: &Path,
    model: &Cnn,
    optimizer: &AdamW,
    state: &TrainingState,
) -> Result<()> {
    let json_error = |error: serde_json::Error| TrainError::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason: format!("state does not serialise: {error}"),
    };
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
        (
            ARCHITECTURE_KEY.to_string(),
            serde_json::to_string(model.config()).map_err(json_error)?,
        ),
        (
            STATE_KEY.to_string(),
            serde_json::to_string(state).map_err(json_error)?,
        ),
    ]);
    let mut tensors: Vec<(String, Tensor)> = model
        .tensors()
        .into_iter()
        .map(|(name, tensor)| (format!("{MODEL_PREFIX}{name}"), tensor))
        .collect();
    tensors.extend(optimizer.state_tensors());
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|error| {
        TrainError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: format!("tensors do not serialise: {error}"),
        }
    })?;
    write_atomically(path, &bytes)?;
    tracing::debug!(path = %path.display(), epoch = state.epoch, step = state.step, "checkpoint saved");
    Ok(())
}

/// Saves only the model's architecture and parameters to `path`, atomically: the form
/// a bundle carries for the candle backend. [`load_model`] reads it, and checkpoints too.
pub fn save_model(path: &Path, model: &Cnn) -> Result<()> {
    let architecture =
        serde_json::to_string(model.config()).map_err(|error| TrainError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: format!("architecture does not serialise: {error}"),
        })?;
    let metadata = HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
        (ARCHITECTURE_KEY.to_string(), architecture),
    ]);
    let tensors: Vec<(String, Tensor)> = model
        .tensors()
        .into_iter()
        .map(|(name, tensor)| (format!("{MODEL_PREFIX}{name}"), tensor))
        .collect();
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|error| {
        TrainError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: format!("tensors do not serialise: {error}"),
        }
    })?;
    write_atomically(path, &bytes)
}

/// Loads the model of a file written by [`save_model`] or [`save_checkpoint`] onto
/// `device`, ignoring any optimizer state.
pub fn load_model(path: &Path, device: &candle_core::Device) -> Result<Cnn> {
    let file = ModelFile::read(path)?;
    let architecture = file.architecture()?;
    Cnn::from_tensors(architecture, &file.model_tensors(), device).map_err(|error| {
        TrainError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason: error.to_string(),
        }
    })
}

/// A safetensors file written by this crate: its metadata and tensors, on the CPU.
struct ModelFile {
    path: PathBuf,
    metadata: HashMap<String, String>,
    tensors: HashMap<String, Tensor>,
}

impl ModelFile {
    fn read(path: &Path) -> Result<ModelFile> {
        let bytes = fs::read(path).map_err(|source| TrainError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| TrainError::InvalidCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|error| invalid(format!("not a safetensors file: {error}")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let file = ModelFile {
            path: path.to_path_buf(),
            metadata,
            tensors: HashMap::new(),
        };
        let format = file.field(FORMAT_KEY)?;
        if format != FORMAT_VERSION {
            return Err(invalid(format!(
                "format version {format}, this build reads {FORMAT_VERSION}"
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu)
            .map_err(|error| invalid(format!("tensors do not load: {error}")))?;
        Ok(ModelFile { tensors, ..file })
    }

    fn invalid(&self, reason: String) -> TrainError {
        TrainError::InvalidCheckpoint {
            path: self.path.clone(),
            reason,
        }
    }

    fn field(&self, key: &str) -> Result<&str> {
        self.metadata.get(key).map(String::as_str).ok_or_else(|| {
            self.invalid(format!(
                "metadata has no {key}; it was not written by fleet-train"
            ))
        })
    }

    fn architecture(&self) -> Result<CnnConfig> {
        serde_json::from_str(self.field(ARCHITECTURE_KEY)?)
            .map_err(|error| self.invalid(format!("architecture does not parse: {error}")))
    }

    fn model_tensors(&self) -> HashMap<String, Tensor> {
        model_tensors(&self.tensors)
    }
}

/// Returns the model's parameters among `tensors`, without their name prefix.
fn model_tensors(tensors: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(name, tensor)| {
            let name = name.strip_prefix(MODEL_PREFIX)?;
            Some((name.to_string(), tensor.clone()))
        })
        .collect()
}

/// A checkpoint read from disk, before it is applied to a model.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub architecture: CnnConfig,
    pub state: TrainingState,
    tensors: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Reads a checkpoint and its metadata; tensors are loaded on the CPU.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let file = ModelFile::read(path)?;
        let architecture = file.architecture()?;
        let state: TrainingState = serde_json::from_str(file.field(STATE_KEY)?)
            .map_err(|error| file.invalid(format!("training state does not parse: {error}")))?;
        Ok(Checkpoint {
            path: file.path,
            architecture,
            state,
            tensors: file.tensors,
        })
    }

    /// Builds a model of the saved architecture with the saved parameters.
    pub fn to_model(&self, device: &candle_core::Device) -> Result<Cnn> {
        Cnn::from_tensors(self.architecture.clone(), &self.model_tensors(), device)
    }

    /// Copies the saved parameters into `model` and the saved moments into
    /// `optimizer`, after checking that `model` has the saved architecture.
    pub fn restore(&self, model: &Cnn, optimizer: &mut AdamW) -> Result<()> {
        if model.config() != &self.architecture {
            return Err(TrainError::ArchitectureMismatch {
                path: self.path.clone(),
                expected: model.config().to_string(),
                found: self.architecture.to_string(),
            });
        }
        let invalid = |error: TrainError| TrainError::InvalidCheckpoint {
            path: self.path.clone(),
            reason: error.to_string(),
        };
        model.load_tensors(&self.model_tensors()).map_err(invalid)?;
        optimizer
            .load_state(self.state.step, &self.tensors)
            .map_err(invalid)
    }

    fn model_tensors(&self) -> HashMap<String, Tensor> {
        model_tensors(&self.tensors)
    }
}
