//! Agent settings from a TOML file, with command-line flags taking precedence.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use fleet_wire::{Encoding, MqttCredentials};
use serde::Deserialize;

use crate::api::FallbackPolicy;
use crate::hard_samples::HardSampleOptions;
use crate::outbox::{DEFAULT_SEGMENT_BYTES, FsyncPolicy, MIN_SEGMENT_BYTES, OutboxOptions};

/// Default telemetry backlog drain rate in records per second.
///
/// The ingest benchmark stored about 15,000 messages/s on one 2-core server. A fleet of
/// 1,000 agents that reconnect together after a broker outage stays under that, and each
/// sends a 10-minute backlog at the demo's rate (300 records) in 30 s.
pub const DEFAULT_DRAIN_RATE: f64 = 10.0;

/// Default largest MQTT packet: the largest payload the wire format allows plus room for
/// the topic and headers.
pub const DEFAULT_MAX_PACKET_BYTES: usize = fleet_wire::MAX_PAYLOAD_BYTES + 1024;
/// Smallest accepted `--max-packet-bytes`; status messages and commands must still fit.
const MIN_MAX_PACKET_BYTES: usize = 1024;
/// Largest packet MQTT can encode: a remaining length of at most 268,435,455 bytes.
const MQTT_MAX_PACKET_BYTES: usize = 268_435_460;

/// Command-line flags of the agent; each one overrides the same key of `--config`.
#[derive(Debug, Clone, Default, Args)]
pub struct DeviceArgs {
    /// TOML file with any of the settings below, using the flag names with `_` for `-`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Device id, used as a topic level: letters, digits, '-', '_' or '.'.
    #[arg(long)]
    pub device_id: Option<String>,
    /// MQTT broker as mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS
    /// [default: mqtt://127.0.0.1:1883].
    #[arg(long)]
    pub broker: Option<String>,
    /// PEM file with the CA certificates an mqtts:// broker's certificate must chain to
    /// [default: the operating system's trust store].
    #[arg(long)]
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate for an mqtts:// broker that requires one (mutual TLS);
    /// needs --client-key.
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// Largest MQTT packet the agent sends or accepts, in bytes; set it to the broker's
    /// limit (Mosquitto's max_packet_size, or a cloud broker's documented maximum). A
    /// record that does not fit is set aside with an error in the log, since a broker
    /// drops the connection on an oversized packet [default: 66560].
    #[arg(long)]
    pub max_packet_bytes: Option<usize>,
    /// MQTT protocol version: 3.1.1, or 5 for brokers that support it (Mosquitto, EMQX,
    /// HiveMQ), which adds each payload's content type and takes the broker's maximum
    /// packet size from its CONNACK when that is smaller than --max-packet-bytes. The
    /// fleet server's embedded broker speaks 3.1.1 only [default: 3.1.1].
    #[arg(long)]
    pub mqtt_version: Option<String>,
    /// Bundle folder written by `compress bundle`.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Public key the bundle must be signed with.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// Input source: an IDX image file (optionally gzip) or a folder of JPEG/PNG images.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// IDX label file for an IDX input.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Part of the input this device takes, as INDEX/COUNT [default: 0/1].
    #[arg(long)]
    pub shard: Option<String>,
    /// Inferences per second; 0 runs as fast as the model allows [default: 10].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds between telemetry messages [default: 5].
    #[arg(long)]
    pub interval: Option<f64>,
    /// Stop inferring after this many passes over the shard and keep reporting; runs
    /// forever when unset.
    #[arg(long)]
    pub passes: Option<u64>,
    /// Folder for the agent's state, such as the telemetry sequence number
    /// [default: device-state/DEVICE_ID].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Top-1 confidence under which an inference counts as low-confidence [default: 0.5].
    #[arg(long)]
    pub confidence_threshold: Option<f32>,
    /// MQTT user name; the broker password is then read from --password-file.
    #[arg(long)]
    pub username: Option<String>,
    /// File whose first line is the MQTT password, kept out of the command line and the
    /// config file so it does not show in process lists.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// Telemetry payload encoding: postcard or json [default: postcard].
    #[arg(long)]
    pub encoding: Option<String>,
    /// When the telemetry outbox flushes to storage: every-record, never, or an interval
    /// such as 1000ms [default: 1000ms].
    #[arg(long)]
    pub outbox_fsync: Option<String>,
    /// Size bound of the telemetry outbox in MiB; the oldest records are dropped past it
    /// [default: 16].
    #[arg(long)]
    pub outbox_max_mib: Option<u64>,
    /// Telemetry records sent per second at most, so a backlog after a broker outage
    /// drains without flooding the broker [default: 10].
    #[arg(long)]
    pub drain_rate: Option<f64>,
    /// Serve the local inference API (Open Inference Protocol v2 over HTTP) on this
    /// address, such as 127.0.0.1:8000; off when unset.
    #[arg(long)]
    pub api_listen: Option<String>,
    /// Fleet server the agent downloads model updates from, as http://HOST:PORT. Update
    /// commands naming another server are refused; without it, updates are refused.
    #[arg(long)]
    pub server: Option<String>,
    /// Seconds an update may run on the new model without its telemetry reaching the
    /// broker before the agent rolls back [default: 60].
    #[arg(long)]
    pub commit_timeout: Option<f64>,
    /// Maximum number of low-confidence inputs kept per minute for upload to --server,
    /// as a token bucket that also allows a burst of this many; 0 turns capture off
    /// [default: 6].
    #[arg(long)]
    pub hard_sample_rate: Option<u32>,
    /// Size bound of the hard-sample folder STATE_DIR/hard-samples in MiB; new samples
    /// are dropped and counted past it, stored ones are kept [default: 64].
    #[arg(long)]
    pub hard_sample_max_mib: Option<u64>,
    /// Model the fleet server's inference gateway serves as the cloud fallback of the
    /// local inference API [default: the local model's name]. Requests go to the cloud
    /// only with --server, and always when the local model fails.
    #[arg(long)]
    pub fallback_model: Option<String>,
    /// Send a request to the cloud when the lowest top-1 confidence of its local result
    /// is under this value, 0 to 1; off when unset.
    #[arg(long)]
    pub fallback_threshold: Option<f32>,
    /// Send a request to the cloud when more than this many requests would run locally
    /// at once; 0 sends every request; off when unset.
    #[arg(long)]
    pub max_local_queue: Option<usize>,
    /// Send requests to the cloud while the average local request latency is over this
    /// many milliseconds; off when unset.
    #[arg(long)]
    pub latency_slo_ms: Option<f64>,
    /// Time limit of one request to the cloud in milliseconds [default: 2000].
    #[arg(long)]
    pub fallback_timeout_ms: Option<u64>,
    /// Consecutive cloud failures (errors, timeouts, 5xx, 429) after which requests stay
    /// local for a cool-down [default: 3].
    #[arg(long)]
    pub fallback_failures: Option<u32>,
    /// First cool-down after the cloud failed, in milliseconds; it doubles after each
    /// failed retry, up to 60 s [default: 5000].
    #[arg(long)]
    pub fallback_cooldown_ms: Option<u64>,
}

/// The keys a config file may contain; the same meaning as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    device_id: Option<String>,
    broker: Option<String>,
    broker_ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    max_packet_bytes: Option<usize>,
    #[serde(default, deserialize_with = "version_text")]
    mqtt_version: Option<String>,
    bundle: Option<PathBuf>,
    public_key: Option<PathBuf>,
    input: Option<PathBuf>,
    labels: Option<PathBuf>,
    shard: Option<String>,
    rate: Option<f64>,
    interval: Option<f64>,
    passes: Option<u64>,
    state_dir: Option<PathBuf>,
    confidence_threshold: Option<f32>,
    encoding: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    outbox_fsync: Option<String>,
    outbox_max_mib: Option<u64>,
    drain_rate: Option<f64>,
    api_listen: Option<String>,
    server: Option<String>,
    commit_timeout: Option<f64>,
    hard_sample_rate: Option<u32>,
    hard_sample_max_mib: Option<u64>,
    fallback_model: Option<String>,
    fallback_threshold: Option<f32>,
    max_local_queue: Option<usize>,
    latency_slo_ms: Option<f64>,
    fallback_timeout_ms: Option<u64>,
    fallback_failures: Option<u32>,
    fallback_cooldown_ms: Option<u64>,
}

/// Reads `mqtt_version` from a config file as text, so that `5` and `"5"` both work.
fn version_text<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Version {
        Text(String),
        Number(u64),
    }
    Ok(
        Option::<Version>::deserialize(deserializer)?.map(|version| match version {
            Version::Text(text) => text,
            Version::Number(number) => number.to_string(),
        }),
    )
}

/// Settings after merging the file and the flags and checking every value.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub device_id: String,
    pub broker: fleet_mqtt::BrokerUrl,
    /// CA and client certificate files for an `mqtts://` broker.
    pub broker_tls: fleet_mqtt::TlsFiles,
    /// Largest MQTT packet sent or accepted, in bytes.
    pub max_packet_bytes: usize,
    pub mqtt_version: crate::mqtt::MqttVersion,
    pub bundle: PathBuf,
    pub public_key: PathBuf,
    pub input: PathBuf,
    pub labels: Option<PathBuf>,
    pub shard_index: usize,
    pub shard_count: usize,
    /// Inferences per second, `None` for unthrottled.
    pub rate: Option<f64>,
    pub interval: Duration,
    pub passes: Option<u64>,
    pub state_dir: PathBuf,
    pub confidence_threshold: f32,
    pub encoding: Encoding,
    /// MQTT user name and password, when the broker requires them.
    pub credentials: Option<MqttCredentials>,
    /// Telemetry outbox settings; the outbox lives in `state_dir/outbox`.
    pub outbox: OutboxOptions,
    /// Telemetry records sent per second at most.
    pub drain_rate: f64,
    /// Address of the local inference API, `None` when it is off.
    pub api_listen: Option<SocketAddr>,
    /// Base URL of the fleet server for update downloads, without a trailing `/`.
    pub server: Option<String>,
    /// How long an update waits for the new model's telemetry to be acknowledged.
    pub commit_timeout: Duration,
    /// Capture rate and size bound of hard samples; the folder is
    /// `state_dir/hard-samples`.
    pub hard_samples: HardSampleOptions,
    /// When the local inference API sends requests to `server`'s inference gateway.
    pub fallback: FallbackPolicy,
}

impl DeviceConfig {
    /// Reads `--config` when given, applies the flags over it and validates the result.
    pub fn resolve(args: DeviceArgs) -> anyhow::Result<DeviceConfig> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let device_id = args
            .device_id
            .or(file.device_id)
            .context("missing device id: pass --device-id or set device_id in the config file")?;
        fleet_wire::topic::validate_device_id(&device_id).map_err(anyhow::Error::msg)?;
        let broker = args
            .broker
            .or(file.broker)
            .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
        let broker = fleet_mqtt::BrokerUrl::parse(&broker)?;
        let broker_tls = fleet_mqtt::TlsFiles {
            ca: args.broker_ca.or(file.broker_ca),
            client_cert: args.client_cert.or(file.client_cert),
            client_key: args.client_key.or(file.client_key),
        };
        if broker_tls != fleet_mqtt::TlsFiles::default() && !broker.tls {
            bail!(
                "--broker-ca, --client-cert and --client-key need a TLS broker, but {broker} \
                 is plain TCP: use mqtts://"
            );
        }
        if broker_tls.client_cert.is_some() != broker_tls.client_key.is_some() {
            bail!("--client-cert and --client-key go together: pass both or neither");
        }
        // Read the files now, so a bad one stops the agent before it opens its state.
        fleet_mqtt::transport(&broker, &broker_tls)
            .with_context(|| format!("invalid TLS settings for broker {broker}"))?;
        let max_packet_bytes = args
            .max_packet_bytes
            .or(file.max_packet_bytes)
            .unwrap_or(DEFAULT_MAX_PACKET_BYTES);
        if !(MIN_MAX_PACKET_BYTES..=MQTT_MAX_PACKET_BYTES).contains(&max_packet_bytes) {
            bail!(
                "invalid --max-packet-bytes {max_packet_bytes}: expected \
                 {MIN_MAX_PACKET_BYTES} to {MQTT_MAX_PACKET_BYTES} bytes"
            );
        }
        let mqtt_version = match args.mqtt_version.or(file.mqtt_version) {
            Some(text) => text
                .parse()
                .map_err(|message: String| anyhow::anyhow!("--mqtt-version: {message}"))?,
            None => crate::mqtt::MqttVersion::default(),
        };
        let shard = args.shard.or(file.shard).unwrap_or_else(|| "0/1".into());
        let (shard_index, shard_count) = parse_shard(&shard)?;
        let rate = args.rate.or(file.rate).unwrap_or(10.0);
        if !(rate.is_finite() && rate >= 0.0) {
            bail!("invalid --rate {rate}: expected inferences per second, 0 or more");
        }
        if rate > 0.0 && rate < fleet_wire::MIN_RATE {
            bail!(
                "invalid --rate {rate}: expected 0 (unthrottled) or at least {} per second",
                fleet_wire::MIN_RATE
            );
        }
        let interval = args.interval.or(file.interval).unwrap_or(5.0);
        if !(interval.is_finite() && (0.05..=3600.0).contains(&interval)) {
            bail!("invalid --interval {interval}: expected 0.05 to 3600 seconds");
        }
        let confidence_threshold = args
            .confidence_threshold
            .or(file.confidence_threshold)
            .unwrap_or(0.5);
        let credentials = match (
            args.username.or(file.username),
            args.password_file.or(file.password_file),
        ) {
            (Some(username), Some(path)) => {
                Some(MqttCredentials::read(username, &path).map_err(anyhow::Error::msg)?)
            }
            (None, None) => None,
            (Some(_), None) => bail!("--username needs --password-file"),
            (None, Some(_)) => bail!("--password-file needs --username"),
        };
        let encoding = match args.encoding.or(file.encoding).as_deref() {
            None | Some("postcard") => Encoding::Postcard,
            Some("json") => Encoding::Json,
            Some(other) => bail!("invalid --encoding {other:?}: expected postcard or json"),
        };
        let state_dir = args
            .state_dir
            .or(file.state_dir)
            .unwrap_or_else(|| Path::new("device-state").join(&device_id));
        let outbox = outbox_options(
            args.outbox_fsync.or(file.outbox_fsync),
            args.outbox_max_mib.or(file.outbox_max_mib),
        )?;
        let drain_rate = args
            .drain_rate
            .or(file.drain_rate)
            .unwrap_or(DEFAULT_DRAIN_RATE);
        if !(drain_rate.is_finite() && drain_rate > 0.0) {
            bail!("invalid --drain-rate {drain_rate}: expected records per second, above 0");
        }
        let api_listen = match args.api_listen.or(file.api_listen) {
            None => None,
            Some(address) => Some(address.parse().map_err(|_| {
                anyhow::anyhow!(
                    "invalid --api-listen {address:?}: expected IP:PORT such as 127.0.0.1:8000"
                )
            })?),
        };
        let server = match args.server.or(file.server) {
            None => None,
            Some(url) if url.starts_with("http://") && url.len() > "http://".len() => {
                Some(url.trim_end_matches('/').to_string())
            }
            Some(url) => {
                bail!("invalid --server {url:?}: expected http://HOST:PORT of the fleet server")
            }
        };
        let commit_timeout = args.commit_timeout.or(file.commit_timeout).unwrap_or(60.0);
        if !(commit_timeout.is_finite() && (1.0..=86_400.0).contains(&commit_timeout)) {
            bail!("invalid --commit-timeout {commit_timeout}: expected 1 to 86400 seconds");
        }
        let hard_samples = hard_sample_options(
            args.hard_sample_rate.or(file.hard_sample_rate),
            args.hard_sample_max_mib.or(file.hard_sample_max_mib),
        )?;
        let fallback = fallback_policy(FallbackFlags {
            model: args.fallback_model.or(file.fallback_model),
            threshold: args.fallback_threshold.or(file.fallback_threshold),
            max_local_queue: args.max_local_queue.or(file.max_local_queue),
            latency_slo_ms: args.latency_slo_ms.or(file.latency_slo_ms),
            timeout_ms: args.fallback_timeout_ms.or(file.fallback_timeout_ms),
            failures: args.fallback_failures.or(file.fallback_failures),
            cooldown_ms: args.fallback_cooldown_ms.or(file.fallback_cooldown_ms),
        })?;
        Ok(DeviceConfig {
            bundle: args
                .bundle
                .or(file.bundle)
                .context("missing bundle: pass --bundle or set bundle in the config file")?,
            public_key: args.public_key.or(file.public_key).context(
                "missing public key: pass --public-key or set public_key in the config file",
            )?,
            input: args
                .input
                .or(file.input)
                .context("missing input: pass --input or set input in the config file")?,
            labels: args.labels.or(file.labels),
            device_id,
            broker,
            broker_tls,
            max_packet_bytes,
            mqtt_version,
            shard_index,
            shard_count,
            rate: (rate > 0.0).then_some(rate),
            interval: Duration::from_secs_f64(interval),
            passes: args.passes.or(file.passes),
            state_dir,
            confidence_threshold,
            encoding,
            credentials,
            outbox,
            drain_rate,
            api_listen,
            server,
            commit_timeout: Duration::from_secs_f64(commit_timeout),
            hard_samples,
            fallback,
        })
    }
}

/// The cloud fallback flags after merging the file and the command line.
struct FallbackFlags {
    model: Option<String>,
    threshold: Option<f32>,
    max_local_queue: Option<usize>,
    latency_slo_ms: Option<f64>,
    timeout_ms: Option<u64>,
    failures: Option<u32>,
    cooldown_ms: Option<u64>,
}

/// Checks the cloud fallback flags and builds the policy from them.
fn fallback_policy(flags: FallbackFlags) -> anyhow::Result<FallbackPolicy> {
    let defaults = FallbackPolicy::default();
    if let Some(model) = &flags.model
        && (model.is_empty() || model.contains(['/', '?', '#', ' ']))
    {
        bail!(
            "invalid --fallback-model {model:?}: expected a model name without '/', '?', '#' or spaces"
        );
    }
    if let Some(threshold) = flags.threshold
        && !(0.0..=1.0).contains(&threshold)
    {
        bail!("invalid --fallback-threshold {threshold}: expected a confidence from 0 to 1");
    }
    let latency_slo = match flags.latency_slo_ms {
        None => None,
        Some(ms) if ms.is_finite() && ms > 0.0 => Some(Duration::from_secs_f64(ms / 1000.0)),
        Some(ms) => bail!("invalid --latency-slo-ms {ms}: expected milliseconds, above 0"),
    };
    let timeout_ms = flags
        .timeout_ms
        .unwrap_or(defaults.timeout.as_millis() as u64);
    if !(1..=600_000).contains(&timeout_ms) {
        bail!("invalid --fallback-timeout-ms {timeout_ms}: expected 1 to 600000 milliseconds");
    }
    let failures = flags.failures.unwrap_or(defaults.breaker_failures);
    if failures == 0 {
        bail!("invalid --fallback-failures 0: expected 1 or more");
    }
    let cooldown_ms = flags
        .cooldown_ms
        .unwrap_or(defaults.breaker_cooldown.as_millis() as u64);
    if !(1..=3_600_000).contains(&cooldown_ms) {
        bail!("invalid --fallback-cooldown-ms {cooldown_ms}: expected 1 to 3600000 milliseconds");
    }
    Ok(FallbackPolicy {
        model: flags.model,
        threshold: flags.threshold,
        max_local_queue: flags.max_local_queue,
        latency_slo,
        timeout: Duration::from_millis(timeout_ms),
        breaker_failures: failures,
        breaker_cooldown: Duration::from_millis(cooldown_ms),
    })
}

/// Builds the outbox options from the fsync policy and the size bound in MiB.
fn outbox_options(fsync: Option<String>, max_mib: Option<u64>) -> anyhow::Result<OutboxOptions> {
    let mut options = OutboxOptions::default();
    if let Some(fsync) = fsync {
        options.fsync = fsync
            .parse::<FsyncPolicy>()
            .map_err(|error| anyhow::anyhow!("--outbox-fsync: {error}"))?;
    }
    if let Some(max_mib) = max_mib {
        options.max_bytes = max_mib.saturating_mul(1024 * 1024);
        // Keep dropping at 1/16 of the bound for bounds under 16 MiB.
        options.segment_bytes =
            (options.max_bytes / 16).clamp(MIN_SEGMENT_BYTES, DEFAULT_SEGMENT_BYTES);
    }
    options
        .validate()
        .map_err(|error| anyhow::anyhow!("invalid --outbox-max-mib: {error}"))?;
    Ok(options)
}

/// Builds the hard-sample options from the rate per minute and the size bound in MiB.
fn hard_sample_options(
    rate_per_minute: Option<u32>,
    max_mib: Option<u64>,
) -> anyhow::Result<HardSampleOptions> {
    let mut options = HardSampleOptions::default();
    if let Some(rate_per_minute) = rate_per_minute {
        options.rate_per_minute = rate_per_minute;
    }
    if let Some(max_mib) = max_mib {
        if max_mib == 0 {
            bail!(
                "invalid --hard-sample-max-mib 0: expected 1 or more; \
                 --hard-sample-rate 0 turns capture off"
            );
        }
        options.max_bytes = max_mib.saturating_mul(1024 * 1024);
    }
    Ok(options)
}

/// Reads a config file and resolves its relative paths against the file's folder, so
/// the agent finds its files whatever folder it is started from.
fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read config file {}", path.display()))?;
    let mut config: FileConfig =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for relative in [
        &mut config.bundle,
        &mut config.public_key,
        &mut config.input,
        &mut config.labels,
        &mut config.state_dir,
        &mut config.password_file,
        &mut config.broker_ca,
        &mut config.client_cert,
        &mut config.client_key,
    ]
    .into_iter()
    .flatten()
    {
        *relative = base.join(&*relative);
    }
    Ok(config)
}

fn parse_shard(shard: &str) -> anyhow::Result<(usize, usize)> {
    let parsed = shard
        .split_once('/')
        .and_then(|(index, count)| Some((index.parse().ok()?, count.parse().ok()?)));
    match parsed {
        Some((index, count)) if count > 0 && index < count => Ok((index, count)),
        _ => {
            bail!("invalid --shard {shard:?}: expected INDEX/COUNT with INDEX < COUNT, such as 0/3")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_args() -> DeviceArgs {
        DeviceArgs {
            device_id: Some("pi-1".into()),
            bundle: Some("b".into()),
            public_key: Some("k".into()),
            input: Some("i".into()),
            ..DeviceArgs::default()
        }
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "device_id = \"from-file\"\nrate = 3.0\nshard = \"1/4\"\nstate_dir = \"state\"\n\
             outbox_fsync = \"never\"\noutbox_max_mib = 4\napi_listen = \"127.0.0.1:9000\"\n\
             mqtt_version = 5\n",
        )
        .unwrap();
        let args = DeviceArgs {
            config: Some(path),
            rate: Some(7.0),
            ..minimal_args()
        };
        let config = DeviceConfig::resolve(args).unwrap();
        assert_eq!(config.device_id, "pi-1");
        assert_eq!(config.state_dir, dir.path().join("state"));
        assert_eq!(config.rate, Some(7.0));
        assert_eq!((config.shard_index, config.shard_count), (1, 4));
        assert_eq!(config.broker.port, 1883);
        assert_eq!(config.outbox.fsync, FsyncPolicy::Never);
        assert_eq!(config.outbox.max_bytes, 4 * 1024 * 1024);
        assert_eq!(config.outbox.segment_bytes, 256 * 1024);
        assert_eq!(config.drain_rate, DEFAULT_DRAIN_RATE);
        assert_eq!(config.api_listen, Some("127.0.0.1:9000".parse().unwrap()));
        assert_eq!(config.mqtt_version, crate::mqtt::MqttVersion::V5);
    }

    #[test]
    fn bad_values_are_named() {
        let cases: [(DeviceArgs, &str); 10] = [
            (
                DeviceArgs {
                    broker_ca: Some("ca.pem".into()),
                    ..minimal_args()
                },
                "use mqtts://",
            ),
            (
                DeviceArgs {
                    broker: Some("mqtts://broker".into()),
                    client_cert: Some("device.pem".into()),
                    ..minimal_args()
                },
                "--client-key",
            ),
            (
                DeviceArgs {
                    shard: Some("3/3".into()),
                    ..minimal_args()
                },
                "--shard",
            ),
            (
                DeviceArgs {
                    rate: Some(-1.0),
                    ..minimal_args()
                },
                "--rate",
            ),
            (
                DeviceArgs {
                    broker: Some("http://x:1".into()),
                    ..minimal_args()
                },
                "broker URL",
            ),
            (
                DeviceArgs {
                    device_id: Some("a/b".into()),
                    ..minimal_args()
                },
                "device id",
            ),
            (
                DeviceArgs {
                    outbox_fsync: Some("sometimes".into()),
                    ..minimal_args()
                },
                "--outbox-fsync",
            ),
            (
                DeviceArgs {
                    outbox_max_mib: Some(0),
                    ..minimal_args()
                },
                "--outbox-max-mib",
            ),
            (
                DeviceArgs {
                    drain_rate: Some(0.0),
                    ..minimal_args()
                },
                "--drain-rate",
            ),
            (
                DeviceArgs {
                    api_listen: Some("localhost".into()),
                    ..minimal_args()
                },
                "--api-listen",
            ),
        ];
        for (args, expected) in cases {
            let error = DeviceConfig::resolve(args).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn unknown_config_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "rates = 3.0\n").unwrap();
        let error = DeviceConfig::resolve(DeviceArgs {
            config: Some(path),
            ..minimal_args()
        })
        .unwrap_err();
        assert!(format!("{error:#}").contains("rates"), "{error:#}");
    }

    #[test]
    fn hard_sample_settings_come_from_flags_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "hard_sample_rate = 0\nhard_sample_max_mib = 8\n").unwrap();
        let from_file = DeviceConfig::resolve(DeviceArgs {
            config: Some(path.clone()),
            ..minimal_args()
        })
        .unwrap();
        assert_eq!(from_file.hard_samples.rate_per_minute, 0);
        assert_eq!(from_file.hard_samples.max_bytes, 8 * 1024 * 1024);

        let flags = DeviceConfig::resolve(DeviceArgs {
            config: Some(path),
            hard_sample_rate: Some(30),
            ..minimal_args()
        })
        .unwrap();
        assert_eq!(flags.hard_samples.rate_per_minute, 30);

        let defaults = DeviceConfig::resolve(minimal_args()).unwrap();
        assert_eq!(defaults.hard_samples, HardSampleOptions::default());

        let error = DeviceConfig::resolve(DeviceArgs {
            hard_sample_max_mib: Some(0),
            ..minimal_args()
        })
        .unwrap_err();
        assert!(
            error.to_string().contains("--hard-sample-max-mib"),
            "{error}"
        );
    }

    #[test]
    fn fallback_settings_come_from_flags_or_file() {
        let defaults = DeviceConfig::resolve(minimal_args()).unwrap();
        assert_eq!(defaults.fallback, FallbackPolicy::default());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "fallback_model = \"digit-large\"\nfallback_threshold = 0.6\n\
             max_local_queue = 4\nlatency_slo_ms = 50.0\nfallback_cooldown_ms = 250\n",
        )
        .unwrap();
        let config = DeviceConfig::resolve(DeviceArgs {
            config: Some(path),
            fallback_timeout_ms: Some(300),
            fallback_failures: Some(5),
            ..minimal_args()
        })
        .unwrap();
        let policy = config.fallback;
        assert_eq!(policy.model.as_deref(), Some("digit-large"));
        assert_eq!(policy.threshold, Some(0.6));
        assert_eq!(policy.max_local_queue, Some(4));
        assert_eq!(policy.latency_slo, Some(Duration::from_millis(50)));
        assert_eq!(policy.timeout, Duration::from_millis(300));
        assert_eq!(policy.breaker_failures, 5);
        assert_eq!(policy.breaker_cooldown, Duration::from_millis(250));
    }

    #[test]
    fn bad_fallback_values_are_named() {
        let cases: [(DeviceArgs, &str); 6] = [
            (
                DeviceArgs {
                    fallback_threshold: Some(1.5),
                    ..minimal_args()
                },
                "--fallback-threshold",
            ),
            (
                DeviceArgs {
                    latency_slo_ms: Some(0.0),
                    ..minimal_args()
                },
                "--latency-slo-ms",
            ),
            (
                DeviceArgs {
                    fallback_timeout_ms: Some(0),
                    ..minimal_args()
                },
                "--fallback-timeout-ms",
            ),
            (
                DeviceArgs {
                    fallback_failures: Some(0),
                    ..minimal_args()
                },
                "--fallback-failures",
            ),
            (
                DeviceArgs {
                    fallback_cooldown_ms: Some(0),
                    ..minimal_args()
                },
                "--fallback-cooldown-ms",
            ),
            (
                DeviceArgs {
                    fallback_model: Some("a/b".into()),
                    ..minimal_args()
                },
                "--fallback-model",
            ),
        ];
        for (args, expected) in cases {
            let error = DeviceConfig::resolve(args).unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }
}
