//! Over-the-air model updates.
//!
//! An `install_bundle` command on `fleet/v1/{device}/cmd` names an archive on the fleet
//! server by URL, size and SHA-256. The updater, on a thread of its own, takes it
//! through these stages and reports each on `fleet/v1/{device}/events`:
//!
//! 1. **accepted**: the command names this agent's server and a new archive. An archive
//!    whose hash matches the running bundle ends here as `already_installed`.
//! 2. **downloaded**: fetched into `staging/`, resuming a cut transfer, with the size and
//!    SHA-256 the command gave.
//! 3. **verified**: unpacked, with the manifest signed by the agent's key and every file
//!    matching its hash.
//! 4. **health_checked**: the model loads and reproduces the reference outputs the
//!    bundle carries.
//! 5. **switched**: recorded as a trial in the install state, then put in use; the
//!    previous model stays loaded.
//! 6. **committed**: telemetry built with the new model was acknowledged by the broker.
//!    Otherwise, within `--commit-timeout`, the agent goes back to the previous model
//!    (`rolled_back`).
//!
//! A failure before the switch ends as `failed` and changes nothing. A process killed at
//! any stage restarts on a complete bundle. Killed before the switch, it restarts on the
//! old bundle, which was never touched. Killed after it, it restarts on the old bundle
//! too, because [`store::BundleStore::open`] rolls back an uncommitted trial.

mod download;
pub mod store;

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use fleet_bundle::{Bundle, PublicKey, archive};
use fleet_wire::{
    ConfigAck, Encoding, Event, EventKind, InstallBundle, ModelRef, UpdateEvent, UpdateStage,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::config::DeviceConfig;
use crate::forward::{EVENT_RECORD, SharedOutbox, error_chain};
use crate::model::{ModelSlot, SharedModel};
use crate::mqtt::{PublishKind, Publisher, StatusPayloads};
use crate::settings::LiveSettings;
use store::{BundleStore, InstalledBundle};

/// Largest archive the agent downloads.
const MAX_ARCHIVE_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Ids of finished updates the updater remembers, to drop repeated commands.
const FINISHED_KEPT: usize = 32;
/// How often the updater checks whether the new model's telemetry was acknowledged.
const ACK_POLL: Duration = Duration::from_millis(100);

/// A request to the reporter for telemetry now; the reply is the outbox position of the
/// record, or `None` when it could not be stored.
pub type ReportRequest = oneshot::Sender<Option<u64>>;

/// Appends update events to the outbox, which sends them in order with telemetry.
#[derive(Debug, Clone)]
pub struct EventSink {
    pub device_id: String,
    pub encoding: Encoding,
    pub outbox: SharedOutbox,
    /// Notified after each append, so the forwarder sends at once.
    pub appended: Arc<Notify>,
}

impl EventSink {
    /// Logs an update event and queues it for the broker.
    pub fn update(
        &self,
        update_id: &str,
        sha256: &str,
        version: &str,
        stage: UpdateStage,
        detail: &str,
    ) {
        match stage {
            UpdateStage::Failed | UpdateStage::RolledBack => {
                tracing::warn!(
                    update_id,
                    version,
                    stage = stage.as_str(),
                    detail,
                    "update event"
                )
            }
            _ => tracing::info!(
                update_id,
                version,
                stage = stage.as_str(),
                detail,
                "update event"
            ),
        }
        self.send(EventKind::Update(UpdateEvent {
            update_id: update_id.to_string(),
            sha256: sha256.to_string(),
            version: version.to_string(),
            stage,
            detail: detail.to_string(),
        }));
    }

    /// Logs the outcome of a remote configuration change and queues it for the broker.
    pub fn config(&self, change_id: &str, applied: bool, detail: &str) {
        if applied {
            tracing::info!(change_id, detail, "remote configuration applied");
        } else {
            tracing::warn!(change_id, detail, "remote configuration rejected");
        }
        self.send(EventKind::Config(ConfigAck {
            change_id: change_id.to_string(),
            applied,
            detail: detail.to_string(),
        }));
    }

    /// Appends the event to the outbox. An outbox that fails to store it is logged, and
    /// the agent goes on, since the event is a report, not a step.
    fn send(&self, kind: EventKind) {
        let event = Event {
            device_id: self.device_id.clone(),
            device_time_ms: crate::unix_millis(),
            kind,
        };
        let mut record = vec![EVENT_RECORD];
        match fleet_wire::encode(&event, self.encoding) {
            Ok(payload) => record.extend(payload),
            Err(error) => {
                tracing::error!(%error, "event not encoded");
                return;
            }
        }
        let appended = self
            .outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(&record);
        match appended {
            Ok(_) => self.appended.notify_one(),
            Err(error) => tracing::error!(%error, "event not stored in the outbox"),
        }
    }
}

/// Publishes the retained status again when the model changes.
#[derive(Debug)]
pub struct StatusUpdater {
    pub config: DeviceConfig,
    pub publisher: Publisher,
    pub topic: String,
    pub payloads: watch::Sender<StatusPayloads>,
}

impl StatusUpdater {
    fn model_changed(&self, model: &ModelRef) {
        match StatusPayloads::new(&self.config, model) {
            Ok(payloads) => {
                let online = payloads.online.clone();
                self.payloads.send_replace(payloads);
                if let Err(error) =
                    self.publisher
                        .publish(&self.topic, PublishKind::Status, true, online)
                {
                    tracing::warn!(%error, "status with the new model not queued; it goes out at the next connection");
                }
            }
            Err(error) => tracing::error!(%error, "status with the new model not encoded"),
        }
    }
}

/// Carries out install commands, one at a time.
#[derive(Debug)]
pub struct Updater {
    pub store: BundleStore,
    pub key: PublicKey,
    pub slot: ModelSlot,
    pub events: EventSink,
    pub status: StatusUpdater,
    pub outbox: SharedOutbox,
    /// Asks the reporter for telemetry built with the model now in use.
    pub report_now: mpsc::Sender<ReportRequest>,
    /// Base URL of the fleet server, `None` when updates are off.
    pub server: Option<String>,
    /// The device's credential, sent as a bearer token with downloads.
    pub token: Option<String>,
    /// The commit timeout in use, which remote configuration may change.
    pub settings: watch::Receiver<LiveSettings>,
}

/// A bundle that passed every check before the switch.
struct Prepared {
    installed: InstalledBundle,
    model: SharedModel,
    /// Whether this attempt unpacked the folder, which it then removes on failure.
    created: bool,
}

impl Updater {
    /// Carries out install commands until the channel closes. Runs on its own thread,
    /// since downloads, hashing and model loading block.
    pub fn run(mut self, commands: std::sync::mpsc::Receiver<InstallBundle>) {
        // The server repeats the commands of unfinished updates whenever the device's
        // status reads online, which it does again after every switch, so a command may
        // arrive again after its update ended here. Its final event is already in the
        // outbox, so the repeat is dropped.
        let mut finished: VecDeque<String> = VecDeque::new();
        for command in commands {
            if finished.contains(&command.update_id) {
                tracing::debug!(update_id = %command.update_id, "repeated command of a finished update ignored");
                continue;
            }
            // A failed update is not remembered: the server's next repeat tries again,
            // which overcomes a short outage of the server or the network.
            if self.install(&command) != UpdateStage::Failed {
                finished.push_back(command.update_id);
                if finished.len() > FINISHED_KEPT {
                    finished.pop_front();
                }
            }
        }
        tracing::debug!("updater stopped");
    }

    /// Reports a stage of `command`'s update.
    fn emit(&self, command: &InstallBundle, stage: UpdateStage, detail: &str) {
        self.events.update(
            &command.update_id,
            &command.sha256,
            &command.version,
            stage,
            detail,
        );
    }

    /// Carries out one command and returns the final stage it reported.
    fn install(&mut self, command: &InstallBundle) -> UpdateStage {
        let emit = |stage, detail: &str| {
            self.emit(command, stage, detail);
            stage
        };
        if self.store.was_rolled_back(&command.update_id) {
            // Reported as rolled back again, so the repeat is remembered and dropped.
            return emit(
                UpdateStage::RolledBack,
                "this update was rolled back on this device; create a new update to try again",
            );
        }
        let active = self.store.active();
        if active.sha256 == command.sha256 {
            return emit(
                UpdateStage::AlreadyInstalled,
                &format!("{} {} is running", active.name, active.version),
            );
        }
        match self.prepare(command) {
            Ok(prepared) => self.switch_and_commit(command, prepared),
            Err(reason) => emit(UpdateStage::Failed, &reason),
        }
    }

    /// Runs every stage up to the health check. The error names the stage that failed.
    fn prepare(&self, command: &InstallBundle) -> Result<Prepared, String> {
        let emit = |stage, detail: &str| self.emit(command, stage, detail);
        self.check_command(command)?;
        emit(
            UpdateStage::Accepted,
            &format!("downloading {} bytes from {}", command.size, command.url),
        );

        let dir = self.store.bundle_dir(&command.sha256);
        // The folder exists when the archive is the kept previous bundle. Only a folder
        // this attempt unpacked is removed on failure.
        let created = !dir.is_dir();
        if created {
            let part = self.store.staging_path(&command.sha256);
            let started = Instant::now();
            let fetched =
                download::download(&command.url, self.token.as_deref(), &part, command.size)
                    .map_err(|error| {
                        // A refused or oversized download cannot be resumed; one that
                        // gave up on a bad link is resumed by the next attempt.
                        if !matches!(error, download::DownloadError::GaveUp { .. }) {
                            remove_file(&part);
                        }
                        format!("download failed: {}", error_chain(&error))
                    })?;
            let sha256 = fleet_bundle::sha256_file(&part)
                .map_err(|error| format!("download not readable: {}", error_chain(&error)))?;
            if sha256 != command.sha256 {
                remove_file(&part);
                return Err(format!(
                    "downloaded archive has SHA-256 {sha256}, the command says {}; discarded",
                    command.sha256
                ));
            }
            emit(
                UpdateStage::Downloaded,
                &format!(
                    "{} bytes in {:.2} s, {} request(s), resumed from byte {}",
                    command.size,
                    started.elapsed().as_secs_f64(),
                    fetched.attempts,
                    fetched.resumed_from
                ),
            );
            let unpacked = archive::unpack(&part, &dir);
            remove_file(&part);
            unpacked.map_err(|error| format!("archive not unpacked: {}", error_chain(&error)))?;
        }

        let bundle = match Bundle::open_verified(&dir, &self.key) {
            Ok(bundle) => bundle,
            Err(error) => {
                if created {
                    remove_dir(&dir);
                }
                return Err(format!("verification failed: {}", error_chain(&error)));
            }
        };
        emit(
            UpdateStage::Verified,
            &format!(
                "signature and {} file hashes match",
                bundle.manifest.files.len()
            ),
        );

        let started = Instant::now();
        let model = match health_check(&bundle) {
            Ok((model, detail)) => {
                emit(
                    UpdateStage::HealthChecked,
                    &format!("{detail}, in {:.2} s", started.elapsed().as_secs_f64()),
                );
                model
            }
            Err(reason) => {
                if created {
                    remove_dir(&dir);
                }
                return Err(format!("health check failed: {reason}"));
            }
        };
        Ok(Prepared {
            installed: InstalledBundle {
                sha256: command.sha256.clone(),
                name: bundle.manifest.name.clone(),
                version: bundle.manifest.version.clone(),
                dir,
            },
            model,
            created,
        })
    }

    /// Refuses commands the agent must not carry out.
    fn check_command(&self, command: &InstallBundle) -> Result<(), String> {
        if !store::is_sha256(&command.sha256) {
            return Err(format!(
                "invalid sha256 {:?}: expected 64 lowercase hex digits",
                command.sha256
            ));
        }
        let Some(server) = &self.server else {
            return Err("this agent was started without --server, so it takes no updates".into());
        };
        if !command.url.starts_with(&format!("{server}/")) {
            return Err(format!(
                "refused URL {:?}: this agent downloads only from its server {server}",
                command.url
            ));
        }
        if command.size == 0 || command.size > MAX_ARCHIVE_BYTES {
            return Err(format!(
                "archive size {} is outside 1 to {MAX_ARCHIVE_BYTES} bytes",
                command.size
            ));
        }
        Ok(())
    }

    /// Records the trial, switches models, and commits once telemetry from the new model
    /// reached the broker, or rolls back.
    fn switch_and_commit(&mut self, command: &InstallBundle, prepared: Prepared) -> UpdateStage {
        let from = self.store.active().clone();
        if let Err(error) = self
            .store
            .begin_trial(prepared.installed.clone(), &command.update_id)
        {
            if prepared.created {
                remove_dir(&prepared.installed.dir);
            }
            self.emit(
                command,
                UpdateStage::Failed,
                &format!("install state not written: {}", error_chain(&error)),
            );
            return UpdateStage::Failed;
        }
        let old_model = self.slot.replace(prepared.model);
        self.status.model_changed(&ModelRef {
            name: prepared.installed.name.clone(),
            version: prepared.installed.version.clone(),
        });
        self.emit(
            command,
            UpdateStage::Switched,
            &format!(
                "running {} {}, {} {} kept for rollback",
                prepared.installed.name, prepared.installed.version, from.name, from.version
            ),
        );

        let started = Instant::now();
        match self.wait_for_acknowledged_telemetry() {
            Ok(()) => match self.store.commit() {
                Ok(()) => {
                    self.emit(
                        command,
                        UpdateStage::Committed,
                        &format!(
                            "telemetry from the new model acknowledged after {:.2} s",
                            started.elapsed().as_secs_f64()
                        ),
                    );
                    UpdateStage::Committed
                }
                Err(error) => self.roll_back(
                    command,
                    old_model,
                    &format!("commit not recorded: {}", error_chain(&error)),
                ),
            },
            Err(reason) => self.roll_back(command, old_model, &reason),
        }
    }

    fn roll_back(
        &mut self,
        command: &InstallBundle,
        old_model: SharedModel,
        reason: &str,
    ) -> UpdateStage {
        let restored_ref = ModelRef {
            name: old_model.info().name.clone(),
            version: old_model.info().version.clone(),
        };
        self.slot.replace(old_model);
        self.status.model_changed(&restored_ref);
        let detail = match self.store.roll_back() {
            Ok(restored) => format!("{reason}; back on {} {}", restored.name, restored.version),
            // The old model runs; the state file still names the trial, so the next
            // start rolls back as well.
            Err(error) => format!(
                "{reason}; back on {} {}, install state not rewritten ({})",
                restored_ref.name,
                restored_ref.version,
                error_chain(&error)
            ),
        };
        self.emit(command, UpdateStage::RolledBack, &detail);
        UpdateStage::RolledBack
    }

    /// Asks for telemetry now and waits until the broker acknowledged it.
    ///
    /// The record waits behind the outbox's backlog, which drains at the drain rate, so
    /// the time that backlog needs is added to the commit timeout: a device catching up
    /// after an outage does not roll back a sound update.
    fn wait_for_acknowledged_telemetry(&self) -> Result<(), String> {
        let (commit_timeout, drain_rate) = {
            let settings = self.settings.borrow();
            (settings.commit_timeout, settings.drain_rate)
        };
        let started = Instant::now();
        let (reply, position) = oneshot::channel();
        self.report_now
            .blocking_send(reply)
            .map_err(|_| "the agent is stopping".to_string())?;
        let position = position
            .blocking_recv()
            .map_err(|_| "the agent is stopping".to_string())?
            .ok_or("telemetry from the new model could not be stored")?;
        let ahead = position.saturating_sub(
            self.outbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .acked_through(),
        );
        let allowed = commit_timeout + Duration::from_secs_f64(ahead as f64 / drain_rate);
        let deadline = started + allowed;
        loop {
            let acked = self
                .outbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .acked_through();
            if acked >= position {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "telemetry from the new model was not acknowledged within {:.1} s \
                     ({} records queued ahead of it)",
                    allowed.as_secs_f64(),
                    ahead.saturating_sub(1)
                ));
            }
            std::thread::sleep(ACK_POLL);
        }
    }
}

/// Loads the bundle's model and runs its self-test. Returns the model and a summary.
pub fn health_check(bundle: &Bundle) -> Result<(SharedModel, String), String> {
    let model = SharedModel::load(bundle)
        .map_err(|error| format!("model did not load: {}", error_chain(&error)))?;
    let report = fleet_runtime::check_self_test(bundle, |input| Ok(model.run(1, input)?.remove(0)))
        .map_err(|error| error_chain(&error))?;
    let detail = format!(
        "{} reference inputs reproduced, largest difference {:.1e} (tolerance {:.1e})",
        report.samples, report.worst_difference, report.tolerance
    );
    Ok((model, detail))
}

fn remove_file(path: &std::path::Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, path = %path.display(), "file not removed");
    }
}

fn remove_dir(path: &std::path::Path) {
    if let Err(error) = std::fs::remove_dir_all(path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, path = %path.display(), "folder not removed");
    }
}
