//! Writing files so that a crash never leaves a half-written file in place.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Result, TrainError};

/// Writes `bytes` to a temporary file beside `path`, flushes it to disk and renames it
/// over `path`. Readers see either the old file or the new one, never a partial write,
/// and the old file survives when writing fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let write_error = |source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(write_error)?;
    }
    let temporary = temporary_path(path);
    let result = (|| {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    if result.is_err() {
        // Best effort: the temporary file is useless once the write failed.
        let _ = fs::remove_file(&temporary);
    }
    result.map_err(write_error)
}

/// `NAME.tmp-PID` in the same folder, so the rename stays on one file system.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}
