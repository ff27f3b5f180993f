//! Random image transformations applied to training batches.
//!
//! Every transformation draws from the random generator it is given, so the loader can
//! make the result depend on the seed, the epoch and the sample only. Images are float32
//! CHW with values in `[0, 1]`, and every transformation keeps the shape.

use rand::RngExt;
use rand::rngs::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};

use crate::data::ImageShape;
use crate::{Result, TrainError};

/// Random generator used for augmentation, dropout and shuffling. Xoshiro256++ has a
/// fixed, documented output for a given seed, which keeps runs reproducible.
pub type TrainRng = Xoshiro256PlusPlus;

/// The augmentation of a training set, as written in a recipe (`kind = "digits"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Augmentation {
    /// Images are used as they are.
    #[default]
    None,
    /// Small shifts, small rotations and elastic distortion, for handwriting.
    Digits(DigitAugmentation),
    /// Random crops, horizontal flips and colour jitter, for photos.
    Photos(PhotoAugmentation),
}

/// Parameters of [`Augmentation::Digits`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DigitAugmentation {
    /// Largest shift along each axis, in pixels.
    pub max_shift: f32,
    /// Largest rotation either way, in degrees.
    pub max_rotation: f32,
    /// Probability that an image also gets an elastic distortion, 0 to 1.
    pub elastic_probability: f32,
    /// Scale of the elastic displacement field, in pixels before smoothing.
    pub elastic_alpha: f32,
    /// Standard deviation of the Gaussian that smooths the displacement field, in pixels.
    pub elastic_sigma: f32,
}

impl Default for DigitAugmentation {
    /// Shifts of up to 2 pixels, rotations of up to 10 degrees, and for half the images
    /// an elastic distortion with alpha 34 and sigma 4 pixels.
    fn default() -> Self {
        DigitAugmentation {
            max_shift: 2.0,
            max_rotation: 10.0,
            elastic_probability: 0.5,
            elastic_alpha: 34.0,
            elastic_sigma: 4.0,
        }
    }
}

/// Parameters of [`Augmentation::Photos`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhotoAugmentation {
    /// Smallest crop side as a fraction of the image side; the crop is resized back.
    pub min_crop_scale: f32,
    /// Probability of a horizontal flip, 0 to 1.
    pub flip_probability: f32,
    /// Largest relative change of brightness, such as 0.2 for 80% to 120%.
    pub brightness: f32,
    /// Largest relative change of contrast around the image's mean.
    pub contrast: f32,
    /// Largest relative change of saturation; ignored for one-channel images.
    pub saturation: f32,
}

impl Default for PhotoAugmentation {
    fn default() -> Self {
        PhotoAugmentation {
            min_crop_scale: 0.8,
            flip_probability: 0.5,
            brightness: 0.2,
            contrast: 0.2,
            saturation: 0.2,
        }
    }
}

impl Augmentation {
    /// Checks that every probability is in `[0, 1]` and every range is finite and not
    /// negative.
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, value: f32, max: f32| {
            if value.is_finite() && (0.0..=max).contains(&value) {
                Ok(())
            } else {
                Err(TrainError::InvalidConfig(format!(
                    "augmentation.{name} is {value}, expected 0 to {max}"
                )))
            }
        };
        match self {
            Augmentation::None => Ok(()),
            Augmentation::Digits(digits) => {
                check("max_shift", digits.max_shift, f32::MAX)?;
                check("max_rotation", digits.max_rotation, 180.0)?;
                check("elastic_probability", digits.elastic_probability, 1.0)?;
                check("elastic_alpha", digits.elastic_alpha, f32::MAX)?;
                check("elastic_sigma", digits.elastic_sigma, 100.0)
            }
            Augmentation::Photos(photos) => {
                if !(photos.min_crop_scale > 0.0 && photos.min_crop_scale <= 1.0) {
                    return Err(TrainError::InvalidConfig(format!(
                        "augmentation.min_crop_scale is {}, expected more than 0 and at most 1",
                        photos.min_crop_scale
                    )));
                }
                check("flip_probability", photos.flip_probability, 1.0)?;
                check("brightness", photos.brightness, 1.0)?;
                check("contrast", photos.contrast, 1.0)?;
                check("saturation", photos.saturation, 1.0)
            }
        }
    }

    /// Returns a transformed copy of `image`, which has `shape`.
    pub fn apply(&self, image: &[f32], shape: ImageShape, rng: &mut TrainRng) -> Vec<f32> {
        match self {
            Augmentation::None => image.to_vec(),
            Augmentation::Digits(digits) => digits.apply(image, shape, rng),
            Augmentation::Photos(photos) => photos.apply(image, shape, rng),
        }
    }
}

impl DigitAugmentation {
    /// Rotates and shifts around the image centre, adds the elastic displacement when
    /// drawn, and resamples once with bilinear interpolation (zero outside the image).
    fn apply(&self, image: &[f32], shape: ImageShape, rng: &mut TrainRng) -> Vec<f32> {
        let angle = symmetric(rng, self.max_rotation).to_radians();
        let (shift_x, shift_y) = (
            symmetric(rng, self.max_shift),
            symmetric(rng, self.max_shift),
        );
        let elastic = (self.elastic_probability > 0.0
            && rng.random_bool(f64::from(self.elastic_probability)))
        .then(|| self.displacement_field(shape, rng));

        let (cos, sin) = (angle.cos(), angle.sin());
        let center_x = (shape.width as f32 - 1.0) / 2.0;
        let center_y = (shape.height as f32 - 1.0) / 2.0;
        let mut source = Vec::with_capacity(shape.height * shape.width);
        for y in 0..shape.height {
            for x in 0..shape.width {
                // Inverse mapping: which source point lands on output pixel (x, y).
                let dx = x as f32 - center_x - shift_x;
                let dy = y as f32 - center_y - shift_y;
                let mut sx = cos * dx + sin * dy + center_x;
                let mut sy = -sin * dx + cos * dy + center_y;
                if let Some((field_x, field_y)) = &elastic {
                    let position = y * shape.width + x;
                    sx += field_x[position];
                    sy += field_y[position];
                }
                source.push((sx, sy));
            }
        }
        resample(image, shape, &source)
    }

    /// Draws a displacement field for x and for y: uniform noise in `[-1, 1]`, smoothed
    /// by a Gaussian of `elastic_sigma` and scaled by `elastic_alpha`.
    fn displacement_field(&self, shape: ImageShape, rng: &mut TrainRng) -> (Vec<f32>, Vec<f32>) {
        let plane = shape.height * shape.width;
        let kernel = gaussian_kernel(self.elastic_sigma);
        let mut draw = || {
            let noise: Vec<f32> = (0..plane).map(|_| rng.random_range(-1.0..=1.0)).collect();
            let mut field = blur(&noise, shape.height, shape.width, &kernel);
            field.iter_mut().for_each(|v| *v *= self.elastic_alpha);
            field
        };
        let field_x = draw();
        let field_y = draw();
        (field_x, field_y)
    }
}

impl PhotoAugmentation {
    /// Crops a random square-scaled window, resizes it back (bilinear), flips it when
    /// drawn, and then jitters brightness, contrast and saturation.
    fn apply(&self, image: &[f32], shape: ImageShape, rng: &mut TrainRng) -> Vec<f32> {
        let scale = if self.min_crop_scale < 1.0 {
            rng.random_range(self.min_crop_scale..=1.0)
        } else {
            1.0
        };
        let crop_width = scale * shape.width as f32;
        let crop_height = scale * shape.height as f32;
        let left = rng.random_range(0.0..=shape.width as f32 - crop_width);
        let top = rng.random_range(0.0..=shape.height as f32 - crop_height);
        let flip = self.flip_probability > 0.0 && rng.random_bool(f64::from(self.flip_probability));

        let mut source = Vec::with_capacity(shape.height * shape.width);
        for y in 0..shape.height {
            for x in 0..shape.width {
                let x = if flip { shape.width - 1 - x } else { x };
                // Pixel centres of the output map onto the crop window.
                let sx = left + (x as f32 + 0.5) * scale - 0.5;
                let sy = top + (y as f32 + 0.5) * scale - 0.5;
                source.push((sx, sy));
            }
        }
        let mut out = resample_clamped(image, shape, &source);
        self.jitter_colours(&mut out, shape, rng);
        out
    }

    fn jitter_colours(&self, image: &mut [f32], shape: ImageShape, rng: &mut TrainRng) {
        let brightness = 1.0 + symmetric(rng, self.brightness);
        let contrast = 1.0 + symmetric(rng, self.contrast);
        let saturation = 1.0 + symmetric(rng, self.saturation);
        let plane = shape.height * shape.width;

        image.iter_mut().for_each(|v| *v *= brightness);
        let mean = image.iter().sum::<f32>() / image.len().max(1) as f32;
        image
            .iter_mut()
            .for_each(|v| *v = (*v - mean) * contrast + mean);
        if shape.channels == 3 {
            for position in 0..plane {
                let [r, g, b] = [0, 1, 2].map(|c| image[c * plane + position]);
                // ITU-R BT.601 luma weights.
                let gray = 0.299 * r + 0.587 * g + 0.114 * b;
                for c in 0..3 {
                    let value = &mut image[c * plane + position];
                    *value = gray + (*value - gray) * saturation;
                }
            }
        }
        image.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    }
}

/// Draws uniformly from `[-max, max]`, or returns 0 when `max` is 0.
fn symmetric(rng: &mut TrainRng, max: f32) -> f32 {
    if max > 0.0 {
        rng.random_range(-max..=max)
    } else {
        0.0
    }
}

/// Samples every channel at the source point of each output pixel, bilinearly, with
/// zero outside the image (the background of a digit).
fn resample(image: &[f32], shape: ImageShape, source: &[(f32, f32)]) -> Vec<f32> {
    sample_with(image, shape, source, |plane, x, y| {
        if x < 0 || y < 0 || x >= shape.width as isize || y >= shape.height as isize {
            0.0
        } else {
            plane[y as usize * shape.width + x as usize]
        }
    })
}

/// Like [`resample`], but repeats the border pixels outside the image.
fn resample_clamped(image: &[f32], shape: ImageShape, source: &[(f32, f32)]) -> Vec<f32> {
    sample_with(image, shape, source, |plane, x, y| {
        let x = x.clamp(0, shape.width as isize - 1) as usize;
        let y = y.clamp(0, shape.height as isize - 1) as usize;
        plane[y * shape.width + x]
    })
}

fn sample_with(
    image: &[f32],
    shape: ImageShape,
    source: &[(f32, f32)],
    pixel: impl Fn(&[f32], isize, isize) -> f32,
) -> Vec<f32> {
    let plane_len = shape.height * shape.width;
    let mut out = Vec::with_capacity(image.len());
    for plane in image.chunks_exact(plane_len) {
        for &(sx, sy) in source {
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            let top = pixel(plane, x0, y0) * (1.0 - fx) + pixel(plane, x0 + 1, y0) * fx;
            let bottom = pixel(plane, x0, y0 + 1) * (1.0 - fx) + pixel(plane, x0 + 1, y0 + 1) * fx;
            out.push(top * (1.0 - fy) + bottom * fy);
        }
    }
    out
}

/// Normalised 1-D Gaussian weights over three standard deviations either side.
fn gaussian_kernel(sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return vec![1.0];
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let weights: Vec<f32> = (-radius..=radius)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let sum: f32 = weights.iter().sum();
    weights.into_iter().map(|w| w / sum).collect()
}

/// Separable Gaussian blur of one plane, repeating the border values.
fn blur(plane: &[f32], height: usize, width: usize, kernel: &[f32]) -> Vec<f32> {
    let radius = (kernel.len() / 2) as isize;
    let pass = |input: &[f32], horizontal: bool| -> Vec<f32> {
        let mut out = vec![0.0; input.len()];
        for y in 0..height as isize {
            for x in 0..width as isize {
                let mut sum = 0.0;
                for (k, weight) in kernel.iter().enumerate() {
                    let offset = k as isize - radius;
                    let (sx, sy) = if horizontal {
                        ((x + offset).clamp(0, width as isize - 1), y)
                    } else {
                        (x, (y + offset).clamp(0, height as isize - 1))
                    };
                    sum += weight * input[sy as usize * width + sx as usize];
                }
                out[y as usize * width + x as usize] = sum;
            }
        }
        out
    };
    pass(&pass(plane, true), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn gaussian_kernel_sums_to_one() {
        let kernel = gaussian_kernel(4.0);
        assert_eq!(kernel.len(), 25);
        assert!((kernel.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn zero_digit_augmentation_is_identity() {
        let shape = ImageShape {
            channels: 1,
            height: 5,
            width: 4,
        };
        let image: Vec<f32> = (0..20).map(|i| i as f32 / 20.0).collect();
        let none = DigitAugmentation {
            max_shift: 0.0,
            max_rotation: 0.0,
            elastic_probability: 0.0,
            ..DigitAugmentation::default()
        };
        let out = none.apply(&image, shape, &mut TrainRng::seed_from_u64(1));
        for (a, b) in out.iter().zip(&image) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }
}
