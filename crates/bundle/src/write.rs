//! Writing a bundle: copy the files, hash them, sign the manifest.

use std::fs;
use std::path::{Path, PathBuf};

use crate::keys::SecretKey;
use crate::{
    Bundle, BundleError, FileEntry, MANIFEST_FILE, Manifest, SIGNATURE_FILE, checked_relative_path,
    sha256_file,
};

/// A file to copy into a bundle.
#[derive(Debug, Clone)]
pub struct BundleFile {
    /// Current location of the file.
    pub source: PathBuf,
    /// Bundle-relative path it gets.
    pub path: String,
}

/// Writes a bundle into `out_dir`, replacing any bundle already there.
///
/// `manifest.files` is filled in from `files`; everything else in `manifest` is written
/// as given. The bundle is assembled in a sibling directory and renamed into place, so a
/// crash leaves either the old bundle or a leftover `.partial` directory, never a
/// half-written bundle at `out_dir`.
pub fn write_bundle(
    out_dir: &Path,
    mut manifest: Manifest,
    files: &[BundleFile],
    key: &SecretKey,
) -> Result<Bundle, BundleError> {
    let staging = partial_dir(out_dir);
    remove_dir_if_present(&staging)?;
    create_dir(&staging)?;

    manifest.files.clear();
    for file in files {
        let relative = checked_relative_path(&file.path)?;
        let destination = staging.join(relative);
        if let Some(parent) = destination.parent() {
            create_dir(parent)?;
        }
        fs::copy(&file.source, &destination).map_err(|source| BundleError::Io {
            path: file.source.clone(),
            source,
        })?;
        manifest.files.push(FileEntry {
            path: file.path.clone(),
            size: file_size(&destination)?,
            sha256: sha256_file(&destination)?,
        });
    }

    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|source| BundleError::InvalidManifest {
            path: staging.join(MANIFEST_FILE),
            source,
        })?;
    write_synced(&staging.join(MANIFEST_FILE), &manifest_bytes)?;
    let signature = hex::encode(key.sign(&manifest_bytes));
    write_synced(
        &staging.join(SIGNATURE_FILE),
        format!("{signature}\n").as_bytes(),
    )?;

    remove_dir_if_present(out_dir)?;
    fs::rename(&staging, out_dir).map_err(|source| BundleError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    tracing::info!(bundle = %out_dir.display(), name = %manifest.name, version = %manifest.version, "bundle written");
    Ok(Bundle {
        dir: out_dir.to_path_buf(),
        manifest,
    })
}

fn partial_dir(out_dir: &Path) -> PathBuf {
    let mut name = out_dir.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out_dir.with_file_name(name)
}

fn create_dir(path: &Path) -> Result<(), BundleError> {
    fs::create_dir_all(path).map_err(|source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn remove_dir_if_present(path: &Path) -> Result<(), BundleError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BundleError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn file_size(path: &Path) -> Result<u64, BundleError> {
    fs::metadata(path)
        .map(|metadata| metadata.len())
        .map_err(|source| BundleError::Io {
            path: path.to_path_buf(),
            source,
        })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let io_error = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::create(path).map_err(io_error)?;
    std::io::Write::write_all(&mut file, bytes).map_err(io_error)?;
    file.sync_all().map_err(io_error)
}
