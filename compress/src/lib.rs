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

pub use evaluate::{Evaluation, evaluate};
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

/// Evaluates the recipe's model (unless `evaluate` is false) and writes a signed bundle
/// into `out_dir`.
pub fn build_bundle(
    recipe: &Recipe,
    key: &SecretKey,
    out_dir: &Path,
    evaluate_model: bool,
) -> anyhow::Result<Bundle> {
    let summary = inspect(&recipe.model)?;
    let metrics = match (&recipe.evaluation, evaluate_model) {
        (Some(set), true) => {
            let evaluation = evaluate(recipe, set, &summary).with_context(|| {
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
                model_bytes: summary.file_bytes,
                latency_ms_p50: evaluation.latency_ms_p50,
                measured_with: evaluation.measured_with.clone(),
            })
        }
        _ => None,
    };

    write_recipe_bundle(
        recipe,
        &recipe.model,
        &summary,
        metrics,
        Vec::new(),
        key,
        out_dir,
    )
}

/// Writes a signed bundle of `model` (whose structure is `summary`) with the recipe's
/// labels, preprocessing and `metrics`, plus the `extra` files.
pub(crate) fn write_recipe_bundle(
    recipe: &Recipe,
    model: &Path,
    summary: &ModelSummary,
    metrics: Option<Metrics>,
    extra: Vec<BundleFile>,
    key: &SecretKey,
    out_dir: &Path,
) -> anyhow::Result<Bundle> {
    let model_name = "model.onnx";
    let mut files = vec![BundleFile {
        source: model.to_path_buf(),
        path: model_name.into(),
    }];
    files.extend(extra);
    let scratch = tempfile::tempdir().context("failed to create a temporary folder")?;
    let self_test = record_self_test(recipe, model, summary, scratch.path())
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
            format: "onnx".into(),
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

/// Runs the first few samples of the recipe's evaluation set (else its calibration set)
/// through `model` and writes their preprocessed inputs and outputs into `dir`, as the
/// bundle's self-test. Returns `None` when the recipe names no data.
fn record_self_test(
    recipe: &Recipe,
    model: &Path,
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
    let mut backend = TractBackend::load_onnx(model, &shape)?;
    let sample_len = channels * height * width;
    let samples = SELF_TEST_SAMPLES.min(data.len());
    let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
    for index in 0..samples {
        let input = fleet_runtime::preprocess(&data.sample(index)?, &recipe.preprocessing)?;
        let mut padded = input.clone();
        padded.resize(batch * sample_len, 0.0);
        let output = backend.run(Tensor::new(shape.clone(), padded)?)?;
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
