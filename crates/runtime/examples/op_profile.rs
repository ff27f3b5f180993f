//! Time per operator kind of an ONNX model in tract, as the runtime loads it (with its
//! integer convolution kernels), or with tract's own kernels only.
//!
//! ```sh
//! cargo run --release -p fleet-runtime --example op_profile -- MODEL.onnx 1,3,224,224
//! cargo run --release -p fleet-runtime --example op_profile -- MODEL.onnx 1,3,224,224 --tract-only
//! cargo run --release -p fleet-runtime --example op_profile -- MODEL.onnx 1,3,224,224 --nodes
//! ```
//!
//! The input is all zeros; 200 runs after 5 warm-up runs on one thread. Prints the
//! median, tenth percentile and fastest total time and, per operator name, the summed
//! median time of its nodes. `--nodes` adds every node, slowest first, with its output
//! shapes and its tenth-percentile time. On a shared machine the tenth percentile of a
//! node moves less between runs than its median, so it is the better figure to set next
//! to another runtime's profile of the same nodes.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use tract_onnx::prelude::*;

const RUNS: usize = 200;
const WARMUP_RUNS: usize = 5;

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(shape)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: op_profile MODEL.onnx N,C,H,W [--tract-only] [--nodes]");
    };
    let shape: Vec<usize> = shape
        .split(',')
        .map(|d| {
            d.parse()
                .with_context(|| format!("invalid dimension {d:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let framework = if args.iter().any(|a| a == "--tract-only") {
        tract_onnx::onnx()
    } else {
        fleet_runtime::onnx()
    };
    let model = framework
        .model_for_path(path)?
        .with_input_fact(0, f32::fact(&shape).into())?
        .into_optimized()?;
    let plan = model.into_runnable()?;
    let mut state = plan.spawn()?;
    let input = Tensor::zero::<f32>(&shape)?;

    let mut node_times: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::with_capacity(RUNS);
    for run in 0..WARMUP_RUNS + RUNS {
        let mut times: Vec<(usize, f64)> = Vec::new();
        let start = Instant::now();
        state.run_plan_with_eval(
            tvec![input.clone().into()],
            |context, op_state, node, inputs| {
                let node_start = Instant::now();
                let outputs = tract_onnx::tract_core::plan::eval(context, op_state, node, inputs);
                times.push((node.id, node_start.elapsed().as_secs_f64() * 1e3));
                outputs
            },
        )?;
        let total = start.elapsed().as_secs_f64() * 1e3;
        if run >= WARMUP_RUNS {
            totals.push(total);
            for (id, time) in times {
                node_times.entry(id).or_default().push(time);
            }
        }
    }

    let mut by_operator: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    let mut by_node = Vec::new();
    for (id, mut times) in node_times {
        let node = plan.model().node(id);
        let name = node.op().name().to_string();
        let entry = by_operator.entry(name).or_default();
        entry.0 += 1;
        entry.1 += percentile(&mut times, 50);
        by_node.push((percentile(&mut times, 10), id));
    }
    let mut rows: Vec<_> = by_operator.into_iter().collect();
    rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    println!(
        "total median {:.3} ms, tenth percentile {:.3}, fastest {:.3}, over {RUNS} runs",
        percentile(&mut totals, 50),
        percentile(&mut totals, 10),
        percentile(&mut totals, 0)
    );
    println!("{:<32} {:>6} {:>10}", "operator", "nodes", "ms");
    for (name, (count, time)) in rows {
        println!("{name:<32} {count:>6} {time:>10.3}");
    }
    if args.iter().any(|a| a == "--nodes") {
        by_node.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!("\nnodes, slowest first (tenth-percentile ms):");
        for (time, id) in by_node {
            let node = plan.model().node(id);
            let outputs: Vec<String> = node
                .outputs
                .iter()
                .map(|output| format!("{:?}", output.fact))
                .collect();
            println!(
                "{time:>8.3} ms  {} ({}) -> {}",
                node.name,
                node.op().name(),
                outputs.join(", ")
            );
        }
    }
    Ok(())
}

/// Returns the value below which `percent`% of `values` lie.
fn percentile(values: &mut [f64], percent: usize) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() * percent / 100]
}
