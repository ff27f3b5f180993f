//! The outbox: an on-disk queue that keeps telemetry until the broker acknowledges it, so
//! a broker outage, a crash or a reboot loses nothing that fits in the size bound.
//!
//! Records go to append-only segment files named by their first position
//! (`00000000000000000001.seg`), each record with its length, position and a CRC-32 (the
//! format is in [`segment`]). Positions are the queue's own numbers, rising by one per
//! record; they are not the telemetry sequence numbers. The highest position the broker
//! acknowledged is kept in the `acked` file, and a segment file is deleted once all its
//! records are acknowledged. On open every segment is scanned: a damaged record or a
//! cut-off tail is set aside by moving the file into `damaged/` and writing its intact
//! records back, with an error log and a counter, and the queue carries on.
//!
//! ```no_run
//! use fleet_device::outbox::{Outbox, OutboxOptions};
//!
//! let mut outbox = Outbox::open("state/outbox".as_ref(), OutboxOptions::default())?;
//! let position = outbox.append(b"payload")?;
//! for record in outbox.read_after(0, 10)? {
//!     // publish record.payload, then once the broker has acknowledged it:
//!     outbox.ack_through(record.position)?;
//! }
//! outbox.close()?;
//! # Ok::<(), fleet_device::outbox::OutboxError>(())
//! ```

mod ack;
mod options;
pub mod segment;

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use options::{
    DEFAULT_MAX_BYTES, DEFAULT_SEGMENT_BYTES, FsyncPolicy, MIN_SEGMENT_BYTES, OutboxOptions,
};

use ack::AckState;
use segment::{DamagedRange, IndexEntry, MAGIC, RECORD_HEADER_LEN, ScanOutcome};

/// Folder inside the outbox where damaged files are moved.
pub const DAMAGED_DIR: &str = "damaged";

const SEGMENT_SUFFIX: &str = ".seg";
const TEMPORARY_SUFFIX: &str = ".tmp";

/// Errors from outbox operations. Damaged data is not an error: it is set aside, logged
/// and counted in [`OutboxStats`].
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("failed to {operation} {path}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("record of {size} bytes is larger than the limit of {limit} bytes")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("invalid outbox options: {0}")]
    InvalidOptions(String),
}

/// One queued record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub position: u64,
    pub payload: Vec<u8>,
}

/// Counters and sizes of an outbox. The drop and damage counters count since the outbox
/// was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records stored and not yet acknowledged.
    pub pending_records: u64,
    /// Bytes in segment files.
    pub bytes: u64,
    pub segments: usize,
    /// Highest acknowledged position; every position up to it is acknowledged.
    pub acked_through: u64,
    /// Unacknowledged records deleted to stay under the size bound.
    pub dropped_records: u64,
    /// Records lost to damage: exact where intact records on both sides show the gap,
    /// otherwise 1 per damaged stretch, so this is a lower bound.
    pub damaged_records: u64,
    /// Files moved into the `damaged/` folder.
    pub damaged_files: u64,
}

/// One segment file and the index of its intact records.
#[derive(Debug)]
struct Segment {
    /// Position in the file name: the first position written to it.
    name_position: u64,
    path: PathBuf,
    bytes: u64,
    records: Vec<IndexEntry>,
    /// Set after a failed append whose partial record could not be cut off; nothing is
    /// appended to a sealed segment again.
    sealed: bool,
}

impl Segment {
    fn last_position(&self) -> Option<u64> {
        self.records.last().map(|entry| entry.position)
    }

    fn count_after(&self, position: u64) -> u64 {
        let acked = self
            .records
            .partition_point(|entry| entry.position <= position);
        (self.records.len() - acked) as u64
    }
}

/// Failure of a read of an indexed record.
enum ReadFailure {
    /// The bytes no longer match the index: the file changed since it was scanned.
    Damaged,
    Io(OutboxError),
}

/// The on-disk queue. It is not thread-safe by itself; the agent shares it behind a
/// mutex.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    options: OutboxOptions,
    segments: VecDeque<Segment>,
    /// Append handle of the last segment, opened on the first append.
    writer: Option<fs::File>,
    /// Read handle of one segment, by the segment's name position.
    reader: Option<(u64, fs::File)>,
    next_position: u64,
    acked_through: u64,
    persisted_ack: u64,
    /// Whether bytes were written since the last fsync of the writer.
    unsynced: bool,
    last_sync: Instant,
    stats: OutboxStats,
    scratch: Vec<u8>,
}

impl Outbox {
    /// Opens the queue in `dir`, creating it when missing. Damaged segments and a damaged
    /// ack file are set aside, logged and counted. Only I/O failures that leave the folder
    /// unusable, such as missing permissions, are errors.
    pub fn open(dir: &Path, options: OutboxOptions) -> Result<Outbox, OutboxError> {
        options.validate()?;
        create_dir(dir)?;
        create_dir(&dir.join(DAMAGED_DIR))?;
        let mut outbox = Outbox {
            dir: dir.to_path_buf(),
            options,
            segments: VecDeque::new(),
            writer: None,
            reader: None,
            next_position: 1,
            acked_through: 0,
            persisted_ack: 0,
            unsynced: false,
            last_sync: Instant::now(),
            stats: OutboxStats::default(),
            scratch: Vec::new(),
        };
        outbox.finish_interrupted_writes()?;
        outbox.load_ack()?;
        outbox.load_segments()?;
        outbox.remove_acknowledged_segments(false);

        let last = outbox.segments.back().and_then(Segment::last_position);
        outbox.next_position = last.unwrap_or(0).max(outbox.acked_through) + 1;
        let stats = outbox.stats();
        tracing::info!(
            outbox = %dir.display(),
            pending_records = stats.pending_records,
            segments = stats.segments,
            bytes = stats.bytes,
            acked_through = stats.acked_through,
            fsync = %outbox.options.fsync,
            "outbox opened"
        );
        Ok(outbox)
    }

    /// Appends a record and returns its position. It reaches the storage device when the
    /// fsync policy requires. When the queue would grow past its size bound, the oldest
    /// segment is deleted first and its unacknowledged records are counted as dropped.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, OutboxError> {
        let limit = self.max_payload_len();
        if payload.len() > limit {
            return Err(OutboxError::RecordTooLarge {
                size: payload.len(),
                limit,
            });
        }
        let record_len = (RECORD_HEADER_LEN + payload.len()) as u64;
        self.prepare_writer(record_len)?;
        self.make_room(record_len)?;

        let position = self.next_position;
        self.scratch.clear();
        segment::encode_record(position, payload, &mut self.scratch);
        let segment = self
            .segments
            .back_mut()
            .expect("prepare_writer made a segment");
        let writer = self
            .writer
            .as_mut()
            .expect("prepare_writer opened the writer");
        if let Err(source) = writer.write_all(&self.scratch) {
            // Cut a partly written record off, so the next append does not follow it.
            // When that fails too, the next append starts a new segment instead.
            if writer.set_len(segment.bytes).is_err() {
                self.writer = None;
                segment.sealed = true;
            }
            return Err(OutboxError::Io {
                operation: "append to",
                path: segment.path.clone(),
                source,
            });
        }
        segment.records.push(IndexEntry {
            position,
            offset: segment.bytes,
            payload_len: payload.len() as u32,
        });
        segment.bytes += record_len;
        self.next_position += 1;
        self.unsynced = true;
        match self.options.fsync {
            FsyncPolicy::EveryRecord => self.sync_writer()?,
            FsyncPolicy::Interval(interval) if self.last_sync.elapsed() >= interval => {
                self.sync_writer()?;
            }
            FsyncPolicy::Interval(_) | FsyncPolicy::Never => {}
        }
        Ok(position)
    }

    /// Returns up to `max` unacknowledged records with positions above `after`, oldest
    /// first. A record whose bytes changed since the segment was scanned gets its segment
    /// set aside and rewritten, and the read carries on with the intact records.
    pub fn read_after(&mut self, after: u64, max: usize) -> Result<Vec<Record>, OutboxError> {
        let mut records: Vec<Record> = Vec::new();
        let mut repairs = 0;
        while records.len() < max {
            let from = records
                .last()
                .map_or(after.max(self.acked_through), |r| r.position);
            let Some((index, entry)) = self.find_after(from) else {
                break;
            };
            match self.read_entry(index, entry) {
                Ok(payload) => records.push(Record {
                    position: entry.position,
                    payload,
                }),
                // Each repair removes the damage it found, so a second failure in the same
                // segment means the storage keeps changing under us.
                Err(ReadFailure::Damaged) if repairs <= self.segments.len() => {
                    repairs += 1;
                    self.repair_segment_at(index)?;
                }
                Err(ReadFailure::Damaged) => {
                    return Err(OutboxError::Io {
                        operation: "read",
                        path: self.segments[index].path.clone(),
                        source: std::io::Error::other("segment changes while it is being read"),
                    });
                }
                Err(ReadFailure::Io(error)) => return Err(error),
            }
        }
        Ok(records)
    }

    /// Marks every position up to and including `position` as acknowledged and deletes
    /// segment files that hold only acknowledged records. The position reaches the disk
    /// at once under [`FsyncPolicy::EveryRecord`], otherwise at the next
    /// [`Outbox::sync_if_due`], [`Outbox::sync`] or [`Outbox::close`]; a stale one only
    /// makes the agent send some records again, which the server deduplicates.
    pub fn ack_through(&mut self, position: u64) -> Result<(), OutboxError> {
        let position = position.min(self.next_position - 1);
        if position <= self.acked_through {
            return Ok(());
        }
        self.acked_through = position;
        self.remove_acknowledged_segments(true);
        if self.options.fsync == FsyncPolicy::EveryRecord {
            self.persist_ack(true)?;
        }
        Ok(())
    }

    /// Flushes appended records and the acknowledged position when the fsync policy makes
    /// them due. The agent calls this on a timer, so an interval policy is kept even
    /// when no further record is appended.
    pub fn sync_if_due(&mut self) -> Result<(), OutboxError> {
        match self.options.fsync {
            FsyncPolicy::EveryRecord => Ok(()),
            FsyncPolicy::Interval(interval) if self.last_sync.elapsed() >= interval => self.sync(),
            FsyncPolicy::Interval(_) => Ok(()),
            FsyncPolicy::Never => self.persist_ack(false),
        }
    }

    /// Flushes appended records and the acknowledged position to the device now,
    /// whatever the policy.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        self.sync_writer()?;
        self.persist_ack(true)
    }

    /// Writes what is pending as the fsync policy allows and closes the files.
    pub fn close(mut self) -> Result<(), OutboxError> {
        match self.options.fsync {
            FsyncPolicy::Never => self.persist_ack(false),
            FsyncPolicy::EveryRecord | FsyncPolicy::Interval(_) => self.sync(),
        }
    }

    /// Returns the highest acknowledged position.
    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    /// Returns the current counters and sizes.
    pub fn stats(&self) -> OutboxStats {
        OutboxStats {
            pending_records: self
                .segments
                .iter()
                .map(|segment| segment.count_after(self.acked_through))
                .sum(),
            bytes: self.total_bytes(),
            segments: self.segments.len(),
            acked_through: self.acked_through,
            ..self.stats
        }
    }

    /// Returns the options the queue was opened with.
    pub fn options(&self) -> &OutboxOptions {
        &self.options
    }

    fn max_payload_len(&self) -> usize {
        let segment_room = self.options.segment_bytes as usize - MAGIC.len() - RECORD_HEADER_LEN;
        segment_room.min(segment::MAX_PAYLOAD_LEN)
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.bytes).sum()
    }

    /// Completes or discards the temporary files a crash can leave behind. A segment's
    /// temporary file is complete and synced before its original is moved away, so one
    /// without an original finishes a repair. Any other temporary file is stale.
    fn finish_interrupted_writes(&mut self) -> Result<(), OutboxError> {
        let stale_ack = ack::temporary_path(&self.dir);
        remove_if_present(&stale_ack)?;
        for path in list_dir(&self.dir)? {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let Some(final_name) = name.strip_suffix(TEMPORARY_SUFFIX) else {
                continue;
            };
            if parse_segment_name(final_name).is_none() {
                continue;
            }
            let final_path = self.dir.join(final_name);
            if final_path.exists() {
                remove_if_present(&path)?;
            } else {
                fs::rename(&path, &final_path).map_err(|source| OutboxError::Io {
                    operation: "rename",
                    path: path.clone(),
                    source,
                })?;
                tracing::warn!(segment = %final_path.display(), "outbox repair interrupted by a crash, completed");
            }
        }
        Ok(())
    }

    fn load_ack(&mut self) -> Result<(), OutboxError> {
        match ack::read(&self.dir)? {
            AckState::Missing => {}
            AckState::Valid(position) => self.acked_through = position,
            AckState::Damaged => {
                let aside = self.set_aside(&self.dir.join(ack::ACK_FILE))?;
                self.stats.damaged_files += 1;
                tracing::error!(
                    set_aside = %aside.display(),
                    "outbox ack file damaged, set aside; unsent records may be sent twice"
                );
            }
        }
        self.persisted_ack = self.acked_through;
        Ok(())
    }

    fn load_segments(&mut self) -> Result<(), OutboxError> {
        let mut names: Vec<(u64, PathBuf)> = list_dir(&self.dir)?
            .into_iter()
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?;
                Some((parse_segment_name(name)?, path))
            })
            .collect();
        names.sort();
        for (name_position, path) in names {
            let after = self
                .segments
                .back()
                .and_then(Segment::last_position)
                .unwrap_or(0)
                .max(name_position.saturating_sub(1));
            if let Some(segment) = self.load_segment(name_position, &path, after)? {
                self.segments.push_back(segment);
            }
        }
        Ok(())
    }

    /// Scans one segment file, sets it aside or repairs it when damaged, and returns it
    /// when it still contains records.
    fn load_segment(
        &mut self,
        name_position: u64,
        path: &Path,
        after: u64,
    ) -> Result<Option<Segment>, OutboxError> {
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(segment = %path.display(), %error, "outbox segment unreadable");
                self.set_aside_whole(path, "unreadable")?;
                return Ok(None);
            }
        };
        let segment = match segment::scan(&bytes, after) {
            ScanOutcome::Empty => None,
            ScanOutcome::BadHeader => {
                self.set_aside_whole(path, "invalid header")?;
                return Ok(None);
            }
            ScanOutcome::Scanned { records, damaged } if damaged.is_empty() => Some(Segment {
                name_position,
                path: path.to_path_buf(),
                bytes: bytes.len() as u64,
                records,
                sealed: false,
            }),
            ScanOutcome::Scanned { records, damaged } => {
                self.repair(name_position, path, &bytes, records, &damaged)?
            }
        };
        match segment {
            Some(segment) if !segment.records.is_empty() => Ok(Some(segment)),
            _ => {
                remove_if_present(path)?;
                Ok(None)
            }
        }
    }

    /// Moves a damaged segment into `damaged/` and writes its intact records back under
    /// the same name. The rewrite is synced before the original moves, so a crash in
    /// between leaves a complete temporary file that the next open puts in place.
    fn repair(
        &mut self,
        name_position: u64,
        path: &Path,
        bytes: &[u8],
        records: Vec<IndexEntry>,
        damaged: &[DamagedRange],
    ) -> Result<Option<Segment>, OutboxError> {
        let mut rewritten = MAGIC.to_vec();
        let mut index = Vec::with_capacity(records.len());
        for entry in &records {
            index.push(IndexEntry {
                offset: rewritten.len() as u64,
                ..*entry
            });
            rewritten.extend_from_slice(&bytes[entry.offset as usize..entry.end() as usize]);
        }
        let temporary = temporary_path(path);
        if !index.is_empty() {
            write_synced(&temporary, &rewritten)?;
        }
        let aside = self.set_aside(path)?;
        if !index.is_empty() {
            fs::rename(&temporary, path).map_err(|source| OutboxError::Io {
                operation: "rename",
                path: temporary.clone(),
                source,
            })?;
        }
        sync_dir(&self.dir)?;

        let lost_records: u64 = damaged.iter().map(|range| range.lost_records).sum();
        self.stats.damaged_records += lost_records;
        self.stats.damaged_files += 1;
        tracing::error!(
            segment = %path.display(),
            set_aside = %aside.display(),
            first_damaged_offset = damaged[0].start,
            damaged_ranges = damaged.len(),
            cut_off_tail = damaged.iter().any(|range| range.at_tail),
            lost_records,
            kept_records = index.len(),
            "outbox segment damaged, set aside and rewritten with its intact records"
        );
        Ok((!index.is_empty()).then(|| Segment {
            name_position,
            path: path.to_path_buf(),
            bytes: rewritten.len() as u64,
            records: index,
            sealed: false,
        }))
    }

    /// Sets aside a whole segment whose records cannot be found, counting one lost record
    /// as the least it can have held.
    fn set_aside_whole(&mut self, path: &Path, reason: &'static str) -> Result<(), OutboxError> {
        let aside = self.set_aside(path)?;
        self.stats.damaged_records += 1;
        self.stats.damaged_files += 1;
        tracing::error!(segment = %path.display(), set_aside = %aside.display(), reason, "outbox segment damaged, set aside");
        Ok(())
    }

    /// Moves a file into `damaged/` under a name that does not collide, and returns the
    /// new path.
    fn set_aside(&self, path: &Path) -> Result<PathBuf, OutboxError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let damaged_dir = self.dir.join(DAMAGED_DIR);
        let millis = crate::unix_millis();
        let mut target = damaged_dir.join(format!("{name}.{millis}"));
        let mut attempt = 1;
        while target.exists() {
            target = damaged_dir.join(format!("{name}.{millis}-{attempt}"));
            attempt += 1;
        }
        fs::rename(path, &target).map_err(|source| OutboxError::Io {
            operation: "set aside",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(target)
    }

    /// Starts a new segment when there is none or the record does not fit the last one,
    /// and opens the writer.
    fn prepare_writer(&mut self, record_len: u64) -> Result<(), OutboxError> {
        let fits = self.segments.back().is_some_and(|last| {
            !last.sealed && last.bytes + record_len <= self.options.segment_bytes
        });
        if !fits {
            return self.start_segment();
        }
        if self.writer.is_none() {
            let path = &self.segments.back().expect("fits implies a segment").path;
            let file = fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|source| OutboxError::Io {
                    operation: "open",
                    path: path.clone(),
                    source,
                })?;
            self.writer = Some(file);
        }
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), OutboxError> {
        // The closed segment's unsynced tail would otherwise never be synced, because
        // later syncs only reach the new writer.
        if self.options.fsync != FsyncPolicy::Never {
            self.sync_writer()?;
        }
        let path = self.dir.join(segment_name(self.next_position));
        let io_error = |operation| {
            let path = path.clone();
            move |source| OutboxError::Io {
                operation,
                path,
                source,
            }
        };
        let mut file = fs::OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error("create"))?;
        file.write_all(&MAGIC).map_err(io_error("write"))?;
        if self.options.fsync != FsyncPolicy::Never {
            file.sync_data().map_err(io_error("sync"))?;
            sync_dir(&self.dir)?;
        }
        self.writer = Some(file);
        self.segments.push_back(Segment {
            name_position: self.next_position,
            path,
            bytes: MAGIC.len() as u64,
            records: Vec::new(),
            sealed: false,
        });
        Ok(())
    }

    /// Deletes the oldest segments until `record_len` more bytes fit the size bound. The
    /// last segment, which the record goes to, is never deleted.
    fn make_room(&mut self, record_len: u64) -> Result<(), OutboxError> {
        while self.total_bytes() + record_len > self.options.max_bytes && self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let dropped = oldest.count_after(self.acked_through);
            remove_if_present(&oldest.path)?;
            let oldest = self.segments.pop_front().expect("more than one segment");
            self.forget_reader(oldest.name_position);
            self.stats.dropped_records += dropped;
            tracing::warn!(
                segment = %oldest.path.display(),
                dropped_records = dropped,
                dropped_total = self.stats.dropped_records,
                max_bytes = self.options.max_bytes,
                "outbox full, oldest segment dropped"
            );
        }
        Ok(())
    }

    /// Deletes leading segments whose records are all acknowledged. With `keep_last` the
    /// last segment stays, so a device that keeps up does not create a file per record.
    fn remove_acknowledged_segments(&mut self, keep_last: bool) {
        let keep = usize::from(keep_last);
        while self.segments.len() > keep {
            let oldest = &self.segments[0];
            if oldest.count_after(self.acked_through) > 0 {
                break;
            }
            // A file that cannot be deleted now only means its records may be sent again
            // after a restart, so this logs and retries at the next acknowledgement.
            if let Err(error) = remove_if_present(&oldest.path) {
                tracing::warn!(error = %error, "acknowledged outbox segment not deleted");
                break;
            }
            let oldest = self.segments.pop_front().expect("checked above");
            self.forget_reader(oldest.name_position);
            if self.segments.is_empty() {
                self.writer = None;
            }
        }
    }

    fn find_after(&self, position: u64) -> Option<(usize, IndexEntry)> {
        self.segments
            .iter()
            .enumerate()
            .find(|(_, segment)| segment.last_position() > Some(position))
            .map(|(index, segment)| {
                let first = segment.records.partition_point(|e| e.position <= position);
                (index, segment.records[first])
            })
    }

    fn read_entry(&mut self, index: usize, entry: IndexEntry) -> Result<Vec<u8>, ReadFailure> {
        let segment = &self.segments[index];
        let name_position = segment.name_position;
        if self.reader.as_ref().map(|(name, _)| *name) != Some(name_position) {
            let file = fs::File::open(&segment.path).map_err(|source| {
                ReadFailure::Io(OutboxError::Io {
                    operation: "open",
                    path: segment.path.clone(),
                    source,
                })
            })?;
            self.reader = Some((name_position, file));
        }
        let (_, file) = self.reader.as_ref().expect("opened above");
        let mut bytes = vec![0u8; RECORD_HEADER_LEN + entry.payload_len as usize];
        match file.read_exact_at(&mut bytes, entry.offset) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ReadFailure::Damaged);
            }
            Err(source) => {
                return Err(ReadFailure::Io(OutboxError::Io {
                    operation: "read",
                    path: segment.path.clone(),
                    source,
                }));
            }
        }
        match segment::parse_record(&bytes, 0, |position| position == entry.position) {
            Ok(_) => Ok(bytes.split_off(RECORD_HEADER_LEN)),
            Err(_) => Err(ReadFailure::Damaged),
        }
    }

    /// Rescans the segment at `index` after a failed read and replaces it with what the
    /// repair keeps.
    fn repair_segment_at(&mut self, index: usize) -> Result<(), OutboxError> {
        let segment = &self.segments[index];
        let (name_position, path) = (segment.name_position, segment.path.clone());
        let after = match index {
            0 => name_position.saturating_sub(1),
            _ => self.segments[index - 1].last_position().unwrap_or(0),
        };
        self.forget_reader(name_position);
        if index + 1 == self.segments.len() {
            self.sync_writer()?;
            self.writer = None;
        }
        match self.load_segment(name_position, &path, after)? {
            Some(repaired) => self.segments[index] = repaired,
            None => {
                self.segments.remove(index);
            }
        }
        Ok(())
    }

    fn forget_reader(&mut self, name_position: u64) {
        if self.reader.as_ref().map(|(name, _)| *name) == Some(name_position) {
            self.reader = None;
        }
    }

    /// Flushes the writer when something was appended since the last flush. Only a real
    /// fsync restarts the interval, so after a quiet spell the next append syncs at once.
    fn sync_writer(&mut self) -> Result<(), OutboxError> {
        if !self.unsynced {
            return Ok(());
        }
        if let Some(writer) = &self.writer {
            writer.sync_data().map_err(|source| OutboxError::Io {
                operation: "sync",
                path: self
                    .segments
                    .back()
                    .map(|s| s.path.clone())
                    .unwrap_or_default(),
                source,
            })?;
        }
        self.unsynced = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    fn persist_ack(&mut self, durable: bool) -> Result<(), OutboxError> {
        if self.acked_through != self.persisted_ack {
            ack::write(&self.dir, self.acked_through, durable)?;
            self.persisted_ack = self.acked_through;
        }
        Ok(())
    }
}

/// Returns the file name of the segment whose first record has `position`.
fn segment_name(position: u64) -> String {
    format!("{position:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(TEMPORARY_SUFFIX);
    path.with_file_name(name)
}

fn create_dir(dir: &Path) -> Result<(), OutboxError> {
    fs::create_dir_all(dir).map_err(|source| OutboxError::Io {
        operation: "create folder",
        path: dir.to_path_buf(),
        source,
    })
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, OutboxError> {
    let io_error = |source| OutboxError::Io {
        operation: "list",
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        if entry.file_type().map_err(io_error)?.is_file() {
            paths.push(entry.path());
        }
    }
    Ok(paths)
}

fn remove_if_present(path: &Path) -> Result<(), OutboxError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(OutboxError::Io {
            operation: "delete",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    let io_error = |operation| {
        move |source| OutboxError::Io {
            operation,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = fs::File::create(path).map_err(io_error("create"))?;
    file.write_all(bytes).map_err(io_error("write"))?;
    file.sync_data().map_err(io_error("sync"))
}

/// Flushes a folder's entries, so a created, renamed or deleted file survives power loss.
fn sync_dir(dir: &Path) -> Result<(), OutboxError> {
    fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(|source| OutboxError::Io {
            operation: "sync folder",
            path: dir.to_path_buf(),
            source,
        })
}
