//! Counters of remote configuration, registered with the server's other metrics.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::store::remote_config::AckOutcome;

/// Label set naming what an acknowledgement did to its device's configuration.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabel {
    pub outcome: AckOutcome,
}

impl EncodeLabelValue for AckOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        let value = match self {
            AckOutcome::Applied => "applied",
            AckOutcome::Rejected => "rejected",
            AckOutcome::Stale => "stale",
        };
        std::fmt::Write::write_str(encoder, value)
    }
}

/// Counters of configuration commands and acknowledgements.
#[derive(Debug)]
pub struct ConfigMetrics {
    acks: Family<AckLabel, Counter>,
    /// Configuration commands handed to the MQTT client, first sends and resends.
    pub commands_sent: Counter,
    /// Configuration commands the MQTT client did not take.
    pub commands_failed: Counter,
}

impl Default for ConfigMetrics {
    /// Creates the counters with every acknowledgement outcome at 0, so a query or alert
    /// on one that has not happened yet finds a series.
    fn default() -> Self {
        let acks = Family::<AckLabel, Counter>::default();
        for outcome in [AckOutcome::Applied, AckOutcome::Rejected, AckOutcome::Stale] {
            let _ = acks.get_or_create(&AckLabel { outcome });
        }
        ConfigMetrics {
            acks,
            commands_sent: Counter::default(),
            commands_failed: Counter::default(),
        }
    }
}

impl ConfigMetrics {
    /// Counts one stored acknowledgement by what it did.
    pub fn count_ack(&self, outcome: AckOutcome) {
        self.acks.get_or_create(&AckLabel { outcome }).inc();
    }

    /// Registers the counters as `config_acks`, `config_commands_sent` and
    /// `config_commands_failed` under the registry's prefix.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_acks",
            "Configuration acknowledgements stored, by what they did to the device's configuration",
            self.acks.clone(),
        );
        registry.register(
            "config_commands_sent",
            "Configuration commands handed to the MQTT client, first sends and resends",
            self.commands_sent.clone(),
        );
        registry.register(
            "config_commands_failed",
            "Configuration commands the MQTT client did not take",
            self.commands_failed.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_counted_by_outcome() {
        let metrics = ConfigMetrics::default();
        let mut registry = Registry::with_prefix("fleet");
        metrics.register(&mut registry);
        metrics.count_ack(AckOutcome::Stale);
        metrics.count_ack(AckOutcome::Stale);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("fleet_config_acks_total{outcome=\"stale\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fleet_config_acks_total{outcome=\"applied\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("fleet_config_commands_sent_total 0"),
            "{text}"
        );
    }
}
