//! Installed bundles on the device and the record of which one runs.
//!
//! Layout under `STATE_DIR/bundles/`:
//!
//! | path | what |
//! |---|---|
//! | `state.json` | the running bundle, the one before it, and an update on trial |
//! | `{sha256}/` | an unpacked bundle, named by the SHA-256 of its archive |
//! | `staging/{sha256}.part` | an archive being downloaded, resumed after a restart |
//!
//! `state.json` is replaced by writing a temporary file, flushing it and renaming it, so
//! after a crash it names either the old or the new bundles. An update is first recorded
//! as a trial. An agent that starts and finds a trial never saw it committed, so it goes
//! back to the previous bundle. With no installed bundle the agent runs the factory
//! bundle given by `--bundle`, which is never deleted.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_bundle::archive;
use serde::{Deserialize, Serialize};

const STATE_FILE: &str = "state.json";
const STAGING_DIR: &str = "staging";

/// Errors from reading or changing the installed bundles.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the factory bundle {path}")]
    Factory {
        path: PathBuf,
        #[source]
        source: fleet_bundle::BundleError,
    },
    #[error("no update is on trial")]
    NoTrial,
}

/// One bundle the agent can run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledBundle {
    /// SHA-256 of the bundle's archive, which names it.
    pub sha256: String,
    pub name: String,
    pub version: String,
    pub dir: PathBuf,
}

/// An update the agent switched to and has not committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub update_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct InstallState {
    /// The running bundle; `None` runs the factory bundle.
    current: Option<InstalledBundle>,
    /// The bundle that ran before `current`, kept for a rollback.
    previous: Option<InstalledBundle>,
    trial: Option<Trial>,
    /// Updates rolled back here, most recent last. A command for one of them again is
    /// refused: a model that brought the agent down would otherwise do so again each
    /// time the server repeats the command.
    #[serde(default)]
    rolled_back: Vec<String>,
}

/// Rolled-back update ids remembered.
const ROLLED_BACK_KEPT: usize = 32;

/// Trial undone by [`BundleStore::open`] at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The trial that was not committed before the agent stopped.
    pub trial: Trial,
    /// The bundle of that trial, now removed.
    pub abandoned: InstalledBundle,
}

/// The installed bundles and the state file that names the running one.
#[derive(Debug)]
pub struct BundleStore {
    root: PathBuf,
    state: InstallState,
    factory: InstalledBundle,
}

impl BundleStore {
    /// Opens the store in `root`, creating it when missing. An update left on trial is
    /// rolled back and returned. A damaged state file is set aside, and the agent runs the
    /// factory bundle, because no record names a sound installed bundle.
    pub fn open(
        root: &Path,
        factory_dir: &Path,
    ) -> Result<(BundleStore, Option<Recovery>), StoreError> {
        fs::create_dir_all(root.join(STAGING_DIR)).map_err(io_error(root))?;
        let (_, sha256) =
            archive::archive_digest(factory_dir).map_err(|source| StoreError::Factory {
                path: factory_dir.to_path_buf(),
                source,
            })?;
        let manifest = archive_manifest(factory_dir)?;
        let factory = InstalledBundle {
            sha256,
            name: manifest.name,
            version: manifest.version,
            dir: factory_dir.to_path_buf(),
        };
        let state = read_state(root)?;
        let mut store = BundleStore {
            root: root.to_path_buf(),
            state,
            factory,
        };
        let recovery = match store.state.trial.clone() {
            Some(trial) => {
                let abandoned = store.active().clone();
                // A storage device that rejects the write (full, or remounted read-only)
                // must not keep the agent from starting. The rollback applies in memory,
                // and the next start finds the trial again and retries.
                if let Err(error) = store.roll_back() {
                    tracing::error!(error = %crate::forward::error_chain(&error), "rollback not written to the install state");
                }
                tracing::warn!(update_id = %trial.update_id, version = %abandoned.version, "update was not committed before the agent stopped; rolled back");
                Some(Recovery { trial, abandoned })
            }
            None => None,
        };
        store.collect_garbage();
        Ok((store, recovery))
    }

    /// Returns the bundle that runs now.
    pub fn active(&self) -> &InstalledBundle {
        self.state.current.as_ref().unwrap_or(&self.factory)
    }

    /// Returns the update on trial, if any.
    pub fn trial(&self) -> Option<&Trial> {
        self.state.trial.as_ref()
    }

    /// Returns whether the update with this id was rolled back on this device.
    pub fn was_rolled_back(&self, update_id: &str) -> bool {
        self.state.rolled_back.iter().any(|id| id == update_id)
    }

    /// Returns where an archive with this hash is downloaded to.
    pub fn staging_path(&self, sha256: &str) -> PathBuf {
        self.root.join(STAGING_DIR).join(format!("{sha256}.part"))
    }

    /// Returns where the bundle of an archive with this hash is unpacked to.
    pub fn bundle_dir(&self, sha256: &str) -> PathBuf {
        self.root.join(sha256)
    }

    /// Records `bundle` as running on trial, with the running bundle kept as previous.
    pub fn begin_trial(
        &mut self,
        bundle: InstalledBundle,
        update_id: &str,
    ) -> Result<(), StoreError> {
        let previous = self.active().clone();
        self.save(InstallState {
            current: Some(bundle),
            previous: Some(previous),
            trial: Some(Trial {
                update_id: update_id.to_string(),
            }),
            rolled_back: self.state.rolled_back.clone(),
        })
    }

    /// Makes the trial final and removes bundles that are neither running nor previous.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.state.trial.is_none() {
            return Err(StoreError::NoTrial);
        }
        let mut state = self.state.clone();
        state.trial = None;
        self.save(state)?;
        self.collect_garbage();
        Ok(())
    }

    /// Goes back to the previous bundle (the factory bundle when there is none) and
    /// removes the one that ran. Returns the bundle that runs now.
    pub fn roll_back(&mut self) -> Result<InstalledBundle, StoreError> {
        let mut rolled_back = self.state.rolled_back.clone();
        if let Some(trial) = &self.state.trial {
            rolled_back.push(trial.update_id.clone());
            let excess = rolled_back.len().saturating_sub(ROLLED_BACK_KEPT);
            rolled_back.drain(..excess);
        }
        let state = InstallState {
            current: self.state.previous.clone(),
            previous: None,
            trial: None,
            rolled_back,
        };
        if let Err(error) = self.save(state.clone()) {
            self.state = state;
            return Err(error);
        }
        self.collect_garbage();
        Ok(self.active().clone())
    }

    /// Writes `state` and then uses it. A rollback uses its state even when the write
    /// fails, since the old model runs again either way.
    fn save(&mut self, state: InstallState) -> Result<(), StoreError> {
        let path = self.root.join(STATE_FILE);
        let temporary = self.root.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(&state).expect("the install state serializes");
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temporary)?;
            std::io::Write::write_all(&mut file, &bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            fs::File::open(&self.root)?.sync_all()
        };
        write().map_err(io_error(&path))?;
        self.state = state;
        Ok(())
    }

    /// Removes unpacked bundles that are neither running nor previous. Failures are only
    /// logged: a leftover folder wastes space but harms nothing.
    fn collect_garbage(&self) {
        let keep: Vec<&str> = [&self.state.current, &self.state.previous]
            .into_iter()
            .flatten()
            .map(|bundle| bundle.sha256.as_str())
            .collect();
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_bundle = entry.path().is_dir()
                && name != STAGING_DIR
                && (is_sha256(&name) || name.ends_with(".partial"));
            if is_bundle && !keep.contains(&name.as_str()) {
                match fs::remove_dir_all(entry.path()) {
                    Ok(()) => tracing::debug!(bundle = %name, "unused bundle removed"),
                    Err(error) => {
                        tracing::warn!(%error, bundle = %name, "unused bundle not removed")
                    }
                }
            }
        }
    }
}

/// Returns whether `text` is a lowercase hex SHA-256.
pub fn is_sha256(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn read_state(root: &Path) -> Result<InstallState, StoreError> {
    let path = root.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(InstallState::default());
        }
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    match serde_json::from_slice::<InstallState>(&bytes) {
        Ok(state) => Ok(state),
        Err(error) => {
            let aside = root.join(format!("{STATE_FILE}.damaged-{}", crate::unix_millis()));
            fs::rename(&path, &aside).map_err(io_error(&path))?;
            tracing::error!(%error, set_aside = %aside.display(), "install state is damaged; running the factory bundle");
            Ok(InstallState::default())
        }
    }
}

/// Reads a bundle's manifest for its name and version; the signature is checked when the
/// bundle is loaded.
fn archive_manifest(dir: &Path) -> Result<fleet_bundle::Manifest, StoreError> {
    let path = dir.join(fleet_bundle::MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(io_error(&path))?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Factory {
        path: dir.to_path_buf(),
        source: fleet_bundle::BundleError::InvalidManifest { path, source },
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(sha: char, root: &Path) -> InstalledBundle {
        let sha256: String = std::iter::repeat_n(sha, 64).collect();
        let dir = root.join(&sha256);
        fs::create_dir_all(&dir).unwrap();
        InstalledBundle {
            sha256,
            name: "digit-cnn".into(),
            version: format!("1.{sha}"),
            dir,
        }
    }

    fn factory(dir: &Path) -> PathBuf {
        let (secret, _) = fleet_bundle::generate_key_pair().unwrap();
        let model = dir.join("model.onnx");
        fs::write(&model, b"not read by these tests").unwrap();
        let manifest: fleet_bundle::Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "name": "digit-cnn", "version": "1.0.0", "target": "any",
            "created_by": "tests", "model": {"path": "model.onnx", "format": "onnx"},
            "inputs": [], "outputs": [],
            "preprocessing": {"kind": "grayscale", "width": 28, "height": 28,
                "resize": "bilinear", "scale": 1.0, "offset": 0.0},
            "postprocessing": "softmax", "labels": null, "metrics": null, "files": []
        }))
        .unwrap();
        let files = [fleet_bundle::BundleFile {
            source: model,
            path: "model.onnx".into(),
        }];
        let out = dir.join("factory");
        fleet_bundle::write_bundle(&out, manifest, &files, &secret).unwrap();
        out
    }

    #[test]
    fn open_rolls_back_leftover_trial() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bundles");
        let factory = factory(dir.path());
        let (mut store, recovery) = BundleStore::open(&root, &factory).unwrap();
        assert_eq!(recovery, None);
        assert_eq!(store.active().dir, factory);

        let first = bundle('a', &root);
        store.begin_trial(first.clone(), "u-1").unwrap();
        store.commit().unwrap();
        let second = bundle('b', &root);
        store.begin_trial(second.clone(), "u-2").unwrap();
        drop(store);

        let (store, recovery) = BundleStore::open(&root, &factory).unwrap();
        let recovery = recovery.expect("the trial is undone");
        assert_eq!(recovery.trial.update_id, "u-2");
        assert_eq!(recovery.abandoned, second);
        assert_eq!(store.active(), &first);
        assert!(first.dir.is_dir());
        assert!(!second.dir.exists(), "the abandoned bundle is removed");
        assert!(store.was_rolled_back("u-2"));
        assert!(!store.was_rolled_back("u-1"));
    }

    #[test]
    fn commit_keeps_running_and_previous() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bundles");
        let factory = factory(dir.path());
        let (mut store, _) = BundleStore::open(&root, &factory).unwrap();
        let mut installed = Vec::new();
        for (sha, id) in [('a', "u-1"), ('b', "u-2"), ('c', "u-3")] {
            // Unpacked just before its trial, as the updater does.
            let bundle = bundle(sha, &root);
            store.begin_trial(bundle.clone(), id).unwrap();
            store.commit().unwrap();
            installed.push(bundle);
        }
        let [a, b, c] = &installed[..] else {
            unreachable!()
        };
        assert_eq!(store.active(), c);
        assert!(
            !a.dir.exists(),
            "the bundle before the previous one is removed"
        );
        assert!(b.dir.is_dir(), "the previous bundle is kept");
        assert!(c.dir.is_dir(), "the running bundle is kept");
        assert!(factory.is_dir(), "the factory bundle is never removed");
        assert!(matches!(store.commit(), Err(StoreError::NoTrial)));
    }

    #[test]
    fn damaged_state_file_falls_back_to_factory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("bundles");
        let factory = factory(dir.path());
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join(STATE_FILE), b"{\"current\": {\"sha").unwrap();
        let (store, recovery) = BundleStore::open(&root, &factory).unwrap();
        assert_eq!(recovery, None);
        assert_eq!(store.active().dir, factory);
        let aside = fs::read_dir(&root).unwrap().flatten().any(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .starts_with("state.json.damaged-")
        });
        assert!(aside, "the damaged file is kept for inspection");
    }
}
