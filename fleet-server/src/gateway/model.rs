//! One served model at the gateway: its backends, the local replicas it started, the
//! health checks, the autoscaler loop and request forwarding with one retry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use super::autoscaler::{Autoscaler, Decision, Observation, Reason};
use super::config::{ModelConfig, Routing};
use super::latency::LatencyWindow;
use super::metrics::{BackendStateLabels, DecisionLabels, GatewayMetrics, ScaleDirection};
use super::oip::ModelMetadata;
use super::pool::{AcquireError, Backend, BackendKind, BackendState, Pool};
use super::supervisor::{BackendIds, Exit, Launcher};

/// Most latency samples the p95 window keeps.
const LATENCY_SAMPLES: usize = 20_000;

/// A local replica as the model tracks it.
#[derive(Debug)]
struct LocalReplica {
    backend: Arc<Backend>,
    stop: oneshot::Sender<()>,
    exited: oneshot::Receiver<Exit>,
}

/// Request body and headers passed to a backend.
#[derive(Debug, Clone)]
pub struct Forward {
    pub body: Bytes,
    pub request_id: HeaderValue,
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

/// A backend's response, passed to the client unchanged.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
    /// Time spent sending to backends and reading their responses, a failed first
    /// attempt included.
    pub backend_time: Duration,
    /// Time spent waiting for a backend with room for the request.
    pub queue_time: Duration,
}

/// Error from forwarding a request to the backends.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no backend of model {model:?} became available within {waited:?}")]
    NoBackend { model: String, waited: Duration },
    #[error("{queued} requests for model {model:?} are waiting for a backend already")]
    QueueFull { model: String, queued: usize },
    #[error("backend {backend} failed: {reason}")]
    Failed { backend: String, reason: String },
    #[error("backend {backend} did not answer within {timeout:?}")]
    TimedOut { backend: String, timeout: Duration },
}

enum SendError {
    /// No response arrived: refused, reset or closed connection. Safe to send again,
    /// because inference has no side effects.
    BeforeResponse(String),
    TimedOut,
    Body(String),
}

/// A served model.
#[derive(Debug)]
pub struct ModelRuntime {
    pub name: String,
    pub metadata: ModelMetadata,
    pub pool: Arc<Pool>,
    pub latency: LatencyWindow,
    config: ModelConfig,
    routing: Routing,
    launcher: Launcher,
    ids: BackendIds,
    replicas: Mutex<Vec<LocalReplica>>,
    starting: AtomicUsize,
    metrics: GatewayMetrics,
    client: reqwest::Client,
    self_ref: Weak<ModelRuntime>,
}

/// Everything [`ModelRuntime::new`] takes.
#[derive(Debug)]
pub struct ModelParts {
    pub config: ModelConfig,
    pub metadata: ModelMetadata,
    pub routing: Routing,
    pub launcher: Launcher,
    pub ids: BackendIds,
    pub metrics: GatewayMetrics,
    pub client: reqwest::Client,
}

impl ModelRuntime {
    /// Creates the model with its external backends, not yet health-checked.
    pub fn new(parts: ModelParts) -> Arc<ModelRuntime> {
        let config = parts.config;
        let pool = Arc::new(Pool::new(
            config.replicas.max_in_flight,
            config.replicas.max_queued,
        ));
        let external_name = config
            .external_model_name
            .clone()
            .unwrap_or_else(|| config.name.clone());
        for url in &config.external {
            let url = url.trim_end_matches('/').to_owned();
            let backend = Backend::new(
                parts.ids.next(),
                url,
                external_name.clone(),
                BackendKind::External,
                None,
            );
            pool.add(Arc::new(backend));
        }
        let window = Duration::from_secs_f64(config.autoscaler.stable_window_secs);
        Arc::new_cyclic(|self_ref| ModelRuntime {
            name: config.name.clone(),
            metadata: parts.metadata,
            pool,
            latency: LatencyWindow::new(window, LATENCY_SAMPLES),
            config,
            routing: parts.routing,
            launcher: parts.launcher,
            ids: parts.ids,
            replicas: Mutex::new(Vec::new()),
            starting: AtomicUsize::new(0),
            metrics: parts.metrics,
            client: parts.client,
            self_ref: self_ref.clone(),
        })
    }

    /// Returns whether the model can take a request now or after waking a replica.
    pub fn is_ready(&self) -> bool {
        self.config.replicas.min == 0
            || self
                .pool
                .backends()
                .iter()
                .any(|backend| backend.state() == BackendState::Ready)
    }

    /// Returns the local replicas running or starting, draining ones excluded.
    pub fn local_replicas(&self) -> usize {
        self.lock_replicas().len() + self.starting.load(Ordering::SeqCst)
    }

    fn lock_replicas(&self) -> std::sync::MutexGuard<'_, Vec<LocalReplica>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts or drains local replicas until `desired` run; draining finishes in the
    /// background.
    pub fn scale_to(&self, desired: usize) {
        let current = self.local_replicas();
        if desired > current {
            for _ in current..desired {
                self.starting.fetch_add(1, Ordering::SeqCst);
                let model = self.strong();
                tokio::spawn(async move { model.start_replica().await });
            }
            return;
        }
        let mut replicas = self.lock_replicas();
        let surplus = current.saturating_sub(desired).min(replicas.len());
        // Drain replicas that are not ready first, then those with the least work.
        replicas.sort_by_key(|replica| {
            let ready = replica.backend.state() == BackendState::Ready;
            (ready, replica.backend.outstanding())
        });
        let victims: Vec<LocalReplica> = replicas.drain(..surplus).collect();
        drop(replicas);
        for replica in victims {
            let model = self.strong();
            tokio::spawn(async move { model.drain(replica).await });
        }
    }

    fn strong(&self) -> Arc<ModelRuntime> {
        self.self_ref.upgrade().expect("model runtime is alive")
    }

    async fn start_replica(self: Arc<Self>) {
        let started = Instant::now();
        let launched = match self.launcher.launch().await {
            Ok(launched) => launched,
            Err(error) => {
                self.starting.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(model = %self.name, error = %error, "failed to start replica");
                return;
            }
        };
        let backend = Arc::new(Backend::new(
            self.ids.next(),
            format!("http://{}", launched.address),
            self.name.clone(),
            BackendKind::Local,
            launched.pid,
        ));
        let (stop, stop_rx) = oneshot::channel();
        let (exited_tx, exited) = oneshot::channel();
        let weak = self.self_ref.clone();
        let supervised = backend.clone();
        let process = launched.process;
        tokio::spawn(async move {
            let exit = process.supervise(stop_rx).await;
            if let (Exit::Crashed(status), Some(model)) = (&exit, weak.upgrade()) {
                model.forget_crashed(&supervised, status);
            }
            let _ = exited_tx.send(exit);
        });
        // The replica leaves `starting` and joins the list under the list's lock, which
        // `local_replicas` also holds. Counting it twice could exceed `max` and make the
        // autoscaler drain the replica it just started.
        {
            let mut replicas = self.lock_replicas();
            replicas.push(LocalReplica {
                backend: backend.clone(),
                stop,
                exited,
            });
            self.starting.fetch_sub(1, Ordering::SeqCst);
        }
        self.pool.add(backend.clone());
        tracing::info!(model = %self.name, backend = %backend.url, pid = ?backend.pid, "replica started");

        let deadline = started + self.routing.startup_timeout();
        while Instant::now() < deadline && backend.state() == BackendState::Starting {
            if self.check_health(&backend).await {
                backend.set_state(BackendState::Ready);
                self.pool.notify_available();
                tracing::info!(
                    model = %self.name,
                    backend = %backend.url,
                    startup_ms = started.elapsed().as_millis() as u64,
                    "replica ready"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if backend.state() == BackendState::Starting {
            tracing::error!(model = %self.name, backend = %backend.url, "replica did not become ready in time; stopping it");
            let replica = {
                let mut replicas = self.lock_replicas();
                let index = replicas.iter().position(|r| r.backend.id == backend.id);
                index.map(|index| replicas.remove(index))
            };
            if let Some(replica) = replica {
                self.drain(replica).await;
            }
        }
    }

    fn forget_crashed(&self, backend: &Backend, status: &str) {
        self.pool.remove(backend.id);
        self.lock_replicas()
            .retain(|replica| replica.backend.id != backend.id);
        tracing::error!(model = %self.name, backend = %backend.url, pid = ?backend.pid, status, "replica exited unexpectedly");
    }

    /// Stops routing to a replica, waits for its requests to finish, then stops it.
    async fn drain(&self, replica: LocalReplica) {
        let backend = replica.backend;
        backend.begin_drain();
        tracing::info!(model = %self.name, backend = %backend.url, outstanding = backend.outstanding(), "replica draining");
        let deadline = Instant::now() + self.routing.drain_timeout();
        while backend.outstanding() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if backend.outstanding() > 0 {
            tracing::warn!(
                model = %self.name,
                backend = %backend.url,
                outstanding = backend.outstanding(),
                "drain timed out; stopping the replica with requests outstanding"
            );
        }
        self.pool.remove(backend.id);
        let _ = replica.stop.send(());
        let exit = replica.exited.await.unwrap_or(Exit::Stopped);
        tracing::info!(model = %self.name, backend = %backend.url, exit = ?exit, "replica stopped");
    }

    /// Stops every local replica, draining each, and waits for them. Replicas still
    /// starting are waited for first, so none comes up after the gateway stopped.
    pub async fn stop_all(&self) {
        let deadline = Instant::now() + self.routing.startup_timeout();
        while self.starting.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let replicas: Vec<LocalReplica> = self.lock_replicas().drain(..).collect();
        let mut draining = JoinSet::new();
        for replica in replicas {
            let model = self.strong();
            draining.spawn(async move { model.drain(replica).await });
        }
        while draining.join_next().await.is_some() {}
    }

    /// Returns whether the backend's readiness route returns 200.
    async fn check_health(&self, backend: &Backend) -> bool {
        let url = format!("{}/v2/health/ready", backend.url);
        let response = self
            .client
            .get(url)
            .timeout(self.routing.health_timeout())
            .send()
            .await;
        response.is_ok_and(|response| response.status().is_success())
    }

    /// Checks every backend that is not starting or draining until `shutdown`.
    pub async fn run_health_checks(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let mut checks = JoinSet::new();
            for backend in self.pool.backends() {
                let skip = matches!(
                    backend.state(),
                    BackendState::Starting | BackendState::Draining
                );
                if skip {
                    continue;
                }
                let model = self.clone();
                checks.spawn(async move {
                    let healthy = model.check_health(&backend).await;
                    model.apply_health(&backend, healthy);
                });
            }
            while checks.join_next().await.is_some() {}
            self.export_backend_states();
            tokio::select! {
                _ = tokio::time::sleep(self.routing.health_interval()) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn apply_health(&self, backend: &Backend, healthy: bool) {
        let state = if healthy {
            BackendState::Ready
        } else {
            BackendState::Unhealthy
        };
        let previous = backend.set_state(state);
        if previous == state || previous == BackendState::Draining {
            return;
        }
        if healthy {
            self.pool.notify_available();
            tracing::info!(model = %self.name, backend = %backend.url, "backend passed its health check");
        } else {
            tracing::warn!(model = %self.name, backend = %backend.url, "backend failed its health check");
        }
    }

    fn export_backend_states(&self) {
        let backends = self.pool.backends();
        for state in BackendState::ALL {
            let count = backends.iter().filter(|b| b.state() == state).count();
            let labels = BackendStateLabels {
                model: self.name.clone(),
                state: state.as_str().to_owned(),
            };
            self.metrics
                .backends
                .get_or_create(&labels)
                .set(count as i64);
        }
    }

    /// Decides the replica count every tick, and at once when a request has to wait,
    /// until `shutdown`.
    pub async fn run_autoscaler(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut scaler = Autoscaler::new(
            self.config.autoscaler.clone(),
            &self.config.replicas,
            self.config.slo.p95_ms,
        );
        let interval = Duration::from_millis(self.config.autoscaler.interval_ms);
        let started = Instant::now();
        let mut panic = false;
        loop {
            let observation = self.observe(started.elapsed());
            let decision = scaler.decide(&observation);
            self.export_decision(&observation, &decision);
            if decision.panic != panic {
                panic = decision.panic;
                tracing::warn!(model = %self.name, panic, load = decision.panic_load, "autoscaler panic mode changed");
            }
            if decision.desired != observation.local {
                self.log_decision(&observation, &decision);
                self.scale_to(decision.desired);
            } else if decision.reason == Reason::Cooldown {
                tracing::debug!(model = %self.name, replicas = observation.local, "scale-up held by cooldown");
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.pool.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    fn observe(&self, at: Duration) -> Observation {
        let external_ready = self
            .pool
            .backends()
            .iter()
            .filter(|b| b.kind == BackendKind::External && b.state() == BackendState::Ready)
            .count();
        Observation {
            at,
            in_flight: self.pool.in_flight(),
            queued: self.pool.queued(),
            p95_ms: self.latency.p95_ms(),
            idle_for: self.pool.idle_for(),
            local: self.local_replicas(),
            external_ready,
        }
    }

    fn export_decision(&self, observation: &Observation, decision: &Decision) {
        let label = GatewayMetrics::model(&self.name);
        let metrics = &self.metrics;
        metrics
            .desired_replicas
            .get_or_create(&label)
            .set(decision.desired as i64);
        let load = if decision.panic {
            decision.panic_load.max(decision.stable_load)
        } else {
            decision.stable_load
        };
        let backends = (load / self.config.autoscaler.target_in_flight).ceil() as i64;
        metrics
            .desired_backends
            .get_or_create(&label)
            .set(backends.max(1));
        metrics
            .in_flight
            .get_or_create(&label)
            .set(observation.in_flight as i64);
        metrics
            .queue_depth
            .get_or_create(&label)
            .set(observation.queued as i64);
        metrics
            .panic_mode
            .get_or_create(&label)
            .set(i64::from(decision.panic));
        metrics
            .latency_p95_ms
            .get_or_create(&label)
            .set(observation.p95_ms.unwrap_or(0.0));
    }

    fn log_decision(&self, observation: &Observation, decision: &Decision) {
        let direction = if decision.desired > observation.local {
            ScaleDirection::Up
        } else {
            ScaleDirection::Down
        };
        tracing::info!(
            model = %self.name,
            from = observation.local,
            to = decision.desired,
            direction = direction.as_str(),
            reason = decision.reason.as_str(),
            panic = decision.panic,
            stable_load = decision.stable_load,
            panic_load = decision.panic_load,
            in_flight = observation.in_flight,
            queued = observation.queued,
            p95_ms = ?observation.p95_ms,
            "autoscaler decision"
        );
        let labels = DecisionLabels {
            model: self.name.clone(),
            direction: direction.as_str().to_owned(),
            reason: decision.reason.as_str().to_owned(),
        };
        self.metrics.scale_decisions.get_or_create(&labels).inc();
    }

    /// Sends an inference request to the least busy ready backend, and once more when
    /// it fails before responding. The failed backend counts as unhealthy until a
    /// health check passes, so the second try goes to another one unless it recovered.
    pub async fn forward(&self, request: &Forward) -> Result<Reply, ForwardError> {
        let deadline = tokio::time::Instant::now() + self.routing.queue_timeout();
        let queued = Instant::now();
        let lease = self.acquire(deadline).await?;
        let sent = Instant::now();
        let first_wait = sent - queued;
        let error = match self.send(&lease.backend, request).await {
            Ok(mut reply) => {
                lease.mark_served();
                reply.backend_time = sent.elapsed();
                reply.queue_time = first_wait;
                return Ok(reply);
            }
            Err(SendError::BeforeResponse(reason)) => reason,
            Err(other) => return Err(self.send_failure(&lease.backend, other)),
        };
        let first_attempt = sent.elapsed();

        // Marked unhealthy before its slot is given back, so neither the retry nor the
        // request woken for the slot picks it until a health check passes again.
        let failed = lease.backend.clone();
        if failed.set_state(BackendState::Unhealthy) == BackendState::Ready {
            tracing::warn!(model = %self.name, backend = %failed.url, error = %error, "backend failed before responding; retrying on another");
        }
        drop(lease);
        self.metrics
            .retries
            .get_or_create(&GatewayMetrics::model(&self.name))
            .inc();
        let queued = Instant::now();
        let lease = self.acquire(deadline).await?;
        let sent = Instant::now();
        match self.send(&lease.backend, request).await {
            Ok(mut reply) => {
                lease.mark_served();
                reply.backend_time = first_attempt + sent.elapsed();
                reply.queue_time = first_wait + (sent - queued);
                Ok(reply)
            }
            Err(error) => Err(self.send_failure(&lease.backend, error)),
        }
    }

    async fn acquire(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<super::pool::Lease, ForwardError> {
        self.pool
            .acquire(deadline)
            .await
            .map_err(|error| match error {
                AcquireError::TimedOut => ForwardError::NoBackend {
                    model: self.name.clone(),
                    waited: self.routing.queue_timeout(),
                },
                AcquireError::QueueFull => ForwardError::QueueFull {
                    model: self.name.clone(),
                    queued: self.config.replicas.max_queued,
                },
            })
    }

    fn send_failure(&self, backend: &Backend, error: SendError) -> ForwardError {
        let backend = backend.url.clone();
        match error {
            SendError::TimedOut => ForwardError::TimedOut {
                backend,
                timeout: self.routing.request_timeout(),
            },
            SendError::BeforeResponse(reason) | SendError::Body(reason) => {
                ForwardError::Failed { backend, reason }
            }
        }
    }

    async fn send(&self, backend: &Backend, request: &Forward) -> Result<Reply, SendError> {
        let url = format!("{}/v2/models/{}/infer", backend.url, backend.model_name);
        let mut builder = self
            .client
            .post(url)
            .timeout(self.routing.request_timeout())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request.request_id.clone())
            .header("traceparent", request.traceparent.clone());
        if let Some(tracestate) = &request.tracestate {
            builder = builder.header("tracestate", tracestate.clone());
        }
        let response = match builder.body(request.body.clone()).send().await {
            Ok(response) => response,
            Err(error) if error.is_timeout() => return Err(SendError::TimedOut),
            Err(error) => return Err(SendError::BeforeResponse(error_chain(&error))),
        };
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .cloned();
        match response.bytes().await {
            Ok(body) => Ok(Reply {
                status,
                content_type,
                body,
                backend_time: Duration::ZERO,
                queue_time: Duration::ZERO,
            }),
            Err(error) if error.is_timeout() => Err(SendError::TimedOut),
            Err(error) => Err(SendError::Body(error_chain(&error))),
        }
    }
}

/// Formats an error with its sources as "what: cause: cause".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
