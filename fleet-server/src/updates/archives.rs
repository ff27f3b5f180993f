//! Bundle archives on disk: one `{sha256}.tar` file per bundle in the bundle folder.
//!
//! An upload is streamed into a hidden `.upload-*.partial` file in the same folder while
//! it is hashed. The file is then checked, flushed to storage and renamed to its final
//! name, so the final name never contains a partial file, even after a crash.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use fleet_bundle::{Bundle, BundleError, Manifest, PublicKey, archive};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::UpdateError;

/// Prefix and suffix of the temporary files uploads are written to.
const PARTIAL_PREFIX: &str = ".upload-";
const PARTIAL_SUFFIX: &str = ".partial";
/// Prefix of the temporary folders archives are unpacked into for the signature check.
const VERIFY_PREFIX: &str = ".verify-";
/// Leftover temporary files and folders older than this are deleted at start-up. Any
/// upload still running after a day has long been given up by its client.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Write buffer between the request body and the file.
const WRITE_BUFFER_BYTES: usize = 256 * 1024;

/// The bundle folder.
#[derive(Debug, Clone)]
pub struct ArchiveStore {
    dir: PathBuf,
}

/// An uploaded archive in its temporary file, deleted when dropped unless kept.
#[derive(Debug)]
pub struct Incoming {
    file: tempfile::TempPath,
    pub size: u64,
    /// Lowercase hex SHA-256 of the archive.
    pub sha256: String,
}

impl Incoming {
    pub fn path(&self) -> &Path {
        &self.file
    }
}

impl ArchiveStore {
    /// Creates the folder if needed and deletes temporary files and folders that
    /// uploads older than a day left behind.
    pub fn open(dir: &Path) -> Result<ArchiveStore, UpdateError> {
        std::fs::create_dir_all(dir).map_err(|source| UpdateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        remove_stale_leftovers(dir);
        Ok(ArchiveStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns where the archive with this SHA-256 is kept.
    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar"))
    }

    /// Streams `body` into a temporary file in the bundle folder while hashing it, and
    /// flushes the file to storage. Fails once the body passes `limit` bytes.
    pub async fn receive(&self, body: Body, limit: u64) -> Result<Incoming, UpdateError> {
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UpdateError::Io { path, source }
        };
        let temporary = tempfile::Builder::new()
            .prefix(PARTIAL_PREFIX)
            .suffix(PARTIAL_SUFFIX)
            .tempfile_in(&self.dir)
            .map_err(io_error(&self.dir))?;
        let (file, temporary_path) = temporary.into_parts();
        let path = temporary_path.to_path_buf();
        let mut writer = tokio::io::BufWriter::with_capacity(
            WRITE_BUFFER_BYTES,
            tokio::fs::File::from_std(file),
        );

        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(UpdateError::Body)?;
            size += chunk.len() as u64;
            if size > limit {
                return Err(UpdateError::TooLarge { limit });
            }
            hasher.update(&chunk);
            writer.write_all(&chunk).await.map_err(io_error(&path))?;
        }
        if size == 0 {
            return Err(UpdateError::EmptyBody);
        }
        writer.flush().await.map_err(io_error(&path))?;
        writer
            .into_inner()
            .sync_all()
            .await
            .map_err(io_error(&path))?;
        Ok(Incoming {
            file: temporary_path,
            size,
            sha256: hex::encode(hasher.finalize()),
        })
    }

    /// Renames an uploaded archive to its final name and flushes the folder entry, so
    /// the archive survives power loss once this returns. An archive already there has
    /// the same SHA-256 and so the same bytes, and is replaced.
    pub async fn keep(&self, incoming: Incoming) -> Result<PathBuf, UpdateError> {
        let destination = self.path_of(&incoming.sha256);
        let dir = self.dir.clone();
        let kept = destination.clone();
        tokio::task::spawn_blocking(move || {
            incoming
                .file
                .persist(&kept)
                .map_err(|error| UpdateError::Io {
                    path: kept.clone(),
                    source: error.error,
                })?;
            std::fs::File::open(&dir)
                .and_then(|handle| handle.sync_all())
                .map_err(|source| UpdateError::Io { path: dir, source })
        })
        .await
        .map_err(|error| UpdateError::Task(error.to_string()))??;
        Ok(destination)
    }

    /// Reads the manifest of an uploaded archive and, with `key`, unpacks the archive
    /// into a temporary folder and checks its signature and every file. Runs on the
    /// blocking pool, because unpacking and hashing read the whole archive.
    pub async fn inspect(
        &self,
        incoming: &Incoming,
        key: Option<PublicKey>,
    ) -> Result<Manifest, UpdateError> {
        let archive_path = incoming.path().to_path_buf();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || inspect_archive(&archive_path, &dir, key.as_ref()))
            .await
            .map_err(|error| UpdateError::Task(error.to_string()))?
    }
}

fn inspect_archive(
    archive_path: &Path,
    dir: &Path,
    key: Option<&PublicKey>,
) -> Result<Manifest, UpdateError> {
    let manifest = archive::read_manifest(archive_path).map_err(|error| {
        let reason = match &error {
            // The tar reader reports a body that is not tar as an I/O error.
            BundleError::Io { source, .. } => {
                format!(
                    "not a readable tar archive: {}",
                    printable(&source.to_string())
                )
            }
            other => describe(other, &[(archive_path, "the archive")]),
        };
        UpdateError::InvalidArchive { reason }
    })?;
    let Some(key) = key else {
        return Ok(manifest);
    };

    let scratch = tempfile::Builder::new()
        .prefix(VERIFY_PREFIX)
        .tempdir_in(dir)
        .map_err(|source| UpdateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let unpacked = scratch.path().join("bundle");
    let labels = [
        (archive_path, "the archive"),
        (unpacked.as_path(), "bundle"),
    ];
    archive::unpack(archive_path, &unpacked).map_err(|error| UpdateError::InvalidArchive {
        reason: describe(&error, &labels),
    })?;
    Bundle::open_verified(&unpacked, key).map_err(|error| UpdateError::Unverified {
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        reason: describe(&error, &labels),
    })?;
    Ok(manifest)
}

/// Returns the error with its causes, each temporary path replaced by a label, so the
/// message names the problem without the server's file layout.
fn describe(error: &BundleError, labels: &[(&Path, &str)]) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = std::error::Error::source(cause);
    }
    for (path, label) in labels {
        message = message.replace(&path.display().to_string(), label);
    }
    printable(&message)
}

/// Maximum length of a message taken from an archive error, in characters.
const MAX_REASON_CHARS: usize = 300;

/// Returns `text` with control and non-ASCII characters replaced by `?` and cut to
/// [`MAX_REASON_CHARS`], because errors about a damaged archive may quote its bytes.
fn printable(text: &str) -> String {
    let mut clean: String = text
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() > MAX_REASON_CHARS {
        clean.push_str("...");
    }
    clean
}

/// Deletes temporary upload files and check folders older than [`STALE_AFTER`]. Younger
/// ones may belong to an upload that another server sharing the folder is receiving.
fn remove_stale_leftovers(dir: &Path) {
    remove_stale_entries(dir, STALE_AFTER, "upload leftover", |name| {
        (name.starts_with(PARTIAL_PREFIX) && name.ends_with(PARTIAL_SUFFIX))
            || name.starts_with(VERIFY_PREFIX)
    });
}

/// Deletes the files and folders in `dir` whose name `is_leftover` accepts and that were
/// last modified more than `max_age` ago, logging each deletion as a `what`.
pub(crate) fn remove_stale_entries(
    dir: &Path,
    max_age: Duration,
    what: &str,
    is_leftover: impl Fn(&str) -> bool,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let old = entry
            .metadata()
            .and_then(|metadata| metadata.modified())
            .ok()
            .and_then(|modified| SystemTime::now().duration_since(modified).ok())
            .is_some_and(|age| age > max_age);
        if !(old && is_leftover(&name.to_string_lossy())) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(path = %path.display(), what, "stale file deleted"),
            Err(error) => {
                tracing::warn!(path = %path.display(), what, %error, "failed to delete stale file")
            }
        }
    }
}
