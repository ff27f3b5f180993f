//! Reading an ONNX classifier's weights into a candle [`Cnn`], to fine-tune it.
//!
//! The graph must be a chain that the [`Cnn`] family can express. The shipped
//! digit-cnn and every model exported by [`crate::export`] have this form: an optional
//! `Sub` and `Div` by scalar constants, blocks of `Conv` (3x3, padding 1, stride 1),
//! `Relu` and `MaxPool` (2x2, stride 2), a `Flatten`, and `Gemm` layers with `Relu`
//! between them. Anything else is rejected with the node that does not fit.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prost::Message;
use tract_onnx::pb::{
    AttributeProto, NodeProto, TensorProto, ValueInfoProto, tensor_proto::DataType,
    tensor_shape_proto::dimension, type_proto,
};

use crate::data::ImageShape;
use crate::model::{Cnn, CnnConfig, Normalization};
use crate::{Result, TrainError};

/// Reads the ONNX file at `path` into a model on `device`.
pub fn import_onnx(path: &Path, device: &Device) -> Result<Cnn> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let unsupported = |reason: String| TrainError::UnsupportedModel {
        path: path.to_path_buf(),
        reason,
    };
    let proto = tract_onnx::pb::ModelProto::decode(bytes.as_slice())
        .map_err(|error| unsupported(format!("not an ONNX protobuf: {error}")))?;
    let graph = proto
        .graph
        .ok_or_else(|| unsupported("the model has no graph".into()))?;

    let initializers: HashMap<&str, &TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let input = graph
        .input
        .iter()
        .find(|i| !initializers.contains_key(i.name.as_str()))
        .ok_or_else(|| unsupported("the graph has no input".into()))?;
    let input_shape = image_shape(input).map_err(unsupported)?;

    let mut reader = ChainReader {
        path: path.to_path_buf(),
        initializers,
        current: input.name.clone(),
        tensors: HashMap::new(),
        conv_channels: Vec::new(),
        dense_widths: Vec::new(),
        normalization: None,
    };
    let mut nodes = graph.node.iter().enumerate().peekable();
    while let Some((index, node)) = nodes.next() {
        reader.read_node(index, node, &mut nodes)?;
    }
    if graph.output.first().map(|o| o.name.as_str()) != Some(reader.current.as_str()) {
        return Err(unsupported(format!(
            "the graph output is not the end of the node chain ({})",
            reader.current
        )));
    }
    let Some(classes) = reader.dense_widths.pop() else {
        return Err(unsupported("the graph has no Gemm classifier".into()));
    };
    let config = CnnConfig {
        input: input_shape,
        conv_channels: reader.conv_channels,
        hidden: reader.dense_widths,
        classes,
        normalization: reader.normalization,
    };
    tracing::info!(path = %path.display(), architecture = %config, "ONNX model imported");
    Cnn::from_tensors(config, &reader.tensors, device).map_err(|error| match error {
        TrainError::InvalidConfig(reason) => unsupported(reason),
        other => other,
    })
}

/// Walks the node chain, collecting the layers and their weights.
struct ChainReader<'a> {
    path: PathBuf,
    initializers: HashMap<&'a str, &'a TensorProto>,
    /// Name of the value the next node must consume.
    current: String,
    tensors: HashMap<String, Tensor>,
    conv_channels: Vec<usize>,
    /// Output widths of the Gemm layers so far; the last one is the class count.
    dense_widths: Vec<usize>,
    normalization: Option<Normalization>,
}

type Nodes<'n> = std::iter::Peekable<std::iter::Enumerate<std::slice::Iter<'n, NodeProto>>>;

impl ChainReader<'_> {
    fn read_node(&mut self, index: usize, node: &NodeProto, rest: &mut Nodes<'_>) -> Result<()> {
        if node.input.first() != Some(&self.current) || node.output.len() != 1 {
            return Err(self.node_error(
                index,
                node,
                format!(
                    "it does not take {} and give one output, so the graph is not a chain",
                    self.current
                ),
            ));
        }
        self.current = node.output[0].clone();
        match node.op_type.as_str() {
            "Sub" | "Div" => self.read_normalization(index, node)?,
            "Conv" => self.read_conv_block(index, node, rest)?,
            "Flatten" => {
                if attribute(node, "axis").map_or(1, |a| a.i) != 1 {
                    return Err(self.node_error(index, node, "only axis = 1 is supported".into()));
                }
            }
            "Gemm" => self.read_gemm(index, node)?,
            "Relu" if !self.dense_widths.is_empty() => {}
            other => {
                return Err(self.node_error(
                    index,
                    node,
                    format!("operator {other} has no counterpart in the model family"),
                ));
            }
        }
        Ok(())
    }

    fn read_normalization(&mut self, index: usize, node: &NodeProto) -> Result<()> {
        if !self.conv_channels.is_empty() || node.input.len() != 2 {
            return Err(self.node_error(
                index,
                node,
                "Sub and Div are only supported on the input".into(),
            ));
        }
        let (values, _) = self.initializer(index, node, 1)?;
        let [value] = values[..] else {
            return Err(self.node_error(index, node, "expected a scalar constant".into()));
        };
        let norm = self.normalization.get_or_insert(Normalization {
            mean: 0.0,
            std: 1.0,
        });
        if node.op_type == "Sub" {
            norm.mean = value;
        } else {
            norm.std = value;
        }
        Ok(())
    }

    /// Reads `Conv`, then the `Relu` and `MaxPool` that must follow it.
    fn read_conv_block(
        &mut self,
        index: usize,
        node: &NodeProto,
        rest: &mut Nodes<'_>,
    ) -> Result<()> {
        for (name, expected) in [
            ("kernel_shape", &[3, 3][..]),
            ("pads", &[1, 1, 1, 1]),
            ("strides", &[1, 1]),
            ("dilations", &[1, 1]),
        ] {
            if let Some(found) = attribute(node, name)
                && found.ints != expected
            {
                return Err(self.node_error(
                    index,
                    node,
                    format!("{name} is {:?}, expected {expected:?}", found.ints),
                ));
            }
        }
        if attribute(node, "group").is_some_and(|a| a.i != 1)
            || attribute(node, "auto_pad").is_some()
        {
            return Err(self.node_error(
                index,
                node,
                "group and auto_pad are not supported".into(),
            ));
        }
        let (weight, dims) = self.initializer(index, node, 1)?;
        if dims.len() != 4 || dims[2..] != [3, 3] {
            return Err(self.node_error(index, node, format!("weight shape {dims:?}")));
        }
        let out_channels = dims[0];
        let bias = match node.input.get(2) {
            Some(_) => self.initializer(index, node, 2)?.0,
            None => vec![0.0; out_channels],
        };
        let block = self.conv_channels.len() + 1;
        self.insert(&format!("conv{block}.weight"), weight, &dims)?;
        self.insert(&format!("conv{block}.bias"), bias, &[out_channels])?;
        self.conv_channels.push(out_channels);

        self.expect_next(rest, "Relu", |_| Ok(()))?;
        self.expect_next(rest, "MaxPool", |pool| {
            let kernel = attribute(pool, "kernel_shape").map(|a| a.ints.clone());
            let strides = attribute(pool, "strides").map(|a| a.ints.clone());
            let pads = attribute(pool, "pads").map_or(vec![0; 4], |a| a.ints.clone());
            let ceil = attribute(pool, "ceil_mode").map_or(0, |a| a.i);
            if kernel.as_deref() == Some(&[2, 2])
                && strides.as_deref() == Some(&[2, 2])
                && pads == [0; 4]
                && ceil == 0
            {
                Ok(())
            } else {
                Err("expected a 2x2 MaxPool with stride 2, no padding and no ceil_mode".into())
            }
        })
    }

    /// Checks that the next node has `op_type`, consumes the current value and passes
    /// `check`, and moves past it.
    fn expect_next(
        &mut self,
        rest: &mut Nodes<'_>,
        op_type: &str,
        check: impl Fn(&NodeProto) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let Some((index, node)) = rest.next() else {
            return Err(TrainError::UnsupportedModel {
                path: self.path.clone(),
                reason: format!("the graph ends where {op_type} was expected"),
            });
        };
        if node.op_type != op_type || node.input.first() != Some(&self.current) {
            return Err(self.node_error(
                index,
                node,
                format!("expected {op_type} on {}", self.current),
            ));
        }
        check(node).map_err(|reason| self.node_error(index, node, reason))?;
        self.current = node.output[0].clone();
        Ok(())
    }

    fn read_gemm(&mut self, index: usize, node: &NodeProto) -> Result<()> {
        let flag = |name: &str| attribute(node, name).map_or(0, |a| a.i);
        let scale = |name: &str| attribute(node, name).map_or(1.0, |a| a.f);
        if flag("transA") != 0 || scale("alpha") != 1.0 || scale("beta") != 1.0 {
            return Err(self.node_error(
                index,
                node,
                "only transA = 0, alpha = 1 and beta = 1 are supported".into(),
            ));
        }

        let (weight, dims) = self.initializer(index, node, 1)?;
        if dims.len() != 2 {
            return Err(self.node_error(index, node, format!("weight shape {dims:?}")));
        }
        // The model stores [out, in], which is the ONNX layout with transB = 1.
        let (weight, out_features, in_features) = if flag("transB") == 1 {
            (weight, dims[0], dims[1])
        } else {
            let (rows, cols) = (dims[0], dims[1]);
            let transposed = (0..cols * rows)
                .map(|i| weight[(i % rows) * cols + i / rows])
                .collect();
            (transposed, cols, rows)
        };
        let bias = match node.input.get(2) {
            Some(_) => self.initializer(index, node, 2)?.0,
            None => vec![0.0; out_features],
        };

        let layer = self.dense_widths.len() + 1;
        self.insert(
            &format!("fc{layer}.weight"),
            weight,
            &[out_features, in_features],
        )?;
        self.insert(&format!("fc{layer}.bias"), bias, &[out_features])?;
        self.dense_widths.push(out_features);
        Ok(())
    }

    /// Returns the float32 values and dimensions of the initializer at input `slot`.
    fn initializer(
        &self,
        index: usize,
        node: &NodeProto,
        slot: usize,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let name = node.input.get(slot).map(String::as_str).unwrap_or_default();
        let tensor = self.initializers.get(name).ok_or_else(|| {
            self.node_error(index, node, format!("input {name} is not a constant"))
        })?;
        float_values(tensor).map_err(|reason| self.node_error(index, node, reason))
    }

    fn insert(&mut self, name: &str, values: Vec<f32>, dims: &[usize]) -> Result<()> {
        let tensor = Tensor::from_vec(values, dims, &Device::Cpu)?;
        self.tensors.insert(name.to_string(), tensor);
        Ok(())
    }

    fn node_error(&self, index: usize, node: &NodeProto, reason: String) -> TrainError {
        TrainError::UnsupportedModel {
            path: self.path.clone(),
            reason: format!("node {index} ({} {}): {reason}", node.op_type, node.name),
        }
    }
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// Decodes a float32 initializer stored in `raw_data` or `float_data`.
fn float_values(tensor: &TensorProto) -> std::result::Result<(Vec<f32>, Vec<usize>), String> {
    if tensor.data_type != DataType::Float as i32 {
        return Err(format!(
            "initializer {} has ONNX data type {}, only float32 is supported",
            tensor.name, tensor.data_type
        ));
    }
    if !tensor.external_data.is_empty() {
        return Err(format!(
            "initializer {} is stored outside the model file",
            tensor.name
        ));
    }
    let dims: Vec<usize> = tensor.dims.iter().map(|&d| d.max(0) as usize).collect();
    let values: Vec<f32> = if tensor.raw_data.is_empty() {
        tensor.float_data.clone()
    } else {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect()
    };
    let expected: usize = dims.iter().product();
    if values.len() != expected {
        return Err(format!(
            "initializer {} has {} values for shape {dims:?}",
            tensor.name,
            values.len()
        ));
    }
    Ok((values, dims))
}

/// Reads `[N, C, H, W]` from a graph input, with `C`, `H` and `W` fixed numbers.
fn image_shape(input: &ValueInfoProto) -> std::result::Result<ImageShape, String> {
    let dims: Vec<Option<i64>> = input
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .map(|type_proto::Value::TensorType(tensor)| tensor)
        .and_then(|tensor| tensor.shape.as_ref())
        .map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(size)) => Some(size),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match dims[..] {
        [_, Some(channels), Some(height), Some(width)]
            if channels > 0 && height > 0 && width > 0 =>
        {
            Ok(ImageShape {
                channels: channels as usize,
                height: height as usize,
                width: width as usize,
            })
        }
        _ => Err(format!(
            "input {} must have shape [N, C, H, W] with fixed C, H and W, found {dims:?}",
            input.name
        )),
    }
}
