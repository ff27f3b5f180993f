//! Over-the-air updates: the command the server sends on `fleet/v1/{device}/cmd` and the
//! progress events a device publishes on `fleet/v1/{device}/events`.
//!
//! A device judges an update by the archive's SHA-256, not by its version string. A
//! command for the archive it already runs completes at once. A command for a new
//! archive runs every stage, even when it carries an old version number.

use serde::{Deserialize, Serialize};

/// Server-to-device command, published at QoS 1 on `fleet/v1/{device}/cmd`.
///
/// Postcard encodes the variant by index, so new commands are added at the end. JSON
/// names it as the only key, as in `{"install_bundle": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Download, verify, check and switch to a bundle archive.
    InstallBundle(InstallBundle),
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
    fn only_end_stages_are_final() {
        assert!(UpdateStage::Committed.is_final());
        assert!(UpdateStage::RolledBack.is_final());
        assert!(!UpdateStage::Switched.is_final());
        assert!(!UpdateStage::Accepted.is_final());
    }
}
