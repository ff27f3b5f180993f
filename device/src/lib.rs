//! The device agent: verifies and loads a signed bundle, runs it over a local input
//! source at a set rate, and reports what it did over MQTT.
//!
//! Telemetry goes to `fleet/v1/{device}/telemetry` at QoS 1 every interval, with a
//! per-device sequence number that survives restarts. `fleet/v1/{device}/status` contains a
//! retained online message, replaced by the offline last will when the link dies.

pub mod config;
mod inference;
mod mqtt;
mod sequence;
mod stats;
mod system;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use fleet_bundle::{Bundle, PublicKey};
use fleet_runtime::{Classifier, Dataset};
use fleet_wire::{DeviceState, ModelRef, Telemetry, topic};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;

pub use config::{DeviceArgs, DeviceConfig};

use crate::inference::InferenceLoop;
use crate::sequence::SequenceFile;
use crate::stats::SharedStats;
use crate::system::SystemSampler;

/// Telemetry messages kept in memory while the broker is unreachable; the oldest are
/// dropped first once it is full.
// TODO: keep unsent telemetry in an on-disk queue so a reboot during an outage loses
// nothing. Until then an outage longer than this many intervals drops the oldest.
const MAX_UNSENT_MESSAGES: usize = 10_000;

/// Milliseconds since the Unix epoch by the device clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the agent until SIGINT or SIGTERM, then sends the last telemetry and an offline
/// status before returning.
pub async fn run(config: DeviceConfig) -> anyhow::Result<()> {
    let key = PublicKey::read(&config.public_key)
        .with_context(|| format!("failed to read public key {}", config.public_key.display()))?;
    let bundle = Bundle::open_verified(&config.bundle, &key)
        .with_context(|| format!("rejected bundle {}", config.bundle.display()))?;
    let model = ModelRef {
        name: bundle.manifest.name.clone(),
        version: bundle.manifest.version.clone(),
    };
    let classifier = Classifier::load(&bundle, 1).with_context(|| {
        format!(
            "failed to load the model of bundle {}",
            config.bundle.display()
        )
    })?;
    let data = Dataset::open(&config.input, config.labels.as_deref())
        .with_context(|| format!("failed to open input {}", config.input.display()))?;
    let indices = data.shard_indices(config.shard_index, config.shard_count);
    if indices.is_empty() {
        bail!(
            "shard {}/{} of {} has no samples ({} in total)",
            config.shard_index,
            config.shard_count,
            config.input.display(),
            data.len()
        );
    }
    let sequence = SequenceFile::open(&config.state_dir)?;
    tracing::info!(
        device_id = %config.device_id,
        model = %model.name,
        version = %model.version,
        samples = indices.len(),
        broker = %format!("{}:{}", config.broker_host, config.broker_port),
        "agent starting"
    );

    let (client, eventloop) = mqtt::connect(&config)?;
    let status = mqtt::StatusMessages {
        broker: format!("{}:{}", config.broker_host, config.broker_port),
        topic: topic::device_topic(&config.device_id, topic::TopicKind::Status),
        online: mqtt::status_payload(&config, Some(&model), DeviceState::Online)?,
        offline: mqtt::status_payload(&config, Some(&model), DeviceState::Offline)?,
    };
    let (connected_tx, _connected_rx) = watch::channel(false);
    let (mqtt_stop_tx, mqtt_stop_rx) = watch::channel(false);
    let session = tokio::spawn(mqtt::drive(
        eventloop,
        client.clone(),
        status,
        connected_tx,
        mqtt_stop_rx,
    ));

    let stats = Arc::new(SharedStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let inference = InferenceLoop {
        classifier,
        data,
        indices,
        rate: config.rate,
        passes: config.passes,
        confidence_threshold: config.confidence_threshold,
        stats: stats.clone(),
        stop: stop.clone(),
    };
    let inference_thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || inference.run())
        .context("failed to start the inference thread")?;

    let mut reporter = Reporter {
        config: &config,
        model,
        client,
        sequence,
        stats,
        system: SystemSampler::new(),
        unsent: VecDeque::new(),
        last_report_ms: unix_millis(),
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.tick().await;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = ticker.tick() => reporter.report()?,
            result = &mut signal => {
                result?;
                break;
            }
        }
    }

    tracing::info!(device_id = %config.device_id, "agent stopping");
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || inference_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the inference thread panicked"))?;
    reporter.report()?;
    mqtt_stop_tx.send_replace(true);
    session.await?;
    if !reporter.unsent.is_empty() {
        tracing::warn!(
            messages = reporter.unsent.len(),
            "telemetry not sent before shutdown"
        );
    }
    Ok(())
}

/// Builds and queues one telemetry message per interval.
struct Reporter<'a> {
    config: &'a DeviceConfig,
    model: ModelRef,
    client: AsyncClient,
    sequence: SequenceFile,
    stats: Arc<SharedStats>,
    system: SystemSampler,
    /// Encoded messages not yet accepted by the MQTT client, oldest first.
    unsent: VecDeque<Vec<u8>>,
    last_report_ms: u64,
}

impl Reporter<'_> {
    fn report(&mut self) -> anyhow::Result<()> {
        let interval = self.stats.take();
        let now = unix_millis();
        let telemetry = Telemetry {
            device_id: self.config.device_id.clone(),
            seq: self.sequence.next()?,
            device_time_ms: now,
            interval_ms: now
                .saturating_sub(self.last_report_ms)
                .min(u64::from(u32::MAX)) as u32,
            model: self.model.clone(),
            inferences: interval.inferences,
            input_errors: interval.input_errors,
            labeled: interval.labeled,
            correct: interval.correct,
            confidence_sum: interval.confidence_sum,
            low_confidence: interval.low_confidence,
            latency: interval.latency,
            system: self.system.sample(),
        };
        self.last_report_ms = now;
        let payload = fleet_wire::encode(&telemetry, self.config.encoding)?;
        if self.unsent.len() == MAX_UNSENT_MESSAGES {
            self.unsent.pop_front();
            tracing::warn!(
                limit = MAX_UNSENT_MESSAGES,
                "telemetry buffer full, oldest message dropped"
            );
        }
        self.unsent.push_back(payload);
        self.send_unsent();
        tracing::debug!(
            seq = telemetry.seq,
            inferences = telemetry.inferences,
            "telemetry queued"
        );
        Ok(())
    }

    /// Hands buffered messages to the MQTT client in order until its queue is full.
    fn send_unsent(&mut self) {
        let topic = topic::device_topic(&self.config.device_id, topic::TopicKind::Telemetry);
        while let Some(payload) = self.unsent.front() {
            match self
                .client
                .try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            {
                Ok(()) => {
                    self.unsent.pop_front();
                }
                Err(_) => break,
            }
        }
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("failed to listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
