//! Per-principal request throttling with a keyed GCRA token bucket.
//!
//! GCRA (the generic cell rate algorithm in `governor`) tracks one theoretical arrival
//! time per key instead of a counter per window. A client therefore cannot get two
//! windows' worth of requests through around a window boundary, because after a burst
//! requests are admitted only as fast as the rate refills. Keys whose bucket is full again hold no
//! information and are evicted on a timer and whenever the map grows past a threshold,
//! so memory follows the number of recently active principals.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};

type KeyedLimiter<K, C> =
    RateLimiter<K, HashMapStateStore<K>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A keyed token bucket: `rate_per_second` on average, up to `burst` at once.
#[derive(Debug)]
pub struct Throttle<K: Hash + Eq + Clone = String, C: Clock = DefaultClock> {
    limiter: Arc<KeyedLimiter<K, C>>,
    clock: C,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Clone for Throttle<K, C> {
    fn clone(&self) -> Self {
        Throttle {
            limiter: self.limiter.clone(),
            clock: self.clock.clone(),
            max_keys: self.max_keys,
        }
    }
}

impl<K: Hash + Eq + Clone> Throttle<K, DefaultClock> {
    /// Creates a throttle on the monotonic clock.
    pub fn new(rate_per_second: NonZeroU32, burst: NonZeroU32, max_keys: usize) -> Self {
        Throttle::with_clock(rate_per_second, burst, max_keys, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock + Clone> Throttle<K, C> {
    /// Creates a throttle on `clock`; tests pass a fake clock.
    pub fn with_clock(
        rate_per_second: NonZeroU32,
        burst: NonZeroU32,
        max_keys: usize,
        clock: C,
    ) -> Self {
        let quota = Quota::per_second(rate_per_second).allow_burst(burst);
        Throttle {
            limiter: Arc::new(RateLimiter::hashmap_with_clock(quota, clock.clone())),
            clock,
            max_keys,
        }
    }

    /// Counts one request for `key`. Returns how long the caller must wait before the
    /// next request would be admitted when this one is over the rate.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        if self.limiter.len() > self.max_keys {
            self.evict_idle();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops every key whose bucket has refilled and releases the freed memory; returns
    /// how many keys remain.
    pub fn evict_idle(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }

    /// Returns the number of keys tracked now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Returns whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Rounds a wait up to whole seconds for a `Retry-After` header, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs();
    let secs = if wait.subsec_nanos() > 0 {
        whole + 1
    } else {
        whole
    };
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn nonzero(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    #[test]
    fn window_boundary_admits_no_second_burst() {
        let clock = FakeRelativeClock::default();
        let rate = 10;
        let throttle = Throttle::with_clock(nonzero(rate), nonzero(rate), 1000, clock.clone());
        let key = "client".to_string();

        // A fixed one-second window would admit `rate` at 0.999 s and `rate` again at
        // 1.001 s; GCRA admits the burst once and then one request per 100 ms.
        clock.advance(Duration::from_millis(999));
        let first = (0..rate).filter(|_| throttle.check(&key).is_ok()).count();
        clock.advance(Duration::from_millis(2));
        let second = (0..rate).filter(|_| throttle.check(&key).is_ok()).count();
        assert_eq!(first, rate as usize);
        assert_eq!(second, 0);

        // Over any interval of length T after the burst, at most T * rate more get in.
        let mut admitted = 0;
        for _ in 0..1000 {
            clock.advance(Duration::from_millis(1));
            admitted += usize::from(throttle.check(&key).is_ok());
        }
        assert!(admitted <= 10, "admitted {admitted} in one second at 10/s");
        assert!(admitted >= 9, "admitted {admitted} in one second at 10/s");
    }

    #[test]
    fn wait_time_rounds_up_to_whole_seconds() {
        let clock = FakeRelativeClock::default();
        let throttle = Throttle::with_clock(nonzero(1), nonzero(1), 1000, clock.clone());
        let key = "client".to_string();
        assert!(throttle.check(&key).is_ok());
        clock.advance(Duration::from_millis(300));
        let wait = throttle.check(&key).unwrap_err();
        assert_eq!(wait, Duration::from_millis(700));
        assert_eq!(retry_after_secs(wait), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[test]
    fn million_keys_are_evicted_once_idle() {
        let clock = FakeRelativeClock::default();
        let throttle: Throttle<u64, _> =
            Throttle::with_clock(nonzero(10), nonzero(20), usize::MAX, clock.clone());
        for key in 0..1_000_000u64 {
            assert!(throttle.check(&key).is_ok());
        }
        assert_eq!(throttle.len(), 1_000_000);

        // One request took one token, which refills in 100 ms. governor drops a key one
        // refill interval after its bucket is full again, so after 200 ms only the key
        // used just now remains.
        clock.advance(Duration::from_millis(200));
        assert!(throttle.check(&7).is_ok());
        assert_eq!(throttle.evict_idle(), 1);
    }

    #[test]
    fn size_threshold_triggers_eviction() {
        let clock = FakeRelativeClock::default();
        let throttle: Throttle<u64, _> =
            Throttle::with_clock(nonzero(100), nonzero(1), 1000, clock.clone());
        for key in 0..50_000u64 {
            // Each key's bucket refills 10 ms after its request and is droppable 10 ms
            // later, so about 20 keys are recent at any time and the threshold keeps
            // the map small.
            clock.advance(Duration::from_millis(1));
            assert!(throttle.check(&key).is_ok());
            assert!(
                throttle.len() <= 1001,
                "{} keys at key {key}",
                throttle.len()
            );
        }
    }
}
