//! Batches for training: seeded shuffling, batching and augmentation.
//!
//! The order of an epoch depends only on the seed and the epoch number, and the
//! augmentation of a sample only on the seed, the epoch and the sample's index. So a
//! run resumed from a checkpoint gets exactly the batches an uninterrupted run would,
//! and the result does not depend on how many threads augment a batch.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::{IntoParallelRefIterator, ParallelIterator};

use crate::Result;
use crate::augment::{Augmentation, TrainRng};
use crate::data::ImageSet;

/// Salts that keep the generators for shuffling, augmentation, dropout and weight
/// initialisation apart when they share one seed.
pub(crate) mod stream {
    pub const SHUFFLE: u64 = 1;
    pub const AUGMENT: u64 = 2;
    pub const DROPOUT: u64 = 3;
    pub const INIT: u64 = 4;
}

/// Derives the generator for one use of the seed, such as the augmentation of sample
/// 17 in epoch 3. The parts are folded with odd 64-bit multipliers so that nearby
/// inputs give unrelated seeds after `seed_from_u64`'s own mixing.
pub(crate) fn derived_rng(seed: u64, stream: u64, parts: &[u64]) -> TrainRng {
    let mut state = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &part in parts {
        state = (state ^ part)
            .wrapping_mul(0xBF58_476D_1CE4_E5B9)
            .rotate_left(31);
    }
    TrainRng::seed_from_u64(state)
}

/// One batch of images (`pixel / 255`, NCHW) with their labels and their indices in the
/// image set.
#[derive(Debug, Clone)]
pub struct Batch {
    pub indices: Vec<usize>,
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
}

impl Batch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Returns whether the batch has no samples.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The images as a float32 tensor on `device`.
    pub fn images_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.images, &self.shape, device)?)
    }

    /// The labels as a u32 tensor of shape `[batch]` on `device`.
    pub fn labels_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.labels, self.labels.len(), device)?)
    }
}

/// Turns an image set into shuffled, augmented batches, epoch by epoch.
#[derive(Debug, Clone)]
pub struct Loader<'a> {
    data: &'a ImageSet,
    batch_size: usize,
    seed: u64,
    augmentation: Augmentation,
    shuffle: bool,
}

impl<'a> Loader<'a> {
    /// Creates a loader that shuffles and augments; see [`Loader::sequential`] for
    /// evaluation. A `batch_size` of 0 is treated as 1.
    pub fn new(
        data: &'a ImageSet,
        batch_size: usize,
        seed: u64,
        augmentation: Augmentation,
    ) -> Loader<'a> {
        Loader {
            data,
            batch_size: batch_size.max(1),
            seed,
            augmentation,
            shuffle: true,
        }
    }

    /// Creates a loader that yields the images in order and unchanged.
    pub fn sequential(data: &'a ImageSet, batch_size: usize) -> Loader<'a> {
        Loader {
            shuffle: false,
            ..Loader::new(data, batch_size, 0, Augmentation::None)
        }
    }

    /// Number of batches in one epoch, counting a partial last batch.
    pub fn batches_per_epoch(&self) -> usize {
        self.data.len().div_ceil(self.batch_size)
    }

    /// The sample order of `epoch`: a seeded permutation, or `0..len` without shuffling.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        if self.shuffle {
            order.shuffle(&mut derived_rng(
                self.seed,
                stream::SHUFFLE,
                &[epoch as u64],
            ));
        }
        order
    }

    /// The batches of `epoch`, built lazily one at a time.
    pub fn epoch(&self, epoch: usize) -> impl Iterator<Item = Batch> + '_ {
        let order = self.order(epoch);
        let batches: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        batches
            .into_iter()
            .map(move |indices| self.build_batch(epoch, indices))
    }

    /// Scales and augments the images of one batch, in parallel over samples.
    pub fn build_batch(&self, epoch: usize, indices: Vec<usize>) -> Batch {
        let shape = self.data.shape();
        let images: Vec<Vec<f32>> = indices
            .par_iter()
            .map(|&index| {
                let scaled = self.data.scaled_batch(&[index]);
                if self.augmentation == Augmentation::None {
                    return scaled;
                }
                let mut rng =
                    derived_rng(self.seed, stream::AUGMENT, &[epoch as u64, index as u64]);
                self.augmentation.apply(&scaled, shape, &mut rng)
            })
            .collect();
        let labels = indices
            .iter()
            .map(|&index| self.data.label(index))
            .collect();
        Batch {
            shape: [indices.len(), shape.channels, shape.height, shape.width],
            indices,
            images: images.concat(),
            labels,
        }
    }
}
