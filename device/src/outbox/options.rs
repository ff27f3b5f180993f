//! Outbox settings: the fsync policy and the size bounds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::OutboxError;

/// When appended records are flushed from the page cache to the storage device with
/// fsync. A process crash (SIGKILL included) loses nothing under any policy, because
/// written data stays in the page cache. The policy decides what a power loss can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Flush after every record and write the acknowledged position after every
    /// acknowledgement: a power loss loses no appended record, at about three fsyncs
    /// per record sent.
    EveryRecord,
    /// Flush at most once per interval: the append that comes after a quiet interval
    /// flushes at once. The rest wait for [`Outbox::sync_if_due`](super::Outbox::sync_if_due),
    /// which the agent calls every 250 ms, so a power loss can lose the records of about
    /// the last interval.
    Interval(Duration),
    /// Never flush; the kernel writes back on its own schedule (within about 30 s by
    /// Linux's default `vm.dirty_expire_centisecs`). For tests and benchmarks, or
    /// storage where power loss is not a concern.
    Never,
}

/// Defaults to [`FsyncPolicy::Interval`] of one second.
///
/// The agent appends one record per telemetry interval (5 s by default, 2 s in the
/// demo). At those rates every record is still flushed when it is appended, so a power
/// loss loses no record that `append` returned. Only when records come
/// faster than one a second are flushes batched, which caps the writes that wear flash
/// storage (SD cards, eMMC) at one flush a second. The acknowledged position is written
/// at the same cadence instead of after every acknowledgement: a stale one only makes the
/// agent send a few records again, and the server drops duplicates by (device, seq).
impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval(Duration::from_secs(1))
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::EveryRecord => f.write_str("every-record"),
            FsyncPolicy::Interval(interval) => write!(f, "{}ms", interval.as_millis()),
            FsyncPolicy::Never => f.write_str("never"),
        }
    }
}

impl FromStr for FsyncPolicy {
    type Err = String;

    /// Parses `every-record`, `never`, or an interval in milliseconds such as `1000ms`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "every-record" => Ok(FsyncPolicy::EveryRecord),
            "never" => Ok(FsyncPolicy::Never),
            _ => text
                .strip_suffix("ms")
                .and_then(|millis| millis.parse::<u64>().ok())
                .filter(|&millis| millis > 0)
                .map(|millis| FsyncPolicy::Interval(Duration::from_millis(millis)))
                .ok_or_else(|| {
                    format!(
                        "invalid fsync policy {text:?}: expected every-record, never, or an \
                         interval in milliseconds such as 1000ms"
                    )
                }),
        }
    }
}

/// Settings of an [`Outbox`](super::Outbox).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxOptions {
    pub fsync: FsyncPolicy,
    /// Bound on the bytes in segment files. When an append would pass it, the oldest
    /// segment is deleted, so drops come a whole segment at a time.
    pub max_bytes: u64,
    /// Size at which a new segment file is started; also the unit of dropping.
    pub segment_bytes: u64,
}

/// Default bound on the queue: 16 MiB.
///
/// A postcard telemetry record takes about 110 bytes on disk (92-byte payload, measured
/// by the ingest benchmark, plus the 16-byte record header), so 16 MiB fits about
/// 150,000 records: 8.7 days at one message per 5 s. The in-memory index costs 24 bytes a
/// record, about 3.6 MiB when full.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

/// Default segment size: 1 MiB, so a full queue drops 1/16 of itself at a time.
pub const DEFAULT_SEGMENT_BYTES: u64 = 1024 * 1024;

/// Smallest segment size accepted; it must fit a header and a telemetry record.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            fsync: FsyncPolicy::default(),
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }
}

impl OutboxOptions {
    /// Checks that the sizes leave room for at least two segments.
    pub fn validate(&self) -> Result<(), OutboxError> {
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return Err(OutboxError::InvalidOptions(format!(
                "segment size {} bytes is under the minimum of {MIN_SEGMENT_BYTES} bytes",
                self.segment_bytes
            )));
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(OutboxError::InvalidOptions(format!(
                "size bound {} bytes must be at least two segments ({} bytes)",
                self.max_bytes,
                2 * self.segment_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_and_prints() {
        for text in ["every-record", "never", "250ms"] {
            let policy: FsyncPolicy = text.parse().unwrap();
            assert_eq!(policy.to_string(), text);
        }
        assert_eq!(
            "1000ms".parse::<FsyncPolicy>().unwrap(),
            FsyncPolicy::Interval(Duration::from_secs(1))
        );
        for bad in ["always", "0ms", "1s", ""] {
            let error = bad.parse::<FsyncPolicy>().unwrap_err();
            assert!(error.contains("every-record"), "{error}");
        }
    }

    #[test]
    fn sizes_are_validated() {
        let mut options = OutboxOptions::default();
        assert!(options.validate().is_ok());
        options.max_bytes = options.segment_bytes;
        assert!(options.validate().is_err());
        options.segment_bytes = 100;
        assert!(options.validate().is_err());
    }
}
