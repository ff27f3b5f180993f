//! MQTT topic names, versioned and with the device id as one level.

/// Prefix of every topic the fleet uses.
pub const PREFIX: &str = "fleet/v1";

/// Kinds of topic under `fleet/v1/{device}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Device to server, QoS 1.
    Telemetry,
    /// Retained connection state, with an offline last will.
    Status,
    /// Update progress and errors, device to server.
    Events,
    /// Server to device commands, QoS 1.
    Command,
}

impl TopicKind {
    fn suffix(self) -> &'static str {
        match self {
            TopicKind::Telemetry => "telemetry",
            TopicKind::Status => "status",
            TopicKind::Events => "events",
            TopicKind::Command => "cmd",
        }
    }
}

/// Returns the topic of one device, for example `fleet/v1/jetson-07/telemetry`.
pub fn device_topic(device_id: &str, kind: TopicKind) -> String {
    format!("{PREFIX}/{device_id}/{}", kind.suffix())
}

/// Returns the filter that matches one kind of topic for every device.
pub fn all_devices(kind: TopicKind) -> String {
    format!("{PREFIX}/+/{}", kind.suffix())
}

/// Splits a topic into its device id and kind, or `None` when it is not a fleet topic.
pub fn parse(topic: &str) -> Option<(&str, TopicKind)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let (device_id, suffix) = rest.split_once('/')?;
    let kind = match suffix {
        "telemetry" => TopicKind::Telemetry,
        "status" => TopicKind::Status,
        "events" => TopicKind::Events,
        "cmd" => TopicKind::Command,
        _ => return None,
    };
    (!device_id.is_empty()).then_some((device_id, kind))
}

/// Checks that a device id can be used as one topic level: 1 to 64 characters from
/// ASCII letters, digits, `-`, `_` and `.`, so it never contains MQTT wildcards or `/`.
pub fn validate_device_id(device_id: &str) -> Result<(), String> {
    if device_id.is_empty() || device_id.len() > 64 {
        return Err(format!(
            "device id {device_id:?} must be 1 to 64 characters long"
        ));
    }
    if let Some(bad) = device_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "device id {device_id:?} contains {bad:?}; use letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        for kind in [
            TopicKind::Telemetry,
            TopicKind::Status,
            TopicKind::Events,
            TopicKind::Command,
        ] {
            let topic = device_topic("pi-4", kind);
            assert_eq!(parse(&topic), Some(("pi-4", kind)));
        }
    }

    #[test]
    fn parse_rejects_foreign_topics() {
        assert_eq!(parse("fleet/v2/pi/telemetry"), None);
        assert_eq!(parse("fleet/v1//telemetry"), None);
        assert_eq!(parse("fleet/v1/pi/other"), None);
        assert_eq!(parse("fleet/v1/pi/telemetry/extra"), None);
    }

    #[test]
    fn device_ids_cannot_hold_wildcards() {
        assert!(validate_device_id("jetson_07.lab-a").is_ok());
        for bad in ["", "a/b", "a+b", "a#", &"x".repeat(65)] {
            assert!(validate_device_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
