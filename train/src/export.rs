//! Writing a trained [`Cnn`] as an ONNX file and checking it against tract.
//!
//! The protobuf types come from `tract_onnx::pb`, the prost-generated ONNX schema that
//! tract-onnx already compiles to read models. Reusing them (and prost, which tract
//! depends on) adds no second ONNX schema to the build, and a file written with the
//! same types tract parses is one tract reads back.

use std::path::{Path, PathBuf};

use fleet_runtime::{Backend, Tensor as RuntimeTensor, TractBackend};
use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension,
    type_proto,
};

use crate::atomic::write_atomically;
use crate::data::ImageSet;
use crate::model::Cnn;
use crate::{Result, TrainError};

/// ONNX opset the exported graph declares; every operator used exists unchanged in it.
pub const OPSET: i64 = 13;
/// ONNX IR version 7 goes with opset 13 (ONNX 1.8).
const IR_VERSION: i64 = 7;
/// Name of the graph input, as in the shipped digit-cnn.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output.
pub const OUTPUT_NAME: &str = "logits";

/// Largest absolute difference between candle's and tract's logits that an export may
/// show, in logit units. Both compute in float32 but sum in different orders; on the
/// digit models the difference is near 1e-5.
pub const DEFAULT_TOLERANCE: f32 = 1e-3;

/// Size of a written ONNX file and how well tract reproduced candle on it.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// Largest absolute logit difference over the checked images.
    pub max_abs_diff: f32,
    pub checked_images: usize,
}

/// Writes `model` as ONNX beside `path`, loads it in tract, and compares tract's logits
/// with candle's on the first `check_images` images of `data`. Only a file that passes
/// replaces `path`. Above `tolerance` the call fails with
/// [`TrainError::ExportMismatch`], and the rejected file stays as `NAME.unverified.onnx`
/// for inspection while an older `path` is left untouched.
pub fn export_and_verify(
    model: &Cnn,
    path: &Path,
    doc_string: &str,
    data: &ImageSet,
    check_images: usize,
    tolerance: f32,
) -> Result<ExportReport> {
    let staging = path.with_extension("unverified.onnx");
    let bytes = export_onnx(model, &staging, doc_string)?;
    let indices: Vec<usize> = (0..check_images.clamp(1, data.len())).collect();
    let images = data.scaled_batch(&indices);
    let max_abs_diff = compare_with_tract(model, &staging, &images, indices.len())?;
    tracing::info!(
        path = %path.display(),
        bytes,
        max_abs_diff,
        tolerance,
        images = indices.len(),
        "exported model checked against tract"
    );
    if max_abs_diff.is_nan() || max_abs_diff > tolerance {
        return Err(TrainError::ExportMismatch {
            path: staging,
            max_abs_diff,
            tolerance,
        });
    }
    std::fs::rename(&staging, path).map_err(|source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(ExportReport {
        path: path.to_path_buf(),
        bytes,
        max_abs_diff,
        checked_images: indices.len(),
    })
}

/// Writes `model` to `path` as ONNX and returns the file size in bytes.
pub fn export_onnx(model: &Cnn, path: &Path, doc_string: &str) -> Result<u64> {
    let proto = model_proto(model, doc_string)?;
    let bytes = proto.encode_to_vec();
    write_atomically(path, &bytes)?;
    Ok(bytes.len() as u64)
}

/// Runs `images` (a float32 NCHW batch of `batch` images) through the ONNX file in
/// tract and through `model` in candle, and returns the largest absolute difference.
pub fn compare_with_tract(model: &Cnn, path: &Path, images: &[f32], batch: usize) -> Result<f32> {
    let input = model.config().input;
    let shape = vec![batch, input.channels, input.height, input.width];
    let mut backend = TractBackend::load_onnx(path, &shape)?;
    let tract = backend.run(RuntimeTensor::new(shape, images.to_vec())?)?;
    let candle = model.predict(images, batch)?;
    if tract.data.len() != candle.len() {
        return Err(TrainError::UnsupportedModel {
            path: path.to_path_buf(),
            reason: format!(
                "tract returns {} values, candle {}",
                tract.data.len(),
                candle.len()
            ),
        });
    }
    Ok(tract
        .data
        .iter()
        .zip(&candle)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max))
}

/// Builds the ONNX graph: optional `Sub`/`Div` normalisation, then per block `Conv`,
/// `Relu` and `MaxPool`, then `Flatten` and `Gemm` layers with `Relu` between them.
fn model_proto(model: &Cnn, doc_string: &str) -> Result<ModelProto> {
    let config = model.config();
    let tensors = model.tensors();
    let mut graph = GraphBuilder::default();

    let mut x = INPUT_NAME.to_string();
    if let Some(norm) = config.normalization {
        graph.scalar("norm.mean", norm.mean);
        graph.scalar("norm.std", norm.std);
        x = graph.node("Sub", "normalize_sub", &[&x, "norm.mean"], vec![]);
        x = graph.node("Div", "normalize_div", &[&x, "norm.std"], vec![]);
    }
    for block in 1..=config.conv_channels.len() {
        let (weight, bias) = (format!("conv{block}.weight"), format!("conv{block}.bias"));
        graph.initializer(&weight, &tensors[&weight])?;
        graph.initializer(&bias, &tensors[&bias])?;
        let conv_attributes = vec![
            ints("kernel_shape", &[3, 3]),
            ints("pads", &[1, 1, 1, 1]),
            ints("strides", &[1, 1]),
        ];
        x = graph.node(
            "Conv",
            &format!("conv{block}"),
            &[&x, &weight, &bias],
            conv_attributes,
        );
        x = graph.node("Relu", &format!("relu{block}"), &[&x], vec![]);
        let pool_attributes = vec![ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
        x = graph.node("MaxPool", &format!("pool{block}"), &[&x], pool_attributes);
    }
    x = graph.node("Flatten", "flatten", &[&x], vec![int("axis", 1)]);
    let layers = config.hidden.len() + 1;
    for layer in 1..=layers {
        let (weight, bias) = (format!("fc{layer}.weight"), format!("fc{layer}.bias"));
        graph.initializer(&weight, &tensors[&weight])?;
        graph.initializer(&bias, &tensors[&bias])?;
        x = graph.node(
            "Gemm",
            &format!("fc{layer}"),
            &[&x, &weight, &bias],
            vec![int("transB", 1)],
        );
        if layer < layers {
            x = graph.node("Relu", &format!("fc{layer}_relu"), &[&x], vec![]);
        }
    }
    graph.rename_last_output(OUTPUT_NAME);

    let input = &config.input;
    let graph = GraphProto {
        name: "student".into(),
        node: graph.nodes,
        initializer: graph.initializers,
        input: vec![value_info(
            INPUT_NAME,
            &[
                Err("N"),
                Ok(input.channels),
                Ok(input.height),
                Ok(input.width),
            ],
        )],
        output: vec![value_info(OUTPUT_NAME, &[Err("N"), Ok(config.classes)])],
        ..GraphProto::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "fleet-train".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: doc_string.into(),
        graph: Some(graph),
        ..ModelProto::default()
    })
}

/// Nodes and initializers in the order they are added.
#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

impl GraphBuilder {
    /// Adds a node whose single output is named after the node, and returns that name.
    fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            name: name.into(),
            op_type: op_type.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.into()],
            attribute,
            ..NodeProto::default()
        });
        name.into()
    }

    /// Renames the output of the last node, which becomes the graph output.
    fn rename_last_output(&mut self, output: &str) {
        if let Some(last) = self.nodes.last_mut() {
            last.output = vec![output.into()];
        }
    }

    fn scalar(&mut self, name: &str, value: f32) {
        self.initializers.push(TensorProto {
            name: name.into(),
            data_type: DataType::Float as i32,
            raw_data: value.to_le_bytes().to_vec(),
            ..TensorProto::default()
        });
    }

    fn initializer(&mut self, name: &str, tensor: &candle_core::Tensor) -> Result<()> {
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        self.initializers.push(TensorProto {
            name: name.into(),
            dims: tensor.dims().iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..TensorProto::default()
        });
        Ok(())
    }
}

fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

/// A float32 tensor description; `Err(name)` marks a symbolic dimension.
fn value_info(name: &str, dims: &[std::result::Result<usize, &str>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Ok(size) => dimension::Value::DimValue(*size as i64),
                Err(symbol) => dimension::Value::DimParam((*symbol).into()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}
