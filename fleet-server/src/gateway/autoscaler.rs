//! Replica count decisions from load and latency.
//!
//! Load is the number of requests in flight at backends plus those queued in the
//! gateway, sampled every tick and averaged over two windows. The rules, in order:
//!
//! 1. **Bounds.** Fewer local replicas than `min` start at once; more than `max` stop.
//! 2. **Wake.** With no local replica and no ready external backend, a waiting request
//!    starts one at once, so a model scaled to zero serves its first request after a
//!    replica start instead of failing.
//! 3. **Panic.** When the short-window load exceeds `panic_threshold` times what the
//!    backends are sized for, the count jumps to what the short window needs, with no
//!    cooldown, and does not go down until a stable window has passed without panic.
//! 4. **Scale up** to `ceil(stable load / target_in_flight)` backends, at most once per
//!    `scale_up_cooldown_secs`. When p95 latency is over the SLO while there is load,
//!    add one replica, at most once per stable window so the new one shows in the p95.
//! 5. **Scale down** by one only when the load would fit in one backend fewer at
//!    `scale_down_utilization` of the target, p95 is within the SLO, and
//!    `scale_down_cooldown_secs` have passed since the last change (the hysteresis).
//! 6. **Scale to zero** when `min = 0` and no request arrived for `idle_before_zero_secs`.
//!
//! External backends count as capacity but are never started or stopped.

use std::collections::VecDeque;
use std::time::Duration;

use super::config::{AutoscalerPolicy, ReplicaBounds};

/// Reason for a replica count, exported as the `reason` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Nothing to change.
    Steady,
    /// Below `replicas.min`.
    MinReplicas,
    /// Above `replicas.max`.
    MaxReplicas,
    /// A request waits and nothing runs.
    Wake,
    /// Sudden step in load.
    Panic,
    /// Requests waiting in the gateway's queue.
    QueueDepth,
    /// Requests in flight per backend above the target.
    InFlight,
    /// p95 latency above the SLO.
    LatencyOverSlo,
    /// A scale-up is due but the cooldown has not passed.
    Cooldown,
    /// Load fits in fewer backends.
    LowLoad,
    /// No request for the idle time of a scale-to-zero model.
    Idle,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Steady => "steady",
            Reason::MinReplicas => "min_replicas",
            Reason::MaxReplicas => "max_replicas",
            Reason::Wake => "wake",
            Reason::Panic => "panic",
            Reason::QueueDepth => "queue_depth",
            Reason::InFlight => "in_flight",
            Reason::LatencyOverSlo => "p95_over_slo",
            Reason::Cooldown => "cooldown",
            Reason::LowLoad => "low_load",
            Reason::Idle => "idle",
        }
    }
}

/// Load and backend counts observed at one tick.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Time since the autoscaler started.
    pub at: Duration,
    pub in_flight: usize,
    pub queued: usize,
    /// p95 latency over the stable window in milliseconds; `None` without samples.
    pub p95_ms: Option<f64>,
    /// Time since the last request arrived.
    pub idle_for: Duration,
    /// Local replicas running or starting, draining ones excluded.
    pub local: usize,
    /// External backends that passed their last health check.
    pub external_ready: usize,
}

/// The chosen number of local replicas and why.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub desired: usize,
    pub reason: Reason,
    pub panic: bool,
    /// Load averaged over the stable and the panic window.
    pub stable_load: f64,
    pub panic_load: f64,
}

/// Decision state of one model's autoscaler.
#[derive(Debug)]
pub struct Autoscaler {
    policy: AutoscalerPolicy,
    min: usize,
    max: usize,
    idle_before_zero: Duration,
    slo_ms: f64,
    samples: VecDeque<(Duration, f64)>,
    panic_until: Option<Duration>,
    last_up: Option<Duration>,
    last_latency_up: Option<Duration>,
    last_change: Option<Duration>,
}

impl Autoscaler {
    pub fn new(policy: AutoscalerPolicy, bounds: &ReplicaBounds, slo_ms: f64) -> Autoscaler {
        Autoscaler {
            policy,
            min: bounds.min,
            max: bounds.max,
            idle_before_zero: Duration::from_secs(bounds.idle_before_zero_secs),
            slo_ms,
            samples: VecDeque::new(),
            panic_until: None,
            last_up: None,
            last_latency_up: None,
            // Counting the start as a change keeps the replicas of a fresh gateway for
            // one scale-down cooldown before any is drained.
            last_change: Some(Duration::ZERO),
        }
    }

    /// Records the observation's load and returns the number of local replicas to run.
    pub fn decide(&mut self, observation: &Observation) -> Decision {
        let at = observation.at;
        let load = (observation.in_flight + observation.queued) as f64;
        let (stable_load, panic_load) = self.record_load(at, load);
        let decision = |desired, reason, panic| Decision {
            desired,
            reason,
            panic,
            stable_load,
            panic_load,
        };
        let current = observation.local;
        let externals = observation.external_ready;
        let target = self.policy.target_in_flight;
        let needed = |load: f64| ((load / target).ceil() as usize).saturating_sub(externals);

        if current < self.min {
            return self.changed(at, decision(self.min, Reason::MinReplicas, false), current);
        }
        if current > self.max {
            return self.changed(at, decision(self.max, Reason::MaxReplicas, false), current);
        }
        if current == 0 && externals == 0 && load > 0.0 {
            let desired = needed(panic_load).clamp(1, self.max.max(1));
            return self.changed(at, decision(desired, Reason::Wake, false), current);
        }

        let capacity = ((current + externals) as f64 * target).max(target);
        if panic_load > self.policy.panic_threshold * capacity {
            self.panic_until = Some(at + secs(self.policy.stable_window_secs));
        }
        if self.panic_until.is_some_and(|until| at < until) {
            let desired = needed(panic_load).max(needed(stable_load)).max(current);
            let desired = desired.min(self.max);
            let reason = if desired > current {
                Reason::Panic
            } else {
                Reason::Steady
            };
            return self.changed(at, decision(desired, reason, true), current);
        }
        self.panic_until = None;

        let wanted = needed(stable_load).clamp(self.min, self.max);
        if wanted > current {
            if self.cooling(self.last_up, self.policy.scale_up_cooldown_secs, at) {
                return decision(current, Reason::Cooldown, false);
            }
            let reason = if observation.queued > 0 {
                Reason::QueueDepth
            } else {
                Reason::InFlight
            };
            return self.changed(at, decision(wanted, reason, false), current);
        }

        let over_slo = observation.p95_ms.is_some_and(|p95| p95 > self.slo_ms);
        if over_slo && load > 0.0 && current < self.max {
            let window = self.policy.stable_window_secs;
            if self.cooling(self.last_latency_up, window, at) {
                return decision(current, Reason::Cooldown, false);
            }
            self.last_latency_up = Some(at);
            return self.changed(
                at,
                decision(current + 1, Reason::LatencyOverSlo, false),
                current,
            );
        }

        if self.min == 0
            && current > 0
            && load == 0.0
            && observation.idle_for >= self.idle_before_zero
        {
            return self.changed(at, decision(0, Reason::Idle, false), current);
        }
        let smaller = current.saturating_sub(1);
        let fits_smaller = stable_load
            <= (smaller + externals) as f64 * target * self.policy.scale_down_utilization;
        let may_shrink = smaller >= self.min.max(1)
            && fits_smaller
            && !over_slo
            && !self.cooling(self.last_change, self.policy.scale_down_cooldown_secs, at);
        if may_shrink {
            return self.changed(at, decision(smaller, Reason::LowLoad, false), current);
        }
        decision(current, Reason::Steady, false)
    }

    /// Adds a load sample and returns the averages over the stable and panic windows.
    fn record_load(&mut self, at: Duration, load: f64) -> (f64, f64) {
        self.samples.push_back((at, load));
        let stable_start = at.saturating_sub(secs(self.policy.stable_window_secs));
        while self.samples.front().is_some_and(|(t, _)| *t < stable_start) {
            self.samples.pop_front();
        }
        let panic_start = at.saturating_sub(secs(self.policy.panic_window_secs));
        let average = |start: Duration| {
            let (sum, count) = self
                .samples
                .iter()
                .filter(|(t, _)| *t >= start)
                .fold((0.0, 0usize), |(sum, count), (_, load)| {
                    (sum + load, count + 1)
                });
            sum / count.max(1) as f64
        };
        (average(stable_start), average(panic_start))
    }

    fn cooling(&self, last: Option<Duration>, cooldown_secs: f64, at: Duration) -> bool {
        last.is_some_and(|last| at.saturating_sub(last) < secs(cooldown_secs))
    }

    /// Records the time of a change, if the decision is one.
    fn changed(&mut self, at: Duration, decision: Decision, current: usize) -> Decision {
        if decision.desired > current {
            self.last_up = Some(at);
        }
        if decision.desired != current {
            self.last_change = Some(at);
        }
        decision
    }
}

fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AutoscalerPolicy {
        AutoscalerPolicy {
            interval_ms: 500,
            target_in_flight: 4.0,
            stable_window_secs: 10.0,
            panic_window_secs: 2.0,
            panic_threshold: 2.0,
            scale_down_utilization: 0.6,
            scale_up_cooldown_secs: 2.0,
            scale_down_cooldown_secs: 5.0,
        }
    }

    fn bounds(min: usize, max: usize) -> ReplicaBounds {
        ReplicaBounds {
            min,
            max,
            max_in_flight: 32,
            max_queued: 1024,
            idle_before_zero_secs: 30,
        }
    }

    fn observe(at_ms: u64, in_flight: usize, local: usize) -> Observation {
        Observation {
            at: Duration::from_millis(at_ms),
            in_flight,
            queued: 0,
            p95_ms: Some(10.0),
            idle_for: Duration::ZERO,
            local,
            external_ready: 0,
        }
    }

    #[test]
    fn starts_min_replicas_and_stops_extra() {
        let mut scaler = Autoscaler::new(policy(), &bounds(2, 3), 50.0);
        let up = scaler.decide(&observe(0, 0, 0));
        assert_eq!((up.desired, up.reason), (2, Reason::MinReplicas));
        let down = scaler.decide(&observe(500, 0, 5));
        assert_eq!((down.desired, down.reason), (3, Reason::MaxReplicas));
    }

    #[test]
    fn sudden_step_enters_panic_and_scales_at_once() {
        let mut scaler = Autoscaler::new(policy(), &bounds(1, 8), 50.0);
        for tick in 0..20 {
            let steady = scaler.decide(&observe(tick * 500, 1, 1));
            assert_eq!(steady.desired, 1);
        }
        // 24 in flight against one replica sized for 4: six times its capacity. The
        // short window averages it in within a few ticks.
        let mut at = 10_000;
        let mut step = scaler.decide(&observe(at, 24, 1));
        while !step.panic && at < 12_000 {
            at += 500;
            step = scaler.decide(&observe(at, 24, 1));
        }
        assert!(step.panic, "no panic within 2 s: {step:?}");
        assert_eq!(step.reason, Reason::Panic);
        assert!(step.desired >= 2, "{step:?}");
        // Still in panic: no scale-down even though the load vanished.
        let after = scaler.decide(&observe(at + 500, 0, step.desired));
        assert!(after.panic);
        assert_eq!(after.desired, step.desired);
    }

    #[test]
    fn scale_up_respects_cooldown() {
        let mut policy = policy();
        policy.panic_threshold = 100.0;
        let mut scaler = Autoscaler::new(policy, &bounds(1, 8), 50.0);
        let first = scaler.decide(&observe(0, 12, 1));
        assert_eq!((first.desired, first.reason), (3, Reason::InFlight));
        let second = scaler.decide(&observe(500, 40, 3));
        assert_eq!((second.desired, second.reason), (3, Reason::Cooldown));
        let third = scaler.decide(&observe(2500, 40, 3));
        assert!(third.desired > 3, "{third:?}");
    }

    #[test]
    fn scale_down_needs_headroom_and_cooldown() {
        let mut scaler = Autoscaler::new(policy(), &bounds(1, 8), 50.0);
        // Load 9 on 3 replicas of target 4: two replicas would be at 9/8 > 0.6, hold.
        for tick in 0..30 {
            let hold = scaler.decide(&observe(tick * 500, 9, 3));
            assert_eq!(hold.desired, 3, "tick {tick}: {hold:?}");
        }
        // Load 2: fits in two replicas at 2/8 <= 0.6, and no change for 15 s.
        let mut at = 15_000;
        let mut decision = scaler.decide(&observe(at, 2, 3));
        while decision.desired == 3 {
            at += 500;
            decision = scaler.decide(&observe(at, 2, 3));
        }
        assert_eq!((decision.desired, decision.reason), (2, Reason::LowLoad));
        // The next step down waits for the cooldown again.
        let next = scaler.decide(&observe(at + 500, 0, 2));
        assert_eq!(next.desired, 2);
    }

    #[test]
    fn latency_over_slo_adds_one_replica_per_window() {
        let mut scaler = Autoscaler::new(policy(), &bounds(1, 8), 50.0);
        let mut slow = observe(0, 2, 1);
        slow.p95_ms = Some(80.0);
        let first = scaler.decide(&slow);
        assert_eq!((first.desired, first.reason), (2, Reason::LatencyOverSlo));
        slow.at = Duration::from_secs(5);
        slow.local = 2;
        assert_eq!(scaler.decide(&slow).desired, 2);
        slow.at = Duration::from_secs(11);
        assert_eq!(scaler.decide(&slow).desired, 3);
    }

    #[test]
    fn idle_model_scales_to_zero_and_wakes() {
        let mut scaler = Autoscaler::new(policy(), &bounds(0, 2), 50.0);
        let mut idle = observe(60_000, 0, 1);
        idle.idle_for = Duration::from_secs(31);
        let down = scaler.decide(&idle);
        assert_eq!((down.desired, down.reason), (0, Reason::Idle));
        let mut waiting = observe(61_000, 0, 0);
        waiting.queued = 1;
        let wake = scaler.decide(&waiting);
        assert_eq!((wake.desired, wake.reason), (1, Reason::Wake));
    }

    #[test]
    fn externals_count_as_capacity() {
        let mut scaler = Autoscaler::new(policy(), &bounds(0, 4), 50.0);
        let mut observation = observe(0, 3, 0);
        observation.external_ready = 1;
        let decision = scaler.decide(&observation);
        assert_eq!(decision.desired, 0, "{decision:?}");
    }
}
