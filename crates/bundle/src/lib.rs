//! Signed model bundles.
//!
//! A bundle is a directory with the model file(s), `manifest.json` describing them and
//! `manifest.sig`, an ed25519 signature over the exact bytes of `manifest.json` in hex.
//! The manifest lists the size and SHA-256 of every file, so verifying the signature and
//! then each file proves the whole bundle came from the holder of the signing key.
//!
//! ```no_run
//! use fleet_bundle::{Bundle, PublicKey};
//!
//! let key = PublicKey::read(std::path::Path::new("keys/fleet.pub"))?;
//! let bundle = Bundle::open_verified(std::path::Path::new("bundles/digit-cnn-1.0.0"), &key)?;
//! println!("{} {}", bundle.manifest.name, bundle.manifest.version);
//! # Ok::<(), fleet_bundle::BundleError>(())
//! ```

pub mod archive;
mod keys;
mod manifest;
mod write;

use std::fs;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

pub use keys::{PublicKey, SecretKey, generate_key_pair};
pub use manifest::{
    FileEntry, MANIFEST_FORMAT, Manifest, Metrics, ModelFile, Postprocessing, Preprocessing,
    ResizeFilter, SelfTest, TensorSpec,
};
pub use write::{BundleFile, write_bundle};

/// File name of the manifest inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of the signature inside a bundle.
pub const SIGNATURE_FILE: &str = "manifest.sig";

/// Errors from reading, verifying or writing a bundle or a key.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("failed to access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid key file {path}: {reason}")]
    InvalidKey { path: PathBuf, reason: String },
    #[error("invalid signature file {path}: {reason}")]
    InvalidSignature { path: PathBuf, reason: String },
    #[error(
        "signature check failed for {path}: the manifest was changed after signing, or it was \
         signed with a key other than {key_fingerprint}"
    )]
    SignatureMismatch {
        path: PathBuf,
        key_fingerprint: String,
    },
    #[error("invalid manifest {path}")]
    InvalidManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {path} has format {found}, this build reads format {expected}")]
    UnsupportedFormat {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("manifest lists {entry:?}, which is not a plain relative path inside the bundle")]
    UnsafePath { entry: String },
    #[error("manifest names {entry:?} as the {role} but does not list it with a hash")]
    UnlistedFile { entry: String, role: &'static str },
    #[error("bundle file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("bundle file {path} is {found} bytes, the manifest says {expected}{hint}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
        hint: &'static str,
    },
    #[error("bundle file {path} has SHA-256 {found}, the manifest says {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("invalid bundle request: {0}")]
    InvalidRequest(String),
}

/// A bundle whose signature and files have been checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Directory the bundle was read from.
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Opens the bundle in `dir` and checks, in this order, the signature over the
    /// manifest, the manifest's format, and the size and SHA-256 of every listed file.
    /// The error names the first check that failed and the file it failed on.
    pub fn open_verified(dir: &Path, key: &PublicKey) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = read_file(&manifest_path)?;
        let signature_path = dir.join(SIGNATURE_FILE);
        let signature = read_file(&signature_path)?;
        key.verify(&manifest_bytes, &signature, &signature_path)?;

        let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|source| {
            BundleError::InvalidManifest {
                path: manifest_path.clone(),
                source,
            }
        })?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(BundleError::UnsupportedFormat {
                path: manifest_path,
                found: manifest.format,
                expected: MANIFEST_FORMAT,
            });
        }
        check_references(&manifest)?;
        for entry in &manifest.files {
            verify_file(dir, entry)?;
        }
        tracing::debug!(bundle = %dir.display(), name = %manifest.name, version = %manifest.version, "bundle verified");
        Ok(Bundle {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// Returns the absolute path of a bundle-relative file.
    pub fn path_of(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// Reads the class names, one per line, or an empty list when the bundle has none.
    pub fn labels(&self) -> Result<Vec<String>, BundleError> {
        let Some(relative) = &self.manifest.labels else {
            return Ok(Vec::new());
        };
        let path = self.path_of(relative);
        let text = fs::read_to_string(&path).map_err(|source| BundleError::Io { path, source })?;
        Ok(text.lines().map(|line| line.trim().to_string()).collect())
    }
}

/// Makes sure the model and labels named by the manifest are among the hashed files.
fn check_references(manifest: &Manifest) -> Result<(), BundleError> {
    let listed = |entry: &str| manifest.files.iter().any(|file| file.path == entry);
    if !listed(&manifest.model.path) {
        return Err(BundleError::UnlistedFile {
            entry: manifest.model.path.clone(),
            role: "model",
        });
    }
    if let Some(labels) = &manifest.labels
        && !listed(labels)
    {
        return Err(BundleError::UnlistedFile {
            entry: labels.clone(),
            role: "labels file",
        });
    }
    if let Some(test) = &manifest.self_test {
        for (entry, role) in [
            (&test.inputs, "self-test inputs"),
            (&test.outputs, "self-test outputs"),
        ] {
            if !listed(entry) {
                return Err(BundleError::UnlistedFile {
                    entry: entry.clone(),
                    role,
                });
            }
        }
    }
    Ok(())
}

fn verify_file(dir: &Path, entry: &FileEntry) -> Result<(), BundleError> {
    let path = dir.join(checked_relative_path(&entry.path)?);
    let found = match fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(BundleError::MissingFile { path });
        }
        Err(source) => return Err(BundleError::Io { path, source }),
    };
    if found != entry.size {
        let hint = if found < entry.size {
            " (truncated)"
        } else {
            ""
        };
        return Err(BundleError::SizeMismatch {
            path,
            expected: entry.size,
            found,
            hint,
        });
    }
    let digest = sha256_file(&path)?;
    if digest != entry.sha256 {
        return Err(BundleError::HashMismatch {
            path,
            expected: entry.sha256.clone(),
            found: digest,
        });
    }
    Ok(())
}

/// Rejects absolute paths and `..`, so a manifest cannot point outside its bundle.
fn checked_relative_path(entry: &str) -> Result<&Path, BundleError> {
    let path = Path::new(entry);
    let plain = !entry.is_empty()
        && path
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
    if plain {
        Ok(path)
    } else {
        Err(BundleError::UnsafePath {
            entry: entry.to_string(),
        })
    }
}

/// Returns the lowercase hex SHA-256 of a file, read in 64 KiB blocks.
pub fn sha256_file(path: &Path) -> Result<String, BundleError> {
    let io_error = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(io_error)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 64 * 1024];
    loop {
        let read = file.read(&mut block).map_err(io_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&block[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn read_file(path: &Path) -> Result<Vec<u8>, BundleError> {
    fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BundleError::MissingFile {
                path: path.to_path_buf(),
            }
        } else {
            BundleError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}
