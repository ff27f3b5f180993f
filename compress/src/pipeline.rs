//! One command from a float model to a signed bundle: the recipe's `[pipeline]` names
//! the compression steps and the accuracy budget, and the result ships only if it loads
//! in tract and meets the budget.
//!
//! ```toml
//! [pipeline]
//! steps = [
//!     { kind = "prune-channels", fraction = 0.25 },
//!     { kind = "quantize", method = "min-max", compute = "integer" },
//! ]
//! budget = { max_accuracy_drop = 0.5 }
//! ```
//!
//! Every intermediate model is measured. A `quantize` step under a budget returns the
//! most sensitive layers to float until the budget is met (see
//! [`Workbench::mixed_precision`]). The bundle's manifest carries the final model's
//! accuracy, size and latency, and `compression.json` inside the bundle (so covered by
//! the signature) and beside it records every step.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_bundle::{Bundle, BundleFile, Metrics, SecretKey};
use serde::{Deserialize, Serialize};

use crate::calibrate::CalibrationMethod;
use crate::fp16::{self, Fp16Mode};
use crate::graph::OnnxModel;
use crate::prune;
use crate::variants::{Budget, Compute, Measured, QuantizeOptions, Workbench};
use crate::{Recipe, inspect};

/// The `[pipeline]` section of a recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    pub steps: Vec<Step>,
    #[serde(default)]
    pub budget: Budget,
    /// Comparison samples each layer's sensitivity is measured on.
    #[serde(default = "default_sensitivity_samples")]
    pub sensitivity_samples: usize,
}

fn default_sensitivity_samples() -> usize {
    100
}

/// One compression step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Step {
    /// Remove this fraction of output channels from every prunable layer.
    PruneChannels {
        fraction: f64,
    },
    /// Zero this fraction of each layer's smallest weights.
    PruneWeights {
        sparsity: f64,
    },
    Quantize {
        #[serde(default = "default_method", with = "method_name")]
        method: CalibrationMethod,
        #[serde(default = "default_compute")]
        compute: Compute,
        #[serde(default)]
        keep_float: Vec<String>,
        /// Correct each int8 layer's bias for the shift rounding its weights causes.
        #[serde(default = "default_bias_correction")]
        bias_correction: bool,
    },
    Fp16 {
        mode: Fp16Mode,
    },
    /// Retrain the current model on labelled IDX images, to recover accuracy after
    /// pruning. Only graphs the training crate can import (the digit model family:
    /// Conv/Relu/MaxPool blocks and Gemm layers) are accepted.
    FineTune {
        images: PathBuf,
        labels: PathBuf,
        /// Use the first this many training images.
        limit: Option<usize>,
        #[serde(default = "default_epochs")]
        epochs: usize,
        #[serde(default = "default_learning_rate")]
        learning_rate: f64,
    },
}

fn default_epochs() -> usize {
    1
}

fn default_learning_rate() -> f64 {
    1e-4
}

impl PipelineSpec {
    /// Resolves the steps' relative paths against the recipe's folder.
    pub fn resolve(&mut self, base: &Path) {
        for step in &mut self.steps {
            if let Step::FineTune { images, labels, .. } = step {
                *images = base.join(&*images);
                *labels = base.join(&*labels);
            }
        }
    }
}

fn default_method() -> CalibrationMethod {
    CalibrationMethod::MinMax
}

fn default_compute() -> Compute {
    Compute::Integer
}

fn default_bias_correction() -> bool {
    true
}

/// Calibration methods as their command-line names (`min-max`, `percentile-99.99`).
mod method_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::calibrate::CalibrationMethod;

    pub fn serialize<S: Serializer>(method: &CalibrationMethod, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(method)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CalibrationMethod, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Measurements of a pipeline run, as written to `compression.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PipelineReport {
    pub recipe: String,
    pub calibration: String,
    pub comparison: String,
    pub budget: Budget,
    /// The float model first, then the model after each step.
    pub measurements: Vec<Measured>,
    pub steps: Vec<StepReport>,
}

/// Record of one step.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub step: Step,
    pub details: serde_json::Value,
}

/// Runs the recipe's pipeline and writes the signed bundle to `out_dir`, with the
/// report as `compression.json` inside and `<out_dir>.report.json` beside it.
pub fn run_pipeline(
    recipe: &Recipe,
    key: &SecretKey,
    out_dir: &Path,
    latency_runs: usize,
    show_progress: bool,
) -> anyhow::Result<(Bundle, PipelineReport)> {
    let spec = recipe
        .pipeline
        .as_ref()
        .with_context(|| format!("recipe {} has no [pipeline] section", recipe.name))?;
    anyhow::ensure!(!spec.steps.is_empty(), "the pipeline has no steps");
    let workbench = Workbench::open(recipe, show_progress)?;
    let float = workbench.measure("fp32", &workbench.float, latency_runs)?;
    let mut report = PipelineReport {
        recipe: recipe.name.clone(),
        calibration: workbench.calibration.description.clone(),
        comparison: workbench.comparison.description.clone(),
        budget: spec.budget,
        measurements: vec![float.clone()],
        steps: Vec::new(),
    };
    let mut model = workbench.float.clone();
    for (index, step) in spec.steps.iter().enumerate() {
        let label = format!("{}:{}", index + 1, step_name(step));
        let (next, details, measured) = match step {
            Step::PruneChannels { fraction } => {
                let (next, layers) = prune::prune_channels(&model, *fraction)?;
                anyhow::ensure!(
                    !layers.is_empty(),
                    "step {label}: no layer's channels can be pruned (prune before quantize or fp16)"
                );
                let measured = workbench.measure(&label, &next, latency_runs)?;
                (next, serde_json::to_value(layers)?, measured)
            }
            Step::PruneWeights { sparsity } => {
                let (next, layers) = prune::prune_unstructured(&model, *sparsity)?;
                anyhow::ensure!(
                    !layers.is_empty(),
                    "step {label}: no float Conv or Gemm weight to prune (prune before quantize or fp16)"
                );
                let measured = workbench.measure(&label, &next, latency_runs)?;
                (next, serde_json::to_value(layers)?, measured)
            }
            Step::Quantize {
                method,
                compute,
                keep_float,
                bias_correction,
            } => {
                anyhow::ensure!(
                    !crate::quantize::layers(&model)?.is_empty(),
                    "step {label}: no Conv or Gemm with float weights to quantize \
                     (quantize before fp16, and only once)"
                );
                let options = QuantizeOptions {
                    method: *method,
                    compute: *compute,
                    keep_float: keep_float.clone(),
                    bias_correction: *bias_correction,
                };
                let outcome = workbench.mixed_precision(
                    &model,
                    &options,
                    &spec.budget,
                    &float,
                    spec.sensitivity_samples,
                    latency_runs,
                )?;
                let measured = Measured {
                    variant: label.clone(),
                    ..outcome.result.clone()
                };
                let details = serde_json::to_value(&outcome)?;
                (outcome.model, details, measured)
            }
            Step::Fp16 { mode } => {
                let (next, fp16_report) = fp16::convert(&model, *mode)?;
                anyhow::ensure!(
                    fp16_report.converted_tensors > 0,
                    "step {label}: the model holds no float32 weight to convert"
                );
                let measured = workbench.measure(&label, &next, latency_runs)?;
                (next, serde_json::to_value(fp16_report)?, measured)
            }
            Step::FineTune {
                images,
                labels,
                limit,
                epochs,
                learning_rate,
            } => {
                let (next, train_report) = fine_tune(
                    recipe,
                    &workbench,
                    &model,
                    (images, labels, *limit),
                    *epochs,
                    *learning_rate,
                    show_progress,
                )?;
                let measured = workbench.measure(&label, &next, latency_runs)?;
                (next, train_report, measured)
            }
        };
        report.measurements.push(measured);
        report.steps.push(StepReport {
            step: step.clone(),
            details,
        });
        model = next;
    }
    let last = report.measurements.last().expect("at least one step");
    if let Some(violation) = spec.budget.violation(last, &float) {
        anyhow::bail!(
            "the compressed model misses the budget, so no bundle was written: {violation}"
        );
    }
    let bundle = write_pipeline_bundle(recipe, &workbench, &model, last, &report, key, out_dir)?;
    let beside = PathBuf::from(format!("{}.report.json", out_dir.display()));
    std::fs::write(&beside, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("failed to write {}", beside.display()))?;
    Ok((bundle, report))
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::PruneChannels { .. } => "prune-channels",
        Step::PruneWeights { .. } => "prune-weights",
        Step::Quantize { .. } => "quantize",
        Step::Fp16 { .. } => "fp16",
        Step::FineTune { .. } => "fine-tune",
    }
}

/// Images of the evaluation set the training loop reports accuracy on.
const FINE_TUNE_TEST_IMAGES: usize = 2000;

/// Retrains `model` with the training crate and reads the verified export back.
fn fine_tune(
    recipe: &Recipe,
    workbench: &Workbench,
    model: &OnnxModel,
    (images, labels, limit): (&Path, &Path, Option<usize>),
    epochs: usize,
    learning_rate: f64,
    show_progress: bool,
) -> anyhow::Result<(OnnxModel, serde_json::Value)> {
    let (channels, height, width) = recipe.preprocessing.sample_shape();
    let shape = fleet_train::ImageShape {
        channels,
        height,
        width,
    };
    let classes = workbench.comparison_reference.outputs[0].len();
    let mut train_set = fleet_train::ImageSet::from_idx(images, labels, shape, classes)
        .with_context(|| format!("failed to read training images {}", images.display()))?;
    if let Some(limit) = limit {
        train_set.truncate(limit);
    }
    let evaluation = recipe
        .evaluation
        .as_ref()
        .context("fine-tuning measures accuracy on the recipe's [evaluation] set")?;
    let evaluation_labels = evaluation
        .labels
        .as_ref()
        .context("fine-tuning needs an IDX evaluation set with labels")?;
    let mut test_set =
        fleet_train::ImageSet::from_idx(&evaluation.images, evaluation_labels, shape, classes)?;
    test_set.truncate(FINE_TUNE_TEST_IMAGES);

    let work = tempfile::tempdir()?;
    let source = work.path().join("before.onnx");
    model.write(&source)?;
    let config = fleet_train::TrainConfig {
        epochs,
        optimizer: fleet_train::AdamWConfig {
            learning_rate,
            ..Default::default()
        },
        ..Default::default()
    };
    let options = fleet_train::RunOptions {
        checkpoint_dir: work.path().join("checkpoints"),
        log_path: None,
        resume: false,
        show_progress,
    };
    let (trained, report) =
        fleet_train::fine_tune(&source, &train_set, &test_set, &config, &options)?;
    let tuned = work.path().join("after.onnx");
    fleet_train::export_and_verify(
        &trained,
        &tuned,
        "fine-tuned by compress pipeline",
        &test_set,
        16,
        fleet_train::DEFAULT_TOLERANCE,
    )?;
    let details = serde_json::json!({
        "training_images": train_set.len(),
        "epochs": epochs,
        "learning_rate": learning_rate,
        "test_accuracy": report.test_accuracy,
        "elapsed_seconds": report.elapsed_seconds,
    });
    Ok((OnnxModel::read(&tuned)?, details))
}

fn write_pipeline_bundle(
    recipe: &Recipe,
    workbench: &Workbench,
    model: &OnnxModel,
    measured: &Measured,
    report: &PipelineReport,
    key: &SecretKey,
    out_dir: &Path,
) -> anyhow::Result<Bundle> {
    let parent = out_dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("failed to create {}", parent.display()))?;
    let staging = tempfile::tempdir_in(parent)?;
    let model_path = staging.path().join("model.onnx");
    crate::variants::write_checked(workbench, model, &model_path)?;
    let report_path = staging.path().join("compression.json");
    std::fs::write(&report_path, serde_json::to_string_pretty(report)?)?;
    let summary = inspect(&model_path)?;
    let metrics = measured.evaluation.and_then(|evaluation| {
        let set = recipe.evaluation.as_ref()?;
        Some(Metrics {
            dataset: set.description.clone(),
            samples: evaluation.samples as u64,
            top1_accuracy: evaluation.accuracy?,
            model_bytes: summary.file_bytes,
            latency_ms_p50: measured.latency_ms_p50,
            measured_with: format!(
                "tract 0.23, {}, 1 thread",
                if cfg!(debug_assertions) {
                    "debug build"
                } else {
                    "release build"
                }
            ),
        })
    });
    let report_file = BundleFile {
        source: report_path,
        path: "compression.json".into(),
    };
    crate::write_recipe_bundle(
        recipe,
        &model_path,
        fleet_train::ONNX_FORMAT,
        &summary,
        metrics,
        vec![report_file],
        key,
        out_dir,
    )
}
