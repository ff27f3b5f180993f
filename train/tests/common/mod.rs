//! Helpers shared by the integration tests: small data sets and run options.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use fleet_train::{
    Augmentation, CnnConfig, ImageSet, ImageShape, LrSchedule, RunOptions, TrainConfig,
};

pub const MNIST_SHAPE: ImageShape = ImageShape {
    channels: 1,
    height: 28,
    width: 28,
};

/// Returns the repository root, the parent of this crate's folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in the workspace")
        .to_path_buf()
}

/// Loads the first `count` MNIST training images.
pub fn mnist_train(count: usize) -> ImageSet {
    mnist("train", count)
}

/// Loads the first `count` MNIST test images.
pub fn mnist_test(count: usize) -> ImageSet {
    mnist("t10k", count)
}

fn mnist(prefix: &str, count: usize) -> ImageSet {
    let dir = repo_root().join("models/mnist");
    let mut set = ImageSet::from_idx(
        &dir.join(format!("{prefix}-images-idx3-ubyte.gz")),
        &dir.join(format!("{prefix}-labels-idx1-ubyte.gz")),
        MNIST_SHAPE,
        10,
    )
    .expect("the shipped MNIST files load");
    set.truncate(count);
    set
}

/// Returns a student small enough to train a step in milliseconds.
pub fn tiny_student() -> CnnConfig {
    CnnConfig::student(MNIST_SHAPE, 10, 4, 2, vec![8], None)
}

/// Settings for runs of a few steps: small batches, no augmentation.
pub fn quick_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        seed: 11,
        schedule: LrSchedule::Constant,
        augmentation: Augmentation::None,
        log_every: 1,
        eval_batch_size: 64,
        ..TrainConfig::default()
    }
}

/// Options that keep checkpoints and the log in `dir` and draw no progress bars.
pub fn options(dir: &Path, resume: bool) -> RunOptions {
    RunOptions {
        checkpoint_dir: dir.join("checkpoints"),
        log_path: Some(dir.join("log.jsonl")),
        resume,
        show_progress: false,
    }
}
