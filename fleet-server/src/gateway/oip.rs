//! Open Inference Protocol (KServe v2) REST messages and the input checks that both the
//! gateway and the replicas apply before a model runs.
//!
//! Only the JSON form is supported: tensor data travels in the `data` field, flat in
//! row-major order or nested. The binary tensor extension (`Inference-Header-Content-Length`)
//! is not.

use serde::{Deserialize, Serialize};

/// Body of `POST /v2/models/{name}/infer`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InferRequest {
    /// Identifier chosen by the client, returned unchanged in the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub inputs: Vec<InputTensor>,
    /// Outputs to return; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<RequestedOutput>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One input tensor of a request.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    /// Elements in row-major order, as one flat array or as nested arrays.
    pub data: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// An output the client asks for by name.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Body of a successful inference response.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<OutputTensor>,
}

/// One output tensor of a response, with its data flat in row-major order.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct OutputTensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Vec<f32>,
}

/// Name, datatype and shape of a model tensor; -1 marks a dimension of any size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl From<&fleet_bundle::TensorSpec> for TensorMetadata {
    fn from(spec: &fleet_bundle::TensorSpec) -> TensorMetadata {
        TensorMetadata {
            name: spec.name.clone(),
            datatype: spec.datatype.clone(),
            shape: spec.shape.clone(),
        }
    }
}

/// Body of `GET /v2/models/{name}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

impl ModelMetadata {
    /// Describes a bundle's model as served under `name`.
    pub fn from_manifest(name: &str, manifest: &fleet_bundle::Manifest) -> ModelMetadata {
        ModelMetadata {
            name: name.to_owned(),
            versions: vec![manifest.version.clone()],
            platform: format!("{}_fleet", manifest.model.format),
            inputs: manifest.inputs.iter().map(TensorMetadata::from).collect(),
            outputs: manifest.outputs.iter().map(TensorMetadata::from).collect(),
        }
    }
}

/// Mismatch between a request and the model. The message is returned to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("invalid inference request: {0}")]
    Body(String),
    #[error("input {name:?} is not an input of the model; it expects {expected:?}")]
    UnknownInput { name: String, expected: Vec<String> },
    #[error("missing input {name:?} with shape {shape}")]
    MissingInput { name: String, shape: String },
    #[error("input {name:?} is given more than once")]
    DuplicateInput { name: String },
    #[error("input {name:?} has datatype {found}, the model expects {expected}")]
    Datatype {
        name: String,
        expected: String,
        found: String,
    },
    #[error(
        "input {name:?} has shape {found:?}, the model expects {expected} (-1 is any size >= 1)"
    )]
    Shape {
        name: String,
        expected: String,
        found: Vec<i64>,
    },
    #[error("input {name:?} has {found} elements in data, its shape {shape:?} needs {expected}")]
    ElementCount {
        name: String,
        shape: Vec<i64>,
        expected: usize,
        found: usize,
    },
    #[error("input {name:?} has a data element that is not a number: {element}")]
    NotANumber { name: String, element: String },
    #[error("input {name:?} has batch size {found}, the most one request may carry is {max}")]
    BatchTooLarge {
        name: String,
        max: usize,
        found: usize,
    },
    #[error("output {name:?} is not an output of the model; it has {available:?}")]
    UnknownOutput {
        name: String,
        available: Vec<String>,
    },
}

/// A request that passed [`validate`]: the batch size and each input's elements.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRequest {
    /// Size of the first dimension shared by the inputs.
    pub batch: usize,
    /// Elements of each model input, in the model's input order.
    pub inputs: Vec<Vec<f32>>,
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<InferRequest, InvalidRequest> {
    serde_json::from_slice(body).map_err(|error| InvalidRequest::Body(error.to_string()))
}

/// Checks a request against the model's inputs and outputs: every input present once,
/// with the declared datatype, a shape that matches (any size where the model has -1)
/// and as many numeric elements as the shape needs. Only `FP32` inputs are supported.
pub fn validate(
    request: &InferRequest,
    metadata: &ModelMetadata,
    max_batch: usize,
) -> Result<ValidatedRequest, InvalidRequest> {
    for (index, input) in request.inputs.iter().enumerate() {
        if !metadata.inputs.iter().any(|spec| spec.name == input.name) {
            return Err(InvalidRequest::UnknownInput {
                name: input.name.clone(),
                expected: metadata
                    .inputs
                    .iter()
                    .map(|spec| spec.name.clone())
                    .collect(),
            });
        }
        if request.inputs[..index]
            .iter()
            .any(|other| other.name == input.name)
        {
            return Err(InvalidRequest::DuplicateInput {
                name: input.name.clone(),
            });
        }
    }

    let mut batch = 1;
    let mut inputs = Vec::with_capacity(metadata.inputs.len());
    for spec in &metadata.inputs {
        let Some(input) = request.inputs.iter().find(|input| input.name == spec.name) else {
            return Err(InvalidRequest::MissingInput {
                name: spec.name.clone(),
                shape: format_shape(&spec.shape),
            });
        };
        check_input(input, spec)?;
        batch = input.shape.first().copied().unwrap_or(1) as usize;
        if batch > max_batch {
            return Err(InvalidRequest::BatchTooLarge {
                name: input.name.clone(),
                max: max_batch,
                found: batch,
            });
        }
        inputs.push(flatten(input)?);
    }

    if let Some(outputs) = &request.outputs {
        for output in outputs {
            if !metadata.outputs.iter().any(|spec| spec.name == output.name) {
                return Err(InvalidRequest::UnknownOutput {
                    name: output.name.clone(),
                    available: metadata
                        .outputs
                        .iter()
                        .map(|spec| spec.name.clone())
                        .collect(),
                });
            }
        }
    }
    Ok(ValidatedRequest { batch, inputs })
}

fn check_input(input: &InputTensor, spec: &TensorMetadata) -> Result<(), InvalidRequest> {
    if input.datatype != spec.datatype || spec.datatype != "FP32" {
        return Err(InvalidRequest::Datatype {
            name: input.name.clone(),
            expected: spec.datatype.clone(),
            found: input.datatype.clone(),
        });
    }
    let shape_fits = input.shape.len() == spec.shape.len()
        && input
            .shape
            .iter()
            .zip(&spec.shape)
            .all(|(&found, &expected)| found >= 1 && (expected < 0 || found == expected));
    if !shape_fits {
        return Err(InvalidRequest::Shape {
            name: input.name.clone(),
            expected: format_shape(&spec.shape),
            found: input.shape.clone(),
        });
    }
    Ok(())
}

/// Collects the numbers of an input's data, flat or nested, and checks their count.
fn flatten(input: &InputTensor) -> Result<Vec<f32>, InvalidRequest> {
    let expected: usize = input.shape.iter().map(|&d| d as usize).product();
    let mut values = Vec::with_capacity(expected);
    let mut pending = vec![&input.data];
    while let Some(value) = pending.pop() {
        match value {
            serde_json::Value::Array(items) => pending.extend(items.iter().rev()),
            serde_json::Value::Number(number) => {
                values.push(number.as_f64().unwrap_or(f64::NAN) as f32);
            }
            other => {
                let mut element = other.to_string();
                element.truncate(40);
                return Err(InvalidRequest::NotANumber {
                    name: input.name.clone(),
                    element,
                });
            }
        }
    }
    if values.len() != expected {
        return Err(InvalidRequest::ElementCount {
            name: input.name.clone(),
            shape: input.shape.clone(),
            expected,
            found: values.len(),
        });
    }
    Ok(values)
}

/// Formats a model shape as `[-1, 1, 28, 28]`.
pub fn format_shape(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digit_model() -> ModelMetadata {
        ModelMetadata {
            name: "digit-cnn".into(),
            versions: vec!["1.0.0".into()],
            platform: "onnx_fleet".into(),
            inputs: vec![TensorMetadata {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 1, 2, 2],
            }],
            outputs: vec![TensorMetadata {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![-1, 10],
            }],
        }
    }

    fn request(body: serde_json::Value) -> InferRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn validate_accepts_flat_and_nested_data() {
        let flat = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [2, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5, 6, 7]}
        ]}));
        let nested = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [2, 1, 2, 2], "datatype": "FP32",
             "data": [[[[0, 1], [2, 3]]], [[[4, 5], [6, 7]]]]}
        ]}));
        let expected: Vec<f32> = (0..8).map(|v| v as f32).collect();
        for body in [flat, nested] {
            let valid = validate(&body, &digit_model(), 64).unwrap();
            assert_eq!(valid.batch, 2);
            assert_eq!(valid.inputs, vec![expected.clone()]);
        }
    }

    #[test]
    fn validate_names_input_and_expected_shape() {
        let body = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}
        ]}));
        let error = validate(&body, &digit_model(), 64).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("\"input\""), "{message}");
        assert!(message.contains("[-1, 1, 2, 2]"), "{message}");
    }

    #[test]
    fn validate_rejects_wrong_datatype_and_count() {
        let int8 = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "INT8", "data": [0, 1, 2, 3]}
        ]}));
        assert!(matches!(
            validate(&int8, &digit_model(), 64),
            Err(InvalidRequest::Datatype { .. })
        ));
        let short = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2]}
        ]}));
        assert!(matches!(
            validate(&short, &digit_model(), 64),
            Err(InvalidRequest::ElementCount {
                expected: 4,
                found: 3,
                ..
            })
        ));
        let text = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2, "x"]}
        ]}));
        assert!(matches!(
            validate(&text, &digit_model(), 64),
            Err(InvalidRequest::NotANumber { .. })
        ));
    }

    #[test]
    fn validate_rejects_unknown_names_and_large_batches() {
        let unknown = request(serde_json::json!({"inputs": [
            {"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2, 3]}
        ]}));
        assert!(matches!(
            validate(&unknown, &digit_model(), 64),
            Err(InvalidRequest::UnknownInput { .. })
        ));
        let missing = request(serde_json::json!({"inputs": []}));
        assert!(matches!(
            validate(&missing, &digit_model(), 64),
            Err(InvalidRequest::MissingInput { .. })
        ));
        let large = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [3, 1, 2, 2], "datatype": "FP32", "data": vec![0; 12]}
        ]}));
        assert!(matches!(
            validate(&large, &digit_model(), 2),
            Err(InvalidRequest::BatchTooLarge {
                max: 2,
                found: 3,
                ..
            })
        ));
        let output = request(serde_json::json!({
            "inputs": [{"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2, 3]}],
            "outputs": [{"name": "probabilities"}]
        }));
        assert!(matches!(
            validate(&output, &digit_model(), 64),
            Err(InvalidRequest::UnknownOutput { .. })
        ));
    }
}
