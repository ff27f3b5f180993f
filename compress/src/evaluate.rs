//! Measuring a model's accuracy and latency in our runtime.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use fleet_runtime::{Classifier, ClassifierConfig, Dataset};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{EvaluationSet, ModelSummary, Recipe};

/// Samples per batch when measuring accuracy, for models with a free batch dimension.
const ACCURACY_BATCH: usize = 64;

/// Accuracy and latency of one model on one data set.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub samples: usize,
    pub correct: usize,
    /// Median single-sample latency in milliseconds.
    pub latency_ms_p50: f64,
    /// Backend, build profile and threads the numbers come from.
    pub measured_with: String,
}

impl Evaluation {
    /// Fraction of samples classified correctly, 0 to 1.
    pub fn top1_accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }
}

/// Classifies every labelled sample of `set` and times single-sample inference of the
/// recipe's ONNX model in tract.
pub fn evaluate(
    recipe: &Recipe,
    set: &EvaluationSet,
    summary: &ModelSummary,
) -> anyhow::Result<Evaluation> {
    evaluate_model(
        recipe,
        set,
        summary,
        &recipe.model,
        fleet_train::ONNX_FORMAT,
    )
}

/// Evaluates as [`evaluate`] does, but `model` in `format` (see
/// [`fleet_train::load_backend`]), such as the safetensors file of a candle bundle.
pub fn evaluate_model(
    recipe: &Recipe,
    set: &EvaluationSet,
    summary: &ModelSummary,
    model: &Path,
    format: &str,
) -> anyhow::Result<Evaluation> {
    let config = ClassifierConfig {
        model: model.to_path_buf(),
        inputs: summary.inputs.clone(),
        preprocessing: recipe.preprocessing.clone(),
        postprocessing: recipe.postprocessing,
        labels: recipe.read_labels()?,
    };
    let data = Dataset::open(&set.images, set.labels.as_deref())
        .with_context(|| format!("failed to open evaluation data {}", set.images.display()))?;
    let (samples, correct) = measure_accuracy(&config, format, &data)?;
    let latency_ms_p50 = measure_latency(&config, format, &data, set.latency_runs)?;
    let profile = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    // tract runs on the calling thread; candle's CPU kernels use a thread pool.
    let runtime = match format {
        fleet_train::SAFETENSORS_FORMAT => "candle 0.11, all cores",
        _ => "tract 0.23, 1 thread",
    };
    Ok(Evaluation {
        samples,
        correct,
        latency_ms_p50,
        measured_with: format!("{runtime}, {profile}"),
    })
}

/// Loads `config`'s model with the backend `format` needs, for batches of `batch_size`.
fn open_classifier(
    config: &ClassifierConfig,
    format: &str,
    batch_size: usize,
) -> anyhow::Result<Classifier> {
    Ok(Classifier::with_backend(
        config.clone(),
        batch_size,
        |path, shape| fleet_train::load_backend(format, path, shape),
    )?)
}

fn measure_accuracy(
    config: &ClassifierConfig,
    format: &str,
    data: &Dataset,
) -> anyhow::Result<(usize, usize)> {
    let mut classifier = open_classifier(config, format, ACCURACY_BATCH)?;
    let progress = ProgressBar::new(data.len() as u64).with_style(
        ProgressStyle::with_template("evaluating {bar:40} {pos}/{len} {per_sec} eta {eta}")
            .expect("progress template is valid"),
    );
    let (mut samples, mut correct) = (0, 0);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(classifier.batch_size()) {
        let batch = chunk
            .iter()
            .map(|&index| data.sample(index))
            .collect::<Result<Vec<_>, _>>()?;
        let predictions = classifier.classify(&batch)?;
        for (sample, prediction) in batch.iter().zip(&predictions) {
            let label = sample
                .label
                .with_context(|| format!("evaluation sample {} has no label", sample.id))?;
            samples += 1;
            correct += usize::from(prediction.top1().class == label);
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok((samples, correct))
}

/// Runs the first sample `runs` times, one at a time, and returns the median in ms.
fn measure_latency(
    config: &ClassifierConfig,
    format: &str,
    data: &Dataset,
    runs: usize,
) -> anyhow::Result<f64> {
    let mut classifier = open_classifier(config, format, 1)?;
    let input = classifier.prepare(&data.sample(0)?)?;
    let inputs = [input];
    classifier.classify_prepared(&inputs)?;
    let mut times: Vec<f64> = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        classifier.classify_prepared(&inputs)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
