//! The inference loop: reads samples from the device's shard, classifies them at the
//! configured rate and records the results for telemetry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_runtime::Dataset;

use tokio::sync::watch;

use crate::hard_samples::Capture;
use crate::model::{ModelSlot, top1};
use crate::settings::LiveSettings;
use crate::stats::SharedStats;

/// Maximum sleep between checks of the stop flag and the rate.
const SLEEP_SLICE: Duration = Duration::from_millis(100);
/// Minimum time between two log lines about unusable inputs.
const INPUT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything the loop needs, moved onto its own thread.
#[derive(Debug)]
pub struct InferenceLoop {
    /// The model in use, shared with the local inference API and replaced by updates.
    pub model: ModelSlot,
    pub data: Dataset,
    pub indices: Vec<usize>,
    /// The rate and confidence threshold, which remote configuration may change.
    pub settings: watch::Receiver<LiveSettings>,
    /// Passes over `indices` before the loop idles, `None` for no limit.
    pub passes: Option<u64>,
    pub stats: Arc<SharedStats>,
    pub stop: Arc<AtomicBool>,
    /// Capture of inputs under the confidence threshold, `None` when capture is off.
    pub hard_samples: Option<Capture>,
}

impl InferenceLoop {
    /// Runs until `stop` is set.
    pub fn run(mut self) {
        let mut next_start = Instant::now();
        let mut last_error_log: Option<Instant> = None;
        let mut suppressed_errors = 0u64;
        let mut completed_passes = 0u64;
        let mut position = 0usize;
        // Period the pending `next_start` was scheduled with, so a faster rate set while
        // waiting shortens the wait.
        let mut scheduled_period = Duration::ZERO;

        while !self.stop.load(Ordering::Relaxed) {
            if self.passes.is_some_and(|limit| completed_passes >= limit) {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let rate = self.settings.borrow().rate;
            if let Some(period) = rate.map(|rate| Duration::from_secs_f64(1.0 / rate)) {
                if period < scheduled_period {
                    let shorter = scheduled_period - period;
                    next_start = next_start.checked_sub(shorter).unwrap_or(next_start);
                    scheduled_period = period;
                }
                let now = Instant::now();
                if next_start > now {
                    // Short slices, so a stop request or a new rate is seen within one.
                    std::thread::sleep((next_start - now).min(SLEEP_SLICE));
                    if Instant::now() < next_start {
                        continue;
                    }
                }
                // After a stall, carry on at the set rate instead of bursting to catch up.
                next_start = next_start.max(now) + period;
                scheduled_period = period;
            }

            let index = self.indices[position];
            position += 1;
            if position == self.indices.len() {
                position = 0;
                completed_passes += 1;
            }

            if let Err(error) = self.infer_one(index) {
                self.stats.record_input_error();
                let quiet =
                    last_error_log.is_some_and(|at| at.elapsed() < INPUT_ERROR_LOG_INTERVAL);
                if quiet {
                    suppressed_errors += 1;
                } else {
                    tracing::warn!(%error, index, suppressed = suppressed_errors, "input skipped");
                    last_error_log = Some(Instant::now());
                    suppressed_errors = 0;
                }
            }
        }
        tracing::debug!(passes = completed_passes, "inference loop stopped");
    }

    fn infer_one(&mut self, index: usize) -> Result<(), fleet_runtime::RuntimeError> {
        let sample = self.data.sample(index)?;
        let started = Instant::now();
        let model = self.model.current();
        let info = model.info();
        let input = fleet_runtime::preprocess(&sample, &info.preprocessing)?;
        let scores = model.run(1, &input)?.remove(0);
        let (class, confidence) = top1(&info.confidences(&scores));
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        let low_confidence = confidence < self.settings.borrow().confidence_threshold;
        self.stats.record_inference(
            micros,
            confidence,
            low_confidence,
            sample.label.map(|label| label == class),
        );
        if low_confidence && let Some(capture) = &self.hard_samples {
            capture.offer(sample, info, class, confidence);
        }
        Ok(())
    }
}
