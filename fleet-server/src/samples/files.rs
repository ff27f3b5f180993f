//! Sample files on disk: one `{sha256}.png` or `{sha256}.jpg` file per content in the
//! sample folder.
//!
//! A sample is written to a hidden `.upload-*.partial` file in the same folder, flushed
//! to storage and renamed to its final name, so the final name never contains a
//! partial file, even after a crash.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::SampleError;

/// Prefix and suffix of the temporary files samples are written to.
const PARTIAL_PREFIX: &str = ".upload-";
const PARTIAL_SUFFIX: &str = ".partial";
/// Leftover temporary files older than this are deleted at start-up. Younger ones may
/// belong to an upload that another server sharing the folder is writing.
const STALE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Content types the server stores, with the signature their files start with and the
/// file name extension.
const IMAGE_TYPES: [(&str, &[u8], &str); 2] = [
    ("image/png", b"\x89PNG\r\n\x1a\n", "png"),
    ("image/jpeg", b"\xff\xd8\xff", "jpg"),
];

/// Returns the supported content type that `header` names, ignoring parameters and case,
/// as a `'static` name.
pub fn supported_content_type(header: &str) -> Option<&'static str> {
    let essence = header.split(';').next().unwrap_or_default().trim();
    IMAGE_TYPES
        .iter()
        .find(|(name, _, _)| name.eq_ignore_ascii_case(essence))
        .map(|(name, _, _)| *name)
}

/// Returns whether `bytes` start with the signature of `content_type`.
pub fn has_signature(content_type: &str, bytes: &[u8]) -> bool {
    IMAGE_TYPES
        .iter()
        .any(|(name, signature, _)| *name == content_type && bytes.starts_with(signature))
}

/// Returns the file name extension of a supported content type, `bin` for any other.
fn extension(content_type: &str) -> &'static str {
    IMAGE_TYPES
        .iter()
        .find(|(name, _, _)| *name == content_type)
        .map_or("bin", |(_, _, extension)| extension)
}

/// The sample folder.
#[derive(Debug, Clone)]
pub struct SampleFiles {
    dir: PathBuf,
}

impl SampleFiles {
    /// Creates the folder if needed and deletes temporary files that uploads older than
    /// a day left behind.
    pub fn open(dir: &Path) -> Result<SampleFiles, SampleError> {
        std::fs::create_dir_all(dir).map_err(|source| SampleError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        remove_stale_partials(dir);
        Ok(SampleFiles {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns where the sample with this SHA-256 and content type is kept.
    pub fn path_of(&self, sha256: &str, content_type: &str) -> PathBuf {
        self.dir
            .join(format!("{sha256}.{}", extension(content_type)))
    }

    /// Writes `bytes` under their final name through a flushed temporary file, and
    /// flushes the folder entry, so the file survives power loss once this returns. A
    /// file already there has the same SHA-256 and so the same bytes, and is replaced.
    pub async fn write(
        &self,
        sha256: &str,
        content_type: &str,
        bytes: bytes::Bytes,
    ) -> Result<PathBuf, SampleError> {
        let destination = self.path_of(sha256, content_type);
        let dir = self.dir.clone();
        let final_path = destination.clone();
        tokio::task::spawn_blocking(move || write_durably(&dir, &final_path, &bytes))
            .await
            .map_err(|error| SampleError::Task(error.to_string()))??;
        Ok(destination)
    }

    /// Reads the file of a sample.
    pub async fn read(&self, sha256: &str, content_type: &str) -> Result<Vec<u8>, SampleError> {
        let path = self.path_of(sha256, content_type);
        tokio::fs::read(&path)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => SampleError::FileMissing {
                    sha256: sha256.to_owned(),
                },
                _ => SampleError::Io { path, source },
            })
    }

    /// Returns whether the file of a sample exists.
    pub async fn exists(&self, sha256: &str, content_type: &str) -> bool {
        tokio::fs::try_exists(self.path_of(sha256, content_type))
            .await
            .unwrap_or(false)
    }
}

fn write_durably(dir: &Path, destination: &Path, bytes: &[u8]) -> Result<(), SampleError> {
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SampleError::Io { path, source }
    };
    let mut temporary = tempfile::Builder::new()
        .prefix(PARTIAL_PREFIX)
        .suffix(PARTIAL_SUFFIX)
        .tempfile_in(dir)
        .map_err(io_error(dir))?;
    temporary
        .write_all(bytes)
        .map_err(io_error(temporary.path()))?;
    temporary
        .as_file()
        .sync_all()
        .map_err(io_error(temporary.path()))?;
    temporary
        .persist(destination)
        .map_err(|error| SampleError::Io {
            path: destination.to_path_buf(),
            source: error.error,
        })?;
    std::fs::File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(dir))
}

/// Deletes temporary upload files older than [`STALE_AFTER`].
fn remove_stale_partials(dir: &Path) {
    crate::updates::archives::remove_stale_entries(dir, STALE_AFTER, "sample upload", |name| {
        name.starts_with(PARTIAL_PREFIX) && name.ends_with(PARTIAL_SUFFIX)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_ignore_case_and_parameters() {
        assert_eq!(supported_content_type("image/png"), Some("image/png"));
        assert_eq!(
            supported_content_type("Image/JPEG; q=1"),
            Some("image/jpeg")
        );
        assert_eq!(supported_content_type("image/gif"), None);
        assert_eq!(supported_content_type(""), None);
    }

    #[test]
    fn signatures_must_match_the_content_type() {
        let png = b"\x89PNG\r\n\x1a\nrest";
        assert!(has_signature("image/png", png));
        assert!(!has_signature("image/jpeg", png));
        assert!(has_signature("image/jpeg", b"\xff\xd8\xff\xe0rest"));
        assert!(!has_signature("image/png", b"\x89PN"));
    }

    #[tokio::test]
    async fn write_leaves_only_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = SampleFiles::open(dir.path()).unwrap();
        let sha256 = "ab".repeat(32);
        let path = files
            .write(&sha256, "image/png", bytes::Bytes::from_static(b"pixels"))
            .await
            .unwrap();
        assert_eq!(path, dir.path().join(format!("{sha256}.png")));
        assert_eq!(files.read(&sha256, "image/png").await.unwrap(), b"pixels");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let missing = files.read(&"cd".repeat(32), "image/png").await.unwrap_err();
        assert!(
            matches!(missing, SampleError::FileMissing { .. }),
            "{missing}"
        );
    }
}
