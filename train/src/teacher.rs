//! Teacher logits: the ONNX teacher run once over the training images with tract, and
//! the result cached on disk.
//!
//! The cache file is named after a SHA-256 over the model file and the images, so a
//! changed model or data set never reuses stale logits. Augmented images reuse the
//! logits of their original, which holds up for the small shifts, rotations and
//! distortions this crate applies.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_runtime::{Backend, Tensor as RuntimeTensor, TractBackend};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::atomic::write_atomically;
use crate::data::ImageSet;
use crate::{Result, TrainError};

const CACHE_MAGIC: &[u8; 8] = b"FLTLOGIT";
const CACHE_VERSION: u32 = 1;
/// Magic, version, image count, class count and the 32-byte key.
const CACHE_HEADER_LEN: usize = 8 + 4 + 8 + 8 + 32;

/// Logits of a teacher for every image of one set, in the set's order.
#[derive(Debug, Clone)]
pub struct TeacherLogits {
    classes: usize,
    values: Vec<f32>,
}

/// Whether [`TeacherLogits::load_or_compute`] found the logits in its cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit(PathBuf),
    Computed(PathBuf),
}

impl TeacherLogits {
    /// Wraps `values` (`images * classes`, row by row), rejecting a wrong length and
    /// values that are not finite.
    pub fn new(name: &str, values: Vec<f32>, images: usize, classes: usize) -> Result<Self> {
        let invalid = |reason: String| TrainError::InvalidTeacherLogits {
            name: name.to_string(),
            reason,
        };
        if classes == 0 || values.len() != images * classes {
            return Err(invalid(format!(
                "{} values do not make {images} rows of {classes} classes",
                values.len()
            )));
        }
        if let Some(position) = values.iter().position(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "logit {} of image {} is {}",
                position % classes,
                position / classes,
                values[position]
            )));
        }
        Ok(TeacherLogits { classes, values })
    }

    /// Number of classes per row.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.values.len() / self.classes
    }

    /// Returns whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Logits of image `index`.
    ///
    /// # Panics
    ///
    /// When `index` is not below [`TeacherLogits::len`].
    pub fn row(&self, index: usize) -> &[f32] {
        &self.values[index * self.classes..(index + 1) * self.classes]
    }

    /// The rows of `indices`, concatenated.
    pub fn rows(&self, indices: &[usize]) -> Vec<f32> {
        indices.iter().flat_map(|&i| self.row(i)).copied().collect()
    }

    /// Runs `model` over every image of `data` in batches of `batch_size`, splitting the
    /// images over the available cores with one tract model each.
    pub fn compute(model: &Path, data: &ImageSet, batch_size: usize) -> Result<TeacherLogits> {
        if data.is_empty() {
            return Err(TrainError::EmptyData {
                name: data.name().to_string(),
            });
        }
        let batch_size = batch_size.max(1);
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let indices: Vec<usize> = (0..data.len()).collect();
        let per_thread = data.len().div_ceil(threads);
        let progress = progress_bar(data.len());

        let parts: Vec<Result<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = indices
                .chunks(per_thread)
                .map(|part| {
                    let progress = progress.clone();
                    scope.spawn(move || run_teacher(model, data, part, batch_size, &progress))
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().expect("teacher thread does not panic"))
                .collect()
        });
        progress.finish_and_clear();

        let mut values = Vec::with_capacity(data.len() * data.classes());
        for part in parts {
            values.extend(part?);
        }
        let classes = values.len() / data.len();
        if classes != data.classes() {
            return Err(TrainError::InvalidTeacherLogits {
                name: model.display().to_string(),
                reason: format!(
                    "the teacher outputs {classes} logits per image, the data set has {} classes",
                    data.classes()
                ),
            });
        }
        TeacherLogits::new(&model.display().to_string(), values, data.len(), classes)
    }

    /// Returns the cached logits of `model` on `data` from `cache_dir`, or computes and
    /// caches them. A cache file that does not match (damaged, or another format)
    /// is recomputed and replaced.
    pub fn load_or_compute(
        model: &Path,
        data: &ImageSet,
        cache_dir: &Path,
        batch_size: usize,
    ) -> Result<(TeacherLogits, CacheOutcome)> {
        let key = cache_key(model, data)?;
        let path = cache_dir.join(format!("teacher-{}.logits", hex::encode(&key[..8])));
        match read_cache(&path, &key, data) {
            Ok(Some(logits)) => {
                tracing::info!(cache = %path.display(), "teacher logits loaded from cache");
                return Ok((logits, CacheOutcome::Hit(path)));
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(cache = %path.display(), error = %error, "teacher logit cache is unusable, recomputing");
            }
        }
        let started = std::time::Instant::now();
        let logits = TeacherLogits::compute(model, data, batch_size)?;
        tracing::info!(
            model = %model.display(),
            images = data.len(),
            seconds = started.elapsed().as_secs_f64(),
            "teacher logits computed"
        );
        write_cache(&path, &key, &logits)?;
        Ok((logits, CacheOutcome::Computed(path)))
    }
}

fn progress_bar(len: usize) -> ProgressBar {
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template("teacher {bar:40} {pos}/{len} images {per_sec} eta {eta}")
            .expect("progress template is valid"),
    )
}

/// Runs the teacher on images `part` of `data`, padding the last batch with zeros.
fn run_teacher(
    model: &Path,
    data: &ImageSet,
    part: &[usize],
    batch_size: usize,
    progress: &ProgressBar,
) -> Result<Vec<f32>> {
    let shape = data.shape();
    let batch_size = batch_size.min(part.len()).max(1);
    let input_shape = [batch_size, shape.channels, shape.height, shape.width];
    let mut backend = TractBackend::load_onnx(model, &input_shape)?;
    let mut logits = Vec::new();
    for chunk in part.chunks(batch_size) {
        let mut input = data.scaled_batch(chunk);
        input.resize(batch_size * shape.len(), 0.0);
        let output = backend.run(RuntimeTensor::new(input_shape.to_vec(), input)?)?;
        let per_image = output.data.len() / batch_size;
        logits.extend_from_slice(&output.data[..chunk.len() * per_image]);
        progress.inc(chunk.len() as u64);
    }
    Ok(logits)
}

/// SHA-256 over the model file, the images' fingerprint and the input convention.
fn cache_key(model: &Path, data: &ImageSet) -> Result<[u8; 32]> {
    let bytes = fs::read(model).map_err(|source| TrainError::Read {
        path: model.to_path_buf(),
        source,
    })?;
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(&bytes));
    hasher.update(data.fingerprint().as_bytes());
    hasher.update(b"float32 NCHW pixel/255");
    Ok(hasher.finalize().into())
}

fn write_cache(path: &Path, key: &[u8; 32], logits: &TeacherLogits) -> Result<()> {
    let mut bytes = Vec::with_capacity(CACHE_HEADER_LEN + 4 * logits.values.len());
    bytes.extend_from_slice(CACHE_MAGIC);
    bytes.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(logits.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&(logits.classes as u64).to_le_bytes());
    bytes.extend_from_slice(key);
    for value in &logits.values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    write_atomically(path, &bytes)
}

/// Reads a cache file: `Ok(None)` when it does not exist or was made for another key.
fn read_cache(path: &Path, key: &[u8; 32], data: &ImageSet) -> Result<Option<TeacherLogits>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TrainError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let invalid = |reason: &str| TrainError::InvalidTeacherLogits {
        name: path.display().to_string(),
        reason: reason.to_string(),
    };
    if bytes.len() < CACHE_HEADER_LEN || &bytes[..8] != CACHE_MAGIC {
        return Err(invalid("not a teacher logit cache file"));
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != CACHE_VERSION {
        return Err(invalid("cache format version differs"));
    }
    if &bytes[28..60] != key {
        return Ok(None);
    }
    let (images, classes) = (word(12) as usize, word(20) as usize);
    if images != data.len() || bytes.len() != CACHE_HEADER_LEN + 4 * images * classes {
        return Err(invalid("cache file is truncated or has the wrong size"));
    }
    let values = bytes[CACHE_HEADER_LEN..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    TeacherLogits::new(&path.display().to_string(), values, images, classes).map(Some)
}
