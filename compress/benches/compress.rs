//! Compressor benchmark: every variant of the shipped models, measured in tract and in
//! onnxruntime in the same run, next to onnxruntime's own `quantize_static`.
//!
//! ```sh
//! python3 -m venv target/ort && target/ort/bin/pip install -r models/requirements.txt
//! FLEET_ORT_PYTHON=target/ort/bin/python cargo bench -p fleet-compress --bench compress
//! ```
//!
//! Without `FLEET_ORT_PYTHON` (or a `python3` that imports onnxruntime) the onnxruntime
//! columns are left out and the table gives the reason. `FLEET_BENCH_MODELS=digit-cnn` limits
//! the run to some models. Latency is the median of single-sample runs on one thread,
//! and for tract also on all cores.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use fleet_compress::Recipe;
use fleet_compress::calibrate::CalibrationMethod;
use fleet_compress::fp16::Fp16Mode;
use fleet_compress::graph::OnnxModel;
use fleet_compress::samples::Samples;
use fleet_compress::variants::{Budget, Compute, Measured, QuantizeOptions, Workbench};

const MODELS: &[&str] = &["digit-cnn", "efficientnet-lite0"];
const LATENCY_RUNS: usize = 100;

struct Row {
    measured: Measured,
    path: PathBuf,
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let selected = std::env::var("FLEET_BENCH_MODELS").ok();
    let work = tempfile::tempdir()?;
    let python = std::env::var("FLEET_ORT_PYTHON").unwrap_or_else(|_| "python3".into());
    println!(
        "tract 0.23 ({}), 1 thread; onnxruntime through {python}",
        if cfg!(debug_assertions) {
            "debug build of our crates, optimised dependencies"
        } else {
            "release build"
        }
    );
    for name in MODELS {
        if selected
            .as_deref()
            .is_some_and(|s| !s.split(',').any(|m| m == *name))
        {
            continue;
        }
        let recipe = Recipe::read(&root.join("models").join(name).join("bundle.toml"))?;
        let workbench = Workbench::open(&recipe, false)?;
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let rows = variants(&workbench, &dir, *name == "digit-cnn")?;
        let peer = onnxruntime(&python, &workbench, &rows, &dir);
        print_table(name, &workbench, &rows, &peer);
    }
    Ok(())
}

fn variants(workbench: &Workbench, dir: &Path, with_mixed: bool) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut add = |variant: &str, model: &OnnxModel| -> anyhow::Result<()> {
        let measured = workbench.measure(variant, model, LATENCY_RUNS)?;
        let path = dir.join(format!("{variant}.onnx"));
        model.write(&path)?;
        rows.push(Row { measured, path });
        Ok(())
    };
    add("fp32", &workbench.float)?;
    let options = |compute| QuantizeOptions {
        method: CalibrationMethod::MinMax,
        compute,
        keep_float: Vec::new(),
        bias_correction: true,
    };
    let (weights, _) = workbench.quantize(&workbench.float, &options(Compute::Float))?;
    add("int8-weights", &weights)?;
    let (integer, _) = workbench.quantize(&workbench.float, &options(Compute::Integer))?;
    add("int8-integer", &integer)?;
    // Clipping the rare extremes of each activation leaves finer steps for the bulk:
    // on EfficientNet-Lite0 this gains a point of agreement over min-max.
    let mut percentile = options(Compute::Integer);
    percentile.method = CalibrationMethod::Percentile { percentile: 99.99 };
    let (clipped, _) = workbench.quantize(&workbench.float, &percentile)?;
    add("int8-p99.99", &clipped)?;
    let (pruned, _) = fleet_compress::prune::prune_channels(&workbench.float, 0.25)?;
    add("pruned-25%", &pruned)?;
    let (pruned_int8, _) = workbench.quantize(&pruned, &options(Compute::Integer))?;
    add("pruned+int8", &pruned_int8)?;
    let (half, _) = fleet_compress::fp16::convert(&workbench.float, Fp16Mode::Weights)?;
    add("fp16-weights", &half)?;
    if with_mixed {
        // Entropy calibration loses a point on the digit model; the search returns the
        // most sensitive layers to float until accuracy is back within 0.05 points.
        let float = rows[0].measured.clone();
        let budget = Budget {
            max_accuracy_drop: Some(0.05),
            min_agreement: None,
        };
        let mut entropy = options(Compute::Integer);
        entropy.method = CalibrationMethod::Entropy;
        let mixed = workbench.mixed_precision(
            &workbench.float,
            &entropy,
            &budget,
            &float,
            200,
            LATENCY_RUNS,
        )?;
        let measured = Measured {
            variant: "mixed-entropy".into(),
            ..mixed.result
        };
        let path = dir.join("mixed-entropy.onnx");
        mixed.model.write(&path)?;
        rows.push(Row { measured, path });
    }
    Ok(rows)
}

/// onnxruntime's results per variant (`fp32`, `ort-int8` and ours), and tract's own
/// measurement of onnxruntime's int8 file.
struct Peer {
    results: HashMap<String, serde_json::Value>,
    version: String,
    /// tract's measurements of onnxruntime's int8 file, or why it could not run it.
    tract_on_ort_int8: Result<Measured, String>,
}

fn onnxruntime(
    python: &str,
    workbench: &Workbench,
    rows: &[Row],
    dir: &Path,
) -> Result<Peer, String> {
    let run = || -> anyhow::Result<Peer> {
        let calibration = dir.join("calibration.f32");
        let comparison = dir.join("comparison.f32");
        write_f32(&calibration, &workbench.calibration)?;
        write_f32(&comparison, &workbench.comparison)?;
        let labelled = workbench.comparison.labels.iter().all(Option::is_some)
            && workbench.evaluation.as_ref().map(Samples::len) == Some(workbench.comparison.len());
        let labels = if labelled {
            let path = dir.join("labels.i64");
            let bytes: Vec<u8> = workbench
                .comparison
                .labels
                .iter()
                .flat_map(|label| (label.unwrap_or(0) as i64).to_le_bytes())
                .collect();
            std::fs::write(&path, bytes)?;
            Some(path)
        } else {
            None
        };
        let ort_int8 = dir.join("ort-int8.onnx");
        let others: HashMap<&str, &Path> = rows
            .iter()
            .skip(1)
            .map(|row| (row.measured.variant.as_str(), row.path.as_path()))
            .collect();
        let request = serde_json::json!({
            "float": rows[0].path,
            "input_shape": workbench.input_shape,
            "calibration": calibration,
            "evaluation": comparison,
            "labels": labels,
            "ort_int8": ort_int8,
            "others": others,
            "latency_runs": LATENCY_RUNS,
        });
        let request_path = dir.join("request.json");
        std::fs::write(&request_path, request.to_string())?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ort_peer.py");
        let output = Command::new(python)
            .arg(&script)
            .arg(&request_path)
            .output()
            .with_context(|| format!("failed to start {python}"))?;
        anyhow::ensure!(
            output.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let results = reply["results"]
            .as_object()
            .context("the reply has no results")?
            .iter()
            .map(|(variant, result)| (variant.clone(), result.clone()))
            .collect();
        let tract_on_ort_int8 = OnnxModel::read(&ort_int8)
            .map_err(anyhow::Error::from)
            .and_then(|model| workbench.measure("ort-int8", &model, LATENCY_RUNS))
            .map_err(|error| format!("{error:#}"));
        Ok(Peer {
            results,
            version: reply["onnxruntime"].as_str().unwrap_or("?").to_string(),
            tract_on_ort_int8,
        })
    };
    run().map_err(|error| format!("{error:#}"))
}

fn write_f32(path: &Path, samples: &Samples) -> anyhow::Result<()> {
    let bytes: Vec<u8> = samples
        .inputs
        .iter()
        .flatten()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    std::fs::write(path, bytes).with_context(|| format!("failed to write {}", path.display()))
}

#[allow(clippy::print_stdout)]
fn print_table(name: &str, workbench: &Workbench, rows: &[Row], peer: &Result<Peer, String>) {
    println!();
    println!(
        "{name}: top-1 on {} labelled samples; agreement with fp32 on {} ({})",
        workbench.evaluation.as_ref().map_or(0, Samples::len),
        workbench.comparison.len(),
        workbench.comparison.description
    );
    println!(
        "{:<14} {:>9} {:>7} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>9} {:>9}",
        "variant",
        "bytes",
        "size",
        "top-1",
        "agree",
        "tract ms",
        "vs fp32",
        "all cores",
        "ort ms",
        "ort agree",
        "tract/ort"
    );
    let float = &rows[0].measured;
    let mut all: Vec<&Measured> = rows.iter().map(|row| &row.measured).collect();
    if let Ok(Peer {
        tract_on_ort_int8: Ok(measured),
        ..
    }) = peer
    {
        all.push(measured);
    }
    for measured in all {
        let accuracy = measured
            .evaluation
            .and_then(|e| e.accuracy)
            .map_or("-".into(), |a| format!("{:.2}%", 100.0 * a));
        let ort = peer
            .as_ref()
            .ok()
            .and_then(|peer| peer.results.get(&measured.variant));
        let ort_ms = ort.and_then(|r| r["latency_ms_p50"].as_f64());
        let ort_agree = ort.and_then(|r| r["agreement"].as_f64());
        println!(
            "{:<14} {:>9} {:>6.3}x {:>8} {:>7.2}% {:>9.3} {:>7.2}x {:>9.3} {:>8} {:>9} {:>9}",
            measured.variant,
            measured.bytes,
            measured.bytes as f64 / float.bytes as f64,
            accuracy,
            100.0 * measured.comparison.top1_agreement,
            measured.latency_ms_p50,
            measured.latency_ms_p50 / float.latency_ms_p50,
            measured.latency_ms_p50_all_cores,
            ort_ms.map_or("-".into(), |v| format!("{v:.3}")),
            ort_agree.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            ort_ms.map_or("-".into(), |v| format!(
                "{:.2}x",
                measured.latency_ms_p50 / v
            )),
        );
    }
    match peer {
        Ok(peer) => println!(
            "onnxruntime {}: ort-int8 is quantize_static (QDQ, per-channel int8 weights, \
             uint8 activations, min-max) on the same calibration inputs",
            peer.version
        ),
        Err(reason) => println!("onnxruntime columns left out: {reason}"),
    }
    if let Ok(Peer {
        tract_on_ort_int8: Err(reason),
        ..
    }) = peer
    {
        println!("tract could not run onnxruntime's int8 file: {reason}");
    }
}
