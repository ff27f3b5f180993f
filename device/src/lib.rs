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
//!
//! With `--server` it takes model updates from the fleet server ([`update`]): signed
//! bundles are downloaded, checked, switched to and committed or rolled back, with each
//! stage reported on `fleet/v1/{device}/events`.
//!
//! Inputs classified under the confidence threshold are kept as hard samples at a
//! bounded rate and disk size, and uploaded to the fleet server ([`hard_samples`]).

pub mod api;
pub mod check;
pub mod config;
mod forward;
pub mod hard_samples;
mod inference;
pub mod model;
mod mqtt;
pub mod outbox;
mod report;
mod sequence;
pub mod settings;
mod stats;
mod system;
pub mod update;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use fleet_bundle::{Bundle, PublicKey};
use fleet_runtime::Dataset;
use fleet_wire::{ModelRef, UpdateStage, topic};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use config::{DeviceArgs, DeviceConfig};

use crate::api::ApiState;
use crate::forward::{Forwarder, ForwarderConfig};
use crate::inference::InferenceLoop;
use crate::model::{ModelSlot, SharedModel};
use crate::mqtt::{SessionConfig, StatusPayloads};
use crate::outbox::Outbox;
use crate::report::Reporter;
use crate::sequence::SequenceFile;
use crate::settings::{ConfigApplier, LiveSettings};
use crate::stats::SharedStats;
use crate::system::SystemSampler;
use crate::update::store::BundleStore;
use crate::update::{EventSink, StatusUpdater, Updater};

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
    // Checked before any bundle loads, so that a mistyped device stops the agent instead
    // of failing the installed bundle's start-up, which would roll back its update.
    if std::env::var_os(fleet_train::CANDLE_DEVICE_VARIABLE).is_some() {
        fleet_train::inference_device().map_err(anyhow::Error::msg)?;
    }
    let key = PublicKey::read(&config.public_key)
        .with_context(|| format!("failed to read public key {}", config.public_key.display()))?;
    let outbox_dir = config.state_dir.join("outbox");
    let outbox = Outbox::open(&outbox_dir, config.outbox.clone())
        .with_context(|| format!("failed to open outbox {}", outbox_dir.display()))?;
    let outbox = Arc::new(Mutex::new(outbox));
    let appended = Arc::new(Notify::new());
    let events = EventSink {
        device_id: config.device_id.clone(),
        encoding: config.encoding,
        outbox: outbox.clone(),
        appended: appended.clone(),
    };
    let bundles_dir = config.state_dir.join("bundles");
    let (mut store, recovery) = BundleStore::open(&bundles_dir, &config.bundle)
        .with_context(|| format!("failed to open installed bundles {}", bundles_dir.display()))?;
    if let Some(recovery) = recovery {
        let back_on = store.active();
        events.update(
            &recovery.trial.update_id,
            &recovery.abandoned.sha256,
            &recovery.abandoned.version,
            UpdateStage::RolledBack,
            &format!(
                "the agent stopped before the update was committed; back on {} {}",
                back_on.name, back_on.version
            ),
        );
    }
    let model = load_active_model(&config, &mut store, &key, &events)?;
    let model_ref = model_ref(&model);
    let slot = ModelSlot::new(model.clone());
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
        model = %model_ref.name,
        version = %model_ref.version,
        backend = slot.current().backend_name(),
        samples = indices.len(),
        broker = %config.broker,
        "agent starting"
    );
    let (config_applier, settings) = ConfigApplier::open(&config, events.clone())?;
    let fallback_counters = Arc::new(api::FallbackCounters::default());
    let api = start_api(&config, &slot, fallback_counters.clone(), settings.clone()).await?;

    let (publisher, eventloop) = mqtt::connect(&config)?;
    let status_topic = topic::device_topic(&config.device_id, topic::TopicKind::Status);
    let (status_tx, status_rx) = watch::channel(StatusPayloads::new(&config, &model_ref)?);
    let (commands_tx, commands_rx) = mpsc::unbounded_channel();
    let session_config = SessionConfig {
        broker: config.broker.to_string(),
        status_topic: status_topic.clone(),
        status: status_rx,
        command_topic: topic::device_topic(&config.device_id, topic::TopicKind::Command),
        commands: commands_tx,
    };
    let (session_events_tx, session_events_rx) = mpsc::unbounded_channel();
    let (session_stop_tx, session_stop_rx) = watch::channel(false);
    let session = tokio::spawn(mqtt::drive(
        eventloop,
        publisher.clone(),
        session_config,
        session_events_tx,
        session_stop_rx,
    ));
    let forwarder = Forwarder::new(
        outbox.clone(),
        publisher.clone(),
        ForwarderConfig {
            topic: topic::device_topic(&config.device_id, topic::TopicKind::Telemetry),
            events_topic: topic::device_topic(&config.device_id, topic::TopicKind::Events),
            settings: settings.clone(),
            window: FORWARD_WINDOW,
        },
        session_events_rx,
        appended.clone(),
    );
    let (forwarder_stop_tx, forwarder_stop_rx) = watch::channel(false);
    let forwarding = tokio::spawn(forwarder.run(forwarder_stop_rx, session_stop_tx));

    let stats = Arc::new(SharedStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (report_tx, mut report_rx) = mpsc::channel(1);
    let updater = Updater {
        store,
        key,
        slot: slot.clone(),
        events,
        status: StatusUpdater {
            config: config.clone(),
            publisher,
            topic: status_topic,
            payloads: status_tx,
        },
        outbox: outbox.clone(),
        report_now: report_tx,
        server: config.server.clone(),
        token: config
            .credentials
            .as_ref()
            .map(|credentials| credentials.password.clone()),
        settings: settings.clone(),
    };
    // Neither thread is joined at shutdown: a download in progress would hold the agent
    // up, and the install state and the stored configuration are consistent at every
    // step, so stopping them anywhere is safe.
    let (installs_tx, installs_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("updater".into())
        .spawn(move || updater.run(installs_rx))
        .context("failed to start the updater thread")?;
    std::thread::Builder::new()
        .name("commands".into())
        .spawn(move || dispatch_commands(commands_rx, installs_tx, config_applier))
        .context("failed to start the command thread")?;

    let mut hard_samples = start_hard_samples(&config, stop.clone())?;
    let inference = InferenceLoop {
        model: slot.clone(),
        data,
        indices,
        settings: settings.clone(),
        passes: config.passes,
        stats: stats.clone(),
        stop: stop.clone(),
        hard_samples: hard_samples.take_capture(),
    };
    let inference_thread = std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || inference.run())
        .context("failed to start the inference thread")?;

    let mut reporter = Reporter {
        config: &config,
        model: slot,
        sequence,
        stats,
        fallback: fallback_counters,
        system: SystemSampler::new(),
        outbox,
        appended,
        last_report_ms: unix_millis(),
        last_outbox_stats: Default::default(),
        append_failures: 0,
    };
    let mut settings = settings;
    let mut interval = settings.borrow().interval;
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                reporter.report().await?;
            }
            Ok(()) = settings.changed() => {
                let changed = settings.borrow_and_update().interval;
                if changed != interval {
                    interval = changed;
                    ticker = tokio::time::interval(interval);
                    ticker.tick().await;
                }
            }
            Some(reply) = report_rx.recv() => {
                let position = reporter.report().await?;
                let _ = reply.send(position);
            }
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
    let hard_samples = tokio::task::spawn_blocking(move || {
        hard_samples.finish_writing();
        hard_samples
    })
    .await?;
    hard_samples.log_totals();
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

/// Decodes commands from the session and hands each to the part that carries it out:
/// installs to the updater thread, configuration changes applied at once, so a change
/// does not wait for a download.
fn dispatch_commands(
    mut commands: mpsc::UnboundedReceiver<Vec<u8>>,
    installs: std::sync::mpsc::Sender<fleet_wire::InstallBundle>,
    config: ConfigApplier,
) {
    while let Some(payload) = commands.blocking_recv() {
        match fleet_wire::decode_command(&payload) {
            Ok(fleet_wire::Command::InstallBundle(install)) => {
                if installs.send(install).is_err() {
                    tracing::error!("updater thread stopped; install command dropped");
                }
            }
            Ok(fleet_wire::Command::SetConfig(remote)) => config.apply(remote),
            Err(error) => {
                tracing::warn!(%error, bytes = payload.len(), "command not understood, ignored")
            }
        }
    }
    tracing::debug!("command dispatch stopped");
}

/// Loads the bundle the install state names. An installed bundle that fails to load is
/// given up for the one before it, down to the factory bundle, whose failure is an error.
fn load_active_model(
    config: &DeviceConfig,
    store: &mut BundleStore,
    key: &PublicKey,
    events: &EventSink,
) -> anyhow::Result<SharedModel> {
    loop {
        let active = store.active().clone();
        let loaded = Bundle::open_verified(&active.dir, key)
            .with_context(|| format!("rejected bundle {}", active.dir.display()))
            .and_then(|bundle| {
                SharedModel::load(&bundle).with_context(|| {
                    format!(
                        "failed to load the model of bundle {}",
                        active.dir.display()
                    )
                })
            });
        match loaded {
            Ok(model) => return Ok(model),
            Err(error) if active.dir != config.bundle => {
                let back_on = store.roll_back()?;
                events.update(
                    "",
                    &active.sha256,
                    &active.version,
                    UpdateStage::RolledBack,
                    &format!(
                        "installed bundle failed at start-up ({error:#}); back on {} {}",
                        back_on.name, back_on.version
                    ),
                );
            }
            Err(error) => return Err(error),
        }
    }
}

fn model_ref(model: &SharedModel) -> ModelRef {
    ModelRef {
        name: model.info().name.clone(),
        version: model.info().version.clone(),
    }
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

/// Opens the hard-sample folder and starts capture, and uploads when the agent has a
/// fleet server and credentials.
fn start_hard_samples(
    config: &DeviceConfig,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<hard_samples::HardSamples> {
    let dir = config.state_dir.join(hard_samples::DIR_NAME);
    let upload = match (&config.server, &config.credentials) {
        (Some(server), Some(credentials)) => Some(hard_samples::UploadTarget {
            server: server.clone(),
            token: credentials.password.clone(),
        }),
        _ => None,
    };
    let uploading = upload.is_some();
    let samples = hard_samples::HardSamples::start(
        &dir,
        &config.device_id,
        config.hard_samples,
        upload,
        stop,
    )
    .with_context(|| format!("failed to open the hard-sample folder {}", dir.display()))?;
    let spool = samples.spool_stats();
    tracing::info!(
        rate_per_minute = config.hard_samples.rate_per_minute,
        max_bytes = config.hard_samples.max_bytes,
        pending_samples = spool.pending_samples,
        used_bytes = spool.used_bytes,
        uploading,
        "hard-sample capture ready"
    );
    if !uploading && config.hard_samples.rate_per_minute > 0 {
        tracing::warn!(
            dir = %dir.display(),
            "hard samples stay on disk: no --server and credentials to upload them"
        );
    }
    Ok(samples)
}

/// Binds and starts the local inference API when `--api-listen` is set, with the cloud
/// fallback when `--server` is set too.
async fn start_api(
    config: &DeviceConfig,
    slot: &ModelSlot,
    fallback_counters: Arc<api::FallbackCounters>,
    settings: watch::Receiver<LiveSettings>,
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
    tracing::info!(%address, model = %slot.current().info().name, "inference API listening");
    let mut state = ApiState::with_slot(slot.clone());
    if let Some(server) = &config.server {
        let token = config
            .credentials
            .as_ref()
            .map(|credentials| credentials.password.clone());
        if token.is_none() {
            tracing::warn!(
                server = %server,
                "cloud fallback sends no token: the gateway rejects requests without --username and --password-file"
            );
        }
        let policy = config.fallback.clone();
        tracing::info!(
            server = %server,
            model = policy.model.as_deref().unwrap_or("the local model"),
            threshold = settings.borrow().fallback_threshold,
            max_local_queue = policy.max_local_queue,
            latency_slo_ms = policy.latency_slo.map(|slo| slo.as_millis() as u64),
            timeout_ms = policy.timeout.as_millis() as u64,
            "inference API cloud fallback on"
        );
        let fallback = api::Fallback::new(server.clone(), token, policy, fallback_counters)
            .with_settings(settings);
        state = state.with_fallback(fallback);
    }
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
