//! Recipes: what to put into a bundle and what to measure it on.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_bundle::{Postprocessing, Preprocessing};
use serde::Deserialize;

use crate::pipeline::PipelineSpec;
use crate::samples::SampleSpec;

/// A parsed `bundle.toml`, with every path made relative to the working directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub version: String,
    /// ONNX file.
    pub model: PathBuf,
    /// Class names, one per line.
    pub labels: Option<PathBuf>,
    #[serde(default = "any_target")]
    pub target: String,
    pub preprocessing: Preprocessing,
    pub postprocessing: Postprocessing,
    pub evaluation: Option<EvaluationSet>,
    /// Inputs the quantizer calibrates activation ranges on; keep them apart from the
    /// evaluation and comparison data.
    pub calibration: Option<SampleSpec>,
    /// Inputs on which compressed variants are compared with the float model; the
    /// evaluation set when absent.
    pub comparison: Option<SampleSpec>,
    /// Compression steps and budget for `compress pipeline`.
    pub pipeline: Option<PipelineSpec>,
}

/// Labelled data the compressor measures a model on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSet {
    /// Short human description, copied into the manifest.
    pub description: String,
    /// An IDX image file or a folder of labelled images.
    pub images: PathBuf,
    /// IDX label file, for IDX images.
    pub labels: Option<PathBuf>,
    /// Single-sample runs used to measure latency.
    #[serde(default = "default_latency_runs")]
    pub latency_runs: usize,
}

fn any_target() -> String {
    "any".into()
}

fn default_latency_runs() -> usize {
    100
}

impl Recipe {
    /// Reads a recipe and resolves its paths against the recipe's folder.
    pub fn read(path: &Path) -> anyhow::Result<Recipe> {
        let text = fs::read_to_string(path)
            .with_context(|| format!("failed to read recipe {}", path.display()))?;
        let mut recipe: Recipe =
            toml::from_str(&text).with_context(|| format!("invalid recipe {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        recipe.model = base.join(&recipe.model);
        recipe.labels = recipe.labels.map(|labels| base.join(labels));
        for spec in [&mut recipe.calibration, &mut recipe.comparison]
            .into_iter()
            .flatten()
        {
            spec.resolve(base);
        }
        if let Some(pipeline) = &mut recipe.pipeline {
            pipeline.resolve(base);
        }
        if let Some(set) = &mut recipe.evaluation {
            if set.latency_runs == 0 {
                anyhow::bail!(
                    "invalid recipe {}: evaluation.latency_runs must be at least 1",
                    path.display()
                );
            }
            set.images = base.join(&set.images);
            set.labels = set.labels.as_ref().map(|labels| base.join(labels));
        }
        Ok(recipe)
    }

    /// Reads the class names, or an empty list when the recipe has none.
    pub fn read_labels(&self) -> anyhow::Result<Vec<String>> {
        let Some(path) = &self.labels else {
            return Ok(Vec::new());
        };
        let text = fs::read_to_string(path)
            .with_context(|| format!("failed to read labels {}", path.display()))?;
        Ok(text.lines().map(|line| line.trim().to_string()).collect())
    }
}
