//! Counters of one telemetry interval, filled by the inference loop.

use std::sync::Mutex;

use fleet_wire::LatencyHistogram;

/// Counters of the inferences since the last telemetry message.
#[derive(Debug, Default, Clone)]
pub struct IntervalStats {
    pub inferences: u32,
    pub input_errors: u32,
    pub labeled: u32,
    pub correct: u32,
    pub confidence_sum: f32,
    pub low_confidence: u32,
    pub latency: LatencyHistogram,
}

/// Interval counters shared between the inference thread and the reporter.
#[derive(Debug, Default)]
pub struct SharedStats(Mutex<IntervalStats>);

impl SharedStats {
    /// Records one completed inference.
    pub fn record_inference(&self, micros: u32, confidence: f32, low: bool, correct: Option<bool>) {
        let mut stats = self.lock();
        stats.inferences += 1;
        stats.confidence_sum += confidence;
        stats.low_confidence += u32::from(low);
        if let Some(correct) = correct {
            stats.labeled += 1;
            stats.correct += u32::from(correct);
        }
        stats.latency.record_micros(micros);
    }

    /// Records an input that could not be used.
    pub fn record_input_error(&self) {
        self.lock().input_errors += 1;
    }

    /// Returns the counters so far and starts a new interval.
    pub fn take(&self) -> IntervalStats {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntervalStats> {
        // A panic while holding the lock leaves plain counters behind, which are still
        // valid, so a poisoned lock is used as is.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
