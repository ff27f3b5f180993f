//! Compares the digit-cnn teacher with the distilled digit-student: trainable
//! parameters, file size, top-1 accuracy on the 10,000 MNIST test images and median
//! single-image latency in tract and in candle, measured the way `compress evaluate`
//! measures, next to onnxruntime's accuracy and latency on the same ONNX files.
//!
//! ```sh
//! FLEET_ORT_PYTHON=/path/to/venv/bin/python \
//!     cargo run --release -p fleet-compress --example student_vs_teacher
//! ```
//!
//! `FLEET_ORT_PYTHON` names a Python with `models/requirements.txt` installed; without it
//! the onnxruntime columns read "not measured". Run `compress distill
//! models/digit-student/distill.toml` first if the student is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use fleet_compress::{Recipe, evaluate, evaluate_model, inspect};

/// Timed single-image runs in onnxruntime, as many as the recipes' `latency_runs`.
const ORT_RUNS: usize = 300;

/// One row of the comparison.
struct Measurement {
    name: String,
    parameters: usize,
    file_bytes: u64,
    tract_top1: f64,
    tract_ms: f64,
    candle_top1: f64,
    candle_ms: f64,
    /// onnxruntime's top-1, median latency and version, when measured.
    ort: Option<(f64, f64, String)>,
    measured_with: String,
}

fn measure(recipe_path: &Path, python: Option<&str>) -> anyhow::Result<Measurement> {
    let recipe = Recipe::read(recipe_path)?;
    let set = recipe
        .evaluation
        .as_ref()
        .with_context(|| format!("{} has no [evaluation]", recipe_path.display()))?;
    let summary = inspect(&recipe.model)?;
    let model = fleet_train::import_onnx(&recipe.model, &fleet_train::Device::Cpu)
        .with_context(|| format!("failed to read the weights of {}", recipe.model.display()))?;
    let tract = evaluate(&recipe, set, &summary)?;

    let scratch = tempfile::tempdir()?;
    let converted = scratch.path().join("model.safetensors");
    fleet_train::save_model(&converted, &model)?;
    let candle = evaluate_model(
        &recipe,
        set,
        &summary,
        &converted,
        fleet_train::SAFETENSORS_FORMAT,
    )?;

    let ort = match python {
        Some(python) => Some(onnxruntime(python, &recipe.name)?),
        None => None,
    };
    Ok(Measurement {
        name: recipe.name.clone(),
        parameters: model.parameter_count(),
        file_bytes: summary.file_bytes,
        tract_top1: tract.top1_accuracy(),
        tract_ms: tract.latency_ms_p50,
        candle_top1: candle.top1_accuracy(),
        candle_ms: candle.latency_ms_p50,
        ort,
        measured_with: format!("{}; {}", tract.measured_with, candle.measured_with),
    })
}

/// Runs `models/ort_eval.py` for `model` and returns onnxruntime's top-1, median
/// single-image latency in ms (1 thread) and version.
fn onnxruntime(python: &str, model: &str) -> anyhow::Result<(f64, f64, String)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/ort_eval.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(model)
        .args(["--runs", &ORT_RUNS.to_string()])
        .output()
        .with_context(|| format!("failed to run {python}"))?;
    if !output.status.success() {
        bail!(
            "{} {model} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // One Markdown row: | model | accuracy | correct/total | median ms | version |
    let stdout = String::from_utf8_lossy(&output.stdout);
    let cells: Vec<&str> = stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split('|')
        .map(str::trim)
        .collect();
    let parse = |index: usize| -> anyhow::Result<f64> {
        cells
            .get(index)
            .map(|cell| cell.trim_end_matches('%'))
            .and_then(|cell| cell.parse().ok())
            .with_context(|| format!("unexpected output of ort_eval.py: {stdout}"))
    };
    let version = cells.get(5).copied().unwrap_or("?").to_string();
    Ok((parse(2)? / 100.0, parse(4)?, version))
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    let python = std::env::var("FLEET_ORT_PYTHON").ok();
    let rows = [
        measure(&models.join("digit-cnn/bundle.toml"), python.as_deref())?,
        measure(&models.join("digit-student/bundle.toml"), python.as_deref()).context(
            "run `compress distill models/digit-student/distill.toml` to create the student",
        )?,
    ];
    println!(
        "| model | parameters | file bytes | top-1 tract | top-1 candle | top-1 onnxruntime \
         | p50 tract | p50 candle | p50 onnxruntime | tract / onnxruntime |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let (ort_top1, ort_ms, ratio) = match &row.ort {
            Some((top1, ms, version)) => (
                format!("{:.2}%", 100.0 * top1),
                format!("{ms:.3} ms ({version})"),
                format!("{:.2}x", row.tract_ms / ms),
            ),
            None => (
                "not measured".to_string(),
                "not measured".to_string(),
                "–".to_string(),
            ),
        };
        println!(
            "| {} | {} | {} | {:.2}% | {:.2}% | {ort_top1} | {:.3} ms | {:.3} ms | {ort_ms} | {ratio} |",
            row.name,
            row.parameters,
            row.file_bytes,
            100.0 * row.tract_top1,
            100.0 * row.candle_top1,
            row.tract_ms,
            row.candle_ms,
        );
    }
    let (teacher, student) = (&rows[0], &rows[1]);
    println!(
        "student / teacher: {:.3}x parameters, {:.3}x file size, {:.2}x latency in tract, \
         {:.2}x in candle",
        student.parameters as f64 / teacher.parameters as f64,
        student.file_bytes as f64 / teacher.file_bytes as f64,
        student.tract_ms / teacher.tract_ms,
        student.candle_ms / teacher.candle_ms,
    );
    println!("measured with {}", student.measured_with);
    Ok(())
}
