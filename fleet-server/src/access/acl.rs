//! Topic rules: what each kind of broker client may publish and subscribe to.
//!
//! The embedded broker's proxy applies [`may_publish`] and [`may_subscribe`] to every
//! packet, and [`super::mosquitto::acl_file`] writes the same rules in Mosquitto's ACL
//! syntax, so both brokers enforce one policy:
//!
//! - a device publishes telemetry, status and events under its own id only, and
//!   subscribes to its own command topic only;
//! - an ingester (a fleet server replica) subscribes to every device's telemetry,
//!   status and events, also through a shared subscription, and publishes commands.

use fleet_wire::topic::{self, TopicKind};

use super::Principal;

/// Kinds of topic a device publishes to.
pub const DEVICE_PUBLISHES: [TopicKind; 3] =
    [TopicKind::Telemetry, TopicKind::Status, TopicKind::Events];

/// Returns whether `principal` may publish to `topic`.
pub fn may_publish(principal: &Principal, topic: &str) -> bool {
    let Some((device_id, kind)) = topic::parse(topic) else {
        return false;
    };
    match principal {
        Principal::Device { id } => device_id == id && DEVICE_PUBLISHES.contains(&kind),
        Principal::Ingester { .. } => kind == TopicKind::Command && !has_wildcard(device_id),
        Principal::Operator { .. } => false,
    }
}

/// Returns whether `principal` may subscribe to `filter`.
pub fn may_subscribe(principal: &Principal, filter: &str) -> bool {
    match principal {
        Principal::Device { id } => filter == topic::device_topic(id, TopicKind::Command),
        Principal::Ingester { .. } => {
            let filter = strip_shared_group(filter);
            match topic::parse(filter) {
                Some((device_id, kind)) => {
                    DEVICE_PUBLISHES.contains(&kind)
                        && (device_id == "+" || !has_wildcard(device_id))
                }
                None => false,
            }
        }
        Principal::Operator { .. } => false,
    }
}

/// Returns `filter` without a `$share/GROUP/` prefix.
fn strip_shared_group(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_group, rest)| rest)
}

fn has_wildcard(level: &str) -> bool {
    level.contains(['+', '#'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str) -> Principal {
        Principal::Device { id: id.into() }
    }

    fn ingester() -> Principal {
        Principal::Ingester {
            name: "fleet-server".into(),
        }
    }

    #[test]
    fn device_publishes_only_under_its_id() {
        let cam = device("cam-1");
        for topic in [
            "fleet/v1/cam-1/telemetry",
            "fleet/v1/cam-1/status",
            "fleet/v1/cam-1/events",
        ] {
            assert!(may_publish(&cam, topic), "{topic}");
        }
        for topic in [
            "fleet/v1/cam-2/telemetry",
            "fleet/v1/cam-1/cmd",
            "fleet/v1/cam-1/other",
            "fleet/v1/cam-1",
            "other/cam-1/telemetry",
        ] {
            assert!(!may_publish(&cam, topic), "{topic}");
        }
    }

    #[test]
    fn device_subscribes_only_to_its_commands() {
        let cam = device("cam-1");
        assert!(may_subscribe(&cam, "fleet/v1/cam-1/cmd"));
        for filter in [
            "fleet/v1/cam-2/cmd",
            "fleet/v1/+/cmd",
            "fleet/v1/#",
            "#",
            "fleet/v1/cam-1/telemetry",
            "$share/g/fleet/v1/cam-1/cmd",
        ] {
            assert!(!may_subscribe(&cam, filter), "{filter}");
        }
    }

    #[test]
    fn ingester_reads_devices_and_sends_commands() {
        let server = ingester();
        for filter in [
            "fleet/v1/+/telemetry",
            "fleet/v1/+/status",
            "fleet/v1/+/events",
            "$share/fleet/fleet/v1/+/telemetry",
            "fleet/v1/cam-1/telemetry",
        ] {
            assert!(may_subscribe(&server, filter), "{filter}");
        }
        for filter in ["#", "fleet/v1/+/cmd", "fleet/v1/#", "fleet/v1/ca+/status"] {
            assert!(!may_subscribe(&server, filter), "{filter}");
        }
        assert!(may_publish(&server, "fleet/v1/cam-1/cmd"));
        assert!(!may_publish(&server, "fleet/v1/cam-1/telemetry"));
    }

    #[test]
    fn operators_have_no_broker_rights() {
        let operator = Principal::Operator {
            name: "alice".into(),
        };
        assert!(!may_publish(&operator, "fleet/v1/cam-1/cmd"));
        assert!(!may_subscribe(&operator, "fleet/v1/+/telemetry"));
    }
}
