//! Open Inference Protocol (KServe v2) REST messages and the input checks that both the
//! gateway and the replicas apply before a model runs.
//!
//! Tensor data travels in the `data` field, flat in row-major order or nested, or in the
//! binary tensor data extension ([`fleet_oip`]), which Triton's clients use by default.
//! Backends are always called with JSON, because not every Open Inference Protocol
//! server reads binary tensors (Seldon MLServer does not). A client that requests binary
//! outputs gets the backend's JSON response re-encoded by [`binary_response`].

use fleet_oip::BinaryError;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
    /// Elements in row-major order, sent as one flat array or as nested arrays; absent
    /// when the tensor is sent as binary data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<TensorData>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The elements of a JSON input tensor, flattened while the body is parsed, so that a
/// request of thousands of numbers does not build a JSON tree first.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Numbers(Vec<f32>),
    /// The first element that is not a number, as JSON text.
    NotANumber(String),
}

impl<'de> Deserialize<'de> for TensorData {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<TensorData, D::Error> {
        let mut collected = Collected::default();
        Flatten(&mut collected).deserialize(deserializer)?;
        Ok(match collected.not_a_number {
            Some(element) => TensorData::NotANumber(element),
            None => TensorData::Numbers(collected.numbers),
        })
    }
}

impl Serialize for TensorData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            TensorData::Numbers(numbers) => serializer.collect_seq(numbers),
            TensorData::NotANumber(element) => serializer.serialize_str(element),
        }
    }
}

/// Numbers gathered from nested arrays, and the first element that was not one.
#[derive(Debug, Default)]
struct Collected {
    numbers: Vec<f32>,
    not_a_number: Option<String>,
}

impl Collected {
    fn reject(&mut self, element: String) {
        if self.not_a_number.is_none() {
            self.not_a_number = Some(element.chars().take(40).collect());
        }
    }
}

/// Appends the numbers of a JSON value, descending into arrays, to [`Collected`].
struct Flatten<'a>(&'a mut Collected);

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("a number or an array of numbers")
    }

    fn visit_f64<E>(self, value: f64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_i64<E>(self, value: i64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_u64<E>(self, value: u64) -> Result<(), E> {
        self.0.numbers.push(value as f32);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let collected = self.0;
        while items.next_element_seed(Flatten(&mut *collected))?.is_some() {}
        Ok(())
    }

    fn visit_str<E>(self, value: &str) -> Result<(), E> {
        self.0.reject(format!("{value:?}"));
        Ok(())
    }

    fn visit_bool<E>(self, value: bool) -> Result<(), E> {
        self.0.reject(value.to_string());
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.reject("null".into());
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        while entries.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        self.0.reject("an object".into());
        Ok(())
    }
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
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error(
        "input {name:?} has no data and no {} parameter",
        fleet_oip::BINARY_DATA_SIZE
    )]
    NoData { name: String },
    #[error(
        "input {name:?} has both data and a {} parameter; send its elements one way",
        fleet_oip::BINARY_DATA_SIZE
    )]
    DataTwice { name: String },
    #[error("input {name:?} has element {index} = {value}, which is not a finite FP32 number")]
    NotFinite {
        name: String,
        index: usize,
        value: String,
    },
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

/// A request that passed [`validate`]: the batch size, each input's elements, and how
/// the client wants the outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRequest {
    /// Size of the first dimension shared by the inputs.
    pub batch: usize,
    /// Elements of each model input, in the model's input order.
    pub inputs: Vec<Vec<f32>>,
    /// Whether any input came as binary data.
    pub binary_inputs: bool,
    pub binary_outputs: BinaryOutputs,
}

/// The outputs the client requested as binary data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BinaryOutputs {
    /// The request's `binary_data_output` parameter.
    default: bool,
    /// Outputs whose own `binary_data` parameter decides.
    named: Vec<(String, bool)>,
}

impl BinaryOutputs {
    /// Reads the request's and its outputs' binary parameters.
    fn of(request: &InferRequest) -> Result<BinaryOutputs, BinaryError> {
        let default = fleet_oip::flag(
            request.parameters.as_ref(),
            fleet_oip::BINARY_DATA_OUTPUT,
            "the request",
        )?
        .unwrap_or(false);
        let mut named = Vec::new();
        for output in request.outputs.iter().flatten() {
            let place = format!("output {:?}", output.name);
            let flag = fleet_oip::flag(output.parameters.as_ref(), fleet_oip::BINARY_DATA, &place)?;
            if let Some(flag) = flag {
                named.push((output.name.clone(), flag));
            }
        }
        Ok(BinaryOutputs { default, named })
    }

    /// Returns whether the output called `name` goes back as binary data.
    pub fn wants(&self, name: &str) -> bool {
        self.named
            .iter()
            .find(|(output, _)| output == name)
            .map_or(self.default, |&(_, flag)| flag)
    }

    /// Returns whether any output may go back as binary data.
    pub fn any(&self) -> bool {
        self.default || self.named.iter().any(|&(_, flag)| flag)
    }
}

/// Parses a request body, given the value of its `Inference-Header-Content-Length`
/// header if it has one. Returns the request and the binary data after its JSON part.
pub fn parse<'a>(
    json_length: Option<&[u8]>,
    body: &'a [u8],
) -> Result<(InferRequest, &'a [u8]), InvalidRequest> {
    let (json, binary) = fleet_oip::split_body(json_length, body)?;
    let request =
        serde_json::from_slice(json).map_err(|error| InvalidRequest::Body(error.to_string()))?;
    Ok((request, binary))
}

/// Checks a request and the binary data after its JSON part against the model's inputs
/// and outputs. Every input must be present once, with the declared datatype, a shape
/// that matches (any size where the model has -1) and as many numeric elements as the
/// shape needs. Every binary byte must belong to an input. Only `FP32` inputs are
/// supported.
pub fn validate(
    request: &InferRequest,
    binary: &[u8],
    metadata: &ModelMetadata,
    max_batch: usize,
) -> Result<ValidatedRequest, InvalidRequest> {
    // Binary sections follow the order of the request's inputs, not the model's.
    let mut sections = fleet_oip::Sections::new(binary);
    let mut binary_sections = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let section = match fleet_oip::binary_data_size(input.parameters.as_ref(), &input.name)? {
            Some(size) => Some(sections.take(&input.name, size)?),
            None => None,
        };
        binary_sections.push(section);
    }
    sections.finish()?;

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
        let Some(position) = request
            .inputs
            .iter()
            .position(|input| input.name == spec.name)
        else {
            return Err(InvalidRequest::MissingInput {
                name: spec.name.clone(),
                shape: format_shape(&spec.shape),
            });
        };
        let input = &request.inputs[position];
        check_input(input, spec)?;
        batch = input.shape.first().copied().unwrap_or(1) as usize;
        if batch > max_batch {
            return Err(InvalidRequest::BatchTooLarge {
                name: input.name.clone(),
                max: max_batch,
                found: batch,
            });
        }
        let elements: usize = input.shape.iter().map(|&d| d as usize).product();
        let values = match (binary_sections[position], &input.data) {
            (Some(_), Some(_)) => {
                return Err(InvalidRequest::DataTwice {
                    name: input.name.clone(),
                });
            }
            (Some(section), None) => fleet_oip::decode_f32(&input.name, section, elements)?,
            (None, Some(data)) => json_numbers(&input.name, data, elements, &input.shape)?,
            (None, None) => {
                return Err(InvalidRequest::NoData {
                    name: input.name.clone(),
                });
            }
        };
        // JSON has no NaN or infinity, so the backends, called with JSON, could not
        // receive one; a number too large for FP32 would become infinity.
        if let Some(index) = values.iter().position(|value| !value.is_finite()) {
            return Err(InvalidRequest::NotFinite {
                name: input.name.clone(),
                index,
                value: values[index].to_string(),
            });
        }
        inputs.push(values);
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
    Ok(ValidatedRequest {
        batch,
        inputs,
        binary_inputs: binary_sections.iter().any(Option::is_some),
        binary_outputs: BinaryOutputs::of(request)?,
    })
}

/// Returns the request as plain JSON for a backend: every input's elements in `data`,
/// flat, and no binary parameters.
pub fn json_request(
    request: &InferRequest,
    valid: &ValidatedRequest,
    metadata: &ModelMetadata,
) -> Vec<u8> {
    let mut plain = request.clone();
    for input in &mut plain.inputs {
        if let Some(index) = metadata
            .inputs
            .iter()
            .position(|spec| spec.name == input.name)
        {
            input.data = Some(TensorData::Numbers(valid.inputs[index].clone()));
        }
        remove_parameter(&mut input.parameters, fleet_oip::BINARY_DATA_SIZE);
    }
    for output in plain.outputs.iter_mut().flatten() {
        remove_parameter(&mut output.parameters, fleet_oip::BINARY_DATA);
    }
    remove_parameter(&mut plain.parameters, fleet_oip::BINARY_DATA_OUTPUT);
    serde_json::to_vec(&plain).expect("a request parsed from JSON serialises")
}

fn remove_parameter(
    parameters: &mut Option<serde_json::Map<String, serde_json::Value>>,
    name: &str,
) {
    if let Some(map) = parameters {
        map.remove(name);
        if map.is_empty() {
            *parameters = None;
        }
    }
}

/// Re-encodes a JSON inference response so that the outputs the client requested as
/// binary data carry it after the JSON part. Returns the body and the length of its JSON
/// part.
pub fn binary_response(json: &[u8], requested: &BinaryOutputs) -> Result<(Vec<u8>, usize), String> {
    let mut response: serde_json::Value = serde_json::from_slice(json)
        .map_err(|error| format!("the backend's response is not JSON: {error}"))?;
    let outputs = response
        .get_mut("outputs")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or("the backend's response has no outputs")?;
    let mut sections = Vec::new();
    for output in outputs {
        let object = output
            .as_object_mut()
            .ok_or("the backend's response has an output that is not an object")?;
        let name = object
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        if !requested.wants(&name) {
            continue;
        }
        let datatype = object
            .get("datatype")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let Some(data) = object.remove("data") else {
            return Err(format!("the backend's output {name:?} has no data"));
        };
        let section =
            fleet_oip::encode_json(&name, &datatype, &data).map_err(|error| error.to_string())?;
        let parameters = object
            .entry("parameters")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let Some(parameters) = parameters.as_object_mut() {
            parameters.insert(
                fleet_oip::BINARY_DATA_SIZE.into(),
                serde_json::Value::from(section.len()),
            );
        }
        sections.push(section);
    }
    let json = serde_json::to_vec(&response).expect("a parsed response serialises");
    Ok(fleet_oip::join_body(json, sections))
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

/// Returns the numbers of an input's JSON data after checking them and their count.
fn json_numbers(
    name: &str,
    data: &TensorData,
    expected: usize,
    shape: &[i64],
) -> Result<Vec<f32>, InvalidRequest> {
    let values = match data {
        TensorData::Numbers(values) => values,
        TensorData::NotANumber(element) => {
            return Err(InvalidRequest::NotANumber {
                name: name.to_owned(),
                element: element.clone(),
            });
        }
    };
    if values.len() != expected {
        return Err(InvalidRequest::ElementCount {
            name: name.to_owned(),
            shape: shape.to_vec(),
            expected,
            found: values.len(),
        });
    }
    Ok(values.clone())
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
            let valid = validate(&body, &[], &digit_model(), 64).unwrap();
            assert_eq!(valid.batch, 2);
            assert_eq!(valid.inputs, vec![expected.clone()]);
        }
    }

    #[test]
    fn validate_names_input_and_expected_shape() {
        let body = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}
        ]}));
        let error = validate(&body, &[], &digit_model(), 64).unwrap_err();
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
            validate(&int8, &[], &digit_model(), 64),
            Err(InvalidRequest::Datatype { .. })
        ));
        let short = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2]}
        ]}));
        assert!(matches!(
            validate(&short, &[], &digit_model(), 64),
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
            validate(&text, &[], &digit_model(), 64),
            Err(InvalidRequest::NotANumber { .. })
        ));
    }

    #[test]
    fn validate_rejects_unknown_names_and_large_batches() {
        let unknown = request(serde_json::json!({"inputs": [
            {"name": "image", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1, 2, 3]}
        ]}));
        assert!(matches!(
            validate(&unknown, &[], &digit_model(), 64),
            Err(InvalidRequest::UnknownInput { .. })
        ));
        let missing = request(serde_json::json!({"inputs": []}));
        assert!(matches!(
            validate(&missing, &[], &digit_model(), 64),
            Err(InvalidRequest::MissingInput { .. })
        ));
        let large = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [3, 1, 2, 2], "datatype": "FP32", "data": vec![0; 12]}
        ]}));
        assert!(matches!(
            validate(&large, &[], &digit_model(), 2),
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
            validate(&output, &[], &digit_model(), 64),
            Err(InvalidRequest::UnknownOutput { .. })
        ));
    }

    fn binary_request(parameters: serde_json::Value) -> (InferRequest, Vec<u8>) {
        let values: Vec<f32> = (0..8).map(|v| v as f32 / 2.0).collect();
        let body = request(serde_json::json!({
            "inputs": [{"name": "input", "shape": [2, 1, 2, 2], "datatype": "FP32",
                        "parameters": {"binary_data_size": 32}}],
            "parameters": parameters,
        }));
        (body, fleet_oip::encode_f32(&values))
    }

    #[test]
    fn validate_reads_binary_inputs() {
        let (body, binary) = binary_request(serde_json::json!({}));
        let valid = validate(&body, &binary, &digit_model(), 64).unwrap();
        assert_eq!(
            valid.inputs[0],
            fleet_oip::decode_f32("x", &binary, 8).unwrap()
        );
        assert!(valid.binary_inputs);
        assert!(!valid.binary_outputs.any());

        let error = validate(&body, &binary[..28], &digit_model(), 64).unwrap_err();
        assert!(error.to_string().contains("\"input\""), "{error}");
        let mut long = binary.clone();
        long.extend([0; 4]);
        assert!(matches!(
            validate(&body, &long, &digit_model(), 64),
            Err(InvalidRequest::Binary(BinaryError::TrailingBytes(4)))
        ));
        let mut not_finite = binary.clone();
        not_finite[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            validate(&body, &not_finite, &digit_model(), 64),
            Err(InvalidRequest::NotFinite { index: 2, .. })
        ));
        let mut both = body.clone();
        both.inputs[0].data = Some(TensorData::Numbers(vec![0.0; 8]));
        assert!(matches!(
            validate(&both, &binary, &digit_model(), 64),
            Err(InvalidRequest::DataTwice { .. })
        ));
        let too_large = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32", "data": [0, 1e39, 2, 3]}
        ]}));
        assert!(matches!(
            validate(&too_large, &[], &digit_model(), 64),
            Err(InvalidRequest::NotFinite { index: 1, .. })
        ));
        let no_data = request(serde_json::json!({"inputs": [
            {"name": "input", "shape": [1, 1, 2, 2], "datatype": "FP32"}
        ]}));
        assert!(matches!(
            validate(&no_data, &[], &digit_model(), 64),
            Err(InvalidRequest::NoData { .. })
        ));
    }

    #[test]
    fn json_request_carries_binary_inputs_as_data() {
        let (body, binary) = binary_request(serde_json::json!({"binary_data_output": true}));
        let valid = validate(&body, &binary, &digit_model(), 64).unwrap();
        assert!(valid.binary_outputs.wants("logits"));
        let plain: serde_json::Value =
            serde_json::from_slice(&json_request(&body, &valid, &digit_model())).unwrap();
        assert_eq!(
            plain["inputs"][0]["data"],
            serde_json::json!([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])
        );
        assert!(plain["inputs"][0].get("parameters").is_none(), "{plain}");
        assert!(plain.get("parameters").is_none(), "{plain}");
    }

    #[test]
    fn binary_response_encodes_requested_outputs() {
        let answer = serde_json::json!({"model_name": "digit-cnn", "outputs": [
            {"name": "logits", "shape": [1, 2], "datatype": "FP32", "data": [0.25, -1.0]},
            {"name": "label", "shape": [1], "datatype": "INT64", "data": [3]},
        ]});
        let requested = BinaryOutputs {
            default: true,
            named: vec![("label".into(), false)],
        };
        let (body, json_length) =
            binary_response(&serde_json::to_vec(&answer).unwrap(), &requested).unwrap();
        let head: serde_json::Value = serde_json::from_slice(&body[..json_length]).unwrap();
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none(), "{head}");
        assert_eq!(head["outputs"][1]["data"], serde_json::json!([3]));
        assert_eq!(&body[json_length..], fleet_oip::encode_f32(&[0.25, -1.0]));
    }
}
