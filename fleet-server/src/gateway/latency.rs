//! A sliding window of request latencies for the autoscaler's p95.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Latencies of the requests completed within the last `window`. At most `max_samples`
/// are kept, and the oldest are dropped first when requests arrive faster.
#[derive(Debug)]
pub struct LatencyWindow {
    samples: Mutex<VecDeque<(Instant, f64)>>,
    window: Duration,
    max_samples: usize,
}

impl LatencyWindow {
    pub fn new(window: Duration, max_samples: usize) -> LatencyWindow {
        LatencyWindow {
            samples: Mutex::new(VecDeque::new()),
            window,
            max_samples,
        }
    }

    /// Adds the latency of one completed request.
    pub fn record(&self, latency: Duration) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() >= self.max_samples {
            samples.pop_front();
        }
        samples.push_back((Instant::now(), latency.as_secs_f64() * 1000.0));
    }

    /// Returns the 95th percentile in milliseconds over the window, or `None` when no
    /// request completed in it.
    pub fn p95_ms(&self) -> Option<f64> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            samples.pop_front();
        }
        let mut values: Vec<f64> = samples.iter().map(|(_, ms)| *ms).collect();
        drop(samples);
        percentile(&mut values, 0.95)
    }
}

/// Returns the `q` quantile (0 to 1) by the nearest-rank method, sorting `values`.
pub fn percentile(values: &mut [f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let mut values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut values, 0.95), Some(95.0));
        assert_eq!(percentile(&mut values, 0.5), Some(50.0));
        assert_eq!(percentile(&mut [], 0.95), None);
    }

    #[test]
    fn window_keeps_recent_samples_only() {
        let window = LatencyWindow::new(Duration::from_millis(50), 3);
        for ms in [1, 2, 3, 4] {
            window.record(Duration::from_millis(ms));
        }
        assert_eq!(window.p95_ms(), Some(4.0));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(window.p95_ms(), None);
    }
}
