//! Labelled image sets held in memory: MNIST IDX files and folders of photos.
//!
//! Pixels are kept as 8-bit values, channel-major (CHW), and become `pixel / 255`
//! float32 only when a batch is built. That is the same scaling the bundles' grayscale
//! preprocessing applies, so a model trained here gets the inputs a device gives it.

use std::fmt;
use std::path::Path;

use fleet_runtime::{Dataset, SampleData};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Result, TrainError};

/// Channels, height and width of every image in a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// Number of values in one image.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Returns whether an image of this shape has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for ImageShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// Labelled images of one shape, in memory.
#[derive(Debug, Clone)]
pub struct ImageSet {
    name: String,
    shape: ImageShape,
    classes: usize,
    /// `len * shape.len()` bytes, image after image, each CHW.
    pixels: Vec<u8>,
    labels: Vec<u32>,
}

impl ImageSet {
    /// Creates a set after checking that `pixels` contains whole images, that there is one
    /// label per image, that every label is below `classes`, and that the set is not empty.
    pub fn new(
        name: impl Into<String>,
        shape: ImageShape,
        classes: usize,
        pixels: Vec<u8>,
        labels: Vec<u32>,
    ) -> Result<ImageSet> {
        let name = name.into();
        if shape.is_empty() || classes == 0 {
            return Err(TrainError::InvalidData {
                name,
                reason: format!("image shape {shape} and {classes} classes leave nothing to learn"),
            });
        }
        if labels.is_empty() {
            return Err(TrainError::EmptyData { name });
        }
        if pixels.len() != labels.len() * shape.len() {
            return Err(TrainError::InvalidData {
                name,
                reason: format!(
                    "{} pixel values do not make {} images of {shape}",
                    pixels.len(),
                    labels.len()
                ),
            });
        }
        if let Some((index, &label)) = labels
            .iter()
            .enumerate()
            .find(|(_, label)| **label as usize >= classes)
        {
            return Err(TrainError::LabelOutOfRange {
                name,
                index,
                label: label as usize,
                classes,
            });
        }
        Ok(ImageSet {
            name,
            shape,
            classes,
            pixels,
            labels,
        })
    }

    /// Reads an IDX image file and its label file (either may be gzip compressed), and
    /// checks that the images have `expected` shape.
    pub fn from_idx(
        images: &Path,
        labels: &Path,
        expected: ImageShape,
        classes: usize,
    ) -> Result<ImageSet> {
        let dataset = Dataset::open_idx(images, Some(labels))?;
        let Dataset::Idx {
            name,
            rows,
            cols,
            pixels,
            labels: Some(labels),
        } = dataset
        else {
            return Err(TrainError::InvalidData {
                name: images.display().to_string(),
                reason: "the IDX reader returned no labels".into(),
            });
        };
        let found = ImageShape {
            channels: 1,
            height: rows as usize,
            width: cols as usize,
        };
        if found != expected {
            return Err(TrainError::ImageShapeMismatch {
                name,
                expected: expected.to_string(),
                found: found.to_string(),
            });
        }
        let labels = labels.into_iter().map(u32::from).collect();
        ImageSet::new(name, found, classes, pixels, labels)
    }

    /// Reads every JPEG and PNG file of a folder, resized to `shape` (bilinear) and
    /// converted to 1 or 3 channels. Each file must be named like `photo_3.jpg`, where
    /// the number after the last `_` is its class.
    pub fn from_folder(dir: &Path, shape: ImageShape, classes: usize) -> Result<ImageSet> {
        if !matches!(shape.channels, 1 | 3) {
            return Err(TrainError::InvalidData {
                name: dir.display().to_string(),
                reason: format!("images need 1 or 3 channels, not {}", shape.channels),
            });
        }
        let dataset = Dataset::open_folder(dir)?;
        let mut pixels = Vec::with_capacity(dataset.len() * shape.len());
        let mut labels = Vec::with_capacity(dataset.len());
        for index in 0..dataset.len() {
            let sample = dataset.sample(index)?;
            let label = sample.label.ok_or_else(|| TrainError::InvalidData {
                name: dir.display().to_string(),
                reason: format!(
                    "{} has no label: name it like photo_3.jpg, where 3 is the class",
                    sample.id
                ),
            })?;
            let label = u32::try_from(label).map_err(|_| TrainError::LabelOutOfRange {
                name: dir.display().to_string(),
                index,
                label,
                classes,
            })?;
            pixels.extend(decode_resized(&sample.id, &sample.data, shape)?);
            labels.push(label);
        }
        ImageSet::new(dir.display().to_string(), shape, classes, pixels, labels)
    }

    /// Keeps the first `count` images, or all of them when there are fewer. A count of 0
    /// leaves an empty set, which training and the teacher reject.
    pub fn truncate(&mut self, count: usize) {
        let count = count.min(self.len());
        self.labels.truncate(count);
        self.pixels.truncate(count * self.shape.len());
    }

    /// Name for messages, usually the file or folder the set came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Shape of every image.
    pub fn shape(&self) -> ImageShape {
        self.shape
    }

    /// Number of classes the labels index into.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Returns whether the set has no images, which [`ImageSet::new`] rejects.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `index`, CHW.
    ///
    /// # Panics
    ///
    /// When `index` is not below [`ImageSet::len`].
    pub fn image(&self, index: usize) -> &[u8] {
        let size = self.shape.len();
        &self.pixels[index * size..(index + 1) * size]
    }

    /// Label of image `index`.
    ///
    /// # Panics
    ///
    /// When `index` is not below [`ImageSet::len`].
    pub fn label(&self, index: usize) -> u32 {
        self.labels[index]
    }

    /// All labels in order.
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// Writes images `indices` as `pixel / 255` float32, NCHW, into a new vector.
    ///
    /// # Panics
    ///
    /// When an index is not below [`ImageSet::len`].
    pub fn scaled_batch(&self, indices: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * self.shape.len());
        for &index in indices {
            out.extend(self.image(index).iter().map(|&p| f32::from(p) / 255.0));
        }
        out
    }

    /// SHA-256 of the shape, class count and pixels, in hex: identifies the images for
    /// caches of model outputs. Labels are left out because outputs do not depend on them.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        for value in [
            self.shape.channels,
            self.shape.height,
            self.shape.width,
            self.len(),
        ] {
            hasher.update((value as u64).to_le_bytes());
        }
        hasher.update(&self.pixels);
        hex::encode(hasher.finalize())
    }
}

/// Decodes one image file and resizes it to `shape`, returning CHW bytes.
fn decode_resized(id: &str, data: &SampleData, shape: ImageShape) -> Result<Vec<u8>> {
    let image = match data {
        SampleData::Encoded(bytes) => {
            image::load_from_memory(bytes).map_err(|error| TrainError::InvalidData {
                name: id.to_string(),
                reason: format!("image does not decode: {error}"),
            })?
        }
        SampleData::Gray {
            width,
            height,
            pixels,
        } => image::GrayImage::from_raw(*width, *height, pixels.clone())
            .map(image::DynamicImage::ImageLuma8)
            .ok_or_else(|| TrainError::InvalidData {
                name: id.to_string(),
                reason: format!("{} bytes are not a {width}x{height} image", pixels.len()),
            })?,
    };
    let resized = image.resize_exact(
        shape.width as u32,
        shape.height as u32,
        image::imageops::FilterType::Triangle,
    );
    if shape.channels == 1 {
        return Ok(resized.to_luma8().into_raw());
    }
    let rgb = resized.to_rgb8();
    let plane = shape.height * shape.width;
    let mut chw = vec![0u8; 3 * plane];
    for (position, pixel) in rgb.pixels().enumerate() {
        for channel in 0..3 {
            chw[channel * plane + position] = pixel[channel];
        }
    }
    Ok(chw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRAY_2X2: ImageShape = ImageShape {
        channels: 1,
        height: 2,
        width: 2,
    };

    #[test]
    fn new_checks_labels_and_sizes() {
        let error = ImageSet::new("t", GRAY_2X2, 3, vec![0; 8], vec![0, 3]).unwrap_err();
        assert!(matches!(
            error,
            TrainError::LabelOutOfRange {
                index: 1,
                label: 3,
                ..
            }
        ));
        let error = ImageSet::new("t", GRAY_2X2, 3, vec![0; 7], vec![0, 1]).unwrap_err();
        assert!(error.to_string().contains("7 pixel values"), "{error}");
        let error = ImageSet::new("t", GRAY_2X2, 3, vec![], vec![]).unwrap_err();
        assert!(matches!(error, TrainError::EmptyData { .. }));
    }

    #[test]
    fn scaled_batch_divides_by_255() {
        let set = ImageSet::new(
            "t",
            GRAY_2X2,
            2,
            vec![0, 255, 51, 0, 1, 2, 3, 4],
            vec![0, 1],
        )
        .unwrap();
        let batch = set.scaled_batch(&[0]);
        assert_eq!(batch, [0.0, 1.0, 0.2, 0.0]);
        assert_eq!(set.scaled_batch(&[1, 0]).len(), 8);
    }
}
