//! Command-line interface of the compressor, shared by the `compress` binary and
//! `fleet compress`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use fleet_bundle::{Bundle, PublicKey, SecretKey, generate_key_pair};

use crate::distill::{DistillOptions, DistillRecipe, distill};
use crate::{Recipe, build_bundle, evaluate, inspect};

/// Compressor commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print an ONNX model's operators, parameter count, size, inputs and outputs.
    Inspect {
        /// ONNX file.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an ed25519 key pair: DIR/fleet.key (secret) and DIR/fleet.pub.
    Keygen {
        /// Folder for the two key files; created if missing.
        #[arg(long, default_value = "keys")]
        out: PathBuf,
    },
    /// Measure a recipe's model and write a signed bundle.
    Bundle(BundleArgs),
    /// Check a bundle's signature and the hash of every file.
    Verify {
        /// Bundle folder.
        bundle: PathBuf,
        /// Public key file written by `keygen`.
        #[arg(long)]
        public_key: PathBuf,
    },
    /// Measure a recipe's model on its evaluation data without writing a bundle.
    Evaluate {
        /// Recipe file, such as models/digit-cnn/bundle.toml.
        recipe: PathBuf,
    },
    /// Train a small student from a teacher model (distillation), export it as ONNX
    /// and check the export in tract.
    Distill(DistillArgs),
}

/// Arguments of `distill`.
#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Recipe file, such as models/digit-student/distill.toml.
    pub recipe: PathBuf,
    /// Continue from the latest checkpoint in the recipe's work folder.
    #[arg(long)]
    pub resume: bool,
    /// Number of epochs, replacing the recipe's training.epochs.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

/// Arguments of `bundle`.
#[derive(Debug, Args)]
pub struct BundleArgs {
    /// Recipe file, such as models/digit-cnn/bundle.toml.
    pub recipe: PathBuf,
    /// Secret key file written by `keygen`.
    #[arg(long)]
    pub key: PathBuf,
    /// Bundle folder to write; replaced if it exists.
    #[arg(long)]
    pub out: PathBuf,
    /// Skip measuring accuracy and latency, leaving them out of the manifest.
    #[arg(long)]
    pub skip_evaluation: bool,
}

/// Runs one compressor command, printing its result on standard output.
#[allow(clippy::print_stdout)]
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Inspect { model, json } => {
            let summary = inspect(&model)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{summary}");
            }
        }
        Command::Keygen { out } => {
            let (secret, public) = write_key_pair(&out)?;
            drop(secret);
            println!(
                "wrote {} and {} (fingerprint {})",
                out.join("fleet.key").display(),
                out.join("fleet.pub").display(),
                public.fingerprint()
            );
        }
        Command::Bundle(args) => {
            let recipe = Recipe::read(&args.recipe)?;
            let key = SecretKey::read(&args.key)
                .with_context(|| format!("failed to read secret key {}", args.key.display()))?;
            let bundle = build_bundle(&recipe, &key, &args.out, !args.skip_evaluation)?;
            print_bundle(&bundle);
        }
        Command::Verify { bundle, public_key } => {
            let key = PublicKey::read(&public_key)?;
            let bundle = Bundle::open_verified(&bundle, &key)
                .with_context(|| format!("bundle {} failed verification", bundle.display()))?;
            println!(
                "ok: signature and {} files verified",
                bundle.manifest.files.len()
            );
            print_bundle(&bundle);
        }
        Command::Evaluate { recipe } => {
            let recipe = Recipe::read(&recipe)?;
            let set = recipe
                .evaluation
                .as_ref()
                .context("the recipe has no [evaluation] section")?;
            let summary = inspect(&recipe.model)?;
            let result = evaluate(&recipe, set, &summary)?;
            println!(
                "{}: top-1 {:.2}% ({} of {} on {}), p50 latency {:.3} ms ({})",
                recipe.name,
                100.0 * result.top1_accuracy(),
                result.correct,
                result.samples,
                set.description,
                result.latency_ms_p50,
                result.measured_with
            );
        }
        Command::Distill(args) => run_distill(&args)?,
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
fn run_distill(args: &DistillArgs) -> anyhow::Result<()> {
    let recipe = DistillRecipe::read(&args.recipe)?;
    let options = DistillOptions {
        resume: args.resume,
        epochs: args.epochs,
        show_progress: !args.no_progress,
    };
    let outcome = distill(&recipe, &options)?;
    let report = &outcome.report;
    if let Some(path) = &report.resumed_from {
        println!("resumed from {}", path.display());
    }
    if report.epochs.is_empty() {
        println!(
            "no epochs left to train: the latest checkpoint has reached the {} epochs requested",
            args.epochs.unwrap_or(recipe.training.epochs)
        );
    } else {
        println!("epoch  step    loss    train    test     lr        elapsed");
    }
    for epoch in &report.epochs {
        println!(
            "{:>5} {:>6} {:>7.4} {:>7.2}% {:>7.2}% {:>9.2e} {:>8.1} s",
            epoch.epoch,
            epoch.step,
            epoch.loss,
            100.0 * epoch.train_accuracy,
            100.0 * epoch.test_accuracy,
            epoch.learning_rate,
            epoch.elapsed_seconds
        );
    }
    println!(
        "student {}: {} parameters, top-1 {:.2}% on {} test images, trained in {:.1} s",
        recipe.name,
        outcome.model.parameter_count(),
        100.0 * report.test_accuracy,
        recipe
            .data
            .test_limit
            .map_or("all".to_string(), |n| n.to_string()),
        report.elapsed_seconds
    );
    println!(
        "wrote {} ({} bytes); tract agrees with candle within {:.2e} on {} images",
        outcome.export.path.display(),
        outcome.export.bytes,
        outcome.export.max_abs_diff,
        outcome.export.checked_images
    );
    println!("training log {}", outcome.log_path.display());
    Ok(())
}

/// Writes `fleet.key` and `fleet.pub` into `dir`, refusing to replace an existing key.
pub fn write_key_pair(dir: &Path) -> anyhow::Result<(SecretKey, PublicKey)> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let (secret, public) = generate_key_pair()?;
    let secret_path = dir.join("fleet.key");
    secret.write(&secret_path).with_context(|| {
        format!(
            "failed to write {}; an existing key is never replaced",
            secret_path.display()
        )
    })?;
    public.write(&dir.join("fleet.pub"))?;
    Ok((secret, public))
}

#[allow(clippy::print_stdout)]
fn print_bundle(bundle: &Bundle) {
    let manifest = &bundle.manifest;
    println!(
        "bundle   {} ({} {})",
        bundle.dir.display(),
        manifest.name,
        manifest.version
    );
    for file in &manifest.files {
        println!(
            "  {:<12} {:>10} bytes  sha256 {}",
            file.path, file.size, file.sha256
        );
    }
    if let Some(metrics) = &manifest.metrics {
        println!(
            "measured top-1 {:.2}% on {} ({} samples), p50 latency {:.3} ms ({})",
            100.0 * metrics.top1_accuracy,
            metrics.dataset,
            metrics.samples,
            metrics.latency_ms_p50,
            metrics.measured_with
        );
    }
}
