//! The device agent: verifies and loads a signed bundle, runs it over a local input
//! source at a set rate, and reports what it did over MQTT.
//!
//! Telemetry goes to `fleet/v1/{device}/telemetry` at QoS 1 every interval, with a
//! per-device sequence number that survives restarts. Each message is first appended to
//! an on-disk [`outbox`] and removed only after the broker acknowledged it. Messages built
//! during a broker outage, or before a crash or reboot, are therefore sent once the broker
//! is back, oldest first and at a bounded rate. `fleet/v1/{device}/status` contains a
//! retained online message, replaced by the offline last will when the link dies.
//!
//! With `--api-listen` the agent also serves its model over the Open Inference Protocol
//! ([`api`]), sharing the loaded model with its own inference loop.

pub mod api;
pub mod config;
mod forward;
mod inference;
pub mod model;
mod mqtt;
pub mod outbox;
mod report;
mod sequence;
mod stats;
mod system;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use fleet_bundle::{Bundle, PublicKey};
use fleet_runtime::Dataset;
use fleet_wire::{DeviceState, ModelRef, topic};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use config::{DeviceArgs, DeviceConfig};

use crate::api::ApiState;
use crate::forward::{Forwarder, ForwarderConfig};
use crate::inference::InferenceLoop;
use crate::model::SharedModel;
use crate::outbox::Outbox;
use crate::report::Reporter;
use crate::sequence::SequenceFile;
use crate::stats::SharedStats;
use crate::system::SystemSampler;

/// Telemetry records sent and not yet acknowledged at most. It stays under rumqttc's
/// default of 100 in-flight publishes, which the status messages share.
const FORWARD_WINDOW: usize = 32;

/// Milliseconds since the Unix epoch by the device clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the agent until SIGINT or SIGTERM, then sends the last telemetry and an offline
/// status before returning. Telemetry the broker has not acknowledged by then stays in
/// the outbox for the next start.
pub async fn run(config: DeviceConfig) -> anyhow::Result<()> {
    let (model_ref, model) = load_model(&config)?;
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
    let outbox_dir = config.state_dir.join("outbox");
    let outbox = Outbox::open(&outbox_dir, config.outbox.clone())
        .with_context(|| format!("failed to open outbox {}", outbox_dir.display()))?;
    let outbox = Arc::new(Mutex::new(outbox));
    tracing::info!(
        device_id = %config.device_id,
        model = %model_ref.name,
        version = %model_ref.version,
        samples = indices.len(),
        broker = %format!("{}:{}", config.broker_host, config.broker_port),
        "agent starting"
    );
    // The rate limit paces every record sent, new ones included, so a limit at or under
    // the telemetry rate would let the backlog grow forever. Twice the telemetry rate
    // drains any backlog while still bounding the burst after a reconnect.
    let telemetry_rate = 1.0 / config.interval.as_secs_f64();
    let drain_rate = config.drain_rate.max(2.0 * telemetry_rate);
    if drain_rate > config.drain_rate {
        tracing::info!(
            configured = config.drain_rate,
            drain_rate,
            telemetry_rate,
            "drain rate raised to twice the telemetry rate, so a backlog shrinks"
        );
    }
    let api = start_api(&config, &model).await?;

    let (publisher, eventloop) = mqtt::connect(&config)?;
    let status = mqtt::StatusMessages {
        broker: format!("{}:{}", config.broker_host, config.broker_port),
        topic: topic::device_topic(&config.device_id, topic::TopicKind::Status),
        online: mqtt::status_payload(&config, Some(&model_ref), DeviceState::Online)?,
        offline: mqtt::status_payload(&config, Some(&model_ref), DeviceState::Offline)?,
    };
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (session_stop_tx, session_stop_rx) = watch::channel(false);
    let session = tokio::spawn(mqtt::drive(
        eventloop,
        publisher.clone(),
        status,
        events_tx,
        session_stop_rx,
    ));
    let appended = Arc::new(Notify::new());
    let forwarder = Forwarder::new(
        outbox.clone(),
        publisher,
        ForwarderConfig {
            topic: topic::device_topic(&config.device_id, topic::TopicKind::Telemetry),
            drain_rate,
            window: FORWARD_WINDOW,
        },
        events_rx,
        appended.clone(),
    );
    let (forwarder_stop_tx, forwarder_stop_rx) = watch::channel(false);
    let forwarding = tokio::spawn(forwarder.run(forwarder_stop_rx, session_stop_tx));

    let stats = Arc::new(SharedStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let inference = InferenceLoop {
        model,
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
        model: model_ref,
        sequence,
        stats,
        system: SystemSampler::new(),
        outbox,
        appended,
        last_report_ms: unix_millis(),
        last_outbox_stats: Default::default(),
        append_failures: 0,
    };
    let mut ticker = tokio::time::interval(config.interval);
    ticker.tick().await;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = ticker.tick() => reporter.report().await?,
            result = &mut signal => {
                result?;
                break;
            }
        }
    }

    tracing::info!(device_id = %config.device_id, "agent stopping");
    let api = api.map(RunningApi::begin_stop);
    stop.store(true, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || inference_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the inference thread panicked"))?;
    reporter.report().await?;
    forwarder_stop_tx.send_replace(true);
    let outbox_stats = forwarding.await?;
    session.await?;
    if let Some(api) = api {
        api.await??;
    }
    tracing::info!(
        pending_records = outbox_stats.pending_records,
        dropped_records = outbox_stats.dropped_records,
        damaged_records = outbox_stats.damaged_records,
        "agent stopped; pending telemetry is sent at the next start"
    );
    Ok(())
}

/// Verifies the bundle and loads its model.
fn load_model(config: &DeviceConfig) -> anyhow::Result<(ModelRef, SharedModel)> {
    let key = PublicKey::read(&config.public_key)
        .with_context(|| format!("failed to read public key {}", config.public_key.display()))?;
    let bundle = Bundle::open_verified(&config.bundle, &key)
        .with_context(|| format!("rejected bundle {}", config.bundle.display()))?;
    let model_ref = ModelRef {
        name: bundle.manifest.name.clone(),
        version: bundle.manifest.version.clone(),
    };
    let model = SharedModel::load(&bundle).with_context(|| {
        format!(
            "failed to load the model of bundle {}",
            config.bundle.display()
        )
    })?;
    Ok((model_ref, model))
}

/// The local inference API while it serves.
struct RunningApi {
    state: ApiState,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningApi {
    /// Fails readiness checks and stops accepting connections; the returned task ends
    /// when the requests in progress are done.
    fn begin_stop(self) -> JoinHandle<std::io::Result<()>> {
        self.state.set_ready(false);
        let _ = self.stop.send(());
        self.task
    }
}

/// Binds and starts the local inference API when `--api-listen` is set.
async fn start_api(
    config: &DeviceConfig,
    model: &SharedModel,
) -> anyhow::Result<Option<RunningApi>> {
    let Some(address) = config.api_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to listen on --api-listen {address}"))?;
    let address = listener.local_addr()?;
    if !address.ip().is_loopback() {
        tracing::warn!(%address, "inference API listens beyond localhost and has no authentication");
    }
    tracing::info!(%address, model = %model.info().name, "inference API listening");
    let state = ApiState::new(model.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(api::serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    Ok(Some(RunningApi { state, stop, task }))
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
