//! Reading an ONNX file's structure: operators, parameters, inputs and outputs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use anyhow::Context;
use fleet_bundle::TensorSpec;
use serde::Serialize;
use tract_onnx::pb::{ValueInfoProto, tensor_shape_proto::dimension, type_proto};
use tract_onnx::prelude::Framework;

/// Structure of an ONNX model, as `compress inspect` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub file_bytes: u64,
    pub opset: i64,
    /// Number of nodes of each operator type.
    pub operators: BTreeMap<String, usize>,
    /// Number of scalars in all initializers.
    pub parameters: u64,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Parses the ONNX protobuf of `path` without building a runnable model.
pub fn inspect(path: &Path) -> anyhow::Result<ModelSummary> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("failed to read model {}", path.display()))?
        .len();
    let proto = tract_onnx::onnx()
        .proto_model_for_path(path)
        .map_err(|error| anyhow::anyhow!("{error:#}"))
        .with_context(|| format!("{} is not a valid ONNX model", path.display()))?;
    let graph = proto
        .graph
        .as_ref()
        .with_context(|| format!("{} has no graph", path.display()))?;

    let mut operators = BTreeMap::new();
    for node in &graph.node {
        *operators.entry(node.op_type.clone()).or_insert(0) += 1;
    }
    let parameters = graph
        .initializer
        .iter()
        .map(|tensor| tensor.dims.iter().product::<i64>().max(0) as u64)
        .sum();
    let initializer_names: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|input| !initializer_names.contains(&input.name.as_str()))
        .map(tensor_spec)
        .collect();
    let outputs = graph.output.iter().map(tensor_spec).collect();
    let opset = proto
        .opset_import
        .iter()
        .filter(|set| set.domain.is_empty() || set.domain == "ai.onnx")
        .map(|set| set.version)
        .max()
        .unwrap_or(0);
    Ok(ModelSummary {
        file_bytes,
        opset,
        operators,
        parameters,
        inputs,
        outputs,
    })
}

fn tensor_spec(value: &ValueInfoProto) -> TensorSpec {
    let tensor = value
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .map(|type_proto::Value::TensorType(tensor)| tensor);
    let datatype = tensor.map_or(0, |t| t.elem_type);
    let shape = tensor
        .and_then(|t| t.shape.as_ref())
        .map(|shape| {
            shape
                .dim
                .iter()
                .map(|dim| match dim.value {
                    Some(dimension::Value::DimValue(size)) => size,
                    _ => -1,
                })
                .collect()
        })
        .unwrap_or_default();
    TensorSpec {
        name: value.name.clone(),
        datatype: datatype_name(datatype).into(),
        shape,
    }
}

/// Open Inference Protocol name of an ONNX element type number.
fn datatype_name(onnx_type: i32) -> &'static str {
    match onnx_type {
        1 => "FP32",
        2 => "UINT8",
        3 => "INT8",
        6 => "INT32",
        7 => "INT64",
        9 => "BOOL",
        10 => "FP16",
        11 => "FP64",
        _ => "UNKNOWN",
    }
}

impl fmt::Display for ModelSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "size        {} bytes", self.file_bytes)?;
        writeln!(f, "opset       {}", self.opset)?;
        writeln!(f, "parameters  {}", self.parameters)?;
        for (role, specs) in [("input", &self.inputs), ("output", &self.outputs)] {
            for spec in specs {
                writeln!(
                    f,
                    "{role:<11} {} {} {:?}",
                    spec.name, spec.datatype, spec.shape
                )?;
            }
        }
        writeln!(f, "operators")?;
        for (op, count) in &self.operators {
            writeln!(f, "  {op:<20} {count}")?;
        }
        Ok(())
    }
}
