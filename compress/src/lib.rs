//! The build-time compressor: inspects ONNX models, makes them smaller, measures them
//! on labelled data and writes signed bundles that devices install.
//!
//! A recipe (`bundle.toml` beside each shipped model) names the model, its labels, its
//! preprocessing and the data sets to calibrate and measure it on; [`build_bundle`]
//! turns a recipe into a bundle whose manifest carries the measured accuracy, size and
//! latency. [`quantize`], [`prune`] and [`fp16`] rewrite the ONNX graph,
//! [`variants::Workbench`] measures each result against the float model, and
//! [`pipeline::run_pipeline`] chains them under an accuracy budget into a bundle.
//! [`distill::distill`] trains a smaller student from a model before it is bundled.

pub mod assess;
pub mod calibrate;
pub mod cli;
pub mod distill;
mod evaluate;
pub mod fp16;
pub mod graph;
mod inspect;
pub mod pipeline;
pub mod prune;
pub mod quantize;
mod recipe;
pub mod samples;
pub mod variants;

pub use evaluate::{Evaluation, evaluate, evaluate_model};
pub use inspect::{ModelSummary, inspect};
pub use recipe::{EvaluationSet, Recipe};
pub use samples::{SampleSpec, Samples, Selection};

use std::path::Path;

use anyhow::Context;
use fleet_bundle::{
    Bundle, BundleFile, MANIFEST_FORMAT, Manifest, Metrics, ModelFile, SecretKey, SelfTest,
};
use fleet_runtime::{Backend, Dataset, Tensor, TractBackend};

/// Reference inputs recorded into every bundle for the device's self-test.
const SELF_TEST_SAMPLES: usize = 4;
/// Accepted relative difference in the self-test: well above the rounding differences
/// between CPUs and SIMD widths (about 1e-6), far below what a wrong or damaged model gives.
const SELF_TEST_TOLERANCE: f32 = 1e-3;

/// The backend a bundle's model is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BundleRuntime {
    /// The ONNX model as it is, run by tract.
    #[default]
    Tract,
    /// The model converted to a safetensors model file, run by candle (on a GPU in agents
    /// built with the `cuda` feature). Only the digit CNN family converts.
    Candle,
}

/// Evaluates the recipe's model (unless `evaluate_model` is false) for `runtime` and
/// writes a signed bundle into `out_dir`.
pub fn build_bundle(
    recipe: &Recipe,
    key: &SecretKey,
    out_dir: &Path,
    evaluate_model: bool,
    runtime: BundleRuntime,
) -> anyhow::Result<Bundle> {
    let summary = inspect(&recipe.model)?;
    let scratch = tempfile::tempdir().context("failed to create a temporary folder")?;
    let (model, format) = match runtime {
        BundleRuntime::Tract => (recipe.model.clone(), fleet_train::ONNX_FORMAT),
        BundleRuntime::Candle => (
            convert_for_candle(&recipe.model, scratch.path())?,
            fleet_train::SAFETENSORS_FORMAT,
        ),
    };
    let metrics = match (&recipe.evaluation, evaluate_model) {
        (Some(set), true) => {
            let evaluation = self::evaluate_model(recipe, set, &summary, &model, format)
                .with_context(|| {
                    format!(
                        "failed to evaluate {} on {}",
                        recipe.name,
                        set.images.display()
                    )
                })?;
            Some(Metrics {
                dataset: set.description.clone(),
                samples: evaluation.samples as u64,
                top1_accuracy: evaluation.top1_accuracy(),
                // The converted file of a candle bundle, not the recipe's ONNX model.
                model_bytes: std::fs::metadata(&model)
                    .with_context(|| format!("failed to read {}", model.display()))?
                    .len(),
                latency_ms_p50: evaluation.latency_ms_p50,
                measured_with: evaluation.measured_with.clone(),
            })
        }
        _ => None,
    };

    write_recipe_bundle(
        recipe,
        &model,
        format,
        &summary,
        metrics,
        Vec::new(),
        key,
        out_dir,
    )
}

/// Converts the ONNX model at `onnx` into a candle model file in `dir` and returns its
/// path. [`record_self_test`] later checks the conversion against tract.
fn convert_for_candle(onnx: &Path, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let model = fleet_train::import_onnx(onnx, &fleet_train::Device::Cpu).with_context(|| {
        format!(
            "{} cannot be converted for candle, which runs only the digit CNN family \
             (convolution blocks, then fully connected layers)",
            onnx.display()
        )
    })?;
    let path = dir.join("model.safetensors");
    fleet_train::save_model(&path, &model)
        .with_context(|| format!("failed to write {}", path.display()))?;
    tracing::info!(model = %onnx.display(), architecture = %model.config(), "converted for candle");
    Ok(path)
}

/// Writes a signed bundle of `model` in `format` (whose structure is `summary`) with the
/// recipe's labels, preprocessing and `metrics`, plus the `extra` files.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_recipe_bundle(
    recipe: &Recipe,
    model: &Path,
    format: &str,
    summary: &ModelSummary,
    metrics: Option<Metrics>,
    extra: Vec<BundleFile>,
    key: &SecretKey,
    out_dir: &Path,
) -> anyhow::Result<Bundle> {
    let model_name = match format {
        fleet_train::SAFETENSORS_FORMAT => "model.safetensors",
        _ => "model.onnx",
    };
    let mut files = vec![BundleFile {
        source: model.to_path_buf(),
        path: model_name.into(),
    }];
    files.extend(extra);
    let scratch = tempfile::tempdir().context("failed to create a temporary folder")?;
    // A converted model must still compute what the recipe's ONNX model computes.
    let reference = (format != fleet_train::ONNX_FORMAT).then_some(recipe.model.as_path());
    let self_test = record_self_test(recipe, model, format, reference, summary, scratch.path())
        .with_context(|| format!("failed to record the self-test of {}", model.display()))?;
    if let Some((_, test_files)) = &self_test {
        files.extend(test_files.iter().cloned());
    }
    let labels = recipe.labels.as_ref().map(|source| {
        files.push(BundleFile {
            source: source.clone(),
            path: "labels.txt".into(),
        });
        "labels.txt".to_string()
    });
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        name: recipe.name.clone(),
        version: recipe.version.clone(),
        target: recipe.target.clone(),
        created_by: format!("fleet-compress {}", env!("CARGO_PKG_VERSION")),
        model: ModelFile {
            path: model_name.into(),
            format: format.into(),
        },
        inputs: summary.inputs.clone(),
        outputs: summary.outputs.clone(),
        preprocessing: recipe.preprocessing.clone(),
        postprocessing: recipe.postprocessing,
        labels,
        metrics,
        self_test: self_test.map(|(entry, _)| entry),
        files: Vec::new(),
    };
    fleet_bundle::write_bundle(out_dir, manifest, &files, key)
        .with_context(|| format!("failed to write bundle {}", out_dir.display()))
}

/// Checks that `found` matches `expected` within [`SELF_TEST_TOLERANCE`], relative to
/// the largest expected magnitude (at least 1), as the device's self-test measures.
fn check_conversion(expected: &[f32], found: &[f32]) -> anyhow::Result<()> {
    anyhow::ensure!(
        expected.len() == found.len(),
        "{} outputs instead of {}",
        found.len(),
        expected.len()
    );
    for (index, difference) in fleet_runtime::relative_differences(expected, found).enumerate() {
        // A NaN fails the comparison as well.
        anyhow::ensure!(
            difference <= SELF_TEST_TOLERANCE,
            "output {index} is {}, tract gives {} (relative difference {difference:.1e}, \
             tolerance {SELF_TEST_TOLERANCE:.1e})",
            found[index],
            expected[index]
        );
    }
    Ok(())
}

/// Runs the first few samples of the recipe's evaluation set (else its calibration set)
/// through `model` in `format` and writes their preprocessed inputs and outputs into
/// `dir`, as the bundle's self-test. With `reference`, an ONNX model, every output must
/// also match tract's output of that model within the self-test tolerance. Returns
/// `None` when the recipe names no data.
fn record_self_test(
    recipe: &Recipe,
    model: &Path,
    format: &str,
    reference: Option<&Path>,
    summary: &ModelSummary,
    dir: &Path,
) -> anyhow::Result<Option<(SelfTest, Vec<BundleFile>)>> {
    let (images, labels) = match (&recipe.evaluation, &recipe.calibration) {
        (Some(set), _) => (&set.images, set.labels.as_deref()),
        (None, Some(spec)) => (&spec.images, spec.labels.as_deref()),
        (None, None) => {
            tracing::warn!(model = %recipe.name, "recipe names no data; the bundle carries no self-test");
            return Ok(None);
        }
    };
    let data = Dataset::open(images, labels)
        .with_context(|| format!("failed to open {}", images.display()))?;
    let (channels, height, width) = recipe.preprocessing.sample_shape();
    let batch = match summary.inputs.first().and_then(|input| input.shape.first()) {
        Some(&fixed) if fixed > 0 => fixed as usize,
        _ => 1,
    };
    let shape = vec![batch, channels, height, width];
    let mut backend = fleet_train::load_backend(format, model, &shape)?;
    let mut reference = reference
        .map(|path| TractBackend::load_onnx(path, &shape))
        .transpose()?;
    let sample_len = channels * height * width;
    let samples = SELF_TEST_SAMPLES.min(data.len());
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for index in 0..samples {
        let input = fleet_runtime::preprocess(&data.sample(index)?, &recipe.preprocessing)?;
        let mut padded = input.clone();
        padded.resize(batch * sample_len, 0.0);
        let output = backend.run(Tensor::new(shape.clone(), padded.clone())?)?;
        if let Some(reference) = reference.as_mut() {
            let expected = reference.run(Tensor::new(shape.clone(), padded)?)?;
            check_conversion(expected.row(0), output.row(0)).with_context(|| {
                format!(
                    "{} run by {} differs from the ONNX model in tract on sample {index}",
                    model.display(),
                    backend.name()
                )
            })?;
        }
        inputs.extend(input);
        outputs.extend_from_slice(output.row(0));
    }
    let inputs_file = dir.join("inputs.f32");
    let outputs_file = dir.join("outputs.f32");
    fleet_runtime::write_f32(&inputs_file, &inputs)?;
    fleet_runtime::write_f32(&outputs_file, &outputs)?;
    let files = vec![
        BundleFile {
            source: inputs_file,
            path: fleet_runtime::SELF_TEST_INPUTS.into(),
        },
        BundleFile {
            source: outputs_file,
            path: fleet_runtime::SELF_TEST_OUTPUTS.into(),
        },
    ];
    Ok(Some((
        fleet_runtime::self_test_entry(samples, SELF_TEST_TOLERANCE),
        files,
    )))
}
