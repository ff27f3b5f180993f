//! The binary tensor data extension of the Open Inference Protocol's REST API, shared by
//! the device agent's local API and the fleet server's gateway and replicas.
//!
//! A body that uses the extension is a JSON inference request or response followed by
//! raw tensor bytes. The `Inference-Header-Content-Length` header gives the length of
//! the JSON part. Each tensor sent this way has no `data` field and a
//! `binary_data_size` parameter instead, and the sections follow one another in the
//! order the tensors appear in the JSON. Numbers are little-endian; a `BYTES` element is
//! a 4-byte little-endian length followed by that many bytes.
//!
//! Triton's Python and C++ clients use this extension by default, so a server that
//! wants to be called by them has to read and write it.

use serde_json::{Map, Value};

/// Header giving the length of the JSON part of a body with binary tensor data.
pub const JSON_LENGTH_HEADER: &str = "inference-header-content-length";

/// Tensor parameter with the length in bytes of a tensor's binary section.
pub const BINARY_DATA_SIZE: &str = "binary_data_size";

/// Request parameter asking for every output as binary data.
pub const BINARY_DATA_OUTPUT: &str = "binary_data_output";

/// Output parameter asking for that output as binary data.
pub const BINARY_DATA: &str = "binary_data";

/// A body or parameter that breaks the extension's rules. The message names the header,
/// tensor or parameter and is meant for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BinaryError {
    #[error(
        "invalid {JSON_LENGTH_HEADER} header {value:?}: expected the length of the JSON \
         part, at most the body's {body_len} bytes"
    )]
    JsonLength { value: String, body_len: usize },
    #[error("invalid parameter {name} {value} of {place}: expected {expected}")]
    Parameter {
        name: &'static str,
        value: String,
        place: String,
        expected: &'static str,
    },
    #[error(
        "input {tensor:?} has {BINARY_DATA_SIZE} {size}, but only {left} bytes of binary \
         data are left in the body"
    )]
    SectionPastEnd {
        tensor: String,
        size: u64,
        left: usize,
    },
    #[error("the body has {0} bytes of binary data that no input's {BINARY_DATA_SIZE} claims")]
    TrailingBytes(usize),
    #[error(
        "input {tensor:?} has {found} bytes of binary data, but its shape needs {expected} \
         ({elements} elements of {datatype})"
    )]
    SectionSize {
        tensor: String,
        datatype: String,
        elements: usize,
        expected: usize,
        found: usize,
    },
    #[error("output {tensor:?} has datatype {datatype}, which has no binary form here")]
    Datatype { tensor: String, datatype: String },
    #[error("output {tensor:?} has an element that does not fit {datatype}: {element}")]
    Element {
        tensor: String,
        datatype: String,
        element: String,
    },
}

/// Splits a body into its JSON part and the binary data after it, given the
/// `Inference-Header-Content-Length` header's value if the request has one.
pub fn split_body<'a>(
    json_length: Option<&[u8]>,
    body: &'a [u8],
) -> Result<(&'a [u8], &'a [u8]), BinaryError> {
    let Some(value) = json_length else {
        return Ok((body, &[]));
    };
    let length = std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .filter(|&length| length <= body.len())
        .ok_or_else(|| BinaryError::JsonLength {
            value: String::from_utf8_lossy(value).into_owned(),
            body_len: body.len(),
        })?;
    Ok(body.split_at(length))
}

/// Hands out the binary sections of a body in order, one per tensor that has a
/// `binary_data_size` parameter.
#[derive(Debug)]
pub struct Sections<'a> {
    rest: &'a [u8],
}

impl<'a> Sections<'a> {
    pub fn new(binary: &'a [u8]) -> Sections<'a> {
        Sections { rest: binary }
    }

    /// Takes the next `size` bytes for `tensor`.
    pub fn take(&mut self, tensor: &str, size: u64) -> Result<&'a [u8], BinaryError> {
        let past_end = || BinaryError::SectionPastEnd {
            tensor: tensor.to_owned(),
            size,
            left: self.rest.len(),
        };
        let size = usize::try_from(size).map_err(|_| past_end())?;
        if size > self.rest.len() {
            return Err(past_end());
        }
        let (section, rest) = self.rest.split_at(size);
        self.rest = rest;
        Ok(section)
    }

    /// Checks that every byte was claimed by a tensor.
    pub fn finish(self) -> Result<(), BinaryError> {
        match self.rest.len() {
            0 => Ok(()),
            left => Err(BinaryError::TrailingBytes(left)),
        }
    }
}

/// Reads a tensor's `binary_data_size` parameter: `None` when the tensor carries its
/// data as JSON.
pub fn binary_data_size(
    parameters: Option<&Map<String, Value>>,
    tensor: &str,
) -> Result<Option<u64>, BinaryError> {
    match parameters.and_then(|parameters| parameters.get(BINARY_DATA_SIZE)) {
        None => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| BinaryError::Parameter {
                name: BINARY_DATA_SIZE,
                value: value.to_string(),
                place: format!("input {tensor:?}"),
                expected: "a byte count",
            }),
    }
}

/// Reads a boolean parameter such as `binary_data_output`; false when absent. `place`
/// names where it was found, for the error.
pub fn flag(
    parameters: Option<&Map<String, Value>>,
    name: &'static str,
    place: &str,
) -> Result<Option<bool>, BinaryError> {
    match parameters.and_then(|parameters| parameters.get(name)) {
        None => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(other) => Err(BinaryError::Parameter {
            name,
            value: other.to_string(),
            place: place.to_owned(),
            expected: "true or false",
        }),
    }
}

/// Decodes a binary `FP32` section of `elements` numbers.
pub fn decode_f32(tensor: &str, section: &[u8], elements: usize) -> Result<Vec<f32>, BinaryError> {
    if section.len() != elements * 4 {
        return Err(BinaryError::SectionSize {
            tensor: tensor.to_owned(),
            datatype: "FP32".to_owned(),
            elements,
            expected: elements * 4,
            found: section.len(),
        });
    }
    Ok(section
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("chunks of 4 bytes")))
        .collect())
}

/// Encodes `FP32` elements as a binary section.
pub fn encode_f32(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// Encodes `INT64` elements as a binary section.
pub fn encode_i64(values: &[i64]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// Encodes `BYTES` elements as a binary section: each a 4-byte length, then its bytes.
pub fn encode_bytes<T: AsRef<[u8]>>(values: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    for value in values {
        let value = value.as_ref();
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// Encodes an output's JSON `data` (flat or nested, row-major) as a binary section of
/// `datatype`. Numbers that do not fit the datatype are an error, never truncated.
pub fn encode_json(tensor: &str, datatype: &str, data: &Value) -> Result<Vec<u8>, BinaryError> {
    let mut elements = Vec::new();
    flatten(data, &mut elements);
    let bad = |element: &Value| BinaryError::Element {
        tensor: tensor.to_owned(),
        datatype: datatype.to_owned(),
        element: element.to_string().chars().take(40).collect(),
    };
    let mut out = Vec::new();
    for element in elements {
        match datatype {
            "FP32" => {
                let value = element.as_f64().ok_or_else(|| bad(element))?;
                out.extend_from_slice(&(value as f32).to_le_bytes());
            }
            "FP64" => {
                let value = element.as_f64().ok_or_else(|| bad(element))?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            "INT8" | "INT16" | "INT32" | "INT64" => {
                let value = element.as_i64().ok_or_else(|| bad(element))?;
                let bytes = value.to_le_bytes();
                let width = int_width(datatype);
                let fits = match width {
                    8 => true,
                    _ => {
                        let bits = width * 8;
                        (-(1i64 << (bits - 1))..(1i64 << (bits - 1))).contains(&value)
                    }
                };
                if !fits {
                    return Err(bad(element));
                }
                out.extend_from_slice(&bytes[..width]);
            }
            "UINT8" | "UINT16" | "UINT32" | "UINT64" => {
                let value = element.as_u64().ok_or_else(|| bad(element))?;
                let width = int_width(datatype);
                if width < 8 && value >> (width * 8) != 0 {
                    return Err(bad(element));
                }
                out.extend_from_slice(&value.to_le_bytes()[..width]);
            }
            "BOOL" => {
                let value = element.as_bool().ok_or_else(|| bad(element))?;
                out.push(u8::from(value));
            }
            "BYTES" => {
                let text = element.as_str().ok_or_else(|| bad(element))?;
                out.extend(encode_bytes(&[text]));
            }
            _ => {
                return Err(BinaryError::Datatype {
                    tensor: tensor.to_owned(),
                    datatype: datatype.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// Bytes per element of an integer datatype name such as `INT16`.
fn int_width(datatype: &str) -> usize {
    match datatype.trim_start_matches('U') {
        "INT8" => 1,
        "INT16" => 2,
        "INT32" => 4,
        _ => 8,
    }
}

/// Collects the leaves of a flat or nested JSON array in row-major order.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

/// Joins a JSON part and binary sections into one body; returns the body and the value
/// of `Inference-Header-Content-Length`.
pub fn join_body(json: Vec<u8>, sections: impl IntoIterator<Item = Vec<u8>>) -> (Vec<u8>, usize) {
    let json_length = json.len();
    let mut body = json;
    for section in sections {
        body.extend(section);
    }
    (body, json_length)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn split_body_without_header_is_all_json() {
        let (json, binary) = split_body(None, b"{}").unwrap();
        assert_eq!((json, binary), (&b"{}"[..], &b""[..]));
        let (json, binary) = split_body(Some(b" 2"), b"{}abc").unwrap();
        assert_eq!((json, binary), (&b"{}"[..], &b"abc"[..]));
    }

    #[test]
    fn split_body_rejects_a_length_past_the_body() {
        for value in [&b"6"[..], b"-1", b"two", b""] {
            let error = split_body(Some(value), b"{}abc").unwrap_err();
            assert!(
                error.to_string().contains(JSON_LENGTH_HEADER),
                "{value:?}: {error}"
            );
        }
    }

    #[test]
    fn sections_in_order_claim_every_byte() {
        let mut sections = Sections::new(b"aabbb");
        assert_eq!(sections.take("a", 2).unwrap(), b"aa");
        assert_eq!(sections.take("b", 3).unwrap(), b"bbb");
        sections.finish().unwrap();

        let mut short = Sections::new(b"aab");
        short.take("a", 2).unwrap();
        let error = short.take("b", 3).unwrap_err();
        assert_eq!(
            error,
            BinaryError::SectionPastEnd {
                tensor: "b".into(),
                size: 3,
                left: 1
            }
        );

        let mut long = Sections::new(b"aabbb");
        long.take("a", 2).unwrap();
        assert_eq!(long.finish().unwrap_err(), BinaryError::TrailingBytes(3));
    }

    #[test]
    fn parameters_must_have_the_right_type() {
        let parameters = json!({"binary_data_size": "12", "binary_data": 1});
        let parameters = parameters.as_object();
        assert!(binary_data_size(parameters, "input").is_err());
        let error = flag(parameters, BINARY_DATA, "output \"logits\"").unwrap_err();
        assert!(error.to_string().contains("output \"logits\""), "{error}");
        assert_eq!(flag(None, BINARY_DATA, "x").unwrap(), None);
        assert_eq!(binary_data_size(None, "x").unwrap(), None);
    }

    #[test]
    fn decode_f32_round_trip_and_size() {
        let values = [0.5f32, -2.0, f32::MAX];
        let bytes = encode_f32(&values);
        assert_eq!(decode_f32("input", &bytes, 3).unwrap(), values);
        let error = decode_f32("input", &bytes, 4).unwrap_err();
        assert!(error.to_string().contains("\"input\""), "{error}");
        assert!(error.to_string().contains("16"), "{error}");
    }

    #[test]
    fn json_data_encodes_per_datatype() {
        let nested = json!([[1.5, 2.0], [3.0, 4.0]]);
        assert_eq!(
            encode_json("x", "FP32", &nested).unwrap(),
            encode_f32(&[1.5, 2.0, 3.0, 4.0])
        );
        assert_eq!(
            encode_json("x", "INT64", &json!([7, -1])).unwrap(),
            encode_i64(&[7, -1])
        );
        assert_eq!(
            encode_json("x", "INT16", &json!([-2])).unwrap(),
            (-2i16).to_le_bytes()
        );
        assert_eq!(
            encode_json("x", "BYTES", &json!(["seven", ""])).unwrap(),
            encode_bytes(&["seven", ""])
        );
        assert_eq!(
            encode_json("x", "BOOL", &json!([true, false])).unwrap(),
            [1, 0]
        );
    }

    #[test]
    fn encode_json_rejects_misfit_elements() {
        assert!(encode_json("x", "INT8", &json!([128])).is_err());
        assert!(encode_json("x", "UINT8", &json!([-1])).is_err());
        assert!(encode_json("x", "FP32", &json!(["1.0"])).is_err());
        assert!(matches!(
            encode_json("x", "FP8", &json!([1])),
            Err(BinaryError::Datatype { .. })
        ));
    }

    #[test]
    fn join_body_reports_the_json_length() {
        let (body, length) = join_body(b"{}".to_vec(), [vec![1, 2], vec![3]]);
        assert_eq!(body, [b'{', b'}', 1, 2, 3]);
        assert_eq!(length, 2);
    }
}
