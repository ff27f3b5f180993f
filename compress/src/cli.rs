//! Command-line interface of the compressor, shared by the `compress` binary and
//! `fleet compress`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use fleet_bundle::{Bundle, PublicKey, SecretKey, generate_key_pair};

use crate::calibrate::CalibrationMethod;
use crate::distill::{DistillOptions, DistillRecipe, distill};
use crate::fp16::{self, Fp16Mode};
use crate::quantize::LayerMode;
use crate::variants::{Budget, Compute, Measured, QuantizeOptions, Workbench, write_checked};
use crate::{BundleRuntime, Recipe, build_bundle, evaluate, inspect};
use crate::{pipeline, prune};

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
    /// Check a bundle's signature and the hash of every file, and run its self-test.
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
    /// Quantize a recipe's model to int8, compare it with the float model and write it.
    Quantize(QuantizeArgs),
    /// Prune a recipe's model, compare it with the float model and write it.
    Prune(PruneArgs),
    /// Convert a recipe's model to float16, compare it with the float32 model and write it.
    Fp16(Fp16Args),
    /// Run a recipe's [pipeline] (prune, fine-tune, quantize, fp16), check its budget and write a
    /// signed bundle with the measurements.
    Pipeline(PipelineArgs),
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

/// Arguments of `quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Recipe file with [calibration] data, such as models/digit-cnn/bundle.toml.
    pub recipe: PathBuf,
    /// ONNX file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Activation range method: min-max, entropy or percentile-P (such as percentile-99.99).
    #[arg(long, default_value = "min-max")]
    pub method: CalibrationMethod,
    /// Arithmetic of the quantized layers: integer (QLinearConv and MatMulInteger, run by
    /// the runtime's integer kernels) or float (i8 weights dequantized at load).
    #[arg(long, value_enum, default_value = "integer")]
    pub compute: Compute,
    /// Leave this Conv or Gemm node in float; repeatable.
    #[arg(long = "keep-float", value_name = "NODE")]
    pub keep_float: Vec<String>,
    /// Keep each int8 layer's bias as it is, without correcting it for the mean shift
    /// that rounding the weights to i8 causes.
    #[arg(long)]
    pub no_bias_correction: bool,
    /// Accuracy budget: largest top-1 drop on the evaluation set, in points. Layers are
    /// returned to float, most sensitive first, until it holds.
    #[arg(long)]
    pub max_accuracy_drop: Option<f64>,
    /// Accuracy budget: smallest top-1 agreement with fp32 on the comparison set, 0 to 1.
    #[arg(long)]
    pub min_agreement: Option<f64>,
    /// Comparison samples each layer's sensitivity is measured on.
    #[arg(long, default_value_t = 100)]
    pub sensitivity_samples: usize,
    /// Single-sample runs for the latency figure.
    #[arg(long, default_value_t = 50)]
    pub latency_runs: usize,
    /// Write the measurements and layer choices as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

/// Arguments of `prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Recipe file, such as models/digit-cnn/bundle.toml.
    pub recipe: PathBuf,
    /// ONNX file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Remove this fraction of each prunable layer's output channels (structured).
    #[arg(
        long,
        conflicts_with = "sparsity",
        required_unless_present = "sparsity"
    )]
    pub channels: Option<f64>,
    /// Zero this fraction of each layer's smallest weights (unstructured).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// Single-sample runs for the latency figure.
    #[arg(long, default_value_t = 50)]
    pub latency_runs: usize,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

/// Arguments of `fp16`.
#[derive(Debug, Args)]
pub struct Fp16Args {
    /// Recipe file, such as models/efficientnet-lite0/bundle.toml.
    pub recipe: PathBuf,
    /// ONNX file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// weights: float16 storage, float32 arithmetic; compute: float16 throughout.
    #[arg(long, value_enum, default_value = "weights")]
    pub mode: Fp16Mode,
    /// Single-sample runs for the latency figure.
    #[arg(long, default_value_t = 50)]
    pub latency_runs: usize,
    /// Do not draw progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

/// Arguments of `pipeline`.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Recipe file with a [pipeline] section, such as models/digit-cnn/bundle.toml.
    pub recipe: PathBuf,
    /// Secret key file written by `keygen`.
    #[arg(long)]
    pub key: PathBuf,
    /// Bundle folder to write; replaced if it exists. The report goes beside it as
    /// FOLDER.report.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Single-sample runs for each latency figure.
    #[arg(long, default_value_t = 50)]
    pub latency_runs: usize,
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
    /// Backend the bundle is written for: tract runs the ONNX model as it is, candle a
    /// safetensors conversion of it (digit CNN family only).
    #[arg(long, value_enum, default_value_t = BundleRuntime::Tract)]
    pub runtime: BundleRuntime,
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
            let bundle = build_bundle(
                &recipe,
                &key,
                &args.out,
                !args.skip_evaluation,
                args.runtime,
            )?;
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
            if bundle.manifest.self_test.is_some() {
                let format = bundle.manifest.model.format.clone();
                let report = fleet_runtime::run_self_test_with(&bundle, |path, shape| {
                    fleet_train::load_backend(&format, path, shape)
                })
                .with_context(|| format!("bundle {} failed its self-test", bundle.dir.display()))?;
                println!(
                    "ok: self-test reproduced {} reference outputs (largest difference {:.1e}, \
                     tolerance {:.1e})",
                    report.samples, report.worst_difference, report.tolerance
                );
            } else {
                println!("no self-test in this bundle");
            }
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
        Command::Quantize(args) => run_quantize(&args)?,
        Command::Prune(args) => run_prune(&args)?,
        Command::Fp16(args) => run_fp16(&args)?,
        Command::Pipeline(args) => {
            let recipe = Recipe::read(&args.recipe)?;
            let key = SecretKey::read(&args.key)
                .with_context(|| format!("failed to read secret key {}", args.key.display()))?;
            let (bundle, report) = pipeline::run_pipeline(
                &recipe,
                &key,
                &args.out,
                args.latency_runs,
                !args.no_progress,
            )?;
            println!("{}", measurement_header());
            let float = &report.measurements[0];
            for measured in &report.measurements {
                println!("{}", measurement_row(measured, float));
            }
            print_bundle(&bundle);
        }
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

#[allow(clippy::print_stdout)]
fn run_quantize(args: &QuantizeArgs) -> anyhow::Result<()> {
    let recipe = Recipe::read(&args.recipe)?;
    let workbench = Workbench::open(&recipe, !args.no_progress)?;
    let options = QuantizeOptions {
        method: args.method,
        compute: args.compute,
        keep_float: args.keep_float.clone(),
        bias_correction: !args.no_bias_correction,
    };
    let budget = Budget {
        max_accuracy_drop: args.max_accuracy_drop,
        min_agreement: args.min_agreement,
    };
    let float = workbench.measure("fp32", &workbench.float, args.latency_runs)?;
    let outcome = workbench.mixed_precision(
        &workbench.float,
        &options,
        &budget,
        &float,
        args.sensitivity_samples,
        args.latency_runs,
    )?;
    let bytes = write_checked(&workbench, &outcome.model, &args.out)?;
    println!("{}", measurement_header());
    println!("{}", measurement_row(&float, &float));
    println!("{}", measurement_row(&outcome.fully_quantized, &float));
    if let Some(violation) = &outcome.fully_quantized_violation {
        println!("{}", measurement_row(&outcome.result, &float));
        println!("int8 everywhere misses the budget: {violation}");
        println!("layer sensitivity (only that layer quantized), most sensitive first:");
        for sensitivity in &outcome.sensitivities {
            let kept = if outcome.kept_float.contains(&sensitivity.layer) {
                "kept float"
            } else {
                ""
            };
            println!(
                "  {:<28} mean KL {:>9.2e}  agreement {:>7.2}%  {kept}",
                sensitivity.layer,
                sensitivity.mean_kl,
                100.0 * sensitivity.top1_agreement
            );
        }
    }
    let report = &outcome.report;
    let count = |mode| report.layers.values().filter(|m| **m == mode).count();
    println!(
        "{} layers with int8 compute, {} with int8 weights and float compute, {} float; \
         calibrated with {} on {} samples ({}); {} degenerate weight channels, \
         {} bias-limited channels, {} constant activations",
        count(LayerMode::Int8),
        count(LayerMode::WeightOnly),
        count(LayerMode::Float),
        args.method,
        workbench.calibration.len(),
        workbench.calibration.description,
        report.degenerate_weight_channels,
        report.bias_limited_channels,
        report.degenerate_activations
    );
    if let Some(path) = &args.report {
        let json = serde_json::json!({
            "method": args.method.to_string(),
            "compute": options.compute,
            "calibration": workbench.calibration.description,
            "comparison": workbench.comparison.description,
            "float": float,
            "outcome": outcome,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("failed to write report {}", path.display()))?;
    }
    println!("wrote {} ({bytes} bytes)", args.out.display());
    Ok(())
}

#[allow(clippy::print_stdout)]
fn run_prune(args: &PruneArgs) -> anyhow::Result<()> {
    let recipe = Recipe::read(&args.recipe)?;
    let workbench = Workbench::open(&recipe, !args.no_progress)?;
    let (model, layers) = match (args.channels, args.sparsity) {
        (Some(fraction), _) => prune::prune_channels(&workbench.float, fraction)?,
        (None, Some(sparsity)) => prune::prune_unstructured(&workbench.float, sparsity)?,
        (None, None) => anyhow::bail!("give --channels or --sparsity"),
    };
    let float = workbench.measure("fp32", &workbench.float, args.latency_runs)?;
    let pruned = workbench.measure("pruned", &model, args.latency_runs)?;
    let bytes = write_checked(&workbench, &model, &args.out)?;
    println!("{}", measurement_header());
    println!("{}", measurement_row(&float, &float));
    println!("{}", measurement_row(&pruned, &float));
    let unit = if args.channels.is_some() {
        "output channels"
    } else {
        "non-zero weights"
    };
    for layer in &layers {
        println!(
            "  {:<28} {} -> {} {unit}",
            layer.layer, layer.before, layer.after
        );
    }
    if layers.is_empty() {
        println!("no layer could be pruned");
    }
    println!("wrote {} ({bytes} bytes)", args.out.display());
    Ok(())
}

#[allow(clippy::print_stdout)]
fn run_fp16(args: &Fp16Args) -> anyhow::Result<()> {
    let recipe = Recipe::read(&args.recipe)?;
    let workbench = Workbench::open(&recipe, !args.no_progress)?;
    let (model, report) = fp16::convert(&workbench.float, args.mode)?;
    let float = workbench.measure("fp32", &workbench.float, args.latency_runs)?;
    let half = workbench.measure("fp16", &model, args.latency_runs)?;
    let bytes = write_checked(&workbench, &model, &args.out)?;
    println!("{}", measurement_header());
    println!("{}", measurement_row(&float, &float));
    println!("{}", measurement_row(&half, &float));
    println!(
        "{} tensors converted; values clamped to +-65504: {:?}; non-zero values flushed to 0: {:?}",
        report.converted_tensors, report.clamped, report.flushed
    );
    println!("wrote {} ({bytes} bytes)", args.out.display());
    Ok(())
}

fn measurement_header() -> String {
    format!(
        "{:<10} {:>10} {:>7} {:>9} {:>10} {:>10} {:>11} {:>11}",
        "variant", "bytes", "size", "accuracy", "agreement", "mean KL", "p50 ms", "all cores"
    )
}

fn measurement_row(measured: &Measured, float: &Measured) -> String {
    let accuracy = measured
        .evaluation
        .and_then(|e| e.accuracy)
        .map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
    format!(
        "{:<10} {:>10} {:>6.3}x {:>9} {:>9.2}% {:>10.2e} {:>11.3} {:>11.3}",
        measured.variant,
        measured.bytes,
        measured.bytes as f64 / float.bytes as f64,
        accuracy,
        100.0 * measured.comparison.top1_agreement,
        measured.comparison.mean_kl,
        measured.latency_ms_p50,
        measured.latency_ms_p50_all_cores
    )
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
