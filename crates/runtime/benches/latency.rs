//! Single-sample latency of the shipped models in tract, next to onnxruntime's on the
//! same input tensor, printed as a table.
//!
//! ```sh
//! cargo bench -p fleet-runtime --bench latency
//! FLEET_ORT_PYTHON=/path/to/venv/bin/python cargo bench -p fleet-runtime --bench latency
//! ```
//!
//! Both runtimes use one thread and time `runs` single-sample inferences (default 200,
//! `FLEET_BENCH_RUNS` changes it) of the first input in `models/*/reference/` after 10
//! warm-up runs, and report the median. onnxruntime is measured by
//! `models/ort_eval.py` with the Python named by `FLEET_ORT_PYTHON`; without it that
//! column is left empty.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fleet_runtime::{Backend, Tensor, TractBackend};

const MODELS: [&str; 2] = ["digit-cnn", "efficientnet-lite0"];
const WARMUP_RUNS: usize = 10;

fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

/// Reads the first sample of a model's reference inputs and its shape with batch 1.
fn first_reference_input(model: &str) -> Tensor {
    let dir = models_dir().join(model).join("reference");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).expect("reference.json"))
            .expect("reference.json is JSON");
    let mut shape: Vec<usize> = reference["input_shape"]
        .as_array()
        .expect("input_shape")
        .iter()
        .map(|d| d.as_u64().expect("dimension") as usize)
        .collect();
    shape[0] = 1;
    let len: usize = shape.iter().product();
    let bytes =
        std::fs::read(dir.join(reference["input"].as_str().expect("input"))).expect("inputs");
    let data = bytes[..4 * len]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Tensor::new(shape, data).expect("reference shape matches its data")
}

fn tract_median_ms(model: &str, runs: usize) -> f64 {
    let input = first_reference_input(model);
    let path = models_dir().join(model).join(format!("{model}.onnx"));
    let mut backend = TractBackend::load_onnx(&path, &input.shape).expect("model loads");
    for _ in 0..WARMUP_RUNS {
        backend.run(input.clone()).expect("inference");
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let input = input.clone();
        let started = Instant::now();
        backend.run(input).expect("inference");
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Runs `models/ort_eval.py` and returns its median latency and onnxruntime version.
fn onnxruntime_median_ms(python: &str, model: &str, runs: usize) -> Result<(f64, String), String> {
    let script = models_dir().join("ort_eval.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(model)
        .args(["--runs", &runs.to_string()])
        .output()
        .map_err(|e| format!("failed to run {python}: {e}"))?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    // The script prints one Markdown row: | model | accuracy | correct/total | ms | version |
    let stdout = String::from_utf8_lossy(&output.stdout);
    let cells: Vec<&str> = stdout
        .lines()
        .last()
        .unwrap_or_default()
        .split('|')
        .map(str::trim)
        .collect();
    let median = cells
        .get(4)
        .and_then(|cell| cell.parse().ok())
        .ok_or_else(|| format!("unexpected output of ort_eval.py: {stdout}"))?;
    Ok((median, cells.get(5).unwrap_or(&"?").to_string()))
}

#[allow(clippy::print_stdout)]
fn main() {
    let runs = std::env::var("FLEET_BENCH_RUNS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(200usize)
        .max(1);
    let python = std::env::var("FLEET_ORT_PYTHON").ok();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("single-sample latency, 1 thread, median of {runs} runs, {profile} build");
    println!("| model | tract ms | onnxruntime ms | tract / onnxruntime |");
    println!("|---|---|---|---|");
    for model in MODELS {
        let tract = tract_median_ms(model, runs);
        let (ort, ratio) = match python
            .as_deref()
            .map(|p| onnxruntime_median_ms(p, model, runs))
        {
            Some(Ok((ms, version))) => (
                format!("{ms:.3} ({version})"),
                format!("{:.2}x", tract / ms),
            ),
            Some(Err(error)) => {
                eprintln!("onnxruntime measurement of {model} failed: {error}");
                ("failed".into(), "–".into())
            }
            None => ("not measured (set FLEET_ORT_PYTHON)".into(), "–".into()),
        };
        println!("| {model} | {tract:.3} | {ort} | {ratio} |");
    }
}
