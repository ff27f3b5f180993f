//! Reading, checking, editing and writing ONNX graphs.
//!
//! The compressor rewrites models at the protobuf level: it swaps a float `Conv` for a
//! `QLinearConv`, replaces initializers, removes channels. The types are tract's
//! prost-generated ONNX schema (`tract_onnx::pb`), so a file written here is parsed by
//! the same code that later runs it, and no second schema is compiled into the build.
//!
//! [`OnnxModel::read`] rejects what the rewrites cannot handle safely, naming the file,
//! node or tensor: an undecodable or truncated file, external data outside the model's
//! folder, an opset outside [`SUPPORTED_OPSETS`], a node reading a tensor no node
//! produces.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Component, Path, PathBuf};

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, TensorProto, attribute_proto::AttributeType,
    tensor_proto::DataType,
};
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};

/// Default-domain opsets whose operator definitions the rewrites were written against.
/// Opset 13 is the first with per-axis `QuantizeLinear`/`DequantizeLinear`, which
/// per-channel weights need; models from older exporters must be upgraded first
/// (`onnx.version_converter`).
pub const SUPPORTED_OPSETS: RangeInclusive<i64> = 13..=21;

/// Error reading or rewriting an ONNX file.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("failed to read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid ONNX protobuf (truncated or not a model): {source}")]
    Decode {
        path: PathBuf,
        source: prost::DecodeError,
    },
    #[error("{path} is empty, not an ONNX model")]
    Empty { path: PathBuf },
    #[error("{path} has no graph")]
    NoGraph { path: PathBuf },
    #[error(
        "{path} declares default-domain opset {opset}; the compressor handles opsets {} to {}",
        SUPPORTED_OPSETS.start(),
        SUPPORTED_OPSETS.end()
    )]
    UnsupportedOpset { path: PathBuf, opset: i64 },
    #[error("tensor {tensor} in {path}: external data {location:?} {reason}")]
    ExternalData {
        path: PathBuf,
        tensor: String,
        location: String,
        reason: String,
    },
    #[error("tensor {tensor}: {reason}")]
    Tensor { tensor: String, reason: String },
    #[error("node {node} ({op}): {reason}")]
    Node {
        node: String,
        op: String,
        reason: String,
    },
    #[error("{0}")]
    Option(String),
    #[error("failed to write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl GraphError {
    pub(crate) fn node(node: &NodeProto, reason: impl Into<String>) -> GraphError {
        GraphError::Node {
            node: node.name.clone(),
            op: node.op_type.clone(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(tensor: &str, reason: impl Into<String>) -> GraphError {
        GraphError::Tensor {
            tensor: tensor.to_string(),
            reason: reason.into(),
        }
    }
}

/// An ONNX model held as its protobuf, with every initializer's data inline.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    pub proto: ModelProto,
}

impl OnnxModel {
    /// Reads and checks `path`. External data is read into the tensors, so the model can
    /// be written elsewhere as one file.
    pub fn read(path: &Path) -> Result<OnnxModel, GraphError> {
        let bytes = std::fs::read(path).map_err(|source| GraphError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(GraphError::Empty {
                path: path.to_path_buf(),
            });
        }
        let mut proto =
            ModelProto::decode(bytes.as_slice()).map_err(|source| GraphError::Decode {
                path: path.to_path_buf(),
                source,
            })?;
        // Checked before the opset: bytes that happen to decode as protobuf but are no
        // model have neither, and "no graph" is the clearer error.
        if proto.graph.is_none() {
            return Err(GraphError::NoGraph {
                path: path.to_path_buf(),
            });
        }
        let opset = default_opset(&proto);
        if !SUPPORTED_OPSETS.contains(&opset) {
            return Err(GraphError::UnsupportedOpset {
                path: path.to_path_buf(),
                opset,
            });
        }
        let folder = path.parent().unwrap_or(Path::new("."));
        let graph = proto.graph.as_mut().ok_or_else(|| GraphError::NoGraph {
            path: path.to_path_buf(),
        })?;
        for tensor in &mut graph.initializer {
            inline_external_data(path, folder, tensor)?;
        }
        for node in &mut graph.node {
            for attribute in &mut node.attribute {
                if let Some(tensor) = attribute.t.as_mut() {
                    inline_external_data(path, folder, tensor)?;
                }
            }
        }
        let mut model = OnnxModel { proto };
        model.name_unnamed_nodes();
        model.check_wiring()?;
        Ok(model)
    }

    /// Serialises the model and writes it to `path` through a temporary file in the same
    /// folder, so a crash leaves either the old file or the complete new one.
    pub fn write(&self, path: &Path) -> Result<u64, GraphError> {
        let bytes = self.proto.encode_to_vec();
        let write_error = |source| GraphError::Write {
            path: path.to_path_buf(),
            source,
        };
        let folder = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(folder).map_err(write_error)?;
        let mut file = tempfile::NamedTempFile::new_in(folder).map_err(write_error)?;
        file.write_all(&bytes).map_err(write_error)?;
        file.as_file().sync_all().map_err(write_error)?;
        file.persist(path)
            .map_err(|error| write_error(error.error))?;
        Ok(bytes.len() as u64)
    }

    pub fn encoded_len(&self) -> usize {
        self.proto.encoded_len()
    }

    pub fn opset(&self) -> i64 {
        default_opset(&self.proto)
    }

    pub fn nodes(&self) -> &[NodeProto] {
        &self.graph().node
    }

    pub fn nodes_mut(&mut self) -> &mut Vec<NodeProto> {
        &mut self.graph_mut().node
    }

    pub fn graph(&self) -> &tract_onnx::pb::GraphProto {
        self.proto.graph.as_ref().expect("checked when read")
    }

    pub fn graph_mut(&mut self) -> &mut tract_onnx::pb::GraphProto {
        self.proto.graph.as_mut().expect("checked when read")
    }

    /// Names of the graph inputs that are not initializers: the data the model is fed.
    pub fn data_inputs(&self) -> Vec<String> {
        let initializers: HashSet<&str> = self
            .graph()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        self.graph()
            .input
            .iter()
            .filter(|input| !initializers.contains(input.name.as_str()))
            .map(|input| input.name.clone())
            .collect()
    }

    pub fn output_names(&self) -> Vec<String> {
        self.graph().output.iter().map(|o| o.name.clone()).collect()
    }

    pub fn initializer(&self, name: &str) -> Option<&TensorProto> {
        self.graph().initializer.iter().find(|t| t.name == name)
    }

    /// Returns the float32 value of initializer `name`.
    pub fn float_initializer(&self, name: &str) -> Result<ArrayD<f32>, GraphError> {
        let tensor = self
            .initializer(name)
            .ok_or_else(|| GraphError::tensor(name, "is not an initializer"))?;
        tensor_to_f32(tensor)
    }

    /// Adds `tensor` as an initializer, replacing one of the same name.
    pub fn set_initializer(&mut self, tensor: TensorProto) {
        let initializers = &mut self.graph_mut().initializer;
        match initializers.iter_mut().find(|t| t.name == tensor.name) {
            Some(existing) => *existing = tensor,
            None => initializers.push(tensor),
        }
    }

    /// Drops initializers no node reads and that are not graph outputs, and their
    /// graph-input entries, so a replaced weight does not stay in the file.
    pub fn remove_unused_initializers(&mut self) {
        let mut used: HashSet<String> = self
            .nodes()
            .iter()
            .flat_map(|node| node.input.iter().cloned())
            .collect();
        used.extend(self.output_names());
        let graph = self.graph_mut();
        let removed: HashSet<String> = graph
            .initializer
            .iter()
            .filter(|t| !used.contains(&t.name))
            .map(|t| t.name.clone())
            .collect();
        graph.initializer.retain(|t| !removed.contains(&t.name));
        graph.input.retain(|input| !removed.contains(&input.name));
    }

    /// For each tensor name, the indices of the nodes reading it.
    pub fn consumers(&self) -> HashMap<String, Vec<usize>> {
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, node) in self.nodes().iter().enumerate() {
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                consumers.entry(input.clone()).or_default().push(index);
            }
        }
        consumers
    }

    /// For each tensor name, the index of the node writing it.
    pub fn producers(&self) -> HashMap<String, usize> {
        let mut producers = HashMap::new();
        for (index, node) in self.nodes().iter().enumerate() {
            for output in &node.output {
                producers.insert(output.clone(), index);
            }
        }
        producers
    }

    /// Sets the default-domain opset to at least `opset`.
    pub fn require_opset(&mut self, opset: i64) {
        for import in &mut self.proto.opset_import {
            if import.domain.is_empty() || import.domain == "ai.onnx" {
                import.version = import.version.max(opset);
            }
        }
    }

    /// Gives every node a unique name: the rewrites find nodes by name.
    fn name_unnamed_nodes(&mut self) {
        let mut used_names: HashSet<String> = HashSet::new();
        for (index, node) in self.nodes_mut().iter_mut().enumerate() {
            if node.name.is_empty() || used_names.contains(&node.name) {
                let mut name = format!("{}_{index}", node.op_type);
                while used_names.contains(&name) {
                    name.push('_');
                }
                node.name = name;
            }
            used_names.insert(node.name.clone());
        }
    }

    /// Every node input must be a graph input, an initializer or an earlier node's
    /// output: the rewrites walk nodes in order and rely on that.
    fn check_wiring(&self) -> Result<(), GraphError> {
        let graph = self.graph();
        let mut known: HashSet<&str> = graph.input.iter().map(|i| i.name.as_str()).collect();
        known.extend(graph.initializer.iter().map(|t| t.name.as_str()));
        for node in &graph.node {
            let weighted = matches!(node.op_type.as_str(), "Conv" | "Gemm");
            if weighted && (node.input.len() < 2 || node.output.is_empty()) {
                return Err(GraphError::node(
                    node,
                    "needs a data input, a weight and an output",
                ));
            }
            for input in node.input.iter().filter(|i| !i.is_empty()) {
                if !known.contains(input.as_str()) {
                    return Err(GraphError::node(
                        node,
                        format!(
                            "reads {input:?}, which no earlier node, initializer or graph \
                             input provides"
                        ),
                    ));
                }
            }
            known.extend(node.output.iter().map(String::as_str));
        }
        for output in &graph.output {
            if !known.contains(output.name.as_str()) {
                return Err(GraphError::tensor(
                    &output.name,
                    "is a graph output that nothing produces",
                ));
            }
        }
        Ok(())
    }
}

fn default_opset(proto: &ModelProto) -> i64 {
    proto
        .opset_import
        .iter()
        .find(|import| import.domain.is_empty() || import.domain == "ai.onnx")
        .map(|import| import.version)
        .unwrap_or(1)
}

/// Reads a tensor's external data into `raw_data`. The location must be a relative path
/// that stays inside the model's folder: a model file must not make the compressor read
/// arbitrary files.
fn inline_external_data(
    model_path: &Path,
    folder: &Path,
    tensor: &mut TensorProto,
) -> Result<(), GraphError> {
    const EXTERNAL: i32 = 1;
    if tensor.data_location != Some(EXTERNAL) {
        return Ok(());
    }
    let entry = |key: &str| {
        tensor
            .external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let location = entry("location").unwrap_or_default();
    let fail = |reason: &str| GraphError::ExternalData {
        path: model_path.to_path_buf(),
        tensor: tensor.name.clone(),
        location: location.clone(),
        reason: reason.to_string(),
    };
    let relative = Path::new(&location);
    if location.is_empty()
        || relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(fail("must be a relative path inside the model's folder"));
    }
    let file = folder.join(relative);
    let canonical_folder = folder
        .canonicalize()
        .map_err(|_| fail("cannot be resolved"))?;
    let canonical = file.canonicalize().map_err(|_| fail("does not exist"))?;
    if !canonical.starts_with(&canonical_folder) {
        return Err(fail("leaves the model's folder through a link"));
    }
    let parse = |key: &str| -> Result<Option<u64>, GraphError> {
        entry(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| fail(&format!("has a bad {key}")))
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let bytes = std::fs::read(&canonical).map_err(|_| fail("cannot be read"))?;
    let length = parse("length")?.unwrap_or(bytes.len() as u64 - offset.min(bytes.len() as u64));
    let end = offset
        .checked_add(length)
        .filter(|end| *end <= bytes.len() as u64)
        .ok_or_else(|| fail("ends past the end of its file"))?;
    tensor.raw_data = bytes[offset as usize..end as usize].to_vec();
    tensor.data_location = None;
    tensor.external_data.clear();
    Ok(())
}

/// Number of elements a tensor's dims describe.
fn element_count(tensor: &TensorProto) -> Result<usize, GraphError> {
    tensor.dims.iter().try_fold(1usize, |count, &dim| {
        usize::try_from(dim)
            .ok()
            .and_then(|dim| count.checked_mul(dim))
            .ok_or_else(|| {
                GraphError::tensor(&tensor.name, format!("has bad dims {:?}", tensor.dims))
            })
    })
}

/// Converts a FLOAT or FLOAT16 tensor to float32 values shaped by its dims.
pub fn tensor_to_f32(tensor: &TensorProto) -> Result<ArrayD<f32>, GraphError> {
    let count = element_count(tensor)?;
    let shape: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
    let values: Vec<f32> = if tensor.data_type == DataType::Float as i32 {
        if !tensor.raw_data.is_empty() {
            tensor
                .raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            tensor.float_data.clone()
        }
    } else if tensor.data_type == DataType::Float16 as i32 {
        if !tensor.raw_data.is_empty() {
            tensor
                .raw_data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()
        } else {
            tensor
                .int32_data
                .iter()
                .map(|&bits| half::f16::from_bits(bits as u16).to_f32())
                .collect()
        }
    } else {
        return Err(GraphError::tensor(
            &tensor.name,
            format!("has data type {}, expected float32", tensor.data_type),
        ));
    };
    if values.len() != count {
        return Err(GraphError::tensor(
            &tensor.name,
            format!(
                "holds {} values but its dims {:?} call for {count}",
                values.len(),
                tensor.dims
            ),
        ));
    }
    ArrayD::from_shape_vec(IxDyn(&shape), values)
        .map_err(|error| GraphError::tensor(&tensor.name, error.to_string()))
}

fn tensor_proto(name: &str, dims: &[usize], data_type: DataType, raw_data: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data,
        ..Default::default()
    }
}

pub fn f32_tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, DataType::Float, raw)
}

pub fn f16_tensor(name: &str, dims: &[usize], values: &[half::f16]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, DataType::Float16, raw)
}

pub fn i8_tensor(name: &str, dims: &[usize], values: &[i8]) -> TensorProto {
    let raw = values.iter().map(|&v| v as u8).collect();
    tensor_proto(name, dims, DataType::Int8, raw)
}

pub fn u8_tensor(name: &str, dims: &[usize], values: &[u8]) -> TensorProto {
    tensor_proto(name, dims, DataType::Uint8, values.to_vec())
}

pub fn i32_tensor(name: &str, dims: &[usize], values: &[i32]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, DataType::Int32, raw)
}

pub fn i64_tensor(name: &str, dims: &[usize], values: &[i64]) -> TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, DataType::Int64, raw)
}

/// Builds a node of the default domain.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.to_string(),
        name: name.to_string(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

pub fn int_attribute(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn ints_attribute(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// Integer attribute `name` of `node`, or `default` when absent.
pub fn attribute_int(node: &NodeProto, name: &str, default: i64) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.i)
        .unwrap_or(default)
}

/// Float attribute `name` of `node`, or `default` when absent.
pub fn attribute_float(node: &NodeProto, name: &str, default: f32) -> f32 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.f)
        .unwrap_or(default)
}
