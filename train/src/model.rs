//! The convolutional classifier family trained here, in candle.
//!
//! A model is a chain of blocks, each a 3x3 convolution (padding 1) with ReLU and a 2x2
//! max pool, then fully connected layers with ReLU between them, and an optional
//! `(x - mean) / std` on the input. The teacher digit-cnn has this shape (conv 32, 64,
//! 128 and one hidden layer of 256), and a student is a narrower, shallower member, so
//! the same code trains, imports and exports both.

use std::collections::HashMap;
use std::fmt;

use candle_core::{DType, Device, Tensor, Var};
use rand::RngExt;
use serde::{Deserialize, Serialize};

use crate::augment::TrainRng;
use crate::data::{ImageSet, ImageShape};
use crate::kernels;
use crate::loader::{Loader, derived_rng, stream};
use crate::loss::correct_predictions;
use crate::{Result, TrainError};

/// Constant input normalisation, `(x - mean) / std`, applied inside the model so that
/// callers feed `pixel / 255`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: f32,
    pub std: f32,
}

/// The architecture of a [`Cnn`]: everything needed to rebuild it and to check that a
/// checkpoint fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CnnConfig {
    pub input: ImageShape,
    /// Output channels of each convolution block.
    pub conv_channels: Vec<usize>,
    /// Widths of the hidden fully connected layers; empty for a linear classifier on the
    /// flattened features.
    pub hidden: Vec<usize>,
    pub classes: usize,
    pub normalization: Option<Normalization>,
}

impl CnnConfig {
    /// A student of `depth` blocks whose channels double from `width`: width 16 and depth
    /// 3 give blocks of 16, 32 and 64 channels.
    pub fn student(
        input: ImageShape,
        classes: usize,
        width: usize,
        depth: usize,
        hidden: Vec<usize>,
        normalization: Option<Normalization>,
    ) -> CnnConfig {
        let conv_channels = (0..depth).map(|block| width << block).collect();
        CnnConfig {
            input,
            conv_channels,
            hidden,
            classes,
            normalization,
        }
    }

    /// Checks that every size is positive, that the pooling leaves at least one pixel,
    /// and that the normalisation divides by a positive number.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: String| Err(TrainError::InvalidConfig(message));
        if self.input.is_empty() || self.classes == 0 {
            return invalid(format!(
                "model input {} with {} classes: every size must be positive",
                self.input, self.classes
            ));
        }
        if self.conv_channels.contains(&0) || self.hidden.contains(&0) {
            return invalid(format!(
                "model layer widths {:?} and {:?} must all be positive",
                self.conv_channels, self.hidden
            ));
        }
        let (height, width) = self.feature_map();
        if height == 0 || width == 0 {
            return invalid(format!(
                "{} pooling blocks shrink a {}x{} image to nothing; use fewer blocks",
                self.conv_channels.len(),
                self.input.height,
                self.input.width
            ));
        }
        if let Some(norm) = self.normalization
            && !(norm.std.is_finite() && norm.std > 0.0 && norm.mean.is_finite())
        {
            return invalid(format!(
                "normalization std is {}, expected a positive number",
                norm.std
            ));
        }
        Ok(())
    }

    /// Height and width after all pooling blocks (each halves, rounding down).
    pub fn feature_map(&self) -> (usize, usize) {
        let blocks = self.conv_channels.len() as u32;
        (self.input.height >> blocks, self.input.width >> blocks)
    }

    /// Number of values the first fully connected layer receives.
    pub fn flattened_features(&self) -> usize {
        let (height, width) = self.feature_map();
        let channels = self
            .conv_channels
            .last()
            .copied()
            .unwrap_or(self.input.channels);
        channels * height * width
    }

    /// Names and shapes of the parameters, in forward order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut shapes = Vec::new();
        let mut channels = self.input.channels;
        for (block, &out) in self.conv_channels.iter().enumerate() {
            shapes.push((
                format!("conv{}.weight", block + 1),
                vec![out, channels, 3, 3],
            ));
            shapes.push((format!("conv{}.bias", block + 1), vec![out]));
            channels = out;
        }
        let mut features = self.flattened_features();
        let widths = self.hidden.iter().chain(std::iter::once(&self.classes));
        for (layer, &out) in widths.enumerate() {
            shapes.push((format!("fc{}.weight", layer + 1), vec![out, features]));
            shapes.push((format!("fc{}.bias", layer + 1), vec![out]));
            features = out;
        }
        shapes
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

impl fmt::Display for CnnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "input {}, conv {:?}, hidden {:?}, {} classes",
            self.input, self.conv_channels, self.hidden, self.classes
        )?;
        if let Some(norm) = self.normalization {
            write!(f, ", normalised by mean {} std {}", norm.mean, norm.std)?;
        }
        Ok(())
    }
}

/// One trainable tensor with its name (`conv1.weight`, `fc2.bias`).
#[derive(Debug, Clone)]
pub struct Parameter {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies: true for weights, false for biases.
    pub decay: bool,
}

/// Dropout for one forward pass: the probability of zeroing an input of a fully
/// connected layer, and the generator that draws the masks.
#[derive(Debug)]
pub struct Dropout<'a> {
    pub probability: f32,
    pub rng: &'a mut TrainRng,
}

/// A classifier of the [`CnnConfig`] family with its parameters on one device.
#[derive(Debug)]
pub struct Cnn {
    config: CnnConfig,
    parameters: Vec<Parameter>,
    device: Device,
    compute_dtype: DType,
}

impl Cnn {
    /// Creates a model with He-uniform weights (bound `sqrt(6 / fan_in)`, suited to
    /// ReLU) and zero biases, drawn from `seed`.
    pub fn new(config: CnnConfig, device: &Device, seed: u64) -> Result<Cnn> {
        config.validate()?;
        let mut rng = derived_rng(seed, stream::INIT, &[]);
        let mut tensors = HashMap::new();
        for (name, shape) in config.parameter_shapes() {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; count]
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let bound = (6.0 / fan_in as f32).sqrt();
                (0..count)
                    .map(|_| rng.random_range(-bound..=bound))
                    .collect()
            };
            tensors.insert(name, Tensor::from_vec(values, shape, device)?);
        }
        Cnn::from_tensors(config, &tensors, device)
    }

    /// Creates a model from named tensors, checking that every parameter is present
    /// with its shape and that no tensor is left over.
    pub fn from_tensors(
        config: CnnConfig,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Cnn> {
        config.validate()?;
        let shapes = config.parameter_shapes();
        if let Some(extra) = tensors
            .keys()
            .find(|name| !shapes.iter().any(|(known, _)| known == *name))
        {
            return Err(TrainError::InvalidConfig(format!(
                "tensor {extra} is not a parameter of a model with {config}"
            )));
        }
        let mut parameters = Vec::with_capacity(shapes.len());
        for (name, shape) in shapes {
            let tensor = tensors
                .get(&name)
                .ok_or_else(|| TrainError::InvalidConfig(format!("parameter {name} is missing")))?;
            if tensor.dims() != shape.as_slice() {
                return Err(TrainError::InvalidConfig(format!(
                    "parameter {name} has shape {:?}, expected {shape:?}",
                    tensor.dims()
                )));
            }
            let tensor = tensor.to_dtype(DType::F32)?.to_device(device)?;
            parameters.push(Parameter {
                decay: name.ends_with(".weight"),
                var: Var::from_tensor(&tensor)?,
                name,
            });
        }
        Ok(Cnn {
            config,
            parameters,
            device: device.clone(),
            compute_dtype: DType::F32,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &CnnConfig {
        &self.config
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters in forward order.
    pub fn parameters(&self) -> &[Parameter] {
        &self.parameters
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.parameters.iter().map(|p| p.var.elem_count()).sum()
    }

    /// The parameter values by name, detached from any computation.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.parameters
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().detach()))
            .collect()
    }

    /// Copies the values of `tensors` into the parameters, which must all be present
    /// with their shapes.
    pub fn load_tensors(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for parameter in &self.parameters {
            let tensor = tensors.get(&parameter.name).ok_or_else(|| {
                TrainError::InvalidConfig(format!("parameter {} is missing", parameter.name))
            })?;
            if tensor.dims() != parameter.var.dims() {
                return Err(TrainError::InvalidConfig(format!(
                    "parameter {} has shape {:?}, expected {:?}",
                    parameter.name,
                    tensor.dims(),
                    parameter.var.dims()
                )));
            }
            parameter
                .var
                .set(&tensor.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// Sets the dtype the forward pass computes in. Parameters stay float32 (the
    /// master copy the optimizer updates) and are cast for each pass.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute_dtype = dtype;
    }

    /// Runs the model on a float32 NCHW batch of `pixel / 255` images and returns the
    /// float32 logits `[batch, classes]`. With `dropout`, inputs of the fully connected
    /// layers are zeroed at random and the rest scaled up to keep their expectation.
    pub fn forward(&self, images: &Tensor, mut dropout: Option<Dropout<'_>>) -> Result<Tensor> {
        let dtype = self.compute_dtype;
        let mut x = images.to_dtype(dtype)?;
        if let Some(norm) = self.config.normalization {
            x = ((x - f64::from(norm.mean))? / f64::from(norm.std))?;
        }

        let mut parameters = self.parameters.iter();
        let mut next = || -> Result<Tensor> {
            let parameter = parameters
                .next()
                .expect("parameter_shapes lists every layer's weight and bias");
            Ok(parameter.var.as_tensor().to_dtype(dtype)?)
        };
        let mut conv_weights = Vec::with_capacity(self.config.conv_channels.len());
        for _ in &self.config.conv_channels {
            conv_weights.push((next()?, next()?));
        }
        x = if self.device.is_cpu() && dtype == DType::F32 {
            conv_blocks_cpu(&x, &conv_weights)?
        } else {
            conv_blocks_generic(&x, &conv_weights)?
        };

        x = x.flatten_from(1)?;
        let layers = self.config.hidden.len() + 1;
        for layer in 0..layers {
            if let Some(dropout) = dropout.as_mut() {
                x = apply_dropout(&x, dropout)?;
            }
            let (weight, bias) = (next()?, next()?);
            x = x.matmul(&weight.t()?)?.broadcast_add(&bias)?;
            if layer + 1 < layers {
                x = x.relu()?;
            }
        }
        Ok(x.to_dtype(DType::F32)?)
    }

    /// Logits for a float32 NCHW batch given as a flat slice, without dropout.
    pub fn predict(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let shape = self.config.input;
        let input = Tensor::from_slice(
            images,
            (batch, shape.channels, shape.height, shape.width),
            &self.device,
        )?;
        Ok(self.forward(&input, None)?.flatten_all()?.to_vec1()?)
    }

    /// Returns the number of correctly classified images of `data`, in batches of
    /// `batch_size`.
    pub fn count_correct(&self, data: &ImageSet, batch_size: usize) -> Result<usize> {
        if data.shape() != self.config.input {
            return Err(TrainError::ImageShapeMismatch {
                name: data.name().to_string(),
                expected: self.config.input.to_string(),
                found: data.shape().to_string(),
            });
        }
        let loader = Loader::sequential(data, batch_size);
        let mut correct = 0;
        for batch in loader.epoch(0) {
            let logits = self.forward(&batch.images_tensor(&self.device)?, None)?;
            correct += correct_predictions(&logits, &batch.labels)?;
        }
        Ok(correct)
    }
}

/// The convolution blocks with the kernels of [`crate::kernels`]: activations are
/// `[C, N, H, W]` between blocks, and NCHW again at the end.
fn conv_blocks_cpu(x: &Tensor, weights: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let mut x = x.transpose(0, 1)?.contiguous()?;
    for (weight, bias) in weights {
        let (channels, batch, height, width) = x.dims4()?;
        let out_channels = weight.dim(0)?;
        let columns = kernels::im2col_3x3(&x)?;
        let y = weight
            .reshape((out_channels, channels * 9))?
            .matmul(&columns)?
            .broadcast_add(&bias.reshape((out_channels, 1))?)?
            .relu()?
            .reshape((out_channels, batch, height, width))?;
        x = kernels::max_pool_2x2(&y)?;
    }
    Ok(x.transpose(0, 1)?)
}

/// The convolution blocks with candle's own operations, for devices other than the
/// CPU. The pool is a reshape and two `max` reductions rather than `max_pool2d`,
/// because candle 0.11's `max_pool2d` backward divides the gradient by the window area.
fn conv_blocks_generic(x: &Tensor, weights: &[(Tensor, Tensor)]) -> Result<Tensor> {
    let mut x = x.clone();
    for (weight, bias) in weights {
        let out_channels = weight.dim(0)?;
        let y = x
            .conv2d(weight, 1, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, out_channels, 1, 1))?)?
            .relu()?;
        let (batch, _, height, width) = y.dims4()?;
        let (half_height, half_width) = (height / 2, width / 2);
        x = y
            .narrow(2, 0, 2 * half_height)?
            .narrow(3, 0, 2 * half_width)?
            .reshape((batch, out_channels, half_height, 2, half_width, 2))?
            .max(5)?
            .max(3)?;
    }
    Ok(x)
}

fn apply_dropout(x: &Tensor, dropout: &mut Dropout<'_>) -> Result<Tensor> {
    let p = dropout.probability;
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            if dropout.rng.random::<f32>() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_kernels_match_candle_operations() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 2, 7, 5), &device).unwrap();
        let weights: Vec<(Var, Var)> = [(4, 2), (6, 4)]
            .into_iter()
            .map(|(out, channels)| {
                (
                    Var::randn(0f32, 1.0, (out, channels, 3, 3), &device).unwrap(),
                    Var::randn(0f32, 1.0, out, &device).unwrap(),
                )
            })
            .collect();
        let tensors: Vec<(Tensor, Tensor)> = weights
            .iter()
            .map(|(w, b)| (w.as_tensor().clone(), b.as_tensor().clone()))
            .collect();
        let cpu = conv_blocks_cpu(&x, &tensors).unwrap();
        let generic = conv_blocks_generic(&x, &tensors).unwrap();
        assert_eq!(cpu.dims(), [3, 6, 1, 1]);
        assert_eq!(generic.dims(), cpu.dims());
        let diff: f32 = (&cpu - &generic)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-3, "outputs differ by {diff}");

        let cpu_grads = cpu.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let generic_grads = generic
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (weight, bias) in &weights {
            for var in [weight, bias] {
                let a = cpu_grads.get(var).unwrap();
                let b = generic_grads.get(var).unwrap();
                let diff: f32 = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(diff < 1e-2, "gradients differ by {diff}");
            }
        }
    }

    #[test]
    fn student_parameter_count() {
        let input = ImageShape {
            channels: 1,
            height: 28,
            width: 28,
        };
        let config = CnnConfig::student(input, 10, 16, 3, vec![], None);
        // 160 + 4,640 + 18,496 convolution, 64 * 3 * 3 * 10 + 10 classifier.
        assert_eq!(config.parameter_count(), 160 + 4_640 + 18_496 + 5_770);
    }
}
