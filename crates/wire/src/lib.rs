//! MQTT topics and payloads shared by the device agent, the fleet server and third-party
//! subscribers.
//!
//! Every payload starts with one byte that names its encoding and schema version:
//! [`SCHEMA_POSTCARD_V1`] followed by a postcard body, or [`SCHEMA_JSON_V1`] followed by
//! UTF-8 JSON of the same structure. `docs/wire.md` describes the layout field by field
//! for subscribers that are not written in Rust.

mod command;
mod histogram;
pub mod sample;
pub mod topic;

use serde::{Deserialize, Serialize};

pub use command::{
    Command, ConfigAck, Event, EventKind, InstallBundle, RemoteConfig, UpdateEvent, UpdateStage,
};
pub use histogram::LatencyHistogram;

/// First payload byte of a postcard-encoded message, schema version 1.
pub const SCHEMA_POSTCARD_V1: u8 = 1;

/// First payload byte of a JSON-encoded message, schema version 1. It is `{` so that a
/// JSON payload still reads as plain JSON to tools that ignore the prefix.
pub const SCHEMA_JSON_V1: u8 = b'{';

/// Largest payload either side accepts; larger messages are rejected before decoding.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// Errors from encoding or decoding a payload.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("payload is empty")]
    Empty,
    #[error("payload is {size} bytes, larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("unknown schema byte {0:#04x}: expected 0x01 (postcard v1) or '{{' (JSON v1)")]
    UnknownSchema(u8),
    #[error("invalid postcard body")]
    Postcard(#[from] postcard::Error),
    #[error("invalid JSON body")]
    Json(#[from] serde_json::Error),
}

/// Encoding chosen by a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Compact binary, the default on devices.
    #[default]
    Postcard,
    /// Readable by any subscriber, about four times larger.
    Json,
}

/// Name and version of the model a device runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

/// Host measurements taken when a telemetry message is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemStats {
    /// Whole-machine CPU use in percent of all cores, 0 to 100.
    pub cpu_percent: f32,
    /// Resident memory of the agent process in bytes.
    pub process_memory_bytes: u64,
    /// Memory in use on the machine in bytes.
    pub memory_used_bytes: u64,
    /// Memory installed on the machine in bytes.
    pub memory_total_bytes: u64,
    /// Hottest temperature sensor in degrees Celsius, when the machine exposes one.
    pub temperature_celsius: Option<f32>,
}

/// Record of what a device did during one telemetry interval, published on
/// `fleet/v1/{device}/telemetry` at QoS 1.
///
/// Counters cover only this interval, so the server sums messages and must store each
/// (`device_id`, `seq`) pair once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub device_id: String,
    /// Per-device sequence number, starting at 1 and increasing by one per message,
    /// kept across restarts of the agent.
    pub seq: u64,
    /// Device clock when the message was built, milliseconds since the Unix epoch.
    pub device_time_ms: u64,
    /// Length of the interval the counters cover, in milliseconds.
    pub interval_ms: u32,
    pub model: ModelRef,
    /// Inferences completed in the interval.
    pub inferences: u32,
    /// Inputs that could not be used (an image that does not decode, for example).
    pub input_errors: u32,
    /// Inferences whose input carried a ground-truth label.
    pub labeled: u32,
    /// Labelled inferences whose top-1 class matched the label.
    pub correct: u32,
    /// Sum of the top-1 confidences, so the server can average across messages.
    pub confidence_sum: f32,
    /// Inferences whose top-1 confidence was under the agent's threshold.
    pub low_confidence: u32,
    pub latency: LatencyHistogram,
    pub system: SystemStats,
}

/// Whether a device is connected, published retained on `fleet/v1/{device}/status`.
///
/// The agent registers an `Offline` message as its MQTT last will, so the broker publishes
/// it when the connection drops without a clean goodbye.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub device_id: String,
    pub state: DeviceState,
    /// The model loaded when the status was published; `None` in a last will.
    pub model: Option<ModelRef>,
    /// Version of the agent binary.
    pub agent_version: String,
    /// Device clock when the status was built, milliseconds since the Unix epoch.
    pub device_time_ms: u64,
}

/// Connection state in a [`Status`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    Online,
    Offline,
}

/// MQTT user name and password. `Debug` leaves the password out, so it never reaches a
/// log line.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttCredentials {
    pub username: String,
    pub password: String,
}

impl MqttCredentials {
    /// Takes the password from the first line of `password_file`, which keeps it out of
    /// command lines and config files.
    pub fn read(username: String, password_file: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(password_file).map_err(|error| {
            format!(
                "failed to read password file {}: {error}",
                password_file.display()
            )
        })?;
        let password = text.lines().next().unwrap_or_default().to_string();
        if password.is_empty() {
            return Err(format!(
                "password file {} is empty",
                password_file.display()
            ));
        }
        Ok(MqttCredentials { username, password })
    }
}

impl std::fmt::Debug for MqttCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttCredentials")
            .field("username", &self.username)
            .field("password", &"***")
            .finish()
    }
}

/// Parses a broker address given as `mqtt://HOST:PORT`, `tcp://HOST:PORT` or
/// `HOST:PORT` into host and port.
pub fn parse_broker_url(url: &str) -> Result<(String, u16), String> {
    let address = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(url)
        .trim_end_matches('/');
    if address.contains("://") {
        return Err(format!(
            "invalid broker URL {url:?}: only mqtt:// is supported"
        ));
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "invalid broker URL {url:?}: expected mqtt://HOST:PORT"
        ));
    };
    let port = port
        .parse()
        .map_err(|_| format!("invalid port in broker URL {url:?}"))?;
    let host = host.trim_matches(['[', ']']);
    if host.is_empty() {
        return Err(format!("invalid broker URL {url:?}: the host is empty"));
    }
    Ok((host.to_string(), port))
}

/// Encodes a message with its schema prefix.
pub fn encode<T: Serialize>(message: &T, encoding: Encoding) -> Result<Vec<u8>, WireError> {
    match encoding {
        Encoding::Postcard => {
            let mut bytes = vec![SCHEMA_POSTCARD_V1];
            bytes.extend(postcard::to_stdvec(message)?);
            Ok(bytes)
        }
        Encoding::Json => Ok(serde_json::to_vec(message)?),
    }
}

/// Decodes a message, choosing postcard or JSON by the first byte.
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, WireError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(WireError::TooLarge {
            size: payload.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    match payload.first() {
        None => Err(WireError::Empty),
        Some(&SCHEMA_POSTCARD_V1) => Ok(postcard::from_bytes(&payload[1..])?),
        Some(&SCHEMA_JSON_V1) => Ok(serde_json::from_slice(payload)?),
        Some(&other) => Err(WireError::UnknownSchema(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_telemetry() -> Telemetry {
        let mut latency = LatencyHistogram::default();
        for micros in [180, 220, 250, 900, 15_000] {
            latency.record_micros(micros);
        }
        Telemetry {
            device_id: "jetson-07".into(),
            seq: 42,
            device_time_ms: 1_796_000_000_000,
            interval_ms: 2_000,
            model: ModelRef {
                name: "digit-cnn".into(),
                version: "1.0.0".into(),
            },
            inferences: 5,
            input_errors: 1,
            labeled: 5,
            correct: 4,
            confidence_sum: 4.71,
            low_confidence: 1,
            latency,
            system: SystemStats {
                cpu_percent: 37.5,
                process_memory_bytes: 41_000_000,
                memory_used_bytes: 2_100_000_000,
                memory_total_bytes: 8_000_000_000,
                temperature_celsius: Some(51.0),
            },
        }
    }

    #[test]
    fn postcard_round_trip() {
        let telemetry = sample_telemetry();
        let bytes = encode(&telemetry, Encoding::Postcard).unwrap();
        assert_eq!(bytes[0], SCHEMA_POSTCARD_V1);
        assert_eq!(decode::<Telemetry>(&bytes).unwrap(), telemetry);
    }

    #[test]
    fn json_round_trip() {
        let telemetry = sample_telemetry();
        let bytes = encode(&telemetry, Encoding::Json).unwrap();
        assert_eq!(bytes[0], b'{');
        assert_eq!(decode::<Telemetry>(&bytes).unwrap(), telemetry);
    }

    #[test]
    fn postcard_is_much_smaller_than_json() {
        let telemetry = sample_telemetry();
        let postcard = encode(&telemetry, Encoding::Postcard).unwrap().len();
        let json = encode(&telemetry, Encoding::Json).unwrap().len();
        assert!(
            postcard * 4 <= json,
            "postcard {postcard} bytes, json {json} bytes"
        );
    }

    #[test]
    fn decode_rejects_bad_payloads() {
        assert!(matches!(decode::<Telemetry>(&[]), Err(WireError::Empty)));
        assert!(matches!(
            decode::<Telemetry>(&[7, 1, 2]),
            Err(WireError::UnknownSchema(7))
        ));
        assert!(matches!(
            decode::<Telemetry>(&[SCHEMA_POSTCARD_V1, 3]),
            Err(WireError::Postcard(_))
        ));
        let oversized = vec![SCHEMA_POSTCARD_V1; MAX_PAYLOAD_BYTES + 1];
        assert!(matches!(
            decode::<Telemetry>(&oversized),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn broker_urls() {
        let parse = parse_broker_url;
        assert_eq!(
            parse("mqtt://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".into(), 1883)
        );
        assert_eq!(parse("localhost:9").unwrap(), ("localhost".into(), 9));
        assert_eq!(parse("mqtt://[::1]:1883/").unwrap(), ("::1".into(), 1883));
        assert!(parse("mqtt://nohost").is_err());
        assert!(parse("http://host:80").is_err());
        assert!(parse("mqtt://:1883").is_err());
        assert!(parse("mqtt://host:99999").is_err());
    }

    #[test]
    fn truncated_postcard_is_an_error() {
        let bytes = encode(&sample_telemetry(), Encoding::Postcard).unwrap();
        for cut in 1..bytes.len() {
            assert!(
                decode::<Telemetry>(&bytes[..cut]).is_err(),
                "a payload cut to {cut} bytes decoded"
            );
        }
    }
}
