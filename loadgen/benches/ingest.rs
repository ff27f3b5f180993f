//! Ingest benchmark of the fleet server against Mosquitto, printed as Markdown tables.
//!
//! ```sh
//! cargo bench -p fleet-loadgen --bench ingest
//! FLEET_BENCH_MESSAGES=100000 FLEET_BENCH_DEVICES=2000 FLEET_BENCH_SECONDS=10 \
//!     cargo bench -p fleet-loadgen --bench ingest
//! ```
//!
//! 1. Throughput: 100 simulated devices send `FLEET_BENCH_MESSAGES` messages (default
//!    200,000) as fast as the consumer keeps up, first to a bare `mosquitto_sub -q 1`,
//!    then to a fleet server started in this process on each store. Each consumer's
//!    rate is timed from its first message to its last, and each server's store is then
//!    checked message by message: every (device, seq) stored once. For `mosquitto_sub`
//!    only the lines it printed are counted, so a redelivered message would count twice.
//! 2. Payload size: mean bytes of the same simulated messages in postcard and in JSON.
//! 3. Fleet: `FLEET_BENCH_DEVICES` devices (default 10,000) at 1 message/s each for
//!    `FLEET_BENCH_SECONDS` (default 30) with no flow control, as a real fleet sends,
//!    against a server on each store. Reports lost messages and the ingest lag, receive
//!    time minus device time, read back from the store.
//!
//! Each server connects to Mosquitto with `FLEET_BENCH_INGEST_CONNECTIONS` ingest
//! connections (default [`fleet_server::DEFAULT_INGEST_CONNECTIONS`]).
//!
//! The stores are a fresh SQLite file and a fresh schema in the PostgreSQL database
//! `FLEET_BENCH_POSTGRES` (default postgres://postgres@127.0.0.1:5432/test), which is
//! dropped afterwards. The PostgreSQL rows are left out, with a note, when that database
//! is unreachable or the variable is empty.
//!
//! The benchmark starts its own Mosquitto on a free loopback port, configured as a broker
//! in front of a fleet would be ([`BROKER_SETTINGS`]). With `FLEET_BENCH_BROKER=HOST:PORT`
//! it measures against that running broker instead.
//!
//! In the throughput runs the generator keeps at most [`MAX_UNCONSUMED`] messages sent but
//! not yet consumed, the same for every consumer. A consumer slower than the generator
//! would otherwise fill its queue on the broker, which then drops messages, and the
//! measured rate would be the generator's.
//!
//! The generator, Mosquitto and the server share this machine's cores, and nothing is
//! asserted on time. The benchmark fails when Mosquitto or `mosquitto_sub` is missing,
//! when a run fails, when `mosquitto_sub` loses messages, or when a throughput run does
//! not store every message exactly once. On SIGINT or SIGTERM it stops its Mosquitto
//! before exiting.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use fleet_loadgen::{LoadConfig, LoadReport, SimulatedDevice, Throttle};
use fleet_server::metrics::Outcome;
use fleet_server::store::{Received, Record};
use fleet_server::{BrokerMode, Server, ServerMetrics};
use fleet_wire::Encoding;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use support::{StoreCheck, WaitOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

/// Settings of the benchmark's own Mosquitto besides its listener.
///
/// Mosquitto's defaults suit small installations: 20 QoS 1 messages in flight per
/// subscriber and 1,000 queued. At those limits the consumers measured here wait on the
/// broker, not on their own work, and a fleet of 10,000 devices overflows the queue of
/// a subscriber that stalls for a tenth of a second. Mosquitto 2.0.11 with the in-flight
/// limit also lost messages for `mosquitto_sub`: in 2 of 3 runs with 200 unconsumed and
/// in both runs with 400.
const BROKER_SETTINGS: &str = "allow_anonymous true
persistence false
max_inflight_messages 0
max_queued_messages 1000000
";
/// Devices of the throughput runs.
const THROUGHPUT_DEVICES: usize = 100;
/// Messages sent but not yet consumed in the throughput runs.
///
/// The fleet server acknowledges a message only after the batch holding it commits, so
/// it needs more messages in flight than a subscriber that acknowledges on arrival. On
/// this benchmark's broker with at most 400, the server stored 31,000 to 34,000
/// messages/s and a third of the CPU stayed idle while commits ran. With 2,000 it stored
/// 42,000 to 45,000 with the CPU busy. `mosquitto_sub` received 63,000 to 80,000 at both.
const MAX_UNCONSUMED: u64 = 2000;
/// Messages per batch of the store-alone runs: the server's largest batch.
const STORE_BATCH: usize = fleet_server::MAX_INGEST_BATCH;
/// Messages per device of the fleet scenario, per second.
const FLEET_RATE: f64 = 1.0;
/// Simulated messages whose sizes are averaged for the payload table.
const PAYLOAD_SAMPLES: usize = 1_000;
/// How often the server's stored count is sampled to time the throughput run.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(2);
/// A consumer that stores nothing for this long is taken to have stopped.
const QUIET_LIMIT: Duration = Duration::from_secs(10);
/// Maximum run time of the `mosquitto_sub` child.
const SUBSCRIBER_TIME_LIMIT: Duration = Duration::from_secs(1800);
/// Maximum wait for a consumer to catch up after the generator stopped.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(180);

/// Database behind a measured fleet server. The benchmark measures each of [`STORES`]
/// that is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Sqlite,
    Postgres,
}

const STORES: [StoreKind; 2] = [StoreKind::Sqlite, StoreKind::Postgres];

/// PostgreSQL database for the PostgreSQL rows; `FLEET_BENCH_POSTGRES` overrides it,
/// and an empty value leaves those rows out.
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

impl StoreKind {
    fn label(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "SQLite",
            StoreKind::Postgres => "PostgreSQL",
        }
    }
}

/// A fresh database for one measured server, removed by [`BenchDatabase::remove`].
#[derive(Debug)]
enum BenchDatabase {
    Sqlite {
        dir: tempfile::TempDir,
    },
    /// A schema of its own in the PostgreSQL database, named in the URL's search path.
    Postgres {
        admin: sqlx::PgPool,
        schema: String,
        url: String,
    },
}

impl BenchDatabase {
    /// Creates an empty SQLite folder or PostgreSQL schema named after `tag`.
    async fn create(
        store: StoreKind,
        tag: &str,
        postgres_url: &str,
    ) -> anyhow::Result<BenchDatabase> {
        match store {
            StoreKind::Sqlite => Ok(BenchDatabase::Sqlite {
                dir: tempfile::tempdir()?,
            }),
            StoreKind::Postgres => {
                let admin = connect_postgres(postgres_url).await?;
                let schema = tag.replace(['-', '.'], "_");
                sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .execute(&admin)
                    .await?;
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&admin)
                    .await
                    .with_context(|| format!("failed to create schema {schema}"))?;
                let separator = if postgres_url.contains('?') { '&' } else { '?' };
                let url = format!("{postgres_url}{separator}options[search_path]={schema}");
                Ok(BenchDatabase::Postgres { admin, schema, url })
            }
        }
    }

    /// Returns the `database` value for the server configuration.
    fn location(&self) -> String {
        match self {
            BenchDatabase::Sqlite { dir } => dir.path().join("fleet.db").display().to_string(),
            BenchDatabase::Postgres { url, .. } => url.clone(),
        }
    }

    async fn remove(self) {
        if let BenchDatabase::Postgres { admin, schema, .. } = self {
            let dropped = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&admin)
                .await;
            if let Err(error) = dropped {
                eprintln!("failed to drop PostgreSQL schema {schema}: {error}");
            }
            admin.close().await;
        }
    }
}

async fn connect_postgres(url: &str) -> anyhow::Result<sqlx::PgPool> {
    let connect = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url);
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .map_err(|_| anyhow::anyhow!("timed out connecting to {url}"))?
        .with_context(|| format!("failed to connect to {url}"))
}

impl StoreKind {
    /// Checks that the store can be measured here.
    async fn check_available(self, postgres_url: &str) -> anyhow::Result<()> {
        match self {
            StoreKind::Sqlite => Ok(()),
            StoreKind::Postgres => {
                if postgres_url.is_empty() {
                    bail!("FLEET_BENCH_POSTGRES is empty");
                }
                connect_postgres(postgres_url).await?.close().await;
                Ok(())
            }
        }
    }
}

/// Returns the entries of [`STORES`] that can be measured here, and a note for each
/// one left out.
async fn available_stores(postgres_url: &str) -> (Vec<StoreKind>, Vec<String>) {
    let mut stores = Vec::new();
    let mut notes = Vec::new();
    for store in STORES {
        match store.check_available(postgres_url).await {
            Ok(()) => stores.push(store),
            Err(error) => notes.push(format!("{} rows left out: {error:#}.", store.label())),
        }
    }
    (stores, notes)
}

/// Sizes and databases from the environment.
#[derive(Debug)]
struct Settings {
    /// Broker that every run connects to.
    broker_host: String,
    broker_port: u16,
    messages: u64,
    fleet_devices: usize,
    fleet_seconds: u64,
    postgres_url: String,
    /// Ingest connections of each measured server to Mosquitto.
    ingest_connections: usize,
}

impl Settings {
    fn from_env(broker: &Broker) -> anyhow::Result<Settings> {
        Ok(Settings {
            broker_host: broker.host.clone(),
            broker_port: broker.port,
            messages: env_number("FLEET_BENCH_MESSAGES", 200_000)?,
            fleet_devices: env_number("FLEET_BENCH_DEVICES", 10_000)?,
            fleet_seconds: env_number("FLEET_BENCH_SECONDS", 30)?,
            postgres_url: std::env::var("FLEET_BENCH_POSTGRES")
                .unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into()),
            ingest_connections: env_number(
                "FLEET_BENCH_INGEST_CONNECTIONS",
                fleet_server::DEFAULT_INGEST_CONNECTIONS,
            )?,
        })
    }

    /// Messages per device of the throughput runs, rounded up so the total is at least
    /// `FLEET_BENCH_MESSAGES`.
    fn messages_per_device(&self) -> u64 {
        self.messages.div_ceil(THROUGHPUT_DEVICES as u64)
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => {
            let number: T = text.replace(['_', ','], "").parse().map_err(|_| {
                anyhow::anyhow!("invalid {name}={text:?}: expected a positive whole number")
            })?;
            Ok(number)
        }
    }
}

/// One row of the throughput table.
#[derive(Debug)]
struct ThroughputRow {
    consumer: String,
    sent: u64,
    /// Messages received or stored, lost, and for a server the duplicates and gaps.
    check: StoreCheck,
    has_store: bool,
    /// Messages counted between the first and the last timed one, and the time between.
    timed_messages: u64,
    timed: Duration,
}

impl ThroughputRow {
    /// Messages per second, or `None` when the run was not timed (it stalled).
    fn rate(&self) -> Option<f64> {
        if self.timed.is_zero() {
            return None;
        }
        Some(self.timed_messages as f64 / self.timed.as_secs_f64())
    }
}

/// One row of the fleet table.
#[derive(Debug)]
struct FleetRow {
    store: &'static str,
    report: LoadReport,
    check: StoreCheck,
    wait: WaitOutcome,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let broker = Broker::start()?;
    // Returning, rather than dying of the signal, drops the broker and so stops the
    // Mosquitto that the benchmark started.
    let result = tokio::select! {
        result = run(&broker) => result,
        signal = stop_signal() => Err(anyhow::anyhow!("benchmark stopped by {signal}")),
    };
    drop(broker);
    result
}

/// Waits for SIGINT or SIGTERM and returns its name.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

/// Runs every measurement on `broker` and prints the tables.
async fn run(broker: &Broker) -> anyhow::Result<()> {
    let settings = Settings::from_env(broker)?;
    check_broker(&settings).await?;
    check_mosquitto_sub().await?;
    let started = Instant::now();
    let run_id = format!("bench-{}", std::process::id());
    let (stores, mut notes) = available_stores(&settings.postgres_url).await;
    let mut failures = Vec::new();

    let mut throughput = vec![bare_subscriber(&run_id, &settings).await?];
    for &store in &stores {
        match server_throughput(store, &run_id, &settings).await {
            Ok(row) => throughput.push(row),
            Err(error) => failures.push(format!(
                "{} throughput run failed: {error:#}",
                store.label()
            )),
        }
    }
    let payload = payload_sizes();
    let mut writes = Vec::new();
    for &store in &stores {
        match store_writes(store, &run_id, &settings).await {
            Ok(row) => writes.push(row),
            Err(error) => failures.push(format!(
                "{} store-alone run failed: {error:#}",
                store.label()
            )),
        }
    }
    let mut fleet = Vec::new();
    for &store in &stores {
        match fleet_scenario(store, &run_id, &settings).await {
            Ok(row) => fleet.push(row),
            Err(error) => failures.push(format!("{} fleet run failed: {error:#}", store.label())),
        }
    }

    print_tables(&settings, &throughput, payload, &writes, &fleet);
    // A bare subscriber that lost messages gives no baseline for the ratios.
    if let Some(bare) = throughput.first().filter(|row| row.check.lost > 0) {
        failures.push(format!(
            "{}: {} of {} messages lost, which makes its rate an invalid baseline; on a running broker, raise max_inflight_messages and max_queued_messages as in BROKER_SETTINGS",
            bare.consumer, bare.check.lost, bare.check.sent
        ));
    }
    for row in throughput.iter().filter(|row| row.has_store) {
        let check = &row.check;
        if check.lost + check.duplicates + check.gaps + check.unexpected > 0 {
            failures.push(format!(
                "{}: {} of {} messages lost, {} duplicates, {} gaps, {} unexpected rows, with at most {MAX_UNCONSUMED} messages unconsumed",
                row.consumer,
                check.lost,
                check.sent,
                check.duplicates,
                check.gaps,
                check.unexpected
            ));
        }
    }
    notes.extend(failures.iter().cloned());
    println!();
    for note in &notes {
        println!("{note}");
    }
    println!(
        "The benchmark took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        bail!(
            "{} of the benchmark's checks failed; see above",
            failures.len()
        );
    }
    Ok(())
}

/// The broker of the runs: Mosquitto started by the benchmark, or the one that
/// `FLEET_BENCH_BROKER` names.
#[derive(Debug)]
struct Broker {
    host: String,
    port: u16,
    /// The started Mosquitto, killed when this is dropped.
    _process: Option<support::Mosquitto>,
}

impl Broker {
    fn start() -> anyhow::Result<Broker> {
        if let Ok(address) = std::env::var("FLEET_BENCH_BROKER") {
            let (host, port) = address
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_owned(), port.parse().ok()?)))
                .with_context(|| {
                    format!("invalid FLEET_BENCH_BROKER={address:?}: expected HOST:PORT")
                })?;
            return Ok(Broker {
                host,
                port,
                _process: None,
            });
        }

        let mosquitto = support::Mosquitto::start(BROKER_SETTINGS)?;
        Ok(Broker {
            host: "127.0.0.1".into(),
            port: mosquitto.port,
            _process: Some(mosquitto),
        })
    }
}

/// Waits up to 10 s for the broker to accept connections.
async fn check_broker(settings: &Settings) -> anyhow::Result<()> {
    let address = format!("{}:{}", settings.broker_host, settings.broker_port);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(&address).await {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("no MQTT broker is listening on {address}"));
            }
        }
    }
}

async fn check_mosquitto_sub() -> anyhow::Result<()> {
    let result = tokio::process::Command::new("mosquitto_sub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    match result {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => bail!(
            "mosquitto_sub not found on PATH: install it with `apt-get install mosquitto-clients`"
        ),
        Err(error) => Err(error).context("failed to run mosquitto_sub"),
    }
}

/// Returns a load configuration for the throughput runs, sending as fast as `consumed`
/// allows.
fn throughput_config(
    device_prefix: &str,
    settings: &Settings,
    consumed: Arc<dyn Fn() -> u64 + Send + Sync>,
) -> LoadConfig {
    let mut config = LoadConfig::new(
        device_prefix,
        THROUGHPUT_DEVICES,
        0.0,
        Duration::from_secs(600),
    );
    config.broker_host = settings.broker_host.clone();
    config.broker_port = settings.broker_port;
    config.messages_per_device = Some(settings.messages_per_device());
    config.throttle = Some(Throttle {
        consumed,
        max_unconsumed: MAX_UNCONSUMED,
    });
    config
}

/// Lines a `mosquitto_sub` child printed, timed as they arrive.
#[derive(Debug, Default)]
struct SubscriberLines {
    probe_seen: AtomicBool,
    messages: AtomicU64,
    first_and_last: Mutex<Option<(Instant, Instant)>>,
}

/// Measures how fast a bare `mosquitto_sub -q 1` receives the throughput run.
async fn bare_subscriber(run_id: &str, settings: &Settings) -> anyhow::Result<ThroughputRow> {
    // A topic prefix of its own, so the subscriber receives only this run's messages.
    let topic_prefix = format!("{run_id}-sub");
    let probe_topic = format!("{topic_prefix}/probe/telemetry");
    let expected = settings.messages_per_device() * THROUGHPUT_DEVICES as u64;
    let mut child = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            &settings.broker_host,
            "-p",
            &settings.broker_port.to_string(),
        ])
        .args(["-q", "1"])
        .args(["-t", &format!("{topic_prefix}/+/telemetry"), "-F", "%t"])
        // A safety net only: the benchmark stops it once every message arrived.
        .args(["-W", &SUBSCRIBER_TIME_LIMIT.as_secs().to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start mosquitto_sub")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let lines = Arc::new(SubscriberLines::default());
    let reader = {
        let lines = lines.clone();
        let probe_topic = probe_topic.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let now = Instant::now();
                if line == probe_topic {
                    lines.probe_seen.store(true, Ordering::Relaxed);
                    continue;
                }
                let mut times = lines.first_and_last.lock().unwrap();
                *times = Some(times.map_or((now, now), |(first, _)| (first, now)));
                drop(times);
                if lines.messages.fetch_add(1, Ordering::Relaxed) + 1 >= expected {
                    break;
                }
            }
        })
    };
    wait_until_subscribed(settings, &probe_topic, &lines.probe_seen).await?;

    let consumed = {
        let lines = lines.clone();
        Arc::new(move || lines.messages.load(Ordering::Relaxed))
    };
    let mut config = throughput_config(&format!("{run_id}-sub"), settings, consumed);
    config.topic_prefix = topic_prefix;
    let report = fleet_loadgen::run(config).await?;
    let wait = support::wait_for_count(
        || lines.messages.load(Ordering::Relaxed),
        report.sent,
        QUIET_LIMIT,
        CATCH_UP_LIMIT,
    )
    .await;
    if wait != WaitOutcome::Reached {
        eprintln!("mosquitto_sub stopped receiving before it had every message ({wait:?})");
    }
    reader.abort();
    child.kill().await.ok();

    let received = lines.messages.load(Ordering::Relaxed);
    let (first, last) = lines
        .first_and_last
        .lock()
        .unwrap()
        .unwrap_or((Instant::now(), Instant::now()));
    Ok(ThroughputRow {
        consumer: "mosquitto_sub -q 1".into(),
        sent: report.sent,
        check: StoreCheck {
            sent: report.sent,
            stored: received,
            lost: report.sent.saturating_sub(received),
            ..StoreCheck::default()
        },
        has_store: false,
        timed_messages: received.saturating_sub(1),
        timed: last - first,
    })
}

/// Publishes to `probe_topic` every 100 ms until the subscriber printed it.
async fn wait_until_subscribed(
    settings: &Settings,
    probe_topic: &str,
    seen: &AtomicBool,
) -> anyhow::Result<()> {
    let options = MqttOptions::new(
        format!("fleet-bench-probe-{}", std::process::id()),
        settings.broker_host.clone(),
        settings.broker_port,
    );
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let mut connection = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.load(Ordering::Relaxed) {
        if Instant::now() >= deadline {
            connection.abort();
            bail!("mosquitto_sub printed no probe message within 20 s; is it subscribed?");
        }
        client
            .publish(probe_topic, QoS::AtLeastOnce, false, b"probe".to_vec())
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = client.disconnect().await;
    if tokio::time::timeout(Duration::from_secs(2), &mut connection)
        .await
        .is_err()
    {
        connection.abort();
    }
    Ok(())
}

/// Starts a server on Mosquitto and `database`, and waits until it ingests.
async fn start_bench_server(
    database: &BenchDatabase,
    client_id: &str,
    probe_id: &str,
    settings: &Settings,
) -> anyhow::Result<Server> {
    let broker = BrokerMode::External {
        url: fleet_mqtt::BrokerUrl {
            host: settings.broker_host.clone(),
            port: settings.broker_port,
            tls: false,
        },
        tls: fleet_mqtt::TlsFiles::default(),
        connections: settings.ingest_connections.max(1),
    };
    let server = support::start_server(broker, &database.location(), client_id).await?;
    support::wait_until_ingesting(&server, probe_id).await?;
    // Let the last probe message land before anything is counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(server)
}

/// Times a fleet server storing the throughput run and checks every message.
async fn server_throughput(
    store: StoreKind,
    run_id: &str,
    settings: &Settings,
) -> anyhow::Result<ThroughputRow> {
    let tag = format!("{run_id}-tp-{}", store.label().to_lowercase());
    let database = BenchDatabase::create(store, &tag, &settings.postgres_url).await?;
    let client_id = format!("fleet-{tag}");
    let server =
        start_bench_server(&database, &client_id, &format!("{tag}-probe"), settings).await?;
    let baseline = support::stored_total(&server);
    let expected = settings.messages_per_device() * THROUGHPUT_DEVICES as u64;

    let mut sampler = tokio::spawn(sample_stored(server.metrics.clone(), baseline, expected));
    let consumed = {
        let metrics = server.metrics.clone();
        Arc::new(move || metrics.total(Outcome::Stored).saturating_sub(baseline))
    };
    let device_prefix = format!("{tag}-dev");
    let report = fleet_loadgen::run(throughput_config(&device_prefix, settings, consumed)).await?;
    let wait =
        support::wait_for_stored(&server, baseline + report.sent, QUIET_LIMIT, CATCH_UP_LIMIT)
            .await;
    if wait != WaitOutcome::Reached {
        eprintln!(
            "{}: the server stopped storing before it had every message ({wait:?})",
            store.label()
        );
    }
    let timing = match tokio::time::timeout(Duration::from_secs(1), &mut sampler).await {
        Ok(Ok(timing)) => timing,
        _ => {
            sampler.abort();
            None
        }
    };
    let check = support::check_store(&server.store, &report.devices).await?;
    server.shutdown().await;
    database.remove().await;

    let (timed_messages, timed) = timing.unwrap_or((0, Duration::ZERO));
    Ok(ThroughputRow {
        consumer: format!("fleet server, {}", store.label()),
        sent: report.sent,
        check,
        has_store: true,
        timed_messages,
        timed,
    })
}

/// Samples the stored count until it reaches `baseline + expected`, and returns the
/// messages stored between the first sample above the baseline and the last one, with
/// the time between.
async fn sample_stored(
    metrics: Arc<ServerMetrics>,
    baseline: u64,
    expected: u64,
) -> Option<(u64, Duration)> {
    let mut first: Option<(u64, Instant)> = None;
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    loop {
        ticker.tick().await;
        let count = metrics.total(Outcome::Stored).saturating_sub(baseline);
        let now = Instant::now();
        if count > 0 && first.is_none() {
            first = Some((count, now));
        }
        if count >= expected {
            let (first_count, first_time) = first?;
            return Some((count - first_count, now - first_time));
        }
    }
}

/// Mean payload bytes of the same simulated messages in postcard and in JSON.
fn payload_sizes() -> (f64, f64) {
    let mut postcard = 0usize;
    let mut json = 0usize;
    let devices = 100;
    for number in 0..devices {
        let mut device = SimulatedDevice::new(
            format!("bench-device-{number}"),
            fleet_wire::topic::PREFIX,
            Duration::from_secs_f64(1.0 / FLEET_RATE),
            number as u64,
        );
        for _ in 0..PAYLOAD_SAMPLES / devices {
            let telemetry = device.next_telemetry(fleet_loadgen::unix_millis());
            device.mark_sent();
            postcard += fleet_wire::encode(&telemetry, Encoding::Postcard)
                .expect("telemetry encodes")
                .len();
            json += fleet_wire::encode(&telemetry, Encoding::Json)
                .expect("telemetry encodes")
                .len();
        }
    }
    let samples = (PAYLOAD_SAMPLES / devices * devices) as f64;
    (postcard as f64 / samples, json as f64 / samples)
}

/// One row of the store-alone table: the time of each batch write, sorted.
#[derive(Debug)]
struct WriteRow {
    store: &'static str,
    times: Vec<Duration>,
}

impl WriteRow {
    fn mean(&self) -> Duration {
        self.times.iter().sum::<Duration>() / self.times.len().max(1) as u32
    }

    fn quantile(&self, quantile: f64) -> Duration {
        support::percentile(&self.times, quantile).unwrap_or_default()
    }
}

/// Writes the throughput run's number of messages straight to a fresh `store`, in
/// batches of [`STORE_BATCH`] from [`THROUGHPUT_DEVICES`] devices in turn, one batch at
/// a time, and times each write. This is the server's write path without MQTT, decoding
/// or acknowledgements, on a runtime that has nothing else to do.
async fn store_writes(
    store: StoreKind,
    run_id: &str,
    settings: &Settings,
) -> anyhow::Result<WriteRow> {
    let tag = format!("{run_id}-writes-{}", store.label().to_lowercase());
    let database = BenchDatabase::create(store, &tag, &settings.postgres_url).await?;
    let times = time_writes(&database.location(), settings.messages).await;
    database.remove().await;
    let mut times = times?;
    times.sort();
    Ok(WriteRow {
        store: store.label(),
        times,
    })
}

async fn time_writes(location: &str, messages: u64) -> anyhow::Result<Vec<Duration>> {
    let store = fleet_server::Store::open(location)
        .await
        .with_context(|| format!("failed to open the store at {location}"))?;
    let mut devices: Vec<SimulatedDevice> = (0..THROUGHPUT_DEVICES)
        .map(|number| {
            SimulatedDevice::new(
                format!("bench-writes-{number}"),
                fleet_wire::topic::PREFIX,
                Duration::from_secs_f64(1.0 / FLEET_RATE),
                number as u64,
            )
        })
        .collect();
    let batches = messages.div_ceil(STORE_BATCH as u64);
    let mut times = Vec::with_capacity(batches as usize);
    let mut turn = 0;
    for number in 0..batches {
        let now = fleet_loadgen::unix_millis();
        let batch: Vec<Record> = (0..STORE_BATCH)
            .map(|_| {
                let device = &mut devices[turn % THROUGHPUT_DEVICES];
                turn += 1;
                let telemetry = device.next_telemetry(now);
                device.mark_sent();
                Record::Telemetry(Received {
                    telemetry,
                    received_ms: now,
                })
            })
            .collect();
        let started = Instant::now();
        let outcome = store
            .apply_batch(&batch)
            .await
            .with_context(|| format!("batch {number} not stored"))?;
        times.push(started.elapsed());
        if outcome.stored != STORE_BATCH {
            bail!(
                "batch {number}: {} of {STORE_BATCH} messages stored, {} duplicates",
                outcome.stored,
                outcome.duplicates
            );
        }
    }
    Ok(times)
}

/// Runs the fleet scenario against a server on `store`.
async fn fleet_scenario(
    store: StoreKind,
    run_id: &str,
    settings: &Settings,
) -> anyhow::Result<FleetRow> {
    let tag = format!("{run_id}-fleet-{}", store.label().to_lowercase());
    let database = BenchDatabase::create(store, &tag, &settings.postgres_url).await?;
    let client_id = format!("fleet-{tag}");
    let server =
        start_bench_server(&database, &client_id, &format!("{tag}-probe"), settings).await?;
    let baseline = support::stored_total(&server);

    let mut config = LoadConfig::new(
        &format!("{tag}-dev"),
        settings.fleet_devices,
        FLEET_RATE,
        Duration::from_secs(settings.fleet_seconds),
    );
    config.broker_host = settings.broker_host.clone();
    config.broker_port = settings.broker_port;
    let report = fleet_loadgen::run(config).await?;
    let wait =
        support::wait_for_stored(&server, baseline + report.sent, QUIET_LIMIT, CATCH_UP_LIMIT)
            .await;
    let mut check = support::check_store(&server.store, &report.devices).await?;
    check.lags_ms.sort_unstable();
    server.shutdown().await;
    database.remove().await;
    Ok(FleetRow {
        store: store.label(),
        report,
        check,
        wait,
    })
}

/// Formats a whole number with `,` between thousands.
fn thousands(number: u64) -> String {
    let digits = number.to_string();
    let mut grouped = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

fn optional_ms(value: Option<i64>) -> String {
    value.map_or("–".into(), |ms| thousands(ms.max(0) as u64))
}

fn print_tables(
    settings: &Settings,
    throughput: &[ThroughputRow],
    payload: (f64, f64),
    writes: &[WriteRow],
    fleet: &[FleetRow],
) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "## Fleet server ingest over Mosquitto on {}:{}",
        settings.broker_host, settings.broker_port
    );
    println!();
    println!(
        "{cores} CPU cores shared by the load generator, Mosquitto and the server; {} build.",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "optimised"
        }
    );
    println!();
    print_throughput(settings, throughput);
    println!();
    print_payload(payload);
    println!();
    print_writes(writes);
    println!();
    print_fleet(settings, fleet);
}

fn print_writes(writes: &[WriteRow]) {
    let Some(first) = writes.first() else {
        return;
    };
    println!(
        "### Store alone: {} batches of {STORE_BATCH} messages from {THROUGHPUT_DEVICES} devices",
        thousands(first.times.len() as u64)
    );
    println!();
    println!(
        "Each batch written with `Store::apply_batch` after the previous one committed, without MQTT."
    );
    println!();
    println!("| store | ms per batch p50 | p99 | mean | messages/s |");
    println!("|---|--:|--:|--:|--:|");
    let ms = |time: Duration| time.as_secs_f64() * 1e3;
    for row in writes {
        let rate = STORE_BATCH as f64 / row.mean().as_secs_f64();
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            row.store,
            ms(row.quantile(0.5)),
            ms(row.quantile(0.99)),
            ms(row.mean()),
            thousands(rate.round() as u64)
        );
    }
}

fn print_throughput(settings: &Settings, throughput: &[ThroughputRow]) {
    println!(
        "### Throughput: {} messages from {THROUGHPUT_DEVICES} devices, at most {MAX_UNCONSUMED} unconsumed",
        thousands(settings.messages_per_device() * THROUGHPUT_DEVICES as u64)
    );
    println!();
    println!("Time runs from the first message received or stored to the last.");
    println!();
    println!(
        "| consumer | sent | received or stored | lost | duplicates | gaps | time (s) | messages/s | of bare |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    let bare_rate = throughput.first().and_then(ThroughputRow::rate);
    for row in throughput {
        let (duplicates, gaps) = if row.has_store {
            (thousands(row.check.duplicates), thousands(row.check.gaps))
        } else {
            ("–".into(), "–".into())
        };
        // A stalled run has no rate, and a stalled bare subscriber no ratio.
        let rate = row.rate();
        let ratio = match (rate, bare_rate) {
            (Some(rate), Some(bare)) => format!("{:.2}", rate / bare),
            _ => "–".into(),
        };
        let rate = rate.map_or("–".into(), |rate| thousands(rate.round() as u64));
        println!(
            "| {} | {} | {} | {} | {duplicates} | {gaps} | {:.2} | {rate} | {ratio} |",
            row.consumer,
            thousands(row.sent),
            thousands(row.check.stored),
            thousands(row.check.lost),
            row.timed.as_secs_f64(),
        );
    }
}

fn print_payload((postcard, json): (f64, f64)) {
    println!(
        "### Telemetry payload: mean of {} simulated messages, 1 s of inference each",
        thousands(PAYLOAD_SAMPLES as u64)
    );
    println!();
    println!("| encoding | bytes per message | of postcard |");
    println!("|---|--:|--:|");
    println!("| postcard | {postcard:.1} | 1.00 |");
    println!("| JSON | {json:.1} | {:.2} |", json / postcard);
}

fn print_fleet(settings: &Settings, fleet: &[FleetRow]) {
    println!(
        "### Fleet: {} devices at {FLEET_RATE} message/s each for {} s, no flow control",
        thousands(settings.fleet_devices as u64),
        settings.fleet_seconds
    );
    println!();
    println!(
        "| store | sent | acknowledged | sent/s (target) | stored | lost | duplicates | gaps | lag p50 (ms) | lag p99 (ms) | lag max (ms) |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for row in fleet {
        let report = &row.report;
        let check = &row.check;
        println!(
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            row.store,
            thousands(report.sent),
            thousands(report.acknowledged),
            thousands(report.send_rate().round() as u64),
            thousands(report.target_rate.unwrap_or(0.0).round() as u64),
            thousands(check.stored),
            thousands(check.lost),
            thousands(check.duplicates),
            thousands(check.gaps),
            optional_ms(support::percentile(&check.lags_ms, 0.5)),
            optional_ms(support::percentile(&check.lags_ms, 0.99)),
            optional_ms(check.lags_ms.last().copied()),
        );
    }
    for row in fleet {
        let lost = row.check.lost;
        if lost > 0 && row.report.acknowledged == row.report.sent {
            println!();
            println!(
                "{}: Mosquitto acknowledged every message, so the {} lost ones were dropped after the broker took them; Mosquitto drops QoS 1 messages for a subscriber whose queue is full.",
                row.store,
                thousands(lost)
            );
        }
        if row.wait != WaitOutcome::Reached {
            println!();
            println!(
                "{}: the server stopped storing before it had every message ({:?}).",
                row.store, row.wait
            );
        }
    }
}
