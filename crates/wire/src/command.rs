//! Commands the server sends on `fleet/v1/{device}/cmd` (install a bundle, set remote
//! configuration) and the events a device publishes on `fleet/v1/{device}/events`
//! (update progress, configuration acknowledgements).
//!
//! A device judges an update by the archive's SHA-256, not by its version string. A
//! command for the archive it already runs completes at once. A command for a new
//! archive runs every stage, even when it carries an old version number.

use serde::{Deserialize, Serialize};

use crate::{WireError, decode};

/// Server-to-device command, published at QoS 1 on `fleet/v1/{device}/cmd`.
///
/// Postcard encodes the variant by index, so new commands are added at the end. JSON
/// names it as the only key, as in `{"install_bundle": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Download, verify, check and switch to a bundle archive.
    InstallBundle(InstallBundle),
    /// Replace the settings the server overrides on the device.
    SetConfig(RemoteConfig),
}

/// Settings the fleet server sets on a device, each overriding the agent's own flag or
/// config-file value. The message carries the whole set: a field left out goes back to
/// the agent's own value, so a device that missed earlier changes still converges.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// Id of this set, repeated in the device's acknowledgement.
    #[serde(default)]
    pub change_id: String,
    /// Top-1 confidence under which an inference counts as low-confidence, 0 to 1.
    #[serde(default)]
    pub confidence_threshold: Option<f32>,
    /// Seconds between telemetry messages, 0.05 to 3600.
    #[serde(default)]
    pub interval_seconds: Option<f64>,
    /// Inferences per second, 0 for as fast as the model allows.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Backlog records sent per second at most, above 0.
    #[serde(default)]
    pub drain_rate: Option<f64>,
    /// Seconds an update may wait for the commit, 1 to 86400.
    #[serde(default)]
    pub commit_timeout_seconds: Option<f64>,
    /// Top-1 confidence under which the local inference API sends a request to the cloud,
    /// 0 to 1. Appended last: see [`decode_command`] for older servers.
    #[serde(default)]
    pub fallback_threshold: Option<f32>,
}

/// Slowest inference rate a device accepts, one per 100 s; slower rates are almost
/// certainly a unit mistake.
pub const MIN_RATE: f64 = 0.01;

impl RemoteConfig {
    /// Checks every value against its range; the error names the first field outside it.
    pub fn validate(&self) -> Result<(), String> {
        within(
            "confidence_threshold",
            self.confidence_threshold,
            0.0,
            1.0,
            false,
        )?;
        within(
            "interval_seconds",
            self.interval_seconds,
            0.05,
            3600.0,
            false,
        )?;
        within("rate", self.rate, 0.0, f64::MAX, false)?;
        if let Some(rate) = self.rate.filter(|&rate| rate > 0.0 && rate < MIN_RATE) {
            return Err(format!(
                "invalid rate {rate}: expected 0 (unthrottled) or at least {MIN_RATE} per second"
            ));
        }
        within("drain_rate", self.drain_rate, 0.0, f64::MAX, true)?;
        within(
            "commit_timeout_seconds",
            self.commit_timeout_seconds,
            1.0,
            86_400.0,
            false,
        )?;
        within(
            "fallback_threshold",
            self.fallback_threshold,
            0.0,
            1.0,
            false,
        )
    }
}

/// Decodes a command from a fleet server of any version.
///
/// postcard ignores trailing bytes, so older agents read newer servers' commands and skip
/// fields appended since. A `SetConfig` body from a server older than
/// `fallback_threshold` ends before that field, and is decoded again with `None`
/// appended, which postcard writes as one zero byte.
pub fn decode_command(payload: &[u8]) -> Result<Command, WireError> {
    match decode::<Command>(payload) {
        Err(WireError::Postcard(error)) => {
            let mut body = payload[1..].to_vec();
            body.push(0);
            match postcard::take_from_bytes::<Command>(&body) {
                Ok((command @ Command::SetConfig(_), [])) => Ok(command),
                // The error of the current layout is the one worth reporting.
                _ => Err(WireError::Postcard(error)),
            }
        }
        other => other,
    }
}

/// Checks that `value`, when set, is finite and in `low..=high` (above `low` with
/// `exclusive_low`). The error shows the value as its own type prints it, so an `f32` of
/// -0.1 reads -0.1.
fn within<T: Copy + Into<f64> + std::fmt::Display>(
    name: &str,
    value: Option<T>,
    low: f64,
    high: f64,
    exclusive_low: bool,
) -> Result<(), String> {
    let Some(value) = value else {
        return Ok(());
    };
    let number: f64 = value.into();
    if !number.is_finite() || number < low || number > high || (exclusive_low && number == low) {
        return Err(format!(
            "invalid {name} {value}: expected {}",
            range(low, high, exclusive_low)
        ));
    }
    Ok(())
}

fn range(low: f64, high: f64, exclusive_low: bool) -> String {
    match (high == f64::MAX, exclusive_low) {
        (true, true) => format!("a number above {low}"),
        (true, false) => format!("a number of {low} or more"),
        (false, _) => format!("{low} to {high}"),
    }
}

/// Location, size and hash of a bundle archive to install.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallBundle {
    /// Id of the rollout this command belongs to, repeated in every event about it.
    pub update_id: String,
    /// Bundle name and version from its manifest, for logs and the console.
    pub name: String,
    pub version: String,
    /// `http://` URL of the archive on the fleet server. The device fetches it with its
    /// own credential and only from the server it was configured with.
    pub url: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the archive.
    pub sha256: String,
}

/// Device-to-server event, published at QoS 1 on `fleet/v1/{device}/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device_id: String,
    /// Device clock when the event happened, milliseconds since the Unix epoch.
    pub device_time_ms: u64,
    pub kind: EventKind,
}

/// Content of an [`Event`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// One stage of an update, in the order listed by [`UpdateStage`].
    Update(UpdateEvent),
    /// The outcome of a [`Command::SetConfig`].
    Config(ConfigAck),
}

/// A device's acknowledgement of a [`RemoteConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigAck {
    pub change_id: String,
    /// Whether the settings were stored and are in use; false when the device rejected
    /// them and kept its previous settings.
    pub applied: bool,
    /// The settings in use after the change, or why it was rejected.
    pub detail: String,
}

/// Progress of one update on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateEvent {
    /// The command's `update_id`; empty for a rollback the agent decided on at start-up
    /// without knowing the rollout.
    pub update_id: String,
    /// SHA-256 of the archive the event is about.
    pub sha256: String,
    /// Bundle version the event is about.
    pub version: String,
    pub stage: UpdateStage,
    /// Human-readable detail: sizes and times on success, the cause on failure.
    pub detail: String,
}

/// Stages of an update. `Committed` and `AlreadyInstalled` end a successful update;
/// `Failed` ends one that never switched, `RolledBack` one that switched and went back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateStage {
    /// The command was accepted and the download starts.
    Accepted,
    /// The archive is on the device with the right size and SHA-256.
    Downloaded,
    /// The bundle's signature and every file's hash checked out.
    Verified,
    /// The model loaded and reproduced the reference outputs carried in the bundle.
    HealthChecked,
    /// The device runs the new model; the previous one is kept until commit.
    Switched,
    /// Telemetry from the new model reached the broker; the update is final.
    Committed,
    /// The device already runs this archive; nothing changed.
    AlreadyInstalled,
    /// The update stopped before the switch; the device still runs its previous model.
    Failed,
    /// The device went back to its previous model after the switch.
    RolledBack,
}

impl UpdateStage {
    /// Returns whether no further event follows for the same update.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpdateStage::Committed
                | UpdateStage::AlreadyInstalled
                | UpdateStage::Failed
                | UpdateStage::RolledBack
        )
    }

    /// Returns the stage's name as written in JSON and in the fleet server's database.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStage::Accepted => "accepted",
            UpdateStage::Downloaded => "downloaded",
            UpdateStage::Verified => "verified",
            UpdateStage::HealthChecked => "health_checked",
            UpdateStage::Switched => "switched",
            UpdateStage::Committed => "committed",
            UpdateStage::AlreadyInstalled => "already_installed",
            UpdateStage::Failed => "failed",
            UpdateStage::RolledBack => "rolled_back",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Encoding, decode, encode};

    fn install() -> Command {
        Command::InstallBundle(InstallBundle {
            update_id: "u-17".into(),
            name: "digit-cnn".into(),
            version: "1.1.0".into(),
            url: "http://fleet.local:8080/api/bundles/ab12/archive".into(),
            size: 1_234_567,
            sha256: "ab12".repeat(16),
        })
    }

    #[test]
    fn commands_round_trip_in_both_encodings() {
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(&install(), encoding).unwrap();
            assert_eq!(decode::<Command>(&bytes).unwrap(), install());
        }
        let json = String::from_utf8(encode(&install(), Encoding::Json).unwrap()).unwrap();
        assert!(json.starts_with(r#"{"install_bundle":{"#), "{json}");
    }

    #[test]
    fn events_round_trip_and_name_their_stage() {
        let event = Event {
            device_id: "jetson-07".into(),
            device_time_ms: 1_796_000_000_000,
            kind: EventKind::Update(UpdateEvent {
                update_id: "u-17".into(),
                sha256: "cd34".repeat(16),
                version: "1.1.0".into(),
                stage: UpdateStage::HealthChecked,
                detail: "4 reference inputs matched".into(),
            }),
        };
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(&event, encoding).unwrap();
            assert_eq!(decode::<Event>(&bytes).unwrap(), event);
        }
        let json = String::from_utf8(encode(&event, Encoding::Json).unwrap()).unwrap();
        assert!(json.contains(r#""stage":"health_checked""#), "{json}");
    }

    #[test]
    fn remote_config_ranges_are_checked() {
        let valid = RemoteConfig {
            change_id: "c-1".into(),
            confidence_threshold: Some(0.7),
            interval_seconds: Some(2.0),
            rate: Some(0.0),
            drain_rate: Some(5.0),
            commit_timeout_seconds: None,
            fallback_threshold: Some(0.4),
        };
        assert_eq!(valid.validate(), Ok(()));
        let cases = [
            (
                RemoteConfig {
                    confidence_threshold: Some(1.5),
                    ..valid.clone()
                },
                "confidence_threshold",
            ),
            (
                RemoteConfig {
                    interval_seconds: Some(0.0),
                    ..valid.clone()
                },
                "interval_seconds",
            ),
            (
                RemoteConfig {
                    rate: Some(f64::NAN),
                    ..valid.clone()
                },
                "rate",
            ),
            (
                RemoteConfig {
                    rate: Some(1e-300),
                    ..valid.clone()
                },
                "rate",
            ),
            (
                RemoteConfig {
                    drain_rate: Some(0.0),
                    ..valid.clone()
                },
                "drain_rate",
            ),
            (
                RemoteConfig {
                    commit_timeout_seconds: Some(1e9),
                    ..valid.clone()
                },
                "commit_timeout_seconds",
            ),
            (
                RemoteConfig {
                    fallback_threshold: Some(-0.1),
                    ..valid.clone()
                },
                "fallback_threshold",
            ),
        ];
        for (config, field) in cases {
            let error = config.validate().unwrap_err();
            assert!(error.starts_with(&format!("invalid {field} ")), "{error}");
        }
        let error = RemoteConfig {
            fallback_threshold: Some(-0.1),
            ..valid
        }
        .validate()
        .unwrap_err();
        assert!(
            error.starts_with("invalid fallback_threshold -0.1: "),
            "{error}"
        );
    }

    #[test]
    fn set_config_round_trips() {
        let command = Command::SetConfig(RemoteConfig {
            change_id: "c-2".into(),
            rate: Some(3.0),
            ..RemoteConfig::default()
        });
        for encoding in [Encoding::Postcard, Encoding::Json] {
            let bytes = encode(&command, encoding).unwrap();
            assert_eq!(decode::<Command>(&bytes).unwrap(), command);
        }
    }

    #[test]
    fn set_config_from_older_server_decodes() {
        /// `RemoteConfig` as servers before `fallback_threshold` sent it.
        #[derive(Serialize)]
        struct OlderRemoteConfig {
            change_id: String,
            confidence_threshold: Option<f32>,
            interval_seconds: Option<f64>,
            rate: Option<f64>,
            drain_rate: Option<f64>,
            commit_timeout_seconds: Option<f64>,
        }
        #[derive(Serialize)]
        enum OlderCommand {
            #[allow(dead_code)]
            InstallBundle(InstallBundle),
            SetConfig(OlderRemoteConfig),
        }
        let older = OlderCommand::SetConfig(OlderRemoteConfig {
            change_id: "c-3".into(),
            confidence_threshold: Some(0.6),
            interval_seconds: None,
            rate: Some(2.0),
            drain_rate: None,
            commit_timeout_seconds: Some(30.0),
        });
        let bytes = encode(&older, Encoding::Postcard).unwrap();
        assert!(
            decode::<Command>(&bytes).is_err(),
            "the current layout needs the field"
        );
        let expected = Command::SetConfig(RemoteConfig {
            change_id: "c-3".into(),
            confidence_threshold: Some(0.6),
            rate: Some(2.0),
            commit_timeout_seconds: Some(30.0),
            ..RemoteConfig::default()
        });
        assert_eq!(decode_command(&bytes).unwrap(), expected);

        let current = Command::SetConfig(RemoteConfig {
            fallback_threshold: Some(0.3),
            ..RemoteConfig::default()
        });
        let bytes = encode(&current, Encoding::Postcard).unwrap();
        assert_eq!(decode_command(&bytes).unwrap(), current);
        let cut = &bytes[..bytes.len() - 3];
        assert!(decode_command(cut).is_err(), "a body cut inside a value");
    }

    #[test]
    fn only_end_stages_are_final() {
        assert!(UpdateStage::Committed.is_final());
        assert!(UpdateStage::RolledBack.is_final());
        assert!(!UpdateStage::Switched.is_final());
        assert!(!UpdateStage::Accepted.is_final());
    }
}
