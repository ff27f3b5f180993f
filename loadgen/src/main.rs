//! `fleet-loadgen`: simulates many devices publishing telemetry to an MQTT broker and
//! prints what the broker acknowledged.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use fleet_loadgen::{DEFAULT_MAX_CONNECTIONS, LoadConfig, LoadReport};
use fleet_wire::Encoding;

/// Simulate a fleet of devices that publish telemetry at QoS 1 on
/// fleet/v1/{device}/telemetry, each with sequence numbers from 1, at a steady rate.
///
/// The devices share --connections MQTT connections, so each connection carries several
/// device ids; real agents connect one each. Only telemetry is sent, no status messages.
/// Sequence numbers start at 1 on every run, so a server that already stored messages
/// from the same device ids counts the new ones as duplicates: use a new
/// --device-prefix for each run against the same database.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// MQTT broker as mqtt://HOST:PORT.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// MQTT connections the devices are spread over, round robin [default: the smaller
    /// of --devices and 100].
    #[arg(long)]
    connections: Option<usize>,
    /// Telemetry messages per second per device; 0 sends as fast as the broker accepts.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Seconds to send for. With --messages, the time limit after which sending stops
    /// even if not every message went out [default with --messages: twice the time the
    /// messages take at --rate plus 10 s, or 600 s at --rate 0].
    #[arg(long, required_unless_present = "messages")]
    duration: Option<f64>,
    /// Messages each device sends, numbered 1 to N.
    #[arg(long)]
    messages: Option<u64>,
    /// Device ids are PREFIX-1 to PREFIX-N [default: loadgen-UNIX_SECONDS].
    #[arg(long)]
    device_prefix: Option<String>,
    /// Topic levels before the device id; the fleet server subscribes to fleet/v1 only.
    #[arg(long, default_value = fleet_wire::topic::PREFIX)]
    topic_prefix: String,
    /// Payload encoding.
    #[arg(long, value_enum, default_value_t = EncodingArg::Postcard)]
    encoding: EncodingArg,
    /// Seconds to wait for outstanding PubAcks after the last message.
    #[arg(long, default_value_t = 10.0)]
    ack_timeout: f64,
    /// Seed of the simulated devices' profiles and measurements.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EncodingArg {
    Postcard,
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = to_config(&args)?;
    let encoding = match config.encoding {
        Encoding::Postcard => "postcard",
        Encoding::Json => "JSON",
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let report = runtime.block_on(fleet_loadgen::run(config))?;
    print_summary(&report, encoding);
    Ok(())
}

fn to_config(args: &Args) -> anyhow::Result<LoadConfig> {
    let broker = fleet_mqtt::BrokerUrl::parse(&args.broker).context("invalid --broker")?;
    if broker.tls {
        // TODO: simulated devices connect over plain TCP only, so a TLS broker's
        // handshake cost is not measured yet.
        bail!(
            "invalid --broker {broker}: the load generator connects over plain TCP only, use mqtt://"
        );
    }
    let (broker_host, broker_port) = (broker.host, broker.port);
    let duration = match (args.duration, args.messages) {
        (Some(seconds), _) => seconds,
        (None, Some(messages)) if args.rate > 0.0 => 2.0 * messages as f64 / args.rate + 10.0,
        (None, _) => 600.0,
    };
    if !(duration.is_finite() && duration > 0.0) {
        bail!("invalid --duration {duration}: expected a positive number of seconds");
    }
    if !(args.ack_timeout.is_finite() && args.ack_timeout >= 0.0) {
        bail!(
            "invalid --ack-timeout {}: expected seconds, 0 or more",
            args.ack_timeout
        );
    }
    let device_prefix = args
        .device_prefix
        .clone()
        .unwrap_or_else(|| format!("loadgen-{}", fleet_loadgen::unix_millis() / 1000));
    let mut config = LoadConfig::new(
        &device_prefix,
        args.devices,
        args.rate,
        Duration::from_secs_f64(duration),
    );
    config.broker_host = broker_host;
    config.broker_port = broker_port;
    config.connections = args
        .connections
        .unwrap_or_else(|| args.devices.clamp(1, DEFAULT_MAX_CONNECTIONS));
    config.topic_prefix = args.topic_prefix.clone();
    config.messages_per_device = args.messages;
    config.encoding = match args.encoding {
        EncodingArg::Postcard => Encoding::Postcard,
        EncodingArg::Json => Encoding::Json,
    };
    config.ack_timeout = Duration::from_secs_f64(args.ack_timeout);
    config.seed = args.seed;
    config.validate()?;
    Ok(config)
}

fn print_summary(report: &LoadReport, encoding: &str) {
    let devices = report.devices.len();
    println!("devices       {devices}");
    match report.expected {
        Some(expected) if report.sent < expected => println!(
            "sent          {} messages, {} short of the {expected} requested: the time limit ended sending",
            report.sent,
            expected - report.sent
        ),
        _ => println!("sent          {} messages", report.sent),
    }
    println!(
        "acknowledged  {} ({} without a PubAck)",
        report.acknowledged,
        report.unacknowledged()
    );
    println!(
        "duration      {:.2} s sending, {:.2} s to the last PubAck",
        report.send_duration.as_secs_f64(),
        report.ack_duration.as_secs_f64()
    );
    match report.target_rate {
        Some(target) => println!(
            "rate          {:.0} messages/s sent (target {target:.0}), {:.0} acknowledged/s",
            report.send_rate(),
            report.ack_rate()
        ),
        None => println!(
            "rate          {:.0} messages/s sent, {:.0} acknowledged/s",
            report.send_rate(),
            report.ack_rate()
        ),
    }
    if report.sent > 0 {
        println!(
            "payload       {:.1} bytes per message ({encoding})",
            report.payload_bytes as f64 / report.sent as f64
        );
    }
    if report.connection_errors > 0 {
        println!(
            "reconnects    {} broker connections failed and were reopened",
            report.connection_errors
        );
    }
}
