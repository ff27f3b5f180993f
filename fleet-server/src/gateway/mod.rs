//! The inference gateway: Open Inference Protocol v2 REST in front of a pool of
//! backends per model, with authentication, per-principal throttling, least-outstanding
//! routing, health checks, retries and an autoscaler that starts and drains local
//! replica processes (`fleet replica`).
//!
//! The gateway shares the server's HTTP listener, store and metrics registry: its
//! routes live under `/v2` (and `/api/gateway` for operators), credentials are the
//! device secrets and API tokens of [`crate::access`], and its metrics appear on
//! `/metrics`. `docs/gateway.md` describes the configuration and the scaling rules.

pub mod auth;
pub mod autoscaler;
pub mod config;
pub mod http;
pub mod latency;
pub mod limiter;
pub mod metrics;
pub mod model;
pub mod oip;
pub mod pool;
pub mod supervisor;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use fleet_bundle::{Bundle, BundleError, PublicKey};
use tokio::sync::watch;

pub use config::{ConfigError, GatewayConfig};
pub use metrics::GatewayMetrics;
pub use model::ModelRuntime;

use crate::store::Store;

/// Errors from starting the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("model {model:?}: failed to read public key {path}")]
    PublicKey {
        model: String,
        path: std::path::PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("model {model:?}: bundle {path} failed verification")]
    Bundle {
        model: String,
        path: std::path::PathBuf,
        #[source]
        source: BundleError,
    },
    #[error("model {model:?} cannot be served: {reason}")]
    Unsupported { model: String, reason: String },
    #[error("failed to find the replica program; set replica_command in the gateway config")]
    ReplicaCommand(#[source] std::io::Error),
    #[error("failed to create the HTTP client for backends: {0}")]
    Client(String),
}

/// A running gateway. [`Gateway::shutdown`] stops its tasks and replicas.
#[derive(Debug)]
pub struct Gateway {
    state: http::GatewayState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Verifies every model's bundle, starts health checks, autoscalers (which start
    /// the minimum replicas) and limiter eviction, and returns without waiting for the
    /// replicas to become ready.
    pub async fn start(
        config: GatewayConfig,
        store: Store,
        metrics: GatewayMetrics,
    ) -> Result<Gateway, GatewayError> {
        let command = match &config.replica_command {
            Some(command) => command.clone(),
            None => supervisor::default_command().map_err(GatewayError::ReplicaCommand)?,
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|error| GatewayError::Client(error.to_string()))?;
        let ids = supervisor::BackendIds::default();
        let mut models = BTreeMap::new();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        for model_config in &config.models {
            if model_config.replicas.max > cores {
                tracing::warn!(
                    model = %model_config.name,
                    max_replicas = model_config.replicas.max,
                    cores,
                    "replicas.max is above this machine's cores; replicas beyond them compete for the same cores and add no capacity"
                );
            }
            let metadata = load_metadata(model_config)?;
            let launcher = supervisor::Launcher {
                command: command.clone(),
                bundle: model_config.bundle.clone(),
                public_key: model_config.public_key.clone(),
                model_name: model_config.name.clone(),
                batching: model_config.batching.clone(),
                max_batch_per_request: config.limits.max_batch_per_request,
                max_body_bytes: config.limits.max_body_bytes,
                startup_timeout: config.routing.startup_timeout(),
            };
            let model = ModelRuntime::new(model::ModelParts {
                config: model_config.clone(),
                metadata,
                routing: config.routing.clone(),
                launcher,
                ids: ids.clone(),
                metrics: metrics.clone(),
                client: client.clone(),
            });
            models.insert(model_config.name.clone(), model);
        }

        let limits = &config.limits;
        let throttle = limiter::Throttle::new(
            NonZeroU32::new(limits.rate_per_second).expect("validated as positive"),
            NonZeroU32::new(limits.burst).expect("validated as positive"),
            limits.limiter_max_keys,
        );
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for model in models.values() {
            tasks.push(tokio::spawn(
                model.clone().run_health_checks(shutdown_rx.clone()),
            ));
            tasks.push(tokio::spawn(
                model.clone().run_autoscaler(shutdown_rx.clone()),
            ));
        }
        tasks.push(tokio::spawn(evict_idle_keys(
            throttle.clone(),
            metrics.clone(),
            Duration::from_secs(limits.limiter_evict_interval_secs),
            shutdown_rx,
        )));
        let state = http::GatewayState {
            models: Arc::new(models),
            auth: Arc::new(auth::Authenticator::new(store)),
            throttle,
            metrics,
            max_body_bytes: limits.max_body_bytes,
            max_batch_per_request: limits.max_batch_per_request,
        };
        let names: Vec<&String> = state.models.keys().collect();
        tracing::info!(models = ?names, "inference gateway started");
        Ok(Gateway {
            state,
            shutdown,
            tasks,
        })
    }

    /// Returns the gateway's routes, to merge into the server's router.
    pub fn router(&self) -> axum::Router {
        http::router(self.state.clone())
    }

    /// Returns a served model by name.
    pub fn model(&self, name: &str) -> Option<&Arc<ModelRuntime>> {
        self.state.models.get(name)
    }

    /// Returns the rate limiter, for inspecting how many keys it tracks.
    pub fn throttle(&self) -> &limiter::Throttle<String> {
        &self.state.throttle
    }

    /// Stops the autoscalers and health checks, then drains and stops every local
    /// replica.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for task in self.tasks {
            let _ = task.await;
        }
        for model in self.state.models.values() {
            model.stop_all().await;
        }
        tracing::info!("inference gateway stopped");
    }
}

/// Verifies a model's bundle and describes its model.
fn load_metadata(config: &config::ModelConfig) -> Result<oip::ModelMetadata, GatewayError> {
    let key = PublicKey::read(&config.public_key).map_err(|source| GatewayError::PublicKey {
        model: config.name.clone(),
        path: config.public_key.clone(),
        source,
    })?;
    let bundle =
        Bundle::open_verified(&config.bundle, &key).map_err(|source| GatewayError::Bundle {
            model: config.name.clone(),
            path: config.bundle.clone(),
            source,
        })?;
    let mut metadata = oip::ModelMetadata::from_manifest(&config.name, &bundle.manifest);
    // Replicas return the model's first output only, so the gateway describes only it.
    metadata.outputs.truncate(1);
    let unsupported = |reason: String| GatewayError::Unsupported {
        model: config.name.clone(),
        reason,
    };
    if metadata.inputs.len() != 1 || metadata.outputs.is_empty() {
        return Err(unsupported(format!(
            "replicas run models with one input and at least one output; this one has {} \
             and {}",
            metadata.inputs.len(),
            metadata.outputs.len()
        )));
    }
    if let Some(input) = metadata
        .inputs
        .iter()
        .find(|input| input.datatype != "FP32")
    {
        return Err(unsupported(format!(
            "input {:?} has datatype {}; only FP32 inputs are supported",
            input.name, input.datatype
        )));
    }
    Ok(metadata)
}

/// Evicts idle rate-limiter keys every `interval` and exports how many remain.
async fn evict_idle_keys(
    throttle: limiter::Throttle<String>,
    metrics: GatewayMetrics,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let remaining = throttle.evict_idle();
        metrics.limiter_keys.set(remaining as i64);
    }
}
