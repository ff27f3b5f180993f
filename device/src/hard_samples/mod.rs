//! Hard samples: inputs the model classified with a top-1 confidence under the threshold,
//! kept on disk and uploaded to the fleet server so they can be labelled and used for
//! retraining.
//!
//! Three parts on three threads keep the work off the inference loop:
//!
//! - [`Capture`], called by the inference thread, takes a token from a token bucket
//!   (`--hard-sample-rate` per minute, with a burst of the same size) and hands the
//!   sample to a bounded queue. It never blocks: with no token or a full queue the
//!   sample is dropped and counted.
//! - The writer thread encodes each sample (an IDX digit as PNG, an image file as its
//!   own bytes) and stores it in the [`spool::Spool`] under `STATE_DIR/hard-samples/`,
//!   unless that would take the folder past `--hard-sample-max-mib`. Then the new sample
//!   is dropped and counted; samples already stored are never deleted to make room.
//! - The uploader thread ([`upload`]) sends stored samples to `POST /api/samples`,
//!   oldest first, and deletes each one only once the server has stored it.
//!
//! Counters of all three are in [`HardSampleStats`].

pub mod spool;
pub mod upload;

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fleet_runtime::{Sample, SampleData};
use fleet_wire::sample::SampleMetadata;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use image::ImageEncoder;
use sha2::{Digest, Sha256};

use crate::model::ModelInfo;
use spool::{Spool, SpoolError, StoreOutcome};

/// Maximum hard samples kept per minute unless configured otherwise.
pub const DEFAULT_RATE_PER_MINUTE: u32 = 6;
/// Size bound of the hard-sample folder in MiB unless configured otherwise.
pub const DEFAULT_MAX_MIB: u64 = 64;
/// Folder under the state directory.
pub const DIR_NAME: &str = "hard-samples";
/// Maximum samples waiting for the writer thread. A burst from the token bucket is at
/// most the per-minute rate, so at rates up to 16 the queue fills only when storage
/// stalls.
const QUEUE_CAPACITY: usize = 16;
/// Minimum time between two log lines about dropped samples.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Settings of hard-sample capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardSampleOptions {
    /// Maximum samples kept per minute; 0 turns capture off.
    pub rate_per_minute: u32,
    /// Size bound of the folder in bytes, rejected samples included.
    pub max_bytes: u64,
}

impl Default for HardSampleOptions {
    fn default() -> Self {
        HardSampleOptions {
            rate_per_minute: DEFAULT_RATE_PER_MINUTE,
            max_bytes: DEFAULT_MAX_MIB * 1024 * 1024,
        }
    }
}

/// Counters since the agent started. Only `dropped_*` samples are lost; rejected ones
/// stay in `rejected/`.
#[derive(Debug, Default)]
pub struct HardSampleStats {
    /// Inferences under the confidence threshold offered for capture.
    pub offered: AtomicU64,
    /// Offered while the token bucket was empty; not kept, by design.
    pub rate_limited: AtomicU64,
    /// Dropped because the writer thread's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Dropped because storing them would pass the folder's size bound.
    pub dropped_folder_full: AtomicU64,
    /// Dropped because they could not be encoded, described or written.
    pub dropped_failed: AtomicU64,
    /// Not stored again because the same content waits for upload already.
    pub duplicates: AtomicU64,
    /// Written to the folder.
    pub stored: AtomicU64,
    /// Deleted after the server stored them or reported them stored already.
    pub uploaded: AtomicU64,
    /// Moved to `rejected/` because the server rejected them for good or their file
    /// could not be read back.
    pub rejected: AtomicU64,
}

impl HardSampleStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the samples lost so far: dropped for any reason after passing the rate
    /// limit.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_folder_full.load(Ordering::Relaxed)
            + self.dropped_failed.load(Ordering::Relaxed)
    }
}

/// A low-confidence inference on its way to the writer thread.
#[derive(Debug)]
struct Candidate {
    sample: Sample,
    model_name: String,
    model_version: String,
    predicted_class: usize,
    predicted_label: String,
    confidence: f32,
    device_time_ms: u64,
}

/// The inference thread's end: rate-limits low-confidence samples and queues them for
/// the writer thread without blocking.
#[derive(Debug)]
pub struct Capture {
    limiter: DefaultDirectRateLimiter,
    queue: SyncSender<Candidate>,
    stats: Arc<HardSampleStats>,
}

impl Capture {
    /// Offers a sample the model classified as `class` with top-1 `confidence` under the
    /// threshold. Costs one token-bucket check when no token is left, and moves the
    /// sample into the queue otherwise.
    pub fn offer(&self, sample: Sample, model: &ModelInfo, class: usize, confidence: f32) {
        HardSampleStats::bump(&self.stats.offered);
        if self.limiter.check().is_err() {
            HardSampleStats::bump(&self.stats.rate_limited);
            return;
        }
        let candidate = Candidate {
            sample,
            model_name: model.name.clone(),
            model_version: model.version.clone(),
            predicted_class: class,
            predicted_label: model.label(class),
            confidence,
            device_time_ms: crate::unix_millis(),
        };
        match self.queue.try_send(candidate) {
            Ok(()) => {}
            // A writer that has stopped counts as full: the sample is lost either way.
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                HardSampleStats::bump(&self.stats.dropped_queue_full);
            }
        }
    }
}

/// Hard-sample capture and upload while the agent runs.
#[derive(Debug)]
pub struct HardSamples {
    capture: Option<Capture>,
    writer: Option<JoinHandle<()>>,
    spool: Arc<Spool>,
    stats: Arc<HardSampleStats>,
}

/// Destination and credential of sample uploads.
#[derive(Debug, Clone)]
pub struct UploadTarget {
    /// Fleet server base URL, such as `http://127.0.0.1:8080`.
    pub server: String,
    /// Device secret, sent as a bearer token.
    pub token: String,
}

impl HardSamples {
    /// Opens the folder `dir` and starts the writer thread when capture is on, and the
    /// uploader thread when `upload` is given. The uploader stops once `stop` is set.
    pub fn start(
        dir: &Path,
        device_id: &str,
        options: HardSampleOptions,
        upload: Option<UploadTarget>,
        stop: Arc<AtomicBool>,
    ) -> Result<HardSamples, SpoolError> {
        let spool = Arc::new(Spool::open(dir, options.max_bytes)?);
        let stats = Arc::new(HardSampleStats::default());
        let (capture, writer) = match NonZeroU32::new(options.rate_per_minute) {
            None => (None, None),
            Some(rate) => {
                let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE_CAPACITY);
                let capture = Capture {
                    limiter: RateLimiter::direct(Quota::per_minute(rate)),
                    queue: sender,
                    stats: stats.clone(),
                };
                let writer = Writer {
                    device_id: device_id.to_owned(),
                    spool: spool.clone(),
                    stats: stats.clone(),
                };
                let handle = std::thread::Builder::new()
                    .name("hard-samples".into())
                    .spawn(move || writer.run(receiver))
                    .map_err(|source| SpoolError::Io {
                        operation: "start the writer thread for",
                        path: dir.to_path_buf(),
                        source,
                    })?;
                (Some(capture), Some(handle))
            }
        };
        if let Some(target) = upload {
            let uploader = upload::Uploader::new(target, spool.clone(), stats.clone(), stop);
            // Not joined at shutdown: a sample is deleted only after the server stored
            // it, so stopping the uploader anywhere loses nothing.
            std::thread::Builder::new()
                .name("sample-upload".into())
                .spawn(move || uploader.run())
                .map_err(|source| SpoolError::Io {
                    operation: "start the uploader thread for",
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok(HardSamples {
            capture,
            writer,
            spool,
            stats,
        })
    }

    /// Takes the capture end for the inference loop; `None` when capture is off or the
    /// end was taken already.
    pub fn take_capture(&mut self) -> Option<Capture> {
        self.capture.take()
    }

    pub fn stats(&self) -> &HardSampleStats {
        &self.stats
    }

    pub fn spool_stats(&self) -> spool::SpoolStats {
        self.spool.stats()
    }

    /// Logs the counters and the folder's state, as the agent does when it stops.
    pub fn log_totals(&self) {
        let stats = &self.stats;
        let spool = self.spool.stats();
        tracing::info!(
            offered = stats.offered.load(Ordering::Relaxed),
            rate_limited = stats.rate_limited.load(Ordering::Relaxed),
            stored = stats.stored.load(Ordering::Relaxed),
            duplicates = stats.duplicates.load(Ordering::Relaxed),
            dropped = stats.dropped(),
            uploaded = stats.uploaded.load(Ordering::Relaxed),
            rejected = stats.rejected.load(Ordering::Relaxed),
            pending_samples = spool.pending_samples,
            used_bytes = spool.used_bytes,
            "hard-sample totals; pending samples are uploaded after the next start"
        );
    }

    /// Waits until the writer thread has stored every queued sample, which it does once
    /// the capture end is dropped.
    pub fn finish_writing(&mut self) {
        self.capture = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the hard-sample writer thread panicked");
        }
    }
}

/// The writer thread: encodes queued samples and stores them in the folder.
struct Writer {
    device_id: String,
    spool: Arc<Spool>,
    stats: Arc<HardSampleStats>,
}

impl Writer {
    /// Runs until every [`Capture`] is dropped and the queue is empty.
    fn run(self, queue: Receiver<Candidate>) {
        let mut last_drop_log: Option<Instant> = None;
        while let Ok(candidate) = queue.recv() {
            let source = candidate.sample.id.clone();
            let dropped = match self.store(candidate) {
                Ok(StoreOutcome::Stored) => {
                    HardSampleStats::bump(&self.stats.stored);
                    tracing::debug!(source, "hard sample stored");
                    None
                }
                Ok(StoreOutcome::Duplicate) => {
                    HardSampleStats::bump(&self.stats.duplicates);
                    None
                }
                Ok(StoreOutcome::Full) => {
                    HardSampleStats::bump(&self.stats.dropped_folder_full);
                    Some("the hard-sample folder is at its size bound".to_owned())
                }
                Err(reason) => {
                    HardSampleStats::bump(&self.stats.dropped_failed);
                    Some(reason)
                }
            };
            let Some(reason) = dropped else {
                continue;
            };
            if last_drop_log.is_none_or(|at| at.elapsed() >= DROP_LOG_INTERVAL) {
                tracing::warn!(
                    source,
                    reason,
                    dropped_total = self.stats.dropped(),
                    "hard sample dropped"
                );
                last_drop_log = Some(Instant::now());
            }
        }
    }

    /// Encodes and describes a sample and stores it; an error is the reason it was
    /// dropped.
    fn store(&self, candidate: Candidate) -> Result<StoreOutcome, String> {
        let (content_type, bytes) = encode(candidate.sample.data)?;
        let metadata = SampleMetadata {
            device_id: self.device_id.clone(),
            model_name: candidate.model_name,
            model_version: candidate.model_version,
            predicted_class: u32::try_from(candidate.predicted_class)
                .map_err(|_| format!("class index {} is too large", candidate.predicted_class))?,
            predicted_label: candidate.predicted_label,
            confidence: candidate.confidence,
            true_class: candidate
                .sample
                .label
                .and_then(|label| u32::try_from(label).ok()),
            source: candidate.sample.id,
            device_time_ms: candidate.device_time_ms,
            sha256: hex::encode(Sha256::digest(&bytes)),
        };
        // Checked here so that every stored sample passes the server's checks.
        metadata
            .validate()
            .map_err(|reason| format!("invalid metadata: {reason}"))?;
        self.spool
            .store(&metadata, content_type, &bytes)
            .map_err(|error| crate::forward::error_chain(&error))
    }
}

/// Returns the content type and bytes to keep for a sample: a grayscale image encoded as
/// PNG, an image file as it is.
fn encode(data: SampleData) -> Result<(&'static str, Vec<u8>), String> {
    match data {
        SampleData::Gray {
            width,
            height,
            pixels,
        } => {
            let expected = u64::from(width) * u64::from(height);
            if pixels.len() as u64 != expected {
                return Err(format!(
                    "a {width}x{height} image needs {expected} pixels, the sample has {}",
                    pixels.len()
                ));
            }
            let mut png = Vec::new();
            image::codecs::png::PngEncoder::new(&mut png)
                .write_image(&pixels, width, height, image::ExtendedColorType::L8)
                .map_err(|error| format!("failed to encode a {width}x{height} PNG: {error}"))?;
            Ok(("image/png", png))
        }
        SampleData::Encoded(bytes) => {
            if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
                Ok(("image/png", bytes))
            } else if bytes.starts_with(b"\xff\xd8\xff") {
                Ok(("image/jpeg", bytes))
            } else {
                Err("the image file is neither PNG nor JPEG".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "digit-cnn".into(),
            version: "1.0.0".into(),
            input: fleet_bundle::TensorSpec {
                name: "input".into(),
                datatype: "FP32".into(),
                shape: vec![1, 1, 28, 28],
            },
            output: fleet_bundle::TensorSpec {
                name: "logits".into(),
                datatype: "FP32".into(),
                shape: vec![1, 10],
            },
            preprocessing: serde_json::from_value(serde_json::json!({
                "kind": "grayscale", "width": 28, "height": 28,
                "resize": "bilinear", "scale": 1.0, "offset": 0.0
            }))
            .unwrap(),
            postprocessing: fleet_bundle::Postprocessing::Softmax,
            labels: (0..10).map(|digit| format!("digit {digit}")).collect(),
        }
    }

    fn digit(index: u8) -> Sample {
        Sample {
            id: format!("t10k#{index}"),
            data: SampleData::Gray {
                width: 28,
                height: 28,
                pixels: (0..784).map(|i| (i as u8).wrapping_add(index)).collect(),
            },
            label: Some(7),
        }
    }

    /// Returns a capture end with its queue, for tests that read the queue directly.
    fn capture(rate_per_minute: u32, capacity: usize) -> (Capture, Receiver<Candidate>) {
        let (sender, receiver) = std::sync::mpsc::sync_channel(capacity);
        let rate = NonZeroU32::new(rate_per_minute).unwrap();
        let capture = Capture {
            limiter: RateLimiter::direct(Quota::per_minute(rate)),
            queue: sender,
            stats: Arc::default(),
        };
        (capture, receiver)
    }

    #[test]
    fn rate_limit_lets_one_burst_through() {
        let (capture, queue) = capture(3, 100);
        for index in 0..10 {
            capture.offer(digit(index), &model(), 3, 0.4);
        }
        let stats = &capture.stats;
        assert_eq!(stats.offered.load(Ordering::Relaxed), 10);
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 7);
        assert_eq!(stats.dropped(), 0);
        let queued: Vec<Candidate> = queue.try_iter().collect();
        assert_eq!(queued.len(), 3, "a burst of the per-minute rate");
        assert_eq!(queued[0].sample.id, "t10k#0");
        assert_eq!(queued[0].predicted_label, "digit 3");
        assert_eq!(queued[0].model_version, "1.0.0");
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (capture, queue) = capture(1000, 2);
        for index in 0..5 {
            capture.offer(digit(index), &model(), 3, 0.4);
        }
        assert_eq!(capture.stats.dropped_queue_full.load(Ordering::Relaxed), 3);
        assert_eq!(queue.try_iter().count(), 2);
        drop(queue);
        capture.offer(digit(9), &model(), 3, 0.4);
        assert_eq!(
            capture.stats.dropped_queue_full.load(Ordering::Relaxed),
            4,
            "a stopped writer drops as a full queue does"
        );
    }

    #[test]
    fn gray_samples_become_decodable_png() {
        let Sample { data, .. } = digit(1);
        let SampleData::Gray { pixels, .. } = data.clone() else {
            unreachable!()
        };
        let (content_type, png) = encode(data).unwrap();
        assert_eq!(content_type, "image/png");
        let decoded = image::load_from_memory(&png).unwrap().into_luma8();
        assert_eq!(decoded.dimensions(), (28, 28));
        assert_eq!(decoded.into_raw(), pixels);
    }

    #[test]
    fn image_files_are_kept_as_they_are() {
        let jpeg = b"\xff\xd8\xff\xe0 rest of a JPEG".to_vec();
        assert_eq!(
            encode(SampleData::Encoded(jpeg.clone())).unwrap(),
            ("image/jpeg", jpeg)
        );
        let error = encode(SampleData::Encoded(b"GIF89a".to_vec())).unwrap_err();
        assert!(error.contains("neither PNG nor JPEG"), "{error}");
        let error = encode(SampleData::Gray {
            width: 28,
            height: 28,
            pixels: vec![0; 10],
        })
        .unwrap_err();
        assert!(error.contains("28x28"), "{error}");
    }

    #[test]
    fn captured_samples_reach_the_folder_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        // Each of these digits takes about 800 bytes with its header (image 0.25), so
        // about five of the eight fit.
        let options = HardSampleOptions {
            rate_per_minute: 1000,
            max_bytes: 4000,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut samples = HardSamples::start(dir.path(), "pi-1", options, None, stop).unwrap();
        let capture = samples.take_capture().unwrap();
        // Fewer than the queue holds, so none is dropped for a full queue.
        for index in 0..8 {
            capture.offer(digit(index), &model(), 3, 0.4);
        }
        drop(capture);
        samples.finish_writing();

        let stats = samples.stats();
        let stored = stats.stored.load(Ordering::Relaxed);
        let full = stats.dropped_folder_full.load(Ordering::Relaxed);
        assert!(stored >= 1, "{stats:?}");
        assert_eq!(stored + full, 8, "{stats:?}");
        assert!(full >= 1, "the bound was reached: {stats:?}");
        let spool = samples.spool_stats();
        assert_eq!(spool.pending_samples as u64, stored);
        assert!(spool.used_bytes <= options.max_bytes, "{spool:?}");

        let sample_files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".sample"))
            .collect();
        assert_eq!(sample_files.len() as u64, stored);
        let reopened = Spool::open(dir.path(), options.max_bytes).unwrap();
        let oldest = reopened.wait_oldest(Duration::ZERO).unwrap();
        let read = reopened.read(&oldest).unwrap();
        assert_eq!(read.metadata.device_id, "pi-1");
        assert_eq!(read.metadata.source, "t10k#0", "the first sample is kept");
        assert_eq!(read.metadata.true_class, Some(7));
        assert_eq!(read.content_type, "image/png");
    }
}
