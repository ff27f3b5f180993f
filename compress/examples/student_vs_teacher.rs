//! Compares the digit-cnn teacher with the distilled digit-student: trainable
//! parameters, file size, top-1 accuracy on the 10,000 MNIST test images and median
//! single-image latency in tract, all measured the way `compress evaluate` measures.
//!
//! ```sh
//! cargo run --release -p fleet-compress --example student_vs_teacher
//! ```
//!
//! Run `compress distill models/digit-student/distill.toml` first to create the
//! student.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_compress::{Recipe, evaluate, inspect};

/// One row of the comparison.
struct Measurement {
    name: String,
    parameters: usize,
    file_bytes: u64,
    top1: f64,
    latency_ms_p50: f64,
    measured_with: String,
}

fn measure(recipe_path: &Path) -> anyhow::Result<Measurement> {
    let recipe = Recipe::read(recipe_path)?;
    let set = recipe
        .evaluation
        .as_ref()
        .with_context(|| format!("{} has no [evaluation]", recipe_path.display()))?;
    let summary = inspect(&recipe.model)?;
    let model = fleet_train::import_onnx(&recipe.model, &fleet_train::Device::Cpu)
        .with_context(|| format!("failed to read the weights of {}", recipe.model.display()))?;
    let evaluation = evaluate(&recipe, set, &summary)?;
    Ok(Measurement {
        name: recipe.name.clone(),
        parameters: model.parameter_count(),
        file_bytes: summary.file_bytes,
        top1: evaluation.top1_accuracy(),
        latency_ms_p50: evaluation.latency_ms_p50,
        measured_with: evaluation.measured_with,
    })
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let models = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models");
    let rows = [
        measure(&models.join("digit-cnn/bundle.toml"))?,
        measure(&models.join("digit-student/bundle.toml")).context(
            "run `compress distill models/digit-student/distill.toml` to create the student",
        )?,
    ];
    println!("| model | parameters | file bytes | top-1 (MNIST test) | p50 latency, 1 image |");
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!(
            "| {} | {} | {} | {:.2}% | {:.3} ms |",
            row.name,
            row.parameters,
            row.file_bytes,
            100.0 * row.top1,
            row.latency_ms_p50
        );
    }
    let (teacher, student) = (&rows[0], &rows[1]);
    println!(
        "student / teacher: {:.3}x parameters, {:.3}x file size, {:.2}x latency; measured with {}",
        student.parameters as f64 / teacher.parameters as f64,
        student.file_bytes as f64 / teacher.file_bytes as f64,
        student.latency_ms_p50 / teacher.latency_ms_p50,
        student.measured_with
    );
    Ok(())
}
