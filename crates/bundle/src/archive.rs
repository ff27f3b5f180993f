//! Bundle archives: one tar file per bundle, the form in which bundles travel from the
//! fleet server to devices.
//!
//! [`pack`] writes the manifest, the signature and every listed file, sorted, with fixed
//! owner, mode and time, so packing the same bundle twice gives the same bytes and the
//! same SHA-256. [`unpack`] accepts only regular files at plain relative paths that the
//! bundle may contain, and the caller verifies the result with [`Bundle::open_verified`]
//! before using it.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::write::remove_dir_if_present;
use crate::{
    BundleError, MANIFEST_FILE, Manifest, SIGNATURE_FILE, checked_relative_path, read_file,
};

/// Most entries [`unpack`] accepts; a bundle has a handful of files.
const MAX_ENTRIES: usize = 1000;
/// Largest manifest or signature read out of an archive before the signature is checked.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// Writes the bundle in `dir` as a tar archive to `out`. Files outside the manifest are
/// left out, so the archive carries exactly what the signature covers.
pub fn pack(dir: &Path, out: impl Write) -> Result<(), BundleError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest_bytes = read_file(&manifest_path)?;
    let manifest: Manifest =
        serde_json::from_slice(&manifest_bytes).map_err(|source| BundleError::InvalidManifest {
            path: manifest_path.clone(),
            source,
        })?;
    let mut entries: BTreeSet<String> = manifest
        .files
        .iter()
        .map(|entry| entry.path.clone())
        .collect();
    for path in &entries {
        checked_relative_path(path)?;
    }
    entries.remove(MANIFEST_FILE);
    entries.remove(SIGNATURE_FILE);

    let mut builder = tar::Builder::new(out);
    let mut names = vec![MANIFEST_FILE.to_string(), SIGNATURE_FILE.to_string()];
    names.extend(entries);
    for name in &names {
        let path = dir.join(name);
        let io_error = |source| BundleError::Io {
            path: path.clone(),
            source,
        };
        let mut file = fs::File::open(&path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                BundleError::MissingFile { path: path.clone() }
            } else {
                io_error(source)
            }
        })?;
        let size = file.metadata().map_err(io_error)?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, name, &mut file)
            .map_err(io_error)?;
    }
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|source| BundleError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Packs the bundle in `dir` into the file `archive`, written beside it under a temporary
/// name and renamed into place, and returns the archive's size and SHA-256.
pub fn pack_to_file(dir: &Path, archive: &Path) -> Result<(u64, String), BundleError> {
    let partial = with_suffix(archive, ".partial");
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    let file = fs::File::create(&partial).map_err(io_error(&partial))?;
    let mut writer = std::io::BufWriter::new(file);
    pack(dir, &mut writer)?;
    let file = writer
        .into_inner()
        .map_err(|error| io_error(&partial)(error.into_error()))?;
    file.sync_all().map_err(io_error(&partial))?;
    drop(file);
    fs::rename(&partial, archive).map_err(io_error(archive))?;
    let size = fs::metadata(archive).map_err(io_error(archive))?.len();
    Ok((size, crate::sha256_file(archive)?))
}

/// Returns the size and SHA-256 the archive of the bundle in `dir` has, without writing
/// it anywhere: what a device compares an update's hash with.
pub fn archive_digest(dir: &Path) -> Result<(u64, String), BundleError> {
    let mut writer = DigestWriter::default();
    pack(dir, &mut writer)?;
    Ok((writer.bytes, hex::encode(writer.hasher.finalize())))
}

/// A writer that only counts and hashes what it is given.
#[derive(Default)]
struct DigestWriter {
    hasher: Sha256,
    bytes: u64,
}

impl Write for DigestWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads the manifest out of an archive without unpacking it or checking its signature,
/// for a server that lists what it stores. Devices must use [`unpack`] and
/// [`Bundle::open_verified`](crate::Bundle::open_verified) instead.
pub fn read_manifest(archive: &Path) -> Result<Manifest, BundleError> {
    let io_error = |source| BundleError::Io {
        path: archive.to_path_buf(),
        source,
    };
    let file = fs::File::open(archive).map_err(io_error)?;
    let mut tar = tar::Archive::new(file);
    for entry in tar.entries().map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let name = entry
            .path()
            .map_err(io_error)?
            .to_string_lossy()
            .into_owned();
        if name != MANIFEST_FILE {
            continue;
        }
        if entry.size() > MAX_MANIFEST_BYTES {
            return Err(BundleError::InvalidRequest(format!(
                "{MANIFEST_FILE} in archive {} is {} bytes, more than the limit of \
                 {MAX_MANIFEST_BYTES}",
                archive.display(),
                entry.size()
            )));
        }
        let mut bytes = Vec::new();
        entry
            .take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut bytes)
            .map_err(io_error)?;
        return serde_json::from_slice(&bytes).map_err(|source| BundleError::InvalidManifest {
            path: archive.join(MANIFEST_FILE),
            source,
        });
    }
    Err(BundleError::MissingFile {
        path: archive.join(MANIFEST_FILE),
    })
}

/// Unpacks `archive` into the new directory `dest`.
///
/// The files are written and flushed to storage in `dest.partial`, which is then renamed
/// to `dest`, so after a crash `dest` is either absent or complete. Links, devices,
/// absolute paths, `..` and names listed twice are refused, naming the entry. The result
/// is not yet trusted: verify it with [`Bundle::open_verified`](crate::Bundle::open_verified).
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), BundleError> {
    let partial = with_suffix(dest, ".partial");
    remove_dir_if_present(&partial)?;
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    fs::create_dir_all(&partial).map_err(io_error(&partial))?;
    let file = fs::File::open(archive).map_err(io_error(archive))?;
    let mut tar = tar::Archive::new(file);
    let mut seen = BTreeSet::new();
    let mut directories = BTreeSet::from([partial.clone()]);
    for (index, entry) in tar.entries().map_err(io_error(archive))?.enumerate() {
        if index >= MAX_ENTRIES {
            return Err(BundleError::InvalidRequest(format!(
                "archive {} has more than {MAX_ENTRIES} entries",
                archive.display()
            )));
        }
        let mut entry = entry.map_err(io_error(archive))?;
        let name = entry
            .path()
            .map_err(io_error(archive))?
            .to_string_lossy()
            .into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(BundleError::InvalidRequest(format!(
                "archive {} entry {name:?} is a {:?}, only regular files are allowed",
                archive.display(),
                entry.header().entry_type()
            )));
        }
        let relative = checked_relative_path(&name).map_err(|_| {
            BundleError::InvalidRequest(format!(
                "archive {} entry {name:?} is not a plain relative path",
                archive.display()
            ))
        })?;
        if !seen.insert(name.clone()) {
            return Err(BundleError::InvalidRequest(format!(
                "archive {} lists {name:?} twice",
                archive.display()
            )));
        }
        let target = partial.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_error(parent))?;
            directories.insert(parent.to_path_buf());
        }
        let mut out = fs::File::create(&target).map_err(io_error(&target))?;
        std::io::copy(&mut entry, &mut out).map_err(io_error(&target))?;
        out.sync_all().map_err(io_error(&target))?;
    }
    for directory in &directories {
        sync_dir(directory)?;
    }
    remove_dir_if_present(dest)?;
    fs::rename(&partial, dest).map_err(io_error(dest))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Flushes a directory's entries to storage, so a rename inside it survives power loss.
pub fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| BundleError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}
