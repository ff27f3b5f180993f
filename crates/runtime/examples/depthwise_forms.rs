//! Times the two forms of the integer depthwise kernel on EfficientNet-Lite0's
//! depthwise layer shapes, one thread, and prints a table.
//!
//! ```sh
//! cargo run --release -p fleet-runtime --example depthwise_forms
//! ```
//!
//! `blocked` is the 16-channels-per-register form that `DepthwiseConv::run` takes on
//! CPUs with AVX-512F; `planes` is the channel-at-a-time form other CPUs run. Inputs
//! and weights are fixed patterns, because the kernels' speed does not depend on the
//! values.

use std::time::Instant;

use fleet_runtime::int8::{DepthwiseConv, Geometry, Requantize};

const RUNS: usize = 200;
const WARMUP_RUNS: usize = 10;

/// Channels, input size, kernel size, stride and padding of each layer shape.
const LAYERS: &[(usize, usize, usize, usize, usize)] = &[
    (32, 112, 3, 1, 1),
    (96, 112, 3, 2, 1),
    (144, 56, 3, 1, 1),
    (144, 56, 5, 2, 2),
    (240, 28, 5, 1, 2),
    (480, 14, 3, 1, 1),
    (672, 14, 5, 1, 2),
    (1152, 7, 5, 1, 2),
];

/// Returns the median time of `RUNS` calls of `run`, in milliseconds.
fn median_ms(mut run: impl FnMut()) -> f64 {
    for _ in 0..WARMUP_RUNS {
        run();
    }
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    println!(
        "{:<24} {:>11} {:>10} {:>8}",
        "layer", "blocked ms", "planes ms", "ratio"
    );
    for &(channels, size, kernel, stride, pad) in LAYERS {
        let out = (size + 2 * pad - kernel) / stride + 1;
        let geometry = Geometry {
            in_channels: channels,
            in_height: size,
            in_width: size,
            out_channels: channels,
            out_height: out,
            out_width: out,
            kernel: [kernel, kernel],
            strides: [stride, stride],
            dilations: [1, 1],
            pad_before: [pad, pad],
            group: channels,
        };
        let weights: Vec<i8> = (0..channels * kernel * kernel)
            .map(|i| (i % 7) as i8 - 3)
            .collect();
        let requantize = Requantize {
            bias: vec![5; channels],
            multiplier: vec![0.01; channels],
            output_zero_point: 3,
        };
        let conv = DepthwiseConv::new(geometry.clone(), &weights, requantize, 7)
            .ok_or_else(|| anyhow::anyhow!("{channels}x{size}: not a depthwise kernel"))?;
        let input: Vec<u8> = (0..geometry.input_len())
            .map(|i| (i * 31 % 256) as u8)
            .collect();
        let mut output = vec![0u8; geometry.output_len()];

        let name = format!("{channels}x{size}x{size} {kernel}x{kernel}/{stride}");
        let planes = median_ms(|| conv.run_planes(&input, &mut output));
        if !conv.run_blocked(&input, &mut output) {
            println!("{name:<24} {:>11} {planes:>10.3} {:>8}", "-", "-");
            continue;
        }
        let blocked = median_ms(|| {
            conv.run_blocked(&input, &mut output);
        });
        println!(
            "{name:<24} {blocked:>11.3} {planes:>10.3} {:>7.2}x",
            planes / blocked
        );
    }
    Ok(())
}
