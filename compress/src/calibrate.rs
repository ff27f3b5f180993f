//! Activation ranges for quantization, measured by running the float model on a
//! calibration set.
//!
//! The float model runs in tract with the tensors of interest made extra outputs. A first
//! pass records each tensor's minimum and maximum. For the percentile and entropy methods
//! a second pass fills a histogram of [`HISTOGRAM_BINS`] bins over that span, and the
//! clipping range is chosen from it. The first pass also averages each channel (axis 1)
//! of every tensor, which the quantizer uses to correct the bias that rounding weights
//! adds to a layer's output.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use anyhow::Context;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use crate::graph::OnnxModel;

/// Histogram resolution for the percentile and entropy methods; 2048 bins over a span
/// leave eight bins per 8-bit level, enough to place a clipping threshold finely.
pub const HISTOGRAM_BINS: usize = 2048;

/// Method that chooses a tensor's clipping range from the calibration statistics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "method")]
pub enum CalibrationMethod {
    /// The observed minimum and maximum: no value saturates, outliers cost resolution.
    MinMax,
    /// Clip to the given percentile of values at each end (for example 99.99).
    Percentile { percentile: f64 },
    /// The threshold whose 8-bit rendering of the histogram loses the least
    /// information (Kullback-Leibler divergence), as TensorRT's entropy calibrator does.
    Entropy,
}

impl fmt::Display for CalibrationMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CalibrationMethod::MinMax => write!(f, "min-max"),
            CalibrationMethod::Percentile { percentile } => write!(f, "percentile-{percentile}"),
            CalibrationMethod::Entropy => write!(f, "entropy"),
        }
    }
}

impl FromStr for CalibrationMethod {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "min-max" => Ok(CalibrationMethod::MinMax),
            "entropy" => Ok(CalibrationMethod::Entropy),
            _ => {
                let value = text
                    .strip_prefix("percentile-")
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| (50.0..=100.0).contains(p));
                value
                    .map(|percentile| CalibrationMethod::Percentile { percentile })
                    .ok_or_else(|| {
                        format!(
                            "unknown calibration method {text:?}: expected min-max, entropy or \
                             percentile-P with P between 50 and 100"
                        )
                    })
            }
        }
    }
}

/// A tensor's clipping range; always contains zero, so zero is exactly representable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Range {
    pub min: f32,
    pub max: f32,
}

impl Range {
    fn including_zero(min: f32, max: f32) -> Range {
        Range {
            min: min.min(0.0),
            max: max.max(0.0),
        }
    }
}

/// Calibration results: clipping ranges, and the mean of each channel (axis 1) of
/// tensors with at least two axes.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    pub ranges: HashMap<String, Range>,
    pub channel_means: HashMap<String, Vec<f32>>,
}

impl From<HashMap<String, Range>> for Calibration {
    /// Ranges alone, without channel means: the quantizer then corrects no bias.
    fn from(ranges: HashMap<String, Range>) -> Calibration {
        Calibration {
            ranges,
            channel_means: HashMap::new(),
        }
    }
}

/// Running statistics of one tensor.
#[derive(Debug, Clone)]
struct Observer {
    min: f32,
    max: f32,
    histogram: Vec<u64>,
    /// Sum of the finite values of each channel, and how many were summed.
    channel_sums: Vec<(f64, u64)>,
}

impl Observer {
    fn new() -> Observer {
        Observer {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            histogram: Vec::new(),
            channel_sums: Vec::new(),
        }
    }

    fn observe_range(&mut self, values: &[f32]) {
        for &value in values.iter().filter(|v| v.is_finite()) {
            self.min = self.min.min(value);
            self.max = self.max.max(value);
        }
    }

    /// Adds `values`, laid out in `shape`, to the per-channel sums; tensors with fewer
    /// than two axes have no channels and are skipped.
    fn observe_channels(&mut self, values: &[f32], shape: &[usize]) {
        let [outer, channels, rest @ ..] = shape else {
            return;
        };
        let inner: usize = rest.iter().product();
        if channels * inner == 0 {
            return;
        }
        if self.channel_sums.len() != *channels {
            self.channel_sums = vec![(0.0, 0); *channels];
        }
        for block in values.chunks_exact(channels * inner).take(*outer) {
            for (sum, plane) in self.channel_sums.iter_mut().zip(block.chunks_exact(inner)) {
                for &value in plane.iter().filter(|v| v.is_finite()) {
                    sum.0 += value as f64;
                    sum.1 += 1;
                }
            }
        }
    }

    fn channel_means(&self) -> Option<Vec<f32>> {
        if self.channel_sums.is_empty() {
            return None;
        }
        Some(
            self.channel_sums
                .iter()
                .map(|&(sum, count)| {
                    if count == 0 {
                        0.0
                    } else {
                        (sum / count as f64) as f32
                    }
                })
                .collect(),
        )
    }

    fn span(&self) -> Range {
        if self.min > self.max {
            // Nothing finite was seen.
            Range { min: 0.0, max: 0.0 }
        } else {
            Range::including_zero(self.min, self.max)
        }
    }

    fn observe_histogram(&mut self, values: &[f32]) {
        let span = self.span();
        if self.histogram.is_empty() {
            self.histogram = vec![0; HISTOGRAM_BINS];
        }
        let width = (span.max - span.min) / HISTOGRAM_BINS as f32;
        if width <= 0.0 {
            return;
        }
        for &value in values.iter().filter(|v| v.is_finite()) {
            let bin = ((value - span.min) / width) as usize;
            self.histogram[bin.min(HISTOGRAM_BINS - 1)] += 1;
        }
    }

    fn range(&self, method: CalibrationMethod) -> Range {
        let span = self.span();
        let total: u64 = self.histogram.iter().sum();
        if span.max <= span.min || total == 0 {
            return span;
        }
        let width = (span.max - span.min) / HISTOGRAM_BINS as f32;
        match method {
            CalibrationMethod::MinMax => span,
            CalibrationMethod::Percentile { percentile } => {
                let tail = ((1.0 - percentile / 100.0) * total as f64).floor() as u64;
                let mut low = 0;
                let mut seen = 0;
                while low < HISTOGRAM_BINS && seen + self.histogram[low] <= tail {
                    seen += self.histogram[low];
                    low += 1;
                }
                let mut high = HISTOGRAM_BINS;
                seen = 0;
                while high > low + 1 && seen + self.histogram[high - 1] <= tail {
                    seen += self.histogram[high - 1];
                    high -= 1;
                }
                Range::including_zero(
                    span.min + low as f32 * width,
                    span.min + high as f32 * width,
                )
            }
            CalibrationMethod::Entropy => {
                // The positive and the negative side are searched separately, each
                // from zero outward, the negative one mirrored.
                let zero_bin = (((0.0 - span.min) / width) as usize).min(HISTOGRAM_BINS - 1);
                let positive: Vec<u64> = self.histogram[zero_bin..].to_vec();
                let negative: Vec<u64> =
                    self.histogram[..=zero_bin].iter().rev().copied().collect();
                let levels = if span.min < 0.0 && span.max > 0.0 {
                    128
                } else {
                    255
                };
                let upper = if span.max > 0.0 {
                    entropy_threshold(&positive, levels) as f32 * width
                } else {
                    0.0
                };
                let lower = if span.min < 0.0 {
                    -(entropy_threshold(&negative, levels) as f32 * width)
                } else {
                    0.0
                };
                Range::including_zero(lower, upper)
            }
        }
    }
}

/// Number of bins (from the start of `histogram`) to keep so that quantizing the kept
/// part into `levels` levels, with everything beyond folded into the last kept bin,
/// diverges least from the original distribution.
fn entropy_threshold(histogram: &[u64], levels: usize) -> usize {
    let bins = histogram.len();
    if bins <= levels {
        return bins;
    }
    let mut best = (f64::INFINITY, bins);
    // Thresholds below `levels` bins cannot be merged into `levels` levels.
    for threshold in levels..=bins {
        let outliers: u64 = histogram[threshold..].iter().sum();
        let mut reference: Vec<f64> = histogram[..threshold].iter().map(|&c| c as f64).collect();
        *reference.last_mut().expect("threshold >= levels > 0") += outliers as f64;
        let reference_total: f64 = reference.iter().sum();
        if reference_total == 0.0 {
            continue;
        }
        let mut candidate = vec![0.0f64; threshold];
        for level in 0..levels {
            let start = level * threshold / levels;
            let end = ((level + 1) * threshold / levels).max(start + 1);
            // Merge the kept bins (without the folded outliers) into `levels` groups,
            // then spread each group's mass evenly over the bins where the reference
            // is not empty.
            let mass: f64 = histogram[start..end].iter().map(|&c| c as f64).sum();
            let nonzero = reference[start..end].iter().filter(|&&c| c > 0.0).count();
            if nonzero > 0 {
                for bin in start..end {
                    if reference[bin] > 0.0 {
                        candidate[bin] = mass / nonzero as f64;
                    }
                }
            }
        }
        let candidate_total: f64 = candidate.iter().sum();
        if candidate_total == 0.0 {
            continue;
        }
        let mut divergence = 0.0;
        for (p, q) in reference.iter().zip(&candidate) {
            if *p > 0.0 {
                let p = p / reference_total;
                // An empty candidate bin where the reference has mass (the folded
                // outliers) is smoothed to a small probability rather than infinity.
                // A floor much below 1e-4 makes keeping every outlier look cheapest.
                let q = (q / candidate_total).max(1e-4);
                divergence += p * (p / q).ln();
            }
        }
        if divergence < best.0 {
            best = (divergence, threshold);
        }
    }
    best.1
}

/// Clipping ranges and channel means of the named tensors of `model`, from running it
/// on `samples` (each sample one input tensor of the model's input shape).
pub fn calibrate(
    model: &OnnxModel,
    input_shape: &[usize],
    tensors: &[String],
    samples: &[Tensor],
    method: CalibrationMethod,
    progress: &ProgressBar,
) -> anyhow::Result<Calibration> {
    anyhow::ensure!(!samples.is_empty(), "the calibration set is empty");
    for (index, sample) in samples.iter().enumerate() {
        anyhow::ensure!(
            sample.shape() == input_shape,
            "calibration sample {index} has shape {:?}; the model's input is {:?}",
            sample.shape(),
            input_shape
        );
    }
    let plan = observing_plan(model, input_shape, tensors)?;
    let mut observers: Vec<Observer> = tensors.iter().map(|_| Observer::new()).collect();
    let histogram_pass = method != CalibrationMethod::MinMax;
    let passes = if histogram_pass { 2 } else { 1 };
    progress.set_length((samples.len() * passes) as u64);
    for pass in 0..passes {
        for sample in samples {
            let outputs = plan
                .run(tvec!(sample.clone().into()))
                .context("the float model failed on a calibration sample")?;
            for (observer, output) in observers.iter_mut().zip(outputs.iter()) {
                let view = output.to_plain_array_view::<f32>()?;
                let values = view.as_slice().context("tensor is not contiguous")?;
                if pass == 0 {
                    observer.observe_range(values);
                    observer.observe_channels(values, view.shape());
                } else {
                    observer.observe_histogram(values);
                }
            }
            progress.inc(1);
        }
    }
    let mut calibration = Calibration::default();
    for (name, observer) in tensors.iter().zip(&observers) {
        calibration
            .ranges
            .insert(name.clone(), observer.range(method));
        if let Some(means) = observer.channel_means() {
            calibration.channel_means.insert(name.clone(), means);
        }
    }
    Ok(calibration)
}

/// Builds a runnable float model whose outputs are the named tensors, in order.
fn observing_plan(
    model: &OnnxModel,
    input_shape: &[usize],
    tensors: &[String],
) -> anyhow::Result<Arc<TypedSimplePlan>> {
    let mut inference = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_proto_model(&model.proto)
        .map_err(|error| anyhow::anyhow!("{error:#}"))
        .context("tract could not load the float model")?
        .with_input_fact(0, f32::fact(input_shape).into())
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
    let outlets = tensors
        .iter()
        .map(|name| {
            // Graph inputs are source nodes without an outlet label.
            inference
                .find_outlet_label(name)
                .or_else(|| {
                    inference
                        .node_by_name(name)
                        .ok()
                        .map(|node| OutletId::new(node.id, 0))
                })
                .with_context(|| format!("tensor {name} is not in the model"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    inference
        .select_output_outlets(&outlets)
        .map_err(|error| anyhow::anyhow!("{error:#}"))?;
    let plan = inference
        .into_optimized()
        .and_then(|typed| typed.into_runnable())
        .map_err(|error| anyhow::anyhow!("{error:#}"))
        .context("tract could not optimise the float model for calibration")?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(values: &[f32]) -> Observer {
        let mut observer = Observer::new();
        observer.observe_range(values);
        observer.observe_histogram(values);
        observer
    }

    #[test]
    fn min_max_covers_every_value_and_zero() {
        let observer = observed(&[1.0, 2.0, 3.0]);
        assert_eq!(
            observer.range(CalibrationMethod::MinMax),
            Range { min: 0.0, max: 3.0 }
        );
    }

    #[test]
    fn percentile_drops_a_lone_outlier() {
        let mut values: Vec<f32> = (0..10_000).map(|i| (i % 100) as f32 / 100.0).collect();
        values.push(1000.0);
        let range = observed(&values).range(CalibrationMethod::Percentile { percentile: 99.9 });
        assert!(range.max < 2.0, "outlier kept: {range:?}");
        assert!(range.max > 0.9, "clipped into the bulk: {range:?}");
    }

    #[test]
    fn entropy_range_long_tail() {
        let mut values: Vec<f32> = (0..20_000).map(|i| (i % 1000) as f32 / 100.0).collect();
        values.extend([50.0, 80.0, 100.0]);
        let range = observed(&values).range(CalibrationMethod::Entropy);
        assert!(range.max < 50.0, "tail kept: {range:?}");
        assert!(range.max >= 9.9, "bulk clipped: {range:?}");
        assert_eq!(range.min, 0.0);
    }

    #[test]
    fn range_of_a_constant_tensor_holds_only_zero() {
        let range = observed(&[0.0; 16]).range(CalibrationMethod::Entropy);
        assert_eq!(range, Range { min: 0.0, max: 0.0 });
    }

    #[test]
    fn channel_means_average_over_batch_and_plane() {
        let mut observer = Observer::new();
        // Two images of two channels of 2 values: channel 0 is 1, 3, 5, 7 and
        // channel 1 is 10, 20, 30 and a NaN, which is left out.
        let values = [1.0, 3.0, 10.0, 20.0, 5.0, 7.0, 30.0, f32::NAN];
        observer.observe_channels(&values, &[2, 2, 2]);
        assert_eq!(observer.channel_means(), Some(vec![4.0, 20.0]));
    }

    #[test]
    fn empty_tensor_has_no_channel_means() {
        let mut observer = Observer::new();
        observer.observe_channels(&[], &[1, 0, 4]);
        assert_eq!(observer.channel_means(), None);
    }

    #[test]
    fn vectors_have_no_channel_means() {
        let mut observer = Observer::new();
        observer.observe_channels(&[1.0, 2.0], &[2]);
        assert_eq!(observer.channel_means(), None);
    }

    #[test]
    fn methods_parse_from_their_names() {
        assert_eq!("min-max".parse(), Ok(CalibrationMethod::MinMax));
        assert_eq!(
            "percentile-99.99".parse(),
            Ok(CalibrationMethod::Percentile { percentile: 99.99 })
        );
        assert!("percentile-20".parse::<CalibrationMethod>().is_err());
        assert!("kl".parse::<CalibrationMethod>().is_err());
    }
}
