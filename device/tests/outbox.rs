//! The on-disk outbox: reopening, acknowledgements, damage, the size bound, and a writer
//! killed with SIGKILL at arbitrary points.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use fleet_device::outbox::{DAMAGED_DIR, FsyncPolicy, Outbox, OutboxOptions, segment};

/// Environment variable that turns the helper test into the child writer.
const CHILD_DIR_ENV: &str = "FLEET_OUTBOX_CHILD_DIR";
/// First record index the child writes.
const CHILD_START_ENV: &str = "FLEET_OUTBOX_CHILD_START";

fn options(fsync: FsyncPolicy) -> OutboxOptions {
    OutboxOptions {
        fsync,
        ..OutboxOptions::default()
    }
}

fn small_segments(max_bytes: u64) -> OutboxOptions {
    OutboxOptions {
        fsync: FsyncPolicy::Never,
        max_bytes,
        segment_bytes: 4096,
    }
}

/// Builds a payload that starts with its index and whose length varies with it.
fn payload(index: u64) -> Vec<u8> {
    let mut bytes = index.to_le_bytes().to_vec();
    bytes.extend((0..(index % 97) as u8).map(|i| i ^ index as u8));
    bytes
}

/// Returns the index a payload was made from, checking the rest of it.
fn index_of(bytes: &[u8]) -> u64 {
    let index = u64::from_le_bytes(bytes[..8].try_into().expect("8-byte index"));
    assert_eq!(
        bytes,
        payload(index),
        "payload of record {index} is corrupt"
    );
    index
}

fn read_all(outbox: &mut Outbox) -> Vec<(u64, u64)> {
    outbox
        .read_after(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|record| (record.position, index_of(&record.payload)))
        .collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    files
}

fn damaged_files(dir: &Path) -> usize {
    fs::read_dir(dir.join(DAMAGED_DIR)).unwrap().count()
}

#[test]
fn append_reopen_and_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), options(FsyncPolicy::default())).unwrap();
    for index in 1..=10 {
        assert_eq!(outbox.append(&payload(index)).unwrap(), index);
    }
    let records = read_all(&mut outbox);
    assert_eq!(records.len(), 10);
    assert!(records.iter().all(|&(position, index)| position == index));
    assert_eq!(outbox.read_after(7, 2).unwrap()[0].position, 8);

    outbox.ack_through(4).unwrap();
    assert_eq!(outbox.stats().pending_records, 6);
    outbox.close().unwrap();

    let mut reopened = Outbox::open(dir.path(), options(FsyncPolicy::default())).unwrap();
    assert_eq!(reopened.acked_through(), 4);
    let positions: Vec<u64> = read_all(&mut reopened).iter().map(|r| r.0).collect();
    assert_eq!(positions, (5..=10).collect::<Vec<_>>());
    assert_eq!(reopened.append(&payload(11)).unwrap(), 11);
}

#[test]
fn acked_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
    for index in 1..=200 {
        outbox.append(&payload(index)).unwrap();
    }
    let before = segment_files(dir.path()).len();
    assert!(before >= 3, "expected several segments, found {before}");
    outbox.ack_through(200).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1, "the last segment stays");
    assert_eq!(outbox.stats().pending_records, 0);
    outbox.close().unwrap();

    let mut reopened = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
    assert!(read_all(&mut reopened).is_empty());
    assert!(segment_files(dir.path()).is_empty());
    assert_eq!(reopened.append(&payload(201)).unwrap(), 201);
}

#[test]
fn ack_position_reaches_disk_per_policy() {
    for (fsync, closed) in [
        (FsyncPolicy::EveryRecord, false),
        (FsyncPolicy::Interval(Duration::from_secs(3600)), true),
        (FsyncPolicy::Never, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), options(fsync)).unwrap();
        for index in 1..=5 {
            outbox.append(&payload(index)).unwrap();
        }
        outbox.ack_through(3).unwrap();
        if closed {
            outbox.close().unwrap();
        } else {
            // Dropped without close, as in a crash: only the per-record policy has
            // written the position already.
            drop(outbox);
        }
        let reopened = Outbox::open(dir.path(), options(fsync)).unwrap();
        assert_eq!(reopened.acked_through(), 3, "policy {fsync}");
    }
}

#[test]
fn truncated_tail_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    for index in 1..=5 {
        outbox.append(&payload(index)).unwrap();
    }
    outbox.close().unwrap();
    let file = segment_files(dir.path()).pop().unwrap();
    let length = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(length - 3)
        .unwrap();

    let mut reopened = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    let indices: Vec<u64> = read_all(&mut reopened).iter().map(|r| r.1).collect();
    assert_eq!(indices, [1, 2, 3, 4]);
    let stats = reopened.stats();
    assert_eq!(stats.damaged_records, 1);
    assert_eq!(stats.damaged_files, 1);
    assert_eq!(damaged_files(dir.path()), 1);
    assert_eq!(reopened.append(&payload(6)).unwrap(), 5);
    reopened.close().unwrap();

    // The rewritten segment is clean: a second open finds no damage.
    let again = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    assert_eq!(again.stats().damaged_files, 0);
    assert_eq!(again.stats().pending_records, 5);
}

#[test]
fn flipped_byte_costs_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    for index in 1..=5 {
        outbox.append(&payload(index)).unwrap();
    }
    outbox.close().unwrap();
    let file = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    let third = segment::MAGIC.len()
        + (1..=2)
            .map(|i| segment::RECORD_HEADER_LEN + payload(i).len())
            .sum::<usize>();
    bytes[third + segment::RECORD_HEADER_LEN + 2] ^= 0x10;
    fs::write(&file, bytes).unwrap();

    let mut reopened = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    let indices: Vec<u64> = read_all(&mut reopened).iter().map(|r| r.1).collect();
    assert_eq!(indices, [1, 2, 4, 5]);
    assert_eq!(reopened.stats().damaged_records, 1);
    assert_eq!(damaged_files(dir.path()), 1);
}

#[test]
fn damage_found_while_reading_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    for index in 1..=5 {
        outbox.append(&payload(index)).unwrap();
    }
    let file = segment_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    let second = segment::MAGIC.len() + segment::RECORD_HEADER_LEN + payload(1).len();
    bytes[second + 9] ^= 0x01;
    fs::write(&file, bytes).unwrap();

    let indices: Vec<u64> = read_all(&mut outbox).iter().map(|r| r.1).collect();
    assert_eq!(indices, [1, 3, 4, 5]);
    assert_eq!(outbox.stats().damaged_records, 1);
    assert_eq!(damaged_files(dir.path()), 1);
    assert_eq!(outbox.append(&payload(6)).unwrap(), 6);
    let indices: Vec<u64> = read_all(&mut outbox).iter().map(|r| r.1).collect();
    assert_eq!(indices, [1, 3, 4, 5, 6]);
}

#[test]
fn damaged_header_and_ack_file_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
    for index in 1..=150 {
        outbox.append(&payload(index)).unwrap();
    }
    outbox.ack_through(2).unwrap();
    outbox.close().unwrap();
    let first = segment_files(dir.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    bytes[0] = b'X';
    fs::write(&first, bytes).unwrap();
    fs::write(dir.path().join("acked"), b"garbage").unwrap();

    let mut reopened = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
    assert_eq!(reopened.acked_through(), 0);
    let records = read_all(&mut reopened);
    assert!(!records.is_empty());
    assert!(records.iter().all(|&(position, index)| position == index));
    assert_eq!(records.last().unwrap().1, 150);
    assert_eq!(reopened.stats().damaged_files, 2);
    assert_eq!(damaged_files(dir.path()), 2);
}

#[test]
fn interrupted_repair_is_completed() {
    let dir = tempfile::tempdir().unwrap();
    let mut outbox = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    for index in 1..=3 {
        outbox.append(&payload(index)).unwrap();
    }
    outbox.close().unwrap();
    // A crash after the damaged original moved away leaves only the rewrite.
    let file = segment_files(dir.path()).pop().unwrap();
    let mut temporary = file.clone().into_os_string();
    temporary.push(".tmp");
    fs::rename(&file, &temporary).unwrap();

    let mut reopened = Outbox::open(dir.path(), options(FsyncPolicy::Never)).unwrap();
    let indices: Vec<u64> = read_all(&mut reopened).iter().map(|r| r.1).collect();
    assert_eq!(indices, [1, 2, 3]);
}

#[test]
fn size_bound_drops_oldest_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let max_bytes = 16 * 1024;
    let mut outbox = Outbox::open(dir.path(), small_segments(max_bytes)).unwrap();
    outbox.append(&payload(1)).unwrap();
    outbox.ack_through(1).unwrap();
    let total = 2000;
    for index in 2..=total {
        outbox.append(&payload(index)).unwrap();
        assert!(outbox.stats().bytes <= max_bytes, "record {index}");
    }
    let stats = outbox.stats();
    let records = read_all(&mut outbox);
    let first = records[0].1;
    assert!(first > 1, "nothing was dropped");
    assert_eq!(records.last().unwrap().1, total);
    let indices: Vec<u64> = records.iter().map(|r| r.1).collect();
    assert_eq!(
        indices,
        (first..=total).collect::<Vec<_>>(),
        "gap or reorder"
    );
    // Record 1 was acknowledged, so it is not a drop.
    assert_eq!(stats.dropped_records, first - 2);
    assert_eq!(stats.pending_records, total - first + 1);
}

#[test]
fn order_survives_reopening_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut next = 1;
    for round in 0..5 {
        let mut outbox = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
        for _ in 0..150 {
            assert_eq!(outbox.append(&payload(next)).unwrap(), next);
            next += 1;
        }
        outbox.ack_through(round * 100).unwrap();
        outbox.close().unwrap();
    }
    let mut outbox = Outbox::open(dir.path(), small_segments(1024 * 1024)).unwrap();
    let records = read_all(&mut outbox);
    let indices: Vec<u64> = records.iter().map(|r| r.1).collect();
    assert_eq!(indices, (401..next).collect::<Vec<_>>());
    let mut batch_start = 400;
    while let Some(last) = outbox.read_after(batch_start, 7).unwrap().last() {
        assert!(last.position > batch_start);
        batch_start = last.position;
    }
    assert_eq!(batch_start, next - 1);
}

/// Counts of records a child appended before it was killed, in kill order.
const KILL_AFTER: [u64; 6] = [1, 40, 700, 95, 1500, 333];

#[test]
fn sigkill_while_appending_leaves_a_clean_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut next_index = 1;
    for (round, &kill_after) in KILL_AFTER.iter().enumerate() {
        let (reported, last_reported) = run_child_until(dir.path(), next_index, kill_after);

        let mut outbox = Outbox::open(dir.path(), child_options())
            .unwrap_or_else(|error| panic!("round {round}: reopen failed: {error}"));
        let records = read_all(&mut outbox);
        let stats = outbox.stats();
        let positions: Vec<u64> = records.iter().map(|r| r.0).collect();
        let indices: Vec<u64> = records.iter().map(|r| r.1).collect();
        assert!(
            positions.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: positions not consecutive: {positions:?}"
        );
        assert!(
            indices.windows(2).all(|w| w[1] == w[0] + 1),
            "round {round}: records missing or reordered"
        );
        // Every record the child reported stays, unless it was acknowledged.
        let last = *indices.last().expect("records remain");
        assert!(
            last >= reported,
            "round {round}: {last} < reported {reported}"
        );
        // The child acknowledges through three records back before it reports an
        // append, so at most the records before `last_reported - 1` may be gone.
        assert!(
            indices[0] <= last_reported.saturating_sub(1).max(next_index),
            "round {round}: unacknowledged records lost: first {} after {last_reported} reported",
            indices[0]
        );
        // A SIGKILL can cut at most the record being written.
        assert!(stats.damaged_records <= 1, "round {round}: {stats:?}");
        next_index = last + 1;
        outbox.close().unwrap();
    }
}

fn child_options() -> OutboxOptions {
    OutboxOptions {
        fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
        max_bytes: 64 * 1024 * 1024,
        segment_bytes: 4096,
    }
}

/// Runs the child writer until it has reported `count` appends, SIGKILLs it, and returns
/// the last index it had reported when the kill was sent, and the last one it reported
/// at all: the child keeps appending and acknowledging until the signal lands.
fn run_child_until(dir: &Path, start: u64, count: u64) -> (u64, u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_appends_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_START_ENV, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the child writer");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let appended = |line: std::io::Result<String>| -> Option<u64> {
        line.unwrap()
            .split("appended ")
            .nth(1)
            .map(|index| index.trim().parse().unwrap())
    };
    let mut reported = start.saturating_sub(1);
    for line in lines.by_ref() {
        if let Some(index) = appended(line) {
            reported = index;
            if reported + 1 >= start + count {
                break;
            }
        }
    }
    assert!(
        reported + 1 >= start + count,
        "the child stopped after record {reported}, before {count} appends"
    );
    child.kill().expect("SIGKILL the child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child ended on its own: {status}");
    // What the child printed between the report read above and its death.
    let last_reported = lines.filter_map(appended).last().unwrap_or(reported);
    (reported, last_reported)
}

/// Appends records forever as the child of the SIGKILL test, acknowledging some and
/// reporting each append on stdout. Does nothing when run on its own.
#[test]
#[ignore = "helper process of sigkill_while_appending_leaves_a_clean_queue"]
fn child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let start: u64 = std::env::var(CHILD_START_ENV).unwrap().parse().unwrap();
    let mut outbox = Outbox::open(Path::new(&dir), child_options()).unwrap();
    let mut stdout = std::io::stdout().lock();
    for index in start.. {
        let position = outbox.append(&payload(index)).unwrap();
        if index % 7 == 0 {
            outbox.ack_through(position.saturating_sub(3)).unwrap();
        }
        if index % 11 == 0 {
            outbox.sync_if_due().unwrap();
        }
        writeln!(stdout, "appended {index}").unwrap();
        stdout.flush().unwrap();
    }
}
