//! Times the forms of the integer convolution kernels on EfficientNet-Lite0's layer
//! shapes, one thread, and prints two tables.
//!
//! ```sh
//! cargo run --release -p fleet-runtime --example int8_kernels
//! ```
//!
//! Depthwise layers: `blocked` is the channels-in-lanes form that `DepthwiseConv::run`
//! takes on CPUs with AVX-512F (16 channels per register) or AVX2 and FMA (8);
//! `planes` is the channel-at-a-time form other CPUs run. Pointwise layers: `tile` is
//! the matrix product `GemmConv::run` picks for this CPU (VNNI or AVX2), `portable` the
//! loop the compiler vectorises on its own. Inputs and weights are fixed patterns,
//! because the kernels' speed does not depend on the values.

use std::time::Instant;

use fleet_runtime::int8::{DepthwiseConv, GemmConv, Geometry, Requantize};

const RUNS: usize = 200;
const WARMUP_RUNS: usize = 10;

/// Channels, input size, kernel size, stride and padding of each depthwise layer.
const DEPTHWISE_LAYERS: &[(usize, usize, usize, usize, usize)] = &[
    (32, 112, 3, 1, 1),
    (96, 112, 3, 2, 1),
    (144, 56, 3, 1, 1),
    (144, 56, 5, 2, 2),
    (240, 28, 5, 1, 2),
    (480, 14, 3, 1, 1),
    (672, 14, 5, 1, 2),
    (1152, 7, 5, 1, 2),
];

/// Input channels, output channels and size of each pointwise layer.
const POINTWISE_LAYERS: &[(usize, usize, usize)] = &[
    (16, 96, 112),
    (144, 24, 56),
    (240, 40, 28),
    (480, 112, 14),
    (672, 192, 7),
    (1152, 320, 7),
    (320, 1280, 7),
];

/// Returns the geometry of a convolution over a square input with a square kernel,
/// the same padding on every side and no dilation.
fn square_geometry(
    in_channels: usize,
    out_channels: usize,
    size: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    group: usize,
) -> Geometry {
    let out = (size + 2 * pad - kernel) / stride + 1;
    Geometry {
        in_channels,
        in_height: size,
        in_width: size,
        out_channels,
        out_height: out,
        out_width: out,
        kernel: [kernel, kernel],
        strides: [stride, stride],
        dilations: [1, 1],
        pad_before: [pad, pad],
        group,
    }
}

/// Returns `len` input bytes in a fixed pattern that covers all 256 values.
fn pattern_input(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 256) as u8).collect()
}

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
    for &(channels, size, kernel, stride, pad) in DEPTHWISE_LAYERS {
        let geometry = square_geometry(channels, channels, size, kernel, stride, pad, channels);
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
        let input = pattern_input(geometry.input_len());
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
    pointwise_table()
}

#[allow(clippy::print_stdout)]
fn pointwise_table() -> anyhow::Result<()> {
    println!();
    println!(
        "{:<24} {:>11} {:>11} {:>8}",
        "layer", "tile ms", "portable ms", "ratio"
    );
    for &(in_channels, out_channels, size) in POINTWISE_LAYERS {
        let geometry = square_geometry(in_channels, out_channels, size, 1, 1, 0, 1);
        let weights: Vec<i8> = (0..in_channels * out_channels)
            .map(|i| (i % 251) as i8)
            .collect();
        let requantize = Requantize {
            bias: vec![5; out_channels],
            multiplier: vec![0.001; out_channels],
            output_zero_point: 3,
        };
        let conv = GemmConv::new(geometry.clone(), &weights, requantize, 7)
            .ok_or_else(|| anyhow::anyhow!("{in_channels}x{size}: sums overflow i32"))?;
        let input = pattern_input(geometry.input_len());
        let mut output = vec![0u8; geometry.output_len()];

        let name = format!("{in_channels}->{out_channels} {size}x{size}");
        let tile = median_ms(|| conv.run(&input, &mut output));
        let portable = median_ms(|| conv.run_portable(&input, &mut output));
        println!(
            "{name:<24} {tile:>11.3} {portable:>11.3} {:>7.2}x",
            portable / tile
        );
    }
    Ok(())
}
