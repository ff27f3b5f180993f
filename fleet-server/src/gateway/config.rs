//! The gateway's TOML configuration: served models, limits, replica bounds, batching
//! and the autoscaling policy.
//!
//! ```toml
//! [limits]
//! max_body_bytes = 1048576
//! rate_per_second = 100
//! burst = 200
//!
//! [[models]]
//! name = "digit-cnn"
//! bundle = "bundles/digit-cnn"
//! public_key = "keys/fleet.pub"
//! external = ["http://10.0.0.7:8000"]
//! [models.replicas]
//! min = 1
//! max = 4
//! [models.batching]
//! max_batch_size = 8
//! max_queue_delay_microseconds = 2000
//! [models.slo]
//! p95_ms = 50
//! ```
//!
//! Relative paths are resolved against the folder of the configuration file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors from reading or checking a gateway configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read gateway config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid gateway config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid gateway config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub routing: Routing,
    /// Program and leading arguments that start a replica, such as
    /// `["/usr/bin/fleet", "replica"]`; by default this executable's `replica`
    /// subcommand, or `fleet-replica` next to it.
    #[serde(default)]
    pub replica_command: Option<Vec<String>>,
    pub models: Vec<ModelConfig>,
}

/// Request limits, applied per principal (device or API token).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Requests per second each principal may make on average.
    pub rate_per_second: u32,
    /// Requests a principal may make at once after being idle.
    pub burst: u32,
    /// Keys the rate limiter tracks before it evicts idle ones at once instead of
    /// waiting for the next eviction tick.
    pub limiter_max_keys: usize,
    /// How often idle keys are evicted from the rate limiter, in seconds.
    pub limiter_evict_interval_secs: u64,
    /// Most samples (first dimension) one request may carry.
    pub max_batch_per_request: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            rate_per_second: 100,
            burst: 200,
            limiter_max_keys: 100_000,
            limiter_evict_interval_secs: 30,
            max_batch_per_request: 64,
        }
    }
}

/// Routing and process timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Interval between `/v2/health/ready` checks of every backend, in milliseconds.
    pub health_interval_ms: u64,
    /// Timeout of one health check, in milliseconds.
    pub health_timeout_ms: u64,
    /// Timeout of one inference request at a backend, in milliseconds.
    pub request_timeout_ms: u64,
    /// Time a request may wait in the gateway for a free backend, including a replica
    /// started from zero, in milliseconds; 503 after that.
    pub queue_timeout_ms: u64,
    /// Time a starting replica has to load its model and listen, in milliseconds.
    pub startup_timeout_ms: u64,
    /// Time a draining replica has to finish its requests before it is stopped
    /// anyway, in milliseconds.
    pub drain_timeout_ms: u64,
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            health_interval_ms: 1000,
            health_timeout_ms: 1000,
            request_timeout_ms: 30_000,
            queue_timeout_ms: 30_000,
            startup_timeout_ms: 60_000,
            drain_timeout_ms: 30_000,
        }
    }
}

impl Routing {
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    pub fn health_timeout(&self) -> Duration {
        Duration::from_millis(self.health_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    pub fn startup_timeout(&self) -> Duration {
        Duration::from_millis(self.startup_timeout_ms)
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// One served model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Name clients use in `/v2/models/{name}`.
    pub name: String,
    /// Folder of the signed bundle.
    pub bundle: PathBuf,
    /// Public key the bundle's signature is checked with.
    pub public_key: PathBuf,
    /// Base URLs of Open Inference Protocol servers that serve this model too, such as
    /// `http://10.0.0.7:8000`; they are health-checked and routed to, never started or
    /// stopped.
    #[serde(default)]
    pub external: Vec<String>,
    /// Model name at the external servers, when it differs from `name`.
    #[serde(default)]
    pub external_model_name: Option<String>,
    #[serde(default)]
    pub replicas: ReplicaBounds,
    #[serde(default)]
    pub batching: Batching,
    #[serde(default)]
    pub slo: Slo,
    #[serde(default)]
    pub autoscaler: AutoscalerPolicy,
}

/// How many local replicas may run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicaBounds {
    /// Minimum number of replicas; 0 lets the model scale to zero when idle.
    pub min: usize,
    /// Maximum number of local replicas, by default the machine's cores. A replica runs
    /// its model on one core, so replicas beyond the cores add no capacity.
    pub max: usize,
    /// Requests one backend may have outstanding before further requests queue in the
    /// gateway.
    pub max_in_flight: usize,
    /// Requests of this model that may wait in the gateway for a backend with room.
    /// Further requests get 503 with `Retry-After` at once, so a load beyond what the
    /// backends serve is turned away instead of queuing until every request is late.
    pub max_queued: usize,
    /// Idle time after which a model with `min = 0` stops its last replica, in seconds.
    pub idle_before_zero_secs: u64,
}

impl Default for ReplicaBounds {
    fn default() -> Self {
        ReplicaBounds {
            min: 1,
            max: std::thread::available_parallelism().map_or(1, usize::from),
            max_in_flight: 32,
            max_queued: 1024,
            idle_before_zero_secs: 300,
        }
    }
}

/// Dynamic batching in each replica.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Batching {
    /// Most samples one model run takes.
    pub max_batch_size: usize,
    /// Maximum time a request waits for others to join its batch, in microseconds.
    pub max_queue_delay_microseconds: u64,
    /// Maximum requests a replica queues; further requests get 503.
    pub max_queue_size: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_size: 8,
            max_queue_delay_microseconds: 2000,
            max_queue_size: 1024,
        }
    }
}

/// Latency objective the autoscaler holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slo {
    /// 95th percentile of request latency through the gateway, in milliseconds.
    pub p95_ms: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Slo { p95_ms: 100.0 }
    }
}

/// When the autoscaler adds and removes replicas; see `autoscaler.rs` for the rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscalerPolicy {
    /// Interval between decisions, in milliseconds.
    pub interval_ms: u64,
    /// Requests in flight or queued per backend that the autoscaler aims for.
    pub target_in_flight: f64,
    /// Load is averaged over this window for ordinary decisions, in seconds.
    pub stable_window_secs: f64,
    /// Load is averaged over this shorter window to detect sudden steps, in seconds.
    pub panic_window_secs: f64,
    /// Panic mode starts when the short-window load exceeds this multiple of the
    /// current capacity. It scales up at once and does not scale down until the stable
    /// window has passed without a panic.
    pub panic_threshold: f64,
    /// Scale down only when the load would fit in one replica fewer at this fraction of
    /// the target, so the count does not flap around a boundary.
    pub scale_down_utilization: f64,
    /// Minimum time between two scale-ups outside panic mode, in seconds.
    pub scale_up_cooldown_secs: f64,
    /// Minimum time after any change before a scale-down, in seconds.
    pub scale_down_cooldown_secs: f64,
}

impl Default for AutoscalerPolicy {
    fn default() -> Self {
        AutoscalerPolicy {
            interval_ms: 500,
            target_in_flight: 8.0,
            stable_window_secs: 10.0,
            panic_window_secs: 2.0,
            panic_threshold: 2.0,
            scale_down_utilization: 0.6,
            scale_up_cooldown_secs: 2.0,
            scale_down_cooldown_secs: 30.0,
        }
    }
}

impl GatewayConfig {
    /// Reads, parses and checks a configuration file, resolving relative paths against
    /// its folder.
    pub fn from_file(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = GatewayConfig::from_toml(&text).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for model in &mut config.models {
            model.bundle = base.join(&model.bundle);
            model.public_key = base.join(&model.public_key);
        }
        Ok(config)
    }

    /// Parses and checks a configuration from TOML text, leaving paths as written.
    pub fn from_toml(text: &str) -> Result<GatewayConfig, ConfigError> {
        let config: GatewayConfig = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense, naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        positive("limits.max_body_bytes", limits.max_body_bytes as f64)?;
        positive("limits.rate_per_second", f64::from(limits.rate_per_second))?;
        positive("limits.burst", f64::from(limits.burst))?;
        positive("limits.limiter_max_keys", limits.limiter_max_keys as f64)?;
        positive(
            "limits.limiter_evict_interval_secs",
            limits.limiter_evict_interval_secs as f64,
        )?;
        positive(
            "limits.max_batch_per_request",
            limits.max_batch_per_request as f64,
        )?;
        let routing = &self.routing;
        for (field, value) in [
            ("routing.health_interval_ms", routing.health_interval_ms),
            ("routing.health_timeout_ms", routing.health_timeout_ms),
            ("routing.request_timeout_ms", routing.request_timeout_ms),
            ("routing.queue_timeout_ms", routing.queue_timeout_ms),
            ("routing.startup_timeout_ms", routing.startup_timeout_ms),
            ("routing.drain_timeout_ms", routing.drain_timeout_ms),
        ] {
            positive(field, value as f64)?;
        }
        if let Some(command) = &self.replica_command
            && command.first().is_none_or(String::is_empty)
        {
            return Err(invalid(
                "replica_command",
                "name a program as the first element",
            ));
        }
        if self.models.is_empty() {
            return Err(invalid("models", "configure at least one [[models]] entry"));
        }
        for (index, model) in self.models.iter().enumerate() {
            model.validate(&format!("models[{index}]"))?;
            if self.models[..index]
                .iter()
                .any(|other| other.name == model.name)
            {
                return Err(invalid(
                    &format!("models[{index}].name"),
                    &format!("{:?} is configured twice", model.name),
                ));
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return Err(invalid(
                &format!("{at}.name"),
                &format!("{:?}: use letters, digits, '-', '_' or '.'", self.name),
            ));
        }
        for (index, url) in self.external.iter().enumerate() {
            let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
            if !scheme_ok || reqwest::Url::parse(url).is_err() {
                return Err(invalid(
                    &format!("{at}.external[{index}]"),
                    &format!("{url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        let replicas = &self.replicas;
        if replicas.max < replicas.min {
            return Err(invalid(
                &format!("{at}.replicas.max"),
                &format!("{} is below replicas.min {}", replicas.max, replicas.min),
            ));
        }
        if replicas.max == 0 && self.external.is_empty() {
            return Err(invalid(
                &format!("{at}.replicas.max"),
                "is 0 and no external backend is given, so nothing could serve the model",
            ));
        }
        positive(
            &format!("{at}.replicas.max_in_flight"),
            replicas.max_in_flight as f64,
        )?;
        positive(
            &format!("{at}.replicas.max_queued"),
            replicas.max_queued as f64,
        )?;
        if replicas.min == 0 {
            positive(
                &format!("{at}.replicas.idle_before_zero_secs"),
                replicas.idle_before_zero_secs as f64,
            )?;
        }
        positive(
            &format!("{at}.batching.max_batch_size"),
            self.batching.max_batch_size as f64,
        )?;
        positive(
            &format!("{at}.batching.max_queue_size"),
            self.batching.max_queue_size as f64,
        )?;
        positive(&format!("{at}.slo.p95_ms"), self.slo.p95_ms)?;
        self.autoscaler.validate(&format!("{at}.autoscaler"))
    }
}

impl AutoscalerPolicy {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        positive(&format!("{at}.interval_ms"), self.interval_ms as f64)?;
        positive(&format!("{at}.target_in_flight"), self.target_in_flight)?;
        positive(&format!("{at}.stable_window_secs"), self.stable_window_secs)?;
        positive(&format!("{at}.panic_window_secs"), self.panic_window_secs)?;
        if self.panic_window_secs > self.stable_window_secs {
            return Err(invalid(
                &format!("{at}.panic_window_secs"),
                "must not be longer than stable_window_secs",
            ));
        }
        if self.panic_threshold <= 1.0 || !self.panic_threshold.is_finite() {
            return Err(invalid(
                &format!("{at}.panic_threshold"),
                &format!("must be a number above 1, got {}", self.panic_threshold),
            ));
        }
        if !(self.scale_down_utilization > 0.0 && self.scale_down_utilization <= 1.0) {
            return Err(invalid(
                &format!("{at}.scale_down_utilization"),
                &format!("must be in (0, 1], got {}", self.scale_down_utilization),
            ));
        }
        for (field, value) in [
            ("scale_up_cooldown_secs", self.scale_up_cooldown_secs),
            ("scale_down_cooldown_secs", self.scale_down_cooldown_secs),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return Err(invalid(
                    &format!("{at}.{field}"),
                    &format!("must be 0 or more seconds, got {value}"),
                ));
            }
        }
        Ok(())
    }
}

fn positive(field: &str, value: f64) -> Result<(), ConfigError> {
    if value > 0.0 && value.is_finite() {
        Ok(())
    } else {
        Err(invalid(
            field,
            &format!("must be greater than 0, got {value}"),
        ))
    }
}

fn invalid(field: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[models]]
        name = "digit-cnn"
        bundle = "bundle"
        public_key = "keys/fleet.pub"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let config = GatewayConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(config.models.len(), 1);
        assert_eq!(config.models[0].replicas.min, 1);
        assert_eq!(config.limits.max_body_bytes, 1 << 20);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = format!("{MINIMAL}\n[models.batching]\nmax_batch = 4\n");
        let message = GatewayConfig::from_toml(&text).unwrap_err().to_string();
        assert!(message.contains("max_batch"), "{message}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                "[models.replicas]\nmin = 3\nmax = 2\n",
                "models[0].replicas.max",
            ),
            ("[models.slo]\np95_ms = 0\n", "models[0].slo.p95_ms"),
            (
                "[models.autoscaler]\npanic_threshold = 0.5\n",
                "models[0].autoscaler.panic_threshold",
            ),
            ("external = [\"ftp://x\"]\n", "models[0].external[0]"),
        ];
        for (extra, field) in cases {
            let text = format!("{MINIMAL}{extra}");
            let message = GatewayConfig::from_toml(&text).unwrap_err().to_string();
            assert!(message.contains(field), "{field}: {message}");
        }
        let limits = format!("[limits]\nburst = 0\n{MINIMAL}");
        let message = GatewayConfig::from_toml(&limits).unwrap_err().to_string();
        assert!(message.contains("limits.burst"), "{message}");
    }

    #[test]
    fn duplicate_model_names_are_rejected() {
        let text = format!("{MINIMAL}{MINIMAL}");
        let message = GatewayConfig::from_toml(&text).unwrap_err().to_string();
        assert!(message.contains("models[1].name"), "{message}");
    }
}
