//! Measuring a compressed model against its float original: accuracy on labels, top-1
//! agreement and divergence from the original's outputs, size and latency in tract.
//!
//! Every artifact the compressor writes is first loaded and run here, so a model tract
//! cannot load, or one that drifts past its budget, is never shipped.

use std::time::Instant;

use anyhow::Context;
use indicatif::ProgressBar;
use serde::Serialize;
use tract_onnx::prelude::*;

use crate::graph::OnnxModel;
use crate::samples::Samples;

/// A model loaded in tract for single-sample runs.
#[derive(Debug)]
pub struct Runner {
    plan: Arc<TypedSimplePlan>,
    input_shape: Vec<usize>,
}

impl Runner {
    /// Loads `model` in tract with a fixed input shape and the runtime's integer
    /// convolution kernels, and optimises it, as a device does when it installs a bundle.
    pub fn new(model: &OnnxModel, input_shape: &[usize]) -> anyhow::Result<Runner> {
        let plan = fleet_runtime::onnx()
            .with_ignore_value_info(true)
            .model_for_proto_model(&model.proto)
            .and_then(|inference| inference.with_input_fact(0, f32::fact(input_shape).into()))
            .and_then(|inference| inference.into_optimized())
            .and_then(|typed| typed.into_runnable())
            .map_err(|error| anyhow::anyhow!("{error:#}"))
            .context("tract could not load the model")?;
        Ok(Runner {
            plan,
            input_shape: input_shape.to_vec(),
        })
    }

    /// Runs the model on one input and returns its first output, flattened.
    pub fn run(&self, input: &[f32]) -> anyhow::Result<Vec<f32>> {
        let tensor = Tensor::from_shape(&self.input_shape, input)
            .map_err(|error| anyhow::anyhow!("{error:#}"))
            .with_context(|| {
                format!(
                    "an input of {} values does not fit the model's input shape {:?}",
                    input.len(),
                    self.input_shape
                )
            })?;
        let outputs = self
            .plan
            .run(tvec!(tensor.into()))
            .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        let output = outputs[0]
            .cast_to::<f32>()
            .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        let view = output
            .to_plain_array_view::<f32>()
            .map_err(|error| anyhow::anyhow!("{error:#}"))?;
        Ok(view.iter().copied().collect())
    }

    /// Median wall-clock time of one run on `threads` threads, in milliseconds, after
    /// `runs / 10 + 1` warm-up runs. One thread runs on the caller's thread; more use
    /// tract's multithreaded matrix products on a pool of that size.
    pub fn latency_ms_on(&self, input: &[f32], runs: usize, threads: usize) -> anyhow::Result<f64> {
        if threads <= 1 {
            return self.latency_ms(input, runs);
        }
        let pool = tract_linalg::multithread::Executor::multithread(threads);
        tract_linalg::multithread::multithread_tract_scope(pool, || self.latency_ms(input, runs))
    }

    /// Median wall-clock time of one single-threaded run, in milliseconds, after
    /// `runs / 10 + 1` warm-up runs.
    pub fn latency_ms(&self, input: &[f32], runs: usize) -> anyhow::Result<f64> {
        for _ in 0..runs / 10 + 1 {
            self.run(input)?;
        }
        let mut times = Vec::with_capacity(runs.max(1));
        for _ in 0..runs.max(1) {
            let start = Instant::now();
            self.run(input)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// Outputs of the float original on a sample set, computed once and compared with
/// every candidate.
#[derive(Debug, Clone)]
pub struct Reference {
    pub outputs: Vec<Vec<f32>>,
}

impl Reference {
    pub fn compute(
        runner: &Runner,
        samples: &Samples,
        progress: &ProgressBar,
    ) -> anyhow::Result<Reference> {
        progress.set_length(samples.len() as u64);
        let outputs = samples
            .inputs
            .iter()
            .map(|input| {
                progress.inc(1);
                runner.run(input)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Reference { outputs })
    }
}

/// Comparison of a candidate's outputs with the reference and the labels.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Agreement {
    pub samples: usize,
    /// Top-1 accuracy on the labelled samples, 0 to 1; `None` without labels.
    pub accuracy: Option<f64>,
    /// Fraction of samples whose top-1 class matches the reference's.
    pub top1_agreement: f64,
    /// Mean Kullback-Leibler divergence of the candidate's softmax from the
    /// reference's, in nats.
    pub mean_kl: f64,
    /// Largest absolute output difference.
    pub max_abs_diff: f32,
}

/// Runs `runner` on every sample and compares with `reference`.
pub fn compare(
    runner: &Runner,
    samples: &Samples,
    reference: &Reference,
    progress: &ProgressBar,
) -> anyhow::Result<Agreement> {
    progress.set_length(samples.len() as u64);
    let mut agree = 0;
    let mut correct = 0;
    let mut labelled = 0;
    let mut kl = 0.0;
    let mut max_abs_diff = 0.0f32;
    for ((input, label), expected) in samples
        .inputs
        .iter()
        .zip(&samples.labels)
        .zip(&reference.outputs)
    {
        let output = runner.run(input)?;
        anyhow::ensure!(
            output.len() == expected.len(),
            "the candidate returns {} values, the original {}",
            output.len(),
            expected.len()
        );
        let class = argmax(&output);
        agree += usize::from(class == argmax(expected));
        if let Some(label) = label {
            labelled += 1;
            correct += usize::from(class == *label);
        }
        kl += kl_divergence(expected, &output);
        for (a, b) in output.iter().zip(expected) {
            let diff = (a - b).abs();
            // A NaN difference (an overflowing candidate) must not look like agreement.
            max_abs_diff = if diff.is_nan() {
                f32::INFINITY
            } else {
                max_abs_diff.max(diff)
            };
        }
        progress.inc(1);
    }
    let count = samples.len().max(1) as f64;
    Ok(Agreement {
        samples: samples.len(),
        accuracy: (labelled > 0).then(|| correct as f64 / labelled as f64),
        top1_agreement: agree as f64 / count,
        mean_kl: kl / count,
        max_abs_diff,
    })
}

pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(index, _)| index)
}

/// KL(softmax(p) || softmax(q)) for two logit (or probability) vectors; infinite when
/// `q` contains a value that is not finite.
fn kl_divergence(p: &[f32], q: &[f32]) -> f64 {
    if q.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let p = log_softmax(p);
    let q = log_softmax(q);
    let divergence: f64 = p.iter().zip(&q).map(|(lp, lq)| lp.exp() * (lp - lq)).sum();
    if divergence.is_nan() {
        f64::INFINITY
    } else {
        divergence.max(0.0)
    }
}

fn log_softmax(values: &[f32]) -> Vec<f64> {
    let max = values
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = values.iter().map(|&v| (v as f64 - max).exp()).sum();
    values.iter().map(|&v| v as f64 - max - sum.ln()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_outputs_diverge_by_nothing() {
        assert_eq!(kl_divergence(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0]), 0.0);
        assert!(kl_divergence(&[5.0, 0.0], &[0.0, 5.0]) > 4.0);
    }

    #[test]
    fn kl_divergence_of_a_nan_output_is_infinite() {
        assert_eq!(kl_divergence(&[1.0, 2.0], &[f32::NAN, 2.0]), f64::INFINITY);
    }

    #[test]
    fn argmax_picks_the_largest() {
        assert_eq!(argmax(&[0.1, 3.0, -2.0]), 1);
    }
}
