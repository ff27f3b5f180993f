//! Simulated devices that build telemetry like an agent running the digit CNN.
//!
//! Each device has its own seeded random generator and a fixed profile (typical
//! latency, CPU load, memory size, whether it has a temperature sensor), so the same
//! seed gives the same fleet whichever connection a device is assigned to.

use std::time::Duration;

use fleet_wire::{LatencyHistogram, ModelRef, SystemStats, Telemetry};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Binomial, Distribution, LogNormal, Poisson};

/// Inferences per second of a simulated device, the rate the demo agents run at.
pub const INFERENCES_PER_SECOND: f64 = 20.0;
/// Model the simulated devices report: the shipped digit CNN.
const MODEL_NAME: &str = "digit-cnn";
const MODEL_VERSION: &str = "1.0.0";
/// Top-1 accuracy of the digit CNN on the MNIST test set.
const ACCURACY: f64 = 0.9906;
/// Fraction of inputs that fail to decode.
const INPUT_ERROR_RATE: f64 = 0.001;
/// Fraction of inferences slowed down by a scheduling or thermal hiccup, and by how much.
const SLOW_INFERENCE_RATE: f64 = 0.01;
const SLOW_INFERENCE_FACTOR: f64 = 4.0;
/// Spread of the latency distribution: the sigma of its logarithm.
const LATENCY_LOG_SIGMA: f64 = 0.25;
/// Top-1 confidence under which an inference counts as low-confidence, the agent's
/// default threshold.
const CONFIDENCE_THRESHOLD: f32 = 0.5;

/// Properties of a device that stay fixed for the whole run.
#[derive(Debug, Clone)]
struct Profile {
    latency: LogNormal<f64>,
    cpu_percent: f32,
    process_memory_bytes: u64,
    memory_total_bytes: u64,
    memory_used_fraction: f64,
    /// `None` for boards without a temperature sensor.
    temperature_celsius: Option<f32>,
}

impl Profile {
    fn random(rng: &mut SmallRng) -> Profile {
        // Median single-sample latency between 0.8 ms (a Jetson) and 3 ms (a small
        // ARM board).
        let median_micros: f64 = rng.random_range(800.0..3_000.0);
        let latency = LogNormal::new(median_micros.ln(), LATENCY_LOG_SIGMA)
            .expect("the latency sigma is positive and finite");
        let memory_total_bytes = if rng.random_bool(0.5) {
            4 << 30
        } else {
            8 << 30
        };
        Profile {
            latency,
            cpu_percent: rng.random_range(15.0..60.0),
            process_memory_bytes: rng.random_range(38_000_000..60_000_000),
            memory_total_bytes,
            memory_used_fraction: rng.random_range(0.3..0.7),
            temperature_celsius: rng.random_bool(0.8).then(|| rng.random_range(40.0..65.0)),
        }
    }
}

/// One simulated device: its id, telemetry topic and next sequence number.
#[derive(Debug, Clone)]
pub struct SimulatedDevice {
    device_id: String,
    topic: String,
    /// Messages sent so far, so the next message carries `sent + 1`.
    sent: u64,
    /// Time each message's counters cover.
    interval: Duration,
    profile: Profile,
    rng: SmallRng,
}

impl SimulatedDevice {
    /// Creates a device that publishes on `{topic_prefix}/{device_id}/telemetry` and
    /// simulates `interval` of inference per message. `seed` fixes its profile and
    /// the random parts of its messages.
    pub fn new(
        device_id: String,
        topic_prefix: &str,
        interval: Duration,
        seed: u64,
    ) -> SimulatedDevice {
        let mut rng = SmallRng::seed_from_u64(seed);
        let profile = Profile::random(&mut rng);
        SimulatedDevice {
            topic: format!("{topic_prefix}/{device_id}/telemetry"),
            device_id,
            sent: 0,
            interval,
            profile,
            rng,
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Number of messages marked sent, which is also the highest sequence number sent.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Builds the next message, with sequence number `sent() + 1` and the device clock
    /// at `now_ms`. The sequence number advances only when [`Self::mark_sent`] is
    /// called, so a message that could not be handed to the client is built again.
    pub fn next_telemetry(&mut self, now_ms: u64) -> Telemetry {
        let interval_ms = self.interval.as_millis().min(u128::from(u32::MAX)) as u32;
        let expected_attempts = INFERENCES_PER_SECOND * self.interval.as_secs_f64();
        let attempts = if expected_attempts > 0.0 {
            Poisson::new(expected_attempts)
                .expect("the expected count is positive and finite")
                .sample(&mut self.rng) as u64
        } else {
            0
        };
        let input_errors = Binomial::new(attempts, INPUT_ERROR_RATE)
            .expect("the error rate is a probability")
            .sample(&mut self.rng);
        let inferences = attempts - input_errors;

        let mut latency = LatencyHistogram::default();
        let mut correct = 0u32;
        let mut confidence_sum = 0f32;
        let mut low_confidence = 0u32;
        for _ in 0..inferences {
            let mut micros = self.profile.latency.sample(&mut self.rng);
            if self.rng.random_bool(SLOW_INFERENCE_RATE) {
                micros *= SLOW_INFERENCE_FACTOR;
            }
            latency.record_micros(micros.round().min(f64::from(u32::MAX)) as u32);
            // A correct prediction is usually confident, a wrong one rarely is.
            let confidence = if self.rng.random_bool(ACCURACY) {
                correct += 1;
                1.0 - 0.08 * self.rng.random::<f32>().powi(2)
            } else {
                0.3 + 0.5 * self.rng.random::<f32>()
            };
            confidence_sum += confidence;
            if confidence < CONFIDENCE_THRESHOLD {
                low_confidence += 1;
            }
        }

        let inferences = inferences as u32;
        Telemetry {
            device_id: self.device_id.clone(),
            seq: self.sent + 1,
            device_time_ms: now_ms,
            interval_ms,
            model: ModelRef {
                name: MODEL_NAME.into(),
                version: MODEL_VERSION.into(),
            },
            inferences,
            input_errors: input_errors as u32,
            // Every MNIST input carries its label.
            labeled: inferences,
            correct,
            confidence_sum,
            low_confidence,
            latency,
            system: self.system_stats(),
            fallback: Default::default(),
        }
    }

    /// Advances the sequence number after the message from [`Self::next_telemetry`] was
    /// handed to the MQTT client.
    pub fn mark_sent(&mut self) {
        self.sent += 1;
    }

    /// Samples host measurements around the device's profile.
    fn system_stats(&mut self) -> SystemStats {
        let profile = &self.profile;
        let cpu_percent =
            (profile.cpu_percent + self.rng.random_range(-5.0..5.0)).clamp(0.0, 100.0);
        let used_fraction =
            (profile.memory_used_fraction + self.rng.random_range(-0.02..0.02)).clamp(0.0, 1.0);
        let process_memory_bytes =
            profile.process_memory_bytes + self.rng.random_range(0..500_000u64);
        let temperature_celsius = profile
            .temperature_celsius
            .map(|base| base + 0.1 * cpu_percent + self.rng.random_range(-1.0..1.0));
        SystemStats {
            cpu_percent,
            process_memory_bytes,
            memory_used_bytes: (profile.memory_total_bytes as f64 * used_fraction) as u64,
            memory_total_bytes: profile.memory_total_bytes,
            temperature_celsius,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_wire::topic::{self, TopicKind};

    fn device(interval: Duration) -> SimulatedDevice {
        SimulatedDevice::new("pi-7".into(), topic::PREFIX, interval, 7)
    }

    #[test]
    fn topic_matches_the_wire_crate() {
        let device = device(Duration::from_secs(1));
        assert_eq!(
            device.topic(),
            topic::device_topic("pi-7", TopicKind::Telemetry)
        );
    }

    #[test]
    fn sequence_advances_only_when_marked_sent() {
        let mut device = device(Duration::from_secs(1));
        assert_eq!(device.next_telemetry(1_000).seq, 1);
        assert_eq!(device.next_telemetry(2_000).seq, 1);
        device.mark_sent();
        assert_eq!(device.next_telemetry(3_000).seq, 2);
        assert_eq!(device.sent(), 1);
    }

    #[test]
    fn counters_are_consistent() {
        let mut device = device(Duration::from_secs(5));
        for _ in 0..200 {
            let telemetry = device.next_telemetry(1_000);
            device.mark_sent();
            assert_eq!(telemetry.latency.count, telemetry.inferences);
            assert_eq!(telemetry.labeled, telemetry.inferences);
            assert!(telemetry.correct <= telemetry.labeled);
            assert!(telemetry.low_confidence <= telemetry.inferences);
            assert!(telemetry.confidence_sum <= telemetry.inferences as f32);
            assert_eq!(telemetry.interval_ms, 5_000);
            let system = &telemetry.system;
            assert!((0.0..=100.0).contains(&system.cpu_percent));
            assert!(system.memory_used_bytes <= system.memory_total_bytes);
        }
    }

    #[test]
    fn counters_follow_the_simulated_rates() {
        let mut device = device(Duration::from_secs(1));
        let mut latency = LatencyHistogram::default();
        let (mut inferences, mut correct) = (0u64, 0u64);
        let messages = 1_000;
        for _ in 0..messages {
            let telemetry = device.next_telemetry(1_000);
            device.mark_sent();
            inferences += u64::from(telemetry.inferences);
            correct += u64::from(telemetry.correct);
            latency.merge(&telemetry.latency);
        }
        let per_message = inferences as f64 / f64::from(messages);
        assert!(
            (19.0..=21.0).contains(&per_message),
            "{per_message} inferences per message"
        );
        let accuracy = correct as f64 / inferences as f64;
        assert!((0.98..=1.0).contains(&accuracy), "accuracy {accuracy}");
        let p50 = latency.quantile_micros(0.5).unwrap();
        assert!((700.0..=3_600.0).contains(&p50), "p50 {p50} µs");
    }

    #[test]
    fn same_seed_gives_same_messages() {
        let mut first = device(Duration::from_secs(1));
        let mut second = device(Duration::from_secs(1));
        assert_eq!(first.next_telemetry(5), second.next_telemetry(5));
    }

    #[test]
    fn zero_interval_has_no_inferences() {
        let mut device = device(Duration::ZERO);
        let telemetry = device.next_telemetry(1_000);
        assert_eq!(telemetry.inferences, 0);
        assert!(telemetry.latency.buckets.is_empty());
    }
}
