//! The backends of one model and the choice among them: least outstanding requests over
//! the ready ones, with a queue in front when all are busy or none is running yet.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

/// Origin of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// A replica process this gateway started and stops.
    Local,
    /// An Open Inference Protocol server given by URL, never started or stopped here.
    External,
}

/// Health and routing state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Started and not yet ready.
    Starting = 0,
    /// Passed its last health check; receives requests.
    Ready = 1,
    /// Failed its last health check or a request; receives nothing until it passes.
    Unhealthy = 2,
    /// Being removed: receives no new requests, finishes the ones it has.
    Draining = 3,
}

impl BackendState {
    /// Every state, for exporting a gauge per state.
    pub const ALL: [BackendState; 4] = [
        BackendState::Starting,
        BackendState::Ready,
        BackendState::Unhealthy,
        BackendState::Draining,
    ];

    fn from_u8(value: u8) -> BackendState {
        match value {
            0 => BackendState::Starting,
            1 => BackendState::Ready,
            2 => BackendState::Unhealthy,
            _ => BackendState::Draining,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Starting => "starting",
            BackendState::Ready => "ready",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
        }
    }
}

/// One server that can run the model.
#[derive(Debug)]
pub struct Backend {
    pub id: u64,
    /// Base URL, such as `http://127.0.0.1:41234`.
    pub url: String,
    /// Model name to use in this backend's `/v2/models/{name}` routes.
    pub model_name: String,
    pub kind: BackendKind,
    /// Process id of a local replica.
    pub pid: Option<u32>,
    state: AtomicU8,
    outstanding: AtomicUsize,
    served: AtomicU64,
}

impl Backend {
    pub fn new(
        id: u64,
        url: String,
        model_name: String,
        kind: BackendKind,
        pid: Option<u32>,
    ) -> Backend {
        let initial = match kind {
            BackendKind::Local => BackendState::Starting,
            BackendKind::External => BackendState::Unhealthy,
        };
        Backend {
            id,
            url,
            model_name,
            kind,
            pid,
            state: AtomicU8::new(initial as u8),
            outstanding: AtomicUsize::new(0),
            served: AtomicU64::new(0),
        }
    }

    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Sets the state unless the backend is draining, which is final; returns the
    /// previous state.
    pub fn set_state(&self, state: BackendState) -> BackendState {
        let mut current = self.state.load(Ordering::SeqCst);
        loop {
            if current == BackendState::Draining as u8 {
                return BackendState::Draining;
            }
            match self.state.compare_exchange(
                current,
                state as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(previous) => return BackendState::from_u8(previous),
                Err(actual) => current = actual,
            }
        }
    }

    /// Marks the backend as draining, for good: it gets no new requests.
    pub fn begin_drain(&self) {
        self.state
            .store(BackendState::Draining as u8, Ordering::SeqCst);
    }

    /// Requests sent to this backend and not yet completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Requests this backend has completed.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Describes the backend for the status route.
    pub fn status(&self) -> BackendStatus {
        BackendStatus {
            id: self.id,
            url: self.url.clone(),
            kind: self.kind,
            state: self.state(),
            pid: self.pid,
            outstanding: self.outstanding(),
            served: self.served(),
        }
    }
}

/// A backend as `GET /api/gateway/backends` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct BackendStatus {
    pub id: u64,
    pub url: String,
    pub kind: BackendKind,
    pub state: BackendState,
    pub pid: Option<u32>,
    pub outstanding: usize,
    pub served: u64,
}

/// Error from waiting for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireError {
    /// No backend became free within the queue timeout.
    TimedOut,
    /// As many requests as the pool queues were already waiting.
    QueueFull,
}

/// The backends of one model.
#[derive(Debug)]
pub struct Pool {
    backends: RwLock<Vec<Arc<Backend>>>,
    /// Woken when a backend becomes ready or a request finishes.
    available: Notify,
    /// Woken when a request has to wait, so the autoscaler decides at once instead of
    /// at its next tick (this is how a model scaled to zero wakes up).
    pub wake: Notify,
    max_in_flight: usize,
    max_queued: usize,
    queued: AtomicUsize,
    next_start: AtomicUsize,
    started: Instant,
    /// Milliseconds after `started` of the last request's arrival.
    last_request_ms: AtomicU64,
}

/// A backend taken for one request; dropping it gives the slot back.
#[derive(Debug)]
pub struct Lease {
    pub backend: Arc<Backend>,
    pool: Arc<Pool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.outstanding.fetch_sub(1, Ordering::SeqCst);
        // One slot is free, so one waiter is woken, the longest waiting. Waking them
        // all made every finished request cost a scan per waiting request, so the
        // gateway's work per request grew with its queue.
        self.pool.available.notify_one();
    }
}

/// A waiting request's place in the queue, given back when dropped, also when the
/// request is cancelled while it waits.
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Lease {
    /// Counts the request as completed by this backend.
    pub fn mark_served(&self) {
        self.backend.served.fetch_add(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Creates an empty pool that lets each backend have `max_in_flight` requests
    /// outstanding and up to `max_queued` requests wait for one.
    pub fn new(max_in_flight: usize, max_queued: usize) -> Pool {
        Pool {
            backends: RwLock::new(Vec::new()),
            available: Notify::new(),
            wake: Notify::new(),
            max_in_flight,
            max_queued,
            queued: AtomicUsize::new(0),
            next_start: AtomicUsize::new(0),
            started: Instant::now(),
            last_request_ms: AtomicU64::new(0),
        }
    }

    pub fn add(&self, backend: Arc<Backend>) {
        self.backends
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(backend);
        self.available.notify_waiters();
    }

    pub fn remove(&self, id: u64) {
        self.backends
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|backend| backend.id != id);
    }

    /// Returns a snapshot of the backends.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wakes requests waiting for a backend, after one became ready.
    pub fn notify_available(&self) {
        self.available.notify_waiters();
    }

    /// Requests waiting for a backend.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Requests sent to backends and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.backends().iter().map(|b| b.outstanding()).sum()
    }

    /// Time since the last request arrived, or since the pool was created.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Takes the ready backend with the fewest outstanding requests, waiting until
    /// `deadline` when every backend is busy or none is ready. Fails at once when
    /// `max_queued` requests are waiting already.
    pub async fn acquire(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, AcquireError> {
        let now_ms = self.started.elapsed().as_millis() as u64;
        self.last_request_ms.store(now_ms, Ordering::Relaxed);
        let mut place = None;
        loop {
            let available = self.available.notified();
            tokio::pin!(available);
            available.as_mut().enable();
            if let Some(lease) = self.try_acquire() {
                return Ok(lease);
            }
            if place.is_none() {
                place = Some(self.take_place()?);
            }
            self.wake.notify_one();
            if tokio::time::timeout_at(deadline, available).await.is_err() {
                return Err(AcquireError::TimedOut);
            }
        }
    }

    /// Takes a place in the queue, unless `max_queued` requests hold one.
    fn take_place(&self) -> Result<QueuePlace<'_>, AcquireError> {
        self.queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |queued| {
                (queued < self.max_queued).then_some(queued + 1)
            })
            .map(|_| QueuePlace(&self.queued))
            .map_err(|_| AcquireError::QueueFull)
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let backends = self.backends();
        if backends.is_empty() {
            return None;
        }
        // Start the scan at a rotating index so ties spread over the backends.
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % backends.len();
        let mut best: Option<&Arc<Backend>> = None;
        for offset in 0..backends.len() {
            let backend = &backends[(start + offset) % backends.len()];
            let eligible = backend.state() == BackendState::Ready
                && backend.outstanding() < self.max_in_flight;
            if eligible && best.is_none_or(|b| backend.outstanding() < b.outstanding()) {
                best = Some(backend);
            }
        }
        let backend = best?.clone();
        backend.outstanding.fetch_add(1, Ordering::SeqCst);
        let lease = Lease {
            backend,
            pool: self.clone(),
        };
        // A drain that began between the check and the increment must not get this
        // request. The drainer sets the state before it reads `outstanding`, and this
        // reads the state after the increment, so one of the two observes the other.
        if lease.backend.state() != BackendState::Ready {
            return None;
        }
        Some(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_backend(id: u64) -> Arc<Backend> {
        let backend = Arc::new(Backend::new(
            id,
            format!("http://127.0.0.1:{id}"),
            "m".into(),
            BackendKind::External,
            None,
        ));
        backend.set_state(BackendState::Ready);
        backend
    }

    fn deadline() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(50)
    }

    #[tokio::test]
    async fn acquire_prefers_least_outstanding() {
        let pool = Arc::new(Pool::new(10, 8));
        pool.add(ready_backend(1));
        pool.add(ready_backend(2));
        let first = pool.acquire(deadline()).await.unwrap();
        let second = pool.acquire(deadline()).await.unwrap();
        assert_ne!(first.backend.id, second.backend.id);
        drop(first);
        let third = pool.acquire(deadline()).await.unwrap();
        assert_ne!(third.backend.id, second.backend.id);
    }

    #[tokio::test]
    async fn acquire_skips_draining_and_full_backends() {
        let pool = Arc::new(Pool::new(1, 8));
        let draining = ready_backend(1);
        draining.set_state(BackendState::Draining);
        assert_eq!(
            draining.set_state(BackendState::Ready),
            BackendState::Draining
        );
        pool.add(draining);
        pool.add(ready_backend(2));
        let lease = pool.acquire(deadline()).await.unwrap();
        assert_eq!(lease.backend.id, 2);
        let error = pool.acquire(deadline()).await.unwrap_err();
        assert_eq!(error, AcquireError::TimedOut);
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test]
    async fn full_queue_turns_requests_away() {
        let pool = Arc::new(Pool::new(1, 2));
        pool.add(ready_backend(1));
        let busy = pool.acquire(deadline()).await.unwrap();
        let (finished, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for number in 0..2 {
            let pool = pool.clone();
            let finished = finished.clone();
            waiters.push(tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let lease = pool.acquire(deadline).await.unwrap();
                finished.send(number).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(lease);
            }));
            // The second waiter queues behind the first.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pool.queued(), 2);
        let error = pool.acquire(deadline()).await.unwrap_err();
        assert_eq!(error, AcquireError::QueueFull);
        assert_eq!(pool.queued(), 2);

        drop(busy);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(order.recv().await, Some(0));
        assert_eq!(order.recv().await, Some(1));
        assert_eq!(pool.queued(), 0);
    }

    #[tokio::test]
    async fn cancelled_waiter_gives_its_place_back() {
        let pool = Arc::new(Pool::new(1, 1));
        pool.add(ready_backend(1));
        let busy = pool.acquire(deadline()).await.unwrap();
        let waiter = {
            let pool = pool.clone();
            let long = tokio::time::Instant::now() + Duration::from_secs(5);
            tokio::spawn(async move { pool.acquire(long).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.queued(), 1);
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(pool.queued(), 0);
        // The place is free again: the next request waits instead of being turned away.
        drop(busy);
        assert!(pool.acquire(deadline()).await.is_ok());
    }

    #[tokio::test]
    async fn waiting_request_gets_a_backend_that_becomes_ready() {
        let pool = Arc::new(Pool::new(4, 8));
        let backend = Arc::new(Backend::new(
            7,
            "http://127.0.0.1:7".into(),
            "m".into(),
            BackendKind::Local,
            None,
        ));
        pool.add(backend.clone());
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                pool.acquire(deadline).await.map(|lease| lease.backend.id)
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(pool.queued(), 1);
        backend.set_state(BackendState::Ready);
        pool.notify_available();
        assert_eq!(waiter.await.unwrap(), Ok(7));
    }
}
