//! Producing compressed variants of a recipe's model and measuring each against the
//! float original.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::assess::{Agreement, Reference, Runner, compare};
use crate::calibrate::{Calibration, CalibrationMethod, calibrate};
use crate::graph::OnnxModel;
use crate::quantize::{self, Layer, LayerMode, QuantizeReport};
use crate::samples::{Samples, load_samples};
use crate::{Recipe, SampleSpec};

/// Arithmetic a quantized model's layers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Compute {
    /// i8 weights in the file, dequantized when the model loads; float arithmetic. A
    /// quarter of the size at float speed, for runtimes without integer kernels.
    Float,
    /// `QLinearConv` and `MatMulInteger` with u8 activations, which the runtime executes
    /// with its integer kernels: the fast form on devices running this project's agent.
    Integer,
}

/// Settings of one quantization run.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: CalibrationMethod,
    pub compute: Compute,
    /// Layers (node names) to leave in float.
    pub keep_float: Vec<String>,
    /// Subtract from each int8 layer's bias the mean shift that rounding its weights
    /// causes (see [`crate::quantize`]).
    pub bias_correction: bool,
}

/// Accuracy a compressed model must keep, measured against the float model.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Largest drop of top-1 accuracy on the labelled evaluation set, in points.
    pub max_accuracy_drop: Option<f64>,
    /// Smallest top-1 agreement with the float model on the comparison set, 0 to 1.
    pub min_agreement: Option<f64>,
}

impl Budget {
    /// Returns why `candidate` misses the budget, or `None` when it meets it.
    pub fn violation(&self, candidate: &Measured, float: &Measured) -> Option<String> {
        if let Some(min) = self.min_agreement
            && candidate.comparison.top1_agreement < min
        {
            return Some(format!(
                "top-1 agreement with fp32 {:.2}% is below {:.2}%",
                100.0 * candidate.comparison.top1_agreement,
                100.0 * min
            ));
        }
        if let Some(max_drop) = self.max_accuracy_drop {
            let accuracy = |m: &Measured| m.evaluation.and_then(|e| e.accuracy);
            match (accuracy(candidate), accuracy(float)) {
                (Some(candidate), Some(float)) => {
                    let drop = 100.0 * (float - candidate);
                    if drop > max_drop {
                        return Some(format!(
                            "top-1 accuracy dropped {drop:.2} points, more than {max_drop}"
                        ));
                    }
                }
                _ => {
                    return Some(
                        "the budget limits accuracy but no labelled data was measured".into(),
                    );
                }
            }
        }
        None
    }
}

/// The data a recipe's variants are built and judged with, loaded once.
#[derive(Debug)]
pub struct Workbench {
    pub float: OnnxModel,
    /// Input shape for single-sample runs.
    pub input_shape: Vec<usize>,
    pub calibration: Samples,
    /// Labelled data, such as the MNIST test set or the original photos.
    pub evaluation: Option<Samples>,
    /// Data compared with the float model's outputs; may be unlabelled.
    pub comparison: Samples,
    pub float_runner: Runner,
    pub evaluation_reference: Option<Reference>,
    pub comparison_reference: Reference,
    pub show_progress: bool,
}

/// One compressed model with its measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub variant: String,
    pub bytes: u64,
    /// Against the labels of the evaluation set.
    pub evaluation: Option<Agreement>,
    /// Against the float model on the comparison set.
    pub comparison: Agreement,
    /// Median single-sample latency in tract, 1 thread, in milliseconds.
    pub latency_ms_p50: f64,
    /// The same on every core of the machine.
    pub latency_ms_p50_all_cores: f64,
    /// Number of cores the all-cores figure used.
    pub cores: usize,
}

impl Workbench {
    /// Reads the recipe's model and its calibration, evaluation and comparison data, and
    /// computes the float model's outputs on them.
    pub fn open(recipe: &Recipe, show_progress: bool) -> anyhow::Result<Workbench> {
        let float = OnnxModel::read(&recipe.model)?;
        let (channels, height, width) = recipe.preprocessing.sample_shape();
        let input_shape = vec![1, channels, height, width];
        let calibration_spec = recipe
            .calibration
            .as_ref()
            .with_context(|| format!("recipe {} has no [calibration] data", recipe.name))?;
        let calibration = load_samples(calibration_spec, &recipe.preprocessing)
            .context("failed to load the calibration data")?;
        let evaluation = recipe
            .evaluation
            .as_ref()
            .map(|set| {
                let spec = SampleSpec {
                    images: set.images.clone(),
                    labels: set.labels.clone(),
                    select: Default::default(),
                    limit: None,
                    augment: 0,
                    seed: 0,
                };
                load_samples(&spec, &recipe.preprocessing)
                    .context("failed to load the evaluation data")
            })
            .transpose()?;
        let comparison = match &recipe.comparison {
            Some(spec) => load_samples(spec, &recipe.preprocessing)
                .context("failed to load the comparison data")?,
            None => evaluation
                .clone()
                .context("the recipe has neither [comparison] nor [evaluation] data")?,
        };
        let float_runner = Runner::new(&float, &input_shape)
            .with_context(|| format!("failed to load {}", recipe.model.display()))?;
        let bar = progress_bar(show_progress, "float outputs");
        let comparison_reference = Reference::compute(&float_runner, &comparison, &bar)?;
        let evaluation_reference = evaluation
            .as_ref()
            .map(|set| Reference::compute(&float_runner, set, &bar))
            .transpose()?;
        bar.finish_and_clear();
        Ok(Workbench {
            float,
            input_shape,
            calibration,
            evaluation,
            comparison,
            float_runner,
            evaluation_reference,
            comparison_reference,
            show_progress,
        })
    }

    /// Layer modes for `options`, before any mixed-precision choice.
    pub fn modes(
        &self,
        base: &OnnxModel,
        options: &QuantizeOptions,
    ) -> anyhow::Result<(Vec<Layer>, HashMap<String, LayerMode>)> {
        let layers = quantize::layers(base)?;
        for name in &options.keep_float {
            anyhow::ensure!(
                layers.iter().any(|layer| &layer.name == name),
                "layer {name} to keep in float is not a Conv or Gemm of the model"
            );
        }
        let modes = layers
            .iter()
            .map(|layer| {
                let mode = if options.keep_float.contains(&layer.name) {
                    LayerMode::Float
                } else if options.compute == Compute::Float {
                    LayerMode::WeightOnly
                } else {
                    LayerMode::Int8
                };
                (layer.name.clone(), mode)
            })
            .collect();
        Ok((layers, modes))
    }

    /// Calibrated ranges of every tensor the int8 layers among `layers` read or write,
    /// with channel means when `options` enables bias correction.
    pub fn calibrate(
        &self,
        base: &OnnxModel,
        layers: &[Layer],
        modes: &HashMap<String, LayerMode>,
        options: &QuantizeOptions,
    ) -> anyhow::Result<Calibration> {
        let int8_layers: Vec<Layer> = layers
            .iter()
            .filter(|layer| modes.get(&layer.name) == Some(&LayerMode::Int8))
            .cloned()
            .collect();
        let tensors = quantize::calibration_tensors(&int8_layers);
        if tensors.is_empty() {
            return Ok(Calibration::default());
        }
        let inputs: Vec<tract_onnx::prelude::Tensor> = self
            .calibration
            .inputs
            .iter()
            .map(|input| {
                tract_onnx::prelude::Tensor::from_shape(&self.input_shape, input)
                    .map_err(|error| anyhow::anyhow!("{error:#}"))
            })
            .collect::<anyhow::Result<_>>()?;
        let bar = progress_bar(self.show_progress, "calibrating");
        let mut calibration = calibrate(
            base,
            &self.input_shape,
            &tensors,
            &inputs,
            options.method,
            &bar,
        )?;
        bar.finish_and_clear();
        if !options.bias_correction {
            calibration.channel_means.clear();
        }
        Ok(calibration)
    }

    /// Quantizes `base` (the float model, or one derived from it) with `options`.
    pub fn quantize(
        &self,
        base: &OnnxModel,
        options: &QuantizeOptions,
    ) -> anyhow::Result<(OnnxModel, QuantizeReport)> {
        let (layers, modes) = self.modes(base, options)?;
        let calibration = self.calibrate(base, &layers, &modes, options)?;
        Ok(quantize::quantize(base, &layers, &modes, &calibration)?)
    }

    /// Loads `model` in tract and measures it; fails if tract cannot load or run it.
    pub fn measure(
        &self,
        variant: &str,
        model: &OnnxModel,
        latency_runs: usize,
    ) -> anyhow::Result<Measured> {
        let runner = Runner::new(model, &self.input_shape)
            .with_context(|| format!("the {variant} model does not load in tract"))?;
        let bar = progress_bar(self.show_progress, variant);
        let comparison = compare(&runner, &self.comparison, &self.comparison_reference, &bar)?;
        let evaluation = match (&self.evaluation, &self.evaluation_reference) {
            (Some(set), Some(reference)) => Some(compare(&runner, set, reference, &bar)?),
            _ => None,
        };
        bar.finish_and_clear();
        let input = &self.comparison.inputs[0];
        let latency_ms_p50 = runner.latency_ms(input, latency_runs)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let latency_ms_p50_all_cores = runner.latency_ms_on(input, latency_runs, cores)?;
        Ok(Measured {
            variant: variant.to_string(),
            bytes: model.encoded_len() as u64,
            evaluation,
            comparison,
            latency_ms_p50,
            latency_ms_p50_all_cores,
            cores,
        })
    }
}

fn progress_bar(show: bool, message: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// Writes `model` to `path` only after it loads and runs in tract.
pub fn write_checked(workbench: &Workbench, model: &OnnxModel, path: &Path) -> anyhow::Result<u64> {
    let runner = Runner::new(model, &workbench.input_shape)
        .context("refusing to write a model tract cannot load")?;
    runner
        .run(&workbench.comparison.inputs[0])
        .context("refusing to write a model tract cannot run")?;
    Ok(model.write(path)?)
}

/// How much one layer alone moves the model's output when rendered in its quantized
/// mode while every other layer stays float.
#[derive(Debug, Clone, Serialize)]
pub struct Sensitivity {
    pub layer: String,
    pub mode: LayerMode,
    pub mean_kl: f64,
    pub top1_agreement: f64,
}

/// The outcome of [`Workbench::mixed_precision`].
#[derive(Debug, Clone, Serialize)]
pub struct MixedPrecision {
    /// Most sensitive first.
    pub sensitivities: Vec<Sensitivity>,
    /// Layers kept in float to meet the budget, in the order they were restored.
    pub kept_float: Vec<String>,
    /// The all-quantized model's measurements and why it missed the budget, if it did.
    pub fully_quantized: Measured,
    pub fully_quantized_violation: Option<String>,
    pub result: Measured,
    #[serde(skip)]
    pub model: OnnxModel,
    pub report: QuantizeReport,
}

impl Workbench {
    /// Quantizes with `options`, then, while `budget` fails, returns the most
    /// sensitive remaining layer to float. Sensitivity is measured layer by layer on
    /// the first `sensitivity_samples` comparison samples. Fails if even the model with
    /// every layer restored misses the budget.
    pub fn mixed_precision(
        &self,
        base: &OnnxModel,
        options: &QuantizeOptions,
        budget: &Budget,
        float: &Measured,
        sensitivity_samples: usize,
        latency_runs: usize,
    ) -> anyhow::Result<MixedPrecision> {
        let (layers, mut modes) = self.modes(base, options)?;
        let calibration = self.calibrate(base, &layers, &modes, options)?;
        let (model, report) = quantize::quantize(base, &layers, &modes, &calibration)?;
        let fully_quantized = self.measure("int8", &model, latency_runs)?;
        let violation = budget.violation(&fully_quantized, float);
        let mut outcome = MixedPrecision {
            sensitivities: Vec::new(),
            kept_float: Vec::new(),
            fully_quantized: fully_quantized.clone(),
            fully_quantized_violation: violation.clone(),
            result: fully_quantized,
            model,
            report,
        };
        if violation.is_none() {
            return Ok(outcome);
        }

        let count = sensitivity_samples.clamp(1, self.comparison.len());
        let subset = Samples {
            description: self.comparison.description.clone(),
            inputs: self.comparison.inputs[..count].to_vec(),
            labels: self.comparison.labels[..count].to_vec(),
        };
        let reference = Reference {
            outputs: self.comparison_reference.outputs[..count].to_vec(),
        };
        let bar = progress_bar(self.show_progress, "sensitivity");
        for layer in layers.iter().filter(|l| modes[&l.name] != LayerMode::Float) {
            let alone: HashMap<String, LayerMode> =
                [(layer.name.clone(), modes[&layer.name])].into();
            let (single, _) = quantize::quantize(base, &layers, &alone, &calibration)?;
            let runner = Runner::new(&single, &self.input_shape).with_context(|| {
                format!("the model with only {} quantized does not load", layer.name)
            })?;
            let agreement = compare(&runner, &subset, &reference, &bar)?;
            outcome.sensitivities.push(Sensitivity {
                layer: layer.name.clone(),
                mode: modes[&layer.name],
                mean_kl: agreement.mean_kl,
                top1_agreement: agreement.top1_agreement,
            });
        }
        bar.finish_and_clear();
        outcome
            .sensitivities
            .sort_by(|a, b| b.mean_kl.total_cmp(&a.mean_kl));

        for sensitivity in outcome.sensitivities.clone() {
            modes.insert(sensitivity.layer.clone(), LayerMode::Float);
            outcome.kept_float.push(sensitivity.layer.clone());
            let (model, report) = quantize::quantize(base, &layers, &modes, &calibration)?;
            let measured = self.measure("mixed", &model, latency_runs)?;
            let holds = budget.violation(&measured, float).is_none();
            outcome.model = model;
            outcome.report = report;
            outcome.result = measured;
            if holds {
                return Ok(outcome);
            }
        }
        anyhow::bail!(
            "no mix of float and int8 layers meets the budget: {}",
            budget.violation(&outcome.result, float).unwrap_or_default()
        )
    }
}
