//! A replica: one worker process that serves a signed bundle's model over Open
//! Inference Protocol v2 REST with dynamic batching. The gateway's autoscaler starts
//! and stops replicas (`fleet replica`, or the `fleet-replica` binary). Replicas also
//! run on their own, for example as pods behind a Kubernetes Service that the gateway
//! lists as an external backend.
//!
//! On start a replica verifies the bundle's signature and file hashes with the public
//! key, prepares the model, binds `--listen` and prints `{"listening":"ADDRESS"}` as its
//! first line of standard output. SIGTERM, SIGINT, or with `--exit-on-stdin-close` the
//! end of standard input, make it report not ready, finish the requests it has and exit.

pub mod batcher;
pub mod http;
pub mod metrics;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleet_bundle::{Bundle, PublicKey};
use tokio::io::AsyncReadExt;

use crate::gateway::oip::ModelMetadata;
use crate::logging::LogFormat;

/// Flags of `fleet replica`.
#[derive(Debug, Clone, Args)]
pub struct ReplicaArgs {
    /// Folder of the signed bundle to serve.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Public key the bundle's signature is checked with.
    #[arg(long)]
    pub public_key: PathBuf,
    /// Name to serve the model under [default: the bundle's model name].
    #[arg(long)]
    pub model_name: Option<String>,
    /// Address to listen on; port 0 picks a free one, printed on standard output.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Most samples one model run takes.
    #[arg(long, default_value_t = 8)]
    pub max_batch_size: usize,
    /// Maximum time a request waits for others to join its batch, in microseconds.
    #[arg(long, default_value_t = 2000)]
    pub max_queue_delay_microseconds: u64,
    /// Maximum requests queued for batching; further requests get 503.
    #[arg(long, default_value_t = 1024)]
    pub max_queue_size: usize,
    /// Most samples (first dimension) one request may carry.
    #[arg(long, default_value_t = 64)]
    pub max_batch_per_request: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Stop when standard input closes, as the gateway's replicas do, so they never
    /// outlive it.
    #[arg(long)]
    pub exit_on_stdin_close: bool,
    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Serves the model until a stop signal, then finishes in-flight requests.
pub async fn run(args: ReplicaArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.max_batch_size > 0,
        "--max-batch-size must be at least 1"
    );
    anyhow::ensure!(
        args.max_queue_size > 0,
        "--max-queue-size must be at least 1"
    );
    let key = PublicKey::read(&args.public_key)
        .with_context(|| format!("failed to read public key {}", args.public_key.display()))?;
    let bundle = Bundle::open_verified(&args.bundle, &key)
        .with_context(|| format!("bundle {} failed verification", args.bundle.display()))?;
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| bundle.manifest.name.clone());
    let mut metadata = ModelMetadata::from_manifest(&name, &bundle.manifest);
    // The tract backend returns the model's first output only.
    metadata.outputs.truncate(1);
    let sample_shape = sample_shape(&metadata)?;

    let metrics = Arc::new(metrics::ReplicaMetrics::new());
    let config = batcher::BatchingConfig {
        max_batch_size: args.max_batch_size,
        max_queue_delay: Duration::from_micros(args.max_queue_delay_microseconds),
        max_queue_size: args.max_queue_size,
    };
    let model_path = bundle.path_of(&bundle.manifest.model.path);
    let batcher_metrics = metrics.clone();
    let batcher = tokio::task::spawn_blocking(move || {
        batcher::Batcher::start(&model_path, &sample_shape, config, batcher_metrics)
    })
    .await
    .context("model preparation panicked")?
    .context("failed to prepare the model")?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let ready = Arc::new(AtomicBool::new(true));
    let state = http::ReplicaState {
        metadata: Arc::new(metadata),
        batcher: Arc::new(batcher),
        metrics,
        ready: ready.clone(),
        max_batch_per_request: args.max_batch_per_request,
        max_body_bytes: args.max_body_bytes,
    };
    let app = http::router(state);
    announce(address)?;
    tracing::info!(%address, model = %name, max_batch_size = args.max_batch_size, "replica serving");

    let exit_on_stdin_close = args.exit_on_stdin_close;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            wait_for_stop(exit_on_stdin_close).await;
            ready.store(false, Ordering::SeqCst);
            tracing::info!("replica stopping after its in-flight requests");
        })
        .await
        .context("HTTP server failed")?;
    tracing::info!("replica stopped");
    Ok(())
}

/// Returns the shape of one sample: the declared input shape without its batch
/// dimension, which must be fully known.
fn sample_shape(metadata: &ModelMetadata) -> anyhow::Result<Vec<usize>> {
    let [input] = metadata.inputs.as_slice() else {
        anyhow::bail!(
            "replicas run models with exactly one input; this one has {}",
            metadata.inputs.len()
        );
    };
    anyhow::ensure!(
        input.datatype == "FP32",
        "input {:?} has datatype {}; only FP32 inputs are supported",
        input.name,
        input.datatype
    );
    anyhow::ensure!(
        input.shape.len() >= 2 && input.shape[1..].iter().all(|&d| d > 0),
        "input {:?} has shape {:?}; every dimension but the first (batch) must be fixed",
        input.name,
        input.shape
    );
    Ok(input.shape[1..].iter().map(|&d| d as usize).collect())
}

/// Prints the listening address as the first line of standard output.
fn announce(address: SocketAddr) -> anyhow::Result<()> {
    let line = serde_json::json!({ "listening": address.to_string() });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("failed to write the address to standard output")?;
    stdout
        .flush()
        .context("failed to write the address to standard output")?;
    Ok(())
}

/// Waits for SIGTERM, SIGINT, or the end of standard input when `stdin_closes` is set.
async fn wait_for_stop(stdin_closes: bool) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "failed to listen for SIGTERM");
                return;
            }
        };
    let stdin_closed = async {
        if !stdin_closes {
            return std::future::pending::<()>().await;
        }
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 64];
        while let Ok(read) = stdin.read(&mut buffer).await {
            if read == 0 {
                break;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        _ = stdin_closed => {}
    }
}
