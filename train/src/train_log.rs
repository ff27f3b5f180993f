//! The JSON-lines training log: one object per line, for plotting or for tools that
//! follow a run.
//!
//! Step lines (`"kind": "step"`) come every few optimizer steps and epoch lines
//! (`"kind": "epoch"`) after each evaluation. A resumed run appends to the same file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// One line of the training log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LogRecord {
    /// Running averages since the start of the epoch, at optimizer step `step`.
    Step {
        epoch: usize,
        step: u64,
        loss: f32,
        distill_loss: f32,
        label_loss: f32,
        /// Accuracy on the augmented training batches of this epoch so far, 0 to 1.
        train_accuracy: f64,
        learning_rate: f64,
        /// Global gradient norm of this step, before clipping.
        grad_norm: f32,
        elapsed_seconds: f64,
    },
    /// The end of an epoch.
    Epoch(EpochRecord),
}

/// Summary of one finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    /// Optimizer steps completed.
    pub step: u64,
    /// Mean training loss over the epoch.
    pub loss: f32,
    /// Accuracy on the augmented training batches, 0 to 1.
    pub train_accuracy: f64,
    /// Accuracy on the evaluation set, 0 to 1.
    pub test_accuracy: f64,
    /// Learning rate of the epoch's last step.
    pub learning_rate: f64,
    /// Training time since the run began, summed over resumed runs, in seconds.
    pub elapsed_seconds: f64,
}

/// Appends [`LogRecord`]s to a file, flushing after each line so that a crash loses at
/// most the line being written.
#[derive(Debug)]
pub struct TrainLog {
    path: PathBuf,
    writer: BufWriter<File>,
}

impl TrainLog {
    /// Opens `path` for appending, creating it and its folder when missing.
    pub fn append(path: &Path) -> Result<TrainLog> {
        let write_error = |source| TrainError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(write_error)?;
        Ok(TrainLog {
            path: path.to_path_buf(),
            writer: BufWriter::new(file),
        })
    }

    /// Writes one record as a line.
    pub fn write(&mut self, record: &LogRecord) -> Result<()> {
        let line = serde_json::to_string(record).expect("log records serialise to JSON");
        let write_error = |source| TrainError::Write {
            path: self.path.clone(),
            source,
        };
        writeln!(self.writer, "{line}").map_err(write_error)?;
        self.writer.flush().map_err(write_error)
    }
}
