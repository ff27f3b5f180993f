//! Settings the agent can change while it runs, and the remote configuration that sets
//! them.
//!
//! Each setting starts from the agent's flag or config-file value. The fleet server may
//! override any of them with a [`RemoteConfig`] on `fleet/v1/{device}/cmd`. The agent
//! checks it, stores it in `STATE_DIR/remote-config.json`, puts it in use and
//! acknowledges it with a [`ConfigAck`](fleet_wire::ConfigAck) event. The stored
//! overrides apply again at the next start, so the server's choice outlives restarts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_wire::RemoteConfig;
use tokio::sync::watch;

use crate::config::DeviceConfig;
use crate::update::EventSink;

const REMOTE_CONFIG_FILE: &str = "remote-config.json";

/// The values in use now.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveSettings {
    pub confidence_threshold: f32,
    pub interval: Duration,
    /// Inferences per second, `None` for unthrottled.
    pub rate: Option<f64>,
    /// Records sent per second at most, already raised to twice the telemetry rate
    /// when it was lower.
    pub drain_rate: f64,
    pub commit_timeout: Duration,
    /// Top-1 confidence under which the local inference API sends requests to the cloud; `None` sends
    /// no request to the cloud for low confidence.
    pub fallback_threshold: Option<f32>,
}

impl LiveSettings {
    /// Applies `remote`'s overrides to the agent's own settings.
    pub fn resolve(config: &DeviceConfig, remote: &RemoteConfig) -> LiveSettings {
        let interval = remote
            .interval_seconds
            .map_or(config.interval, Duration::from_secs_f64);
        let rate = match remote.rate {
            Some(rate) => (rate > 0.0).then_some(rate),
            None => config.rate,
        };
        let configured_drain = remote.drain_rate.unwrap_or(config.drain_rate);
        // The rate limit paces every record sent, new ones included, so a limit at or
        // under the telemetry rate would let the backlog grow forever. Twice the
        // telemetry rate drains any backlog while still bounding the burst.
        let telemetry_rate = 1.0 / interval.as_secs_f64();
        let drain_rate = configured_drain.max(2.0 * telemetry_rate);
        if drain_rate > configured_drain {
            tracing::info!(
                configured = configured_drain,
                drain_rate,
                telemetry_rate,
                "drain rate raised to twice the telemetry rate, so a backlog shrinks"
            );
        }
        LiveSettings {
            confidence_threshold: remote
                .confidence_threshold
                .unwrap_or(config.confidence_threshold),
            interval,
            rate,
            drain_rate,
            commit_timeout: remote
                .commit_timeout_seconds
                .map_or(config.commit_timeout, Duration::from_secs_f64),
            fallback_threshold: remote.fallback_threshold.or(config.fallback.threshold),
        }
    }

    fn describe(&self) -> String {
        let rate = self
            .rate
            .map_or("unthrottled".to_string(), |rate| format!("{rate}/s"));
        let fallback = self
            .fallback_threshold
            .map_or("off".to_string(), |threshold| threshold.to_string());
        format!(
            "confidence_threshold {}, interval {} s, rate {rate}, drain_rate {}/s, \
             commit_timeout {} s, fallback_threshold {fallback}",
            self.confidence_threshold,
            self.interval.as_secs_f64(),
            self.drain_rate,
            self.commit_timeout.as_secs_f64()
        )
    }
}

/// Takes remote configuration commands and puts them in use.
#[derive(Debug)]
pub struct ConfigApplier {
    path: PathBuf,
    config: DeviceConfig,
    settings: watch::Sender<LiveSettings>,
    events: EventSink,
}

impl ConfigApplier {
    /// Reads the stored overrides and returns the applier with the settings they give.
    /// A damaged file is set aside, and the agent starts on its own settings.
    pub fn open(
        config: &DeviceConfig,
        events: EventSink,
    ) -> anyhow::Result<(ConfigApplier, watch::Receiver<LiveSettings>)> {
        let path = config.state_dir.join(REMOTE_CONFIG_FILE);
        let remote = read_remote_config(&path)?;
        if remote != RemoteConfig::default() {
            tracing::info!(change_id = %remote.change_id, "remote configuration from the fleet server in use");
        }
        let (settings, receiver) = watch::channel(LiveSettings::resolve(config, &remote));
        let applier = ConfigApplier {
            path,
            config: config.clone(),
            settings,
            events,
        };
        Ok((applier, receiver))
    }

    /// Checks `remote`, stores it, puts it in use and acknowledges it. A rejected or
    /// unstorable change leaves the settings as they were, and the acknowledgement names the reason.
    ///
    /// TODO: change ids are random, so a repeat of an older change that arrives after a
    /// newer one is applied last. The server needs to send a revision that only grows,
    /// which the agent compares before applying.
    pub fn apply(&self, remote: RemoteConfig) {
        if let Err(reason) = remote.validate() {
            self.events.config(&remote.change_id, false, &reason);
            return;
        }
        if let Err(error) = write_remote_config(&self.path, &remote) {
            let reason = format!(
                "failed to store {}: {error}; settings unchanged",
                self.path.display()
            );
            self.events.config(&remote.change_id, false, &reason);
            return;
        }
        let settings = LiveSettings::resolve(&self.config, &remote);
        let detail = settings.describe();
        self.settings.send_replace(settings);
        self.events.config(&remote.change_id, true, &detail);
    }
}

fn read_remote_config(path: &Path) -> anyhow::Result<RemoteConfig> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(RemoteConfig::default());
        }
        Err(error) => {
            return Err(anyhow::anyhow!(
                "failed to read {}: {error}",
                path.display()
            ));
        }
    };
    let parsed = serde_json::from_slice::<RemoteConfig>(&bytes)
        .map_err(|error| error.to_string())
        .and_then(|remote| remote.validate().map(|()| remote));
    match parsed {
        Ok(remote) => Ok(remote),
        Err(reason) => {
            let aside = path.with_extension(format!("json.damaged-{}", crate::unix_millis()));
            fs::rename(path, &aside).map_err(|error| {
                anyhow::anyhow!("failed to set aside {}: {error}", path.display())
            })?;
            tracing::error!(%reason, set_aside = %aside.display(), "stored remote configuration is invalid; using the agent's own settings");
            Ok(RemoteConfig::default())
        }
    }
}

/// Replaces the file through a flushed temporary file, so a crash leaves the old or the
/// new overrides.
fn write_remote_config(path: &Path, remote: &RemoteConfig) -> std::io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(remote).expect("remote configuration serializes");
    let mut file = fs::File::create(&temporary)?;
    std::io::Write::write_all(&mut file, &bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::DeviceArgs;
    use crate::outbox::{Outbox, OutboxOptions};

    fn agent_config(state_dir: &Path) -> DeviceConfig {
        DeviceConfig::resolve(DeviceArgs {
            device_id: Some("pi-1".into()),
            bundle: Some("b".into()),
            public_key: Some("k".into()),
            input: Some("i".into()),
            state_dir: Some(state_dir.to_path_buf()),
            interval: Some(5.0),
            rate: Some(10.0),
            ..DeviceArgs::default()
        })
        .unwrap()
    }

    fn sink(dir: &Path) -> EventSink {
        let outbox = Outbox::open(&dir.join("outbox"), OutboxOptions::default()).unwrap();
        EventSink {
            device_id: "pi-1".into(),
            encoding: fleet_wire::Encoding::Json,
            outbox: Arc::new(Mutex::new(outbox)),
            appended: Default::default(),
        }
    }

    /// Returns the acknowledgements queued in the outbox so far.
    fn acks(events: &EventSink) -> Vec<fleet_wire::ConfigAck> {
        let records = events.outbox.lock().unwrap().read_after(0, 100).unwrap();
        records
            .iter()
            .map(|record| {
                let event: fleet_wire::Event = fleet_wire::decode(&record.payload[1..]).unwrap();
                match event.kind {
                    fleet_wire::EventKind::Config(ack) => ack,
                    other => panic!("unexpected event {other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn overrides_replace_flags_and_absent_fields_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(dir.path());
        let remote = RemoteConfig {
            confidence_threshold: Some(0.9),
            rate: Some(0.0),
            ..RemoteConfig::default()
        };
        let settings = LiveSettings::resolve(&config, &remote);
        assert_eq!(settings.confidence_threshold, 0.9);
        assert_eq!(settings.rate, None, "0 means unthrottled");
        assert_eq!(settings.interval, Duration::from_secs(5));
        assert_eq!(settings.commit_timeout, config.commit_timeout);
    }

    #[test]
    fn drain_rate_stays_above_twice_the_telemetry_rate() {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(dir.path());
        let remote = RemoteConfig {
            interval_seconds: Some(0.1),
            drain_rate: Some(1.0),
            ..RemoteConfig::default()
        };
        assert_eq!(LiveSettings::resolve(&config, &remote).drain_rate, 20.0);
    }

    #[test]
    fn applied_change_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(dir.path());
        let events = sink(dir.path());
        let (applier, settings) = ConfigApplier::open(&config, events.clone()).unwrap();
        applier.apply(RemoteConfig {
            change_id: "c-1".into(),
            interval_seconds: Some(1.0),
            ..RemoteConfig::default()
        });
        assert_eq!(settings.borrow().interval, Duration::from_secs(1));
        let acks = acks(&events);
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].change_id, "c-1");
        assert!(acks[0].applied, "{:?}", acks[0]);
        assert!(
            acks[0].detail.contains("interval 1 s"),
            "{}",
            acks[0].detail
        );

        let (_, restarted) = ConfigApplier::open(&config, events).unwrap();
        assert_eq!(restarted.borrow().interval, Duration::from_secs(1));
    }

    #[test]
    fn invalid_change_is_rejected_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(dir.path());
        let events = sink(dir.path());
        let (applier, settings) = ConfigApplier::open(&config, events.clone()).unwrap();
        let before = settings.borrow().clone();
        applier.apply(RemoteConfig {
            change_id: "c-2".into(),
            confidence_threshold: Some(2.0),
            ..RemoteConfig::default()
        });
        assert_eq!(*settings.borrow(), before);
        let acks = acks(&events);
        assert!(!acks[0].applied);
        assert!(
            acks[0].detail.contains("confidence_threshold"),
            "{}",
            acks[0].detail
        );
        assert!(!dir.path().join(REMOTE_CONFIG_FILE).exists());
    }

    #[test]
    fn damaged_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let config = agent_config(dir.path());
        fs::write(dir.path().join(REMOTE_CONFIG_FILE), b"{\"rate\": ").unwrap();
        let (_, settings) = ConfigApplier::open(&config, sink(dir.path())).unwrap();
        assert_eq!(settings.borrow().rate, Some(10.0), "the agent's own rate");
        let aside = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().contains("damaged-"));
        assert!(aside, "the damaged file is kept for inspection");
    }
}
