//! The training loop shared by distillation and fine-tuning.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::augment::Augmentation;
use crate::checkpoint::{
    Checkpoint, TrainingState, checkpoint_path, latest_checkpoint, save_checkpoint,
};
use crate::data::ImageSet;
use crate::device::{DeviceKind, Precision};
use crate::loader::{Batch, Loader, derived_rng, stream};
use crate::loss::{LossConfig, correct_predictions, training_loss};
use crate::model::{Cnn, Dropout};
use crate::optim::{AdamW, AdamWConfig, clip_factor};
use crate::schedule::LrSchedule;
use crate::teacher::TeacherLogits;
use crate::train_log::{EpochRecord, LogRecord, TrainLog};
use crate::{Result, TrainError};

/// Hyperparameters of a run, as written in a recipe's `[training]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Seeds weight initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    /// Largest global L2 norm of the gradients; larger ones are scaled down to it.
    pub max_grad_norm: Option<f32>,
    /// Probability of zeroing an input of a fully connected layer during training.
    pub dropout: f32,
    pub loss: LossConfig,
    pub augmentation: Augmentation,
    pub device: DeviceKind,
    pub precision: Precision,
    /// Optimizer steps between two step lines of the training log.
    pub log_every: usize,
    /// Images per batch when measuring accuracy.
    pub eval_batch_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            seed: 1,
            optimizer: AdamWConfig::default(),
            schedule: LrSchedule::default(),
            max_grad_norm: Some(5.0),
            dropout: 0.1,
            loss: LossConfig::default(),
            augmentation: Augmentation::None,
            device: DeviceKind::Cpu,
            precision: Precision::F32,
            log_every: 50,
            eval_batch_size: 1000,
        }
    }
}

impl TrainConfig {
    /// Checks every field, naming the first one that is out of range.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 || self.batch_size == 0 || self.eval_batch_size == 0 {
            return Err(TrainError::InvalidConfig(format!(
                "epochs = {}, batch_size = {} and eval_batch_size = {} must all be at least 1",
                self.epochs, self.batch_size, self.eval_batch_size
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(TrainError::InvalidConfig(format!(
                "dropout is {}, expected at least 0 and below 1",
                self.dropout
            )));
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            return Err(TrainError::InvalidConfig(format!(
                "max_grad_norm is {norm}, expected a positive number"
            )));
        }
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.loss.validate()?;
        self.augmentation.validate()
    }
}

/// The files and progress reporting of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Folder of the per-epoch checkpoints.
    pub checkpoint_dir: PathBuf,
    /// JSON-lines training log; appended to when resuming.
    pub log_path: Option<PathBuf>,
    /// Continue from the latest checkpoint in `checkpoint_dir`, if there is one.
    pub resume: bool,
    /// Draw progress bars on standard error (only when it is a terminal).
    pub show_progress: bool,
}

/// The outcome of [`train`].
#[derive(Debug, Clone)]
pub struct TrainReport {
    /// The epochs run by this call, not those of a resumed run before it.
    pub epochs: Vec<EpochRecord>,
    /// The checkpoint this call started from.
    pub resumed_from: Option<PathBuf>,
    /// Checkpoint of the last epoch.
    pub last_checkpoint: Option<PathBuf>,
    /// Accuracy of the final model on the evaluation set, 0 to 1.
    pub test_accuracy: f64,
    /// Training time summed over resumed runs, in seconds.
    pub elapsed_seconds: f64,
}

/// Trains `model` on `train_set` for `config.epochs` epochs, evaluating on `test_set`
/// and saving a checkpoint after each epoch.
///
/// With `teacher`, the loss mixes distillation from its logits (one row per training
/// image) with the label term, weighted by `config.loss`. Without a teacher only the
/// label term counts. A loss or gradient norm that is not finite stops the run with
/// [`TrainError::NonFiniteLoss`], and the checkpoints already saved stay as they are.
pub fn train(
    model: &mut Cnn,
    train_set: &ImageSet,
    teacher: Option<&TeacherLogits>,
    test_set: &ImageSet,
    config: &TrainConfig,
    options: &RunOptions,
) -> Result<TrainReport> {
    config.validate()?;
    check_inputs(model, train_set, teacher, test_set, config)?;
    let mut optimizer = AdamW::new(model.parameters(), config.optimizer.clone())?;
    let resumed = resume(model, &mut optimizer, config, options)?;
    let mut log = options
        .log_path
        .as_deref()
        .map(TrainLog::append)
        .transpose()?;

    let loader = Loader::new(
        train_set,
        config.batch_size,
        config.seed,
        config.augmentation.clone(),
    );
    let mut run = Run {
        model,
        optimizer,
        teacher,
        config,
        steps_per_epoch: loader.batches_per_epoch() as u64,
        step: resumed.as_ref().map_or(0, |c| c.state.step),
        elapsed_before: resumed.as_ref().map_or(0.0, |c| c.state.elapsed_seconds),
        started: Instant::now(),
        last_checkpoint: resumed.as_ref().map(|c| c.path.clone()),
        log: log.as_mut(),
    };
    let first_epoch = resumed.as_ref().map_or(0, |c| c.state.epoch) + 1;
    let mut epochs = Vec::new();
    for epoch in first_epoch..=config.epochs {
        let _span = tracing::info_span!("epoch", epoch).entered();
        let (loss, train_accuracy, learning_rate) = run.train_epoch(&loader, epoch, options)?;
        let test_accuracy = accuracy(run.model, test_set, config.eval_batch_size)?;
        let record = EpochRecord {
            epoch,
            step: run.step,
            loss,
            train_accuracy,
            test_accuracy,
            learning_rate,
            elapsed_seconds: run.elapsed(),
        };
        run.finish_epoch(&record, options)?;
        epochs.push(record);
    }

    let test_accuracy = match epochs.last() {
        Some(record) => record.test_accuracy,
        None => accuracy(run.model, test_set, config.eval_batch_size)?,
    };
    Ok(TrainReport {
        epochs,
        resumed_from: resumed.map(|c| c.path),
        last_checkpoint: run.last_checkpoint.clone(),
        test_accuracy,
        elapsed_seconds: run.elapsed(),
    })
}

/// Returns the accuracy of `model` on `data`, 0 to 1.
pub fn accuracy(model: &Cnn, data: &ImageSet, batch_size: usize) -> Result<f64> {
    Ok(model.count_correct(data, batch_size)? as f64 / data.len() as f64)
}

fn check_inputs(
    model: &Cnn,
    train_set: &ImageSet,
    teacher: Option<&TeacherLogits>,
    test_set: &ImageSet,
    config: &TrainConfig,
) -> Result<()> {
    let architecture = model.config();
    for set in [train_set, test_set] {
        if set.is_empty() {
            return Err(TrainError::EmptyData {
                name: set.name().to_string(),
            });
        }
        if set.shape() != architecture.input {
            return Err(TrainError::ImageShapeMismatch {
                name: set.name().to_string(),
                expected: architecture.input.to_string(),
                found: set.shape().to_string(),
            });
        }
        if set.classes() != architecture.classes {
            return Err(TrainError::InvalidData {
                name: set.name().to_string(),
                reason: format!(
                    "labels index {} classes, the model has {}",
                    set.classes(),
                    architecture.classes
                ),
            });
        }
    }
    match teacher {
        Some(teacher)
            if teacher.len() != train_set.len() || teacher.classes() != architecture.classes =>
        {
            Err(TrainError::InvalidTeacherLogits {
                name: train_set.name().to_string(),
                reason: format!(
                    "{} rows of {} logits for {} images of {} classes",
                    teacher.len(),
                    teacher.classes(),
                    train_set.len(),
                    architecture.classes
                ),
            })
        }
        None if config.loss.label_weight == 0.0 => Err(TrainError::InvalidConfig(
            "without a teacher only the label term trains, but loss.label_weight is 0".into(),
        )),
        _ => Ok(()),
    }
}

/// Loads the latest checkpoint into `model` and `optimizer` when resuming.
fn resume(
    model: &Cnn,
    optimizer: &mut AdamW,
    config: &TrainConfig,
    options: &RunOptions,
) -> Result<Option<Checkpoint>> {
    if !options.resume {
        return Ok(None);
    }
    let Some(path) = latest_checkpoint(&options.checkpoint_dir)? else {
        tracing::info!(dir = %options.checkpoint_dir.display(), "no checkpoint to resume from, starting fresh");
        return Ok(None);
    };
    let checkpoint = Checkpoint::read(&path)?;
    if checkpoint.state.seed != config.seed {
        return Err(TrainError::InvalidConfig(format!(
            "checkpoint {} was trained with seed {}, the configuration has seed {}; \
             restore the seed to resume, or start a fresh run without resuming",
            path.display(),
            checkpoint.state.seed,
            config.seed
        )));
    }
    checkpoint.restore(model, optimizer)?;
    tracing::info!(
        checkpoint = %path.display(),
        epoch = checkpoint.state.epoch,
        step = checkpoint.state.step,
        "resuming"
    );
    Ok(Some(checkpoint))
}

/// The mutable state of a run between epochs.
struct Run<'a> {
    model: &'a mut Cnn,
    optimizer: AdamW,
    teacher: Option<&'a TeacherLogits>,
    config: &'a TrainConfig,
    steps_per_epoch: u64,
    /// Optimizer steps completed, counted from the start of the first run.
    step: u64,
    elapsed_before: f64,
    started: Instant,
    last_checkpoint: Option<PathBuf>,
    log: Option<&'a mut TrainLog>,
}

/// Sums over the steps of one epoch.
#[derive(Default)]
struct EpochTotals {
    loss: f64,
    distill: f64,
    label: f64,
    correct: usize,
    images: usize,
    batches: usize,
}

impl EpochTotals {
    fn mean(&self, sum: f64) -> f32 {
        (sum / self.batches.max(1) as f64) as f32
    }

    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.images.max(1) as f64
    }
}

impl Run<'_> {
    fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Runs one epoch and returns its mean loss, training accuracy and last rate.
    fn train_epoch(
        &mut self,
        loader: &Loader<'_>,
        epoch: usize,
        options: &RunOptions,
    ) -> Result<(f32, f64, f64)> {
        let progress = epoch_progress(
            loader.batches_per_epoch(),
            epoch,
            self.config.epochs,
            options,
        );
        let mut totals = EpochTotals::default();
        let mut learning_rate = 0.0;
        for batch in loader.epoch(epoch) {
            learning_rate = self.learning_rate();
            let grad_norm = self.train_step(&batch, epoch, learning_rate, &mut totals)?;
            if self
                .step
                .is_multiple_of(self.config.log_every.max(1) as u64)
            {
                self.log_step(epoch, &totals, learning_rate, grad_norm)?;
            }
            progress.set_message(format!(
                "loss {:.4} acc {:.2}%",
                totals.mean(totals.loss),
                100.0 * totals.accuracy()
            ));
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok((totals.mean(totals.loss), totals.accuracy(), learning_rate))
    }

    fn learning_rate(&self) -> f64 {
        let total_steps = self.steps_per_epoch * self.config.epochs as u64;
        self.config.schedule.learning_rate(
            self.config.optimizer.learning_rate,
            self.step,
            self.steps_per_epoch,
            total_steps,
        )
    }

    /// Forward, loss, backward, clipping and one optimizer update; returns the
    /// gradient norm before clipping.
    fn train_step(
        &mut self,
        batch: &Batch,
        epoch: usize,
        learning_rate: f64,
        totals: &mut EpochTotals,
    ) -> Result<f32> {
        let device = self.model.device().clone();
        let images = batch.images_tensor(&device)?;
        let labels = batch.labels_tensor(&device)?;
        let teacher_logits = match self.teacher {
            Some(teacher) => Some(candle_core::Tensor::from_vec(
                teacher.rows(&batch.indices),
                (batch.len(), teacher.classes()),
                &device,
            )?),
            None => None,
        };
        let mut rng = derived_rng(self.config.seed, stream::DROPOUT, &[self.step]);
        let dropout = Dropout {
            probability: self.config.dropout,
            rng: &mut rng,
        };
        let logits = self.model.forward(&images, Some(dropout))?;
        let terms = training_loss(&self.config.loss, &logits, teacher_logits.as_ref(), &labels)?;
        let loss: f32 = terms.total.to_scalar()?;
        self.check_finite("loss", loss, epoch)?;

        let grads = terms.total.backward()?;
        let (grad_norm, scale) =
            clip_factor(self.model.parameters(), &grads, self.config.max_grad_norm)?;
        self.check_finite("gradient norm", grad_norm, epoch)?;
        self.optimizer
            .step(self.model.parameters(), &grads, learning_rate, scale)?;
        self.step += 1;

        totals.loss += f64::from(loss);
        totals.distill += f64::from(terms.distill);
        totals.label += f64::from(terms.label);
        totals.correct += correct_predictions(&logits, &batch.labels)?;
        totals.images += batch.len();
        totals.batches += 1;
        Ok(grad_norm)
    }

    /// Stops the run when `value` is NaN or infinite, before any update uses it.
    fn check_finite(&self, quantity: &'static str, value: f32, epoch: usize) -> Result<()> {
        if value.is_finite() {
            return Ok(());
        }
        tracing::error!(quantity, %value, step = self.step + 1, epoch, "training diverged");
        Err(TrainError::NonFiniteLoss {
            quantity,
            step: self.step + 1,
            epoch,
            value,
            last_checkpoint: self.last_checkpoint.clone(),
        })
    }

    fn log_step(
        &mut self,
        epoch: usize,
        totals: &EpochTotals,
        learning_rate: f64,
        grad_norm: f32,
    ) -> Result<()> {
        let record = LogRecord::Step {
            epoch,
            step: self.step,
            loss: totals.mean(totals.loss),
            distill_loss: totals.mean(totals.distill),
            label_loss: totals.mean(totals.label),
            train_accuracy: totals.accuracy(),
            learning_rate,
            grad_norm,
            elapsed_seconds: self.elapsed(),
        };
        match self.log.as_deref_mut() {
            Some(log) => log.write(&record),
            None => Ok(()),
        }
    }

    /// Saves the epoch's checkpoint and writes its log line.
    fn finish_epoch(&mut self, record: &EpochRecord, options: &RunOptions) -> Result<()> {
        let path = checkpoint_path(&options.checkpoint_dir, record.epoch);
        let state = TrainingState {
            epoch: record.epoch,
            step: self.step,
            seed: self.config.seed,
            elapsed_seconds: record.elapsed_seconds,
            test_accuracy: Some(record.test_accuracy),
        };
        save_checkpoint(&path, self.model, &self.optimizer, &state)?;
        self.last_checkpoint = Some(path);
        tracing::info!(
            epoch = record.epoch,
            step = record.step,
            loss = record.loss,
            train_accuracy = record.train_accuracy,
            test_accuracy = record.test_accuracy,
            learning_rate = record.learning_rate,
            elapsed_seconds = record.elapsed_seconds,
            "epoch finished"
        );
        match self.log.as_deref_mut() {
            Some(log) => log.write(&LogRecord::Epoch(record.clone())),
            None => Ok(()),
        }
    }
}

fn epoch_progress(
    batches: usize,
    epoch: usize,
    epochs: usize,
    options: &RunOptions,
) -> ProgressBar {
    if !options.show_progress {
        return ProgressBar::hidden();
    }
    ProgressBar::new(batches as u64).with_style(
        ProgressStyle::with_template(&format!(
            "epoch {epoch}/{epochs} {{bar:30}} {{pos}}/{{len}} {{msg}} eta {{eta}}"
        ))
        .expect("progress template is valid"),
    )
}
