//! Open Inference Protocol inference requests: parsing the body (JSON, or JSON followed
//! by binary tensor data), checking the input against the model, and building the
//! response.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fleet_bundle::Postprocessing;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ApiError;
use crate::model::{ModelInfo, top1};

/// Largest batch one request may send, which bounds the work a request can ask for.
pub const MAX_BATCH: usize = 64;

pub use fleet_oip::JSON_LENGTH_HEADER;

/// Output with the predicted class index per sample.
pub const TOP1_CLASS: &str = "top1_class";
/// Output with the predicted class name per sample.
pub const TOP1_LABEL: &str = "top1_label";
/// Output with softmax probabilities, for bundles whose model outputs logits.
pub const PROBABILITIES: &str = "probabilities";

/// The JSON part of an inference request.
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    pub id: Option<String>,
    /// Request parameters; `binary_data_output: true` requests every output as binary
    /// data unless the output's own parameter overrides it.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    pub inputs: Vec<RequestInput>,
    /// Outputs to return; all of them when absent.
    pub outputs: Option<Vec<RequestOutput>>,
}

/// One input tensor of a request.
#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// Row-major elements, flat or nested; absent when the tensor is sent as binary data.
    pub data: Option<Value>,
}

/// One requested output.
#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    /// Output parameters; `binary_data: true` requests the output as binary data.
    #[serde(default)]
    pub parameters: Map<String, Value>,
}

/// An output to return, and whether as binary data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedOutput {
    pub name: String,
    pub binary: bool,
}

/// An inference response.
#[derive(Debug, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Response parameters, where the cloud fallback flags local results.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    pub outputs: Vec<ResponseOutput>,
}

/// One output tensor of a response. A binary output carries its size in `parameters`
/// and its elements after the JSON part of the body.
#[derive(Debug, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<OutputData>,
    /// Elements in the binary tensor data layout, for a binary output.
    #[serde(skip)]
    pub binary: Option<Vec<u8>>,
}

/// Elements of an output tensor, row-major and flat.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum OutputData {
    Float(Vec<f32>),
    Int(Vec<i64>),
    Text(Vec<String>),
}

impl OutputData {
    /// Returns the elements in the binary tensor data layout: little-endian numbers,
    /// and each string as its 4-byte little-endian length followed by its bytes.
    fn to_binary(&self) -> Vec<u8> {
        match self {
            OutputData::Float(values) => fleet_oip::encode_f32(values),
            OutputData::Int(values) => fleet_oip::encode_i64(values),
            OutputData::Text(values) => fleet_oip::encode_bytes(values),
        }
    }
}

impl InferResponse {
    /// Builds the HTTP response: plain JSON, or with any binary output, the JSON part
    /// followed by the binary outputs in order and its length in
    /// `Inference-Header-Content-Length`.
    pub fn into_http(mut self, mut headers: HeaderMap) -> Response {
        let any_binary = self.outputs.iter().any(|output| output.binary.is_some());
        let binary: Vec<u8> = self
            .outputs
            .iter_mut()
            .filter_map(|output| output.binary.take())
            .flatten()
            .collect();
        let json = match serde_json::to_vec(&self) {
            Ok(json) => json,
            Err(error) => {
                return ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("response does not serialise: {error}"),
                )
                .into_response();
            }
        };
        if !any_binary {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return (headers, json).into_response();
        }
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(JSON_LENGTH_HEADER, HeaderValue::from(json.len()));
        let mut body = json;
        body.extend(binary);
        (headers, body).into_response()
    }
}

/// Name, datatype and shape of a tensor in model metadata.
#[derive(Debug, Clone, Serialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// Returns the input shape requests must match: the batch dimension as the manifest
/// declares it (-1 for any), then the shape preprocessing produces.
pub fn expected_input_shape(info: &ModelInfo) -> Vec<i64> {
    let batch = info.input.shape.first().copied().filter(|&d| d > 0);
    let (channels, height, width) = info.preprocessing.sample_shape();
    vec![
        batch.unwrap_or(-1),
        channels as i64,
        height as i64,
        width as i64,
    ]
}

/// Returns the outputs an inference can return, in response order.
pub fn output_metadata(info: &ModelInfo) -> Vec<TensorMetadata> {
    let batch = expected_input_shape(info)[0];
    let mut outputs = vec![TensorMetadata {
        name: info.output.name.clone(),
        datatype: "FP32".into(),
        shape: info.output.shape.clone(),
    }];
    if info.postprocessing == Postprocessing::Softmax && info.output.name != PROBABILITIES {
        outputs.push(TensorMetadata {
            name: PROBABILITIES.into(),
            datatype: "FP32".into(),
            shape: info.output.shape.clone(),
        });
    }
    outputs.push(TensorMetadata {
        name: TOP1_CLASS.into(),
        datatype: "INT64".into(),
        shape: vec![batch],
    });
    outputs.push(TensorMetadata {
        name: TOP1_LABEL.into(),
        datatype: "BYTES".into(),
        shape: vec![batch],
    });
    outputs
}

/// Splits a request body into its JSON request and the binary tensor data after it.
pub fn parse_body<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<(InferRequest, &'a [u8]), ApiError> {
    let json_length = headers
        .get(JSON_LENGTH_HEADER)
        .map(|value| value.as_bytes());
    let (json, binary) = fleet_oip::split_body(json_length, body).map_err(bad_request)?;
    let request = serde_json::from_slice(json)
        .map_err(|error| ApiError::bad_request(format!("invalid inference request: {error}")))?;
    Ok((request, binary))
}

fn bad_request(error: fleet_oip::BinaryError) -> ApiError {
    ApiError::bad_request(error.to_string())
}

/// A checked input: the batch size and the samples' floats one after another.
#[derive(Debug)]
pub struct CheckedInput {
    pub batch: usize,
    pub data: Vec<f32>,
}

/// Checks the request's input against the model: one input with the model's name,
/// datatype FP32, the expected shape, and as many elements as the shape needs.
pub fn check_input(
    info: &ModelInfo,
    request: &InferRequest,
    binary: &[u8],
) -> Result<CheckedInput, ApiError> {
    let expected = expected_input_shape(info);
    let name = &info.input.name;
    let described = format!("input {name:?} with datatype FP32 and shape {expected:?}");
    if let Some(unknown) = request.inputs.iter().find(|input| &input.name != name) {
        return Err(ApiError::bad_request(format!(
            "unknown input {:?}: model {:?} takes one {described}",
            unknown.name, info.name
        )));
    }
    let input = match request.inputs.as_slice() {
        [input] => input,
        [] => {
            return Err(ApiError::bad_request(format!(
                "missing input: model {:?} takes one {described}",
                info.name
            )));
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "input {name:?} given more than once: model {:?} takes one {described}",
                info.name
            )));
        }
    };
    if input.datatype != "FP32" {
        return Err(ApiError::bad_request(format!(
            "input {name:?} has datatype {:?}, expected FP32 with shape {expected:?}",
            input.datatype
        )));
    }
    let batch = check_shape(name, &input.shape, &expected)?;
    let needed = batch * info.sample_len();
    let data =
        match fleet_oip::binary_data_size(Some(&input.parameters), name).map_err(bad_request)? {
            Some(size) => {
                // The model has one input, so its section is the whole binary part.
                let mut sections = fleet_oip::Sections::new(binary);
                let section = sections.take(name, size).map_err(bad_request)?;
                sections.finish().map_err(bad_request)?;
                fleet_oip::decode_f32(name, section, needed).map_err(bad_request)?
            }
            None => json_floats(name, input.data.as_ref(), needed)?,
        };
    Ok(CheckedInput { batch, data })
}

/// Checks a shape against the expected one, where -1 allows a batch size from 1 to
/// [`MAX_BATCH`], and returns the batch size.
fn check_shape(name: &str, shape: &[i64], expected: &[i64]) -> Result<usize, ApiError> {
    let batch_fits = |d: i64| (1..=MAX_BATCH as i64).contains(&d);
    let fits = shape.len() == expected.len()
        && shape
            .iter()
            .zip(expected)
            .all(|(&d, &e)| if e < 0 { batch_fits(d) } else { d == e });
    if !fits {
        return Err(ApiError::bad_request(format!(
            "input {name:?} has shape {shape:?}, expected {expected:?} (-1 is the batch \
             size, 1 to {MAX_BATCH})"
        )));
    }
    Ok(shape[0] as usize)
}

/// Reads the elements of an input sent as JSON, flattening nested arrays.
fn json_floats(name: &str, data: Option<&Value>, needed: usize) -> Result<Vec<f32>, ApiError> {
    let Some(data) = data else {
        return Err(ApiError::bad_request(format!(
            "input {name:?} has no data and no binary_data_size parameter"
        )));
    };
    let mut floats = Vec::with_capacity(needed);
    flatten(data, &mut floats).map_err(|found| {
        ApiError::bad_request(format!(
            "input {name:?} has a non-numeric element {found}: expected FP32 numbers"
        ))
    })?;
    if floats.len() != needed {
        return Err(ApiError::bad_request(format!(
            "input {name:?} has {} elements, but its shape needs {needed}",
            floats.len()
        )));
    }
    Ok(floats)
}

/// Appends the numbers of a flat or nested JSON array; returns the first value that is
/// not a number or an array.
fn flatten(value: &Value, out: &mut Vec<f32>) -> Result<(), String> {
    match value {
        Value::Number(number) => {
            let float = number.as_f64().ok_or_else(|| number.to_string())?;
            out.push(float as f32);
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(|item| flatten(item, out)),
        other => Err(other.to_string().chars().take(40).collect()),
    }
}

/// Checks the requested outputs and returns them, or every output when the request
/// names none, each marked binary as the request parameters specify.
pub fn requested_outputs(
    info: &ModelInfo,
    request: &InferRequest,
) -> Result<Vec<WantedOutput>, ApiError> {
    let binary_default = fleet_oip::flag(
        Some(&request.parameters),
        fleet_oip::BINARY_DATA_OUTPUT,
        "the request",
    )
    .map_err(bad_request)?
    .unwrap_or(false);
    let available: Vec<String> = output_metadata(info).into_iter().map(|o| o.name).collect();
    let Some(requested) = &request.outputs else {
        return Ok(available
            .into_iter()
            .map(|name| WantedOutput {
                name,
                binary: binary_default,
            })
            .collect());
    };
    for output in requested {
        if !available.contains(&output.name) {
            return Err(ApiError::bad_request(format!(
                "unknown output {:?}: model {:?} has outputs {}",
                output.name,
                info.name,
                available.join(", ")
            )));
        }
    }
    requested
        .iter()
        .map(|output| {
            let place = format!("output {:?}", output.name);
            let binary = fleet_oip::flag(Some(&output.parameters), fleet_oip::BINARY_DATA, &place)
                .map_err(bad_request)?
                .unwrap_or(binary_default);
            Ok(WantedOutput {
                name: output.name.clone(),
                binary,
            })
        })
        .collect()
}

/// Builds the response from the model's raw output rows.
pub fn build_response(
    info: &ModelInfo,
    id: Option<String>,
    wanted: &[WantedOutput],
    rows: &[Vec<f32>],
) -> Result<InferResponse, ApiError> {
    let batch = rows.len();
    let width = rows.first().map_or(0, Vec::len);
    if rows.iter().any(|row| row.len() != width) {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "model returned rows of different lengths".into(),
        ));
    }
    let confidences: Vec<Vec<f32>> = rows.iter().map(|row| info.confidences(row)).collect();
    let best: Vec<(usize, f32)> = confidences.iter().map(|row| top1(row)).collect();

    let mut outputs = Vec::new();
    for WantedOutput { name, binary } in wanted {
        let (datatype, shape, data) = match name.as_str() {
            raw if raw == info.output.name => {
                ("FP32", vec![batch, width], OutputData::Float(rows.concat()))
            }
            PROBABILITIES => (
                "FP32",
                vec![batch, width],
                OutputData::Float(confidences.concat()),
            ),
            TOP1_CLASS => {
                let classes = best.iter().map(|&(class, _)| class as i64).collect();
                ("INT64", vec![batch], OutputData::Int(classes))
            }
            TOP1_LABEL => {
                let labels = best.iter().map(|&(class, _)| info.label(class)).collect();
                ("BYTES", vec![batch], OutputData::Text(labels))
            }
            // `requested_outputs` rejected every other name.
            _ => continue,
        };
        let output = if *binary {
            let bytes = data.to_binary();
            let mut parameters = Map::new();
            parameters.insert(fleet_oip::BINARY_DATA_SIZE.into(), Value::from(bytes.len()));
            ResponseOutput {
                name: name.clone(),
                datatype,
                shape,
                parameters: Some(parameters),
                data: None,
                binary: Some(bytes),
            }
        } else {
            ResponseOutput {
                name: name.clone(),
                datatype,
                shape,
                parameters: None,
                data: Some(data),
                binary: None,
            }
        };
        outputs.push(output);
    }
    Ok(InferResponse {
        model_name: info.name.clone(),
        model_version: info.version.clone(),
        id,
        parameters: None,
        outputs,
    })
}

/// Returns the lowest top-1 confidence among the model's output rows, 1 for none.
pub fn lowest_top1(info: &ModelInfo, rows: &[Vec<f32>]) -> f32 {
    rows.iter()
        .map(|row| top1(&info.confidences(row)).1)
        .fold(1.0, f32::min)
}
