//! `fleet demo`: a whole fleet on one machine.
//!
//! Builds and signs the bundle of a shipped model and starts the fleet server with its
//! embedded broker and a SQLite file. Then it starts device agents as child processes of
//! this binary, each on its own shard of the model's data set. Ctrl-C stops the agents
//! (they publish their last telemetry and an offline status) and then the server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use fleet_bundle::SecretKey;
use fleet_server::access::admin::write_secret;
use fleet_server::access::{provision, set_operator_password};
use fleet_server::broker::ClientAccess;
use fleet_server::store::access::CredentialRole;
use fleet_server::{BrokerMode, Server, ServerConfig};
use tokio::process::{Child, Command};

/// Seconds between two fleet summary lines.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(5);
/// How long agents get to send their last telemetry after SIGTERM.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags of `fleet demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Shipped model to run.
    #[arg(long, value_enum, default_value_t = DemoModel::DigitCnn)]
    model: DemoModel,
    /// Number of device agents.
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// Inferences per second per device; 0 runs as fast as the model allows.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Seconds between telemetry messages.
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// Address for the console; a free port is used when it is taken.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Folder with the shipped models and data [default: models, or the source tree's
    /// models folder when run from elsewhere].
    #[arg(long)]
    models: Option<PathBuf>,
    /// Folder for keys, bundles, the database and agent state; reused across runs.
    #[arg(long, default_value = ".fleet-demo")]
    work_dir: PathBuf,
}

/// Models the demo can run.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum DemoModel {
    /// Handwritten digits (MNIST test set, 10,000 labelled images).
    DigitCnn,
    /// ImageNet photos (20 labelled images shipped with foolbox).
    EfficientnetLite0,
}

impl DemoModel {
    fn folder(self) -> &'static str {
        match self {
            DemoModel::DigitCnn => "digit-cnn",
            DemoModel::EfficientnetLite0 => "efficientnet-lite0",
        }
    }

    /// Returns the input and label flags an agent gets for this model's data.
    fn input_args(self, models: &Path) -> Vec<String> {
        let path = |relative: &str| models.join(relative).display().to_string();
        match self {
            DemoModel::DigitCnn => vec![
                "--input".into(),
                path("mnist/t10k-images-idx3-ubyte.gz"),
                "--labels".into(),
                path("mnist/t10k-labels-idx1-ubyte.gz"),
            ],
            DemoModel::EfficientnetLite0 => {
                vec!["--input".into(), path("efficientnet-lite0/images")]
            }
        }
    }
}

/// Runs the demo until Ctrl-C.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(args.rate.is_finite() && args.rate >= 0.0) {
        bail!(
            "invalid --rate {}: expected inferences per second, 0 or more",
            args.rate
        );
    }
    if !(args.interval.is_finite() && (0.05..=3600.0).contains(&args.interval)) {
        bail!(
            "invalid --interval {}: expected 0.05 to 3600 seconds",
            args.interval
        );
    }
    let models = find_models(args.models.as_deref())?;
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("failed to create {}", args.work_dir.display()))?;
    let work_dir = args.work_dir.canonicalize()?;

    let (key, public_key) = demo_keys(&work_dir.join("keys"))?;
    let recipe_path = models.join(args.model.folder()).join("bundle.toml");
    let recipe = fleet_compress::Recipe::read(&recipe_path)?;
    let bundle_dir = work_dir.join("bundles").join(&recipe.name);
    println!("building and measuring bundle {} ...", bundle_dir.display());
    let bundle = tokio::task::block_in_place(|| {
        fleet_compress::build_bundle(
            &recipe,
            &key,
            &bundle_dir,
            true,
            fleet_compress::BundleRuntime::Tract,
        )
    })?;
    if let Some(metrics) = &bundle.manifest.metrics {
        println!(
            "bundle {} {}: top-1 {:.2}% on {}, p50 latency {:.2} ms ({})",
            bundle.manifest.name,
            bundle.manifest.version,
            100.0 * metrics.top1_accuracy,
            metrics.dataset,
            metrics.latency_ms_p50,
            metrics.measured_with
        );
    }

    let server = Server::start(ServerConfig {
        http_listen: free_or_given(args.http).await,
        broker: BrokerMode::Embedded {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            access: ClientAccess::Credentials,
        },
        // One database per model, so a work folder reused with another model does not
        // mix the two fleets' totals.
        database: work_dir
            .join(format!("fleet-{}.db", recipe.name))
            .display()
            .to_string(),
        mqtt_client_id: format!("fleet-demo-{}", std::process::id()),
        shared_group: None,
        // The embedded broker lives and dies with the demo, so there is no session
        // worth resuming.
        clean_session: true,
        mqtt_credentials: None,
        telemetry_retention: None,
        updates: Default::default(),
        samples: Default::default(),
    })
    .await?;

    let operator_password = demo_operator(&server, &work_dir).await?;
    let mut agents = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let device_id = format!("demo-{}", index + 1);
        let secret_file = work_dir
            .join("credentials")
            .join(format!("{device_id}.secret"));
        let secret = provision(&server.store, &device_id, CredentialRole::Device, true).await?;
        write_secret(&secret_file, &secret)?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("device")
            .args(["--device-id", &device_id])
            .args(["--broker", &format!("mqtt://{}", server.mqtt_addr)])
            .args(["--username", &device_id])
            .arg("--password-file")
            .arg(&secret_file)
            .arg("--bundle")
            .arg(&bundle_dir)
            .arg("--public-key")
            .arg(&public_key)
            .args(args.model.input_args(&models))
            .args(["--shard", &format!("{index}/{}", args.devices)])
            .args(["--rate", &args.rate.to_string()])
            .args(["--interval", &args.interval.to_string()])
            .arg("--state-dir")
            .arg(work_dir.join("state").join(&recipe.name).join(&device_id))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        exit_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start agent {device_id}"))?;
        agents.push((device_id, child));
    }
    println!(
        "{} agents running {}; console: http://{}/ (log in as {DEMO_OPERATOR}, password {}; \
         Ctrl-C stops everything)",
        args.devices, bundle.manifest.name, server.http_addr, operator_password,
    );

    let outcome = watch_fleet(&server, &mut agents).await;
    stop_agents(&mut agents).await;
    wait_for_offline(&server, args.devices).await;
    server.shutdown().await;
    outcome
}

/// Console login of the demo's operator.
const DEMO_OPERATOR: &str = "admin";

/// Creates the demo's operator with the password kept in the work folder, making a
/// random one on the first run.
async fn demo_operator(server: &Server, work_dir: &Path) -> anyhow::Result<String> {
    let path = work_dir.join("credentials").join("operator-password");
    if !path.exists() {
        write_secret(&path, &fleet_server::access::new_secret()?)?;
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("failed to read {}", path.display()))?;
    let password = text.trim().to_owned();
    set_operator_password(&server.store, DEMO_OPERATOR, &password)
        .await
        .with_context(|| format!("invalid demo operator password in {}", path.display()))?;
    Ok(password)
}

/// Prints a summary line every few seconds until SIGINT (Ctrl-C) or SIGTERM, or fails
/// if an agent exits.
async fn watch_fleet(server: &Server, agents: &mut [(String, Child)]) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    let mut ticker = tokio::time::interval(SUMMARY_INTERVAL);
    ticker.tick().await;
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                result?;
                println!("stopping ...");
                return Ok(());
            }
            _ = terminate.recv() => {
                println!("stopping ...");
                return Ok(());
            }
            _ = ticker.tick() => {
                for (device_id, child) in agents.iter_mut() {
                    if let Some(status) = child.try_wait()? {
                        bail!("agent {device_id} exited with {status}; its log is above");
                    }
                }
                let devices = server.store.devices(fleet_server::unix_millis(), fleet_server::api::LIVE_WINDOW).await?;
                println!("{}", summary_line(&fleet_server::api::summarize(&devices, &server.metrics)));
            }
        }
    }
}

fn summary_line(summary: &fleet_server::api::FleetSummary) -> String {
    let accuracy = summary
        .accuracy
        .map_or_else(|| "–".into(), |a| format!("{:.2}%", 100.0 * a));
    let p95 = summary
        .worst_latency_p95_ms
        .map_or_else(|| "–".into(), |ms| format!("{ms:.2} ms"));
    format!(
        "fleet: {}/{} online · {} inferences · {:.1}/s · accuracy {accuracy} · worst p95 {p95} · {} messages stored, {} gaps",
        summary.online,
        summary.devices,
        summary.inferences,
        summary.throughput,
        summary.telemetry_stored,
        summary.gaps
    )
}

/// Sends SIGTERM to every agent and waits for them, killing any that hang.
async fn stop_agents(agents: &mut [(String, Child)]) {
    for (_, child) in agents.iter() {
        if let Some(pid) = child.id() {
            terminate(pid);
        }
    }
    for (device_id, child) in agents.iter_mut() {
        match tokio::time::timeout(AGENT_STOP_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => tracing::debug!(device_id, %status, "agent stopped"),
            Ok(Err(error)) => tracing::warn!(device_id, %error, "waiting for agent failed"),
            Err(_) => {
                tracing::warn!(device_id, "agent did not stop in time, killing it");
                let _ = child.kill().await;
            }
        }
    }
}

/// Waits until the server has stored every agent's offline status, which each agent
/// sends after its last telemetry, so the database contains everything they measured.
async fn wait_for_offline(server: &Server, agents: usize) {
    let deadline = tokio::time::Instant::now() + AGENT_STOP_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        let now = fleet_server::unix_millis();
        if let Ok(devices) = server
            .store
            .devices(now, fleet_server::api::LIVE_WINDOW)
            .await
        {
            let offline = devices
                .iter()
                .filter(|d| d.id.starts_with("demo-") && d.state == "offline")
                .count();
            if offline >= agents {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!("not every agent's offline status reached the server");
}

/// Sends SIGTERM to a child process.
#[allow(unsafe_code)]
fn terminate(pid: u32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of this process. The
    // pid belongs to a child that has not been reaped yet, so it cannot name another
    // process.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

/// Asks the kernel to send SIGTERM to the child when this process dies, so killing the
/// demo outright leaves no agent behind.
#[allow(unsafe_code)]
fn exit_with_parent(command: &mut Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Returns the models folder: `given` when set, else `models` in the working folder or
/// in this source tree.
fn find_models(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let candidates = match given {
        Some(path) => vec![path.to_path_buf()],
        None => vec![
            PathBuf::from("models"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("models"),
        ],
    };
    let given = given.unwrap_or(Path::new("models"));
    candidates
        .iter()
        .find(|path| path.join("mnist").is_dir())
        .map(|path| path.canonicalize())
        .transpose()?
        .with_context(|| {
            format!(
                "models folder not found at {}; run the demo from the repository root or pass --models",
                given.display()
            )
        })
}

/// Reads the demo's signing key, creating a key pair on the first run.
fn demo_keys(dir: &Path) -> anyhow::Result<(SecretKey, PathBuf)> {
    let secret_path = dir.join("fleet.key");
    let public_path = dir.join("fleet.pub");
    if secret_path.exists() {
        let secret = SecretKey::read(&secret_path)?;
        secret.public_key().write(&public_path)?;
        return Ok((secret, public_path));
    }
    let (secret, _) = fleet_compress::cli::write_key_pair(dir)?;
    Ok((secret, public_path))
}

/// Returns `address` when it can be bound now, otherwise the same host with port 0.
async fn free_or_given(address: SocketAddr) -> SocketAddr {
    match tokio::net::TcpListener::bind(address).await {
        Ok(_) => address,
        Err(_) => {
            println!("{address} is in use; the console takes a free port instead");
            SocketAddr::new(address.ip(), 0)
        }
    }
}
