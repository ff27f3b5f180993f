//! The reporter: builds one telemetry message per interval and appends it to the outbox.

use std::sync::Arc;

use fleet_wire::Telemetry;
use tokio::sync::Notify;

use crate::api::FallbackCounters;
use crate::config::DeviceConfig;
use crate::forward::{SharedOutbox, error_chain, with_outbox};
use crate::model::ModelSlot;
use crate::outbox::OutboxStats;
use crate::sequence::SequenceFile;
use crate::stats::SharedStats;
use crate::system::SystemSampler;

/// Builds telemetry from the interval counters and queues it for the forwarder.
#[derive(Debug)]
pub struct Reporter<'a> {
    pub config: &'a DeviceConfig,
    /// The model in use; each message names the one in use when it is built.
    pub model: ModelSlot,
    pub sequence: SequenceFile,
    pub stats: Arc<SharedStats>,
    /// Cloud fallback counters of the local inference API.
    pub fallback: Arc<FallbackCounters>,
    pub system: SystemSampler,
    pub outbox: SharedOutbox,
    /// Notified after each append, so the forwarder sends at once.
    pub appended: Arc<Notify>,
    pub last_report_ms: u64,
    /// Outbox counters at the last report, to log when drops or damage grow.
    pub last_outbox_stats: OutboxStats,
    pub append_failures: u64,
}

impl Reporter<'_> {
    /// Builds the telemetry of the interval that just ended and appends it to the outbox,
    /// returning its position. An outbox that fails to store it is logged and counted,
    /// and the agent carries on. The server then records a gap in the sequence numbers.
    pub async fn report(&mut self) -> anyhow::Result<Option<u64>> {
        let telemetry = self.build()?;
        let payload = fleet_wire::encode(&telemetry, self.config.encoding)?;
        let appended = with_outbox(&self.outbox, move |outbox| {
            (outbox.append(&payload), outbox.stats())
        })
        .await;
        match appended {
            (Ok(position), stats) => {
                self.appended.notify_one();
                tracing::debug!(
                    seq = telemetry.seq,
                    position,
                    inferences = telemetry.inferences,
                    pending_records = stats.pending_records,
                    "telemetry queued"
                );
                self.log_outbox_losses(stats);
                Ok(Some(position))
            }
            (Err(error), _) => {
                self.append_failures += 1;
                tracing::error!(
                    seq = telemetry.seq,
                    error = %error_chain(&error),
                    failures = self.append_failures,
                    "telemetry not stored in the outbox, dropped"
                );
                Ok(None)
            }
        }
    }

    fn build(&mut self) -> anyhow::Result<Telemetry> {
        let interval = self.stats.take();
        let now = crate::unix_millis();
        let telemetry = Telemetry {
            device_id: self.config.device_id.clone(),
            seq: self.sequence.next()?,
            device_time_ms: now,
            interval_ms: now
                .saturating_sub(self.last_report_ms)
                .min(u64::from(u32::MAX)) as u32,
            model: crate::model_ref(&self.model.current()),
            inferences: interval.inferences,
            input_errors: interval.input_errors,
            labeled: interval.labeled,
            correct: interval.correct,
            confidence_sum: interval.confidence_sum,
            low_confidence: interval.low_confidence,
            latency: interval.latency,
            system: self.system.sample(),
            fallback: self.fallback.take(),
        };
        self.last_report_ms = now;
        Ok(telemetry)
    }

    /// Logs the outbox's drop and damage totals when they grew since the last report.
    ///
    /// NOTE: these totals reach only the log, because `Telemetry` has no field for them
    /// yet. A new field goes at the end, with `fleet_wire::decode_telemetry` decoding the
    /// layout without it, as it does for `fallback`.
    fn log_outbox_losses(&mut self, stats: OutboxStats) {
        let last = self.last_outbox_stats;
        if stats.dropped_records > last.dropped_records
            || stats.damaged_records > last.damaged_records
        {
            tracing::warn!(
                dropped_records = stats.dropped_records,
                damaged_records = stats.damaged_records,
                damaged_files = stats.damaged_files,
                pending_records = stats.pending_records,
                "telemetry lost in the outbox since the agent started"
            );
        }
        self.last_outbox_stats = stats;
    }
}
