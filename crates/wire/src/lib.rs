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
    Command, ConfigAck, Event, EventKind, InstallBundle, MIN_RATE, RemoteConfig, UpdateEvent,
    UpdateStage, decode_command,
};
pub use histogram::LatencyHistogram;

/// First payload byte of a postcard-encoded message, schema version 1.
pub const SCHEMA_POSTCARD_V1: u8 = 1;

/// First payload byte of a JSON-encoded message, schema version 1. It is `{` so that a
/// JSON payload still reads as plain JSON to tools that ignore the prefix.
pub const SCHEMA_JSON_V1: u8 = b'{';

/// MQTT 5 content type of postcard payloads. postcard has no registered media type, so
/// this is a vendor type that names the schema version as well.
pub const CONTENT_TYPE_POSTCARD: &str = "application/vnd.fleet.v1+postcard";

/// MQTT 5 content type of JSON payloads.
pub const CONTENT_TYPE_JSON: &str = "application/json";

/// Returns the MQTT 5 content type of an encoded payload, read from its first byte, so a
/// payload stored before a change of encoding is still labelled right.
pub fn content_type(payload: &[u8]) -> &'static str {
    match payload.first() {
        Some(&SCHEMA_JSON_V1) => CONTENT_TYPE_JSON,
        _ => CONTENT_TYPE_POSTCARD,
    }
}

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
    /// Requests of the local inference API sent to the cloud, and why. Agents older than
    /// this field do not send it; [`decode_telemetry`] then fills it with zeros.
    #[serde(default)]
    pub fallback: FallbackCounts,
}

/// Cloud fallback counters of the local inference API during one telemetry interval.
///
/// Each reason counts the requests forwarded to the cloud for it, whether or not the
/// cloud then responded. The last two count requests served locally because the
/// cloud failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FallbackCounts {
    /// The local model failed.
    pub local_error: u32,
    /// More requests were running locally than the agent allows.
    pub overloaded: u32,
    /// The recent local latency was over the agent's objective.
    pub slow: u32,
    /// The lowest top-1 confidence in the batch was under the fallback threshold.
    pub low_confidence: u32,
    /// The circuit breaker was open, or the request to the cloud failed, timed out, or
    /// returned 5xx or 429.
    pub cloud_unavailable: u32,
    /// The cloud returned another 4xx status, such as 401 or 404.
    pub cloud_rejected: u32,
}

impl FallbackCounts {
    /// Returns the number of requests forwarded to the cloud.
    pub fn requests(&self) -> u32 {
        self.local_error
            .saturating_add(self.overloaded)
            .saturating_add(self.slow)
            .saturating_add(self.low_confidence)
    }
}

/// [`Telemetry`] as agents sent it before `fallback` was appended, kept to decode their
/// postcard payloads.
#[derive(Deserialize)]
struct TelemetryWithoutFallback {
    device_id: String,
    seq: u64,
    device_time_ms: u64,
    interval_ms: u32,
    model: ModelRef,
    inferences: u32,
    input_errors: u32,
    labeled: u32,
    correct: u32,
    confidence_sum: f32,
    low_confidence: u32,
    latency: LatencyHistogram,
    system: SystemStats,
}

impl From<TelemetryWithoutFallback> for Telemetry {
    fn from(old: TelemetryWithoutFallback) -> Telemetry {
        Telemetry {
            device_id: old.device_id,
            seq: old.seq,
            device_time_ms: old.device_time_ms,
            interval_ms: old.interval_ms,
            model: old.model,
            inferences: old.inferences,
            input_errors: old.input_errors,
            labeled: old.labeled,
            correct: old.correct,
            confidence_sum: old.confidence_sum,
            low_confidence: old.low_confidence,
            latency: old.latency,
            system: old.system,
            fallback: FallbackCounts::default(),
        }
    }
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
///
/// Telemetry should go through [`decode_telemetry`], which also accepts the postcard
/// layout of older agents.
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, WireError> {
    check_size(payload)?;
    match payload.first() {
        None => Err(WireError::Empty),
        Some(&SCHEMA_POSTCARD_V1) => Ok(postcard::from_bytes(&payload[1..])?),
        Some(&SCHEMA_JSON_V1) => Ok(serde_json::from_slice(payload)?),
        Some(&other) => Err(WireError::UnknownSchema(other)),
    }
}

/// Decodes a telemetry message from an agent of any version.
///
/// postcard ignores trailing bytes, so older servers read newer agents' messages and
/// skip the appended fields. The other way round, a postcard body that ends before
/// `fallback` fails to decode, and is decoded again in the layout without it, with the
/// counts as zeros. JSON fills the missing field with zeros through `serde(default)`.
pub fn decode_telemetry(payload: &[u8]) -> Result<Telemetry, WireError> {
    match decode::<Telemetry>(payload) {
        Err(WireError::Postcard(error)) => {
            // The old layout must use up the whole body: a new-layout body cut inside
            // `fallback` also decodes as the old layout, with bytes left over.
            match postcard::take_from_bytes::<TelemetryWithoutFallback>(&payload[1..]) {
                Ok((old, [])) => Ok(old.into()),
                // The error of the current layout is the one worth reporting.
                _ => Err(WireError::Postcard(error)),
            }
        }
        other => other,
    }
}

fn check_size(payload: &[u8]) -> Result<(), WireError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(WireError::TooLarge {
            size: payload.len(),
            limit: MAX_PAYLOAD_BYTES,
        });
    }
    Ok(())
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
            fallback: FallbackCounts {
                local_error: 1,
                overloaded: 2,
                slow: 3,
                low_confidence: 4,
                cloud_unavailable: 5,
                cloud_rejected: 6,
            },
        }
    }

    /// Encodes `telemetry` in the layout of agents older than `fallback`.
    fn encode_without_fallback(telemetry: &Telemetry, encoding: Encoding) -> Vec<u8> {
        #[derive(Serialize)]
        struct Old<'a> {
            device_id: &'a str,
            seq: u64,
            device_time_ms: u64,
            interval_ms: u32,
            model: &'a ModelRef,
            inferences: u32,
            input_errors: u32,
            labeled: u32,
            correct: u32,
            confidence_sum: f32,
            low_confidence: u32,
            latency: &'a LatencyHistogram,
            system: &'a SystemStats,
        }
        let old = Old {
            device_id: &telemetry.device_id,
            seq: telemetry.seq,
            device_time_ms: telemetry.device_time_ms,
            interval_ms: telemetry.interval_ms,
            model: &telemetry.model,
            inferences: telemetry.inferences,
            input_errors: telemetry.input_errors,
            labeled: telemetry.labeled,
            correct: telemetry.correct,
            confidence_sum: telemetry.confidence_sum,
            low_confidence: telemetry.low_confidence,
            latency: &telemetry.latency,
            system: &telemetry.system,
        };
        encode(&old, encoding).unwrap()
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
    fn truncated_postcard_is_an_error() {
        let bytes = encode(&sample_telemetry(), Encoding::Postcard).unwrap();
        for cut in 1..bytes.len() {
            assert!(
                decode::<Telemetry>(&bytes[..cut]).is_err(),
                "a payload cut to {cut} bytes decoded"
            );
        }
        // Cut inside the old layout or inside `fallback`, the compatible decoder fails
        // too. Cut exactly after the old layout, the body is an old agent's message.
        let old_len = encode_without_fallback(&sample_telemetry(), Encoding::Postcard).len();
        for cut in (1..bytes.len()).filter(|&cut| cut != old_len) {
            assert!(
                decode_telemetry(&bytes[..cut]).is_err(),
                "a payload cut to {cut} bytes decoded"
            );
        }
    }

    #[test]
    fn old_postcard_telemetry_decodes_with_zero_fallbacks() {
        let telemetry = sample_telemetry();
        let old = encode_without_fallback(&telemetry, Encoding::Postcard);
        assert!(decode::<Telemetry>(&old).is_err());

        let decoded = decode_telemetry(&old).unwrap();
        assert_eq!(decoded.fallback, FallbackCounts::default());
        assert_eq!(
            decoded,
            Telemetry {
                fallback: FallbackCounts::default(),
                ..telemetry
            }
        );
    }

    #[test]
    fn old_json_telemetry_decodes_with_zero_fallbacks() {
        let telemetry = sample_telemetry();
        let old = encode_without_fallback(&telemetry, Encoding::Json);
        let decoded = decode_telemetry(&old).unwrap();
        assert_eq!(decoded.fallback, FallbackCounts::default());
        assert_eq!(decoded.seq, telemetry.seq);
    }

    #[test]
    fn new_telemetry_round_trips_through_the_compatible_decoder() {
        let telemetry = sample_telemetry();
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(&telemetry, encoding).unwrap();
            assert_eq!(decode_telemetry(&bytes).unwrap(), telemetry, "{encoding:?}");
        }
    }

    #[test]
    fn new_postcard_telemetry_reads_in_the_old_layout() {
        // What a server built before `fallback` existed does with a new agent's message.
        let telemetry = sample_telemetry();
        let bytes = encode(&telemetry, Encoding::Postcard).unwrap();
        let old: TelemetryWithoutFallback = postcard::from_bytes(&bytes[1..]).unwrap();
        assert_eq!(old.seq, telemetry.seq);
        assert_eq!(old.system, telemetry.system);
    }

    #[test]
    fn fallback_requests_sum_the_reasons() {
        assert_eq!(sample_telemetry().fallback.requests(), 10);
    }
}
