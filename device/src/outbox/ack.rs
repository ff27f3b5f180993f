//! The acknowledged position: one small checksummed file, replaced atomically.
//!
//! Layout, little-endian: `ACK_MAGIC` (4 bytes), position u64, CRC-32 of the position.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{OutboxError, sync_dir};

const ACK_MAGIC: [u8; 4] = *b"FQAK";
const ACK_FILE_LEN: usize = 16;

/// Name of the file in the outbox folder.
pub const ACK_FILE: &str = "acked";

/// Result of [`read`].
#[derive(Debug, PartialEq, Eq)]
pub enum AckState {
    /// No file yet: nothing was ever acknowledged.
    Missing,
    /// Every position up to and including this one is acknowledged.
    Valid(u64),
    /// The file exists but is not a valid ack file.
    Damaged,
}

/// Reads the ack file in `dir`.
pub fn read(dir: &Path) -> Result<AckState, OutboxError> {
    let path = dir.join(ACK_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(AckState::Missing);
        }
        Err(source) => {
            return Err(OutboxError::Io {
                operation: "read",
                path,
                source,
            });
        }
    };
    Ok(decode(&bytes).map_or(AckState::Damaged, AckState::Valid))
}

fn decode(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != ACK_FILE_LEN || !bytes.starts_with(&ACK_MAGIC) {
        return None;
    }
    let position = u64::from_le_bytes(bytes[4..12].try_into().ok()?);
    let crc = u32::from_le_bytes(bytes[12..16].try_into().ok()?);
    (crc32fast::hash(&position.to_le_bytes()) == crc).then_some(position)
}

fn encode(position: u64) -> [u8; ACK_FILE_LEN] {
    let mut bytes = [0u8; ACK_FILE_LEN];
    bytes[..4].copy_from_slice(&ACK_MAGIC);
    bytes[4..12].copy_from_slice(&position.to_le_bytes());
    bytes[12..].copy_from_slice(&crc32fast::hash(&position.to_le_bytes()).to_le_bytes());
    bytes
}

/// Replaces the ack file in `dir` through a temporary file and a rename, so a crash
/// leaves either the old or the new position. With `durable` the data and the rename
/// are flushed to the device before returning.
pub fn write(dir: &Path, position: u64, durable: bool) -> Result<(), OutboxError> {
    let path = dir.join(ACK_FILE);
    let temporary = temporary_path(dir);
    let io_error = |operation: &'static str, path: &PathBuf| {
        let path = path.clone();
        move |source| OutboxError::Io {
            operation,
            path,
            source,
        }
    };
    let mut file = fs::File::create(&temporary).map_err(io_error("create", &temporary))?;
    file.write_all(&encode(position))
        .map_err(io_error("write", &temporary))?;
    if durable {
        file.sync_data().map_err(io_error("sync", &temporary))?;
    }
    fs::rename(&temporary, &path).map_err(io_error("rename", &temporary))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Returns the temporary file [`write`] uses; one left over by a crash is stale.
pub fn temporary_path(dir: &Path) -> PathBuf {
    dir.join(format!("{ACK_FILE}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), AckState::Missing);
        write(dir.path(), 41, true).unwrap();
        write(dir.path(), 42, false).unwrap();
        assert_eq!(read(dir.path()).unwrap(), AckState::Valid(42));
    }

    #[test]
    fn damaged_ack_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(7);
        bytes[5] ^= 1;
        fs::write(dir.path().join(ACK_FILE), bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), AckState::Damaged);
        fs::write(dir.path().join(ACK_FILE), b"7\n").unwrap();
        assert_eq!(read(dir.path()).unwrap(), AckState::Damaged);
    }
}
