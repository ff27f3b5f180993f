//! Post-training int8 quantization: rewriting a float ONNX graph into the operator
//! form tract runs with integer kernels.
//!
//! Measured in tract 0.23 on x86-64 (see `compress/benches/compress.rs`), the QDQ form
//! that onnxruntime's quantizer writes (`DequantizeLinear -> Conv -> QuantizeLinear`)
//! runs slower than float: tract folds the weight dequantization into a float
//! convolution and then executes the activation quantize/dequantize pairs as extra
//! element-wise work. `QLinearConv` is one node per layer, which the runtime
//! (`fleet_runtime::int8`) executes with its own integer kernels. So the rewrite
//! produces:
//!
//! * `Conv` (optionally followed by `Relu`, or `Clip` with a lower bound of 0) becomes
//!   one `QLinearConv` with u8 activations, i8 weights per output channel and an i32
//!   bias, depthwise convolutions included. The activation is fused into the output's
//!   quantization: with a zero point of 0, saturation at 0 is exactly `Relu`, and an
//!   output range capped at the `Clip` bound is exactly `Clip`.
//! * `Gemm` becomes `MatMulInteger` (u8 x i8 -> i32) followed by a float rescale and
//!   bias: the result stays float, so a classifier's logits lose no resolution.
//! * Shape-only and order-preserving operators (`MaxPool`, `Flatten`, `Reshape`, ...)
//!   stay in u8 between quantized layers. Everything else runs in float, with
//!   `DequantizeLinear` and `QuantizeLinear` inserted where the two meet.
//!
//! [`LayerMode::WeightOnly`] keeps a layer's arithmetic in float and stores only its
//! weights as i8, dequantized when the model loads: a quarter of the size for runtimes
//! without integer kernels.
//!
//! Rounding a layer's weights to i8 shifts the mean of each output channel by
//! `(dequantized - float weights) x (mean input)`. Depthwise channels have only a few
//! weights each, so their rounding errors do not cancel. Where calibration measured the
//! mean of each input channel, the quantizer subtracts this shift from the layer's
//! bias (bias correction).
//!
//! Every scale written is finite, positive and normal: a weight channel that is all
//! zero (pruning makes these), a tensor that calibration saw constant, or a bias too
//! large for i32 at the natural scale are all given a safe scale, and counted in the
//! report.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::tract_ndarray::{ArrayD, ArrayViewD, Axis};

use crate::calibrate::{Calibration, Range};
use crate::graph::{
    self, GraphError, OnnxModel, attribute_float, attribute_int, f32_tensor, i8_tensor, i32_tensor,
    int_attribute, u8_tensor,
};

/// Smallest width an activation range is given; a narrower one (a tensor calibration
/// saw constant) would produce a scale so small that biases overflow i32.
const MIN_ACTIVATION_SPAN: f32 = 1e-6;
/// Smallest weight scale written; keeps scales and their products with activation
/// scales far from the subnormal range.
const MIN_WEIGHT_SCALE: f32 = 1e-12;
/// Largest magnitude an i32 bias is allowed, leaving headroom for the accumulator.
const MAX_BIAS: f64 = (1u64 << 30) as f64;
/// Operators that move or select values without changing them, so u8 data with its
/// scale and zero point passes through them unchanged.
const PASS_THROUGH: &[&str] = &[
    "MaxPool",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Identity",
];

/// Rendering of one layer in the quantized graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum LayerMode {
    /// Integer compute: u8 activations, i8 weights.
    Int8,
    /// i8 weights in the file, dequantized to float when the model loads; float compute.
    WeightOnly,
    /// Left as it is.
    Float,
}

/// A layer the quantizer can render in int8: a `Conv` or `Gemm` with constant weights.
#[derive(Debug, Clone, Serialize)]
pub struct Layer {
    /// Name of the `Conv` or `Gemm` node.
    pub name: String,
    pub op: String,
    pub depthwise: bool,
    pub parameters: usize,
    /// Tensor the layer reads.
    pub input: String,
    /// Tensor the layer writes, after a fused `Relu`/`Clip`.
    pub output: String,
    /// Index of the fused activation node, if any.
    #[serde(skip)]
    fused_activation: Option<usize>,
    /// Upper bound of a fused `Clip`.
    #[serde(skip)]
    clip_max: Option<f32>,
}

/// Lists the `Conv` and `Gemm` nodes of `model` whose weights are initializers, in graph
/// order, with the activation each can absorb.
pub fn layers(model: &OnnxModel) -> Result<Vec<Layer>, GraphError> {
    let consumers = model.consumers();
    let outputs: HashSet<String> = model.output_names().into_iter().collect();
    let nodes = model.nodes();
    let mut found = Vec::new();
    for node in nodes {
        if !matches!(node.op_type.as_str(), "Conv" | "Gemm") || node.input.len() < 2 {
            continue;
        }
        let Some(weight) = model.initializer(&node.input[1]) else {
            continue;
        };
        if weight.dims.len() < 2 {
            continue;
        }
        let parameters = weight.dims.iter().product::<i64>().max(0) as usize;
        let group = attribute_int(node, "group", 1);
        let depthwise = node.op_type == "Conv" && group > 1 && weight.dims.get(1) == Some(&1);
        let mut layer = Layer {
            name: node.name.clone(),
            op: node.op_type.clone(),
            depthwise,
            parameters,
            input: node.input[0].clone(),
            output: node.output[0].clone(),
            fused_activation: None,
            clip_max: None,
        };
        let single_consumer = consumers
            .get(&node.output[0])
            .filter(|c| c.len() == 1 && !outputs.contains(&node.output[0]))
            .map(|c| c[0]);
        if let (Some(next), "Conv") = (single_consumer, node.op_type.as_str()) {
            let activation = &nodes[next];
            let fusable = match activation.op_type.as_str() {
                "Relu" => Some(None),
                "Clip" => clip_bounds(model, activation)?
                    .filter(|(min, max)| *min == 0.0 && max.is_finite() && *max > 0.0)
                    .map(|(_, max)| Some(max)),
                _ => None,
            };
            if let Some(clip_max) = fusable {
                layer.fused_activation = Some(next);
                layer.clip_max = clip_max;
                layer.output = activation.output[0].clone();
            }
        }
        found.push(layer);
    }
    Ok(found)
}

/// Bounds of a `Clip` node whose bounds are constants; `None` when either is computed.
fn clip_bounds(model: &OnnxModel, node: &NodeProto) -> Result<Option<(f32, f32)>, GraphError> {
    let bound = |index: usize, default: f32| -> Result<Option<f32>, GraphError> {
        match node.input.get(index).filter(|name| !name.is_empty()) {
            None => Ok(Some(default)),
            Some(name) => match model.initializer(name) {
                None => Ok(None),
                Some(_) => Ok(model.float_initializer(name)?.iter().next().copied()),
            },
        }
    };
    let opset_attributes = model.opset() < 11;
    if opset_attributes {
        return Ok(Some((
            attribute_float(node, "min", f32::NEG_INFINITY),
            attribute_float(node, "max", f32::INFINITY),
        )));
    }
    Ok(bound(1, f32::NEG_INFINITY)?.zip(bound(2, f32::INFINITY)?))
}

/// Tensors whose ranges calibration must measure for the given layers.
pub fn calibration_tensors(layers: &[Layer]) -> Vec<String> {
    let mut names = Vec::new();
    for layer in layers {
        for name in [&layer.input, &layer.output] {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
}

/// Summary of a rewrite, for the compressor's report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct QuantizeReport {
    /// Mode of every candidate layer.
    pub layers: BTreeMap<String, LayerMode>,
    /// Weight channels that were all zero or nearly so and got the minimum scale.
    pub degenerate_weight_channels: usize,
    /// Channels whose scale was raised so the bias fits in i32.
    pub bias_limited_channels: usize,
    /// Activations calibration saw constant, given the minimum span.
    pub degenerate_activations: usize,
    /// Int8 layers whose bias was corrected for the shift that rounding weights causes.
    pub bias_corrected_layers: usize,
}

/// Scale and zero point of a u8 activation.
#[derive(Debug, Clone, Copy)]
struct ActivationParams {
    scale: f32,
    zero_point: u8,
}

fn activation_params(
    range: Range,
    clip_max: Option<f32>,
    report: &mut QuantizeReport,
) -> ActivationParams {
    let min = range.min.min(0.0);
    let mut max = range.max.max(0.0);
    if let Some(bound) = clip_max {
        max = max.min(bound);
    }
    let (min, max) = if (max - min).is_finite() && max - min >= MIN_ACTIVATION_SPAN {
        (min, max)
    } else {
        report.degenerate_activations += 1;
        let low = if min.is_finite() {
            min.clamp(-MIN_ACTIVATION_SPAN, 0.0)
        } else {
            0.0
        };
        (low, low + MIN_ACTIVATION_SPAN)
    };
    let scale = checked_scale((max - min) / 255.0);
    let zero_point = (-min / scale).round().clamp(0.0, 255.0) as u8;
    ActivationParams { scale, zero_point }
}

/// Returns `scale` when it is finite, positive and normal, and the smallest weight scale
/// otherwise.
fn checked_scale(scale: f32) -> f32 {
    if scale.is_normal() && scale > 0.0 {
        scale.max(MIN_WEIGHT_SCALE)
    } else {
        MIN_WEIGHT_SCALE
    }
}

/// Symmetric i8 weights per slice along `axis`, with scales chosen so that
/// `bias[c] / (input_scale * scale[c])` fits in i32 when a bias is given.
fn quantize_weights(
    weights: &ArrayD<f32>,
    axis: usize,
    bias: Option<(&[f32], f32)>,
    report: &mut QuantizeReport,
) -> (ArrayD<i8>, Vec<f32>) {
    let mut scales = Vec::with_capacity(weights.shape()[axis]);
    for (channel, slice) in weights.axis_iter(Axis(axis)).enumerate() {
        let max_abs = slice.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let mut scale = max_abs / 127.0;
        if !(scale.is_normal() && scale >= MIN_WEIGHT_SCALE) {
            report.degenerate_weight_channels += 1;
            scale = MIN_WEIGHT_SCALE;
        }
        if let Some((bias, input_scale)) = bias {
            let needed = (bias[channel].abs() as f64 / (input_scale as f64 * MAX_BIAS)) as f32;
            if needed > scale {
                report.bias_limited_channels += 1;
                scale = checked_scale(needed * 1.001);
            }
        }
        scales.push(scale);
    }
    let mut quantized = ArrayD::<i8>::zeros(weights.shape());
    for (channel, (mut target, source)) in quantized
        .axis_iter_mut(Axis(axis))
        .zip(weights.axis_iter(Axis(axis)))
        .enumerate()
    {
        let scale = scales[channel];
        target.zip_mut_with(&source, |q, w| {
            *q = (w / scale).round().clamp(-127.0, 127.0) as i8;
        });
    }
    (quantized, scales)
}

/// Computes the mean change of each output channel that rounding the weights causes,
/// for inputs whose channels average `input_means`.
///
/// `weights` and `quantized` have output channels on axis 0 and the input channels of
/// a group on axis 1, as in `Conv`. A matrix is passed as `[N, K]`. `groups` splits the
/// inputs as `Conv`'s attribute does. Returns `None` when the means do not match the
/// weights' input channels.
fn rounding_shift(
    weights: ArrayViewD<'_, f32>,
    quantized: ArrayViewD<'_, i8>,
    scales: &[f32],
    input_means: &[f32],
    groups: usize,
) -> Option<Vec<f32>> {
    let outputs = weights.shape()[0];
    let inputs_per_group = *weights.shape().get(1)?;
    if groups == 0
        || !outputs.is_multiple_of(groups)
        || input_means.len() != groups * inputs_per_group
    {
        return None;
    }
    let outputs_per_group = outputs / groups;
    let shifts = (0..outputs)
        .map(|channel| {
            let first_input = channel / outputs_per_group * inputs_per_group;
            let float = weights.index_axis(Axis(0), channel);
            let rounded = quantized.index_axis(Axis(0), channel);
            let mut shift = 0.0f64;
            for input in 0..inputs_per_group {
                let error: f64 = float
                    .index_axis(Axis(0), input)
                    .iter()
                    .zip(rounded.index_axis(Axis(0), input))
                    .map(|(&w, &q)| (q as f32 * scales[channel] - w) as f64)
                    .sum();
                shift += error * input_means[first_input + input] as f64;
            }
            shift as f32
        })
        .collect();
    Some(shifts)
}

/// Rewrites `model` with each layer in the mode `modes` gives (layers absent from
/// `modes` stay float). `calibration` must contain the range of every tensor
/// [`calibration_tensors`] names for the int8 layers. An int8 layer whose input has
/// channel means gets its bias corrected.
pub fn quantize(
    model: &OnnxModel,
    layers: &[Layer],
    modes: &HashMap<String, LayerMode>,
    calibration: &Calibration,
) -> Result<(OnnxModel, QuantizeReport), GraphError> {
    let mut rewrite = Rewrite::new(model, calibration);
    let by_name: HashMap<&str, &Layer> = layers.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut skipped = HashSet::new();
    for layer in layers {
        let mode = modes.get(&layer.name).copied().unwrap_or(LayerMode::Float);
        rewrite.report.layers.insert(layer.name.clone(), mode);
        if mode == LayerMode::Int8 {
            skipped.extend(layer.fused_activation);
        }
    }
    for (index, node) in model.nodes().iter().enumerate() {
        if skipped.contains(&index) {
            continue;
        }
        let layer = by_name.get(node.name.as_str()).copied();
        let mode = layer
            .and_then(|l| modes.get(&l.name).copied())
            .unwrap_or(LayerMode::Float);
        match (layer, mode) {
            (Some(layer), LayerMode::Int8) if node.op_type == "Conv" => {
                rewrite.int8_conv(node, layer)?
            }
            (Some(_), LayerMode::Int8) => rewrite.int8_gemm(node)?,
            (Some(_), LayerMode::WeightOnly) => rewrite.weight_only(node)?,
            _ => rewrite.float_node(node)?,
        }
    }
    rewrite.finish()
}

/// State of one rewrite: the nodes written so far and which form each tensor has.
struct Rewrite<'a> {
    source: &'a OnnxModel,
    calibration: &'a Calibration,
    model: OnnxModel,
    nodes: Vec<NodeProto>,
    /// Tensors available in float under their own name.
    float: HashSet<String>,
    /// Tensors available as u8, with the quantized tensor's name and parameters.
    quantized: HashMap<String, (String, ActivationParams)>,
    report: QuantizeReport,
}

impl<'a> Rewrite<'a> {
    fn new(source: &'a OnnxModel, calibration: &'a Calibration) -> Rewrite<'a> {
        let mut float: HashSet<String> = source.data_inputs().into_iter().collect();
        float.extend(source.graph().initializer.iter().map(|t| t.name.clone()));
        let mut model = source.clone();
        model.nodes_mut().clear();
        Rewrite {
            source,
            calibration,
            model,
            nodes: Vec::new(),
            float,
            quantized: HashMap::new(),
            report: QuantizeReport::default(),
        }
    }

    fn range(&self, tensor: &str, node: &NodeProto) -> Result<Range, GraphError> {
        self.calibration.ranges.get(tensor).copied().ok_or_else(|| {
            GraphError::node(node, format!("no calibrated range for tensor {tensor}"))
        })
    }

    /// Name of the u8 version of `tensor`, inserting a `QuantizeLinear` if needed.
    fn quantized_input(
        &mut self,
        tensor: &str,
        node: &NodeProto,
    ) -> Result<(String, ActivationParams), GraphError> {
        if let Some(found) = self.quantized.get(tensor) {
            return Ok(found.clone());
        }
        let range = self.range(tensor, node)?;
        let params = activation_params(range, None, &mut self.report);
        let (scale, zero_point) = self.activation_initializers(tensor, params);
        let name = format!("{tensor}_quantized");
        self.nodes.push(graph::node(
            "QuantizeLinear",
            &format!("{tensor}_quantize"),
            &[tensor, &scale, &zero_point],
            &[&name],
        ));
        self.quantized
            .insert(tensor.to_string(), (name.clone(), params));
        Ok((name, params))
    }

    /// Makes `tensor` available in float, inserting a `DequantizeLinear` if it exists
    /// only as u8.
    fn float_input(&mut self, tensor: &str) {
        if tensor.is_empty() || self.float.contains(tensor) {
            return;
        }
        if let Some((name, params)) = self.quantized.get(tensor).cloned() {
            let (scale, zero_point) = self.activation_initializers(tensor, params);
            self.nodes.push(graph::node(
                "DequantizeLinear",
                &format!("{tensor}_dequantize"),
                &[&name, &scale, &zero_point],
                &[tensor],
            ));
            self.float.insert(tensor.to_string());
        }
    }

    /// Adds the scale and zero point of activation `tensor`; returns their names.
    ///
    /// Zero points are shared by value: every activation with zero point 0 (all those
    /// after a `Relu` or `Clip`) reads one scalar.
    fn activation_initializers(
        &mut self,
        tensor: &str,
        params: ActivationParams,
    ) -> (String, String) {
        let scale = format!("{tensor}_scale");
        let zero_point = format!("activation_zero_point_{}", params.zero_point);
        self.model
            .set_initializer(f32_tensor(&scale, &[], &[params.scale]));
        self.model
            .set_initializer(u8_tensor(&zero_point, &[], &[params.zero_point]));
        (scale, zero_point)
    }

    /// Adds a layer's i8 weights and per-channel scales; returns their names.
    fn weight_initializers(
        &mut self,
        prefix: &str,
        quantized: &ArrayD<i8>,
        scales: &[f32],
    ) -> (String, String) {
        let weight = format!("{prefix}_weight_quantized");
        let scale = format!("{prefix}_weight_scale");
        self.model.set_initializer(i8_tensor(
            &weight,
            quantized.shape(),
            quantized.as_slice().expect("standard layout"),
        ));
        self.model
            .set_initializer(f32_tensor(&scale, &[scales.len()], scales));
        (weight, scale)
    }

    /// Adds the weight zero point and returns its name.
    ///
    /// Weights are symmetric, so the zero point is 0 in every channel of every layer,
    /// and one scalar serves all of them. `QLinearConv` and `MatMulInteger` accept a
    /// scalar beside per-channel scales. A vector of zeros per layer took 22,218 bytes
    /// of EfficientNet-Lite0's file.
    fn weight_zero_point(&mut self) -> String {
        let name = "weight_zero_point".to_string();
        self.model.set_initializer(i8_tensor(&name, &[], &[0]));
        name
    }

    fn weight_and_bias(
        &self,
        node: &NodeProto,
    ) -> Result<(ArrayD<f32>, Option<Vec<f32>>), GraphError> {
        let weights = self.source.float_initializer(&node.input[1])?;
        let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
            None => None,
            Some(name) => {
                let bias = self.source.initializer(name).ok_or_else(|| {
                    GraphError::node(node, format!("bias {name} is computed, not a constant"))
                })?;
                Some(graph::tensor_to_f32(bias)?.iter().copied().collect())
            }
        };
        Ok((weights, bias))
    }

    /// Returns the rounding shift of each output channel of the layer reading `input`
    /// (see [`rounding_shift`] for the weights' layout), or `None` when calibration has
    /// no channel means for `input` or they do not fit the weights.
    fn rounding_shift_of(
        &mut self,
        input: &str,
        (weights, quantized, scales): (ArrayViewD<'_, f32>, ArrayViewD<'_, i8>, &[f32]),
        groups: usize,
    ) -> Option<Vec<f32>> {
        let means = self.calibration.channel_means.get(input)?;
        let shift = rounding_shift(weights, quantized, scales, means, groups)?;
        self.report.bias_corrected_layers += 1;
        Some(shift)
    }

    fn int8_conv(&mut self, node: &NodeProto, layer: &Layer) -> Result<(), GraphError> {
        let (input, input_params) = self.quantized_input(&layer.input, node)?;
        let (weights, bias) = self.weight_and_bias(node)?;
        let channels = weights.shape()[0];
        let bias = bias.unwrap_or_else(|| vec![0.0; channels]);
        if bias.iter().any(|b| !b.is_finite()) {
            return Err(GraphError::node(
                node,
                "the bias holds a value that is not finite",
            ));
        }
        if bias.len() != channels {
            return Err(GraphError::node(
                node,
                format!(
                    "bias has {} values for {channels} output channels",
                    bias.len()
                ),
            ));
        }
        let (quantized, scales) = quantize_weights(
            &weights,
            0,
            Some((&bias, input_params.scale)),
            &mut self.report,
        );
        let groups = attribute_int(node, "group", 1).max(1) as usize;
        let shift = self.rounding_shift_of(
            &layer.input,
            (weights.view(), quantized.view(), &scales),
            groups,
        );
        let bias: Vec<f32> = match shift {
            Some(shift) => bias.iter().zip(&shift).map(|(b, s)| b - s).collect(),
            None => bias,
        };
        let bias_q: Vec<i32> = bias
            .iter()
            .zip(&scales)
            .map(|(b, s)| (*b as f64 / (input_params.scale as f64 * *s as f64)).round() as i32)
            .collect();
        let output_range = self.range(&layer.output, node)?;
        let output_params = activation_params(output_range, layer.clip_max, &mut self.report);
        let (weight_name, weight_scale) = self.weight_initializers(&node.name, &quantized, &scales);
        let weight_zero = self.weight_zero_point();
        let bias_name = format!("{}_bias_quantized", node.name);
        self.model
            .set_initializer(i32_tensor(&bias_name, &[channels], &bias_q));
        let (input_scale, input_zero) = self.activation_initializers(&layer.input, input_params);
        let (output_scale, output_zero) =
            self.activation_initializers(&layer.output, output_params);
        let output = format!("{}_quantized", layer.output);
        let mut conv = graph::node(
            "QLinearConv",
            &node.name,
            &[
                &input,
                &input_scale,
                &input_zero,
                &weight_name,
                &weight_scale,
                &weight_zero,
                &output_scale,
                &output_zero,
                &bias_name,
            ],
            &[&output],
        );
        conv.attribute = node.attribute.clone();
        self.nodes.push(conv);
        self.quantized
            .insert(layer.output.clone(), (output, output_params));
        Ok(())
    }

    /// Rewrites a `Gemm` as `MatMulInteger` on the u8 input and i8 weights, then a float
    /// rescale per column and one float addend.
    ///
    /// `MatMulInteger` gets no zero points. The weights' is 0, and the input's enters
    /// through the addend, since `(x - zp) . w = x . w - zp * sum(w)` and the column
    /// sums of constant weights are known here. So the product needs no zero-point
    /// correction when it runs.
    fn int8_gemm(&mut self, node: &NodeProto) -> Result<(), GraphError> {
        if attribute_int(node, "transA", 0) != 0 {
            return Err(GraphError::node(
                node,
                "transA = 1 is not supported in int8",
            ));
        }
        let alpha = attribute_float(node, "alpha", 1.0);
        let beta = attribute_float(node, "beta", 1.0);
        let (input, input_params) = self.quantized_input(&node.input[0], node)?;
        let (weights, bias) = self.weight_and_bias(node)?;
        if weights.ndim() != 2 {
            return Err(GraphError::node(node, "weight is not a matrix"));
        }
        // MatMulInteger wants B as [K, N]; Gemm's transB = 1 stores it as [N, K].
        let weights = if attribute_int(node, "transB", 0) != 0 {
            weights.t().as_standard_layout().to_owned()
        } else {
            weights
        };
        let columns = weights.shape()[1];
        let (quantized, scales) = quantize_weights(&weights, 1, None, &mut self.report);
        let rescale: Vec<f32> = scales
            .iter()
            .map(|s| s * input_params.scale * alpha)
            .collect();

        // Per column: minus the input zero point times the weights' sum, and minus the
        // rounding shift, which the product scales by alpha.
        let zero_point = f32::from(input_params.zero_point);
        let mut offset: Vec<f32> = quantized
            .axis_iter(Axis(1))
            .zip(&rescale)
            .map(|(column, r)| -r * zero_point * column.iter().map(|&w| f32::from(w)).sum::<f32>())
            .collect();
        let shift = self.rounding_shift_of(
            &node.input[0],
            (weights.t().into_dyn(), quantized.t().into_dyn(), &scales),
            1,
        );
        if let Some(shift) = shift {
            for (offset, shift) in offset.iter_mut().zip(shift) {
                *offset -= alpha * shift;
            }
        }
        let offset = ArrayD::from_shape_vec(vec![columns], offset).expect("one per column");
        // The bias keeps its own dims: a [M, 1] bias broadcasts along rows.
        let addend = match bias {
            Some(bias) => {
                let dims: Vec<usize> = self
                    .source
                    .initializer(&node.input[2])
                    .map(|t| t.dims.iter().map(|&d| d as usize).collect())
                    .unwrap_or_else(|| vec![bias.len()]);
                let broadcasts =
                    dims.len() <= 2 && dims.last().is_none_or(|&d| d == 1 || d == columns);
                if !broadcasts {
                    return Err(GraphError::node(
                        node,
                        format!("bias of shape {dims:?} does not broadcast to {columns} columns"),
                    ));
                }
                let bias = ArrayD::from_shape_vec(dims, bias)
                    .map_err(|error| GraphError::node(node, format!("bias: {error}")))?
                    .mapv(|b| b * beta);
                &bias + &offset
            }
            None => offset,
        };

        let prefix = &node.name;
        let weight_name = format!("{prefix}_weight_quantized");
        let rescale_name = format!("{prefix}_output_scale");
        let addend_name = format!("{prefix}_bias");
        self.model.set_initializer(i8_tensor(
            &weight_name,
            weights.shape(),
            quantized.as_slice().expect("standard layout"),
        ));
        self.model
            .set_initializer(f32_tensor(&rescale_name, &[columns], &rescale));
        let addend_values: Vec<f32> = addend.iter().copied().collect();
        self.model
            .set_initializer(f32_tensor(&addend_name, addend.shape(), &addend_values));
        let accumulator = format!("{prefix}_accumulator");
        let as_float = format!("{prefix}_accumulator_float");
        let scaled = format!("{prefix}_scaled");
        self.nodes.push(graph::node(
            "MatMulInteger",
            &format!("{prefix}_matmul"),
            &[&input, &weight_name],
            &[&accumulator],
        ));
        let mut cast = graph::node(
            "Cast",
            &format!("{prefix}_cast"),
            &[&accumulator],
            &[&as_float],
        );
        cast.attribute.push(int_attribute("to", 1));
        self.nodes.push(cast);
        self.nodes.push(graph::node(
            "Mul",
            &format!("{prefix}_rescale"),
            &[&as_float, &rescale_name],
            &[&scaled],
        ));
        let output = &node.output[0];
        self.nodes.push(graph::node(
            "Add",
            &format!("{prefix}_add_bias"),
            &[&scaled, &addend_name],
            &[output],
        ));
        self.float.insert(output.clone());
        Ok(())
    }

    /// Stores the weight as i8 with a per-output-channel `DequantizeLinear` that tract
    /// folds into a float constant when the model loads.
    fn weight_only(&mut self, node: &NodeProto) -> Result<(), GraphError> {
        let (weights, _) = self.weight_and_bias(node)?;
        let axis = if node.op_type == "Gemm" && attribute_int(node, "transB", 0) == 0 {
            1
        } else {
            0
        };
        let (quantized, scales) = quantize_weights(&weights, axis, None, &mut self.report);
        let prefix = &node.name;
        let (weight_name, weight_scale) = self.weight_initializers(prefix, &quantized, &scales);
        let dequantized = format!("{prefix}_weight_dequantized");
        // Without a zero point, DequantizeLinear takes it as 0.
        let mut dequantize = graph::node(
            "DequantizeLinear",
            &format!("{prefix}_weight_dequantize"),
            &[&weight_name, &weight_scale],
            &[&dequantized],
        );
        dequantize
            .attribute
            .push(int_attribute("axis", axis as i64));
        self.nodes.push(dequantize);
        let mut rewritten = node.clone();
        rewritten.input[1] = dequantized;
        self.float_node(&rewritten)
    }

    fn float_node(&mut self, node: &NodeProto) -> Result<(), GraphError> {
        let first = node.input.first().cloned().unwrap_or_default();
        let stays_quantized = PASS_THROUGH.contains(&node.op_type.as_str())
            && node.output.len() == 1
            && !self.float.contains(&first)
            && self.quantized.contains_key(&first);
        if stays_quantized {
            let (input, params) = self.quantized[&first].clone();
            let output = format!("{}_quantized", node.output[0]);
            let mut rewritten = node.clone();
            rewritten.input[0] = input;
            rewritten.output[0] = output.clone();
            for other in node.input.iter().skip(1) {
                self.float_input(other);
            }
            self.nodes.push(rewritten);
            self.quantized
                .insert(node.output[0].clone(), (output, params));
            return Ok(());
        }
        for input in &node.input {
            self.float_input(input);
        }
        self.nodes.push(node.clone());
        self.float.extend(node.output.iter().cloned());
        Ok(())
    }

    fn finish(mut self) -> Result<(OnnxModel, QuantizeReport), GraphError> {
        for output in self.source.output_names() {
            self.float_input(&output);
        }
        *self.model.nodes_mut() = self.nodes;
        self.model.require_opset(13);
        self.model.remove_unused_initializers();
        Ok((self.model, self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::prelude::tract_ndarray::arr2;

    #[test]
    fn quantize_weights_zero_channel() {
        let weights = arr2(&[[0.0f32, 0.0], [0.5, -1.0]]).into_dyn();
        let mut report = QuantizeReport::default();
        let (quantized, scales) = quantize_weights(&weights, 0, None, &mut report);
        assert!(
            scales.iter().all(|s| s.is_normal() && *s > 0.0),
            "{scales:?}"
        );
        assert_eq!(report.degenerate_weight_channels, 1);
        assert_eq!(quantized.as_slice().unwrap(), &[0, 0, 64, -127]);
    }

    #[test]
    fn quantize_weights_oversized_bias() {
        let weights = arr2(&[[1e-9f32, -1e-9]]).into_dyn();
        let bias = [1000.0f32];
        let input_scale = 1e-3;
        let mut report = QuantizeReport::default();
        let (_, scales) = quantize_weights(&weights, 0, Some((&bias, input_scale)), &mut report);
        let bias_q = bias[0] as f64 / (input_scale as f64 * scales[0] as f64);
        assert!(bias_q.abs() <= MAX_BIAS, "bias {bias_q} overflows");
        assert_eq!(report.bias_limited_channels, 1);
    }

    fn shift(
        weights: &[f32],
        quantized: &[i8],
        shape: &[usize],
        means: &[f32],
        groups: usize,
    ) -> Option<Vec<f32>> {
        let weights = ArrayD::from_shape_vec(shape, weights.to_vec()).unwrap();
        let quantized = ArrayD::from_shape_vec(shape, quantized.to_vec()).unwrap();
        rounding_shift(
            weights.view(),
            quantized.view(),
            &[0.01, 0.01],
            means,
            groups,
        )
    }

    fn assert_close(found: &[f32], expected: &[f32]) {
        assert_eq!(found.len(), expected.len(), "{found:?}");
        for (f, e) in found.iter().zip(expected) {
            assert!((f - e).abs() < 1e-6, "{found:?} against {expected:?}");
        }
    }

    #[test]
    fn rounding_shift_weighs_by_input_mean() {
        // Rounded to steps of 0.01, 0.104 loses 0.004 and 0.203 loses 0.003.
        let weights = [0.104, 0.203];
        let quantized = [10, 20];
        let shifts = shift(&weights, &quantized, &[1, 2, 1, 1], &[2.0, 3.0], 1).unwrap();
        assert_close(&shifts, &[-0.004 * 2.0 - 0.003 * 3.0]);
    }

    #[test]
    fn rounding_shift_depthwise() {
        let weights = [0.104, 0.0, 0.0, 0.203];
        let quantized = [10, 0, 0, 20];
        let shifts = shift(&weights, &quantized, &[2, 1, 1, 2], &[2.0, 3.0], 2).unwrap();
        assert_close(&shifts, &[-0.004 * 2.0, -0.003 * 3.0]);
    }

    #[test]
    fn rounding_shift_mismatched_means() {
        let weights = [0.104, 0.203];
        let quantized = [10, 20];
        assert_eq!(shift(&weights, &quantized, &[1, 2, 1, 1], &[2.0], 1), None);
        assert_eq!(shift(&weights, &quantized, &[2, 1, 1, 1], &[2.0], 3), None);
    }

    #[test]
    fn activation_params_constant_tensor() {
        let mut report = QuantizeReport::default();
        let params = activation_params(Range { min: 0.0, max: 0.0 }, None, &mut report);
        assert!(params.scale.is_normal());
        assert_eq!(params.zero_point, 0);
        assert_eq!(report.degenerate_activations, 1);
    }

    #[test]
    fn activation_params_fused_clip() {
        let mut report = QuantizeReport::default();
        let params = activation_params(Range { min: 0.0, max: 9.0 }, Some(6.0), &mut report);
        assert!((params.scale * 255.0 - 6.0).abs() < 1e-5);
        assert_eq!(params.zero_point, 0);
    }

    #[test]
    fn activation_params_span_the_calibrated_range() {
        let mut report = QuantizeReport::default();
        let params = activation_params(
            Range {
                min: -1.3,
                max: 2.9,
            },
            None,
            &mut report,
        );
        let lowest = (0.0 - params.zero_point as f32) * params.scale;
        let highest = (255.0 - params.zero_point as f32) * params.scale;
        assert!(params.zero_point > 0);
        assert!((lowest + 1.3).abs() <= params.scale, "lowest {lowest}");
        assert!((highest - 2.9).abs() <= params.scale, "highest {highest}");
    }
}
