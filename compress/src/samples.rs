//! Calibration and comparison data: preprocessed model inputs read from a data set,
//! optionally multiplied by random crops, flips and colour changes.
//!
//! A model with few labelled photos still needs a few hundred inputs to calibrate
//! activation ranges and to compare a compressed model with its float original.
//! [`SampleSpec::augment`] turns each selected image into that many variants with the
//! training crate's photo augmentation, deterministically for a seed. Calibration and
//! comparison sets should draw on different images ([`Selection::Even`] and
//! [`Selection::Odd`]), so the comparison does not measure the data the quantizer was
//! tuned on.

use std::path::{Path, PathBuf};

use anyhow::Context;
use fleet_bundle::Preprocessing;
use fleet_runtime::{Dataset, preprocess};
use fleet_train::{Augmentation, ImageShape, PhotoAugmentation, TrainRng};
use rand::SeedableRng;
use serde::Deserialize;

/// Selection of a data set's images by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    #[default]
    All,
    /// Images 0, 2, 4, ...
    Even,
    /// Images 1, 3, 5, ...
    Odd,
}

/// Source of a sample set, as a recipe states it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSpec {
    /// An IDX image file or a folder of images.
    pub images: PathBuf,
    /// IDX label file, for IDX images.
    pub labels: Option<PathBuf>,
    #[serde(default)]
    pub select: Selection,
    /// Use at most this many images (after selection).
    pub limit: Option<usize>,
    /// Random variants made of each image (crop, flip, colour); 0 keeps the images as
    /// they are.
    #[serde(default)]
    pub augment: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_seed() -> u64 {
    7
}

impl SampleSpec {
    /// Resolves relative paths against `base`.
    pub fn resolve(&mut self, base: &Path) {
        self.images = base.join(&self.images);
        self.labels = self.labels.as_ref().map(|labels| base.join(labels));
    }
}

/// Preprocessed inputs with their labels, when known.
#[derive(Debug, Clone)]
pub struct Samples {
    /// Human-readable origin, for reports.
    pub description: String,
    /// One CHW float vector per sample.
    pub inputs: Vec<Vec<f32>>,
    pub labels: Vec<Option<usize>>,
}

impl Samples {
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }
}

/// Reads the images `spec` selects, preprocesses them with `preprocessing` and, when
/// asked, adds augmented variants (the originals are not included then).
pub fn load_samples(spec: &SampleSpec, preprocessing: &Preprocessing) -> anyhow::Result<Samples> {
    let data = Dataset::open(&spec.images, spec.labels.as_deref())
        .with_context(|| format!("failed to open data {}", spec.images.display()))?;
    let mut indices: Vec<usize> = (0..data.len())
        .filter(|index| match spec.select {
            Selection::All => true,
            Selection::Even => index % 2 == 0,
            Selection::Odd => index % 2 == 1,
        })
        .collect();
    if let Some(limit) = spec.limit {
        indices.truncate(limit);
    }
    anyhow::ensure!(
        !indices.is_empty(),
        "data {} has no image for selection {:?}",
        spec.images.display(),
        spec.select
    );
    let (channels, height, width) = preprocessing.sample_shape();
    let shape = ImageShape {
        channels,
        height,
        width,
    };
    let (scale, offset) = match *preprocessing {
        Preprocessing::Grayscale { scale, offset, .. }
        | Preprocessing::Rgb { scale, offset, .. } => (scale, offset),
    };
    let augmentation = Augmentation::Photos(PhotoAugmentation {
        min_crop_scale: 0.7,
        flip_probability: 0.5,
        brightness: 0.1,
        contrast: 0.1,
        saturation: 0.1,
    });
    let mut rng = TrainRng::seed_from_u64(spec.seed);
    let mut samples = Samples {
        description: describe(spec),
        inputs: Vec::new(),
        labels: Vec::new(),
    };
    for index in indices {
        let sample = data.sample(index).with_context(|| {
            format!("failed to read image {index} of {}", spec.images.display())
        })?;
        let input = preprocess(&sample, preprocessing)
            .with_context(|| format!("failed to preprocess {}", sample.id))?;
        if spec.augment == 0 {
            samples.inputs.push(input);
            samples.labels.push(sample.label);
            continue;
        }
        // The augmentation works on pixels in [0, 1]; undo the preprocessing's
        // scale and offset around it.
        let unit: Vec<f32> = input
            .iter()
            .map(|v| ((v - offset) / (scale * 255.0)).clamp(0.0, 1.0))
            .collect();
        for _ in 0..spec.augment {
            let variant = augmentation.apply(&unit, shape, &mut rng);
            samples
                .inputs
                .push(variant.iter().map(|p| p * 255.0 * scale + offset).collect());
            samples.labels.push(sample.label);
        }
    }
    Ok(samples)
}

fn describe(spec: &SampleSpec) -> String {
    let mut text = spec.images.display().to_string();
    match spec.select {
        Selection::All => {}
        Selection::Even => text.push_str(", even-numbered images"),
        Selection::Odd => text.push_str(", odd-numbered images"),
    }
    if let Some(limit) = spec.limit {
        text.push_str(&format!(", first {limit}"));
    }
    if spec.augment > 0 {
        text.push_str(&format!(
            ", {} random crop/flip/colour variants each (seed {})",
            spec.augment, spec.seed
        ));
    }
    text
}
