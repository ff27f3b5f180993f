//! The hard-sample folder: one file per sample, waiting for upload, under a size bound.
//!
//! A file is named `{sequence}-{sha256}.sample`. The sequence number rises by one per
//! stored sample and continues after the highest one found at start-up, so name order
//! is capture order, whatever the device clock does. A file contains three parts: the line `fleet-sample 1`, one line of JSON with the
//! content type, the content size and the [`SampleMetadata`], and the sample's bytes. It
//! is written to a `.tmp` file, flushed, renamed and the folder flushed, so after a
//! crash the folder contains whole samples and `.tmp` leftovers, which opening deletes.
//!
//! Files the server rejected for good, or that cannot be read back, are moved into
//! `rejected/` for inspection. They still count towards the size bound, so they never
//! fill the disk; deleting them frees their space at the next start.
//!
//! TODO: a server that starts rejecting every sample fills the bound with rejected files
//! and stops capture until someone deletes them. `rejected/` needs a bound of its own
//! with the oldest files evicted.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fleet_wire::sample::SampleMetadata;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Folder inside the spool where rejected and unreadable samples are moved.
pub const REJECTED_DIR: &str = "rejected";

const MAGIC_LINE: &[u8] = b"fleet-sample 1\n";
const SAMPLE_SUFFIX: &str = ".sample";
const TEMPORARY_SUFFIX: &str = ".tmp";

/// Errors of the hard-sample folder.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("failed to {operation} {path}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("damaged hard-sample file {path}: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

/// The first JSON line of a sample file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FileHeader {
    content_type: String,
    /// Length of the bytes after the header line.
    size: u64,
    metadata: SampleMetadata,
}

/// A sample read back from its file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledSample {
    /// File name, which [`Spool::remove`] and [`Spool::reject`] take.
    pub name: String,
    pub content_type: String,
    pub metadata: SampleMetadata,
    pub bytes: Vec<u8>,
}

/// Result of [`Spool::store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    /// A sample with the same content waits for upload already; nothing was written.
    Duplicate,
    /// The sample would take the folder past its size bound; nothing was written.
    Full,
}

/// Sizes and counts of the folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub pending_samples: usize,
    pub rejected_samples: usize,
    /// Bytes of pending and rejected files together.
    pub used_bytes: u64,
}

#[derive(Debug, Default)]
struct SpoolState {
    /// Pending file names, oldest first, with their sizes.
    pending: BTreeMap<String, u64>,
    /// SHA-256 of every pending sample.
    hashes: HashSet<String>,
    rejected_samples: usize,
    /// Bytes of pending and rejected files, plus space reserved by writes in progress.
    used_bytes: u64,
    /// Sequence number of the next stored sample.
    next_sequence: u64,
}

/// The hard-sample folder, shared by the writer and the uploader thread.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<SpoolState>,
    /// Notified after each stored sample.
    stored: Condvar,
}

impl Spool {
    /// Opens the folder, creating it when missing, deletes `.tmp` leftovers of writes
    /// that a crash cut off, and indexes the pending and rejected samples.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let rejected_dir = dir.join(REJECTED_DIR);
        fs::create_dir_all(&rejected_dir).map_err(io_error("create", &rejected_dir))?;
        let mut state = SpoolState::default();
        for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
            let entry = entry.map_err(io_error("list", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.ends_with(TEMPORARY_SUFFIX) {
                fs::remove_file(&path).map_err(io_error("delete", &path))?;
                tracing::info!(path = %path.display(), "incomplete hard sample deleted");
                continue;
            }
            let Some((sequence, sha256)) = parse_name(&name) else {
                continue;
            };
            state.next_sequence = state.next_sequence.max(sequence + 1);
            let size = entry.metadata().map_err(io_error("read", &path))?.len();
            state.used_bytes += size;
            state.hashes.insert(sha256.to_owned());
            state.pending.insert(name, size);
        }
        for entry in fs::read_dir(&rejected_dir).map_err(io_error("list", &rejected_dir))? {
            let entry = entry.map_err(io_error("list", &rejected_dir))?;
            if let Some((sequence, _)) = parse_name(&entry.file_name().to_string_lossy()) {
                state.next_sequence = state.next_sequence.max(sequence + 1);
            }
            let size = entry
                .metadata()
                .map_err(io_error("read", &entry.path()))?
                .len();
            state.used_bytes += size;
            state.rejected_samples += 1;
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            stored: Condvar::new(),
        })
    }

    /// Writes a sample durably unless its content is pending already or it would take
    /// the folder past its size bound.
    pub fn store(
        &self,
        metadata: &SampleMetadata,
        content_type: &str,
        bytes: &[u8],
    ) -> Result<StoreOutcome, SpoolError> {
        let header = FileHeader {
            content_type: content_type.to_owned(),
            size: bytes.len() as u64,
            metadata: metadata.clone(),
        };
        let header = serde_json::to_vec(&header).expect("the sample header serializes");
        let mut file = Vec::with_capacity(MAGIC_LINE.len() + header.len() + 1 + bytes.len());
        file.extend_from_slice(MAGIC_LINE);
        file.extend_from_slice(&header);
        file.push(b'\n');
        file.extend_from_slice(bytes);
        let size = file.len() as u64;

        // Reserve the space first, so two writers could never pass the bound together.
        let name = {
            let mut state = self.lock();
            if state.hashes.contains(&metadata.sha256) {
                return Ok(StoreOutcome::Duplicate);
            }
            if state.used_bytes + size > self.max_bytes {
                return Ok(StoreOutcome::Full);
            }
            state.used_bytes += size;
            state.hashes.insert(metadata.sha256.clone());
            state.next_sequence += 1;
            format!(
                "{:012}-{}{SAMPLE_SUFFIX}",
                state.next_sequence - 1,
                metadata.sha256
            )
        };
        match self.write_durably(&name, &file) {
            Ok(()) => {
                self.lock().pending.insert(name, size);
                self.stored.notify_all();
                Ok(StoreOutcome::Stored)
            }
            Err(error) => {
                let mut state = self.lock();
                state.used_bytes -= size;
                state.hashes.remove(&metadata.sha256);
                Err(error)
            }
        }
    }

    fn write_durably(&self, name: &str, bytes: &[u8]) -> Result<(), SpoolError> {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!("{name}{TEMPORARY_SUFFIX}"));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&temporary);
            SpoolError::Io {
                operation: "write",
                path: path.clone(),
                source,
            }
        })
    }

    /// Returns the name of the oldest pending sample, waiting up to `timeout` for one.
    pub fn wait_oldest(&self, timeout: Duration) -> Option<String> {
        let state = self.lock();
        let (state, _) = self
            .stored
            .wait_timeout_while(state, timeout, |state| state.pending.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        state.pending.keys().next().cloned()
    }

    /// Reads a pending sample and checks its size and SHA-256.
    pub fn read(&self, name: &str) -> Result<SpooledSample, SpoolError> {
        let path = self.dir.join(name);
        let file = fs::read(&path).map_err(io_error("read", &path))?;
        let damaged = |reason: String| SpoolError::Damaged {
            path: path.clone(),
            reason,
        };
        let rest = file
            .strip_prefix(MAGIC_LINE)
            .ok_or_else(|| damaged("missing the `fleet-sample 1` line".into()))?;
        let end = rest
            .iter()
            .position(|&byte| byte == b'\n')
            .ok_or_else(|| damaged("missing the end of the header line".into()))?;
        let header: FileHeader = serde_json::from_slice(&rest[..end])
            .map_err(|error| damaged(format!("invalid header: {error}")))?;
        let bytes = &rest[end + 1..];
        if bytes.len() as u64 != header.size {
            return Err(damaged(format!(
                "the header promises {} bytes, the file has {}",
                header.size,
                bytes.len()
            )));
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        if sha256 != header.metadata.sha256 {
            return Err(damaged(format!(
                "the bytes hash to SHA-256 {sha256}, the header names {}",
                header.metadata.sha256
            )));
        }
        Ok(SpooledSample {
            name: name.to_owned(),
            content_type: header.content_type,
            metadata: header.metadata,
            bytes: bytes.to_vec(),
        })
    }

    /// Deletes a pending sample, once the server has stored it.
    pub fn remove(&self, name: &str) -> Result<(), SpoolError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => {}
            // Already gone, such as deleted by hand: the index only has to follow.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SpoolError::Io {
                    operation: "delete",
                    path,
                    source,
                });
            }
        }
        let mut state = self.lock();
        if let Some(size) = state.pending.remove(name) {
            state.used_bytes = state.used_bytes.saturating_sub(size);
        }
        if let Some((_, sha256)) = parse_name(name) {
            state.hashes.remove(sha256);
        }
        Ok(())
    }

    /// Moves a pending sample into `rejected/`, where it keeps counting towards the size
    /// bound, and returns its new path.
    pub fn reject(&self, name: &str) -> Result<PathBuf, SpoolError> {
        let path = self.dir.join(name);
        let destination = self.dir.join(REJECTED_DIR).join(name);
        fs::rename(&path, &destination).map_err(io_error("move", &path))?;
        let mut state = self.lock();
        if state.pending.remove(name).is_some() {
            state.rejected_samples += 1;
        }
        if let Some((_, sha256)) = parse_name(name) {
            state.hashes.remove(sha256);
        }
        Ok(destination)
    }

    pub fn stats(&self) -> SpoolStats {
        let state = self.lock();
        SpoolStats {
            pending_samples: state.pending.len(),
            rejected_samples: state.rejected_samples,
            used_bytes: state.used_bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, SpoolState> {
        // Every change to the state is completed before the lock is released, so a
        // panic elsewhere leaves a consistent index behind.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Returns the sequence number and SHA-256 of a sample file name
/// `{sequence}-{sha256}.sample`, or `None` for any other name.
fn parse_name(name: &str) -> Option<(u64, &str)> {
    let stem = name.strip_suffix(SAMPLE_SUFFIX)?;
    let (sequence, sha256) = stem.split_once('-')?;
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let valid = sequence.bytes().all(|b| b.is_ascii_digit())
        && sha256.len() == 64
        && sha256.bytes().all(hex);
    let sequence = sequence.parse().ok()?;
    valid.then_some((sequence, sha256))
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError {
    let path = path.to_path_buf();
    move |source| SpoolError::Io {
        operation,
        path,
        source,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Returns PNG-signed bytes of `len` bytes that differ for each `seed`, and their
    /// metadata.
    pub(crate) fn sample(seed: u8, len: usize) -> (SampleMetadata, Vec<u8>) {
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.resize(len.max(9), seed);
        let metadata = SampleMetadata {
            device_id: "pi-1".into(),
            model_name: "digit-cnn".into(),
            model_version: "1.0.0".into(),
            predicted_class: 3,
            predicted_label: "3".into(),
            confidence: 0.4,
            true_class: Some(5),
            source: format!("t10k#{seed}"),
            device_time_ms: 1_700_000_000_000 + u64::from(seed),
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        (metadata, bytes)
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|entry| entry.path().is_file())
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn stored_sample_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let (metadata, bytes) = sample(1, 300);
        assert_eq!(
            spool.store(&metadata, "image/png", &bytes).unwrap(),
            StoreOutcome::Stored
        );
        let name = spool.wait_oldest(Duration::ZERO).expect("a pending sample");
        assert_eq!(name, format!("000000000000-{}.sample", metadata.sha256));
        let read = spool.read(&name).unwrap();
        assert_eq!(read.metadata, metadata);
        assert_eq!(read.content_type, "image/png");
        assert_eq!(read.bytes, bytes);
        assert_eq!(
            file_names(dir.path()),
            std::slice::from_ref(&name),
            "no temporary file left"
        );

        spool.remove(&name).unwrap();
        assert_eq!(spool.wait_oldest(Duration::ZERO), None);
        assert_eq!(spool.stats().used_bytes, 0);
    }

    #[test]
    fn full_folder_drops_new_samples() {
        let dir = tempfile::tempdir().unwrap();
        let (first, bytes) = sample(1, 400);
        let probe = Spool::open(&dir.path().join("probe"), u64::MAX).unwrap();
        probe.store(&first, "image/png", &bytes).unwrap();
        let file_size = probe.stats().used_bytes;

        // Room for two files and a half.
        let spool = Spool::open(&dir.path().join("spool"), file_size * 5 / 2).unwrap();
        let mut outcomes = Vec::new();
        for seed in 1..=4 {
            let (metadata, bytes) = sample(seed, 400);
            outcomes.push(spool.store(&metadata, "image/png", &bytes).unwrap());
        }
        assert_eq!(
            outcomes,
            [
                StoreOutcome::Stored,
                StoreOutcome::Stored,
                StoreOutcome::Full,
                StoreOutcome::Full
            ]
        );
        let stats = spool.stats();
        assert_eq!(stats.pending_samples, 2);
        assert!(stats.used_bytes <= file_size * 5 / 2, "{stats:?}");
        let oldest = spool.wait_oldest(Duration::ZERO).unwrap();
        assert!(oldest.contains(&first.sha256), "the oldest sample is kept");

        // Uploading one makes room again.
        spool.remove(&oldest).unwrap();
        let (metadata, bytes) = sample(5, 400);
        assert_eq!(
            spool.store(&metadata, "image/png", &bytes).unwrap(),
            StoreOutcome::Stored
        );
    }

    #[test]
    fn rejected_samples_keep_counting_towards_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let (metadata, bytes) = sample(1, 300);
        spool.store(&metadata, "image/png", &bytes).unwrap();
        let used = spool.stats().used_bytes;
        let name = spool.wait_oldest(Duration::ZERO).unwrap();
        let moved = spool.reject(&name).unwrap();
        assert!(moved.is_file());
        assert_eq!(
            spool.stats(),
            SpoolStats {
                pending_samples: 0,
                rejected_samples: 1,
                used_bytes: used
            }
        );
        drop(spool);
        let reopened = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.stats().rejected_samples, 1);
        assert_eq!(reopened.stats().used_bytes, used);
    }

    #[test]
    fn same_content_waits_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let (metadata, bytes) = sample(1, 300);
        spool.store(&metadata, "image/png", &bytes).unwrap();
        let later = SampleMetadata {
            device_time_ms: metadata.device_time_ms + 60_000,
            ..metadata.clone()
        };
        assert_eq!(
            spool.store(&later, "image/png", &bytes).unwrap(),
            StoreOutcome::Duplicate
        );
        assert_eq!(spool.stats().pending_samples, 1);
    }

    #[test]
    fn reopen_indexes_samples_and_deletes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for seed in [2, 1] {
            let (metadata, bytes) = sample(seed, 300);
            spool.store(&metadata, "image/png", &bytes).unwrap();
        }
        let used = spool.stats().used_bytes;
        drop(spool);
        fs::write(dir.path().join("123-abc.sample.tmp"), b"cut off").unwrap();
        fs::write(dir.path().join("notes.txt"), b"not a sample").unwrap();

        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        assert!(!dir.path().join("123-abc.sample.tmp").exists());
        assert_eq!(spool.stats().pending_samples, 2);
        assert_eq!(spool.stats().used_bytes, used);
        let oldest = spool.wait_oldest(Duration::ZERO).unwrap();
        let (first, bytes) = sample(2, 300);
        assert_eq!(oldest, format!("000000000000-{}.sample", first.sha256));
        assert_eq!(
            spool.store(&first, "image/png", &bytes).unwrap(),
            StoreOutcome::Duplicate,
            "the index knows the reopened samples"
        );
        let (third, bytes) = sample(3, 300);
        spool.store(&third, "image/png", &bytes).unwrap();
        assert!(
            dir.path()
                .join(format!("000000000002-{}.sample", third.sha256))
                .is_file(),
            "numbering continues after the reopened samples"
        );
    }

    #[test]
    fn damaged_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let (metadata, bytes) = sample(1, 300);
        spool.store(&metadata, "image/png", &bytes).unwrap();
        let name = spool.wait_oldest(Duration::ZERO).unwrap();
        let path = dir.path().join(&name);
        let mut file = fs::read(&path).unwrap();
        let last = file.len() - 1;
        file[last] ^= 0xff;
        fs::write(&path, &file).unwrap();
        let error = spool.read(&name).unwrap_err().to_string();
        assert!(error.contains("hash to SHA-256"), "{error}");

        file.truncate(file.len() - 10);
        fs::write(&path, &file).unwrap();
        let error = spool.read(&name).unwrap_err().to_string();
        assert!(error.contains("promises 300 bytes"), "{error}");
    }
}
