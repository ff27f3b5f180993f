//! The telemetry sequence number, kept on disk so it keeps rising across restarts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A counter stored in one small file, replaced atomically on every increment.
#[derive(Debug)]
pub struct SequenceFile {
    path: PathBuf,
    last: u64,
}

impl SequenceFile {
    /// Opens the counter in `state_dir`, starting from 0 when the file does not exist.
    pub fn open(state_dir: &Path) -> anyhow::Result<SequenceFile> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("failed to create state folder {}", state_dir.display()))?;
        let path = state_dir.join("telemetry.seq");
        let last = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().with_context(|| {
                format!(
                    "invalid sequence file {}: expected one number; delete it only if the \
                     server may receive repeated sequence numbers",
                    path.display()
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => {
                return Err(error).with_context(|| format!("failed to read {}", path.display()));
            }
        };
        Ok(SequenceFile { path, last })
    }

    /// Returns the next number after making it durable, so a number is never reused
    /// after a crash or power loss.
    pub fn next(&mut self) -> anyhow::Result<u64> {
        let next = self.last + 1;
        let temporary = self.path.with_extension("seq.tmp");
        let mut file = fs::File::create(&temporary)
            .with_context(|| format!("failed to write {}", temporary.display()))?;
        writeln!(file, "{next}")?;
        file.sync_all()?;
        fs::rename(&temporary, &self.path)
            .with_context(|| format!("failed to replace {}", self.path.display()))?;
        self.last = next;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut sequence = SequenceFile::open(dir.path()).unwrap();
        assert_eq!(sequence.next().unwrap(), 1);
        assert_eq!(sequence.next().unwrap(), 2);
        let mut reopened = SequenceFile::open(dir.path()).unwrap();
        assert_eq!(reopened.next().unwrap(), 3);
    }

    #[test]
    fn damaged_sequence_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("telemetry.seq"), "garbage").unwrap();
        let error = SequenceFile::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("telemetry.seq"), "{error}");
    }
}
