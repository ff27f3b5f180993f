//! A compact latency histogram that devices fill and the server merges.

use serde::{Deserialize, Serialize};

/// Buckets per doubling of latency. Four gives bucket bounds about 19% apart, so a
/// percentile read from the histogram is within 19% of the true value.
const BUCKETS_PER_DOUBLING: f64 = 4.0;

/// Index of the last bucket; its upper bound, 2^(127/4) microseconds, is about 55 minutes.
const LAST_BUCKET: u16 = 127;

/// Latencies of one interval in logarithmic buckets.
///
/// Bucket `i` counts latencies in (2^((i-1)/4), 2^(i/4)] microseconds. Only non-empty
/// buckets are stored, as `(index, count)` pairs in increasing index order, which keeps a
/// typical interval's histogram under 30 bytes in postcard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    pub buckets: Vec<(u16, u32)>,
    /// Number of recorded latencies.
    pub count: u32,
    /// Sum of recorded latencies in microseconds.
    pub sum_micros: u64,
    /// Largest recorded latency in microseconds.
    pub max_micros: u32,
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record_micros(&mut self, micros: u32) {
        let index = bucket_index(micros);
        match self.buckets.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(position) => self.buckets[position].1 += 1,
            Err(position) => self.buckets.insert(position, (index, 1)),
        }
        self.count += 1;
        self.sum_micros += u64::from(micros);
        self.max_micros = self.max_micros.max(micros);
    }

    /// Adds every latency recorded in `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for &(index, count) in &other.buckets {
            match self.buckets.binary_search_by_key(&index, |(i, _)| *i) {
                Ok(position) => self.buckets[position].1 += count,
                Err(position) => self.buckets.insert(position, (index, count)),
            }
        }
        self.count += other.count;
        self.sum_micros += other.sum_micros;
        self.max_micros = self.max_micros.max(other.max_micros);
    }

    /// Returns the latency in microseconds under which a fraction `quantile` (0 to 1) of
    /// the recorded latencies fall, as the upper bound of the bucket that reaches it,
    /// capped at the largest recorded value. `None` when nothing was recorded.
    pub fn quantile_micros(&self, quantile: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (quantile.clamp(0.0, 1.0) * f64::from(self.count))
            .ceil()
            .max(1.0);
        let mut seen = 0u64;
        for &(index, count) in &self.buckets {
            seen += u64::from(count);
            if seen as f64 >= rank {
                return Some(bucket_upper_micros(index).min(f64::from(self.max_micros)));
            }
        }
        Some(f64::from(self.max_micros))
    }

    /// Mean latency in microseconds, `None` when nothing was recorded.
    pub fn mean_micros(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum_micros as f64 / f64::from(self.count))
    }
}

fn bucket_index(micros: u32) -> u16 {
    if micros <= 1 {
        return 0;
    }
    let index = (f64::from(micros).log2() * BUCKETS_PER_DOUBLING).ceil();
    (index as u16).min(LAST_BUCKET)
}

fn bucket_upper_micros(index: u16) -> f64 {
    (f64::from(index) / BUCKETS_PER_DOUBLING).exp2()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_inside_its_bucket() {
        for micros in [2, 3, 17, 100, 999, 1_000, 65_537, 10_000_000] {
            let index = bucket_index(micros);
            let upper = bucket_upper_micros(index);
            let lower = bucket_upper_micros(index - 1);
            assert!(
                f64::from(micros) <= upper * (1.0 + 1e-12),
                "{micros} above {upper}"
            );
            assert!(f64::from(micros) > lower, "{micros} not above {lower}");
        }
    }

    #[test]
    fn quantiles_are_within_bucket_error() {
        let mut histogram = LatencyHistogram::default();
        for micros in 1..=1000u32 {
            histogram.record_micros(micros * 10);
        }
        let p50 = histogram.quantile_micros(0.5).unwrap();
        let p95 = histogram.quantile_micros(0.95).unwrap();
        assert!((5_000.0..=5_000.0 * 1.19).contains(&p50), "p50 {p50}");
        assert!((9_500.0..=10_000.0).contains(&p95), "p95 {p95}");
        assert_eq!(histogram.quantile_micros(1.0).unwrap(), 10_000.0);
        assert_eq!(histogram.mean_micros().unwrap(), 5_005.0);
    }

    #[test]
    fn merge_equals_recording_everything_once() {
        let mut left = LatencyHistogram::default();
        let mut right = LatencyHistogram::default();
        let mut both = LatencyHistogram::default();
        for (i, micros) in [5u32, 900, 900, 40_000, 7, 123_456].into_iter().enumerate() {
            if i % 2 == 0 {
                left.record_micros(micros);
            } else {
                right.record_micros(micros);
            }
            both.record_micros(micros);
        }
        left.merge(&right);
        assert_eq!(left, both);
    }

    #[test]
    fn empty_histogram_has_no_quantiles() {
        let histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile_micros(0.5), None);
        assert_eq!(histogram.mean_micros(), None);
    }
}
