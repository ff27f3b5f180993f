//! Pruning: zeroing the smallest weights (unstructured), or removing whole output
//! channels together with the inputs that read them downstream (structured).
//!
//! Unstructured pruning keeps every tensor's shape, so tract's dense kernels run it at
//! the same speed and the zeros only help a later compression of the file. Structured
//! pruning makes the model smaller and faster: a `Conv` or `Gemm` loses output channels,
//! and every layer reading them loses the matching inputs. A channel is followed through
//! operators that act on each channel alone (activations, pooling) and through depthwise
//! convolutions, which lose the same channels in turn. A layer whose output reaches
//! anything else (a residual `Add`, a `Concat`, a graph output) keeps all its channels,
//! because removing a channel there would need the other operand pruned identically.

use std::collections::HashMap;

use serde::Serialize;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::tract_ndarray::{ArrayD, Axis};

use crate::graph::{GraphError, OnnxModel, attribute_int, f32_tensor};

/// Operators that act on each channel separately and keep the channel count.
const PER_CHANNEL: &[&str] = &[
    "Relu",
    "Clip",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Identity",
    "Dropout",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Tanh",
];

/// Change pruning made to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct PrunedLayer {
    pub layer: String,
    /// Output channels (structured) or weights (unstructured) before.
    pub before: usize,
    pub after: usize,
}

/// Zeroes the `sparsity` fraction (0 to 1) of smallest-magnitude weights of every
/// `Conv` and `Gemm` with a constant weight, layer by layer.
pub fn prune_unstructured(
    model: &OnnxModel,
    sparsity: f64,
) -> Result<(OnnxModel, Vec<PrunedLayer>), GraphError> {
    check_fraction("sparsity", sparsity)?;
    let mut pruned = model.clone();
    let mut report = Vec::new();
    for node in model.nodes() {
        if !matches!(node.op_type.as_str(), "Conv" | "Gemm") || node.input.len() < 2 {
            continue;
        }
        let Some(_) = model.initializer(&node.input[1]) else {
            continue;
        };
        let mut weights = model.float_initializer(&node.input[1])?;
        let mut magnitudes: Vec<f32> = weights.iter().map(|w| w.abs()).collect();
        let count = (sparsity * magnitudes.len() as f64).floor() as usize;
        if count == 0 {
            continue;
        }
        magnitudes.sort_by(f32::total_cmp);
        let threshold = magnitudes[count - 1];
        // Ties at the threshold are zeroed too, so the sparsity can slightly exceed the
        // target; it never falls short.
        weights.mapv_inplace(|w| if w.abs() <= threshold { 0.0 } else { w });
        let zeros = weights.iter().filter(|w| **w == 0.0).count();
        pruned.set_initializer(to_tensor(&node.input[1], &weights));
        report.push(PrunedLayer {
            layer: node.name.clone(),
            before: weights.len(),
            after: weights.len() - zeros,
        });
    }
    Ok((pruned, report))
}

/// Adjustment a reader of a pruned tensor needs for the removed channels.
#[derive(Debug, Clone, Copy)]
enum Sink {
    /// A `Conv` reading the channels as its input channels (weight axis 1).
    ConvInput(usize),
    /// A depthwise `Conv`: loses the same channels and passes the pruning on.
    Depthwise(usize),
    /// A `Gemm` reading each channel as `width` consecutive features (after a
    /// `Flatten`, or directly with width 1).
    GemmInput { node: usize, width: usize },
}

/// Removes the `fraction` (0 to 1) of output channels with the smallest L1 norm from
/// every layer whose channels can be followed to all their readers.
// NOTE: channels are chosen by weight magnitude alone. Without retraining afterwards
// this loses 0.6 points on digit-cnn at 25% but wipes out EfficientNet-Lite0, and only
// the digit model family can be retrained (the pipeline's fine-tune step).
pub fn prune_channels(
    model: &OnnxModel,
    fraction: f64,
) -> Result<(OnnxModel, Vec<PrunedLayer>), GraphError> {
    check_fraction("fraction", fraction)?;
    let mut pruned = model.clone();
    let mut report = Vec::new();
    let consumers = model.consumers();
    let outputs: Vec<String> = model.output_names();
    for node in model.nodes() {
        let producer = match node.op_type.as_str() {
            "Conv" => attribute_int(node, "group", 1) == 1,
            "Gemm" => attribute_int(node, "transA", 0) == 0,
            _ => false,
        };
        if !producer || model.initializer(&node.input[1]).is_none() {
            continue;
        }
        // A weight or bias another node also reads would be sliced twice.
        let shared = node.input[1..]
            .iter()
            .filter(|name| !name.is_empty())
            .any(|name| consumers.get(name).is_some_and(|readers| readers.len() > 1));
        if shared {
            continue;
        }
        let mut sinks = Vec::new();
        if !follow(model, &consumers, &outputs, &node.output[0], &mut sinks) || sinks.is_empty() {
            continue;
        }
        // Read the current (possibly already pruned) weights from `pruned`.
        let weights = pruned.float_initializer(&node.input[1])?;
        if weights.ndim() < 2 {
            continue;
        }
        let channel_axis = if node.op_type == "Gemm" && attribute_int(node, "transB", 0) == 0 {
            1
        } else {
            0
        };
        let channels = weights.shape()[channel_axis];
        let keep_count = ((1.0 - fraction) * channels as f64).ceil().max(1.0) as usize;
        if keep_count >= channels {
            continue;
        }
        // A Gemm bias may broadcast (a scalar, [1], [1, N]); only a bias with one value
        // per channel can follow the pruning.
        let bias = node.input.get(2).filter(|b| !b.is_empty());
        if let Some(bias) = bias {
            let per_channel = model
                .initializer(bias)
                .is_some_and(|t| t.dims == [channels as i64]);
            if !per_channel {
                continue;
            }
        }
        let keep = strongest_channels(&weights, channel_axis, keep_count);
        slice_initializer(&mut pruned, &node.input[1], channel_axis, &keep, 1)?;
        if let Some(bias) = bias {
            slice_initializer(&mut pruned, bias, 0, &keep, 1)?;
        }
        for sink in sinks {
            apply_sink(model, &mut pruned, sink, &keep, channels)?;
        }
        report.push(PrunedLayer {
            layer: node.name.clone(),
            before: channels,
            after: keep.len(),
        });
    }
    // Shapes recorded for intermediate tensors no longer hold.
    pruned.graph_mut().value_info.clear();
    Ok((pruned, report))
}

/// Collects how every reader of `tensor` must adapt; false when one cannot.
fn follow(
    model: &OnnxModel,
    consumers: &HashMap<String, Vec<usize>>,
    outputs: &[String],
    tensor: &str,
    sinks: &mut Vec<Sink>,
) -> bool {
    if outputs.iter().any(|o| o == tensor) {
        return false;
    }
    let Some(readers) = consumers.get(tensor) else {
        return true;
    };
    for &reader in readers {
        let node = &model.nodes()[reader];
        let reads_as_data = node.input.first().map(String::as_str) == Some(tensor);
        if !reads_as_data {
            return false;
        }
        let ok = match node.op_type.as_str() {
            op if PER_CHANNEL.contains(&op) => {
                follow(model, consumers, outputs, &node.output[0], sinks)
            }
            "Conv" => {
                let Some(weight) = model.initializer(&node.input[1]) else {
                    return false;
                };
                let group = attribute_int(node, "group", 1);
                if group == 1 {
                    sinks.push(Sink::ConvInput(reader));
                    true
                } else if weight.dims.get(1) == Some(&1) && weight.dims.first() == Some(&group) {
                    sinks.push(Sink::Depthwise(reader));
                    follow(model, consumers, outputs, &node.output[0], sinks)
                } else {
                    false
                }
            }
            "Flatten" => {
                // Only a Flatten from axis 1 feeding Gemms directly keeps each channel's
                // features together and in order.
                if attribute_int(node, "axis", 1) != 1 || outputs.contains(&node.output[0]) {
                    return false;
                }
                let Some(gemms) = consumers.get(&node.output[0]) else {
                    return false;
                };
                gemms.iter().all(|&gemm| {
                    let g = &model.nodes()[gemm];
                    let fine = g.op_type == "Gemm"
                        && attribute_int(g, "transA", 0) == 0
                        && model.initializer(&g.input[1]).is_some()
                        && g.input[0] == node.output[0];
                    if fine {
                        sinks.push(Sink::GemmInput {
                            node: gemm,
                            width: 0,
                        });
                    }
                    fine
                })
            }
            "Gemm" => {
                let fine = attribute_int(node, "transA", 0) == 0
                    && model.initializer(&node.input[1]).is_some();
                if fine {
                    sinks.push(Sink::GemmInput {
                        node: reader,
                        width: 1,
                    });
                }
                fine
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

fn apply_sink(
    model: &OnnxModel,
    pruned: &mut OnnxModel,
    sink: Sink,
    keep: &[usize],
    channels: usize,
) -> Result<(), GraphError> {
    match sink {
        Sink::ConvInput(index) => {
            let node = &model.nodes()[index];
            slice_initializer(pruned, &node.input[1], 1, keep, 1)
        }
        Sink::Depthwise(index) => {
            let node = &model.nodes()[index];
            slice_initializer(pruned, &node.input[1], 0, keep, 1)?;
            if let Some(bias) = node.input.get(2).filter(|b| !b.is_empty()) {
                slice_initializer(pruned, bias, 0, keep, 1)?;
            }
            let name = node.name.clone();
            let rewritten = pruned
                .nodes_mut()
                .iter_mut()
                .find(|n| n.name == name)
                .expect("same nodes as the source");
            set_group(rewritten, keep.len());
            Ok(())
        }
        Sink::GemmInput { node: index, width } => {
            let node = &model.nodes()[index];
            let axis = if attribute_int(node, "transB", 0) != 0 {
                1
            } else {
                0
            };
            let features = pruned.float_initializer(&node.input[1])?.shape()[axis];
            let width = if width == 0 {
                features / channels
            } else {
                width
            };
            if width * channels != features {
                return Err(GraphError::node(
                    node,
                    format!("reads {features} features, not a multiple of {channels} channels"),
                ));
            }
            slice_initializer(pruned, &node.input[1], axis, keep, width)
        }
    }
}

fn set_group(node: &mut NodeProto, group: usize) {
    if let Some(attribute) = node.attribute.iter_mut().find(|a| a.name == "group") {
        attribute.i = group as i64;
    }
}

/// Indices of the `count` slices along `axis` with the largest L1 norm, in order.
fn strongest_channels(weights: &ArrayD<f32>, axis: usize, count: usize) -> Vec<usize> {
    let mut norms: Vec<(usize, f32)> = weights
        .axis_iter(Axis(axis))
        .map(|slice| slice.iter().map(|w| w.abs()).sum::<f32>())
        .enumerate()
        .collect();
    norms.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep: Vec<usize> = norms.into_iter().take(count).map(|(i, _)| i).collect();
    keep.sort_unstable();
    keep
}

/// Keeps, along `axis`, the blocks of `width` entries whose block index is in `keep`.
fn slice_initializer(
    model: &mut OnnxModel,
    name: &str,
    axis: usize,
    keep: &[usize],
    width: usize,
) -> Result<(), GraphError> {
    let values = model.float_initializer(name)?;
    let indices: Vec<usize> = keep
        .iter()
        .flat_map(|&block| block * width..(block + 1) * width)
        .collect();
    if indices.iter().any(|&i| i >= values.shape()[axis]) {
        return Err(GraphError::tensor(
            name,
            format!(
                "has {} entries on axis {axis}, fewer than pruning expects",
                values.shape()[axis]
            ),
        ));
    }
    let sliced = values.select(Axis(axis), &indices);
    model.set_initializer(to_tensor(name, &sliced));
    Ok(())
}

fn to_tensor(name: &str, values: &ArrayD<f32>) -> tract_onnx::pb::TensorProto {
    let standard = values.as_standard_layout();
    f32_tensor(
        name,
        values.shape(),
        standard.as_slice().expect("standard layout"),
    )
}

fn check_fraction(name: &str, value: f64) -> Result<(), GraphError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        Err(GraphError::Option(format!(
            "{name} is {value}; expected at least 0 and below 1"
        )))
    }
}
