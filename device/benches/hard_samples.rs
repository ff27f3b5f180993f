//! Hard-sample capture benchmark: what `Capture::offer` costs the inference thread, with
//! and without a token in the bucket, and how long the writer thread takes to encode and
//! durably store one MNIST-sized digit.
//!
//! ```sh
//! cargo bench --workspace --bench hard_samples --profile dev
//! ```
//!
//! The dev profile builds the dependencies optimised (the workspace sets opt-level 3 for
//! them) and this crate without optimisation, as the agent's own debug build runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet_bundle::{Postprocessing, TensorSpec};
use fleet_device::hard_samples::{HardSampleOptions, HardSamples};
use fleet_device::model::ModelInfo;
use fleet_runtime::{Sample, SampleData};

/// Offers timed while the bucket is empty.
const LIMITED_OFFERS: usize = 20_000;
/// Rounds of queued offers. Each round queues fewer samples than the queue's capacity
/// and then waits for the writer, so no offer finds the queue full.
const ROUNDS: usize = 40;
const OFFERS_PER_ROUND: usize = 8;

fn main() {
    let model = model();
    let dir = tempfile::tempdir().expect("temporary folder");

    let limited = time_limited_offers(dir.path(), &model);
    let (queued, stored) = time_queued_offers(dir.path(), &model);
    println!("| step | samples | median | mean |");
    println!("|---|--:|--:|--:|");
    print_row("offer, no token (inference thread)", &limited);
    print_row("offer, token taken and queued (inference thread)", &queued);
    print_row("encode PNG and store with fsync (writer thread)", &stored);
}

/// Times offers after the only token of a 1-per-minute bucket is spent.
fn time_limited_offers(root: &std::path::Path, model: &ModelInfo) -> Vec<Duration> {
    let options = HardSampleOptions {
        rate_per_minute: 1,
        max_bytes: 1 << 30,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut samples = HardSamples::start(&root.join("limited"), "bench", options, None, stop)
        .expect("open the folder");
    let capture = samples.take_capture().expect("capture is on");
    capture.offer(digit(0), model, 3, 0.4);

    let digits: Vec<Sample> = (0..LIMITED_OFFERS).map(digit).collect();
    let mut times = Vec::with_capacity(LIMITED_OFFERS);
    for sample in digits {
        let started = Instant::now();
        capture.offer(sample, model, 3, 0.4);
        times.push(started.elapsed());
    }
    let limited = samples.stats().rate_limited.load(Ordering::Relaxed);
    assert_eq!(
        limited as usize, LIMITED_OFFERS,
        "every timed offer was limited"
    );
    times
}

/// Times offers that take a token and enter the queue, and the writer's time per
/// stored sample.
fn time_queued_offers(root: &std::path::Path, model: &ModelInfo) -> (Vec<Duration>, Vec<Duration>) {
    let options = HardSampleOptions {
        rate_per_minute: 1_000_000,
        max_bytes: 1 << 30,
    };
    let mut offers = Vec::new();
    let mut stores = Vec::new();
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let dir = root.join(format!("queued-{round}"));
        let mut samples =
            HardSamples::start(&dir, "bench", options, None, stop).expect("open the folder");
        let capture = samples.take_capture().expect("capture is on");
        let digits: Vec<Sample> = (0..OFFERS_PER_ROUND)
            .map(|index| digit(round * OFFERS_PER_ROUND + index))
            .collect();

        let round_started = Instant::now();
        for sample in digits {
            let started = Instant::now();
            capture.offer(sample, model, 3, 0.4);
            offers.push(started.elapsed());
        }
        drop(capture);
        samples.finish_writing();
        let per_sample = round_started.elapsed() / OFFERS_PER_ROUND as u32;
        stores.extend(std::iter::repeat_n(per_sample, OFFERS_PER_ROUND));

        let stored = samples.stats().stored.load(Ordering::Relaxed);
        assert_eq!(stored as usize, OFFERS_PER_ROUND, "every offer was stored");
    }
    (offers, stores)
}

fn print_row(step: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let mean = sorted.iter().sum::<Duration>() / sorted.len() as u32;
    println!(
        "| {step} | {} | {} | {} |",
        sorted.len(),
        format_duration(median),
        format_duration(mean)
    );
}

fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos < 10_000 {
        format!("{nanos} ns")
    } else {
        format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
    }
}

/// Returns a 28x28 digit whose pixels differ for each index, so no two are duplicates.
fn digit(index: usize) -> Sample {
    let pixels = (0..784u32)
        .map(|i| ((i * 7 + index as u32 * 13) % 251) as u8)
        .collect();
    Sample {
        id: format!("bench#{index}"),
        data: SampleData::Gray {
            width: 28,
            height: 28,
            pixels,
        },
        label: Some(index % 10),
    }
}

fn model() -> ModelInfo {
    ModelInfo {
        name: "digit-cnn".into(),
        version: "1.0.0".into(),
        input: TensorSpec {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 1, 28, 28],
        },
        output: TensorSpec {
            name: "logits".into(),
            datatype: "FP32".into(),
            shape: vec![1, 10],
        },
        preprocessing: serde_json::from_value(serde_json::json!({
            "kind": "grayscale", "width": 28, "height": 28,
            "resize": "bilinear", "scale": 1.0, "offset": 0.0
        }))
        .expect("grayscale preprocessing"),
        postprocessing: Postprocessing::Softmax,
        labels: (0..10).map(|digit| digit.to_string()).collect(),
    }
}
