//! Converting a float32 model to float16.
//!
//! [`Fp16Mode::Weights`] stores every float initializer as float16 with a `Cast` back to
//! float32 that tract folds into a constant at load. The file halves and speed stays at
//! float32's. [`Fp16Mode::Compute`] runs the whole graph in float16, with the graph
//! inputs and outputs kept float32 through `Cast` nodes, for CPUs and GPUs with native
//! half-precision arithmetic.
//!
//! Values beyond float16's range are clamped to its largest finite value, and non-zero
//! values too small for it become zero. Both are counted per tensor. Inputs that an
//! operator requires in float32 (quantization scales, `Resize` scales) keep their type.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use tract_onnx::pb::tensor_proto::DataType;

use crate::graph::{self, GraphError, OnnxModel, f16_tensor, int_attribute, tensor_to_f32};

/// Operator inputs (by position) that must stay float32 whatever the model's precision.
const FLOAT32_INPUTS: &[(&str, usize)] = &[
    ("QuantizeLinear", 1),
    ("DequantizeLinear", 1),
    ("QLinearConv", 1),
    ("QLinearConv", 4),
    ("QLinearConv", 6),
    ("QLinearMatMul", 1),
    ("QLinearMatMul", 4),
    ("QLinearMatMul", 6),
    ("Resize", 2),
];

/// Float16 form to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Fp16Mode {
    /// float16 storage, float32 arithmetic.
    Weights,
    /// float16 storage and arithmetic, float32 inputs and outputs.
    // NOTE: on x86-64, tract 0.23 ran the digit model in this mode so slowly that its
    // 10,000-image measurement was stopped after minutes. Whether CPUs with float16
    // arithmetic (aarch64 FP16) gain from it has not been measured.
    Compute,
}

/// Values changed to fit float16, per tensor.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Fp16Report {
    pub converted_tensors: usize,
    /// Tensor name -> number of values clamped to +-65504.
    pub clamped: BTreeMap<String, usize>,
    /// Tensor name -> number of non-zero values that became zero.
    pub flushed: BTreeMap<String, usize>,
}

/// Returns `model` in the float16 form `mode`.
pub fn convert(model: &OnnxModel, mode: Fp16Mode) -> Result<(OnnxModel, Fp16Report), GraphError> {
    let rewritten;
    let model = match mode {
        Fp16Mode::Weights => model,
        Fp16Mode::Compute => {
            rewritten = gemm_as_matmul(model)?;
            check_half_compute(&rewritten)?;
            &rewritten
        }
    };
    let mut converted = model.clone();
    let mut report = Fp16Report::default();
    let keep_float32: HashSet<String> = model
        .nodes()
        .iter()
        .flat_map(|node| {
            FLOAT32_INPUTS
                .iter()
                .filter(|(op, _)| *op == node.op_type)
                .filter_map(|(_, index)| node.input.get(*index).cloned())
        })
        .collect();
    let float_initializers: Vec<String> = model
        .graph()
        .initializer
        .iter()
        .filter(|t| t.data_type == DataType::Float as i32 && !keep_float32.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    for name in &float_initializers {
        let values = tensor_to_f32(model.initializer(name).expect("listed above"))?;
        let mut clamped = 0;
        let mut flushed = 0;
        let halves: Vec<half::f16> = values
            .iter()
            .map(|&v| {
                let h = half::f16::from_f32(v);
                if v.is_finite() && h.is_infinite() {
                    clamped += 1;
                    half::f16::from_f32(v.signum() * half::f16::MAX.to_f32())
                } else {
                    if v != 0.0 && h.to_f32() == 0.0 {
                        flushed += 1;
                    }
                    h
                }
            })
            .collect();
        if clamped > 0 {
            report.clamped.insert(name.clone(), clamped);
        }
        if flushed > 0 {
            report.flushed.insert(name.clone(), flushed);
        }
        let stored_name = match mode {
            Fp16Mode::Weights => format!("{name}_fp16"),
            Fp16Mode::Compute => name.clone(),
        };
        converted.set_initializer(f16_tensor(&stored_name, values.shape(), &halves));
        report.converted_tensors += 1;
    }
    match mode {
        Fp16Mode::Weights => {
            // Each weight is read through a Cast back to float32, placed first so it
            // precedes every reader.
            let casts: Vec<_> = float_initializers
                .iter()
                .map(|name| {
                    let mut cast = graph::node(
                        "Cast",
                        &format!("{name}_to_fp32"),
                        &[&format!("{name}_fp16")],
                        &[name],
                    );
                    cast.attribute
                        .push(int_attribute("to", DataType::Float as i64));
                    cast
                })
                .collect();
            let initializers: HashSet<&String> = float_initializers.iter().collect();
            converted
                .graph_mut()
                .initializer
                .retain(|t| !initializers.contains(&t.name));
            converted.nodes_mut().splice(0..0, casts);
        }
        Fp16Mode::Compute => {
            let float_inputs = float_values(&model.graph().input);
            for input in model
                .data_inputs()
                .into_iter()
                .filter(|i| float_inputs.contains(i))
            {
                let half_name = format!("{input}_fp16");
                for node in converted.nodes_mut() {
                    for name in node.input.iter_mut().filter(|n| **n == input) {
                        *name = half_name.clone();
                    }
                }
                let mut cast = graph::node(
                    "Cast",
                    &format!("{input}_to_fp16"),
                    &[&input],
                    &[&half_name],
                );
                cast.attribute
                    .push(int_attribute("to", DataType::Float16 as i64));
                converted.nodes_mut().insert(0, cast);
            }
            let float_outputs = float_values(&model.graph().output);
            for output in model
                .output_names()
                .into_iter()
                .filter(|o| float_outputs.contains(o))
            {
                let half_name = format!("{output}_fp16");
                for node in converted.nodes_mut() {
                    for name in node.output.iter_mut().filter(|n| **n == output) {
                        *name = half_name.clone();
                    }
                    for name in node.input.iter_mut().filter(|n| **n == output) {
                        *name = half_name.clone();
                    }
                }
                let mut cast = graph::node(
                    "Cast",
                    &format!("{output}_to_fp32"),
                    &[&half_name],
                    &[&output],
                );
                cast.attribute
                    .push(int_attribute("to", DataType::Float as i64));
                converted.nodes_mut().push(cast);
            }
            // Recorded intermediate types are float32 and no longer hold.
            converted.graph_mut().value_info.clear();
        }
    }
    converted.remove_unused_initializers();
    Ok((converted, report))
}

/// Replaces each `Gemm` with constant weights (alpha = beta = 1, no transposed input)
/// by `MatMul` and `Add`: tract 0.23's `Gemm` always produces float32, which breaks a
/// float16 graph.
fn gemm_as_matmul(model: &OnnxModel) -> Result<OnnxModel, GraphError> {
    use crate::graph::{attribute_float, attribute_int, f32_tensor};
    let mut rewritten = model.clone();
    let mut nodes = Vec::with_capacity(model.nodes().len());
    for node in model.nodes() {
        let plain = node.op_type == "Gemm"
            && attribute_int(node, "transA", 0) == 0
            && attribute_float(node, "alpha", 1.0) == 1.0
            && attribute_float(node, "beta", 1.0) == 1.0
            && model.initializer(&node.input[1]).is_some();
        if !plain {
            nodes.push(node.clone());
            continue;
        }
        let mut weight = node.input[1].clone();
        if attribute_int(node, "transB", 0) != 0 {
            let values = model.float_initializer(&weight)?;
            let transposed = values.t().as_standard_layout().to_owned();
            weight = format!("{weight}_transposed");
            rewritten.set_initializer(f32_tensor(
                &weight,
                transposed.shape(),
                transposed.as_slice().expect("standard layout"),
            ));
        }
        let bias = node.input.get(2).filter(|b| !b.is_empty());
        let product = match bias {
            Some(_) => format!("{}_product", node.output[0]),
            None => node.output[0].clone(),
        };
        nodes.push(graph::node(
            "MatMul",
            &format!("{}_matmul", node.name),
            &[&node.input[0], &weight],
            &[&product],
        ));
        if let Some(bias) = bias {
            nodes.push(graph::node(
                "Add",
                &format!("{}_bias", node.name),
                &[&product, bias],
                &[&node.output[0]],
            ));
        }
    }
    *rewritten.nodes_mut() = nodes;
    rewritten.remove_unused_initializers();
    Ok(rewritten)
}

/// Operators a float16 graph cannot keep: their float32 inputs or outputs are fixed by
/// the operator (quantization) or they carry float32 constants of their own.
const NOT_IN_HALF_COMPUTE: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "Constant",
    "ConstantOfShape",
    "Gemm",
];

/// Rejects graphs that float16 compute would break, naming the first offending node.
fn check_half_compute(model: &OnnxModel) -> Result<(), GraphError> {
    for node in model.nodes() {
        if NOT_IN_HALF_COMPUTE.contains(&node.op_type.as_str()) {
            return Err(GraphError::node(
                node,
                "cannot run in float16 compute (quantized, a constant node, or a Gemm with \
                 alpha, beta or transA); convert the float model, or use --mode weights",
            ));
        }
        if node.op_type == "Cast" && graph::attribute_int(node, "to", 0) == DataType::Float as i64 {
            return Err(GraphError::node(
                node,
                "casts to float32 inside a float16 graph",
            ));
        }
    }
    Ok(())
}

/// Names of the values (graph inputs or outputs) declared as float32.
fn float_values(values: &[tract_onnx::pb::ValueInfoProto]) -> HashSet<String> {
    use tract_onnx::pb::type_proto;
    values
        .iter()
        .filter(|value| {
            matches!(
                value.r#type.as_ref().and_then(|t| t.value.as_ref()),
                Some(type_proto::Value::TensorType(tensor)) if tensor.elem_type == DataType::Float as i32
            )
        })
        .map(|value| value.name.clone())
        .collect()
}
