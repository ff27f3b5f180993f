//! Grouping of raw telemetry into hourly totals for `Store::downsample`.

use std::collections::BTreeMap;

use fleet_wire::LatencyHistogram;

use super::StoreError;
use super::rows::parse_hourly_histogram;

const HOUR_MS: i64 = 3_600_000;

/// The columns of a raw telemetry row that go into its hourly row.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct RawRow {
    pub device_id: String,
    pub seq: i64,
    pub received_ms: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    /// The latency histogram as JSON.
    pub latency: String,
}

/// Sums over the raw rows of one device and hour.
#[derive(Debug, Default)]
pub(super) struct HourTotals {
    pub messages: i64,
    pub inferences: i64,
    pub input_errors: i64,
    pub labeled: i64,
    pub correct: i64,
    pub latency: LatencyHistogram,
}

impl HourTotals {
    /// Returns this hour's histogram merged with the one already stored for the hour (if
    /// any), as JSON.
    pub fn merged_latency(
        &self,
        stored: Option<&str>,
        device_id: &str,
        hour_start_ms: i64,
    ) -> Result<String, StoreError> {
        let mut latency = match stored {
            Some(text) => parse_hourly_histogram(text, device_id, hour_start_ms)?,
            None => LatencyHistogram::default(),
        };
        latency.merge(&self.latency);
        Ok(serde_json::to_string(&latency).expect("histograms serialize"))
    }
}

/// Raw rows grouped by device and hour of `received_ms`.
#[derive(Debug, Default)]
pub(super) struct Rollup {
    /// Keyed by (device id, hour start in ms). The map keeps keys sorted, so every
    /// writer updates hourly rows in the same order.
    pub hours: BTreeMap<(String, i64), HourTotals>,
    pub raw_rows: u64,
}

impl Rollup {
    pub fn add(&mut self, row: RawRow) -> Result<(), StoreError> {
        let latency: LatencyHistogram =
            serde_json::from_str(&row.latency).map_err(|source| StoreError::Histogram {
                device_id: row.device_id.clone(),
                seq: row.seq,
                source,
            })?;
        let hour_start_ms = row.received_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let totals = self
            .hours
            .entry((row.device_id, hour_start_ms))
            .or_default();
        totals.messages += 1;
        totals.inferences += row.inferences;
        totals.input_errors += row.input_errors;
        totals.labeled += row.labeled;
        totals.correct += row.correct;
        totals.latency.merge(&latency);
        self.raw_rows += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(device_id: &str, seq: i64, received_ms: i64) -> RawRow {
        let mut latency = LatencyHistogram::default();
        latency.record_micros(1_000 + seq as u32);
        RawRow {
            device_id: device_id.into(),
            seq,
            received_ms,
            inferences: 10,
            input_errors: 1,
            labeled: 8,
            correct: 7,
            latency: serde_json::to_string(&latency).unwrap(),
        }
    }

    #[test]
    fn rollup_groups_by_device_and_hour() {
        let mut rollup = Rollup::default();
        for row in [
            raw("a", 1, 0),
            raw("a", 2, HOUR_MS - 1),
            raw("a", 3, HOUR_MS),
            raw("b", 1, 10),
        ] {
            rollup.add(row).unwrap();
        }
        assert_eq!(rollup.raw_rows, 4);
        let keys: Vec<_> = rollup.hours.keys().cloned().collect();
        assert_eq!(
            keys,
            [("a".into(), 0), ("a".into(), HOUR_MS), ("b".into(), 0)]
        );
        let first = &rollup.hours[&("a".to_string(), 0)];
        assert_eq!(first.messages, 2);
        assert_eq!(first.inferences, 20);
        assert_eq!(first.input_errors, 2);
        assert_eq!(first.labeled, 16);
        assert_eq!(first.correct, 14);
        assert_eq!(first.latency.count, 2);
    }

    #[test]
    fn merged_latency_adds_the_stored_histogram() {
        let mut rollup = Rollup::default();
        rollup.add(raw("a", 1, 0)).unwrap();
        let totals = &rollup.hours[&("a".to_string(), 0)];
        let once = totals.merged_latency(None, "a", 0).unwrap();
        let twice = totals.merged_latency(Some(&once), "a", 0).unwrap();
        let twice: LatencyHistogram = serde_json::from_str(&twice).unwrap();
        assert_eq!(twice.count, 2);

        let error = totals.merged_latency(Some("{"), "a", 0).unwrap_err();
        assert!(
            matches!(error, StoreError::HourlyHistogram { .. }),
            "{error:?}"
        );
    }
}
