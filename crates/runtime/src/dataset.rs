//! Labelled data sources: IDX files (MNIST) and folders of images.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::RuntimeError;

/// IDX magic number of an unsigned-byte tensor with three dimensions (images).
const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic number of an unsigned-byte tensor with one dimension (labels).
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// One input with its ground truth, when known.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Origin of the sample, such as `t10k-images-idx3-ubyte.gz#17` or a file path.
    pub id: String,
    pub data: SampleData,
    pub label: Option<usize>,
}

/// The raw content of a sample.
#[derive(Debug, Clone)]
pub enum SampleData {
    /// Decoded 8-bit grayscale pixels, row by row.
    Gray {
        width: u32,
        height: u32,
        pixels: Vec<u8>,
    },
    /// An encoded image file (JPEG or PNG), decoded during preprocessing.
    Encoded(Vec<u8>),
}

/// A data set that yields samples by index.
#[derive(Debug)]
pub enum Dataset {
    /// Images and optional labels from IDX files, held in memory.
    Idx {
        name: String,
        rows: u32,
        cols: u32,
        pixels: Vec<u8>,
        labels: Option<Vec<u8>>,
    },
    /// Image files in one folder, read when a sample is requested.
    Folder {
        files: Vec<PathBuf>,
        labels: Vec<Option<usize>>,
    },
}

impl Dataset {
    /// Reads an IDX image file and, optionally, its label file; either may be gzip
    /// compressed.
    pub fn open_idx(images: &Path, labels: Option<&Path>) -> Result<Dataset, RuntimeError> {
        let image_bytes = read_maybe_gzip(images)?;
        let (dims, pixels) = parse_idx(images, &image_bytes, IDX_IMAGES_MAGIC, 3)?;
        let (count, rows, cols) = (dims[0], dims[1], dims[2]);

        let labels = match labels {
            None => None,
            Some(path) => {
                let bytes = read_maybe_gzip(path)?;
                let (label_dims, values) = parse_idx(path, &bytes, IDX_LABELS_MAGIC, 1)?;
                if label_dims[0] != count {
                    return Err(RuntimeError::InvalidDataset {
                        path: path.to_path_buf(),
                        reason: format!(
                            "{} labels for {count} images in {}",
                            label_dims[0],
                            images.display()
                        ),
                    });
                }
                Some(values.to_vec())
            }
        };
        let name = images.file_name().map_or_else(
            || images.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Ok(Dataset::Idx {
            name,
            rows,
            cols,
            pixels: pixels.to_vec(),
            labels,
        })
    }

    /// Lists the JPEG and PNG files of a folder in name order. A file named like
    /// `photo_207.jpg` is labelled with class 207: the number after the last `_`.
    pub fn open_folder(dir: &Path) -> Result<Dataset, RuntimeError> {
        let io_error = |source| RuntimeError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error)? {
            let path = entry.map_err(io_error)?.path();
            let extension = path
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if matches!(extension.as_deref(), Some("jpg" | "jpeg" | "png")) {
                files.push(path);
            }
        }
        if files.is_empty() {
            return Err(RuntimeError::InvalidDataset {
                path: dir.to_path_buf(),
                reason: "no .jpg, .jpeg or .png files".into(),
            });
        }
        files.sort();
        let labels = files
            .iter()
            .map(|path| label_from_file_name(path))
            .collect();
        Ok(Dataset::Folder { files, labels })
    }

    /// Opens an IDX file (with its labels) or a folder of images, whichever `path` is.
    pub fn open(path: &Path, labels: Option<&Path>) -> Result<Dataset, RuntimeError> {
        if path.is_dir() {
            Dataset::open_folder(path)
        } else {
            Dataset::open_idx(path, labels)
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        match self {
            Dataset::Idx {
                rows, cols, pixels, ..
            } => pixels.len() / (*rows as usize * *cols as usize).max(1),
            Dataset::Folder { files, .. } => files.len(),
        }
    }

    /// Returns whether the data set has no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns sample `index`, reading it from disk for folders.
    pub fn sample(&self, index: usize) -> Result<Sample, RuntimeError> {
        if index >= self.len() {
            return Err(RuntimeError::SampleOutOfRange {
                index,
                len: self.len(),
            });
        }
        match self {
            Dataset::Idx {
                name,
                rows,
                cols,
                pixels,
                labels,
            } => {
                let size = *rows as usize * *cols as usize;
                Ok(Sample {
                    id: format!("{name}#{index}"),
                    data: SampleData::Gray {
                        width: *cols,
                        height: *rows,
                        pixels: pixels[index * size..(index + 1) * size].to_vec(),
                    },
                    label: labels.as_ref().map(|l| usize::from(l[index])),
                })
            }
            Dataset::Folder { files, labels } => {
                let path = &files[index];
                let bytes = fs::read(path).map_err(|source| RuntimeError::Io {
                    path: path.clone(),
                    source,
                })?;
                Ok(Sample {
                    id: path.display().to_string(),
                    data: SampleData::Encoded(bytes),
                    label: labels[index],
                })
            }
        }
    }

    /// Indices of shard `shard` out of `shards`: every `shards`-th sample starting at
    /// `shard`, so shards have equal sizes within one and similar class mixes.
    pub fn shard_indices(&self, shard: usize, shards: usize) -> Vec<usize> {
        (shard..self.len()).step_by(shards.max(1)).collect()
    }
}

fn label_from_file_name(path: &Path) -> Option<usize> {
    let stem = path.file_stem()?.to_str()?;
    let (_, last) = stem.rsplit_once('_')?;
    last.parse().ok()
}

fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>, RuntimeError> {
    let io_error = |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = fs::read(path).map_err(io_error)?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .map_err(|error| RuntimeError::InvalidDataset {
            path: path.to_path_buf(),
            reason: format!("gzip stream is damaged: {error}"),
        })?;
    Ok(out)
}

/// Checks an IDX header and returns its dimensions and the data after it.
fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    magic: u32,
    rank: usize,
) -> Result<(Vec<u32>, &'a [u8]), RuntimeError> {
    let invalid = |reason: String| RuntimeError::InvalidDataset {
        path: path.to_path_buf(),
        reason,
    };
    let header_len = 4 + 4 * rank;
    if bytes.len() < header_len {
        return Err(invalid(format!(
            "{} bytes is shorter than the {header_len}-byte IDX header",
            bytes.len()
        )));
    }
    let word = |i: usize| u32::from_be_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    if word(0) != magic {
        return Err(invalid(format!(
            "IDX magic number is {:#010x}, expected {magic:#010x}",
            word(0)
        )));
    }
    let dims: Vec<u32> = (0..rank).map(|d| word(4 + 4 * d)).collect();
    let expected: usize = dims.iter().map(|&d| d as usize).product();
    let data = &bytes[header_len..];
    if data.len() != expected {
        return Err(invalid(format!(
            "header promises {dims:?} = {expected} bytes of data, the file has {}",
            data.len()
        )));
    }
    Ok((dims, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx_images(count: u32, rows: u32, cols: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IDX_IMAGES_MAGIC, count, rows, cols] {
            bytes.extend(word.to_be_bytes());
        }
        bytes.extend((0..count * rows * cols).map(|i| i as u8));
        bytes
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [IDX_LABELS_MAGIC, labels.len() as u32] {
            bytes.extend(word.to_be_bytes());
        }
        bytes.extend(labels);
        bytes
    }

    #[test]
    fn idx_round_trip_with_shards() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let labels = dir.path().join("labels");
        fs::write(&images, idx_images(5, 2, 3)).unwrap();
        fs::write(&labels, idx_labels(&[4, 0, 9, 1, 1])).unwrap();

        let data = Dataset::open_idx(&images, Some(&labels)).unwrap();
        assert_eq!(data.len(), 5);
        let sample = data.sample(2).unwrap();
        assert_eq!(sample.label, Some(9));
        let SampleData::Gray { pixels, .. } = sample.data else {
            panic!("IDX samples are grayscale")
        };
        assert_eq!(pixels, [12, 13, 14, 15, 16, 17]);
        assert_eq!(data.shard_indices(1, 2), [1, 3]);
        assert!(matches!(
            data.sample(5),
            Err(RuntimeError::SampleOutOfRange { index: 5, len: 5 })
        ));
    }

    #[test]
    fn idx_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let mut truncated = idx_images(5, 2, 3);
        truncated.truncate(truncated.len() - 1);
        fs::write(&images, truncated).unwrap();
        let error = Dataset::open_idx(&images, None).unwrap_err();
        assert!(error.to_string().contains("29"), "{error}");

        fs::write(&images, idx_images(5, 2, 3)).unwrap();
        let labels = dir.path().join("labels");
        fs::write(&labels, idx_labels(&[1, 2])).unwrap();
        let error = Dataset::open_idx(&images, Some(&labels)).unwrap_err();
        assert!(
            error.to_string().contains("2 labels for 5 images"),
            "{error}"
        );

        fs::write(&labels, idx_images(1, 1, 1)).unwrap();
        let error = Dataset::open_idx(&images, Some(&labels)).unwrap_err();
        assert!(error.to_string().contains("magic"), "{error}");
    }

    #[test]
    fn folder_labels_come_from_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b_12.jpg", "a_3.png", "notes.txt", "unlabelled.jpeg"] {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        let data = Dataset::open_folder(dir.path()).unwrap();
        assert_eq!(data.len(), 3);
        assert_eq!(data.sample(0).unwrap().label, Some(3));
        assert_eq!(data.sample(1).unwrap().label, Some(12));
        assert_eq!(data.sample(2).unwrap().label, None);
    }
}
