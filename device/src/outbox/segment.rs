//! The segment file format: a magic header followed by checksummed records, and the scan
//! that finds the intact records of a possibly damaged file.
//!
//! Layout, all integers little-endian:
//!
//! ```text
//! segment = MAGIC (8 bytes) record*
//! record  = payload_len u32 | crc32 u32 | position u64 | payload (payload_len bytes)
//! ```
//!
//! The CRC-32 (IEEE) covers `payload_len`, `position` and the payload, so a flipped bit
//! in any of them is caught. Positions rise strictly within a file and across files.

/// First bytes of every segment file: format name and version 1.
pub const MAGIC: [u8; 8] = *b"FLTQSEG1";

/// Bytes in front of each payload: length, checksum and position.
pub const RECORD_HEADER_LEN: usize = 16;

/// Largest payload a record may carry. Larger lengths in a header are treated as damage
/// without reading further, so a flipped high bit cannot make a scan read gigabytes.
pub const MAX_PAYLOAD_LEN: usize = 1024 * 1024;

/// Location of one intact record in its segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    pub position: u64,
    /// Byte offset of the record header in the file.
    pub offset: u64,
    pub payload_len: u32,
}

impl IndexEntry {
    /// Returns the offset just past this record.
    pub fn end(&self) -> u64 {
        self.offset + RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }
}

/// Appends one encoded record to `out`.
pub fn encode_record(position: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(len, position, payload).to_le_bytes());
    out.extend_from_slice(&position.to_le_bytes());
    out.extend_from_slice(payload);
}

fn checksum(len: u32, position: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len.to_le_bytes());
    hasher.update(&position.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Reason the bytes at an offset are not an intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordFault {
    /// The file ends inside the header or the payload.
    Truncated,
    /// The length is out of range, the checksum does not match, or the position is not
    /// one the caller accepts.
    Invalid,
}

/// Parses the record at `offset`, accepting it only when its checksum matches and
/// `accept_position` approves its position. The position is checked before the checksum,
/// so scanning garbage for the next record stays cheap.
pub fn parse_record(
    bytes: &[u8],
    offset: usize,
    accept_position: impl Fn(u64) -> bool,
) -> Result<IndexEntry, RecordFault> {
    let Some(header) = bytes.get(offset..offset + RECORD_HEADER_LEN) else {
        return Err(RecordFault::Truncated);
    };
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let position = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len as usize > MAX_PAYLOAD_LEN || !accept_position(position) {
        return Err(RecordFault::Invalid);
    }
    let start = offset + RECORD_HEADER_LEN;
    let Some(payload) = bytes.get(start..start + len as usize) else {
        return Err(RecordFault::Truncated);
    };
    if checksum(len, position, payload) != crc {
        return Err(RecordFault::Invalid);
    }
    Ok(IndexEntry {
        position,
        offset: offset as u64,
        payload_len: len,
    })
}

/// A stretch of a segment file that contains no intact record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedRange {
    pub start: u64,
    pub end: u64,
    /// Records known to be lost in it: the gap between the positions on either side, or
    /// 1 for a range that runs to the end of the file, where at least one record was cut.
    pub lost_records: u64,
    /// Whether the range runs to the end of the file, as a write cut short by a crash or
    /// power loss leaves it.
    pub at_tail: bool,
}

/// Result of scanning one segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// Shorter than the header and a prefix of it, or exactly the header: a file created
    /// by a crashed writer before its first record, holding nothing.
    Empty,
    /// The file does not start with [`MAGIC`]: not a segment, or damaged at the start.
    BadHeader,
    /// The header is intact; `records` are the intact records in order and `damaged`
    /// the ranges between or after them that are not.
    Scanned {
        records: Vec<IndexEntry>,
        damaged: Vec<DamagedRange>,
    },
}

/// Scans a whole segment file held in memory. Records must have positions above
/// `after`, rising strictly. After a damaged stretch the scan looks for the next intact
/// record byte by byte, so one flipped byte costs one record, not the rest of the file.
pub fn scan(bytes: &[u8], after: u64) -> ScanOutcome {
    if bytes.len() <= MAGIC.len() && MAGIC.starts_with(bytes) {
        return ScanOutcome::Empty;
    }
    if !bytes.starts_with(&MAGIC) {
        return ScanOutcome::BadHeader;
    }

    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut last = after;
    let mut offset = MAGIC.len();
    while offset < bytes.len() {
        match parse_record(bytes, offset, |position| position > last) {
            Ok(entry) => {
                last = entry.position;
                offset = entry.end() as usize;
                records.push(entry);
            }
            Err(_) => {
                let range = skip_damage(bytes, offset, last);
                offset = range.end as usize;
                damaged.push(range);
            }
        }
    }
    ScanOutcome::Scanned { records, damaged }
}

/// Finds the end of the damaged stretch that starts at `start`: the offset of the next
/// intact record, or the end of the file.
fn skip_damage(bytes: &[u8], start: usize, last: u64) -> DamagedRange {
    for candidate in start + 1..bytes.len().saturating_sub(RECORD_HEADER_LEN - 1) {
        // Each lost record took at least a header's worth of the skipped bytes, which
        // bounds how far the next position can jump and filters out most garbage.
        let max_lost = ((candidate - start) / RECORD_HEADER_LEN + 1) as u64;
        let plausible = |position: u64| position > last && position - last - 1 <= max_lost;
        if let Ok(entry) = parse_record(bytes, candidate, plausible) {
            return DamagedRange {
                start: start as u64,
                end: candidate as u64,
                lost_records: entry.position - last - 1,
                at_tail: false,
            };
        }
    }
    DamagedRange {
        start: start as u64,
        end: bytes.len() as u64,
        lost_records: 1,
        at_tail: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        for (position, payload) in records {
            encode_record(*position, payload, &mut bytes);
        }
        bytes
    }

    fn positions(outcome: &ScanOutcome) -> Vec<u64> {
        match outcome {
            ScanOutcome::Scanned { records, .. } => records.iter().map(|r| r.position).collect(),
            other => panic!("expected a scanned segment, got {other:?}"),
        }
    }

    #[test]
    fn intact_segment_scans_fully() {
        let bytes = segment(&[(1, b"a"), (2, b"bb"), (3, b"")]);
        let outcome = scan(&bytes, 0);
        assert_eq!(positions(&outcome), [1, 2, 3]);
        let ScanOutcome::Scanned { damaged, .. } = outcome else {
            unreachable!()
        };
        assert!(damaged.is_empty());
    }

    #[test]
    fn every_cut_of_the_tail_is_found() {
        let bytes = segment(&[(1, b"first"), (2, b"second")]);
        let first_end = MAGIC.len() + RECORD_HEADER_LEN + 5;
        for cut in first_end + 1..bytes.len() {
            let outcome = scan(&bytes[..cut], 0);
            assert_eq!(positions(&outcome), [1], "cut at {cut}");
            let ScanOutcome::Scanned { damaged, .. } = outcome else {
                unreachable!()
            };
            assert_eq!(damaged.len(), 1, "cut at {cut}");
            assert!(damaged[0].at_tail, "cut at {cut}");
        }
    }

    #[test]
    fn flipped_byte_costs_one_record() {
        let clean = segment(&[(1, b"one"), (2, b"two"), (3, b"three")]);
        let second = MAGIC.len() + RECORD_HEADER_LEN + 3;
        for flipped in second..second + RECORD_HEADER_LEN + 3 {
            let mut bytes = clean.clone();
            bytes[flipped] ^= 0x40;
            let outcome = scan(&bytes, 0);
            assert_eq!(positions(&outcome), [1, 3], "flipped byte {flipped}");
            let ScanOutcome::Scanned { damaged, .. } = outcome else {
                unreachable!()
            };
            assert_eq!(damaged.len(), 1, "flipped byte {flipped}");
            assert_eq!(damaged[0].lost_records, 1, "flipped byte {flipped}");
        }
    }

    #[test]
    fn headers_are_classified() {
        assert_eq!(scan(b"", 0), ScanOutcome::Empty);
        assert_eq!(scan(&MAGIC[..3], 0), ScanOutcome::Empty);
        assert_eq!(scan(&MAGIC, 0), ScanOutcome::Empty);
        assert_eq!(scan(b"not a segment at all", 0), ScanOutcome::BadHeader);
    }

    #[test]
    fn positions_must_rise() {
        let bytes = segment(&[(5, b"a"), (4, b"b"), (6, b"c")]);
        assert_eq!(positions(&scan(&bytes, 0)), [5, 6]);
        assert_eq!(positions(&scan(&bytes, 5)), [6]);
    }
}
