//! Metadata of a hard sample: an input a device classified with low confidence and
//! uploads to the fleet server over HTTP for retraining.
//!
//! `POST /api/samples` carries the sample's bytes as the body, its content type in the
//! `Content-Type` header and this metadata as the query string, so the body needs no
//! envelope and every field is percent-encoded UTF-8.

use serde::{Deserialize, Serialize};

/// Maximum length of a model name or version, in bytes.
pub const MAX_MODEL_FIELD_BYTES: usize = 128;
/// Maximum length of a class name, in bytes.
pub const MAX_LABEL_BYTES: usize = 256;
/// Maximum length of a sample's source, in bytes.
pub const MAX_SOURCE_BYTES: usize = 1024;

/// Metadata a device records about a hard sample when it captures it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleMetadata {
    /// The capturing device. The server takes the device id from the credential and
    /// rejects a request whose `device_id` differs from it.
    pub device_id: String,
    pub model_name: String,
    pub model_version: String,
    /// Top-1 class index and its name from the bundle's labels (the index as text when
    /// the bundle has none).
    pub predicted_class: u32,
    pub predicted_label: String,
    /// Top-1 confidence, 0 to 1.
    pub confidence: f32,
    /// Ground-truth class index, when the data set has labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub true_class: Option<u32>,
    /// Origin of the input on the device, such as `t10k-images-idx3-ubyte.gz#17` or a
    /// file path.
    #[serde(default)]
    pub source: String,
    /// Device clock at capture, milliseconds since the Unix epoch.
    pub device_time_ms: u64,
    /// Lowercase hex SHA-256 of the sample's bytes, which the server checks.
    pub sha256: String,
}

impl SampleMetadata {
    /// Returns the fields as query parameters of `POST /api/samples`, unencoded; the
    /// HTTP client percent-encodes them.
    pub fn query_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            ("device_id", self.device_id.clone()),
            ("model_name", self.model_name.clone()),
            ("model_version", self.model_version.clone()),
            ("predicted_class", self.predicted_class.to_string()),
            ("predicted_label", self.predicted_label.clone()),
            // Display prints the shortest text that parses back to the same f32.
            ("confidence", self.confidence.to_string()),
        ];
        if let Some(true_class) = self.true_class {
            pairs.push(("true_class", true_class.to_string()));
        }
        pairs.extend([
            ("source", self.source.clone()),
            ("device_time_ms", self.device_time_ms.to_string()),
            ("sha256", self.sha256.clone()),
        ]);
        pairs
    }

    /// Checks every field and returns a message naming the first invalid one.
    pub fn validate(&self) -> Result<(), String> {
        crate::topic::validate_device_id(&self.device_id)?;
        for (name, value) in [
            ("model_name", &self.model_name),
            ("model_version", &self.model_version),
        ] {
            if value.is_empty() || value.len() > MAX_MODEL_FIELD_BYTES {
                return Err(format!(
                    "{name} must be 1 to {MAX_MODEL_FIELD_BYTES} bytes long, got {}",
                    value.len()
                ));
            }
        }
        if self.predicted_label.len() > MAX_LABEL_BYTES {
            return Err(format!(
                "predicted_label must be at most {MAX_LABEL_BYTES} bytes long, got {}",
                self.predicted_label.len()
            ));
        }
        if !(self.confidence.is_finite() && (0.0..=1.0).contains(&self.confidence)) {
            return Err(format!(
                "confidence must be between 0 and 1, got {}",
                self.confidence
            ));
        }
        if self.source.len() > MAX_SOURCE_BYTES {
            return Err(format!(
                "source must be at most {MAX_SOURCE_BYTES} bytes long, got {}",
                self.source.len()
            ));
        }
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        if self.sha256.len() != 64 || !self.sha256.bytes().all(hex) {
            return Err(format!(
                "sha256 {:?} must be 64 lowercase hex digits",
                self.sha256.chars().take(80).collect::<String>()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata() -> SampleMetadata {
        SampleMetadata {
            device_id: "pi-1".into(),
            model_name: "digit-cnn".into(),
            model_version: "1.0.0".into(),
            predicted_class: 3,
            predicted_label: "3".into(),
            confidence: 0.41,
            true_class: Some(5),
            source: "t10k-images-idx3-ubyte.gz#17".into(),
            device_time_ms: 1_700_000_000_000,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn query_pairs_name_every_field() {
        let pairs = metadata().query_pairs();
        let names: Vec<&str> = pairs.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "device_id",
                "model_name",
                "model_version",
                "predicted_class",
                "predicted_label",
                "confidence",
                "true_class",
                "source",
                "device_time_ms",
                "sha256"
            ]
        );
        assert!(pairs.contains(&("confidence", "0.41".into())));
        let unlabelled = SampleMetadata {
            true_class: None,
            ..metadata()
        };
        assert!(
            !unlabelled
                .query_pairs()
                .iter()
                .any(|(name, _)| *name == "true_class")
        );
    }

    #[test]
    fn validate_names_the_invalid_field() {
        assert_eq!(metadata().validate(), Ok(()));
        let cases = [
            (
                SampleMetadata {
                    model_name: String::new(),
                    ..metadata()
                },
                "model_name",
            ),
            (
                SampleMetadata {
                    confidence: 1.5,
                    ..metadata()
                },
                "confidence",
            ),
            (
                SampleMetadata {
                    confidence: f32::NAN,
                    ..metadata()
                },
                "confidence",
            ),
            (
                SampleMetadata {
                    sha256: "AB".repeat(32),
                    ..metadata()
                },
                "sha256",
            ),
            (
                SampleMetadata {
                    device_id: "a/b".into(),
                    ..metadata()
                },
                "device id",
            ),
            (
                SampleMetadata {
                    source: "x".repeat(MAX_SOURCE_BYTES + 1),
                    ..metadata()
                },
                "source",
            ),
        ];
        for (metadata, expected) in cases {
            let error = metadata.validate().unwrap_err();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
