//! `self-test`: checks a bundle on this machine without a broker, so a cross-compiled
//! agent can be compared with the machine the bundle was built on.
//!
//! It verifies the bundle, reproduces the reference outputs the compressor recorded in
//! it, and with `--input` prints the top-1 class and confidence of the first samples,
//! in a form that can be compared line by line between machines.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fleet_bundle::{Bundle, PublicKey};
use fleet_runtime::Dataset;

use crate::model::top1;

/// Flags of `self-test`.
#[derive(Debug, Clone, Args)]
pub struct SelfTestArgs {
    /// Bundle folder to check.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Public key the bundle must be signed with.
    #[arg(long)]
    pub public_key: PathBuf,
    /// Input source to classify: an IDX image file (optionally gzip) or a folder of
    /// JPEG/PNG images.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// IDX label file for an IDX input.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// Samples of the input to classify, from the first.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
}

/// Runs the checks and prints their results; fails on the first check that does not
/// pass.
pub fn self_test(args: &SelfTestArgs) -> anyhow::Result<()> {
    let key = PublicKey::read(&args.public_key)
        .with_context(|| format!("failed to read public key {}", args.public_key.display()))?;
    let bundle = Bundle::open_verified(&args.bundle, &key)
        .with_context(|| format!("rejected bundle {}", args.bundle.display()))?;
    println!(
        "bundle {} {}: signature and {} files verified",
        bundle.manifest.name,
        bundle.manifest.version,
        bundle.manifest.files.len()
    );
    let (model, detail) = crate::update::health_check(&bundle).map_err(anyhow::Error::msg)?;
    println!("self-test: {detail}");

    let Some(input) = &args.input else {
        return Ok(());
    };
    let data = Dataset::open(input, args.labels.as_deref())
        .with_context(|| format!("failed to open input {}", input.display()))?;
    let info = model.info();
    let (mut labeled, mut correct) = (0, 0);
    for index in 0..args.samples.min(data.len()) {
        let sample = data.sample(index)?;
        let tensor = fleet_runtime::preprocess(&sample, &info.preprocessing)?;
        let scores = model.run(1, &tensor)?.remove(0);
        let (class, confidence) = top1(&info.confidences(&scores));
        let truth = match sample.label {
            Some(label) => {
                labeled += 1;
                correct += usize::from(label == class);
                format!(" label {label}")
            }
            None => String::new(),
        };
        println!(
            "sample {index}: class {class} ({}) confidence {confidence:.5}{truth}",
            info.label(class)
        );
    }
    if labeled > 0 {
        println!("top-1: {correct} of {labeled} correct");
    }
    Ok(())
}
