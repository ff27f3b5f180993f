//! Turning raw samples into model input, as the bundle manifest describes.

use fleet_bundle::{Preprocessing, ResizeFilter};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

use crate::{RuntimeError, Sample, SampleData};

/// Writes one sample as `channels * height * width` floats (CHW) into a new vector,
/// decoding and resizing it first when needed.
pub fn preprocess(
    sample: &Sample,
    preprocessing: &Preprocessing,
) -> Result<Vec<f32>, RuntimeError> {
    match *preprocessing {
        Preprocessing::Grayscale {
            width,
            height,
            resize,
            scale,
            offset,
        } => {
            let image = to_gray(sample)?;
            let image = resized_gray(image, width, height, resize);
            Ok(image
                .into_raw()
                .into_iter()
                .map(|pixel| f32::from(pixel) * scale + offset)
                .collect())
        }
        Preprocessing::Rgb {
            width,
            height,
            resize,
            scale,
            offset,
        } => {
            let image = to_rgb(sample)?;
            let image = resized_rgb(image, width, height, resize);
            Ok(rgb_to_chw(&image, scale, offset))
        }
    }
}

fn to_gray(sample: &Sample) -> Result<GrayImage, RuntimeError> {
    match &sample.data {
        SampleData::Gray {
            width,
            height,
            pixels,
        } => GrayImage::from_raw(*width, *height, pixels.clone()).ok_or_else(|| {
            RuntimeError::Decode {
                sample: sample.id.clone(),
                reason: format!("{} pixels do not fill {width}x{height}", pixels.len()),
            }
        }),
        SampleData::Encoded(bytes) => Ok(decode(sample, bytes)?.into_luma8()),
    }
}

fn to_rgb(sample: &Sample) -> Result<RgbImage, RuntimeError> {
    match &sample.data {
        SampleData::Gray { .. } => Ok(DynamicImage::ImageLuma8(to_gray(sample)?).into_rgb8()),
        SampleData::Encoded(bytes) => Ok(decode(sample, bytes)?.into_rgb8()),
    }
}

fn decode(sample: &Sample, bytes: &[u8]) -> Result<DynamicImage, RuntimeError> {
    image::load_from_memory(bytes).map_err(|error| RuntimeError::Decode {
        sample: sample.id.clone(),
        reason: error.to_string(),
    })
}

fn filter(resize: ResizeFilter) -> FilterType {
    match resize {
        ResizeFilter::Bilinear => FilterType::Triangle,
        ResizeFilter::Nearest => FilterType::Nearest,
    }
}

fn resized_gray(image: GrayImage, width: u32, height: u32, resize: ResizeFilter) -> GrayImage {
    if image.dimensions() == (width, height) {
        return image;
    }
    image::imageops::resize(&image, width, height, filter(resize))
}

fn resized_rgb(image: RgbImage, width: u32, height: u32, resize: ResizeFilter) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image;
    }
    image::imageops::resize(&image, width, height, filter(resize))
}

/// Reorders interleaved RGB (HWC) into planes (CHW) while scaling.
fn rgb_to_chw(image: &RgbImage, scale: f32, offset: f32) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (index, pixel) in image.pixels().enumerate() {
        for channel in 0..3 {
            out[channel * plane + index] = f32::from(pixel.0[channel]) * scale + offset;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gray_sample(width: u32, height: u32, pixels: Vec<u8>) -> Sample {
        Sample {
            id: "test#0".into(),
            data: SampleData::Gray {
                width,
                height,
                pixels,
            },
            label: None,
        }
    }

    #[test]
    fn gray_pixels_are_scaled_in_place() {
        let sample = gray_sample(2, 1, vec![0, 255]);
        let preprocessing = Preprocessing::Grayscale {
            width: 2,
            height: 1,
            resize: ResizeFilter::Bilinear,
            scale: 1.0 / 255.0,
            offset: 0.0,
        };
        assert_eq!(preprocess(&sample, &preprocessing).unwrap(), [0.0, 1.0]);
    }

    #[test]
    fn rgb_is_planar_and_resized() {
        let mut image = RgbImage::new(4, 4);
        for pixel in image.pixels_mut() {
            pixel.0 = [255, 0, 127];
        }
        let mut png = Vec::new();
        DynamicImage::ImageRgb8(image)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let sample = Sample {
            id: "red.png".into(),
            data: SampleData::Encoded(png),
            label: None,
        };
        let preprocessing = Preprocessing::Rgb {
            width: 2,
            height: 2,
            resize: ResizeFilter::Bilinear,
            scale: 1.0 / 127.5,
            offset: -1.0,
        };
        let out = preprocess(&sample, &preprocessing).unwrap();
        assert_eq!(out.len(), 12);
        assert!(out[..4].iter().all(|&v| (v - 1.0).abs() < 1e-6), "{out:?}");
        assert!(out[4..8].iter().all(|&v| (v + 1.0).abs() < 1e-6), "{out:?}");
        assert!(out[8..].iter().all(|&v| v.abs() < 0.01), "{out:?}");
    }

    #[test]
    fn undecodable_image_names_the_sample() {
        let sample = Sample {
            id: "photos/broken.jpg".into(),
            data: SampleData::Encoded(b"\xff\xd8\xff not really a jpeg".to_vec()),
            label: Some(3),
        };
        let preprocessing = Preprocessing::Rgb {
            width: 2,
            height: 2,
            resize: ResizeFilter::Bilinear,
            scale: 1.0,
            offset: 0.0,
        };
        let error = preprocess(&sample, &preprocessing).unwrap_err();
        assert!(matches!(error, RuntimeError::Decode { .. }));
        assert!(error.to_string().contains("photos/broken.jpg"), "{error}");
    }
}
