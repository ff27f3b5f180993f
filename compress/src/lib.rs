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
use fleet_bundle::{Bundle, BundleFile, MANIFEST_FORMAT, Manifest, Metrics, ModelFile, SecretKey};

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
        files: Vec::new(),
    };
    fleet_bundle::write_bundle(out_dir, manifest, &files, key)
        .with_context(|| format!("failed to write bundle {}", out_dir.display()))
}
